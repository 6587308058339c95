//! `brokerctl` binary (being written).
fn main() {}

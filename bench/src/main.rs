//! `keyhaven-bench`: load generator and baselines measured in the same run.
fn main() {}

//! `broker-agent`: the sidecar in each pod that leases secrets from the broker, renews
//! them, and writes the values atomically into a shared in-memory volume. It uses only the
//! wire contracts (`keyhaven-proto`): no HSM, no database.
//!
//! Not built yet: arrives with the `broker-agent` issue. Until then it says so and fails.
#![forbid(unsafe_code)]

use keyhaven_proto::broker::v1::leases_client::LeasesClient as _Client;

fn main() -> std::process::ExitCode {
    let _ = std::any::type_name::<_Client<()>>();
    eprintln!("broker-agent: not implemented yet (see the broker-agent issue)");
    std::process::ExitCode::from(2)
}

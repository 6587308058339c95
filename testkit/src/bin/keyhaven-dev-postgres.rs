//! A throwaway PostgreSQL for the quickstart's dynamic-credentials step: the tests' cluster
//! (`testkit::postgres`) with database `shop`, a table `orders` and an admin role that may
//! create roles and logs in with a password, like a production database the broker is given.
//! Runs until SIGTERM or SIGINT, then stops and deletes the cluster.
//!
//! `keyhaven-dev-postgres ADMIN_PASSWORD_FILE PORT_FILE`: the admin role is `keyhaven_admin`
//! with the password in ADMIN_PASSWORD_FILE (never on a command line); the port is written to
//! PORT_FILE once the server accepts logins.

use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};
use testkit::postgres::Postgres;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyhaven-dev-postgres: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [password_file, port_file] = args.as_slice() else {
        return Err("usage: keyhaven-dev-postgres ADMIN_PASSWORD_FILE PORT_FILE".into());
    };
    let password = zeroize::Zeroizing::new(std::fs::read_to_string(password_file)?);
    let password = password.trim();
    if password.is_empty() || !password.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("the admin password must be [A-Za-z0-9]+".into());
    }
    // Blocked before anything starts, so a signal is never lost and the cluster is always
    // dropped (stopped and deleted) on the way out.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    let pg = Postgres::start()?;
    pg.create_database("shop")?;
    pg.psql(
        "shop",
        &format!(
            "CREATE TABLE orders (id int, item text);\n\
             INSERT INTO orders VALUES (1, 'tea'), (2, 'scones');\n\
             CREATE TABLE payroll (name text, salary int);\n\
             CREATE ROLE keyhaven_admin LOGIN CREATEROLE PASSWORD '{password}';\n\
             GRANT SELECT ON orders TO keyhaven_admin WITH GRANT OPTION;\n"
        ),
    )?;
    pg.require_passwords()?;
    std::fs::write(port_file, format!("{}\n", pg.port()))?;
    eprintln!(
        "keyhaven-dev-postgres: PostgreSQL {} on 127.0.0.1:{}",
        pg.version(),
        pg.port()
    );
    signals.wait()?;
    drop(pg);
    Ok(())
}

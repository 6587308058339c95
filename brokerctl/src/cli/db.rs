//! `brokerctl db ...`: dynamic database credentials.

use std::path::PathBuf;

use clap::Subcommand;

/// `brokerctl db ...`
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Database connections (the admin URL the broker creates roles with).
    Connection {
        /// Connection operation.
        #[command(subcommand)]
        command: DbConnectionCommand,
    },
    /// Role definitions (what a credential may do, its TTLs and caps).
    Role {
        /// Role operation.
        #[command(subcommand)]
        command: DbRoleCommand,
    },
    /// Live credentials by connection, role and state, and the roles still to drop (with why
    /// the last attempt failed).
    Status,
    /// Compare the roles the broker made in CONNECTION's database with the live credentials:
    /// drop marked roles with no live credential, end the leases whose role is gone.
    Reconcile {
        /// Connection name.
        connection: String,
        /// Report what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `brokerctl db connection ...`
#[derive(Debug, Subcommand)]
pub enum DbConnectionCommand {
    /// Store (or replace) a connection. The broker checks that the URL logs in and may create
    /// roles, then stores it encrypted like a secret; it is never shown again.
    Put {
        /// Connection name (`[-._A-Za-z0-9]`, at most 63).
        name: String,
        /// A file holding `postgres://USER:PASSWORD@HOST:PORT/DATABASE[?sslmode=...]` (never
        /// on the command line).
        #[arg(long, value_name = "FILE")]
        url_file: PathBuf,
    },
    /// Set the connection's admin password to a new random one that only the broker knows
    /// (the URL's user must be allowed to change its own password). Audited.
    RotateRoot {
        /// Connection name.
        name: String,
    },
    /// Delete a connection: its role definitions and its stored URL (destroyed). Refused while
    /// any of its credentials is live, or while its database still holds a role the broker
    /// made (`db reconcile` drops those).
    Delete {
        /// Connection name.
        name: String,
        /// The database no longer exists: skip the check of its roles (live credentials still
        /// refuse).
        #[arg(long)]
        database_gone: bool,
    },
}

/// `brokerctl db role ...`
#[derive(Debug, Subcommand)]
pub enum DbRoleCommand {
    /// Store (or replace) role CONNECTION/ROLE from a YAML definition, validated here first.
    Put {
        /// `CONNECTION/ROLE`.
        name: String,
        /// The definition (`-` reads stdin).
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: PathBuf,
    },
    /// Every role definition.
    List,
    /// Delete role CONNECTION/ROLE's definition. Refused while any of its credentials is live.
    Delete {
        /// `CONNECTION/ROLE`.
        name: String,
    },
}

//! `sqlx::migrate!` embeds `migrations/` at compile time, and Cargo reruns a macro only when a
//! file it knows changes: a new migration is a new file. This makes a new migration rebuild
//! the crate (the build script sqlx recommends).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

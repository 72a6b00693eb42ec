//! fastmcp-guard core: the hot path of the guard, in plain Rust.
//!
//! Domain modules know nothing of Python, so `cargo test` needs no interpreter;
//! the bindings (`py`, `errors`, `pystore`) are compiled only with the `python`
//! feature, which maturin turns on.

pub mod audit;
pub mod hashing;
pub mod ipmatch;
pub mod keystore;
pub mod limiter;
pub mod sqlite_wal;
pub mod tokens;
pub mod usage;

#[cfg(feature = "python")]
mod errors;
#[cfg(feature = "python")]
mod py;
#[cfg(feature = "python")]
mod pystore;

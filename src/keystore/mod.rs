//! API keys: records and lifecycle, storage backends, and the [`KeyManager`] service that
//! verifies tokens.
//!
//! * [`KeyRecord`] is one key as stored (argon2id hash of the secret, never the token).
//! * [`KeyBackend`] is the small storage surface; [`MemoryBackend`] and [`SqliteBackend`]
//!   implement it.
//! * [`KeyManager`] owns a backend, the cache of verified tokens, the digests proven on this
//!   node, the negative cache of unknown ids, the failure budgets ([`throttle`]), the pool of
//!   hashing threads, and a background thread (`fmg-keys`) that writes `last_used_at` in
//!   batches and watches the store for changes made by other processes.
//!
//! Verification of a token not in the cache: a digest proven before (against the same
//! stored hash) re-reads the record only; an unknown id remembered by the negative cache
//! costs nothing; anything else reserves a place in the failure budgets, reads the record,
//! and hashes on the pool.
//!
//! Lifecycle: `active` → `rotating` (the old token stays valid until `grace_until`) →
//! `revoked`. Expiry (`expires_at`) is independent of the status.
//!
//! Keys imported from fastmcp-guard 0.2 ([`legacy`]) are ordinary records with a bcrypt hash
//! of their whole token and a [`KeyRecord::legacy_selector`]; their 0.2 tokens are verified
//! with bcrypt (once per process, then cached like any token). Everything else — status,
//! expiry, grace periods, the throttle, revoke and rotate — is the same. Rotating one issues
//! a current-format token.
//!
//! Credits (a per-key balance calls spend, leased in blocks): [`credits`].
//!
//! Files: `record` (the record and its status), `error`, `backend` (the trait),
//! [`memory`], [`sqlite`], [`legacy`] (0.2 import), `options`, `validate` (caller input),
//! `manager` (the service and lifecycle), `verify` (token verification), `worker` (batched
//! uses, change watch, the `fmg-keys` thread), [`throttle`], `negative` and `known` (what
//! verification remembers about ids).

mod backend;
pub mod credits;
mod error;
mod known;
pub mod legacy;
mod manager;
pub mod memory;
mod negative;
mod options;
mod record;
pub mod sqlite;
#[cfg(test)]
mod testing;
pub mod throttle;
mod validate;
mod verify;
mod worker;

pub use backend::KeyBackend;
pub use credits::{
    CreditChange, CreditLease, Credits, PeriodBounds, Refill, RefillPeriod, MAX_CREDITS,
};
pub use error::{KeyError, VerifyError};
pub use known::DEFAULT_KNOWN_IDS_CAPACITY;
pub use legacy::LegacyImport;
pub use manager::{CreditSpec, KeyManager, ManagerStats, Revocation};
pub use memory::MemoryBackend;
pub use negative::{DEFAULT_NEGATIVE_CAPACITY, DEFAULT_NEGATIVE_TTL};
pub use options::ManagerOptions;
pub use record::{Change, KeyRecord, KeyStatus, Touch};
pub use sqlite::SqliteBackend;
pub use throttle::{client_bucket, client_network, FailThrottle, ThrottleScope};
pub use validate::grace_from_secs;
pub use verify::CacheLookup;

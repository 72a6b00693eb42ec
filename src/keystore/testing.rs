//! Test-only helpers shared by the key store's unit tests: managers with a cheap hash
//! cost, on every backend, and small builders.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::hashing::{CachedKey, HashParams};
use crate::tokens;

use super::{FailThrottle, KeyBackend, KeyManager, ManagerOptions, MemoryBackend, VerifyError};

pub(super) fn opts() -> ManagerOptions {
    ManagerOptions {
        hash_params: HashParams::insecure_fast(),
        // Long: tests flush explicitly, so batching is observable.
        touch_interval: Duration::from_secs(3600),
        ..ManagerOptions::default()
    }
}

/// One manager per backend; the `TempDir` keeps the `SQLite` file alive.
pub(super) fn managers() -> Vec<(&'static str, KeyManager, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = KeyManager::sqlite(dir.path().join("keys.db"), opts()).unwrap();
    vec![
        ("memory", KeyManager::memory(opts()).unwrap(), None),
        ("sqlite", sqlite, Some(dir)),
    ]
}

pub(super) fn scopes(s: &[&str]) -> Vec<String> {
    s.iter().map(|&x| x.to_owned()).collect()
}

pub(super) fn meta(k: &str, v: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(k.to_owned(), Value::String(v.to_owned()));
    m
}

pub(super) fn hours(h: u64) -> Duration {
    Duration::from_secs(h * 3600)
}

/// A well-formed token for `key_id` with a wrong secret.
pub(super) fn wrong_secret(key_id: &str) -> String {
    let kid = &key_id[tokens::KEY_ID_PREFIX.len()..];
    tokens::from_parts(kid, &"x".repeat(tokens::SECRET_LEN)).unwrap()
}

pub(super) fn assert_secrets_absent(bytes: &[u8], issued: &[(String, String)]) {
    for (_, token) in issued {
        let secret = tokens::parse(token).unwrap().secret.as_bytes();
        for needle in [token.as_bytes(), secret, &secret[..16]] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
    }
}

// -- failure budgets, proofs, the negative cache ----------------------------------------

/// A manager with the given budgets (and the test hash cost).
pub(super) fn budgeted(max_failures: u32, key_budget: u32, global_budget: u32) -> KeyManager {
    KeyManager::memory(ManagerOptions {
        fail_throttle: FailThrottle {
            max_failures,
            window: Duration::from_secs(60),
            key_budget,
            global_budget,
            unknown_budget: 0,
        },
        ..opts()
    })
    .unwrap()
}

/// A well-formed token for `key_id` with a wrong secret of its own (distinct digests).
pub(super) fn wrong_secret_n(key_id: &str, n: usize) -> String {
    let kid = &key_id[tokens::KEY_ID_PREFIX.len()..];
    let secret = format!("{n:0>width$}", width = tokens::SECRET_LEN);
    tokens::from_parts(kid, &secret).unwrap()
}

pub(super) fn reason(r: &Result<Arc<CachedKey>, VerifyError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(VerifyError::BadSecret { .. }) => "bad_secret",
        Err(VerifyError::Throttled { .. }) => "throttled",
        Err(VerifyError::Busy { .. }) => "busy",
        Err(_) => "other",
    }
}

// -- keys imported from fastmcp-guard 0.2 ------------------------------------------

pub(super) use super::legacy::testing::{iso, write_file, Key02};

/// A manager over a 0.2 file holding `keys` (imported on open).
pub(super) fn manager_02(keys: &[&Key02]) -> (KeyManager, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    write_file(&path, keys);
    (KeyManager::sqlite(&path, opts()).unwrap(), dir)
}

/// The same keys in a memory backend (the verification path is backend-agnostic).
pub(super) fn memory_02(keys: &[&Key02]) -> KeyManager {
    let backend = Arc::new(MemoryBackend::new());
    for k in keys {
        backend.insert(&k.to_row_record()).unwrap();
    }
    KeyManager::with_backend(backend, opts()).unwrap()
}

pub(super) fn both_02(
    keys: &[&Key02],
) -> Vec<(&'static str, KeyManager, Option<tempfile::TempDir>)> {
    let (sqlite, dir) = manager_02(keys);
    vec![
        ("memory", memory_02(keys), None),
        ("sqlite", sqlite, Some(dir)),
    ]
}

/// Every byte the store wrote: the database and its WAL.
pub(super) fn store_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        all.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    all
}

pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

//! Pure-Rust timings of the guard's core (no Python): `cargo bench --bench core`.
//!
//! Plain `fn main` (no criterion): each micro-benchmark runs `ROUNDS` rounds of
//! `n` calls and reports the median ns per call (loop overhead included; it is
//! a fraction of a nanosecond here). The audit writer is measured end to end:
//! one producer thread builds and enqueues `n` events into
//! `AuditWriter::open_jsonl_with`, then `close()` drains, writes and syncs; the
//! rate is `n / (first enqueue .. close returned)`, and the file's line count is
//! checked against `n`. It runs with the hash chain off (the line as before the
//! chain), on (the default: `id` + BLAKE3 `chain` on every line), and on with a
//! key; the chained file is verified after the run.
//!
//! The start of a `KeyManager` over a `SQLite` store of 100,000 keys is timed too: it
//! reads every key id into memory (the set of known ids that the unknown-id budget
//! consults), against the same store with one key. The keys are copies of one real key
//! (one argon2id hash), each with its own id, inserted in one transaction.
//!
//! Flags (after `--`): `--quick` (smaller n), `--json PATH` (write the numbers
//! as JSON for `benches/bench_guard.py`), `--queue N` (audit queue capacity,
//! default the writer's own). Cargo passes `--bench`; it is ignored.

use std::fs::File;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::process::Command;
use std::time::Instant;

use _core::audit::chain::{LineChain, GENESIS};
use _core::audit::{
    log_files, verify_files, AuditEvent, AuditWriter, ChainKey, JsonlOptions, Status, WriterOptions,
};
use _core::hashing::Now;
use _core::ipmatch::IpMatcher;
use _core::keystore::{CacheLookup, KeyBackend, KeyManager, ManagerOptions, SqliteBackend};
use _core::limiter::{parse_rate, Limiter};
use _core::tokens;
use serde_json::{json, Map, Value};

const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median ns per call of `f` over `ROUNDS` rounds of `n` calls (after one warm-up round).
fn ns_per_op(n: u64, mut f: impl FnMut()) -> f64 {
    for _ in 0..n.min(100_000) {
        f();
    }
    let rounds = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            #[allow(clippy::cast_precision_loss)]
            let per = t.elapsed().as_nanos() as f64 / n as f64;
            per
        })
        .collect();
    median(rounds)
}

fn typical_event() -> AuditEvent {
    let mut ev = AuditEvent::new("fmg_key_3kQxY7bT0pLm9ZaW", "alice", "get_data", Status::Ok);
    ev.scopes = vec!["read:data".to_owned(), "write:data".to_owned()];
    ev.duration_ms = 0.412;
    ev.input_args = Some(json!({"query": "x"}).into());
    ev.output_preview = Some("Results for: x".to_owned());
    ev.client_ip = Some("10.0.0.7".to_owned());
    let mut meta = Map::new();
    meta.insert("team".to_owned(), Value::from("data"));
    ev.metadata = Some(Value::Object(meta).into());
    ev
}

struct AuditRun {
    events: u64,
    secs: f64,
    enqueue_secs: f64,
    full_retries: u64,
    bytes: u64,
    lines: u64,
}

/// One producer thread -> `AuditWriter::open_jsonl` -> close. A full queue is
/// retried (the writer's own policy would drop; here we want its sustained rate).
fn audit_run(
    n: u64,
    dir: &std::path::Path,
    tag: usize,
    opts: WriterOptions,
    jsonl: &JsonlOptions,
) -> AuditRun {
    let path = dir.join(format!("audit-{tag}.jsonl"));
    let writer = AuditWriter::open_jsonl_with(&path, opts, jsonl.clone()).expect("open audit log");
    let template = typical_event();
    let mut full_retries = 0u64;
    let start = Instant::now();
    for _ in 0..n {
        loop {
            // Built per event, as the Python binding does (fresh ts, owned strings).
            let mut ev = template.clone();
            ev.ts = chrono::Utc::now();
            if writer.enqueue(ev) {
                break;
            }
            full_retries += 1;
            std::thread::yield_now();
        }
    }
    let enqueue_secs = start.elapsed().as_secs_f64();
    writer.close().expect("close audit log");
    let secs = start.elapsed().as_secs_f64();
    let stats = writer.stats();
    assert_eq!(stats.written, n, "written events: {stats:?}");
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let lines = BufReader::new(File::open(&path).expect("reopen audit log"))
        .lines()
        .count() as u64;
    if jsonl.chain {
        let report = verify_files(&log_files(&path).expect("list"), jsonl.chain_key.as_ref())
            .expect("verify");
        assert!(report.is_ok() && report.events == n, "chain: {report:?}");
    }
    std::fs::remove_file(&path).ok();
    AuditRun {
        events: n,
        secs,
        enqueue_secs,
        full_retries,
        bytes,
        lines,
    }
}

/// Median start time of a `KeyManager` over a `SQLite` store of one key and of 100,000
/// keys, the time to read the 100,000 ids alone (ms), and how many ids it knew.
fn key_store_start() -> (f64, f64, f64, usize) {
    const KEYS: usize = 100_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = || ManagerOptions {
        background_thread: false,
        ..ManagerOptions::default()
    };
    let time_start = |path: &std::path::Path| {
        let mut known = 0;
        let ms = median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    let m = KeyManager::sqlite(path, opts()).expect("open key store");
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    known = m.stats().known_ids;
                    m.close().expect("close");
                    ms
                })
                .collect(),
        );
        (ms, known)
    };
    let one = dir.path().join("one.db");
    let many = dir.path().join("many.db");
    for path in [&one, &many] {
        let m = KeyManager::sqlite(path, opts()).expect("create key store");
        m.create("template", &[], None, Map::new())
            .expect("create key");
        m.close().expect("close");
    }
    {
        let mut conn = rusqlite::Connection::open(&many).expect("open");
        let tx = conn.transaction().expect("transaction");
        {
            let mut copy = tx
                .prepare(
                    "INSERT INTO fmg_keys (id, name, phc_hash, scopes, metadata, status, \
                     created_at, revision) SELECT ?1, name, phc_hash, scopes, metadata, status, \
                     created_at, revision FROM fmg_keys WHERE name = 'template' LIMIT 1",
                )
                .expect("prepare");
            for _ in 1..KEYS {
                let (_, id) = tokens::generate().expect("generate token");
                copy.execute([&id]).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    let (start_1, _) = time_start(&one);
    let (start_many, known) = time_start(&many);
    let backend = SqliteBackend::open(&many).expect("open");
    let ids_ms = median(
        (0..5)
            .map(|_| {
                let mut n = 0usize;
                let t = Instant::now();
                backend.for_each_label(&mut |_| n += 1).expect("read ids");
                assert_eq!(n, KEYS);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    (start_1, start_many, ids_ms, known)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn rustc_version() -> String {
    Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned()))
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".to_owned(), |s| s.trim().to_owned())
}

#[allow(clippy::too_many_lines, clippy::cast_precision_loss)]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let n: u64 = if quick { 200_000 } else { 2_000_000 };
    let n_audit: u64 = if quick { 500_000 } else { 2_000_000 };
    let audit_rounds = if quick { 3 } else { 5 };
    let mut opts = WriterOptions::default();
    if let Some(q) = args
        .iter()
        .position(|a| a == "--queue")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
    {
        opts.queue_capacity = q;
    }

    println!("fastmcp-guard core (pure Rust, release profile) -- benches/core.rs");
    println!(
        "machine: {} x{} | {} | crate {}",
        cpu_model(),
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        rustc_version(),
        env!("CARGO_PKG_VERSION"),
    );
    println!(
        "median of {ROUNDS} rounds x {n} calls (audit: {audit_rounds} runs x {n_audit} events)"
    );
    println!();

    // -- token parse ---------------------------------------------------------------------
    let (token, _kid) = tokens::generate().expect("generate token");
    let parse_ns = ns_per_op(n, || {
        black_box(tokens::parse(black_box(&token)).is_ok());
    });

    // -- limiter: per-key + global, limits so high it always admits ----------------------
    let high = parse_rate("1000000000/minute").expect("rate");
    let limiter = Limiter::new(Some(high), Some(high));
    let limiter_ns = ns_per_op(n, || {
        black_box(
            limiter
                .check(black_box("fmg_key_3kQxY7bT0pLm9ZaW"), None)
                .is_allowed(),
        );
    });
    assert!(limiter.check("fmg_key_3kQxY7bT0pLm9ZaW", None).is_allowed());

    // -- IP: 3 allow + 1 deny, string in (parse included, as from Python) ---------------
    let ip = IpMatcher::new(
        &["127.0.0.0/8", "10.0.0.0/8", "192.168.0.0/16"],
        &["10.99.0.0/16"],
        &[] as &[&str],
    )
    .expect("ip matcher");
    let ip_ns = ns_per_op(n, || {
        black_box(ip.is_allowed_str(black_box("10.1.2.3")));
    });
    assert!(ip.is_allowed_str("10.1.2.3") && !ip.is_allowed_str("10.99.0.1"));

    // -- cached verify: in-memory KeyManager, one full verify, then the cache ----------
    let km = KeyManager::memory(ManagerOptions::default()).expect("key manager");
    let (_rec, key_token) = km
        .create("bench", &["read:data".to_owned()], None, Map::new())
        .expect("create key");
    km.verify(&key_token, None).expect("first verify");
    assert!(matches!(
        km.verify_cached(&key_token, Now::system()),
        CacheLookup::Hit(_)
    ));
    let cached_ns = ns_per_op(n, || {
        black_box(matches!(
            km.verify_cached(black_box(&key_token), Now::system()),
            CacheLookup::Hit(_)
        ));
    });
    // Full verification of a token's first use (store read + argon2id on the hashing
    // pool): a few keys made up front, each verified once.
    let fresh: Vec<String> = (0..5)
        .map(|i| {
            km.create(&format!("fresh{i}"), &[], None, Map::new())
                .expect("create key")
                .1
        })
        .collect();
    let argon_ms = median(
        fresh
            .iter()
            .map(|token| {
                let t = Instant::now();
                km.verify(token, None).expect("verify");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    // The refresh of a proven token after its cache entry expired (cache cleared): the
    // record is read again, argon2id does not run.
    let refresh_us = median(
        (0..200)
            .map(|_| {
                km.clear_cache();
                let t = Instant::now();
                km.verify(&key_token, None).expect("verify");
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect(),
    );
    km.close().ok();

    // -- manager start over a SQLite store of 100,000 keys: the known ids are loaded ----
    let (start_1_ms, start_100k_ms, ids_100k_ms, known_100k) = key_store_start();

    // -- audit: the parts of one event's cost, single-threaded -------------------------
    let template = typical_event();
    let build_ns = ns_per_op(n, || {
        let mut ev = black_box(&template).clone();
        ev.ts = chrono::Utc::now();
        black_box(ev);
    });
    let mut sbuf = Vec::with_capacity(64 * 1024);
    let ser_ns = ns_per_op(n, || {
        if sbuf.len() > 60 * 1024 {
            sbuf.clear();
        }
        _core::audit::write_line(&mut sbuf, black_box(&template));
    });

    // -- audit: sealing one line into the chain (id + BLAKE3), writer side ----------------
    let mut sealer = LineChain::new(None, GENESIS, false);
    let mut line_bytes = Vec::new();
    _core::audit::write_line(&mut line_bytes, &typical_event());
    let mut sealed = Vec::with_capacity(64 * 1024);
    let seal_ns = ns_per_op(n, || {
        if sealed.len() > 60 * 1024 {
            sealed.clear();
        }
        black_box(sealer.seal(&mut sealed, black_box(&line_bytes)));
    });

    // -- audit writer: sustained events/s to JSONL, chain off / on / keyed ---------------
    let dir = tempfile::tempdir().expect("tempdir");
    let variants = [
        (
            "chain off",
            JsonlOptions {
                chain: false,
                ..JsonlOptions::default()
            },
        ),
        ("chain on", JsonlOptions::default()),
        (
            "chain on, keyed",
            JsonlOptions {
                chain_key: Some(ChainKey::new(b"bench chain key").expect("key")),
                ..JsonlOptions::default()
            },
        ),
    ];
    let mut sustained = Vec::new();
    for (v, (label, jsonl)) in variants.iter().enumerate() {
        let runs: Vec<AuditRun> = (0..audit_rounds)
            .map(|i| audit_run(n_audit, dir.path(), v * 100 + i, opts, jsonl))
            .collect();
        sustained.push((*label, runs));
    }
    let summary = |runs: &[AuditRun]| {
        let eps = median(runs.iter().map(|r| r.events as f64 / r.secs).collect());
        let enq = median(
            runs.iter()
                .map(|r| r.enqueue_secs * 1e9 / r.events as f64)
                .collect(),
        );
        let mid = runs
            .iter()
            .min_by(|a, b| {
                (a.events as f64 / a.secs - eps)
                    .abs()
                    .total_cmp(&(b.events as f64 / b.secs - eps).abs())
            })
            .expect("runs");
        (eps, enq, mid.bytes)
    };
    let (eps_off, enq_off, bytes_off) = summary(&sustained[0].1);
    let (eps, enq_ns, bytes_on) = summary(&sustained[1].1);
    let (eps_keyed, _, _) = summary(&sustained[2].1);
    let retries: u64 = sustained
        .iter()
        .flat_map(|(_, runs)| runs.iter().map(|r| r.full_retries))
        .sum();
    let lines_ok = sustained
        .iter()
        .all(|(_, runs)| runs.iter().all(|r| r.lines == r.events));
    let sealed_len = {
        let mut out = Vec::new();
        LineChain::new(None, GENESIS, false).seal(&mut out, &line_bytes);
        out.len()
    };

    let row = |name: &str, v: String, note: &str| println!("{name:<44} {v:>14}  {note}");
    println!("{:<44} {:>14}  notes", "operation", "median");
    println!("{}", "-".repeat(100));
    row(
        "token parse (prefix, charset, CRC32)",
        format!("{parse_ns:.1} ns"),
        "",
    );
    row(
        "limiter check (per-key + global GCRA)",
        format!("{limiter_ns:.1} ns"),
        "always admits",
    );
    row(
        "IP check (3 allow + 1 deny, from &str)",
        format!("{ip_ns:.1} ns"),
        "parse included",
    );
    row(
        "cached verify (KeyManager, memory store)",
        format!("{cached_ns:.1} ns"),
        "parse + keyed digest + cache + use record",
    );
    row(
        "full verify, first use (argon2id, hashing pool)",
        format!("{argon_ms:.2} ms"),
        "median of 5; OWASP params",
    );
    row(
        "refresh of a proven token (cache cleared)",
        format!("{refresh_us:.1} us"),
        "median of 200; record read, no argon2id",
    );
    row(
        "KeyManager start, SQLite store of 1 key",
        format!("{start_1_ms:.2} ms"),
        "median of 5; open, migrations checked, ids read",
    );
    row(
        "KeyManager start, SQLite store of 100,000 keys",
        format!("{start_100k_ms:.1} ms"),
        &format!("median of 5; {known_100k} known ids loaded"),
    );
    row(
        "  of which: reading the 100,000 ids",
        format!("{ids_100k_ms:.1} ms"),
        "median of 5; SqliteBackend::for_each_label alone",
    );
    row(
        "audit: build one event (clone + Utc::now)",
        format!("{build_ns:.1} ns"),
        "producer side, alone",
    );
    row(
        "audit: serialise one event (write_line)",
        format!("{ser_ns:.1} ns"),
        "writer side, alone",
    );
    row(
        "audit: seal one line (id + BLAKE3 chain)",
        format!("{seal_ns:.1} ns"),
        "writer side, alone",
    );
    row(
        "audit: enqueue (build event + try_send)",
        format!("{enq_ns:.1} ns"),
        &format!("producer side, while the writer runs (chain off: {enq_off:.1} ns)"),
    );
    for ((label, _), (rate, bytes, line)) in sustained.iter().zip([
        (eps_off, bytes_off, line_bytes.len()),
        (eps, bytes_on, sealed_len),
        (eps_keyed, bytes_on, sealed_len),
    ]) {
        row(
            &format!("audit: sustained to JSONL, {label}"),
            format!("{rate:.0} ev/s"),
            &format!(
                "{n_audit} events/run; file {:.1} MB ({line} B/line); lines == events: {}",
                bytes as f64 / 1e6,
                if lines_ok { "yes" } else { "NO" }
            ),
        );
    }
    println!();
    for (label, runs) in &sustained {
        println!(
            "audit runs, {label} (ev/s): {}",
            runs.iter()
                .map(|r| format!("{:.0}", r.events as f64 / r.secs))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("queue-full retries: {retries}");
    println!(
        "target: audit with the chain on >= 500,000 ev/s -> {}",
        if eps >= 5e5 { "met" } else { "NOT met" }
    );

    if let Some(p) = json_path {
        let out = json!({
            "machine": {"cpu": cpu_model(), "rustc": rustc_version()},
            "n": n,
            "token_parse_ns": parse_ns,
            "limiter_check_ns": limiter_ns,
            "ip_check_ns": ip_ns,
            "cached_verify_ns": cached_ns,
            "full_verify_ms": argon_ms,
            "proven_refresh_us": refresh_us,
            "manager_start_1_key_ms": start_1_ms,
            "manager_start_100k_keys_ms": start_100k_ms,
            "read_100k_key_ids_ms": ids_100k_ms,
            "audit_enqueue_ns": enq_ns,
            "audit_build_event_ns": build_ns,
            "audit_write_line_ns": ser_ns,
            "audit_events_per_s": eps,
            "audit_events_per_s_chain_off": eps_off,
            "audit_events_per_s_chain_keyed": eps_keyed,
            "audit_seal_ns": seal_ns,
            "audit_runs_events_per_s": sustained[1].1.iter().map(|r| r.events as f64 / r.secs).collect::<Vec<_>>(),
            "audit_events_per_run": n_audit,
            "audit_file_bytes": bytes_on,
            "audit_line_bytes": sealed_len,
            "audit_lines_ok": lines_ok,
            "audit_full_retries": retries,
        });
        let mut f = File::create(&p).expect("json output");
        writeln!(f, "{out}").expect("write json");
    }
}

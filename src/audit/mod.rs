//! Audit log: one event type for every decision ([`AuditEvent`], filled once by its
//! producer), written by a background thread ([`AuditWriter`]) to its list of [`Sink`]s:
//! JSON Lines ([`JsonlFileSink`], which renders each event as one line with
//! [`write_line`]), rows of an `SQLite` table ([`SqliteSink`], which binds the event's
//! fields to columns; queried with [`query`]), the HTTP spool ([`spool`]).
//!
//! * `event`: [`AuditEvent`], [`RawJson`], [`Status`] and the line serialiser.
//! * `writer`: [`AuditWriter`], its queue and thread, batching, flush and close (the
//!   policies callers depend on are documented there).
//! * `sink`: the [`Sink`] trait and the [`Batch`] a sink receives; [`sinks`]: the
//!   writer's list of sinks and each one's counters ([`SinkStats`]).
//! * `error`: [`AuditError`]; `policy`: what is recorded of an event ([`EventPolicy`]).
//! * Sinks and their helpers: [`chain`], `jsonl`, `sqlite`, [`spool`]; [`mask`] and
//!   [`redact`] for what a line may hold; [`refusals`] for refusal summaries. [`scan`]
//!   serves the CLI only: reading log files (query, export, verify).

pub mod chain;
mod error;
mod event;
mod jsonl;
pub mod mask;
mod policy;
pub mod redact;
pub mod refusals;
pub mod scan;
mod sink;
pub mod sinks;
pub mod spool;
mod sqlite;
#[cfg(test)]
mod testing;
mod writer;

pub use chain::{verify_files, ChainKey, VerifyReport};
pub use error::AuditError;
pub use event::{
    format_ts, is_fixed_field, is_reserved_field, write_json_str, write_line, AuditEvent, RawJson,
    Status, FIXED_FIELDS, SEAL_FIELDS,
};
pub use jsonl::{log_files, rotated_files, JsonlFileSink, JsonlOptions};
pub use mask::{mask_str, mask_tokens};
pub use policy::EventPolicy;
pub use redact::Redactor;
pub use refusals::{cut_field, Refusal, RefusalAggregator, RefusalCounts, RefusalOptions};
pub use sink::{Batch, BatchFormat, Sink};
pub use sinks::{SinkCounts, SinkLoss, SinkStats};
pub use sqlite::{query, AuditQuery, AuditRecord, SqliteSink, SQLITE_SCHEMA_VERSION};
pub use writer::{Admitted, AuditWriter, LossReport, OnFull, Wait, WriterOptions, WriterStats};

use event::write_ts;
pub(crate) use writer::LossClock;

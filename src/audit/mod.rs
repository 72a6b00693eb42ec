//! Audit log: one event type for every decision ([`AuditEvent`], rendered as one JSON line
//! by [`write_line`]), written by a background thread ([`AuditWriter`]) to a [`Sink`]: JSON
//! Lines ([`JsonlFileSink`]), rows of an `SQLite` table ([`SqliteSink`], queried with
//! [`query`]), or several at once ([`FanSink`]).
//!
//! * `event`: [`AuditEvent`], [`Status`] and the line serialiser.
//! * `writer`: [`AuditWriter`], its queue and thread, batching, flush and close (the
//!   policies callers depend on are documented there).
//! * `sink`: the [`Sink`] trait and the [`Batch`] a sink receives.
//! * `error`: [`AuditError`].
//! * Sinks and their helpers: [`chain`], [`fan`], `jsonl`, `sqlite`, [`spool`]; [`mask`]
//!   and [`redact`] for what a line may hold; [`refusals`] for refusal summaries; [`scan`]
//!   for the CLI's reading of log files.

pub mod chain;
mod error;
mod event;
pub mod fan;
mod jsonl;
pub mod mask;
pub mod redact;
pub mod refusals;
pub mod scan;
mod sink;
pub mod spool;
mod sqlite;
#[cfg(test)]
mod testing;
mod writer;

pub use chain::{verify_files, ChainKey, VerifyReport};
pub use error::AuditError;
pub use event::{
    format_ts, is_fixed_field, is_reserved_field, write_json_str, write_line, write_line_parts,
    AuditEvent, LineHead, Status, FIXED_FIELDS, SEAL_FIELDS,
};
pub use fan::{FanSink, SlotCounts, SlotLoss, SlotStats};
pub use jsonl::{log_files, rotated_files, JsonlFileSink, JsonlOptions};
pub use mask::{mask_str, mask_tokens};
pub use redact::Redactor;
pub use refusals::{cut_field, Refusal, RefusalAggregator, RefusalCounts, RefusalOptions};
pub use sink::{Batch, BatchFormat, Entry, Record, Sink};
pub use sqlite::{query, AuditQuery, AuditRecord, SqliteSink, SQLITE_SCHEMA_VERSION};
pub use writer::{Admitted, AuditWriter, LossReport, OnFull, Wait, WriterOptions, WriterStats};

use event::{write_ts, write_value};
pub(crate) use writer::LossClock;

//! tasklog: event-sourced, log-centric job orchestration and tracking.
//!
//! Every fact about a task is an event appended to Kafka; projections fold those events
//! into Postgres, exactly once. The modules follow the architecture:
//!
//! - [`events`]: the domain, the `tasklog-core` crate (`crates/tasklog-core`): the CloudEvents
//!   envelope, event types, JSON Schemas, specs and the pure folds. No I/O, by construction.
//! - [`kafka`]: producers, topics, partitioning and the in-memory mock broker.
//! - [`store`]: Postgres: migrations, the projection's tables and the read side.
//! - [`audit`]: one task's history read from the log itself, with the fold's verdicts.
//! - [`consistency`]: read-your-writes: waiting until the projections have what the log has.
//! - [`projector`]: consumes the events topic and applies it to Postgres exactly once.
//! - [`replay`]: folds the log in memory and compares it with the projection (auditors).
//! - [`api`]: the HTTP API.
//! - [`metrics`]: Prometheus metrics.
//! - [`cli`]: the `tasklog` command line.

pub mod api;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod consistency;
pub use tasklog_core as events;
pub mod kafka;
pub mod logs;
pub mod metrics;
pub mod otlp;
pub mod projector;
pub mod replay;
pub mod scheduler;
pub mod store;
pub mod worker;

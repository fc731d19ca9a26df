//! `tasklog audit ...`: tamper-evident exports of the log, and their verification.

use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::json;

use super::KafkaArgs;
use super::servers::topics_for;
use crate::events::audit;
use crate::replay::export::{self, Selection};

/// `tasklog audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// A task's complete history read from Kafka (not from Postgres): every record with
    /// its coordinates, ce_id, source, type, time and data, the fold's verdict on each,
    /// its dead letters, its attempts and the extent of its logs. Works with Postgres
    /// down (the projection's index only says where to start reading).
    Task(TaskArgs),
    /// Write a tamper-evident export of the events topic (JSON Lines, hash-chained,
    /// ending with a manifest; schemas/audit-export.v1.json).
    Export(ExportArgs),
    /// Check an export: its hash chain and manifest offline, and with --against-kafka
    /// every record against the log. Exit 1 on any problem, each named by line.
    Verify(VerifyFileArgs),
}

/// `tasklog audit task`.
#[derive(Debug, Args)]
pub struct TaskArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Postgres URL (optional: only used to find where to start reading).
    #[arg(long, env = "TASKLOG_DATABASE_URL", default_value = crate::store::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// The task.
    id: uuid::Uuid,
    /// Scan the task's whole partition instead of asking the projection where it starts.
    #[arg(long)]
    scan: bool,
    /// Print the history as JSON.
    #[arg(long)]
    json: bool,
}

/// `tasklog audit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Only this task's records.
    #[arg(long, conflicts_with_all = ["since", "until"])]
    task: Option<uuid::Uuid>,
    /// Only records from this time on (RFC 3339, e.g. 2026-12-03T14:00:00Z).
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// Only records before this time (RFC 3339).
    #[arg(long)]
    until: Option<DateTime<Utc>>,
    /// The file to write.
    #[arg(long)]
    out: PathBuf,
}

/// `tasklog audit verify`.
#[derive(Debug, Args)]
pub struct VerifyFileArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The export to check.
    file: PathBuf,
    /// Also check every record against the log.
    #[arg(long)]
    against_kafka: bool,
    /// Print the findings as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs a `tasklog audit` command.
pub async fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Task(args) => task(args).await,
        AuditCommand::Export(args) => export_file(args).await,
        AuditCommand::Verify(args) => verify_file(args).await,
    }
}

async fn export_file(args: ExportArgs) -> anyhow::Result<()> {
    let topics = topics_for(&args.kafka.topic_prefix)?;
    let selection = match (args.task, args.since, args.until) {
        (Some(id), _, _) => Selection::Task(id),
        (None, None, None) => Selection::All,
        (None, since, until) => Selection::Between(since, until),
    };
    // Written beside the target, then renamed: a reader never sees half a file.
    let partial = args.out.with_extension("partial");
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let records = export::export(&args.kafka.brokers, &topics.events, selection, file).await?;
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("exported {records} records to {}", args.out.display());
    Ok(())
}

async fn verify_file(args: VerifyFileArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let checked = audit::check(&text);
    let mut findings = checked.findings;
    let records = checked.records.len();
    if args.against_kafka {
        findings.extend(export::against_log(&args.kafka.brokers, checked.records).await?);
        findings.sort_by_key(|f| f.line);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "valid": findings.is_empty(),
                "records": records,
                "checked_against_kafka": args.against_kafka,
                "findings": findings,
            }))?
        );
    } else {
        for f in &findings {
            match &f.at {
                Some(at) => println!("line {} ({at}): {}", f.line, f.problem),
                None => println!("line {}: {}", f.line, f.problem),
            }
        }
        if findings.is_empty() {
            println!(
                "{}: {records} records, chain and manifest intact{}",
                args.file.display(),
                if args.against_kafka {
                    ", every record as on the log"
                } else {
                    ""
                }
            );
        }
    }
    anyhow::ensure!(
        findings.is_empty(),
        "{}: {} problem(s)",
        args.file.display(),
        findings.len()
    );
    Ok(())
}

async fn task(args: TaskArgs) -> anyhow::Result<()> {
    let topics = topics_for(&args.kafka.topic_prefix)?;
    let store = crate::store::Store::connect(&args.database_url, 2).ok();
    let audit = crate::audit::task(
        &args.kafka.brokers,
        &topics,
        store.as_ref(),
        args.id,
        args.scan,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&audit)?);
        return Ok(());
    }
    println!(
        "task {} — {} records on {} partition {} (found by {}; partition end {})",
        audit.task_id,
        audit.records.len(),
        topics.events,
        audit.partition,
        audit.found_by,
        audit.high_watermark
    );
    for r in &audit.records {
        let verdict = match (&r.reason, &r.state) {
            (Some(reason), _) => {
                format!("REJECTED {reason}: {}", r.message.as_deref().unwrap_or(""))
            }
            (None, Some(state)) => format!("applied -> {state}"),
            (None, None) => "applied".to_string(),
        };
        println!(
            "  {}:{:<8} {:<36} {:<40} {} {}  {verdict}",
            r.partition,
            r.offset,
            r.ce_id.as_deref().unwrap_or("-"),
            r.r#type.as_deref().unwrap_or("-"),
            r.time.as_deref().unwrap_or("-"),
            r.source.as_deref().unwrap_or("-"),
        );
    }
    for d in &audit.dead_letters {
        println!(
            "  dead letter {}:{} of offset {}: {} {}",
            d.dlq_partition,
            d.dlq_offset,
            d.source_offset.map_or("?".to_string(), |o| o.to_string()),
            d.reason.as_deref().unwrap_or("-"),
            d.message.as_deref().unwrap_or("")
        );
    }
    match &audit.state {
        Some(state) => {
            println!(
                "  folds to: {} (seq {}), {} attempt(s)",
                state.state.as_str(),
                state.seq,
                state.attempts.len()
            );
            for a in &state.attempts {
                println!("    attempt {}", serde_json::to_string(a)?);
            }
        }
        None => println!("  folds to nothing: no record of it was applied"),
    }
    match &audit.logs {
        Some(logs) if logs.is_empty() => println!("  logs: none"),
        Some(logs) => {
            for l in logs {
                println!(
                    "  logs of attempt {}: {} lines, {} bytes, partition {} offsets {}..={}",
                    l.attempt, l.lines, l.bytes, l.partition, l.first_offset, l.last_offset
                );
            }
        }
        None => println!("  logs: extent unknown (the log index could not be read)"),
    }
    Ok(())
}

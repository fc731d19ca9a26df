//! `tasklog replay ...`: the auditor's commands that read the log itself.

use std::io::IsTerminal;

use clap::{Args, Subcommand};
use serde_json::json;

use super::servers::{open_store, topics_for};
use super::{DbArgs, KafkaArgs};
use crate::replay;

/// `tasklog replay` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReplayCommand {
    /// Fold the events, workers and services topics from offset 0 in memory and compare
    /// the result with the Postgres projection; print every difference, exit 1 on any.
    Verify(VerifyArgs),
}

/// `tasklog replay verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    db: DbArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs a `tasklog replay` command.
pub async fn run(command: ReplayCommand) -> anyhow::Result<()> {
    match command {
        ReplayCommand::Verify(args) => verify(args).await,
    }
}

async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let store = open_store(&args.db).await?;
    let topics = topics_for(&args.kafka.topic_prefix)?;
    // A bar with rate and ETA on a terminal; nothing when stderr is piped.
    let bar = indicatif::ProgressBar::new(0);
    if std::io::stderr().is_terminal() && !args.json {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} records  {per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let shown = bar.clone();
    let report = replay::verify_store(&args.kafka.brokers, &topics, &store, move |n, total| {
        shown.set_length(total);
        shown.set_position(n);
    })
    .await?;
    bar.finish_and_clear();
    let rate = report.records as f64 / report.elapsed.as_secs_f64().max(1e-9);
    if args.json {
        let differences: Vec<serde_json::Value> = report
            .differences
            .iter()
            .map(|d| {
                let mut v = serde_json::to_value(d).unwrap_or_else(|_| json!({}));
                v["message"] = json!(d.to_string());
                v
            })
            .collect();
        let out = json!({
            "consistent": report.differences.is_empty(),
            "records": report.records,
            "elapsed_ms": report.elapsed.as_millis() as u64,
            "records_per_second": rate.round(),
            "differences": differences,
            "behind": report.behind.iter().map(|(t, p, n)| json!({"topic": t, "partition": p, "records": n})).collect::<Vec<_>>(),
            "storage_rejected": report.storage_rejected.iter().map(|(t, p, o)| json!({"topic": t, "partition": p, "offset": o})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "folded {} records from offset 0 in {:.2} s ({:.0} records/s)",
            report.records,
            report.elapsed.as_secs_f64(),
            rate
        );
        for (topic, partition, n) in &report.behind {
            println!(
                "note: the projection of {topic} partition {partition} is {n} record(s) behind the log (compared at its own offsets)"
            );
        }
        for (topic, partition, offset) in &report.storage_rejected {
            println!(
                "note: {topic} {partition}:{offset} was refused by Postgres (storage_rejected), taken as given"
            );
        }
        for d in &report.differences {
            println!("{d}");
        }
        if report.differences.is_empty() {
            println!("no differences: the projection is what the log folds to");
        }
    }
    anyhow::ensure!(
        report.differences.is_empty(),
        "the projection differs from the log in {} place(s)",
        report.differences.len()
    );
    Ok(())
}

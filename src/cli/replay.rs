//! `tasklog replay ...`: the auditor's commands that read the log itself.

use std::io::IsTerminal;

use clap::{Args, Subcommand};
use serde_json::json;

use super::servers::{open_store, redact, topics_for};
use super::{DbArgs, KafkaArgs};
use crate::replay;

/// `tasklog replay` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReplayCommand {
    /// Fold the events, workers and services topics from offset 0 in memory and compare
    /// the result with the Postgres projection; print every difference, exit 1 on any.
    Verify(VerifyArgs),
    /// Build the projection from offset 0 into another database (blue/green), without
    /// touching the live one; exactly once like the projector, and resumable: run it
    /// again after an interruption and it goes on from where it stopped. Ends when it
    /// has reached the end the log had when it started.
    Rebuild(RebuildArgs),
    /// One task's or every task's state as it was at a moment: what the log held at
    /// --at TIME (records' log timestamps), or up to --at-offsets P:O,... (each
    /// partition's next offset; partitions not named count as empty).
    State(StateArgs),
}

/// `tasklog replay state`.
#[derive(Debug, Args)]
pub struct StateArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The moment, RFC 3339 (e.g. 2026-12-03T14:03:00Z).
    #[arg(
        long,
        conflicts_with = "at_offsets",
        required_unless_present = "at_offsets"
    )]
    at: Option<chrono::DateTime<chrono::Utc>>,
    /// The moment as offsets: PARTITION:NEXT_OFFSET,...
    #[arg(long)]
    at_offsets: Option<String>,
    /// Only this task.
    id: Option<uuid::Uuid>,
    /// Print the states as JSON.
    #[arg(long)]
    json: bool,
}

/// `tasklog replay rebuild`.
#[derive(Debug, Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The database to build into (created when missing).
    #[arg(long = "database-url")]
    target: String,
    /// The live projection's database, which the rebuild refuses to build into.
    #[arg(long = "live-database-url", env = "TASKLOG_DATABASE_URL", default_value = crate::store::DEFAULT_DATABASE_URL)]
    live: String,
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
        ReplayCommand::Rebuild(args) => rebuild(args).await,
        ReplayCommand::State(args) => state(args).await,
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
            "rejected": report.rejected,
            "elapsed_ms": report.elapsed.as_millis() as u64,
            "records_per_second": rate.round(),
            "differences": differences,
            "behind": report.behind.iter().map(|(t, p, n)| json!({"topic": t, "partition": p, "records": n})).collect::<Vec<_>>(),
            "storage_rejected": report.storage_rejected.iter().map(|(t, p, o)| json!({"topic": t, "partition": p, "offset": o})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "folded {} records from offset 0 in {:.2} s ({:.0} records/s; {} refused by the fold)",
            report.records,
            report.elapsed.as_secs_f64(),
            rate,
            report.rejected
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

async fn rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    use crate::consistency::{Projections, Targets};
    use crate::store::{
        LOG_INDEX_CHANNEL, PROJECTION_CHANNEL, SERVICES_CHANNEL, TOKENS_CHANNEL, WORKERS_CHANNEL,
    };

    anyhow::ensure!(
        args.target.trim() != args.live.trim(),
        "--database-url is the live projection's database ({}): a rebuild goes into another one",
        redact(&args.target)
    );
    let store = open_store(&DbArgs {
        database_url: args.target.clone(),
        database_pool: 8,
    })
    .await?;
    let topics = topics_for(&args.kafka.topic_prefix)?;
    // Where the log ends now: the rebuild is done when it has applied all of it.
    let mut targets = Targets::new();
    let mut total = 0i64;
    for topic in [
        &topics.events,
        &topics.workers,
        &topics.services,
        &topics.auth,
        &topics.logs,
    ] {
        for (partition, (low, high)) in crate::kafka::watermarks(&args.kafka.brokers, topic)
            .await?
            .into_iter()
            .enumerate()
        {
            targets.reach(topic, partition as i32, high);
            total += high - low;
        }
    }
    let projections = Projections::follow(
        store.clone(),
        &[
            PROJECTION_CHANNEL,
            WORKERS_CHANNEL,
            SERVICES_CHANNEL,
            TOKENS_CHANNEL,
            LOG_INDEX_CHANNEL,
        ],
    );
    // Token hashes are not on the log (auditors read it): they come from the live
    // database, so that the tokens keep working against the rebuilt one.
    match crate::store::Store::connect(&args.live, 2) {
        Ok(live) => match store.copy_credentials_from(&live).await {
            Ok(n) => eprintln!(
                "tasklog replay rebuild: {n} token credential(s) copied from the live database"
            ),
            Err(e) => eprintln!(
                "tasklog replay rebuild: WARNING: token credentials not copied from the live database ({e}); \
                 tokens will not authenticate against the rebuilt one until they are"
            ),
        },
        Err(e) => eprintln!(
            "tasklog replay rebuild: WARNING: live database unusable ({e}); token credentials not copied"
        ),
    }
    let mut options = crate::projector::ProjectorOptions::new(&args.kafka.brokers, topics);
    // A group of its own, so that the live projector keeps its partitions; named after
    // the target without revealing its URL (which may hold a password).
    options.group_id = format!(
        "tasklog-rebuild-{}",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, args.target.as_bytes())
    );
    eprintln!(
        "tasklog replay rebuild: into {}, {total} records to reach",
        redact(&args.target)
    );
    let started = std::time::Instant::now();
    let caught_up = async {
        loop {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
            match projections.wait(&targets, deadline).await {
                Ok(lag) if lag.caught_up() => return,
                Ok(lag) => eprintln!("  {} of {total} records to go", lag.0),
                Err(e) => eprintln!("  cannot read the rebuild's progress yet: {e}"),
            }
        }
    };
    crate::projector::run_all(options, store, caught_up).await?;
    println!(
        "rebuilt {total} records into {} in {:.1} s",
        redact(&args.target),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn state(args: StateArgs) -> anyhow::Result<()> {
    let topics = topics_for(&args.kafka.topic_prefix)?;
    let moment = match (&args.at, &args.at_offsets) {
        (Some(at), _) => replay::Moment::Time(*at),
        (None, Some(offsets)) => replay::Moment::parse_offsets(offsets)
            .map_err(|e| anyhow::anyhow!("--at-offsets: {e}"))?,
        (None, None) => anyhow::bail!("give --at TIME or --at-offsets P:O,..."),
    };
    let states = replay::state_at(&args.kafka.brokers, &topics.events, moment, args.id).await?;
    if let Some(id) = args.id {
        let Some(state) = states.first() else {
            anyhow::bail!("task {id} was not on the log at that moment");
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(state)?);
        } else {
            println!(
                "{} {} seq {} attempt {} updated {}",
                state.id,
                state.state.as_str(),
                state.seq,
                state.attempt,
                state.updated_at.to_rfc3339()
            );
        }
        return Ok(());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&states)?);
    } else {
        println!("{} task(s)", states.len());
        for s in &states {
            println!(
                "{} {:<10} seq {:<3} attempt {:<2} {}",
                s.id,
                s.state.as_str(),
                s.seq,
                s.attempt,
                s.spec.name.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

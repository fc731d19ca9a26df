//! `tasklog bench submit|logs|schedule`: throughput and latency, printed beside raw
//! baselines measured in the same run (the same records produced straight to Kafka with
//! the same producer settings; the same rows loaded straight into Postgres with binary
//! COPY, the projector's own write path without the log in front of it).
//!
//! They run against Apache Kafka (by default the local broker of `scripts/kafka start`;
//! `--dev-broker` for librdkafka's in-memory mock) with topics and a scratch database of
//! their own, both deleted at the end. Everything targets loopback and stops by itself.

pub mod follow;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::api::{self, ApiOptions, AppState};
use crate::consistency::Targets;
use crate::events::{Event, Payload, TaskSpec};
use crate::kafka::dev_broker::{DevBroker, DevBrokerOptions};
use crate::kafka::{self, Appender, AppenderOptions, Topics};
use crate::projector::{self, ProjectorOptions};
use crate::store::{self, Store};

/// Which broker a benchmark runs against.
#[derive(Debug, Clone, Args)]
pub struct BenchBrokerArgs {
    /// Kafka bootstrap servers (default: the local Apache Kafka of `scripts/kafka start`).
    /// The benchmark creates topics of its own there and deletes them at the end.
    #[arg(long = "kafka-brokers", env = "TASKLOG_KAFKA_BROKERS", default_value = kafka::DEFAULT_BROKERS)]
    pub brokers: String,
    /// Run against librdkafka's in-memory mock cluster instead (started in this process;
    /// it keeps only the last 5 MiB of each partition).
    #[arg(long)]
    pub dev_broker: bool,
}

/// Arguments of `tasklog bench submit`.
#[derive(Debug, Clone, Args)]
pub struct SubmitBenchArgs {
    /// Tasks submitted through the batch endpoint (and projected).
    #[arg(long, default_value_t = 100_000)]
    pub tasks: usize,
    /// Sequential single submissions for the latency figures.
    #[arg(long, default_value_t = 2_000)]
    pub single: usize,
    /// Concurrent batch requests in flight.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Partitions of the benchmark's topics.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    #[command(flatten)]
    pub broker: BenchBrokerArgs,
    /// Postgres server; a scratch database is created next to the one named here and
    /// dropped at the end.
    #[arg(long, env = "TASKLOG_DATABASE_URL", default_value = store::DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

/// A realistic spec: what the benchmark submits.
fn sample_spec(i: usize) -> Value {
    json!({
        "name": format!("bench-{i}"),
        "type": "train",
        "command": ["python3", "train.py", "--shard", i.to_string()],
        "resources": {"cpu": 2, "memory": "4GiB"},
        "priority": (i % 100) as i64,
        "labels": {"team": "bench", "shard": (i % 16).to_string()},
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `n` submitted events of [`sample_spec`]s, encoded as a producer publishes them.
fn sample_submissions(n: usize) -> Vec<crate::events::EncodedEvent> {
    (0..n)
        .map(|i| sample_submission(i, Uuid::now_v7()))
        .collect()
}

/// Task `id`'s submitted event, with spec [`sample_spec`]`(i)`.
fn sample_submission(i: usize, id: Uuid) -> crate::events::EncodedEvent {
    let spec: TaskSpec = serde_json::from_value(sample_spec(i)).unwrap_or_default();
    Event::new(
        "tasklog://bench",
        id,
        1,
        Payload::Submitted {
            spec: std::sync::Arc::new(spec),
        },
    )
    .encode()
}

/// About `n` events of whole task histories — submitted, assigned, started, succeeded —
/// as the scheduler and workers append them: what a log mostly holds.
fn sample_lifecycles(n: usize) -> Vec<crate::events::EncodedEvent> {
    let mut out = Vec::with_capacity(n.div_ceil(4) * 4);
    for i in 0..n.div_ceil(4) {
        let id = Uuid::now_v7();
        let worker_id = format!("bench-worker-{}", i % 8);
        out.push(sample_submission(i, id));
        for (seq, payload) in [
            Payload::Assigned {
                worker_id: worker_id.clone(),
                attempt: 1,
            },
            Payload::Started {
                attempt: 1,
                worker_id: Some(worker_id),
                pid: Some(1000 + (i % 30_000) as u32),
            },
            Payload::Succeeded {
                attempt: Some(1),
                exit_code: Some(0),
                duration_ms: Some(1_000 + (i % 5_000) as u64),
            },
        ]
        .into_iter()
        .enumerate()
        {
            out.push(Event::new("tasklog://bench", id, seq as u64 + 2, payload).encode());
        }
    }
    out.truncate(n);
    out
}

/// The API (and, once started, the projections) running in this process on loopback.
struct InProcess {
    state: Arc<AppState>,
    base: String,
    /// An admin token: the benchmark's requests are authenticated as every caller's.
    token: String,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl InProcess {
    async fn start_api(
        store: &Store,
        appender: &Appender,
        brokers: &str,
        topics: &Topics,
        partitions: i32,
    ) -> anyhow::Result<InProcess> {
        let state = AppState::new(
            store.clone(),
            appender.clone(),
            ApiOptions::new(brokers, topics.clone(), partitions),
            crate::logs::CursorKey::new(store.cursor_key().await?),
        )?;
        let listener = api::bind("127.0.0.1:0".parse()?).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, _) = tokio::sync::watch::channel(false);
        let mut this = InProcess {
            state,
            base,
            token: String::new(),
            stop,
            tasks: Vec::new(),
        };
        let (state, stopped) = (this.state.clone(), this.stopped());
        this.tasks.push(tokio::spawn(async move {
            let _ = api::serve(listener, state, stopped).await;
        }));
        // The tokens projection, so that an admin token can be issued the real way.
        let (store, stopped) = (this.state.store.clone(), this.stopped());
        let options = ProjectorOptions::new(brokers, topics.clone()).for_tokens();
        this.tasks.push(tokio::spawn(async move {
            let tokens = projector::tokens::TokenProjection::new();
            if let Err(e) = projector::run_projection(options, store, tokens, stopped).await {
                tracing::error!(error = %e, "tokens projection stopped");
            }
        }));
        let mut desk = this.state.tokens.clone();
        desk.wait = Duration::from_secs(60);
        let request = crate::api::tokens::TokenRequest {
            name: "bench".into(),
            role: crate::events::auth::Role::Admin,
            projects: None,
            expires_in: None,
        };
        this.token = desk
            .issue("bench", &request)
            .await
            .map_err(|e| {
                anyhow::anyhow!("issuing the benchmark's token: {}: {}", e.code, e.message)
            })?
            .token;
        Ok(this)
    }

    /// An HTTP client built by `builder` that sends the admin token.
    fn client(&self, builder: reqwest::ClientBuilder) -> anyhow::Result<reqwest::Client> {
        let headers = crate::worker::bearer_headers(Some(&self.token))?;
        Ok(builder.default_headers(headers).build()?)
    }

    /// Starts projections: every one (`all`), or only the task projection (what
    /// `bench submit` measures).
    fn start_projections(&mut self, brokers: &str, topics: &Topics, all: bool) {
        let (store, stopped) = (self.state.store.clone(), self.stopped());
        let options = ProjectorOptions::new(brokers, topics.clone());
        self.tasks.push(tokio::spawn(async move {
            let result = if all {
                projector::run_all(options, store, stopped).await
            } else {
                projector::run(options, store, stopped).await
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "projection stopped");
            }
        }));
    }

    /// Waits until the projection of `topic` has everything the topic holds now: the
    /// same wait the API's read-your-writes uses.
    async fn wait_projected(&self, brokers: &str, topic: &str) -> anyhow::Result<()> {
        let mut targets = Targets::new();
        for (partition, (_, high)) in kafka::watermarks(brokers, topic)
            .await?
            .into_iter()
            .enumerate()
        {
            targets.reach(topic, partition as i32, high);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        let lag = self.state.projections.wait(&targets, deadline).await?;
        anyhow::ensure!(
            lag.caught_up(),
            "projection did not finish in 10 minutes ({} records behind)",
            lag.0
        );
        Ok(())
    }

    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// What a benchmark runs against: a broker (embedded unless given) with fresh topics and
/// a scratch database, dropped at the end.
struct BenchEnv {
    brokers: String,
    topics: Topics,
    raw_topic: String,
    database_url: String,
    admin_url: String,
    db_name: String,
    _embedded: Option<DevBroker>,
}

/// Most lines of one task the in-memory mock holds (5 MiB per partition).
const DEV_BROKER_MAX_LINES: usize = 200_000;

impl BenchEnv {
    async fn start(
        name: &str,
        broker: &BenchBrokerArgs,
        partitions: i32,
        admin_url: &str,
    ) -> anyhow::Result<BenchEnv> {
        let run = Uuid::new_v4().simple().to_string()[..8].to_string();
        let topics = Topics::with_prefix(&format!("{name}_{run}"));
        let raw_topic = format!("{name}_{run}.raw");
        let mut embedded = None;
        let brokers = match broker.dev_broker {
            false => {
                let b = &broker.brokers;
                let mut all = topics.all();
                all.push(kafka::TopicSpec::plain(&raw_topic, 3_600_000));
                kafka::ensure_topics(b, &all, partitions)
                    .await
                    .with_context(|| {
                        format!(
                            "no Kafka broker answers at {b}: start the local one with \
                             `scripts/kafka start`, pass --kafka-brokers, or --dev-broker for the mock"
                        )
                    })?;
                b.to_string()
            }
            true => {
                let broker = DevBroker::start(&DevBrokerOptions {
                    listen: "127.0.0.1:0".parse()?,
                    partitions,
                    topics: topics
                        .all()
                        .into_iter()
                        .map(|t| t.name)
                        .chain([raw_topic.clone()])
                        .collect(),
                })
                .await?;
                let addr = broker.addr().to_string();
                embedded = Some(broker);
                addr
            }
        };
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(admin_url);
        let db_name = format!("tasklog_bench_{run}");
        let database_url = format!("{base}/{db_name}");
        store::ensure_database(&database_url).await?;
        Ok(BenchEnv {
            brokers,
            topics,
            raw_topic,
            database_url,
            admin_url: admin_url.to_string(),
            db_name,
            _embedded: embedded,
        })
    }

    /// Drops the scratch databases and, on a real cluster, deletes the topics.
    async fn finish(self) {
        drop_database(&self.admin_url, &self.db_name).await;
        drop_database(&self.admin_url, &self.raw_db_name()).await;
        if self._embedded.is_none() {
            let mut names: Vec<String> = self.topics.all().into_iter().map(|t| t.name).collect();
            names.push(self.raw_topic.clone());
            if let Err(e) = kafka::delete_topics(&self.brokers, &names).await {
                eprintln!("could not delete the benchmark's topics: {e}");
            }
        }
    }

    /// The scratch database of the raw COPY baseline.
    fn raw_db_name(&self) -> String {
        format!("{}_raw", self.db_name)
    }

    /// A migrated scratch database beside the benchmark's, for the raw COPY baseline.
    async fn raw_store(&self) -> anyhow::Result<Store> {
        let url = self
            .database_url
            .rsplit_once('/')
            .map(|(base, _)| format!("{base}/{}", self.raw_db_name()))
            .context("database URL has no database name")?;
        store::ensure_database(&url).await?;
        let store = Store::connect(&url, 4)?;
        store.migrate().await?;
        Ok(store)
    }
}

/// Runs the submission benchmark and prints its figures.
pub async fn submit(args: SubmitBenchArgs) -> anyhow::Result<()> {
    let env = BenchEnv::start("bench", &args.broker, args.partitions, &args.database_url).await?;
    let result = run_all(&args, &env).await;
    env.finish().await;
    result
}

async fn drop_database(admin_url: &str, name: &str) {
    let Ok(mut target) = store::tls::parse(admin_url) else {
        return;
    };
    target.config.dbname("postgres");
    if let Ok((client, conn)) = target.connect().await {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
}

async fn run_all(args: &SubmitBenchArgs, env: &BenchEnv) -> anyhow::Result<()> {
    let (brokers, topics, raw_topic) = (env.brokers.as_str(), &env.topics, env.raw_topic.as_str());
    let store = Store::connect(&env.database_url, 16)?;
    store.migrate().await?;
    let n = args.tasks;
    println!(
        "tasklog bench submit: {n} tasks, {} partitions, broker {brokers}",
        args.partitions
    );

    // Baseline 1: the same records produced straight to Kafka, same producer settings.
    let appender = Appender::new(&AppenderOptions::new(brokers))?;
    let encoded = sample_submissions(n);
    let record_bytes = encoded.iter().map(|e| e.payload.len()).sum::<usize>() / n.max(1);
    let started = Instant::now();
    let results = appender.append_all(raw_topic, &encoded).await;
    let raw_produce = started.elapsed();
    anyhow::ensure!(results.iter().all(Result::is_ok), "raw produce failed");

    // Baseline 2: the same rows loaded straight into Postgres with binary COPY.
    let raw_copy = raw_copy(&env.raw_store().await?, &encoded).await?;
    drop(encoded);

    // The API, in process, on loopback; no projector yet.
    let mut system =
        InProcess::start_api(&store, &appender, brokers, topics, args.partitions).await?;
    let base = system.base.clone();
    let http = system.client(reqwest::Client::builder().pool_max_idle_per_host(64))?;

    // Batch submission.
    let batches: Vec<Vec<Value>> = (0..n)
        .map(sample_spec)
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(<[Value]>::to_vec)
        .collect();
    let started = Instant::now();
    let queue = Arc::new(tokio::sync::Mutex::new(batches.into_iter()));
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let queue = queue.clone();
        let http = http.clone();
        let url = format!("{base}/v1/tasks/batch");
        workers.push(tokio::spawn(async move {
            let mut accepted = 0usize;
            loop {
                let Some(batch) = queue.lock().await.next() else {
                    break;
                };
                let body: Value = http
                    .post(&url)
                    .json(&json!({"tasks": batch}))
                    .send()
                    .await?
                    .json()
                    .await?;
                accepted += body["accepted"].as_u64().unwrap_or(0) as usize;
            }
            anyhow::Ok(accepted)
        }));
    }
    let mut accepted = 0;
    for w in workers {
        accepted += w.await??;
    }
    let batch_elapsed = started.elapsed();
    anyhow::ensure!(accepted == n, "only {accepted} of {n} tasks were accepted");

    // Single submissions, one at a time.
    let mut latencies = Vec::with_capacity(args.single);
    let mut single_ids = Vec::with_capacity(args.single);
    for i in 0..args.single {
        let t = Instant::now();
        let r = http
            .post(format!("{base}/v1/tasks"))
            .json(&sample_spec(n + i))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().as_u16() == 202,
            "single submit answered {}",
            r.status()
        );
        latencies.push(t.elapsed());
        let body: Value = r.json().await?;
        if let Some(id) = body["id"].as_str() {
            single_ids.push(id.to_string());
        }
    }
    anyhow::ensure!(
        !single_ids.is_empty(),
        "no single submission returned an id"
    );
    latencies.sort();

    // Projection: a projector starting on the full backlog.
    let total = (n + args.single) as i64;
    let started = Instant::now();
    system.start_projections(brokers, topics, false);
    system.wait_projected(brokers, &topics.events).await?;
    let projection = started.elapsed();

    // Single reads of one task: read-your-writes (the default: the partition's end from
    // Kafka, then the projection) beside `consistency=eventual` (the projection alone,
    // what every GET did before), alternating so that both meet the same conditions.
    let mut reads = [
        Vec::with_capacity(args.single),
        Vec::with_capacity(args.single),
    ];
    for i in 0..args.single {
        let id = &single_ids[i % single_ids.len()];
        for (kind, query) in ["", "?consistency=eventual"].into_iter().enumerate() {
            let t = Instant::now();
            let r = http
                .get(format!("{base}/v1/tasks/{id}{query}"))
                .send()
                .await?;
            anyhow::ensure!(
                r.status().as_u16() == 200,
                "single GET{query} answered {}",
                r.status()
            );
            r.bytes().await?;
            reads[kind].push(t.elapsed());
        }
    }
    for latencies in &mut reads {
        latencies.sort();
    }
    system.stop().await;

    let rate = |count: usize, d: Duration| count as f64 / d.as_secs_f64().max(1e-9);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!("{:<44} {:>14}   aim / baseline", "measure", "result");
    println!(
        "{:<44} {:>10.0} /s   raw produce, same records and settings: {:.0} /s ({record_bytes} B each; ratio {:.2}; aim >= 0.4)",
        "batch submit (HTTP, 1000/batch)",
        rate(n, batch_elapsed),
        rate(n, raw_produce),
        rate(n, batch_elapsed) / rate(n, raw_produce)
    );
    println!(
        "{:<44} {:>11.2} ms   aim <= 10 ms",
        "single submit p50",
        ms(percentile(&latencies, 50.0))
    );
    println!(
        "{:<44} {:>11.2} ms   aim <= 10 ms (p99.9 {:.2} ms, max {:.2} ms)",
        "single submit p99",
        ms(percentile(&latencies, 99.0)),
        ms(percentile(&latencies, 99.9)),
        ms(latencies.last().copied().unwrap_or_default())
    );
    let p99 = |latencies: &[Duration]| ms(percentile(latencies, 99.0));
    let cost = p99(&reads[0]) - p99(&reads[1]);
    println!(
        "{:<44} {:>11.2} ms   p99 {:.2} ms: {cost:.2} ms over eventual's (aim <= 2 ms: {})",
        "single GET, read-your-writes p50",
        ms(percentile(&reads[0], 50.0)),
        p99(&reads[0]),
        if cost <= 2.0 { "met" } else { "not met" }
    );
    println!(
        "{:<44} {:>11.2} ms   p99 {:.2} ms (the projection alone, no wait)",
        "single GET, consistency=eventual p50",
        ms(percentile(&reads[1], 50.0)),
        p99(&reads[1]),
    );
    println!(
        "{:<44} {:>10.0} /s   raw binary COPY, same task and event rows: {:.0} /s (ratio {:.2}; aim >= 0.6)",
        "projection (backlog of all tasks)",
        rate(total as usize, projection),
        rate(n, raw_copy),
        rate(total as usize, projection) / rate(n, raw_copy)
    );
    println!(
        "{:<44} {:>10.0} MiB",
        "peak resident memory (whole run)",
        peak_rss_mib().unwrap_or(0.0)
    );
    println!();
    println!("aims: batch submit >= 20000 /s, single p99 <= 10 ms, projection >= 20000 events/s");
    Ok(())
}

/// The same task rows and their events, loaded into an empty copy of the schema with
/// the projector's own binary COPY write ([`projection::write_task_batch`]), 5000 per
/// transaction like the projector's batches: Postgres's fastest load of these rows,
/// without the log in front of it.
async fn raw_copy(
    store: &Store,
    encoded: &[crate::events::EncodedEvent],
) -> anyhow::Result<Duration> {
    use crate::events::RawRecord;
    use crate::store::projection::{self, AppliedEvent, TaskBatchWrite, TaskRow};
    let mut batches = Vec::new();
    for (index, chunk) in encoded.chunks(5000).enumerate() {
        let mut write = TaskBatchWrite::default();
        for (i, e) in chunk.iter().enumerate() {
            let record = RawRecord {
                key: Some(e.key.as_bytes()),
                headers: e
                    .headers
                    .iter()
                    .map(|(k, v)| (*k, Some(v.as_bytes())))
                    .collect(),
                payload: Some(&e.payload),
            };
            let event = Event::decode(&record)?;
            let state = crate::events::apply(None, &event)
                .map_err(|r| anyhow::anyhow!("benchmark event refused: {r:?}"))?;
            let offset = (index * 5000 + i) as i64;
            write
                .events
                .push(AppliedEvent::new(&event, 0, offset, e.payload.clone()));
            *write.state_deltas.entry(state.state.as_str()).or_default() += 1;
            write.tasks.push(TaskRow {
                state,
                partition: 0,
                last_offset: offset,
                is_new: true,
            });
        }
        batches.push(write);
    }
    let mut client = store.client().await?;
    let started = Instant::now();
    for write in &batches {
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await?;
        projection::write_task_batch(&tx, write).await?;
        tx.commit().await?;
    }
    Ok(started.elapsed())
}

/// Arguments of `tasklog bench logs`.
#[derive(Debug, Clone, Args)]
pub struct LogsBenchArgs {
    /// Lines in the task's log. With --dev-broker, at most 200,000: the mock keeps only
    /// 5 MiB of (compressed) batches per partition, about that many short lines.
    #[arg(long, default_value_t = 1_000_000)]
    pub lines: usize,
    /// Random 1000-line pages for the latency figures.
    #[arg(long, default_value_t = 300)]
    pub pages: usize,
    #[command(flatten)]
    pub broker: BenchBrokerArgs,
    /// Postgres server (a scratch database is created and dropped).
    #[arg(long, env = "TASKLOG_DATABASE_URL", default_value = store::DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

/// Runs the logs benchmark and prints its figures.
pub async fn logs(args: LogsBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.broker.dev_broker || args.lines <= DEV_BROKER_MAX_LINES,
        "the in-memory mock keeps only 5 MiB per partition: with --dev-broker, use --lines {DEV_BROKER_MAX_LINES} or fewer"
    );
    let env = BenchEnv::start("benchlogs", &args.broker, 12, &args.database_url).await?;
    let result = run_logs(
        &args,
        &env.brokers,
        &env.topics,
        &env.raw_topic,
        &env.database_url,
    )
    .await;
    env.finish().await;
    result
}

async fn run_logs(
    args: &LogsBenchArgs,
    brokers: &str,
    topics: &Topics,
    raw_topic: &str,
    url: &str,
) -> anyhow::Result<()> {
    use crate::logs::{Cursor, Direction, LogWriter, LogWriterOptions};
    let store = Store::connect(url, 16)?;
    store.migrate().await?;
    let n = args.lines;
    println!("tasklog bench logs: one task, {n} lines, broker {brokers}");
    let appender = Appender::new(&AppenderOptions::new(brokers))?;
    let line = |i: usize| {
        format!(
            "epoch 3 step {i:>9} loss 0.{:06} lr 3e-4",
            (i * 7919) % 1_000_000
        )
    };

    // Baseline: the same records (same headers, key and values) straight to Kafka.
    let raw_writer = LogWriter::new(appender.clone(), LogWriterOptions::new(raw_topic));
    let raw_task = Uuid::now_v7();
    let started = Instant::now();
    write_lines(&raw_writer, raw_task, n, &line).await?;
    let raw = started.elapsed();

    // The system: API + projections in process.
    let mut system = InProcess::start_api(&store, &appender, brokers, topics, 12).await?;
    system.start_projections(brokers, topics, true);
    let (state, base) = (system.state.clone(), system.base.clone());
    let http = system.client(reqwest::Client::builder())?;
    let task: Value = http
        .post(format!("{base}/v1/tasks"))
        .json(&json!({"shell": "python3 train.py"}))
        .send()
        .await?
        .json()
        .await?;
    let id = Uuid::parse_str(task["id"].as_str().unwrap_or_default())?;
    let _: Value = http
        .get(format!("{base}/v1/tasks/{id}?wait_ms=30000"))
        .send()
        .await?
        .json()
        .await?;

    // Ingest, end to end: written -> acknowledged -> indexed (readable with bounds).
    let writer = LogWriter::new(appender.clone(), LogWriterOptions::new(&topics.logs));
    let started = Instant::now();
    write_lines(&writer, id, n, &line).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let row = loop {
        if let Some(r) = store.log_index(id).await?.first().copied()
            && r.lines as usize >= n
        {
            break r;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "indexing did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let ingest = started.elapsed();

    // The in-memory mock keeps at most 5 MiB per partition: measure reads over what it
    // retained, and say so.
    let (low, _) = state.log_reader.watermarks(row.partition).await?;
    let first = row.first_offset.max(low);
    let retained = (row.last_offset + 1 - first) as usize;
    if first > row.first_offset {
        println!(
            "note: the broker retained the last {retained} of {n} lines (the in-memory mock keeps 5 MiB per partition); reads are measured over those"
        );
    }

    // Random 1000-line pages, from a cold block cache (ingest and indexing read none).
    state.log_reader.clear_cache();
    let span = (row.last_offset - first - 1000).max(1);
    let mut latencies = Vec::with_capacity(args.pages);
    for i in 0..args.pages {
        let offset = first + ((i as i64 * 7_919_993) % span);
        let cursor = state.cursor_key.encode(&Cursor {
            task_id: id,
            partition: row.partition,
            offset,
            direction: Direction::Forward,
        });
        let t = Instant::now();
        let page: Value = http
            .get(format!("{base}/v1/tasks/{id}/logs"))
            .query(&[("cursor", cursor.as_str()), ("limit", "1000")])
            .send()
            .await?
            .json()
            .await?;
        latencies.push(t.elapsed());
        anyhow::ensure!(
            page["lines"].as_array().map(Vec::len) == Some(1000),
            "a page came back short: {page}"
        );
    }
    latencies.sort();

    // The whole (retained) log through cursors, from a cold block cache again: none of
    // it may come from what the random pages read.
    state.log_reader.clear_cache();
    let started = Instant::now();
    let mut read = 0usize;
    let mut cursor: Option<String> = Some(state.cursor_key.encode(&Cursor {
        task_id: id,
        partition: row.partition,
        offset: first,
        direction: Direction::Forward,
    }));
    loop {
        let mut req = http
            .get(format!("{base}/v1/tasks/{id}/logs"))
            .query(&[("limit", "5000")]);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c)]);
        }
        let page: Value = req.send().await?.json().await?;
        let got = page["lines"].as_array().map(Vec::len).unwrap_or(0);
        read += got;
        match page["next_cursor"].as_str() {
            Some(c) if got > 0 => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    let full_read = started.elapsed();
    system.stop().await;
    anyhow::ensure!(
        read == retained,
        "read {read} of {retained} retained lines back"
    );

    let rate = |count: usize, d: Duration| count as f64 / d.as_secs_f64().max(1e-9);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!("{:<44} {:>14}   aim / baseline", "measure", "result");
    println!(
        "{:<44} {:>10.0} /s   raw produce, same records and settings: {:.0} /s (ratio {:.2}; aim >= 0.8)",
        "ingest, written -> indexed",
        rate(n, ingest),
        rate(n, raw),
        raw.as_secs_f64() / ingest.as_secs_f64()
    );
    println!(
        "{:<44} {:>11.2} ms",
        "1000-line page p50",
        ms(percentile(&latencies, 50.0))
    );
    println!(
        "{:<44} {:>11.2} ms   aim <= 15 ms",
        "1000-line page p99",
        ms(percentile(&latencies, 99.0))
    );
    println!(
        "{:<44} {:>11.2} s    {:.0} lines/s; aim: 1M lines in <= 3 s",
        format!("read all {retained} lines (5000/page)"),
        full_read.as_secs_f64(),
        rate(n, full_read)
    );
    println!(
        "{:<44} {:>10.0} MiB",
        "peak resident memory (whole run)",
        peak_rss_mib().unwrap_or(0.0)
    );
    Ok(())
}

/// Writes `n` stdout lines of attempt 1 of `task` and waits for every acknowledgement.
async fn write_lines(
    writer: &crate::logs::LogWriter,
    task: Uuid,
    n: usize,
    line: &impl Fn(usize) -> String,
) -> anyhow::Result<()> {
    let pending: Vec<_> = (0..n)
        .map(|i| {
            writer
                .write(
                    task,
                    1,
                    crate::logs::Stream::Stdout,
                    line(i).as_bytes(),
                    None,
                    None,
                )
                .1
        })
        .collect();
    for p in pending {
        p.await?;
    }
    Ok(())
}

/// Arguments of `tasklog bench schedule`.
#[derive(Debug, Clone, Args)]
pub struct ScheduleBenchArgs {
    /// Tasks submitted one at a time, with free capacity, for submit→running latency.
    #[arg(long, default_value_t = 300)]
    pub tasks: usize,
    /// Queued tasks in the scheduling-pass measurement.
    #[arg(long, default_value_t = 100_000)]
    pub queued: usize,
    /// Workers in the scheduling-pass measurement.
    #[arg(long, default_value_t = 10)]
    pub workers: usize,
    /// Partitions of the benchmark's topics.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    #[command(flatten)]
    pub broker: BenchBrokerArgs,
    /// Postgres server; a scratch database is created next to the one named here and
    /// dropped at the end.
    #[arg(long, env = "TASKLOG_DATABASE_URL", default_value = store::DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

/// Runs the scheduling benchmark and prints its figures.
pub async fn schedule(args: ScheduleBenchArgs) -> anyhow::Result<()> {
    println!(
        "tasklog bench schedule: {} tasks submit→running, one pass over {} queued tasks and {} workers",
        args.tasks, args.queued, args.workers
    );
    pass_figures(args.queued, args.workers);
    let env = BenchEnv::start("bsched", &args.broker, args.partitions, &args.database_url).await?;
    let result = submit_to_running(&args, &env).await;
    env.finish().await;
    result
}

/// Median of `runs` timings of `f`.
fn median_of(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// A task folded from `submitted` (and `assigned` to `worker`, if given).
fn bench_task(spec: Value, worker: Option<&str>) -> Option<crate::events::TaskState> {
    let spec: TaskSpec = serde_json::from_value(spec).ok()?;
    let id = Uuid::now_v7();
    let submitted = Event::new(
        "bench",
        id,
        1,
        Payload::Submitted {
            spec: std::sync::Arc::new(spec),
        },
    );
    let task = crate::events::apply(None, &submitted).ok()?;
    match worker {
        None => Some(task),
        Some(w) => {
            let assigned = Payload::Assigned {
                worker_id: w.to_string(),
                attempt: 1,
            };
            crate::events::apply(Some(&task), &Event::new("bench", id, 2, assigned)).ok()
        }
    }
}

/// One scheduling pass over a large queue: the planner alone, and the scheduler's
/// whole decision pass (lost workers, dependencies, placement, no-capacity), with the
/// workers full (every core taken by a running attempt) and with room.
fn pass_figures(queued: usize, worker_count: usize) {
    use crate::events::worker::{WorkerCapacity, WorkerInfo, WorkerState, WorkerStatus};
    use crate::scheduler::plan::PlanOptions;
    use crate::scheduler::{Model, SchedulerOptions, decide};
    use crate::store::TaskRecord;

    let now = chrono::Utc::now();
    let mut waiting = Vec::with_capacity(queued);
    for i in 0..queued {
        let gpu = if i % 10 == 0 { 1 } else { 0 };
        let spec = json!({
            "shell": "true",
            "priority": (i % 101) as i64,
            "resources": {"cpu": 1 + (i % 4) as i64, "memory": "1GiB", "gpu": gpu},
        });
        if let Some(mut task) = bench_task(spec, None) {
            let at = now - chrono::Duration::milliseconds((queued - i) as i64);
            task.submitted_at = at;
            task.queued_at = Some(at);
            waiting.push(task);
        }
    }
    let workers: Vec<WorkerState> = (0..worker_count)
        .map(|i| WorkerState {
            id: format!("w{i:03}"),
            state: WorkerStatus::Active,
            info: WorkerInfo {
                capacity: WorkerCapacity {
                    cpu: 16.0,
                    memory: 64 << 30,
                    gpu: if i % 4 == 0 { 4 } else { 0 },
                },
                ..WorkerInfo::default()
            },
            registered_at: now,
            last_heartbeat_at: now,
            updated_at: now,
            reason: None,
        })
        .collect();
    let options = SchedulerOptions::new(Topics::with_prefix("bench"));
    for (label, full) in [("workers full", true), ("workers with room", false)] {
        let mut model = Model::new(
            PlanOptions {
                aging_per_minute: 1.0,
            },
            Default::default(),
        );
        let mut offset = 0;
        let mut add = |model: &mut Model, task| {
            offset += 1;
            model.update(TaskRecord {
                task,
                partition: 0,
                last_offset: offset,
            });
        };
        for t in &waiting {
            add(&mut model, t.clone());
        }
        if full {
            for w in &workers {
                for _ in 0..16 {
                    let gpu = if w.info.capacity.gpu > 0 { 1 } else { 0 };
                    let spec = json!({"shell": "true", "resources": {"cpu": 1, "gpu": gpu}});
                    if let Some(t) = bench_task(spec, Some(&w.id)) {
                        add(&mut model, t);
                    }
                }
            }
        }
        let mut used: std::collections::HashMap<&str, crate::scheduler::plan::Capacity> =
            Default::default();
        for t in model.tasks().filter(|t| t.worker_id.is_some()) {
            if let Some(w) = workers.iter().find(|w| Some(&w.id) == t.worker_id.as_ref()) {
                let u = used.entry(&w.id).or_default();
                *u = u.saturating_add(crate::scheduler::need_of(&t.spec));
            }
        }
        let views: Vec<crate::scheduler::plan::WorkerView> = workers
            .iter()
            .map(|w| crate::scheduler::plan::WorkerView {
                id: w.id.clone(),
                total: crate::scheduler::capacity_of(w),
                used: used.get(w.id.as_str()).copied().unwrap_or_default(),
                labels: Default::default(),
                projects: Vec::new(),
                accepting: true,
            })
            .collect();
        let planner = median_of(21, || {
            std::hint::black_box(crate::scheduler::plan::plan(model.queue(), &views));
        });
        let mut actions = 0;
        let whole = median_of(21, || {
            actions = decide(&model, &workers, &options, now).actions.len();
        });
        println!(
            "  one pass over {} queued, {label}: planner {:.1} ms, whole decision pass {:.1} ms ({actions} actions)   aim ≤ 50 ms",
            model.queue().len(),
            planner.as_secs_f64() * 1e3,
            whole.as_secs_f64() * 1e3,
        );
    }
}

async fn submit_to_running(args: &ScheduleBenchArgs, env: &BenchEnv) -> anyhow::Result<()> {
    use crate::events::worker::WorkerCapacity;
    let store = Store::connect(&env.database_url, 16)?;
    store.migrate().await?;
    let appender = Appender::new(&AppenderOptions::new(&env.brokers))?;

    // Baseline: one record produced and acknowledged, one at a time.
    let mut raw = Vec::with_capacity(200);
    for _ in 0..200 {
        let encoded = Event::new(
            "bench",
            Uuid::now_v7(),
            1,
            Payload::Queued(Default::default()),
        )
        .encode();
        let started = Instant::now();
        appender.append(&env.raw_topic, &encoded).await?;
        raw.push(started.elapsed());
    }
    raw.sort();

    let mut running = InProcess::start_api(
        &store,
        &appender,
        &env.brokers,
        &env.topics,
        args.partitions,
    )
    .await?;
    running.start_projections(&env.brokers, &env.topics, true);
    let mut scheduler_options = crate::scheduler::SchedulerOptions::new(env.topics.clone());
    scheduler_options.no_capacity_after = Duration::from_secs(600);
    let (sched_store, sched_appender, stopped) =
        (store.clone(), appender.clone(), running.stopped());
    running.tasks.push(tokio::spawn(async move {
        let _ =
            crate::scheduler::run(scheduler_options, sched_store, sched_appender, stopped).await;
    }));
    let mut worker_options = crate::worker::WorkerOptions::new(&running.base, env.topics.clone());
    worker_options.name = "bench-worker".into();
    worker_options.token = Some(running.token.clone());
    let ledger_dir = tempfile_dir()?;
    worker_options.ledger = Some(ledger_dir.join("bench-worker.attempts"));
    worker_options.capacity = WorkerCapacity {
        cpu: 1024.0,
        memory: 1 << 40,
        gpu: 0,
    };
    // The worker drains and stops before the API it reports to.
    let worker_appender = appender.clone();
    let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(async move {
        let shutdown = async move {
            let _ = worker_stopped.await;
        };
        if let Err(e) = crate::worker::run(worker_options, worker_appender, shutdown).await {
            tracing::error!(error = %e, "bench worker stopped");
        }
    });
    let http = running.client(reqwest::Client::builder())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.worker("bench-worker").await?.is_none() {
        anyhow::ensure!(Instant::now() < deadline, "the worker did not register");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut ids = Vec::with_capacity(args.tasks);
    for i in 0..args.tasks {
        let body: Value = http
            .post(format!("{}/v1/tasks", running.base))
            .json(&json!({"name": format!("latency-{i}"), "shell": "true", "resources": {"cpu": 0.1}}))
            .send()
            .await?
            .json()
            .await?;
        let id: Uuid = body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("submit failed: {body}"))?;
        ids.push(id);
        // One at a time with a pause, so each task meets free capacity and an idle
        // scheduler: this measures latency, not throughput.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut latencies = Vec::with_capacity(ids.len());
    loop {
        let tasks = store.tasks(&ids).await?;
        let done: Vec<_> = tasks
            .values()
            .filter(|t| t.task.state.is_terminal())
            .collect();
        if done.len() == ids.len() {
            for t in done {
                if let Some(started) = t.task.attempts.first().and_then(|a| a.started_at) {
                    latencies.push((started - t.task.submitted_at).to_std().unwrap_or_default());
                }
            }
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {} tasks finished",
            done.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    let _ = stop_worker.send(());
    let _ = worker.await;
    let _ = std::fs::remove_dir_all(&ledger_dir);
    running.stop().await;
    // Every client of the scratch database and the broker goes before they do.
    drop((store, appender));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  submit→running ({} tasks, free capacity): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms   aim p50 ≤ 25 ms",
        latencies.len(),
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default()),
    );
    println!(
        "  baseline, one produce round trip (same broker): p50 {:.2} ms, p99 {:.2} ms — submit→running is 3 appends (submitted, assigned, started) with 2 projection hops between them, a scheduling pass, a long-poll wake-up and a process spawn",
        ms(percentile(&raw, 50.0)),
        ms(percentile(&raw, 99.0)),
    );
    Ok(())
}

/// A scratch directory for the benchmark's worker ledger.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("tasklog-bench-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Arguments of `tasklog bench replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayBenchArgs {
    /// Task events on the log (published straight to Kafka, then projected).
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// What the events are: `lifecycle` (whole histories: submitted, assigned, started,
    /// succeeded — what a log mostly holds) or `submissions` (only submissions, each
    /// with a spec: the costliest event to fold).
    #[arg(long, value_enum, default_value_t = ReplayMix::Lifecycle)]
    pub mix: ReplayMix,
    /// Partitions of the benchmark's topics.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    #[command(flatten)]
    pub broker: BenchBrokerArgs,
    /// Postgres server (a scratch database is created and dropped).
    #[arg(long, env = "TASKLOG_DATABASE_URL", default_value = store::DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

/// The events `tasklog bench replay` puts on the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayMix {
    /// Whole task histories, four events a task.
    Lifecycle,
    /// Submissions only.
    Submissions,
}

/// `tasklog bench replay`: `replay verify`'s rate (read, fold, compare) beside the raw
/// consume rate of the same topic, in the same run.
pub async fn replay(args: ReplayBenchArgs) -> anyhow::Result<()> {
    let env = BenchEnv::start(
        "benchreplay",
        &args.broker,
        args.partitions,
        &args.database_url,
    )
    .await?;
    let result = run_replay(&args, &env).await;
    env.finish().await;
    result
}

async fn run_replay(args: &ReplayBenchArgs, env: &BenchEnv) -> anyhow::Result<()> {
    let (brokers, topics) = (env.brokers.as_str(), &env.topics);
    let store = Store::connect(&env.database_url, 8)?;
    store.migrate().await?;
    let n = args.events;
    println!(
        "tasklog bench replay: {n} events ({}), {} partitions, broker {brokers}",
        match args.mix {
            ReplayMix::Lifecycle => "whole task histories, 4 events a task",
            ReplayMix::Submissions => "submissions only",
        },
        args.partitions
    );
    // The log: events as the API, scheduler and workers (or outside producers) append them.
    let appender = Appender::new(&AppenderOptions::new(brokers))?;
    let encoded = match args.mix {
        ReplayMix::Lifecycle => sample_lifecycles(n),
        ReplayMix::Submissions => sample_submissions(n),
    };
    let results = appender.append_all(&topics.events, &encoded).await;
    anyhow::ensure!(results.iter().all(Result::is_ok), "produce failed");
    drop(encoded);

    // The projection, by the real projectors, until it has the whole log.
    let mut system =
        InProcess::start_api(&store, &appender, brokers, topics, args.partitions).await?;
    system.start_projections(brokers, topics, true);
    system.wait_projected(brokers, &topics.events).await?;
    let ranges: std::collections::HashMap<i32, (i64, i64)> =
        kafka::watermarks(brokers, &topics.events)
            .await?
            .into_iter()
            .enumerate()
            .map(|(p, range)| (p as i32, range))
            .collect();
    system.stop().await;

    // Baseline: the same topic consumed, records only touched.
    let (b, t) = (brokers.to_string(), topics.events.clone());
    let started = Instant::now();
    let consumed = tokio::task::spawn_blocking(move || {
        let mut bytes = 0usize;
        let read = kafka::scan(&b, &t, &ranges, |m| bytes += m.payload_len());
        std::hint::black_box(bytes);
        read
    })
    .await??;
    let raw = started.elapsed();

    let report = crate::replay::verify_store(brokers, topics, &store, |_, _| {}).await?;
    anyhow::ensure!(
        report.differences.is_empty(),
        "replay found {} differences in a fresh projection",
        report.differences.len()
    );
    anyhow::ensure!(
        report.rejected == 0,
        "the fold refused {} of the benchmark's records",
        report.rejected
    );
    let rate = |count: u64, d: Duration| count as f64 / d.as_secs_f64().max(1e-9);
    let (verify_rate, raw_rate) = (rate(report.records, report.elapsed), rate(consumed, raw));
    println!();
    println!("{:<44} {:>14}   aim / baseline", "measure", "result");
    println!(
        "{:<44} {:>10.0} /s   raw consume of the same topic: {raw_rate:.0} /s (ratio {:.2}; aim >= 100000 /s: {})",
        "replay verify (read, fold, compare)",
        verify_rate,
        verify_rate / raw_rate.max(1e-9),
        if verify_rate >= 100_000.0 {
            "met"
        } else {
            "not met"
        }
    );
    println!(
        "{:<44} {:>10} records in {:.2} s; raw consume {consumed} in {:.2} s",
        "",
        report.records,
        report.elapsed.as_secs_f64(),
        raw.as_secs_f64()
    );
    println!(
        "{:<44} {:>10.0} MiB",
        "peak resident memory (whole run)",
        peak_rss_mib().unwrap_or(0.0)
    );
    Ok(())
}

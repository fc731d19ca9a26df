//! `tasklog bench follow`: many log followers on one API server.
//!
//! The API server and the projector run as child processes (`tasklog server`,
//! `tasklog projector`, this binary), so that their threads and CPU are theirs alone;
//! this process holds the followers (Server-Sent Events, one connection each), writes
//! the lines through the real [`LogWriter`](crate::logs::LogWriter) and submits tasks
//! over HTTP. Printed, in one run:
//!
//! - threads and CPU of the API process idle, with the followers idle, with them
//!   receiving lines, and after they leave (with how long until its threads are back);
//! - delivery latency, line acknowledged by Kafka → received by a follower, p50/p99,
//!   beside the baseline of the same lines received by one plain Kafka consumer;
//! - submission latency p50/p99 while they follow, beside the same without followers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{BenchBrokerArgs, BenchEnv, percentile};
use crate::kafka::{self, Appender, AppenderOptions};
use crate::logs::{LogWriter, LogWriterOptions, Stream};
use crate::store;

/// Arguments of `tasklog bench follow`.
#[derive(Debug, Clone, Args)]
pub struct FollowBenchArgs {
    /// Followers (SSE streams), spread evenly over the tasks.
    #[arg(long, default_value_t = 1000)]
    pub followers: usize,
    /// Tasks whose logs are followed.
    #[arg(long, default_value_t = 100)]
    pub tasks: usize,
    /// Lines per second each task prints while the followers receive.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Length of each measured phase, in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Sequential submissions for each submission-latency figure.
    #[arg(long, default_value_t = 200)]
    pub submissions: usize,
    #[command(flatten)]
    pub broker: BenchBrokerArgs,
    /// Postgres server (a scratch database is created and dropped).
    #[arg(long, env = "TASKLOG_DATABASE_URL", default_value = store::DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

/// A child process of this benchmark, killed on drop.
struct Role {
    child: std::process::Child,
}

impl Role {
    fn spawn(env: &BenchEnv, args: &[&str]) -> anyhow::Result<Role> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let child = std::process::Command::new(exe)
            .args(args)
            .env("TASKLOG_KAFKA_BROKERS", &env.brokers)
            .env("TASKLOG_TOPIC_PREFIX", &env.topics.prefix)
            .env("TASKLOG_DATABASE_URL", &env.database_url)
            .env("TASKLOG_AUTH", "off")
            .env("RUST_LOG", "warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting tasklog {}", args.join(" ")))?;
        Ok(Role { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Threads and CPU time (clock ticks) of a process, from `/proc`.
#[derive(Debug, Clone, Copy)]
struct ProcStat {
    threads: usize,
    cpu_ticks: u64,
}

fn proc_stat(pid: u32) -> anyhow::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unreadable /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat has no field {n}"))
    };
    Ok(ProcStat {
        threads: field(20)? as usize,
        cpu_ticks: field(14)? + field(15)?,
    })
}

/// Share of one core `pid` used over `window`, and its threads at the end.
async fn cpu_over(pid: u32, window: Duration) -> anyhow::Result<(f64, usize)> {
    let ticks_per_second = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    let before = proc_stat(pid)?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = proc_stat(pid)?;
    let seconds = started.elapsed().as_secs_f64();
    let used = (after.cpu_ticks.saturating_sub(before.cpu_ticks)) as f64 / ticks_per_second;
    Ok((100.0 * used / seconds, after.threads))
}

/// Raises this process's open-file limit to its hard limit (1000 followers are 1000
/// sockets here and as many in the server, which inherits it).
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// When each line was received, by its text.
type Received = Arc<Mutex<Vec<(String, Instant)>>>;

/// One SSE follower: records when each line arrives until it is aborted.
async fn follow(http: reqwest::Client, url: String, received: Received) -> anyhow::Result<()> {
    let mut response = http
        .get(&url)
        .header("accept", "text/event-stream")
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    let mut buffer = String::new();
    while let Some(chunk) = response.chunk().await? {
        let now = Instant::now();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if !block.lines().any(|l| l.trim() == "event: line") {
                continue;
            }
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:"))
                && let Ok(line) = serde_json::from_str::<Value>(data.trim())
                && let Some(text) = line["text"].as_str()
            {
                received
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((text.to_string(), now));
            }
        }
    }
    Ok(())
}

/// `count` sequential submissions; their latencies, sorted.
async fn submission_latencies(
    http: &reqwest::Client,
    base: &str,
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        let response = http
            .post(format!("{base}/v1/tasks"))
            .json(&json!({"shell": "true", "name": format!("bench-submit-{i}")}))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().as_u16() == 202,
            "submission answered {}",
            response.status()
        );
        out.push(started.elapsed());
    }
    out.sort();
    Ok(out)
}

/// `tasklog_log_followers` of the server.
async fn followers_on(http: &reqwest::Client, base: &str) -> Option<i64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("tasklog_log_followers "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
}

/// Waits (up to `bound`) until `check` holds.
async fn until<F, Fut>(what: &str, bound: Duration, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        anyhow::ensure!(started.elapsed() < bound, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: FollowBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.tasks > 0 && args.followers > 0,
        "--tasks and --followers must be positive"
    );
    anyhow::ensure!(
        args.rate > 0.0 && args.rate <= 1000.0,
        "--rate is lines per second per task, in (0, 1000]"
    );
    raise_open_files();
    let env = BenchEnv::start("benchfollow", &args.broker, 12, &args.database_url).await?;
    let result = run_in(&args, &env).await;
    env.finish().await;
    result
}

async fn run_in(args: &FollowBenchArgs, env: &BenchEnv) -> anyhow::Result<()> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let addr = format!("127.0.0.1:{port}");
    let base = format!("http://{addr}");
    let _projector = Role::spawn(env, &["projector"])?;
    let server = Role::spawn(env, &["server", "--http-addr", &addr])?;
    let pid = server.pid();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    until("the API server answers", Duration::from_secs(120), || {
        let r = http.get(format!("{base}/readyz")).send();
        async move { r.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await?;
    println!(
        "tasklog bench follow: {} followers over {} tasks, {} line/s per task, {} s phases, broker {}",
        args.followers, args.tasks, args.rate, args.seconds, env.brokers
    );
    let window = Duration::from_secs(args.seconds.max(1));

    let mut tasks = Vec::with_capacity(args.tasks);
    for i in 0..args.tasks {
        let response = http
            .post(format!("{base}/v1/tasks"))
            .json(&json!({"shell": "sleep 3600", "name": format!("followed-{i}")}))
            .send()
            .await?;
        let body: Value = response.json().await?;
        let id = body["id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .with_context(|| format!("submission refused: {body}"))?;
        tasks.push(id);
    }
    // Every task projected before anyone follows it.
    let last = tasks.last().copied().context("no task")?;
    http.get(format!("{base}/v1/tasks/{last}?wait_ms=30000"))
        .send()
        .await?;

    // 1. The API server with nothing to follow.
    let (idle_cpu, idle_threads) = cpu_over(pid, window).await?;
    let alone = submission_latencies(&http, &base, args.submissions).await?;

    // 2. Followers, idle.
    let received: Vec<Received> = (0..args.followers).map(|_| Received::default()).collect();
    let streams: Vec<_> = received
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let url = format!("{base}/v1/tasks/{}/logs", tasks[i % tasks.len()]);
            tokio::spawn(follow(http.clone(), url, r.clone()))
        })
        .collect();
    let want = args.followers as i64;
    until(
        "every follower registered",
        Duration::from_secs(120),
        || async { followers_on(&http, &base).await == Some(want) },
    )
    .await?;
    let peak_threads = proc_stat(pid)?.threads;
    // Their first reads borrow the reader's few consumers; measured once those rest.
    let settled = until(
        "the followers' first reads over",
        Duration::from_secs(30),
        || async { proc_stat(pid).is_ok_and(|s| s.threads <= idle_threads + 10) },
    )
    .await
    .is_ok();
    let (followed_cpu, followed_threads) = cpu_over(pid, window).await?;

    // 3. Lines at `rate` per task, received by the followers and by one raw consumer.
    let raw: Received = Received::default();
    let raw_reader = tokio::spawn(raw_consumer(
        env.brokers.clone(),
        env.topics.logs.clone(),
        raw.clone(),
    ));
    // The raw consumer is at the log's end before the first line.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writer = LogWriter::new(
        Appender::new(&AppenderOptions::new(&env.brokers))?,
        LogWriterOptions::new(&env.topics.logs),
    );
    let acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let period = Duration::from_secs_f64(1.0 / (args.rate * tasks.len() as f64));
    let lines = (args.rate * tasks.len() as f64 * window.as_secs_f64()).round() as usize;
    let writing = {
        let (acked, tasks) = (acked.clone(), tasks.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut pending = Vec::new();
            for n in 0..lines {
                tick.tick().await;
                let task = tasks[n % tasks.len()];
                let text = format!("line {n} of {task}");
                let (_, delivered) =
                    writer.write(task, 1, Stream::Stdout, text.as_bytes(), None, None);
                let acked = acked.clone();
                pending.push(tokio::spawn(async move {
                    if delivered.await.is_ok() {
                        acked
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(text, Instant::now());
                    }
                }));
            }
            for p in pending {
                let _ = p.await;
            }
        })
    };
    let busy = tokio::join!(
        cpu_over(pid, window),
        submission_latencies(&http, &base, args.submissions)
    );
    let (busy_cpu, busy_threads) = busy.0?;
    let following = busy.1?;
    writing.await?;
    let per_follower = |i: usize| {
        let task = tasks[i % tasks.len()];
        let acked = acked.lock().unwrap_or_else(|e| e.into_inner());
        acked
            .keys()
            .filter(|t| t.ends_with(&task.to_string()))
            .count()
    };
    let expected: usize = (0..args.followers).map(per_follower).sum();
    let delivered = || -> usize {
        received
            .iter()
            .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    };
    let all_delivered = until(
        "every line at every follower",
        Duration::from_secs(60),
        || async { delivered() >= expected },
    )
    .await
    .is_ok();
    let latencies = |sets: &[Received]| -> Vec<Duration> {
        let acked = acked.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Duration> = sets
            .iter()
            .flat_map(|r| {
                r.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter_map(|(text, at)| {
                        acked
                            .get(text)
                            .map(|ack| at.saturating_duration_since(*ack))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort();
        out
    };
    let delivery = latencies(&received);
    raw_reader.abort();
    let raw_delivery = latencies(std::slice::from_ref(&raw));

    // 4. The followers leave.
    let left = Instant::now();
    for s in &streams {
        s.abort();
    }
    until("the followers gone", Duration::from_secs(60), || async {
        followers_on(&http, &base).await == Some(0)
    })
    .await?;
    let restored = until(
        "the API server back to its threads",
        Duration::from_secs(60),
        || async { proc_stat(pid).is_ok_and(|s| s.threads <= idle_threads + 1) },
    )
    .await
    .map(|_| left.elapsed());
    let (after_cpu, after_threads) = cpu_over(pid, window).await?;

    let f = args.followers;
    println!();
    println!(
        "API server process (pid {pid}), CPU as % of one core over {}s:",
        window.as_secs()
    );
    let row = |label: String, cpu: f64, threads: usize| {
        println!("  {label:<32} {cpu:>6.1}%  {threads:>4} threads");
    };
    row("idle, nothing followed".into(), idle_cpu, idle_threads);
    row(
        format!("{f} followers, idle"),
        followed_cpu,
        followed_threads,
    );
    println!(
        "  {:<32} ({peak_threads} threads while they registered{})",
        "",
        if settled { "" } else { "; not settled in 30 s" }
    );
    row(
        format!("{f} followers, {} line/s each", args.rate),
        busy_cpu,
        busy_threads,
    );
    row("after they left".into(), after_cpu, after_threads);
    match restored {
        Ok(d) => println!(
            "  threads back to idle {:.1} s after the followers left",
            d.as_secs_f64()
        ),
        Err(e) => println!("  threads NOT back to idle: {e}"),
    }
    println!();
    println!(
        "delivery, line acknowledged → received ({} deliveries{}):",
        delivery.len(),
        if all_delivered {
            String::new()
        } else {
            format!(", {expected} expected: some did not arrive")
        }
    );
    println!(
        "  followers through the API    p50 {}  p99 {}",
        ms(percentile(&delivery, 50.0)),
        ms(percentile(&delivery, 99.0))
    );
    println!(
        "  baseline: one raw consumer   p50 {}  p99 {}  ({} lines)",
        ms(percentile(&raw_delivery, 50.0)),
        ms(percentile(&raw_delivery, 99.0)),
        raw_delivery.len()
    );
    println!();
    println!(
        "submission latency ({} sequential POST /v1/tasks):",
        args.submissions
    );
    println!(
        "  without followers            p50 {}  p99 {}",
        ms(percentile(&alone, 50.0)),
        ms(percentile(&alone, 99.0))
    );
    println!(
        "  {:<28} p50 {}  p99 {}",
        format!("while {f} follow"),
        ms(percentile(&following, 50.0)),
        ms(percentile(&following, 99.0))
    );
    println!();
    println!(
        "aims: idle followers add < 5% of a core and no thread each; p99 delivery ≤ 50 ms; \
         submission p99 within 2× of without; threads back within 10 s"
    );
    Ok(())
}

/// A plain consumer at the end of every partition of `topic`: when each line arrives.
async fn raw_consumer(brokers: String, topic: String, received: Received) -> anyhow::Result<()> {
    let consumer: StreamConsumer = kafka::client_config(&brokers)
        .set("group.id", "tasklog-bench-follow-raw")
        .set("enable.auto.commit", "false")
        .set(
            "fetch.wait.max.ms",
            kafka::tail_fetch_wait_ms(&brokers).await,
        )
        .create()?;
    let partitions = kafka::watermarks(&brokers, &topic).await?.len();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(&topic, p as i32, Offset::End)?;
    }
    consumer.assign(&tpl)?;
    loop {
        let m = consumer.recv().await?;
        let now = Instant::now();
        if let Some(text) = m.payload().map(|p| String::from_utf8_lossy(p).into_owned()) {
            received
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((text, now));
        }
    }
}

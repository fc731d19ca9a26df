//! The shared integration-test harness.
//!
//! Starts (or locates) the broker and Postgres, gives each test its own topics and its
//! own database, runs tasklog's roles as real child processes (so tests can SIGKILL
//! them), and cleans everything up on drop.
//!
//! - Broker: each test starts its own `tasklog dev-broker` on a free loopback port, so its
//!   topics are its own. With `TASKLOG_TEST_KAFKA_BROKERS` set, tests use that cluster
//!   instead, with a unique topic prefix per test.
//! - Postgres: `TASKLOG_TEST_DATABASE_URL` (default
//!   `postgres://tasklog:tasklog@127.0.0.1:5432/postgres`) is the admin connection; each
//!   test gets a fresh database, dropped at the end.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tasklog::kafka::Topics;
use tokio_postgres::NoTls;

/// Path of the tasklog binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tasklog")
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Polls `check` until it returns `Some` or `timeout` passes. The pause between checks
/// is a polling interval, not a stand-in for the condition.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    child: Child,
    pub name: &'static str,
}

impl Proc {
    /// Wraps a spawned child.
    pub fn wrap(child: Child, name: &'static str) -> Proc {
        Proc { child, name }
    }

    /// Exit code and captured stderr of a child that has exited (stderr must be piped).
    pub fn finish(&mut self) -> (Option<i32>, String) {
        let status = self.child.wait().ok().and_then(|s| s.code());
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        (status, stderr)
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the shared test broker listens when `TASKLOG_TEST_KAFKA_BROKERS` is unset:
/// `scripts/kafka start` runs it (once; later calls find it running).
const SHARED_TEST_PORT: u16 = 19092;

/// The repository's `scripts/kafka`.
pub fn kafka_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka")
}

/// The shared Apache Kafka broker of this test run: `TASKLOG_TEST_KAFKA_BROKERS`
/// (`scripts/test` sets it), or one started here with `scripts/kafka start` on
/// 127.0.0.1:19092 with its data under `target/`.
fn shared_brokers() -> String {
    static SHARED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            if let Ok(addr) = std::env::var("TASKLOG_TEST_KAFKA_BROKERS") {
                return addr;
            }
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-kafka");
            let status = Command::new(kafka_script())
                .args(["start", "--data-dir"])
                .arg(&dir)
                .args(["--port", &SHARED_TEST_PORT.to_string()])
                .status()
                .expect("run scripts/kafka start");
            assert!(status.success(), "scripts/kafka start failed");
            format!("127.0.0.1:{SHARED_TEST_PORT}")
        })
        .clone()
}

/// Runs `f` to completion on a fresh thread with a small runtime: usable from sync
/// code (`Drop`, constructors) whether or not a runtime is running on this thread.
fn block_on_thread<T: Send>(f: impl Future<Output = T> + Send) -> Option<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()
                    .map(|rt| rt.block_on(f))
            })
            .join()
            .ok()
            .flatten()
    })
}

/// One Apache Kafka broker process of a test's own (see [`Broker::own`]), run with
/// `scripts/kafka run` as a child, so the test can SIGKILL and restart it.
pub struct KafkaNode {
    /// Node id (1, 2, 3, ...).
    pub id: u32,
    /// Client port.
    pub port: u16,
    args: Vec<String>,
    proc: Option<Proc>,
}

impl KafkaNode {
    fn spawn(&mut self) {
        let child = Command::new(kafka_script())
            .arg("run")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn scripts/kafka run");
        self.proc = Some(Proc {
            child,
            name: "kafka",
        });
    }

    /// Waits until the client port takes connections (Kafka opens it once ready).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let addr = format!("127.0.0.1:{}", self.port);
        while std::net::TcpStream::connect(&addr).is_err() {
            let running = self.proc.as_mut().is_some_and(Proc::running);
            assert!(running, "Kafka node {} exited during start-up", self.id);
            assert!(
                Instant::now() < deadline,
                "Kafka node {} not ready in 120 s",
                self.id
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs the broker JVM.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts it again on the same data and ports, and waits until it is ready.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready();
    }
}

/// A Kafka cluster for one test: the shared broker with topics of the test's own, or
/// brokers of the test's own.
pub struct Broker {
    pub addr: String,
    pub prefix: String,
    /// The test's own broker processes (empty on the shared broker and the mock).
    pub nodes: Vec<KafkaNode>,
    _data: Option<tempfile::TempDir>,
    shared: bool,
    _proc: Option<Proc>,
    /// Environment every tasklog role of this test gets (see [`role`]).
    pub role_env: Vec<(String, String)>,
}

impl Broker {
    /// Topics of this test's own, 12 partitions each, on the shared Apache Kafka broker.
    pub fn start() -> Broker {
        Broker::start_with_partitions(12)
    }

    /// Topics of this test's own with `partitions` partitions, on the shared broker.
    pub fn start_with_partitions(partitions: i32) -> Broker {
        Broker::start_with_topic_settings(partitions, &[])
    }

    /// Topics of this test's own on the shared broker, some created first with extra
    /// settings: `("logs", &[("segment.ms", "1000")])` for `<prefix>.logs`.
    pub fn start_with_topic_settings(
        partitions: i32,
        settings: &[(&str, &[(&str, &str)])],
    ) -> Broker {
        let broker = Broker {
            addr: shared_brokers(),
            prefix: unique("t"),
            nodes: Vec::new(),
            _data: None,
            shared: true,
            _proc: None,
            role_env: Vec::new(),
        };
        for (suffix, topic_settings) in settings {
            let name = format!("{}.{suffix}", broker.prefix);
            broker.create_topic(&name, partitions, topic_settings);
        }
        broker.create_topics(partitions);
        broker
    }

    /// Creates tasklog's topics for this prefix with `partitions` partitions.
    fn create_topics(&self, partitions: i32) {
        let (addr, topics) = (self.addr.clone(), Topics::with_prefix(&self.prefix));
        block_on_thread(async move {
            tasklog::kafka::ensure_topics(&addr, &topics.all(), partitions).await
        })
        .expect("runtime")
        .expect("create the test's topics");
    }

    /// Creates one topic with extra settings (e.g. small segments), before tasklog
    /// would create it with its own.
    pub fn create_topic(&self, name: &str, partitions: i32, settings: &[(&str, &str)]) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            tasklog::kafka::client_config(&self.addr)
                .create()
                .expect("admin client");
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(-1));
        for (k, v) in settings {
            topic = topic.set(k, v);
        }
        let results = block_on_thread(async move {
            admin
                .create_topics([&topic], &AdminOptions::new())
                .await
                .map(|r| {
                    r.into_iter()
                        .map(|r| r.map_err(|(_, e)| e))
                        .collect::<Vec<_>>()
                })
        })
        .expect("runtime")
        .expect("create topic");
        for r in results {
            r.expect("topic created");
        }
    }

    /// `nodes` Apache Kafka brokers of this test's own (combined broker + controller,
    /// KRaft, small heaps) on free loopback ports; every topic replicated
    /// `min(nodes, 3)` times with `min.insync.replicas` one less (at least 1).
    pub fn own(nodes: u32) -> Broker {
        let data = tempfile::tempdir().expect("kafka data dir");
        let ports: Vec<(u16, u16)> = (0..nodes).map(|_| (free_port(), free_port())).collect();
        let voters: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect();
        let replication = nodes.min(3);
        let min_isr = replication.saturating_sub(1).max(1);
        let cluster_id = {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(uuid::Uuid::new_v4().as_bytes())
                .replace('-', "A")
        };
        let mut broker = Broker {
            addr: ports
                .iter()
                .map(|(p, _)| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            prefix: unique("t"),
            nodes: Vec::new(),
            _data: None,
            shared: false,
            _proc: None,
            role_env: Vec::new(),
        };
        for (i, (port, controller)) in ports.iter().enumerate() {
            let dir = data.path().join(format!("node{}", i + 1));
            let args = vec![
                "--data-dir".to_string(),
                dir.to_str().expect("UTF-8 temp dir").to_string(),
                "--port".into(),
                port.to_string(),
                "--controller-port".into(),
                controller.to_string(),
                "--node-id".into(),
                (i + 1).to_string(),
                "--voters".into(),
                voters.join(","),
                "--cluster-id".into(),
                cluster_id.clone(),
                "--replication".into(),
                replication.to_string(),
                "--min-isr".into(),
                min_isr.to_string(),
                "--heap".into(),
                if nodes > 1 { "256m" } else { "384m" }.into(),
            ];
            let mut node = KafkaNode {
                id: i as u32 + 1,
                port: *port,
                args,
                proc: None,
            };
            node.spawn();
            broker.nodes.push(node);
        }
        for node in &mut broker.nodes {
            node.wait_ready();
        }
        broker._data = Some(data);
        broker.create_topics(12);
        broker
    }

    /// librdkafka's in-memory mock (`tasklog dev-broker`), with topics whose names
    /// use `prefix`: an empty log, as after restarting the mock.
    pub fn mock(partitions: i32, prefix: String) -> Broker {
        let mut child = Command::new(bin())
            .args(["dev-broker", "--listen", "127.0.0.1:0"])
            .args([
                "--partitions",
                &partitions.to_string(),
                "--topic-prefix",
                &prefix,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tasklog dev-broker");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        reader.read_line(&mut line).expect("read dev-broker banner");
        // Keep draining, so the broker never writes to a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        // "tasklog dev-broker listening on ADDR"
        let addr = line
            .split_whitespace()
            .nth(4)
            .unwrap_or_else(|| panic!("unexpected banner {line:?}"))
            .to_string();
        Broker {
            addr,
            prefix,
            nodes: Vec::new(),
            _data: None,
            shared: false,
            _proc: Some(Proc {
                child,
                name: "dev-broker",
            }),
            role_env: Vec::new(),
        }
    }

    pub fn events_topic(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.prefix)
    }

    /// A plain idempotent producer, as an outside producer would use.
    pub fn producer(&self) -> FutureProducer {
        tasklog::kafka::client_config(&self.addr)
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .create()
            .expect("producer")
    }

    /// Produces a record with string headers; returns (partition, offset).
    pub async fn produce(
        &self,
        topic: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> (i32, i64) {
        let producer = self.producer();
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(topic).payload(payload).headers(h);
        if let Some(k) = key {
            record = record.key(k);
        }
        let d = producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
        (d.partition, d.offset)
    }

    /// Produces `count` records of `size` random (incompressible) bytes to one partition.
    pub async fn flood(&self, topic: &str, partition: i32, count: usize, size: usize) {
        let producer = self.producer();
        for _ in 0..count {
            let payload: Vec<u8> = (0..size.div_ceil(16))
                .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
                .take(size)
                .collect();
            producer
                .send(
                    FutureRecord::<(), _>::to(topic)
                        .partition(partition)
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("produce");
        }
    }

    /// Deletes every record of a partition (Kafka's DeleteRecords, as an operator or
    /// retention would): its low watermark moves to its end.
    pub fn delete_all_records(&self, topic: &str, partition: i32) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            tasklog::kafka::client_config(&self.addr)
                .create()
                .expect("admin client");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::End)
            .expect("tpl");
        let result =
            block_on_thread(async move { admin.delete_records(&tpl, &AdminOptions::new()).await })
                .expect("runtime")
                .expect("delete records");
        for e in result.elements() {
            assert!(e.error().is_ok(), "delete records: {:?}", e.error());
        }
    }

    /// Low and high watermarks of a partition.
    pub fn watermarks(&self, topic: &str, partition: i32) -> (i64, i64) {
        self.all_watermarks(topic)[partition as usize]
    }

    /// Low and high watermarks of every partition, through tasklog's own reader of
    /// them (which asks again while a new partition has no leader yet).
    pub fn all_watermarks(&self, topic: &str) -> Vec<(i64, i64)> {
        block_on_thread(tasklog::kafka::watermarks(&self.addr, topic))
            .expect("runtime")
            .expect("watermarks")
    }

    /// Every record of `topic` from offset 0 to the current end: (partition, offset, headers, value).
    pub fn read_all(&self, topic: &str) -> Vec<Record> {
        let consumer: BaseConsumer = tasklog::kafka::client_config(&self.addr)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        // Per partition, the offset reading must reach: the high watermark. Counting
        // records would not do: compaction leaves gaps in the offsets.
        let mut unread: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
        for (p, (low, high)) in self.all_watermarks(topic).into_iter().enumerate() {
            let p = p as i32;
            if high > low {
                unread.insert(p, high);
            }
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !unread.is_empty() {
            assert!(
                Instant::now() < deadline,
                "read {} records; partitions not read to the end: {unread:?}",
                records.len()
            );
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    h.value
                                        .map(|v| String::from_utf8_lossy(v).into_owned())
                                        .unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if unread
                    .get(&m.partition())
                    .is_some_and(|high| m.offset() + 1 >= *high)
                {
                    unread.remove(&m.partition());
                }
                records.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    headers,
                    value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                });
            }
        }
        records
    }
}

impl Drop for Broker {
    /// On the shared broker, deletes every topic of this test.
    fn drop(&mut self) {
        if !self.shared {
            return;
        }
        let (addr, prefix) = (self.addr.clone(), format!("{}.", self.prefix));
        block_on_thread(async move {
            let Ok(all) = tasklog::kafka::list_topics(&addr).await else {
                return;
            };
            let mine: Vec<String> = all
                .into_iter()
                .map(|(name, _)| name)
                .filter(|name| name.starts_with(&prefix))
                .collect();
            let _ = tasklog::kafka::delete_topics(&addr, &mine).await;
        });
    }
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub value: Vec<u8>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A PostgreSQL server of one test's own (Debian's binaries, a data directory under
/// the system temp dir, a free loopback port), so the test can kill it with SIGKILL and
/// start it again on the same data. Run as the `postgres` user when the tests run as
/// root (Postgres refuses root). Removed on drop.
pub struct OwnPostgres {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    ids: Option<(u32, u32)>,
    server: Option<Child>,
}

impl OwnPostgres {
    /// Initialises a cluster (user `tasklog`, trust on loopback) and starts it.
    pub fn start() -> OwnPostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (scripts/test installs it)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("postgres").exists())
            .max()
            .expect("a PostgreSQL server binary under /usr/lib/postgresql");
        let dir = tempfile::Builder::new()
            .prefix("tasklog-pg-")
            .tempdir()
            .expect("temp dir");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let ids = root.then(|| {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .expect("id postgres");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .expect("the postgres user exists")
            };
            (id("-u"), id("-g"))
        });
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "-U",
                "tasklog",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb, ids);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = OwnPostgres {
            bin,
            dir,
            port: free_port(),
            ids,
            server: None,
        };
        pg.restart();
        pg
    }

    /// The admin URL (database `postgres`), for [`Db::create_on`].
    pub fn admin_url(&self) -> String {
        format!("postgres://tasklog@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server on its data directory and waits until it accepts connections.
    pub fn restart(&mut self) {
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: a kill takes the postmaster and every backend at once,
        // as a crash of the machine's database would.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        as_owner(&mut cmd, self.ids);
        self.server = Some(cmd.spawn().expect("start postgres"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not start in 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL to the postmaster and every backend; reaped.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let group = server.id() as libc::pid_t;
            // Never 0 or 1 (our own group, every process): only the server's group.
            if group > 1 {
                // SAFETY: killpg takes plain integers and touches no memory of ours.
                unsafe { libc::killpg(group, libc::SIGKILL) };
            }
            let _ = server.wait();
        }
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.kill();
    }
}

fn as_owner(cmd: &mut Command, ids: Option<(u32, u32)>) {
    if let Some((uid, gid)) = ids {
        std::os::unix::process::CommandExt::uid(cmd, uid);
        std::os::unix::process::CommandExt::gid(cmd, gid);
    }
}

/// A fresh database for one test, dropped at the end.
pub struct Db {
    pub url: String,
    name: String,
    admin_url: String,
}

impl Db {
    pub async fn create() -> Db {
        let admin_url = std::env::var("TASKLOG_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://tasklog:tasklog@127.0.0.1:5432/postgres".into());
        Db::create_on(&admin_url).await
    }

    /// A fresh database on the server of `admin_url` (e.g. an [`OwnPostgres`]).
    pub async fn create_on(admin_url: &str) -> Db {
        let admin_url = admin_url.to_string();
        let name = unique("tasklog_test");
        let (client, conn) = tokio_postgres::connect(&admin_url, NoTls).await.expect(
            "connect to Postgres (run scripts/test, which starts it and creates the tasklog role)",
        );
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b.to_string())
            .expect("url has a database");
        Db {
            url: format!("{base}/{name}"),
            name,
            admin_url,
        }
    }

    /// A direct connection to this test's database.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .expect("connect test db");
        tokio::spawn(conn);
        client
    }

    /// A single number from a query.
    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get(0)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside async context: use a short-lived runtime on a fresh thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&admin_url, NoTls).await.ok()?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// Environment for a tasklog role pointed at this broker and database.
pub fn role(broker: &Broker, db: &Db, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args)
        .env("TASKLOG_KAFKA_BROKERS", &broker.addr)
        .env("TASKLOG_TOPIC_PREFIX", &broker.prefix)
        .env("TASKLOG_DATABASE_URL", &db.url)
        .env_remove("TASKLOG_TOKEN")
        .env(
            "RUST_LOG",
            std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (name, value) in &broker.role_env {
        c.env(name, value);
    }
    c
}

/// How long a CLI command run by a test may take before the test fails: a hang is a
/// failure with a name, not a CI run that never ends.
pub const COMMAND_BOUND: Duration = Duration::from_secs(120);

/// Runs `command` to its end and returns what it printed, like [`Command::output`]
/// (with the command's own stdio settings), failing the test — after killing the
/// command — when it has not ended within [`COMMAND_BOUND`].
pub fn finish(command: &mut Command) -> std::process::Output {
    let what = format!(
        "tasklog {}",
        command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("start `{what}`: {e}"));
    let pid = child.id() as i32;
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match ended.recv_timeout(COMMAND_BOUND) {
        Ok(output) => output.unwrap_or_else(|e| panic!("wait for `{what}`: {e}")),
        Err(_) => {
            // SAFETY: kill(2) on the pid of a child not yet reaped by its waiter thread.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!(
                "`{what}` did not end within {} s (killed)",
                COMMAND_BOUND.as_secs()
            )
        }
    }
}

/// `tasklog replay verify --json` on this broker and database: its exit status and its
/// report.
pub fn replay_verify(broker: &Broker, db: &Db) -> (i32, Value) {
    let output = finish(role(broker, db, &["replay", "verify", "--json"]).stdout(Stdio::piped()));
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "replay verify printed no JSON report ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    (output.status.code().unwrap_or(-1), report)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Waits (up to a minute) until the tasklog at `url` answers `/readyz`.
pub async fn wait_ready(what: &str, url: &str) {
    let probe = format!("{url}/readyz");
    eventually(&format!("{what} ready"), Duration::from_secs(60), || {
        let probe = &probe;
        async move {
            let r = reqwest::get(probe).await.ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await;
}

/// `tasklog server` on a free port. Without `TASKLOG_AUTH` in `extra_env` it runs with
/// `--auth off` (for tests about something else that call it with clients of their
/// own); [`Stack`] runs its server with tokens.
pub async fn start_server(broker: &Broker, db: &Db, extra_env: &[(&str, &str)]) -> (Proc, String) {
    let port = free_port();
    let mut cmd = role(
        broker,
        db,
        &["server", "--http-addr", &format!("127.0.0.1:{port}")],
    );
    cmd.env("TASKLOG_AUTH", "off");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn server");
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let probe = format!("{url}/healthz");
    eventually(
        "the API to answer /healthz",
        Duration::from_secs(60),
        || {
            let r = http.get(&probe).send();
            async move { r.await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        },
    )
    .await;
    (
        Proc {
            child,
            name: "server",
        },
        url,
    )
}

/// `tasklog projector` (session timeout short, so a killed one's partitions move fast).
pub fn start_projector(broker: &Broker, db: &Db) -> Proc {
    start_projector_with(broker, db, &[])
}

/// `tasklog projector` with extra environment (e.g. a failpoint).
pub fn start_projector_with(broker: &Broker, db: &Db, env: &[(&str, &str)]) -> Proc {
    let mut cmd = role(broker, db, &["projector", "--session-timeout-ms", "6000"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn projector");
    Proc {
        child,
        name: "projector",
    }
}

/// Waits for a child to exit by itself; returns whether it did within `timeout`.
pub async fn exits_within(p: &mut Proc, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !p.running() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Creates a token with `tasklog token create --direct` (the operator's bootstrap) on
/// this broker and database; a projector must run to apply it. Returns the token.
pub fn create_token(
    broker: &Broker,
    db: &Db,
    name: &str,
    role_name: &str,
    extra: &[&str],
) -> String {
    let mut args = vec![
        "token", "create", "--direct", "--json", "--name", name, "--role", role_name,
    ];
    args.extend_from_slice(extra);
    let output = finish(
        role(broker, db, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    assert!(
        output.status.success(),
        "token create {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let issued: Value = serde_json::from_slice(&output.stdout).expect("token create prints JSON");
    issued["token"].as_str().expect("a token").to_string()
}

/// A client that sends `token` on every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

/// The admin token `tasklog up` made in `state_dir` on its first start.
pub fn up_token(state_dir: &std::path::Path) -> String {
    std::fs::read_to_string(state_dir.join("admin.token"))
        .expect("tasklog up keeps its admin token in the state directory")
        .trim()
        .to_string()
}

/// Broker, database, API server (with tokens) and projector, all for one test, and an
/// admin token (`harness`) its client sends.
/// Fields drop in order: the roles stop before the broker and the database go.
pub struct Stack {
    pub server: Proc,
    pub projector: Proc,
    pub broker: Broker,
    pub db: Db,
    pub url: String,
    pub http: reqwest::Client,
    /// The admin token `http` sends.
    pub token: String,
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_on(Broker::start()).await
    }

    /// A stack on the given broker, with a fresh database.
    pub async fn start_on(broker: Broker) -> Stack {
        Stack::start_on_with(broker, &[]).await
    }

    /// A stack on the given broker whose projector gets extra environment (e.g.
    /// `TASKLOG_PROJECTOR_METRICS_ADDR`).
    pub async fn start_on_with(broker: Broker, projector_env: &[(&str, &str)]) -> Stack {
        let db = Db::create().await;
        let projector = start_projector_with(&broker, &db, projector_env);
        let (server, url) = start_server(&broker, &db, &[("TASKLOG_AUTH", "tokens")]).await;
        let token = create_token(&broker, &db, "harness", "admin", &[]);
        Stack {
            server,
            projector,
            broker,
            db,
            url,
            http: client_with_token(&token),
            token,
        }
    }

    /// A tasklog command pointed at this stack's API with its admin token.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = role(&self.broker, &self.db, args);
        c.env("TASKLOG_API_URL", &self.url)
            .env("TASKLOG_TOKEN", &self.token);
        c
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .patch(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .expect("PATCH");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The body of a GET as text (e.g. `/metrics`).
    pub async fn text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("GET")
            .text()
            .await
            .expect("body")
    }

    /// Waits until the task is projected and returns it.
    pub async fn task(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/tasks/{id}?wait_ms=20000")).await;
        assert_eq!(status, 200, "task {id}: {body}");
        body
    }

    /// Waits until the projection of `topic` has applied or rejected `n` records.
    pub async fn wait_projected_topic(&self, topic: &str, n: i64) {
        wait_projected_on(&self.db, topic, n).await;
    }

    /// Waits until the projection of `topic` has everything the topic holds now.
    pub async fn wait_caught_up(&self, topic: &str) {
        let end: i64 = self
            .broker
            .all_watermarks(topic)
            .iter()
            .map(|(_, h)| h)
            .sum();
        self.wait_projected_topic(topic, end).await;
    }

    /// Waits until the projection has applied or rejected `n` records in total.
    pub async fn wait_projected(&self, n: i64) {
        let db = &self.db;
        eventually(
            &format!("{n} records projected"),
            Duration::from_secs(120),
            || async move {
                let done = db
                    .count("SELECT coalesce(sum(next_offset), 0)::bigint FROM projection_offsets")
                    .await;
                (done >= n).then_some(())
            },
        )
        .await;
    }
}

/// Waits until the projection of `topic` in `db` has applied or rejected `n` records.
pub async fn wait_projected_on(db: &Db, topic: &str, n: i64) {
    eventually(
        &format!("{n} records of {topic} projected"),
        Duration::from_secs(180),
        || async move { (applied_offsets(db, topic).await? >= n).then_some(()) },
    )
    .await;
}

/// The sum of a projection's next offsets over the partitions of `topic` (None until
/// the projector has created its tables).
pub async fn applied_offsets(db: &Db, topic: &str) -> Option<i64> {
    db.client()
        .await
        .query_one(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM projection_offsets WHERE topic = $1",
            &[&topic],
        )
        .await
        .ok()
        .map(|r| r.get(0))
}

/// CloudEvents binary-mode headers for a hand-made event.
pub fn ce_headers(ce_type: &str, subject: &str, ce_id: &str) -> Vec<(String, String)> {
    vec![
        ("ce_specversion".into(), "1.0".into()),
        ("ce_id".into(), ce_id.into()),
        ("ce_source".into(), "test://outside-producer".into()),
        ("ce_type".into(), ce_type.into()),
        ("ce_time".into(), chrono::Utc::now().to_rfc3339()),
        ("ce_subject".into(), subject.into()),
        ("content-type".into(), "application/json".into()),
    ]
}

/// `tasklog scheduler` with extra arguments.
pub fn start_scheduler(broker: &Broker, db: &Db, args: &[&str]) -> Proc {
    let mut all = vec!["scheduler"];
    all.extend_from_slice(args);
    let child = role(broker, db, &all).spawn().expect("spawn scheduler");
    Proc {
        child,
        name: "scheduler",
    }
}

/// Environment variable that marks the processes a test's workers started.
const TEST_MARKER: &str = "TASKLOG_TEST_RUN";

/// SIGKILLs every process carrying `TASKLOG_TEST_RUN=<marker>` in its environment:
/// attempts orphaned when a test SIGKILLs (or drops) their worker would otherwise
/// outlive the test and hold its ports.
fn kill_marked(marker: &str) {
    let needle = format!("{TEST_MARKER}={marker}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
        {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Sends `signal` (`-9`, `-TERM`, ...) to process `pid` with kill(1); asserts it went.
pub fn signal(pid: u64, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// A stack that runs tasks: API, projector, one scheduler, and workers added by tests.
/// Fields drop in order: workers and the scheduler stop before the stack.
pub struct Cluster {
    pub workers: Vec<(String, Proc)>,
    pub schedulers: Vec<Proc>,
    pub stack: Stack,
    /// The workers' state directory (attempt ledgers), this test's own.
    pub state_dir: tempfile::TempDir,
}

impl Cluster {
    /// A stack and one scheduler started with `scheduler_args`.
    pub async fn start(scheduler_args: &[&str]) -> Cluster {
        Cluster::start_on(Stack::start().await, scheduler_args)
    }

    /// A cluster on the given stack.
    pub fn start_on(stack: Stack, scheduler_args: &[&str]) -> Cluster {
        let scheduler = start_scheduler(&stack.broker, &stack.db, scheduler_args);
        Cluster {
            workers: Vec::new(),
            schedulers: vec![scheduler],
            stack,
            state_dir: tempfile::tempdir().expect("state dir"),
        }
    }

    /// The command line of a worker named `name` (heartbeat every 500 ms).
    pub fn worker_command(&self, name: &str, args: &[&str]) -> Command {
        let mut all = vec![
            "worker",
            "--name",
            name,
            "--api",
            &self.stack.url,
            "--heartbeat",
            "500ms",
        ];
        let state_dir = self.state_dir.path().to_str().expect("UTF-8 temp dir");
        all.extend_from_slice(&["--state-dir", state_dir]);
        all.extend_from_slice(args);
        let mut c = role(&self.stack.broker, &self.stack.db, &all);
        c.env("TASKLOG_TOKEN", &self.stack.token);
        c
    }

    /// Starts a worker and waits until the projection lists it as active.
    pub async fn add_worker(&mut self, name: &str, args: &[&str]) {
        let child = self
            .worker_command(name, args)
            // Inherited by every process the worker starts, so the test can find them.
            .env(TEST_MARKER, &self.stack.broker.prefix)
            .spawn()
            .expect("spawn worker");
        self.workers.push((
            name.to_string(),
            Proc {
                child,
                name: "worker",
            },
        ));
        self.wait_worker(name, "active").await;
    }

    /// The worker process named `name`.
    pub fn worker(&mut self, name: &str) -> &mut Proc {
        &mut self
            .workers
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("no such worker")
            .1
    }

    /// Waits until worker `name` is in `state`; returns its view.
    pub async fn wait_worker(&self, name: &str, state: &str) -> Value {
        eventually(
            &format!("worker {name} {state}"),
            Duration::from_secs(60),
            || async move {
                let (status, w) = self.stack.get(&format!("/v1/workers/{name}")).await;
                (status == 200 && w["state"] == state).then_some(w)
            },
        )
        .await
    }

    /// Submits a spec; returns the task id.
    pub async fn submit(&self, spec: Value) -> String {
        let (status, body) = self.stack.post("/v1/tasks", &spec).await;
        assert_eq!(status, 202, "submit {spec}: {body}");
        body["id"].as_str().expect("id").to_string()
    }

    /// Waits until the task satisfies `done`; returns it.
    pub async fn wait_task(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let done = &done;
        eventually(&format!("task {id}: {what}"), timeout, || async move {
            let (status, t) = self.stack.get(&format!("/v1/tasks/{id}")).await;
            (status == 200 && done(&t)).then_some(t)
        })
        .await
    }

    /// Waits until the task is in `state`.
    pub async fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        self.wait_task(id, state, timeout, |t| t["state"] == state)
            .await
    }

    /// The task's event types, in order.
    pub async fn event_types(&self, id: &str) -> Vec<String> {
        let (_, body) = self.stack.get(&format!("/v1/tasks/{id}/events")).await;
        body["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter_map(|e| e["type"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, worker) in &mut self.workers {
            worker.kill();
        }
        kill_marked(&self.stack.broker.prefix);
    }
}

/// A shell command that waits until `gate` exists (a test opens it to let a task end).
pub fn gated(gate: &std::path::Path, then: &str) -> String {
    format!(
        "while [ ! -e '{}' ]; do sleep 0.02; done; {then}",
        gate.display()
    )
}

/// RFC 3339 time of a JSON field as microseconds since the epoch.
pub fn micros(v: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .expect("RFC 3339")
        .timestamp_micros()
}

/// Produces one CloudEvent to the events topic with kcat, exactly as an outside
/// producer would (binary mode, key = task id, murmur2 partitioner).
pub fn kcat_event(
    broker: &Broker,
    task_id: &str,
    ce_id: &str,
    ce_type: &str,
    source: &str,
    value: &str,
) {
    let mut child = Command::new("kcat")
        .args([
            "-P",
            "-b",
            &broker.addr,
            "-t",
            &broker.events_topic(),
            "-k",
            task_id,
        ])
        .args(["-X", "partitioner=murmur2_random"])
        .args(["-H", "ce_specversion=1.0", "-H", &format!("ce_id={ce_id}")])
        .args([
            "-H",
            &format!("ce_source={source}"),
            "-H",
            &format!("ce_type={ce_type}"),
        ])
        .args([
            "-H",
            &format!("ce_time={}", chrono::Utc::now().to_rfc3339()),
        ])
        .args([
            "-H",
            &format!("ce_subject={task_id}"),
            "-H",
            "content-type=application/json",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kcat is installed (scripts/test installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{value}\n").as_bytes())
        .expect("write to kcat");
    assert!(child.wait().expect("kcat").success(), "kcat failed");
}

/// What one submission of [`Submitters`] got back.
#[derive(Debug)]
pub struct Outcome {
    /// The task's name (`<prefix>-<i>`).
    pub name: String,
    /// HTTP status.
    pub status: u16,
    /// The answer's body.
    pub body: Value,
    /// How long the answer took.
    pub took: Duration,
    /// When it came.
    pub at: Instant,
}

/// `total` single submissions (`{"name": "<prefix>-<i>", "shell": "true"}`) by
/// `concurrency` loops, each waiting for its answer before the next; the counters show
/// how far they are while they run.
pub struct Submitters {
    /// Answers 202 so far.
    pub acknowledged: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Other answers so far.
    pub refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    loops: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Submitters {
    /// Starts the loops against the API at `url`.
    pub fn start(url: &str, prefix: &str, total: usize, concurrency: usize) -> Submitters {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let http = reqwest::Client::new();
        let next = Arc::new(AtomicUsize::new(0));
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let loops = (0..concurrency)
            .map(|_| {
                let (http, url, prefix) = (http.clone(), url.to_string(), prefix.to_string());
                let (next, acknowledged, refused) =
                    (next.clone(), acknowledged.clone(), refused.clone());
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= total {
                            return outcomes;
                        }
                        let name = format!("{prefix}-{i}");
                        let started = Instant::now();
                        let r = http
                            .post(format!("{url}/v1/tasks"))
                            .json(&serde_json::json!({"name": name, "shell": "true"}))
                            .send()
                            .await
                            .expect("the API answers");
                        let status = r.status().as_u16();
                        let body = r.json::<Value>().await.unwrap_or(Value::Null);
                        let counter = if status == 202 {
                            &acknowledged
                        } else {
                            &refused
                        };
                        counter.fetch_add(1, Ordering::SeqCst);
                        outcomes.push(Outcome {
                            name,
                            status,
                            body,
                            took: started.elapsed(),
                            at: Instant::now(),
                        });
                    }
                })
            })
            .collect();
        Submitters {
            acknowledged,
            refused,
            loops,
        }
    }

    /// Waits until `n` submissions have been acknowledged.
    pub async fn wait_acknowledged(&self, n: usize, timeout: Duration) {
        let acknowledged = &self.acknowledged;
        eventually(
            &format!("{n} submissions acknowledged"),
            timeout,
            || async move {
                (acknowledged.load(std::sync::atomic::Ordering::SeqCst) >= n).then_some(())
            },
        )
        .await;
    }

    /// Waits for every loop to finish; every outcome.
    pub async fn finish(self) -> Vec<Outcome> {
        let mut all = Vec::new();
        for l in self.loops {
            all.extend(l.await.expect("submitter"));
        }
        all
    }
}

/// A Prometheus tool (`prometheus` or `promtool`) for the tests: `TASKLOG_TEST_PROMETHEUS`
/// (`scripts/test` sets it; for promtool, the `promtool` next to it) or else the one on
/// `PATH`. `None` only when `TASKLOG_TEST_PROMETHEUS=skip` says to skip (the test says it
/// skipped); a tool that cannot be found fails the test.
pub fn prometheus_tool(name: &str) -> Option<std::path::PathBuf> {
    const VAR: &str = "TASKLOG_TEST_PROMETHEUS";
    let configured = std::env::var_os(VAR);
    if configured.as_deref() == Some(std::ffi::OsStr::new("skip")) {
        eprintln!("SKIPPED: {VAR}=skip (the tests that need {name} do not run)");
        return None;
    }
    let found = match &configured {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            if name == "prometheus" {
                Some(path)
            } else {
                path.parent().map(|dir| dir.join(name))
            }
        }
        None => std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        }),
    };
    match found {
        Some(path) if path.is_file() => Some(path),
        _ => panic!(
            "{name} not found ({VAR}={configured:?}, else PATH): scripts/test installs Debian's \
             prometheus package (which has promtool); or point {VAR} at a prometheus binary, \
             or set {VAR}=skip to skip the tests that need it"
        ),
    }
}

/// A Prometheus server of one test's own: a temp dir for its configuration and data, a
/// free loopback port, scrape and rule evaluation every second. Killed on drop.
pub struct Prometheus {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    http: reqwest::Client,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `bin` scraping `targets` (`host:port`, `/metrics`) as job `tasklog`, with
    /// the rule files `rules`; waits until it is ready.
    pub async fn start(
        bin: &std::path::Path,
        targets: &[String],
        rules: &[std::path::PathBuf],
    ) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("tasklog-prometheus-")
            .tempdir()
            .expect("temp dir");
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": rules,
            "scrape_configs": [{
                "job_name": "tasklog",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": targets}],
            }],
        });
        // JSON is YAML.
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config.to_string()).expect("write prometheus.yml");
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _proc: Proc {
                child,
                name: "prometheus",
            },
            _dir: dir,
        };
        let ready = format!("{}/-/ready", prometheus.url);
        let http = &prometheus.http;
        eventually("Prometheus ready", Duration::from_secs(60), || {
            let r = http.get(&ready).send();
            async move { r.await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        prometheus
    }

    /// GETs `/api/v1/<path>` and returns its `data`, or the error Prometheus gave.
    pub async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let r = self
            .http
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = r.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"].clone())
    }

    /// The series an instant query returns now (an error for a query Prometheus refuses).
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", expr)]).await?;
        Ok(match data["resultType"].as_str() {
            Some("vector" | "matrix") => data["result"].as_array().cloned().unwrap_or_default(),
            // A scalar or string is one value.
            _ => vec![data["result"].clone()],
        })
    }

    /// Every alert that is pending or firing now.
    pub async fn alerts(&self) -> Vec<Value> {
        self.api("alerts", &[])
            .await
            .ok()
            .and_then(|d| d["alerts"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits until every scrape target answers (`up == 1`).
    pub async fn wait_targets_up(&self, n: usize) {
        eventually(
            &format!("Prometheus scraping all {n} targets"),
            Duration::from_secs(60),
            || async move {
                let up = self.query("up == 1").await.ok()?;
                (up.len() >= n).then_some(())
            },
        )
        .await;
    }
}

/// One span an [`OtlpReceiver`] received, flattened from OTLP/JSON.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the exporting process's resource.
    pub service: String,
    pub name: String,
    /// Hex, as OTLP/JSON encodes ids.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// OTLP span kind (1 internal, 2 server, 5 consumer, …).
    pub kind: i64,
    /// Attribute values, as their JSON (`{"stringValue": …}` unwrapped).
    pub attributes: std::collections::HashMap<String, Value>,
}

/// A small OTLP/HTTP receiver (JSON bodies, `POST /v1/traces`) on a free loopback port
/// that keeps every span it is sent; point roles at it with
/// `OTEL_EXPORTER_OTLP_ENDPOINT=`[`OtlpReceiver::endpoint`]. Stops on drop.
pub struct OtlpReceiver {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    server: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    /// Starts the receiver on the test's runtime.
    pub async fn start() -> OtlpReceiver {
        use axum::routing::post;
        let spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>> = Default::default();
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    match serde_json::from_slice::<Value>(&body) {
                        Ok(request) => {
                            let received = flatten_otlp(&request);
                            kept.lock().expect("spans").extend(received);
                            (
                                axum::http::StatusCode::OK,
                                [("content-type", "application/json")],
                                "{}",
                            )
                        }
                        Err(_) => (
                            axum::http::StatusCode::BAD_REQUEST,
                            [("content-type", "application/json")],
                            "{}",
                        ),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind OTLP receiver");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        OtlpReceiver {
            endpoint,
            spans,
            server,
        }
    }

    /// The environment a role needs to export to this receiver, promptly.
    pub fn role_env(&self) -> Vec<(String, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), self.endpoint.clone()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ]
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("spans").clone()
    }

    /// Waits until the spans of `trace_id` satisfy `done`; returns them.
    pub async fn wait_trace(
        &self,
        trace_id: &str,
        what: &str,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let done = &done;
        eventually(what, Duration::from_secs(60), || async move {
            let spans: Vec<ReceivedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            done(&spans).then_some(spans)
        })
        .await
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The spans of an OTLP/JSON `ExportTraceServiceRequest`.
fn flatten_otlp(request: &Value) -> Vec<ReceivedSpan> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let unwrap_value = |v: &Value| -> Value {
        v.as_object()
            .and_then(|o| o.values().next().cloned())
            .unwrap_or(Value::Null)
    };
    let mut out = Vec::new();
    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
        let service = resource["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| unwrap_value(&a["value"]))
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    name: text(&span["name"]),
                    trace_id: text(&span["traceId"]),
                    span_id: text(&span["spanId"]),
                    parent_span_id: text(&span["parentSpanId"]),
                    kind: span["kind"].as_i64().unwrap_or(0),
                    attributes: span["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| (text(&a["key"]), unwrap_value(&a["value"])))
                        .collect(),
                });
            }
        }
    }
    out
}

/// A minimal Server-Sent Events client: GETs `url` (with `Last-Event-ID` when given)
/// and returns its (id, event, data) triples, until `stop` says so or the stream ends.
/// Fails the test when the answer is not 200 or the stream stalls for a minute.
pub async fn sse_events(
    http: &reqwest::Client,
    url: &str,
    last_event_id: Option<&str>,
    stop: impl Fn(&[(String, String, String)]) -> bool,
) -> Vec<(String, String, String)> {
    sse_read(sse_open(http, url, last_event_id).await, stop).await
}

/// Opens an event stream (`sse_events` without reading it yet): fails the test unless
/// it answers 200.
pub async fn sse_open(
    http: &reqwest::Client,
    url: &str,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut req = http.get(url).header("accept", "text/event-stream");
    if let Some(last) = last_event_id {
        req = req.header("last-event-id", last);
    }
    let response = req.send().await.expect("GET");
    assert_eq!(response.status(), 200, "{url}");
    response
}

/// Reads an opened event stream's (id, event, data) triples, until `stop` says so or
/// the stream ends; fails the test should it stall for a minute.
pub async fn sse_read(
    mut response: reqwest::Response,
    stop: impl Fn(&[(String, String, String)]) -> bool,
) -> Vec<(String, String, String)> {
    let mut buffer = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), response.chunk())
        .await
        .expect("SSE stalled")
        .expect("SSE body")
    {
        buffer.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_string();
                }
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                }
                if let Some(v) = line.strip_prefix("data:") {
                    data = v.trim().to_string();
                }
            }
            if !event.is_empty() {
                events.push((id, event, data));
                if stop(&events) {
                    return events;
                }
            }
        }
    }
    events
}

/// Threads of process `pid` now (Linux `/proc`).
pub fn threads_of(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no thread count for process {pid}"))
}

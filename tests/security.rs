//! Credentials, end to end: tasklog talking to Apache Kafka only through SCRAM-SHA-512
//! listeners (SASL_SSL with the broker's certificate checked, and SASL_PLAINTEXT) with the
//! `TASKLOG_KAFKA_*` settings, and to Postgres over TLS as the URL's `sslmode` says.
//!
//! The SCRAM listeners: those of the shared test broker when `scripts/test` started it with
//! them (`TASKLOG_TEST_KAFKA_SCRAM_BROKERS`, `TASKLOG_TEST_KAFKA_SASL_SSL_BROKERS`,
//! `TASKLOG_TEST_KAFKA_SCRAM_USER`, `TASKLOG_TEST_KAFKA_SCRAM_PASSWORD_FILE`,
//! `TASKLOG_TEST_KAFKA_CA`), or else a broker of this test's own (`scripts/kafka run
//! --scram-port --tls-port`). Never skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Db, Proc, bin, eventually, finish, free_port, kafka_script};
use serde_json::{Value, json};

/// A broker with SCRAM-SHA-512 listeners, and the credentials of its user.
struct ScramKafka {
    /// The PLAINTEXT listener (for cleaning up topics only: tasklog never uses it here).
    plaintext: String,
    /// The SASL_PLAINTEXT listener.
    sasl_plaintext: String,
    /// The SASL_SSL listener.
    sasl_ssl: String,
    /// The CA that signed the SASL_SSL listener's certificate.
    ca: PathBuf,
    user: String,
    password: String,
    /// A broker of this test's own (None: the shared one of `scripts/test`).
    _own: Option<(Proc, tempfile::TempDir)>,
}

impl ScramKafka {
    /// The shared broker's SCRAM listeners, or a broker of this test's own.
    fn get() -> ScramKafka {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let (
            Some(plaintext),
            Some(sasl_plaintext),
            Some(sasl_ssl),
            Some(user),
            Some(file),
            Some(ca),
        ) = (
            var("TASKLOG_TEST_KAFKA_BROKERS"),
            var("TASKLOG_TEST_KAFKA_SCRAM_BROKERS"),
            var("TASKLOG_TEST_KAFKA_SASL_SSL_BROKERS"),
            var("TASKLOG_TEST_KAFKA_SCRAM_USER"),
            var("TASKLOG_TEST_KAFKA_SCRAM_PASSWORD_FILE"),
            var("TASKLOG_TEST_KAFKA_CA"),
        ) {
            return ScramKafka {
                plaintext,
                sasl_plaintext,
                sasl_ssl,
                ca: ca.into(),
                user,
                password: first_line(Path::new(&file)),
                _own: None,
            };
        }
        ScramKafka::own()
    }

    /// A single-node broker of this test's own with both SCRAM listeners.
    fn own() -> ScramKafka {
        let dir = tempfile::tempdir().expect("kafka data dir");
        let [port, controller, scram, tls] = [(); 4].map(|_| free_port());
        let password_file = dir.path().join("scram-password");
        std::fs::write(&password_file, format!("own-{}\n", uuid::Uuid::new_v4())).expect("write");
        let child = Command::new(kafka_script())
            .arg("run")
            .arg("--data-dir")
            .arg(dir.path().join("kafka"))
            .args(["--port", &port.to_string()])
            .args(["--controller-port", &controller.to_string()])
            .args(["--scram-port", &scram.to_string()])
            .args(["--tls-port", &tls.to_string()])
            .args(["--scram-user", "tasklog-test"])
            .arg("--scram-password-file")
            .arg(&password_file)
            .args(["--heap", "384m"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn scripts/kafka run");
        let mut proc = Proc::wrap(child, "kafka");
        let deadline = Instant::now() + Duration::from_secs(120);
        for p in [port, scram, tls] {
            while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
                assert!(proc.running(), "the SCRAM broker exited during start-up");
                assert!(
                    Instant::now() < deadline,
                    "the SCRAM broker is not up in 120 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        ScramKafka {
            plaintext: format!("127.0.0.1:{port}"),
            sasl_plaintext: format!("127.0.0.1:{scram}"),
            sasl_ssl: format!("127.0.0.1:{tls}"),
            ca: dir.path().join("kafka/tls/ca.pem"),
            user: "tasklog-test".into(),
            password: first_line(&password_file),
            _own: Some((proc, dir)),
        }
    }

    /// The `TASKLOG_KAFKA_*` settings of SCRAM-SHA-512 over TLS, the CA checked.
    fn sasl_ssl_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TASKLOG_KAFKA_BROKERS", self.sasl_ssl.clone()),
            ("TASKLOG_KAFKA_SECURITY_PROTOCOL", "SASL_SSL".into()),
            ("TASKLOG_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512".into()),
            ("TASKLOG_KAFKA_SASL_USERNAME", self.user.clone()),
            ("TASKLOG_KAFKA_SASL_PASSWORD", self.password.clone()),
            (
                "TASKLOG_KAFKA_SSL_CA_LOCATION",
                self.ca.to_str().expect("UTF-8 path").into(),
            ),
        ]
    }

    /// The `TASKLOG_KAFKA_*` settings of SCRAM-SHA-512 without TLS, with `password`.
    fn sasl_plaintext_env(&self, password: &str) -> Vec<(&'static str, String)> {
        vec![
            ("TASKLOG_KAFKA_BROKERS", self.sasl_plaintext.clone()),
            ("TASKLOG_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT".into()),
            ("TASKLOG_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512".into()),
            ("TASKLOG_KAFKA_SASL_USERNAME", self.user.clone()),
            ("TASKLOG_KAFKA_SASL_PASSWORD", password.into()),
        ]
    }
}

fn first_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read the SCRAM password file {}: {e}", path.display()));
    let line = text.lines().next().unwrap_or("").to_string();
    assert!(!line.is_empty(), "{} is empty", path.display());
    line
}

/// A tasklog command with no Kafka or Postgres settings from the test's environment:
/// only those of `env`.
fn tasklog(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(bin());
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKLOG_") {
            c.env_remove(k);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.env("RUST_LOG", "info,rdkafka=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = http.get(url).send().await.expect("GET");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Whether `text` contains the password (whole, or its first 8 characters).
fn leaks(text: &str, password: &str) -> bool {
    text.contains(password) || text.contains(&password[..8.min(password.len())])
}

#[tokio::test(flavor = "multi_thread")]
async fn tasklog_runs_a_task_through_scram_only_and_a_wrong_password_stops_it_clearly() {
    let kafka = ScramKafka::get();
    let db = Db::create().await;
    let prefix = format!("t_{}", uuid::Uuid::new_v4().simple());
    let state_dir = tempfile::tempdir().expect("state dir");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");

    // (a) Everything — API, projector, scheduler, worker — in `tasklog up`, which reaches
    // Kafka only through the SASL_SSL listener and Postgres only with sslmode=require.
    let mut env = kafka.sasl_ssl_env();
    env.push(("TASKLOG_TOPIC_PREFIX", prefix.clone()));
    env.push((
        "TASKLOG_DATABASE_URL",
        format!("{}?sslmode=require", db.url),
    ));
    let log_path = state_dir.path().join("up.stderr");
    let mut up = tasklog(
        &[
            "up",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--name",
            "scram-worker",
            "--state-dir",
            state_dir.path().to_str().expect("UTF-8"),
            "--heartbeat",
            "500ms",
        ],
        &env,
    );
    up.stdout(std::fs::File::create(state_dir.path().join("up.stdout")).expect("file"))
        .stderr(std::fs::File::create(&log_path).expect("file"));
    let mut up = Proc::wrap(up.spawn().expect("spawn tasklog up"), "up");
    let http = reqwest::Client::new();
    let ready = format!("{url}/readyz");
    eventually("tasklog up to be ready", Duration::from_secs(60), || {
        let (http, ready) = (&http, &ready);
        async move {
            let r = http.get(ready).send().await.ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await;
    // Its admin token, made on this first start.
    let http = common::client_with_token(&common::up_token(state_dir.path()));

    let r = http
        .post(format!("{url}/v1/tasks"))
        .json(&json!({"name": "through-scram", "shell": "echo hello-over-scram"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let task = eventually("the task to succeed", Duration::from_secs(60), || {
        let (http, task_url) = (&http, format!("{url}/v1/tasks/{id}"));
        async move {
            let (status, t) = get(http, &task_url).await;
            (status == 200 && t["state"] == "succeeded").then_some(t)
        }
    })
    .await;
    assert_eq!(task["id"], id.as_str(), "{task}");
    // Its log line went to Kafka and comes back from it, over SCRAM.
    let (status, logs) = get(&http, &format!("{url}/v1/tasks/{id}/logs")).await;
    assert_eq!(status, 200, "{logs}");
    let lines: Vec<&str> = logs["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .filter_map(|l| l["text"].as_str())
        .collect();
    assert!(lines.contains(&"hello-over-scram"), "{logs}");

    // Every connection tasklog holds to its database is encrypted.
    let (tls, plain): (i64, i64) = {
        let row = db
            .client()
            .await
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("pg_stat_ssl");
        (row.get(0), row.get(1))
    };
    assert!(tls > 0, "no TLS connection from tasklog up to Postgres");
    assert_eq!(
        plain, 0,
        "tasklog up holds {plain} unencrypted connection(s)"
    );

    // A second API server, on the SASL_PLAINTEXT listener, finds the same task (its
    // read-your-writes check asks Kafka where the partition ends) and reads its log line
    // from Kafka.
    let mut plain_env = kafka.sasl_plaintext_env(&kafka.password);
    plain_env.push(("TASKLOG_TOPIC_PREFIX", prefix.clone()));
    plain_env.push((
        "TASKLOG_DATABASE_URL",
        format!("{}?sslmode=require", db.url),
    ));
    let plain_port = free_port();
    let plain_url = format!("http://127.0.0.1:{plain_port}");
    let plain_log = state_dir.path().join("server.stderr");
    let mut server = tasklog(
        &["server", "--http-addr", &format!("127.0.0.1:{plain_port}")],
        &plain_env,
    );
    server
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&plain_log).expect("file"));
    let mut server = Proc::wrap(server.spawn().expect("spawn tasklog server"), "server");
    let task_again = eventually(
        "the task through the SASL_PLAINTEXT server",
        Duration::from_secs(60),
        || {
            let (http, task_url) = (&http, format!("{plain_url}/v1/tasks/{id}"));
            async move {
                // Connection refused until the server is up.
                let r = http.get(&task_url).send().await.ok()?;
                (r.status() == 200).then_some(r.json::<Value>().await.ok()?)
            }
        },
    )
    .await;
    assert_eq!(task_again["state"], "succeeded", "{task_again}");
    let (status, logs) = get(&http, &format!("{plain_url}/v1/tasks/{id}/logs")).await;
    assert_eq!(status, 200, "{logs}");
    assert!(logs.to_string().contains("hello-over-scram"), "{logs}");
    server.kill();
    let plain_logged = std::fs::read_to_string(&plain_log).expect("read log");
    assert!(
        plain_logged.contains("SASL_PLAINTEXT, SCRAM-SHA-512 as user"),
        "{plain_logged}"
    );
    assert!(!leaks(&plain_logged, &kafka.password), "{plain_logged}");

    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(!leaks(&metrics, &kafka.password));
    up.kill();
    let logged = std::fs::read_to_string(&log_path).expect("read log")
        + &std::fs::read_to_string(state_dir.path().join("up.stdout")).expect("read stdout");
    assert!(
        logged.contains("SASL_SSL, SCRAM-SHA-512 as user"),
        "the settings are not logged: {logged}"
    );
    assert!(
        !leaks(&logged, &kafka.password),
        "the password is in the log"
    );

    // (b) A wrong password: `tasklog server` ends, promptly and non-zero, saying it could
    // not authenticate, and shows neither password.
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    let mut env = kafka.sasl_plaintext_env(&wrong);
    env.push(("TASKLOG_TOPIC_PREFIX", prefix.clone()));
    env.push(("TASKLOG_DATABASE_URL", db.url.clone()));
    let started = Instant::now();
    let out = finish(&mut tasklog(
        &[
            "server",
            "--http-addr",
            &format!("127.0.0.1:{}", free_port()),
        ],
        &env,
    ));
    let took = started.elapsed();
    let printed =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(took < Duration::from_secs(30), "took {took:?}: {printed}");
    assert!(
        printed.contains("Authentication failed") || printed.contains("authentication"),
        "no word of authentication: {printed}"
    );
    assert!(printed.contains("error: "), "{printed}");
    assert!(
        !leaks(&printed, &wrong),
        "the wrong password is shown: {printed}"
    );
    assert!(!leaks(&printed, &kafka.password), "{printed}");

    // Clean up the topics (through the PLAINTEXT listener, as the harness does).
    let topics: Vec<String> = tasklog::kafka::Topics::with_prefix(&prefix)
        .all()
        .into_iter()
        .map(|t| t.name)
        .collect();
    let _ = tasklog::kafka::delete_topics(&kafka.plaintext, &topics).await;
}

#[test]
fn bad_kafka_security_settings_stop_tasklog_at_start_naming_the_variable() {
    let secret = format!("never-shown-{}", uuid::Uuid::new_v4().simple());
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("TASKLOG_KAFKA_SECURITY_PROTOCOL", "SASL_TLS")],
            "TASKLOG_KAFKA_SECURITY_PROTOCOL=\"SASL_TLS\" is not supported",
        ),
        (
            &[
                ("TASKLOG_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
                ("TASKLOG_KAFKA_SASL_MECHANISM", "GSSAPI"),
                ("TASKLOG_KAFKA_SASL_USERNAME", "u"),
            ],
            "TASKLOG_KAFKA_SASL_MECHANISM=\"GSSAPI\" is not supported",
        ),
        (
            &[
                ("TASKLOG_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
                ("TASKLOG_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
                ("TASKLOG_KAFKA_SASL_USERNAME", "u"),
            ],
            "TASKLOG_KAFKA_SASL_PASSWORD must be set",
        ),
        (
            &[
                ("TASKLOG_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
                ("TASKLOG_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
                ("TASKLOG_KAFKA_SASL_USERNAME", "u"),
                ("TASKLOG_KAFKA_SSL_CA_LOCATION", "/nonexistent/ca.pem"),
            ],
            "TASKLOG_KAFKA_SSL_CA_LOCATION names /nonexistent/ca.pem, which cannot be read",
        ),
    ];
    for (vars, expected) in cases {
        let mut env: Vec<(&str, String)> = vars.iter().map(|(k, v)| (*k, v.to_string())).collect();
        if expected.contains("CA_LOCATION") {
            env.push(("TASKLOG_KAFKA_SASL_PASSWORD", secret.clone()));
        }
        let started = Instant::now();
        let out = finish(&mut tasklog(
            &["server", "--http-addr", "127.0.0.1:0"],
            &env,
        ));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{vars:?}: {stderr}");
        assert!(
            stderr.contains(&format!("error: Kafka security settings: {expected}")),
            "{vars:?}: {stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{vars:?}");
        assert!(!stderr.contains(&secret), "{stderr}");
    }
}

/// The server's certificate (Debian's snakeoil), which a connection can be verified against.
async fn server_certificate(db: &Db) -> PathBuf {
    let row = db
        .client()
        .await
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .expect("SHOW ssl_cert_file");
    let path = PathBuf::from(row.get::<_, String>(0));
    let path = if path.is_relative() {
        let data: String = db
            .client()
            .await
            .query_one("SHOW data_directory", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or_default();
        Path::new(&data).join(path)
    } else {
        path
    };
    assert!(
        std::fs::File::open(&path).is_ok(),
        "cannot read the server's certificate {}",
        path.display()
    );
    path
}

async fn ssl_of(url: &str) -> Result<bool, String> {
    let (client, connection) = tasklog::store::tls::connect(url)
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_connections_use_tls_as_the_url_says() {
    let db = Db::create().await;
    let ssl: String = db
        .client()
        .await
        .query_one("SHOW ssl", &[])
        .await
        .expect("SHOW ssl")
        .get(0);
    assert_eq!(
        ssl, "on",
        "the test Postgres has ssl=off (Debian's PostgreSQL has it on, with the snakeoil certificate)"
    );
    let url = &db.url;
    assert_eq!(
        ssl_of(url).await,
        Ok(false),
        "no sslmode: no TLS, as before"
    );
    assert_eq!(ssl_of(&format!("{url}?sslmode=disable")).await, Ok(false));
    assert_eq!(ssl_of(&format!("{url}?sslmode=prefer")).await, Ok(true));
    assert_eq!(ssl_of(&format!("{url}?sslmode=require")).await, Ok(true));

    // Verified against the server's own (self-signed) certificate.
    let cert = server_certificate(&db).await;
    let cert = cert.to_str().expect("UTF-8");
    assert_eq!(
        ssl_of(&format!("{url}?sslmode=verify-ca&sslrootcert={cert}")).await,
        Ok(true)
    );
    // ... and refused against CAs that did not sign it.
    let public_cas = "/etc/ssl/certs/ca-certificates.crt";
    if Path::new(public_cas).exists() {
        let refused = ssl_of(&format!("{url}?sslmode=verify-ca&sslrootcert={public_cas}")).await;
        assert!(refused.is_err(), "{refused:?}");
    }
    // verify-full checks the name: the certificate names no IP address.
    let refused = ssl_of(&format!("{url}?sslmode=verify-full&sslrootcert={cert}")).await;
    assert!(refused.is_err(), "{refused:?}");
    let pem = std::fs::read(cert).expect("read certificate");
    let names: Vec<String> = openssl::x509::X509::from_pem(&pem)
        .expect("PEM")
        .subject_alt_names()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.dnsname().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if names.iter().any(|n| n == "localhost") {
        let by_name = url.replace("@127.0.0.1:", "@localhost:");
        assert_eq!(
            ssl_of(&format!("{by_name}?sslmode=verify-full&sslrootcert={cert}")).await,
            Ok(true)
        );
    }

    // The pool (Store::connect) and database creation (ensure_database) too.
    let tls_url = format!("{url}?sslmode=require");
    tasklog::store::ensure_database(&tls_url)
        .await
        .expect("ensure_database over TLS");
    let store = tasklog::store::Store::connect(&tls_url, 2).expect("connect");
    store.migrate().await.expect("migrate over TLS");
    let pooled: bool = store
        .client()
        .await
        .expect("pooled connection")
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert!(pooled, "the pool's connection is not encrypted");
}

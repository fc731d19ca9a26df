//! schemathesis against a live server (API and projector on a real broker and Postgres),
//! over every operation of `GET /v1/openapi.json`, with the description's links for
//! stateful sequences (submit, then read, cancel, page the logs, ...), with an admin
//! token. Every check is on
//! but those `tests/schemathesis.toml` turns off, with its reasons: no 5xx, every
//! response conforms to the description (status, content type, headers, schema), bad
//! input is refused, good input accepted.
//!
//! `scripts/test` installs schemathesis (pinned, in `target/schemathesis-venv`) and sets
//! `TASKLOG_SCHEMATHESIS` to its `st`; without it the test says so and passes.
//! `TASKLOG_SCHEMATHESIS_EXAMPLES` (default 50) and `TASKLOG_SCHEMATHESIS_SEED` tune the
//! run.

mod common;

use std::time::{Duration, Instant};

use common::{Broker, Db, create_token, start_projector, start_server};

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing() {
    let Some(st) = std::env::var_os("TASKLOG_SCHEMATHESIS") else {
        eprintln!(
            "SKIPPED schemathesis_finds_nothing: TASKLOG_SCHEMATHESIS is not set \
             (scripts/test installs schemathesis and sets it)"
        );
        return;
    };
    let examples =
        std::env::var("TASKLOG_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "50".to_string());
    let seed = std::env::var("TASKLOG_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".to_string());
    let broker = Broker::start();
    let db = Db::create().await;
    // Long-polls of at most 1 s, so that generated `wait_ms` values keep the run short
    // (the served description says so).
    let _projector = start_projector(&broker, &db);
    let (_server, url) = start_server(
        &broker,
        &db,
        &[("TASKLOG_MAX_WAIT_MS", "1000"), ("TASKLOG_AUTH", "tokens")],
    )
    .await;
    // With an admin token, so every operation can succeed; schemathesis also checks
    // that each one refuses a request without it (`ignored_auth`).
    let token = create_token(&broker, &db, "fuzz-admin-7f3c9d", "admin", &[]);
    let work = tempfile::tempdir().expect("work dir");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let started = Instant::now();
    // Bounded: a schemathesis that never ends fails this test (and kills it on drop).
    let run = tokio::process::Command::new(&st)
        .args(["--config-file", config, "run"])
        .arg(format!("{url}/v1/openapi.json"))
        .args(["--max-examples", &examples, "--seed", &seed])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        // One worker: with two, schemathesis generates in two threads, and hypothesis
        // describes strategies with `ast.parse`, which CPython 3.11 does not make safe
        // across threads ("SystemError: AST constructor recursion depth mismatch", a
        // `FlakyFailure` of the coverage phase that failed a CI run).
        .args(["--workers", "1", "--request-timeout", "20"])
        .args(["--generation-database", "none", "--no-color"])
        .current_dir(work.path())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20 * 60), run)
        .await
        .expect("schemathesis did not end within 20 minutes")
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    eprintln!(
        "schemathesis ran {:.0?} ({examples} examples per operation, seed {seed})",
        started.elapsed()
    );
    assert!(
        output.status.success(),
        "schemathesis found problems (exit {:?}):\n{stdout}\n{stderr}",
        output.status.code()
    );
    // It did test every operation of the description but the description itself
    // (schemathesis leaves out the document it loaded; tests/api_http.rs reads it).
    let operations = tasklog::api::routes::all().len() - 1;
    assert!(
        stdout.contains(&format!("Tested: {operations}")),
        "expected all {operations} operations tested:\n{stdout}"
    );
}

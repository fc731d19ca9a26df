//! The broker goes away: the API answers 503 within the append timeout, acknowledges
//! nothing it did not append, and everything it acknowledged survives.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Broker, Db, eventually, start_projector, start_server};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn broker_down_gives_503_in_bounded_time_and_loses_nothing_acknowledged() {
    let broker = Broker::start();
    let db = Db::create().await;
    let (_server, url) = start_server(&broker, &db, &[("TASKLOG_APPEND_TIMEOUT_MS", "2000")]).await;
    let _projector = start_projector(&broker, &db);
    let http = reqwest::Client::new();
    let mut acknowledged = HashSet::new();
    let submit = |name: String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http
                .post(format!("{url}/v1/tasks"))
                .json(&json!({"name": name, "shell": "true"}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for i in 0..20 {
        let (status, body) = submit(format!("before-{i}")).await;
        assert_eq!(status, 202);
        acknowledged.insert(body["id"].as_str().unwrap().to_string());
    }

    // Cut the broker under a steady projector that has applied everything so far.
    let db_ref = &db;
    eventually(
        "the first tasks projected",
        Duration::from_secs(60),
        || async move { (db_ref.count("SELECT count(*) FROM tasks").await >= 20).then_some(()) },
    )
    .await;
    broker.set_reachable(false).await;
    let started = Instant::now();
    let outcomes = futures::future::join_all((0..5).map(|i| submit(format!("during-{i}")))).await;
    let elapsed = started.elapsed();
    for (status, body) in &outcomes {
        assert_eq!(*status, 503, "{body}");
        assert_eq!(body["error"]["code"], "broker_unavailable");
    }
    assert!(
        elapsed < Duration::from_secs(8),
        "503 took {elapsed:?} with a 2 s append timeout"
    );
    let r = http.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);

    broker.set_reachable(true).await;
    // The producer reconnects by itself.
    let (_, first_after) = eventually(
        "a submission to succeed after the broker returns",
        Duration::from_secs(60),
        || {
            let f = submit("after-first".into());
            async move {
                let (s, b) = f.await;
                (s == 202).then_some((s, b))
            }
        },
    )
    .await;
    acknowledged.insert(first_after["id"].as_str().unwrap().to_string());
    for i in 0..20 {
        let (status, body) = submit(format!("after-{i}")).await;
        assert_eq!(status, 202);
        acknowledged.insert(body["id"].as_str().unwrap().to_string());
    }

    let db_ref = &db;
    let ids: HashSet<String> = eventually(
        "all acknowledged tasks projected",
        Duration::from_secs(60),
        || async move {
            let rows = db_ref
                .client()
                .await
                .query("SELECT id::text FROM tasks", &[])
                .await
                .ok()?;
            let ids: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
            (ids.len() >= 41).then_some(ids)
        },
    )
    .await;
    assert!(
        acknowledged.is_subset(&ids),
        "an acknowledged task is missing"
    );
    // A 503'd task was never appended (it timed out in the producer's queue).
    let records = broker.read_all(&broker.events_topic());
    assert_eq!(
        records.len(),
        acknowledged.len(),
        "only acknowledged records are on the log"
    );
}

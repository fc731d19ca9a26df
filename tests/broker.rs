//! The broker crashes: SIGKILL the Apache Kafka JVM in the middle of 20,000 submissions
//! and start it again. Every task answered 202 is projected exactly once, requests during
//! the outage get 503 `broker_unavailable` within the append timeout, and nothing appears
//! on the log twice.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Broker, Db, Submitters, eventually, start_projector, start_server};

const SUBMISSIONS: usize = 20_000;
const SUBMITTERS: usize = 16;
const APPEND_TIMEOUT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread")]
async fn broker_sigkill_during_submissions_loses_nothing_acknowledged() {
    let mut broker = Broker::own(1);
    let db = Db::create().await;
    let timeout_ms = APPEND_TIMEOUT.as_millis().to_string();
    let (_server, url) =
        start_server(&broker, &db, &[("TASKLOG_APPEND_TIMEOUT_MS", &timeout_ms)]).await;
    let _projector = start_projector(&broker, &db);
    let http = reqwest::Client::new();

    let submitters = Submitters::start(&url, "crash", SUBMISSIONS, SUBMITTERS);

    // SIGKILL the broker a quarter of the way in, while every submitter is busy.
    submitters
        .wait_acknowledged(SUBMISSIONS / 4, Duration::from_secs(300))
        .await;
    broker.nodes[0].kill();
    let refused_ref = &submitters.refused;
    // Keep it down until every submitter has been refused at least once.
    eventually(
        "submissions refused while the broker is down",
        Duration::from_secs(120),
        || async move { (refused_ref.load(Ordering::SeqCst) >= SUBMITTERS).then_some(()) },
    )
    .await;
    let r = http.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503, "readyz while the broker is down");
    broker.nodes[0].restart();

    let outcomes = submitters.finish().await;
    assert_eq!(outcomes.len(), SUBMISSIONS);
    let mut accepted: HashMap<String, String> = HashMap::new();
    let mut unavailable = 0;
    for o in &outcomes {
        match o.status {
            202 => {
                let id = o.body["id"].as_str().expect("202 has an id").to_string();
                assert!(accepted.insert(id, o.name.clone()).is_none());
            }
            503 => {
                assert_eq!(o.body["error"]["code"], "broker_unavailable", "{}", o.body);
                assert!(
                    o.took < APPEND_TIMEOUT + Duration::from_secs(3),
                    "a 503 took {:?} with a {APPEND_TIMEOUT:?} append timeout",
                    o.took
                );
                unavailable += 1;
            }
            other => panic!("submission {} answered {other}: {}", o.name, o.body),
        }
    }
    assert!(unavailable >= SUBMITTERS, "{unavailable} refused");
    assert!(
        accepted.len() > SUBMISSIONS / 2,
        "only {} of {SUBMISSIONS} accepted: submissions did not resume after the restart",
        accepted.len()
    );

    // The log: no task twice, every acknowledged task on it. A refused request may have
    // reached the log (its outcome was unknown when the timeout struck), but once only.
    let records = broker.read_all(&broker.events_topic());
    let mut on_log: HashSet<String> = HashSet::new();
    for r in &records {
        let subject = r.header("ce_subject").expect("ce_subject").to_string();
        assert!(
            on_log.insert(subject.clone()),
            "{subject} is on the log twice"
        );
    }
    for id in accepted.keys() {
        assert!(
            on_log.contains(id),
            "acknowledged task {id} is not on the log"
        );
    }

    // The projection: every record applied exactly once.
    let db_ref = &db;
    let expected = records.len() as i64;
    eventually(
        "the projection to apply the whole log",
        Duration::from_secs(180),
        || async move {
            (db_ref.count("SELECT count(*) FROM task_events").await >= expected).then_some(())
        },
    )
    .await;
    assert_eq!(db.count("SELECT count(*) FROM task_events").await, expected);
    assert_eq!(db.count("SELECT count(*) FROM tasks").await, expected);
    let client = db.client().await;
    let rows = client
        .query("SELECT id::text FROM tasks", &[])
        .await
        .unwrap();
    let projected: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(projected, on_log, "the projection equals the log");
}

//! Postgres killed (SIGKILL, postmaster and every backend) and started again while
//! tasks pour in: submissions go on (they only need Kafka), the projector waits and
//! retries, and afterwards every acknowledged task is projected exactly once — nothing
//! lost, nothing dead-lettered for the outage.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Broker, Db, OwnPostgres, Submitters, start_projector, start_server};

const TASKS: usize = 3000;

#[tokio::test(flavor = "multi_thread")]
async fn postgres_killed_under_load_loses_nothing_and_dead_letters_nothing() {
    let mut pg = OwnPostgres::start();
    let broker = Broker::start();
    let db = Db::create_on(&pg.admin_url()).await;
    let (_server, url) = start_server(&broker, &db, &[]).await;
    let mut projector = start_projector(&broker, &db);

    let submitters = Submitters::start(&url, "outage", TASKS, 8);
    submitters
        .wait_acknowledged(TASKS / 4, Duration::from_secs(120))
        .await;
    pg.kill();
    // Submissions go on while Postgres is gone.
    let at_kill = submitters
        .acknowledged
        .load(std::sync::atomic::Ordering::SeqCst);
    submitters
        .wait_acknowledged(at_kill + TASKS / 4, Duration::from_secs(120))
        .await;
    assert!(projector.running(), "the projector waits out the outage");
    pg.restart();

    let outcomes = submitters.finish().await;
    let acknowledged: HashSet<String> = outcomes
        .iter()
        .filter(|o| o.status == 202)
        .map(|o| o.name.clone())
        .collect();
    assert_eq!(
        acknowledged.len(),
        TASKS,
        "every submission was acknowledged (they need only Kafka): {:?}",
        outcomes.iter().find(|o| o.status != 202).map(|o| &o.body)
    );

    let topic = broker.events_topic();
    let end: i64 = broker.all_watermarks(&topic).iter().map(|(_, h)| h).sum();
    assert_eq!(end, TASKS as i64);
    common::wait_projected_on(&db, &topic, end).await;
    assert!(projector.running(), "the projector survived the outage");

    let client = db.client().await;
    let rejected: Vec<(String, String, i32, i64)> = client
        .query(
            "SELECT reason, message, partition, \"offset\" FROM rejected_events",
            &[],
        )
        .await
        .expect("rejected events")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert!(
        rejected.is_empty(),
        "nothing rejected for the outage: {rejected:?}"
    );
    let names: HashSet<String> = client
        .query("SELECT name FROM tasks", &[])
        .await
        .expect("tasks")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<_> = acknowledged.difference(&names).take(5).collect();
    let extra: Vec<_> = names.difference(&acknowledged).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "every acknowledged task, and nothing else: {} projected of {} acknowledged; missing {missing:?}, extra {extra:?}",
        names.len(),
        acknowledged.len()
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_events").await,
        TASKS as i64,
        "each applied once"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM rejected_events").await,
        0,
        "nothing rejected for the outage"
    );
    assert!(
        broker.read_all(&broker.dlq_topic()).is_empty(),
        "nothing dead-lettered for the outage"
    );
    projector.kill();
}

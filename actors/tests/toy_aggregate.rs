//! A toy aggregate (a counter) added with only its domain file (`toy/counter.rs`) and one
//! hosted file (`toy/hosted.rs`), run through the generic bus on the embedded platform and
//! on a two-node cluster: nothing in the bus, the embedded registries or the cluster's wire
//! format names an aggregate.

mod toy {
    pub mod counter;
    pub mod hosted;
}

use actors::cluster::leases::LeaseTimings;
use actors::cluster::placement::partition_of;
use actors::cluster::{ClusterConfig, ClusterNode};
use actors::hosted::Hosted;
use actors::sled_journal::SledJournal;
use actors::{CommandBus, CommandError, Journal, LocalActors, Projections, SystemClock};
use domain::Rejection;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::nats::LocalNats;
use toy::counter::{Counter, CounterCommand, LIMIT};

async fn add(bus: &dyn CommandBus, key: &str, by: u64) -> Result<u64, CommandError> {
    bus.ask::<Counter>(key.to_owned(), CounterCommand::Add(by)).await
}

async fn get(bus: &dyn CommandBus, key: &str) -> u64 {
    bus.ask::<Counter>(key.to_owned(), CounterCommand::Get).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_runs_on_the_embedded_platform() {
    let dir = tempfile::tempdir().unwrap();
    let journal = SledJournal::open(dir.path()).unwrap();
    let actors = LocalActors::new(
        journal.clone(),
        Arc::new(SystemClock),
        Arc::new(Projections::default()),
        journal.clone(),
        100,
    )
    .unwrap();
    let bus: Arc<dyn CommandBus> = actors.clone();

    // Not hosted yet: a clear refusal, not a panic or a hang.
    let refused = add(&*bus, "a", 1).await.unwrap_err();
    assert!(
        matches!(&refused, CommandError::Unavailable(m) if m.contains("counter")),
        "{refused:?}"
    );

    actors.host::<Counter>();
    assert_eq!(add(&*bus, "a", 5).await.unwrap(), 5);
    assert_eq!(add(&*bus, "a", 7).await.unwrap(), 12);
    assert_eq!(add(&*bus, "b", 1).await.unwrap(), 1);
    // The domain's rejection reaches the caller as it is, and changes nothing.
    let over = add(&*bus, "a", LIMIT).await.unwrap_err();
    assert!(
        matches!(over, CommandError::Rejected(Rejection::FailedPrecondition(_))),
        "{over:?}"
    );
    assert_eq!(get(&*bus, "a").await, 12);
    // A fire-and-forget command to an actor that runs is queued ahead of what follows it.
    bus.tell::<Counter>("a".into(), CounterCommand::Add(3)).await.unwrap();
    assert_eq!(get(&*bus, "a").await, 15);
    // ... and one to an actor that does not run starts nothing and changes nothing.
    bus.tell::<Counter>("idle".into(), CounterCommand::Add(3))
        .await
        .unwrap();
    assert_eq!(actors.live::<Counter>(), 2);
    assert_eq!(get(&*bus, "idle").await, 0);

    // Stopped, the actors come back from their journal streams.
    let stopped = actors.stop_streams(|stream| stream.starts_with("counter/"));
    assert_eq!(stopped, 3);
    assert_eq!(get(&*bus, "a").await, 15);
    assert_eq!(get(&*bus, "b").await, 1);
    let events = journal.load_all(&Counter::stream(&"a".to_owned())).await.unwrap();
    assert_eq!(events.len(), 3, "three adds were journaled, nothing else");
}

async fn join(nats: &LocalNats, dir: &std::path::Path, name: &str) -> Arc<ClusterNode> {
    let config = ClusterConfig {
        nats_url: nats.url(),
        node: name.into(),
        partitions: 8,
        replicas: 1,
        timings: LeaseTimings {
            ttl: Duration::from_secs(3),
            renew: Duration::from_millis(300),
        },
        data_dir: dir.join(name),
        live_actors_max: 1_000,
    };
    let audit = SledJournal::open(&dir.join(format!("{name}-local"))).unwrap();
    let node = ClusterNode::join(&config, Arc::new(SystemClock), Arc::new(Projections::default()), audit)
        .await
        .unwrap();
    node.local().host::<Counter>();
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_runs_in_cluster_mode_across_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let nats = LocalNats::start(1, &dir.path().join("nats")).unwrap();
    let a = join(&nats, dir.path(), "node-a").await;
    let b = join(&nats, dir.path(), "node-b").await;
    // Wait until the partitions are shared, so some commands must travel between nodes.
    let until = Instant::now() + Duration::from_secs(30);
    while a.owned().is_empty() || b.owned().is_empty() || a.owned().len() + b.owned().len() != 8 {
        assert!(
            Instant::now() < until,
            "partitions not shared: a {:?}, b {:?}",
            a.owned(),
            b.owned()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
    let remote_from_a = keys
        .iter()
        .filter(|k| !a.owned().contains(&partition_of(&Counter::stream(k), 8)))
        .count();
    assert!(
        remote_from_a > 0 && remote_from_a < keys.len(),
        "{remote_from_a} of 16 keys live on node b"
    );

    let (bus_a, bus_b): (Arc<dyn CommandBus>, Arc<dyn CommandBus>) = (a.clone(), b.clone());
    for (i, key) in keys.iter().enumerate() {
        // Each key is written from both nodes and read from the other: whichever owns it
        // runs the command, the other sends it in the one envelope every kind shares.
        assert_eq!(add(&*bus_a, key, i as u64).await.unwrap(), i as u64);
        assert_eq!(add(&*bus_b, key, 100).await.unwrap(), i as u64 + 100);
        let over = add(&*bus_b, key, LIMIT).await.unwrap_err();
        assert!(
            matches!(over, CommandError::Rejected(Rejection::FailedPrecondition(_))),
            "{key}: {over:?}"
        );
        bus_a
            .tell::<Counter>(key.clone(), CounterCommand::Add(1))
            .await
            .unwrap();
        assert_eq!(get(&*bus_a, key).await, i as u64 + 101, "{key}");
        assert_eq!(get(&*bus_b, key).await, i as u64 + 101, "{key}");
    }
    a.leave().await;
    b.leave().await;
}

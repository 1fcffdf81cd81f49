//! The embedded platform when the journal's disk misbehaves, over real gRPC:
//! - in process, the write-ahead log on a simulated disk behind switches (`FaultyStorage`):
//!   the disk filling mid-burst (writes refused with RESOURCE_EXHAUSTED / STORAGE_FULL and a
//!   retry hint, reads served, health `writes` NOT_SERVING and readiness SERVING, writes
//!   resuming by themselves once space is back), and syncs stalling for seconds (answers
//!   only after the sync, or DEADLINE_EXCEEDED by the deadline, a bounded queue refusing at
//!   once); then a restart after a power cut finds every acknowledged order, no oversell;
//! - a real `dropline serve` on a small tmpfs that a filler file fills (root only: skipped
//!   with a message otherwise), then kill -9 and a restart;
//! - kill -9 of a `dropline serve` while it recovers its journal, several times over.

use actors::log::faulty::FaultyStorage;
use actors::log::sim::{CutMode, SimDisk};
use actors::sled_journal::JournalOptions;
use proto::checkout::v1::*;
use proto::operator::v1::GetDropRequest;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::disk::{fill, Tmpfs};
use testkit::*;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

fn reserve(drop_id: &str, buyer: usize) -> ReserveRequest {
    ReserveRequest {
        drop_id: drop_id.into(),
        sku_id: "sku".into(),
        buyer_id: format!("b{buyer}"),
        city: "Lisbon".into(),
        quantity: 1,
        ..Default::default()
    }
}

fn confirm(order_id: &str) -> ConfirmRequest {
    ConfirmRequest {
        order_id: order_id.into(),
        payment_reference: format!("pay-{order_id}"),
        amount: eur(2_500),
        fulfilment: Some(confirm_request::Fulfilment::Pickup(Pickup {})),
        discreet: false,
    }
}

async fn create_and_open(channel: &Channel, drop_id: &str, stock: u32) {
    let mut operator = operator_client(channel);
    operator
        .create_drop(drop_request(drop_id, &[("sku", stock)], 1, 3_600))
        .await
        .unwrap();
    operator
        .open_drop(proto::operator::v1::OpenDropRequest {
            drop_id: drop_id.into(),
        })
        .await
        .unwrap();
}

/// What a write gets from a full disk: RESOURCE_EXHAUSTED saying so, with `ErrorInfo`
/// STORAGE_FULL and a retry hint; or, for a call queued at an actor killed by its failed
/// write, UNAVAILABLE. Anything else fails the test.
fn assert_refused_for_space(status: &tonic::Status, what: &str) {
    match status.code() {
        Code::ResourceExhausted => {
            assert!(status.message().contains("disk is full"), "{what}: {status:?}");
            let details = status.get_error_details();
            assert_eq!(
                details.error_info().map(|i| i.reason.as_str()),
                Some("STORAGE_FULL"),
                "{what}: {status:?}"
            );
            assert!(details.retry_info().is_some(), "{what}: no retry hint: {status:?}");
        }
        Code::Unavailable => {}
        _ => panic!("{what}: a full disk answered {status:?}"),
    }
}

/// The status of health service `service` once it is `wanted`, within `within`.
async fn health_becomes(addr: std::net::SocketAddr, service: &str, wanted: ServingStatus, within: Duration) {
    let started = Instant::now();
    let server = format!("http://{addr}");
    loop {
        let endpoint = tonic::transport::Endpoint::from_shared(server.clone()).unwrap();
        let status = services::server::health_status(&server, endpoint, service, Duration::from_secs(2)).await;
        if matches!(&status, Ok(s) if *s == wanted) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "health {service:?} is {status:?}, not {wanted:?}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every acknowledged order is there with its acknowledged status, and the figures add
/// up: held + sold = the acknowledged holds and confirmations exactly (nothing refused came
/// back), available + held + sold = allocated.
async fn check_orders(channel: &Channel, drop_id: &str, held: &[String], confirmed: &[String], context: &str) {
    let mut checkout = storefront_client(channel).await;
    for (orders, status) in [(held, OrderStatus::Held), (confirmed, OrderStatus::Confirmed)] {
        for order_id in orders {
            let order = checkout
                .get_order(GetOrderRequest {
                    order_id: order_id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("{context}: {order_id}: {e:?}"))
                .into_inner();
            assert_eq!(order.status, status as i32, "{context}: {order_id}");
        }
    }
    let figures = operator_client(channel)
        .get_drop(GetDropRequest {
            drop_id: drop_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let sku = &figures.skus[0];
    assert_eq!(sku.available + sku.held + sku.sold, sku.allocated, "{context}: {sku:?}");
    assert_eq!(sku.sold as usize, confirmed.len(), "{context}: {sku:?}");
    assert_eq!(sku.held as usize, held.len(), "{context}: {sku:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_serves_reads_and_resumes_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimDisk::new();
    let storage = FaultyStorage::new(Arc::new(disk.clone()));
    let options = JournalOptions {
        segment_bytes: 64 * 1024,
        ..JournalOptions::default()
    };
    let mut server = TestServer::on_log_storage(dir.path(), Arc::new(storage.clone()), options)
        .await
        .unwrap();
    server.add_fixtures().await;
    create_and_open(&server.channel, "full", 5_000).await;
    let checkout = server.checkout();
    let mut held = Vec::new();
    let burst = |from: usize, to: usize| {
        let checkout = checkout.clone();
        futures::future::join_all((from..to).map(move |i| {
            let mut checkout = checkout.clone();
            async move { checkout.reserve(reserve("full", i)).await }
        }))
    };
    for reply in burst(0, 100).await {
        held.push(reply.unwrap().into_inner().order_id);
    }

    // The disk fills in the middle of a burst: its second group commit finds no space.
    storage.fill_after_writes(1);
    let during = burst(100, 400);
    let mut refused = 0;
    let before = held.len();
    for reply in during.await {
        match reply {
            Ok(reply) => held.push(reply.into_inner().order_id),
            Err(status) => {
                assert_refused_for_space(&status, "a reserve as the disk filled");
                refused += 1;
            }
        }
    }
    eprintln!(
        "disk full mid-burst: {} of 300 reserves acknowledged, {refused} refused",
        held.len() - before
    );
    assert!(storage.injected() > 0, "the burst never met the full disk");
    // Every write while it is full: refused, saying why and when to retry.
    for reply in burst(400, 420).await {
        let status = reply.expect_err("a reserve succeeded on a full disk");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_refused_for_space(&status, "a reserve on a full disk");
        refused += 1;
    }
    let confirm_refused = server.checkout().confirm(confirm(&held[0])).await.unwrap_err();
    assert_eq!(confirm_refused.code(), Code::ResourceExhausted, "{confirm_refused:?}");
    // Reads are served: the buyer's order, the operator's figures; readiness stays SERVING,
    // `writes` says NOT_SERVING.
    let order = server
        .checkout()
        .get_order(GetOrderRequest {
            order_id: held[1].clone(),
        })
        .await
        .expect("GetOrder on a full disk")
        .into_inner();
    assert_eq!(order.status, OrderStatus::Held as i32);
    let figures = server.drop_figures("full").await;
    assert_eq!(figures.skus[0].held as usize, held.len(), "{figures:?}");
    health_becomes(server.addr, "writes", ServingStatus::NotServing, Duration::from_secs(5)).await;
    health_becomes(server.addr, "", ServingStatus::Serving, Duration::from_secs(1)).await;
    assert_eq!(server.platform.journal.failure(), None);

    // Space comes back: writes resume by themselves, no restart.
    storage.free();
    let freed = Instant::now();
    let mut buyer = 1_000;
    loop {
        match server.checkout().reserve(reserve("full", buyer)).await {
            Ok(reply) => {
                held.push(reply.into_inner().order_id);
                break;
            }
            Err(status) => assert_refused_for_space(&status, "a reserve as space came back"),
        }
        assert!(freed.elapsed() < Duration::from_secs(10), "writes did not resume");
        buyer += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    health_becomes(server.addr, "writes", ServingStatus::Serving, Duration::from_secs(5)).await;
    let mut confirmed = Vec::new();
    for order_id in held.drain(..50) {
        server.checkout().confirm(confirm(&order_id)).await.unwrap();
        confirmed.push(order_id);
    }
    eprintln!(
        "disk full in process: {refused} writes refused, {} held and {} confirmed acknowledged, resumed {} ms after space came back",
        held.len(),
        confirmed.len(),
        freed.elapsed().as_millis()
    );
    check_orders(&server.channel, "full", &held, &confirmed, "before the restart").await;
    server.stop().await;

    // A power cut: only what was synced is on the disk. Every acknowledged order is there.
    let (_restarted, server) = restart_after_power_cut(dir.path(), &disk, options, 1).await;
    check_orders(
        &server.channel,
        "full",
        &held,
        &confirmed,
        "after a power cut and a restart",
    )
    .await;
    server.stop().await;
}

/// Replies to reserves for buyers `from..to` sent while syncs stall for `stall`: how many
/// were answered (each only once the stall was over), refused at once by the full journal
/// queue, and past a deadline (the server's 5 s, or a caller's own 1 s: every tenth sets
/// one).
async fn stalled_burst(
    server: &TestServer,
    storage: &FaultyStorage,
    stall: Duration,
    buyers: std::ops::Range<usize>,
    held: &mut Vec<String>,
) -> (usize, usize, usize) {
    storage.stall_syncs(stall);
    let stalled = Instant::now();
    let calls = buyers.map(|i| {
        let mut checkout = server.checkout();
        async move {
            let mut request = tonic::Request::new(reserve("slow", i));
            if i % 10 == 0 {
                request.set_timeout(Duration::from_millis(1_000));
            }
            let reply = checkout.reserve(request).await;
            (i, reply, stalled.elapsed())
        }
    });
    let replies = futures::future::join_all(calls).await;
    storage.stall_syncs(Duration::ZERO);
    let (mut answered, mut overloaded, mut timed_out) = (0, 0, 0);
    for (i, reply, after) in replies {
        match reply {
            Ok(reply) => {
                assert!(after >= stall, "buyer {i} answered {after:?} into a {stall:?} sync");
                held.push(reply.into_inner().order_id);
                answered += 1;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(status.message().contains("journal queue is full"), "{status:?}");
                assert!(after < stall, "buyer {i}: a full queue refused only after {after:?}");
                overloaded += 1;
            }
            Err(status) if status.code() == Code::DeadlineExceeded && i % 10 != 0 => {
                assert!(
                    after >= Duration::from_secs(5),
                    "buyer {i}: the 5 s deadline came at {after:?}"
                );
                timed_out += 1;
            }
            // tonic answers a caller's own deadline with CANCELLED ("Timeout expired").
            Err(status) if i % 10 == 0 && matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) => {
                assert!(
                    after < Duration::from_secs(2),
                    "buyer {i}: its 1 s deadline took {after:?}"
                );
                timed_out += 1;
            }
            Err(status) => panic!("buyer {i}: {status:?} after {after:?}"),
        }
    }
    (answered, overloaded, timed_out)
}

/// Syncs that stall: for 2 s, reserves are answered only after the stall (a caller with a
/// 1 s deadline of its own gives up first); for 5.5 s, longer than a command's 5 s
/// deadline, callers get DEADLINE_EXCEEDED and, with a journal queue of 32, the excess is
/// refused at once with RESOURCE_EXHAUSTED instead of queueing. After the stalls, nothing
/// acknowledged is lost across a power cut and the figures add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_syncs_answer_by_the_deadline_and_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimDisk::new();
    let storage = FaultyStorage::new(Arc::new(disk.clone()));
    let options = JournalOptions {
        segment_bytes: 256 * 1024,
        queue_max: 32,
    };
    let mut server = TestServer::on_log_storage(dir.path(), Arc::new(storage.clone()), options)
        .await
        .unwrap();
    server.add_fixtures().await;
    create_and_open(&server.channel, "slow", 5_000).await;
    let mut held = Vec::new();
    for i in 0..20 {
        held.push(
            server
                .checkout()
                .reserve(reserve("slow", i))
                .await
                .unwrap()
                .into_inner()
                .order_id,
        );
    }
    let (answered, _, gave_up) = stalled_burst(&server, &storage, Duration::from_secs(2), 20..40, &mut held).await;
    assert!(answered > 0, "no reserve was answered after a 2 s sync");
    assert!(gave_up > 0, "no caller gave up at its own deadline");
    let (answered, overloaded, timed_out) =
        stalled_burst(&server, &storage, Duration::from_millis(5_500), 40..240, &mut held).await;
    eprintln!("slow syncs of 5.5 s: {answered} answered after the sync, {timed_out} past their deadline, {overloaded} refused by the full queue");
    assert!(overloaded > 0, "a stalled journal's queue of 32 took 200 reserves");
    assert!(timed_out > 0, "no caller waited past the server's deadline");
    // Once the stalled sync ends, writes go on (the queue drains first), and the timed-out
    // reserves may have taken effect.
    let unstalled = Instant::now();
    loop {
        match server.checkout().reserve(reserve("slow", 10_000)).await {
            Ok(reply) => {
                held.push(reply.into_inner().order_id);
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(unstalled.elapsed() < Duration::from_secs(5), "{status:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    server.stop().await;

    let (_restarted, server) = restart_after_power_cut(dir.path(), &disk, options, 2).await;
    let mut checkout = storefront_client(&server.channel).await;
    for order_id in &held {
        let order = checkout
            .get_order(GetOrderRequest {
                order_id: order_id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{order_id} lost: {e:?}"))
            .into_inner();
        assert_eq!(order.status, OrderStatus::Held as i32, "{order_id}");
    }
    let sku = &server.drop_figures("slow").await.skus[0];
    assert_eq!(sku.available + sku.held + sku.sold, sku.allocated, "{sku:?}");
    assert!(
        sku.held as usize >= held.len(),
        "{sku:?}: fewer holds than acknowledged"
    );
    server.stop().await;
}

/// The server as it starts after a power cut: the log as the simulated disk kept it, and
/// sled's files lost altogether (its worst case: the whole log is replayed into a new one;
/// the server shut down in this process still holds the old one's lock), in a new data
/// directory with the same secrets.
async fn restart_after_power_cut(
    dir: &Path,
    disk: &SimDisk,
    options: JournalOptions,
    seed: u64,
) -> (tempfile::TempDir, TestServer) {
    let restarted = tempfile::tempdir().unwrap();
    let secrets = restarted.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    for entry in std::fs::read_dir(dir.join("secrets")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), secrets.join(entry.file_name())).unwrap();
    }
    let cut = disk.after_power_cut(CutMode::DropUnsynced, seed);
    let server = TestServer::on_log_storage(restarted.path(), Arc::new(FaultyStorage::new(Arc::new(cut))), options)
        .await
        .unwrap();
    (restarted, server)
}

/// `dropline serve` on `data_dir` with a log (standard error) in `log`, and a channel once
/// it serves.
async fn spawn_serve(data_dir: &Path, log: &Path, args: &[&str]) -> (ServeProcess, Channel) {
    let mut server = ServeCommand::new(data_dir)
        .unwrap()
        .log_filter("info")
        .log_to(log)
        .args(args.iter().copied())
        .spawn()
        .expect("dropline binary starts");
    let channel = server.connect(Duration::from_secs(60)).await.unwrap();
    (server, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropline_serve_on_a_full_tmpfs_refuses_writes_then_resumes_and_survives_kill_9() {
    let tmpfs = match Tmpfs::mount(40 * 1024 * 1024) {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            eprintln!("skipped: cannot mount tmpfs ({why})");
            return;
        }
    };
    let logs = tempfile::tempdir().unwrap();
    let data = tmpfs.path().join("data");
    // Segments of 256 KiB: the burst needs a new one, and meets the full disk there.
    let args = ["--journal-segment-bytes", "262144"];
    let (mut child, channel) = spawn_serve(&data, &logs.path().join("first.log"), &args).await;
    create_test_hubs(&channel).await;
    create_and_open(&channel, "tmpfs", 50_000).await;
    let checkout = storefront_client(&channel).await;
    let mut held = Vec::new();
    for i in 0..100 {
        held.push(
            checkout
                .clone()
                .reserve(reserve("tmpfs", i))
                .await
                .unwrap()
                .into_inner()
                .order_id,
        );
    }

    let filler = fill(&tmpfs.path().join("filler")).unwrap();
    assert!(
        tmpfs.free_bytes() < 64 * 1024,
        "{} bytes still free",
        tmpfs.free_bytes()
    );
    let mut refused = 0;
    let mut buyer = 100;
    while refused < 20 {
        assert!(buyer < 20_000, "20,000 reserves on a full disk and no refusal");
        let replies = futures::future::join_all((buyer..buyer + 64).map(|i| {
            let mut checkout = checkout.clone();
            async move { checkout.reserve(reserve("tmpfs", i)).await }
        }))
        .await;
        buyer += 64;
        for reply in replies {
            match reply {
                Ok(reply) => held.push(reply.into_inner().order_id),
                Err(status) => {
                    assert_refused_for_space(&status, "a reserve on a full tmpfs");
                    refused += 1;
                }
            }
        }
    }
    // Reads are served while full; `writes` is NOT_SERVING, readiness SERVING.
    let mut reader = checkout.clone();
    for order_id in held.iter().step_by(50) {
        let order = reader
            .get_order(GetOrderRequest {
                order_id: order_id.clone(),
            })
            .await
            .expect("GetOrder on a full disk")
            .into_inner();
        assert_eq!(order.status, OrderStatus::Held as i32);
    }
    let figures = operator_client(&channel)
        .get_drop(GetDropRequest {
            drop_id: "tmpfs".into(),
        })
        .await
        .expect("GetDrop on a full disk")
        .into_inner();
    assert_eq!(figures.skus[0].held as usize, held.len());
    health_becomes(child.addr, "writes", ServingStatus::NotServing, Duration::from_secs(5)).await;
    health_becomes(child.addr, "", ServingStatus::Serving, Duration::from_secs(1)).await;

    // The filler goes: writes resume by themselves.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    loop {
        match checkout.clone().reserve(reserve("tmpfs", buyer)).await {
            Ok(reply) => {
                held.push(reply.into_inner().order_id);
                break;
            }
            Err(status) => {
                assert_refused_for_space(&status, "a reserve as space came back");
                // Normally ~2 s (the retry back-off's bound); generous here because the suite
                // runs it beside the nemesis's 3 nodes and 3 NATS servers on 2 cores.
                if freed.elapsed() >= Duration::from_secs(60) {
                    let log = std::fs::read_to_string(logs.path().join("first.log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    panic!(
                        "writes did not resume; last answer {status:?}; the server's log ends with:\n{}",
                        tail.join("\n")
                    );
                }
            }
        }
        buyer += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed_ms = freed.elapsed().as_millis();
    health_becomes(child.addr, "writes", ServingStatus::Serving, Duration::from_secs(5)).await;
    let mut confirmed = Vec::new();
    for order_id in held.drain(..30) {
        checkout.clone().confirm(confirm(&order_id)).await.unwrap();
        confirmed.push(order_id);
    }
    let log = std::fs::read_to_string(logs.path().join("first.log")).unwrap();
    assert!(
        log.contains("journal disk is full"),
        "the operator's log does not say the disk is full"
    );
    assert!(
        log.contains("writes resumed"),
        "the operator's log does not say writes resumed"
    );
    for line in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("resumed"))
    {
        eprintln!("tmpfs server log: {line}");
    }
    eprintln!(
        "tmpfs: {refused} reserves refused, {} held and {} confirmed acknowledged, writes resumed {resumed_ms} ms after the filler went",
        held.len(),
        confirmed.len()
    );
    child.kill();

    let (mut child, channel) = spawn_serve(&data, &logs.path().join("second.log"), &args).await;
    check_orders(&channel, "tmpfs", &held, &confirmed, "after kill -9 and a restart").await;
    child.kill();
}

/// A journal whose log has thousands of records after sled's last checkpoint (opening
/// replays them all into sled, then checkpoints); `dropline serve` is killed with -9 once
/// its log says it is recovering (at once, then 5, 20 and 60 ms later), then started for
/// good: every acknowledged order is there and the figures add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_the_journal_recovers_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let (mut child, channel) = spawn_serve(data.path(), &logs.path().join("0.log"), &[]).await;
    create_test_hubs(&channel).await;
    create_and_open(&channel, "recover", 10_000).await;
    let checkout = storefront_client(&channel).await;
    let mut held = Vec::new();
    for chunk in (0..2_000).collect::<Vec<_>>().chunks(100) {
        let replies = futures::future::join_all(chunk.iter().map(|i| {
            let mut checkout = checkout.clone();
            async move { checkout.reserve(reserve("recover", *i)).await }
        }))
        .await;
        held.extend(replies.into_iter().map(|r| r.unwrap().into_inner().order_id));
    }
    let mut confirmed = Vec::new();
    for order_id in held.drain(..200) {
        checkout.clone().confirm(confirm(&order_id)).await.unwrap();
        confirmed.push(order_id);
    }
    // No checkpoint yet (none before a new segment or a minute): all of it is replayed.
    child.kill();

    let mut mid_recovery = 0;
    // Killed as soon as it says it recovers, then later and later into its recovery.
    for (life, delay_ms) in [(1, 0), (2, 5), (3, 20), (4, 60)] {
        let log = logs.path().join(format!("{life}.log"));
        let mut child = ServeCommand::new(data.path())
            .unwrap()
            .log_filter("info")
            .log_to(&log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("journal recovering") {
                std::thread::sleep(Duration::from_millis(delay_ms));
                child.kill();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if !text.contains("journal opened") {
                    mid_recovery += 1;
                }
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "life {life}: the server never started recovering"
            );
            if let Ok(Some(status)) = child.try_wait() {
                panic!("life {life}: the server exited ({status}) before recovering: {text}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    eprintln!("kill -9 during recovery: {mid_recovery} of 4 kills landed before the journal was open");
    assert!(mid_recovery > 0, "no kill landed while the journal was recovering");

    let (mut child, channel) = spawn_serve(data.path(), &logs.path().join("last.log"), &[]).await;
    check_orders(&channel, "recover", &held, &confirmed, "after kills during recovery").await;
    child.kill();
}

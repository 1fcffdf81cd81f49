//! The whole embedded journal under power cuts: SKU actors' real commands (reserves,
//! confirms, cancels, expiries) decided by the domain, group-committed with snapshots and
//! deadlines, the write-ahead log on a simulated disk whose power goes at an operation the
//! seed picks. After each cut the disk keeps what was synced plus what the seed lets
//! through of the rest (nothing, a torn prefix, a scrambled subset of sectors), and sled's
//! own files are either kept as they were or lost altogether (sled is not on the simulated
//! disk; losing it is the worst it can do, since a checkpoint is what makes it durable).
//!
//! Each recovery checks, per SKU:
//! - every acknowledged batch of events is there, byte for byte, in order;
//! - after them, nothing but whole batches that were submitted and not acknowledged
//!   (a group commit is one record: nothing unacknowledged is half-applied);
//! - the state rebuilt from the snapshot and the events after it equals the state rebuilt
//!   from every event (snapshots and log agree), and the SKU's invariants hold;
//! - the durable deadline is the one the recovered state asks for, when the last commit
//!   that changed it survived.
//!
//! `DROPLINE_JOURNAL_SEEDS` runs more seeds than the CI-sized default.

use actors::journal::{AppendBatch, Journal, JournalError};
use actors::log::sim::{CutMode, SimDisk};
use actors::sled_journal::SledJournal;
use domain::drop::{DropSpec, PoolSpec, SaleStatus, SkuSpec};
use domain::sku::*;
use domain::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::Arc;

/// Small segments, so the workload crosses several of them and their checkpoints.
const SEGMENT_BYTES: u64 = 4_096;
const SKUS: [&str; 2] = ["s1", "s2"];
const LIVES: usize = 3;

fn spec() -> DropSpec {
    DropSpec {
        drop_id: DropId::parse("d1").unwrap(),
        creator_id: CreatorId::parse("c1").unwrap(),
        title: "power cut drop".into(),
        opens_at: UnixMillis(1_000),
        closes_at: UnixMillis(10_000_000),
        hold_ttl_ms: 3_000,
        terms: Default::default(),
        skus: SKUS
            .iter()
            .map(|sku| SkuSpec {
                sku_id: SkuId::parse(sku).unwrap(),
                name: format!("hoodie {sku}"),
                price: Money::new(2_500, Currency::parse("EUR").unwrap()),
                per_buyer_limit: 2,
                pools: vec![PoolSpec {
                    hub_id: HubId::parse("hub-a").unwrap(),
                    city: CityName::parse("Lisbon").unwrap(),
                    allocated: 5,
                }],
            })
            .collect(),
    }
}

fn stream(sku: usize) -> String {
    format!("sku/d1/{}", SKUS[sku])
}

/// What one SKU's journal must hold.
#[derive(Default, Clone)]
struct Model {
    /// Events of acknowledged batches (and of whatever an earlier recovery found).
    acked: Vec<Vec<u8>>,
    /// Batches submitted after those, not acknowledged: any prefix of them may survive.
    unacked: Vec<Vec<Vec<u8>>>,
    /// Orders the workload may confirm or cancel.
    orders: Vec<OrderId>,
}

fn fresh_state(spec: &DropSpec, sku: usize) -> SkuState {
    SkuState::new(spec, &spec.skus[sku])
}

fn replay(spec: &DropSpec, sku: usize, snapshot: Option<&(u64, Vec<u8>)>, events: &[(u64, Vec<u8>)]) -> SkuState {
    let mut state = match snapshot {
        Some((_, bytes)) => actors::codec::decode(bytes).expect("the snapshot decodes"),
        None => fresh_state(spec, sku),
    };
    for (_, bytes) in events {
        let event: SkuEvent = actors::codec::decode(bytes).expect("an event decodes");
        state.apply(&event);
    }
    state
}

/// Opens the journal, waiting for a dropped one's writer to let go of sled's lock.
async fn open(dir: &Path, disk: &SimDisk) -> Result<Arc<SledJournal>, JournalError> {
    for _ in 0..500 {
        match SledJournal::open_with_log(dir, Arc::new(disk.clone()), SEGMENT_BYTES) {
            Err(JournalError::Io(e)) if e.contains("lock") => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await
            }
            other => return other,
        }
    }
    panic!("sled's lock was never released");
}

/// Recovers every SKU and checks it against its model; returns the recovered states (the
/// models then hold what was found: it is durable now).
async fn recover(
    seed: u64,
    life: usize,
    journal: &SledJournal,
    spec: &DropSpec,
    models: &mut [Model],
) -> Vec<SkuState> {
    let mut states = Vec::new();
    let wakeups = journal.wakeups().unwrap();
    for (sku, model) in models.iter_mut().enumerate() {
        let all = journal.load_all(&stream(sku)).await.unwrap();
        let found: Vec<Vec<u8>> = all.iter().map(|(_, e)| e.clone()).collect();
        for (i, (version, _)) in all.iter().enumerate() {
            assert_eq!(*version, i as u64 + 1, "seed {seed} life {life}: versions run from 1");
        }
        assert!(
            found.len() >= model.acked.len() && found[..model.acked.len()] == model.acked[..],
            "seed {seed} life {life} {}: an acknowledged event is missing or altered ({} found, {} acknowledged)",
            stream(sku),
            found.len(),
            model.acked.len()
        );
        // After the acknowledged events: whole unacknowledged batches, in order, or nothing.
        let mut rest = &found[model.acked.len()..];
        for batch in &model.unacked {
            if rest.is_empty() {
                break;
            }
            assert!(
                rest.len() >= batch.len() && rest[..batch.len()] == batch[..],
                "seed {seed} life {life} {}: an unacknowledged batch came back in part or altered",
                stream(sku)
            );
            rest = &rest[batch.len()..];
        }
        assert!(
            rest.is_empty(),
            "seed {seed} life {life} {}: {} events that were never submitted",
            stream(sku),
            rest.len()
        );
        let recovered = journal.load(&stream(sku)).await.unwrap();
        let from_snapshot = replay(spec, sku, recovered.snapshot.as_ref(), &recovered.events);
        let from_events = replay(spec, sku, None, &all);
        assert_eq!(
            from_snapshot,
            from_events,
            "seed {seed} life {life} {}: the snapshot (version {:?}) and the log disagree",
            stream(sku),
            recovered.snapshot.as_ref().map(|(v, _)| *v)
        );
        if let Err(e) = from_events.check_invariants() {
            panic!(
                "seed {seed} life {life} {}: invariant broken after recovery: {e}",
                stream(sku)
            );
        }
        // Every commit sets the deadline its state asks for, in the same record as its
        // events: the durable one is the recovered state's.
        let durable = wakeups.iter().find(|(s, _)| *s == stream(sku)).map(|(_, at)| *at);
        assert_eq!(
            durable,
            from_events.next_deadline().map(|t| t.0),
            "seed {seed} life {life} {}: the durable deadline is not the recovered state's",
            stream(sku)
        );
        model.acked = found;
        model.unacked.clear();
        states.push(from_events);
    }
    states
}

fn command(rng: &mut StdRng, model: &Model, next_order: &mut u64, sku: usize) -> SkuCommand {
    let pick = |rng: &mut StdRng| model.orders[rng.random_range(0..model.orders.len())].clone();
    let choice = if model.orders.is_empty() {
        0
    } else {
        rng.random_range(0..10)
    };
    match choice {
        0..=4 => {
            *next_order += 1;
            SkuCommand::Reserve(ReserveCommand {
                order_id: OrderId::new(
                    &DropId::parse("d1").unwrap(),
                    &SkuId::parse(SKUS[sku]).unwrap(),
                    *next_order,
                ),
                params: ReserveParams {
                    storefront: StorefrontId::parse("web").unwrap(),
                    buyer: BuyerRef::from_hash_hex(format!("{:032x}", rng.random_range(0..6u32))),
                    city: CityName::parse("Lisbon").unwrap(),
                    hub_id: None,
                    quantity: 1,
                    allow_partial: false,
                    join_waitlist: rng.random_bool(0.5),
                },
                idempotency_key: None,
            })
        }
        5..=6 => {
            let order_id = pick(rng);
            SkuCommand::Confirm(ConfirmCommand {
                payment_reference: format!("pay-{order_id}"),
                order_id,
                storefront: Some(StorefrontId::parse("web").unwrap()),
                address_digest: None,
                amount: Money::new(2_500, Currency::parse("EUR").unwrap()),
                fulfilment: Fulfilment::Pickup,
                discreet: false,
                pickup_code: "123456".into(),
                receipt_token: "tok".into(),
            })
        }
        7 => SkuCommand::Cancel {
            order_id: pick(rng),
            storefront: Some(StorefrontId::parse("web").unwrap()),
            withdrawn: true,
        },
        _ => SkuCommand::ExpireDue,
    }
}

/// One seed: lives of work, each ended by a power cut, then a last recovery.
async fn run_seed(seed: u64) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let mut disk = SimDisk::new();
    let mut models = vec![Model::default(); SKUS.len()];
    let mut now = UnixMillis(2_000);
    let mut next_order = 0u64;
    let mut acknowledged = 0usize;
    for life in 0..LIVES {
        disk.cut_power_after(disk.ops() + rng.random_range(1..160));
        let opened = open(dir.path(), &disk).await;
        if let Ok(journal) = opened {
            let mut states = recover(seed, life, &journal, &spec, &mut models).await;
            'work: loop {
                // A few commands at once, so the writer group-commits several batches (of
                // one SKU and of both) in one record.
                let mut waiting = Vec::new();
                for _ in 0..rng.random_range(1..5) {
                    let sku = rng.random_range(0..SKUS.len());
                    now = UnixMillis(now.0 + rng.random_range(0..900));
                    let state = &mut states[sku];
                    let mut events = Vec::new();
                    if state.sale != SaleStatus::Open {
                        events.push(SkuEvent::SaleStatusSet {
                            status: SaleStatus::Open,
                            at: now,
                        });
                    } else {
                        let cmd = command(&mut rng, &models[sku], &mut next_order, sku);
                        if let Ok((decided, reply)) = state.decide(cmd, now) {
                            if let SkuReply::Reservation(r) = &reply {
                                if let Some(id) = &r.order_id {
                                    models[sku].orders.push(id.clone());
                                }
                            }
                            events = decided;
                        }
                    }
                    if events.is_empty() {
                        continue;
                    }
                    let first_version =
                        models[sku].acked.len() + models[sku].unacked.iter().map(Vec::len).sum::<usize>() + 1;
                    for event in &events {
                        state.apply(event);
                    }
                    let encoded: Vec<Vec<u8>> = events.iter().map(actors::codec::encode).collect();
                    let version = first_version as u64 + encoded.len() as u64 - 1;
                    let snapshot = rng.random_bool(0.2).then(|| (version, actors::codec::encode(&*state)));
                    let Ok(permit) = journal.try_reserve() else { break 'work };
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    permit.append(
                        AppendBatch {
                            stream: stream(sku),
                            first_version: first_version as u64,
                            events: encoded.clone(),
                            snapshot,
                            wakeup: Some(state.next_deadline().map(|t| t.0)),
                            audit: Vec::new(),
                        },
                        Box::new(move |result| {
                            let _ = tx.send(result);
                        }),
                    );
                    models[sku].unacked.push(encoded);
                    waiting.push((sku, rx));
                }
                let mut failed = false;
                for (sku, rx) in waiting {
                    match rx.await.unwrap() {
                        Ok(()) => {
                            // Completions run in append order: the oldest unacknowledged
                            // batch of this SKU is the one acknowledged.
                            let batch = models[sku].unacked.remove(0);
                            models[sku].acked.extend(batch);
                            acknowledged += 1;
                        }
                        Err(_) => failed = true,
                    }
                }
                if failed || disk.is_cut() {
                    break;
                }
            }
        }
        // The power goes: the journal stops (its writer cannot write or checkpoint), and the
        // disk comes back as a power cut leaves it; sled's files survive or not.
        let mode = [CutMode::DropUnsynced, CutMode::TornPrefix, CutMode::Scrambled][rng.random_range(0..3)];
        disk = disk.after_power_cut(mode, rng.random());
        if rng.random_bool(0.3) {
            lose_sled(dir.path()).await;
        }
    }
    let journal = open(dir.path(), &disk).await.unwrap();
    recover(seed, LIVES, &journal, &spec, &mut models).await;
    acknowledged
}

/// Removes sled's directory once the dropped journal's writer has let go of it.
async fn lose_sled(dir: &Path) {
    let sled_dir = dir.join("journal");
    for _ in 0..500 {
        if std::fs::remove_dir_all(&sled_dir).is_ok() || !sled_dir.exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("sled's directory could not be removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_command_survives_power_cuts_of_the_whole_journal() {
    let seeds: u64 = std::env::var("DROPLINE_JOURNAL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let started = std::time::Instant::now();
    let mut acknowledged = 0;
    for seed in 0..seeds {
        acknowledged += run_seed(seed).await;
    }
    println!(
        "journal power cuts: {seeds} seeds x {LIVES} lives, {acknowledged} acknowledged batches checked, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        acknowledged > seeds as usize,
        "the workload acknowledged too little to test anything"
    );
}

//! The actor shell (`entity`, `wakeups`, `embedded`) with the real aggregates, on the
//! in-memory journal and a clock that follows tokio's paused time: deadlines, idle stops,
//! retries and quiet spells of seconds or minutes happen at their exact driven times, in
//! microseconds of real time.
//!
//! Time moves only when every task waits (tokio's auto-advance) or when a test sleeps, so
//! "at T nothing has happened yet, at T + 1 ms it has" is an exact statement here.

use actors::limits::LIVE_ACTORS_MAX_DEFAULT;
use actors::limits::{
    ACTOR_IDLE_STOP_MS, PASSIVATE_RETRY_MAX_MS, SNAPSHOT_IDLE_MIN_EVENTS, SNAPSHOT_QUIET_MS, TIMER_RETRY_MS,
};
use actors::memory_journal::MemoryJournal;
use actors::{Clock, CommandBus, CommandError, LocalActors, Projections, TokioClock};
use domain::drop::{DropCommand, DropSpec, DropState, DropView, PoolSpec, SettlementTerms, SkuSpec};
use domain::money::{Currency, Money};
use domain::reply::FromReply;
use domain::sku::{
    OrderStatus, OrderView, ReleaseReason, Reservation, ReserveCommand, ReserveOutcome, ReserveParams, SkuCommand,
    SkuEvent, SkuFigures, SkuReply, SkuState,
};
use domain::{Aggregate, BuyerRef, CityName, DropId, HubId, OrderId, SkuId, StorefrontId, UnixMillis};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The driven clock's reading when a test starts.
const T0: UnixMillis = UnixMillis(1_800_000_000_000);
const DROP: &str = "drop-1";

/// A SKU command through the bus, its reply in the shape `T` the command answers with.
async fn sku_command<T: FromReply<SkuReply>>(
    actors: &LocalActors,
    sku: &str,
    command: SkuCommand,
) -> Result<T, CommandError> {
    let bus: &dyn CommandBus = actors;
    bus.ask_for::<SkuState, T>((DropId::parse(DROP).unwrap(), SkuId::parse(sku).unwrap()), command)
        .await
}

async fn drop_command(actors: &LocalActors, command: DropCommand) -> Result<DropView, CommandError> {
    let bus: &dyn CommandBus = actors;
    bus.ask::<DropState>(DropId::parse(DROP).unwrap(), command).await
}

/// A platform of actors over an in-memory journal, on a clock that follows tokio's time.
struct Shell {
    clock: Arc<TokioClock>,
    journal: Arc<MemoryJournal>,
    actors: Arc<LocalActors>,
}

impl Shell {
    /// At `T0`, a drop open for three hours whose holds last `hold_ttl_ms`, with one SKU per
    /// (sku_id, stock) in one Lisbon pool, one unit per buyer.
    async fn start(hold_ttl_ms: u64, skus: &[(&str, u32)]) -> Shell {
        let clock = Arc::new(TokioClock::starting_at(T0));
        let journal = MemoryJournal::new(clock.clone());
        let actors = actors_over(&journal, &clock);
        drop_command(&actors, DropCommand::Create(drop_spec(hold_ttl_ms, skus)))
            .await
            .unwrap();
        drop_command(&actors, DropCommand::Open).await.unwrap();
        Shell { clock, journal, actors }
    }

    /// A restart: the actors are dropped (each stops as its mailbox closes) and new ones
    /// start over the same journal, as a process restarted on the same disk would.
    async fn restart(self) -> Shell {
        let Shell { clock, journal, actors } = self;
        drop(actors);
        settle().await;
        let actors = actors_over(&journal, &clock);
        Shell { clock, journal, actors }
    }

    fn now(&self) -> UnixMillis {
        self.clock.now()
    }

    async fn reserve(&self, sku: &str, buyer: u64) -> Result<Reservation, CommandError> {
        let drop_id = DropId::parse(DROP).unwrap();
        let sku_id = SkuId::parse(sku).unwrap();
        let command = reserve_command(&drop_id, &sku_id, buyer);
        sku_command(&self.actors, sku, SkuCommand::Reserve(command)).await
    }

    /// Reserves of one unit each for `buyers`, through `ask_many`: one batch for the actor.
    async fn reserve_many(&self, sku: &str, buyers: &[u64]) -> Vec<Result<Reservation, CommandError>> {
        let drop_id = DropId::parse(DROP).unwrap();
        let sku_id = SkuId::parse(sku).unwrap();
        let commands = buyers
            .iter()
            .map(|&buyer| SkuCommand::Reserve(reserve_command(&drop_id, &sku_id, buyer)))
            .collect();
        let bus: &dyn CommandBus = &*self.actors;
        bus.ask_many::<SkuState>((drop_id, sku_id), commands)
            .await
            .into_iter()
            .map(|reply| reply.map(|r| Reservation::from_reply(r).unwrap()))
            .collect()
    }

    async fn figures(&self, sku: &str) -> SkuFigures {
        sku_command(&self.actors, sku, SkuCommand::GetFigures).await.unwrap()
    }

    async fn order_status(&self, sku: &str, order_id: &OrderId) -> OrderStatus {
        let command = SkuCommand::GetOrder {
            order_id: order_id.clone(),
        };
        let order: OrderView = sku_command(&self.actors, sku, command).await.unwrap();
        order.status
    }

    /// Running SKU actors.
    fn running_skus(&self) -> usize {
        self.actors.live_actors().1
    }

    /// The SKU's durable events, each with the driven time it was committed.
    fn events(&self, sku: &str) -> Vec<(UnixMillis, SkuEvent)> {
        self.journal
            .events(&stream(sku))
            .into_iter()
            .map(|(_, at, bytes)| (at, actors::codec::decode(&bytes).unwrap()))
            .collect()
    }

    /// Waits (at most a driven hour) for the hold of `order_id` to be released as expired;
    /// answers when, by the event's time and by the time it was committed.
    async fn expiry(&self, sku: &str, order_id: &OrderId) -> (UnixMillis, UnixMillis) {
        let expired = self.journal.wait_until(|_| self.expired(sku, order_id).is_some());
        within(3_600_000, "the expiry", expired).await;
        self.expired(sku, order_id).unwrap()
    }

    /// When the hold of `order_id` was released as expired, by the event's time and by the
    /// time it was committed.
    fn expired(&self, sku: &str, order_id: &OrderId) -> Option<(UnixMillis, UnixMillis)> {
        self.events(sku).into_iter().find_map(|(committed, event)| match event {
            SkuEvent::Released {
                order_id: id,
                reason: ReleaseReason::Expired,
                at,
            } if &id == order_id => Some((at, committed)),
            _ => None,
        })
    }
}

/// One unit for `buyer` (whose order id is its number), waitlist allowed.
fn reserve_command(drop_id: &DropId, sku_id: &SkuId, buyer: u64) -> ReserveCommand {
    ReserveCommand {
        order_id: OrderId::new(drop_id, sku_id, buyer),
        params: ReserveParams {
            storefront: StorefrontId::parse("web").unwrap(),
            buyer: BuyerRef::from_hash_hex(format!("{buyer:032x}")),
            city: CityName::parse("Lisbon").unwrap(),
            hub_id: None,
            quantity: 1,
            allow_partial: false,
            join_waitlist: true,
        },
        idempotency_key: None,
    }
}

fn actors_over(journal: &Arc<MemoryJournal>, clock: &Arc<TokioClock>) -> Arc<LocalActors> {
    LocalActors::new(
        journal.clone(),
        clock.clone(),
        Arc::new(Projections::default()),
        journal.clone(),
        LIVE_ACTORS_MAX_DEFAULT,
    )
    .unwrap()
}

fn stream(sku: &str) -> String {
    format!("sku/{DROP}/{sku}")
}

fn drop_spec(hold_ttl_ms: u64, skus: &[(&str, u32)]) -> DropSpec {
    DropSpec {
        drop_id: DropId::parse(DROP).unwrap(),
        creator_id: domain::CreatorId::parse("creator-1").unwrap(),
        title: "shell test".into(),
        opens_at: UnixMillis(T0.0 - 1_000),
        closes_at: T0.plus_ms(3 * 3_600_000),
        hold_ttl_ms,
        skus: skus
            .iter()
            .map(|(sku_id, stock)| SkuSpec {
                sku_id: SkuId::parse(sku_id).unwrap(),
                name: format!("item {sku_id}"),
                price: Money {
                    minor_units: 2_500,
                    currency: Currency::parse("EUR").unwrap(),
                },
                per_buyer_limit: 1,
                pools: vec![PoolSpec {
                    hub_id: HubId::parse("hub-1").unwrap(),
                    city: CityName::parse("Lisbon").unwrap(),
                    allocated: *stock,
                }],
            })
            .collect(),
        terms: SettlementTerms::default(),
    }
}

/// Lets every task that can run do so, without moving time (the test task stays ready, so
/// tokio does not auto-advance).
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

/// Sleeps until the driven clock reads `at`, then lets everything woken then run.
async fn at(clock: &TokioClock, at: UnixMillis) {
    let now = clock.now();
    assert!(at >= now, "{at:?} is in the past ({now:?})");
    tokio::time::sleep(Duration::from_millis((at.0 - now.0) as u64)).await;
    settle().await;
    assert_eq!(clock.now(), at, "the driven clock landed on the millisecond");
}

/// `future`, which must finish within `ms` of driven time (a test that waits for something
/// that never happens fails instead of spinning through driven hours).
async fn within<T>(ms: u64, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_millis(ms), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {ms} ms of driven time"))
}

fn held(reservation: &Reservation) -> OrderId {
    assert_eq!(reservation.outcome, ReserveOutcome::Held, "{reservation:?}");
    reservation.order_id.clone().unwrap()
}

/// A running actor expires a hold with its own timer, at the hold's deadline to the
/// millisecond, without a request and without real waiting.
#[tokio::test(start_paused = true)]
async fn a_hold_expires_at_its_deadline() {
    const TTL_MS: u64 = 20_000; // shorter than the idle stop: the actor stays running
    let shell = Shell::start(TTL_MS, &[("sku", 5)]).await;
    let reservation = shell.reserve("sku", 1).await.unwrap();
    let order_id = held(&reservation);
    let deadline = T0.plus_ms(TTL_MS);
    assert_eq!(reservation.expires_at, Some(deadline));
    assert_eq!(
        shell.journal.wakeup(&stream("sku")),
        Some(deadline),
        "deadline durable with the hold"
    );

    at(&shell.clock, UnixMillis(deadline.0 - 1)).await;
    assert_eq!(shell.expired("sku", &order_id), None, "not expired a millisecond early");
    assert_eq!(shell.figures("sku").await.pools[0].pool.held, 1);

    assert_eq!(
        shell.expiry("sku", &order_id).await,
        (deadline, deadline),
        "decided and durable at the deadline"
    );
    assert_eq!(shell.running_skus(), 1, "expired by the running actor's own timer");
    let pool = &shell.figures("sku").await.pools[0].pool;
    assert_eq!((pool.available, pool.held), (5, 0));
}

/// An idle actor stops `ACTOR_IDLE_STOP_MS` after its last message, its deadline handed to
/// the wake-up scheduler; at the deadline the scheduler starts it again, from the journal,
/// and it expires the hold and promotes the waitlist as if it had never stopped.
#[tokio::test(start_paused = true)]
async fn an_idle_actor_stops_and_is_woken_at_its_deadline_with_its_state() {
    const TTL_MS: u64 = 600_000;
    let shell = Shell::start(TTL_MS, &[("sku", 1)]).await;
    let first = held(&shell.reserve("sku", 1).await.unwrap());
    let second = shell.reserve("sku", 2).await.unwrap();
    assert_eq!(second.outcome, ReserveOutcome::Waitlisted);
    let second = second.order_id.unwrap();
    assert_eq!(shell.running_skus(), 1);

    at(&shell.clock, T0.plus_ms(ACTOR_IDLE_STOP_MS - 1)).await;
    assert_eq!(
        shell.running_skus(),
        1,
        "still running a millisecond before the idle stop"
    );
    at(&shell.clock, T0.plus_ms(ACTOR_IDLE_STOP_MS)).await;
    assert_eq!(shell.running_skus(), 0, "stopped after ACTOR_IDLE_STOP_MS idle");
    assert_eq!(shell.actors.live_actors().0, 0, "the drop's actor too");

    let deadline = T0.plus_ms(TTL_MS);
    at(&shell.clock, UnixMillis(deadline.0 - 1)).await;
    assert_eq!(shell.running_skus(), 0, "nothing woke it early");
    assert_eq!(shell.expired("sku", &first), None);

    assert_eq!(shell.expiry("sku", &first).await, (deadline, deadline));
    assert_eq!(shell.running_skus(), 1, "woken for its deadline");
    // Its state survived the stop: the waitlisted buyer was promoted to a hold with a
    // deadline of its own, which is durable for the next wake-up.
    let promoted = shell.events("sku").into_iter().find_map(|(_, e)| match e {
        SkuEvent::Promoted {
            order_id, expires_at, ..
        } if order_id == second => Some(expires_at),
        _ => None,
    });
    assert_eq!(promoted, Some(deadline.plus_ms(TTL_MS)));
    assert_eq!(shell.order_status("sku", &second).await, OrderStatus::Held);
    assert_eq!(shell.order_status("sku", &first).await, OrderStatus::Expired);
    settle().await;
    assert_eq!(shell.journal.wakeup(&stream("sku")), Some(deadline.plus_ms(TTL_MS)));
}

/// Deadlines are durable: after a restart the scheduler loads them, and a hold expires at
/// its deadline although no request touches its SKU again.
#[tokio::test(start_paused = true)]
async fn after_a_restart_a_hold_expires_at_its_deadline_without_any_request() {
    const TTL_MS: u64 = 120_000;
    let shell = Shell::start(TTL_MS, &[("sku", 3)]).await;
    let order_id = held(&shell.reserve("sku", 1).await.unwrap());
    at(&shell.clock, T0.plus_ms(5_000)).await;
    let shell = shell.restart().await;
    assert_eq!(shell.running_skus(), 0, "nothing started yet");

    let deadline = T0.plus_ms(TTL_MS);
    assert_eq!(shell.expiry("sku", &order_id).await, (deadline, deadline));
    assert_eq!(shell.figures("sku").await.pools[0].pool.available, 3);
    // The actors from before the restart were gone: none of them raced the new ones with
    // an append of its own (the journal would have refused it as out of order).
    assert_eq!(shell.journal.stats().failed.load(Ordering::SeqCst), 0);
}

/// A timer command that meets a full journal queue runs again `TIMER_RETRY_MS` later, once
/// per retry while the queue stays full (no tight loop), and goes through once it has room.
#[tokio::test(start_paused = true)]
async fn a_timer_command_that_met_a_full_journal_runs_again_after_the_retry_delay() {
    const TTL_MS: u64 = 20_000;
    const FULL_MS: u64 = 1_000;
    let shell = Shell::start(TTL_MS, &[("sku", 5)]).await;
    let order_id = held(&shell.reserve("sku", 1).await.unwrap());
    let deadline = T0.plus_ms(TTL_MS);
    let refused = || shell.journal.stats().refused_full.load(Ordering::SeqCst);

    at(&shell.clock, UnixMillis(deadline.0 - 1)).await;
    shell.journal.set_full(true);
    assert_eq!(refused(), 0);
    at(&shell.clock, deadline).await;
    assert_eq!(
        refused(),
        1,
        "the timer command ran at the deadline and met the full queue"
    );
    at(&shell.clock, deadline.plus_ms(TIMER_RETRY_MS - 1)).await;
    assert_eq!(refused(), 1, "no retry before TIMER_RETRY_MS");
    at(&shell.clock, deadline.plus_ms(TIMER_RETRY_MS)).await;
    assert_eq!(refused(), 2, "retried after TIMER_RETRY_MS");
    at(&shell.clock, deadline.plus_ms(FULL_MS)).await;
    assert_eq!(
        refused(),
        1 + FULL_MS / TIMER_RETRY_MS,
        "one try per retry delay while full"
    );
    assert_eq!(shell.expired("sku", &order_id), None);

    shell.journal.set_full(false);
    let retried = deadline.plus_ms(FULL_MS + TIMER_RETRY_MS);
    assert_eq!(
        shell.expiry("sku", &order_id).await,
        (retried, retried),
        "expired by the first retry with room"
    );
}

/// A command whose write failed is not acknowledged, and its effect is gone: the actor is
/// stopped and rebuilt from what is durable.
#[tokio::test(start_paused = true)]
async fn a_failed_write_is_not_acknowledged_and_the_actor_restarts_from_the_journal() {
    let shell = Shell::start(600_000, &[("sku", 5)]).await;
    held(&shell.reserve("sku", 1).await.unwrap());
    shell.journal.fail_next_appends(1);
    let failed = shell.reserve("sku", 2).await.unwrap_err();
    assert!(matches!(failed, CommandError::Storage(_)), "{failed:?}");
    settle().await;

    let pool = shell.figures("sku").await.pools[0].pool.clone();
    assert_eq!((pool.held, pool.available), (1, 4), "only the durable hold is there");
    // The same buyer again (per-buyer limit 1): a fresh hold, appended right after the last
    // durable event (the journal refuses any other version).
    held(&shell.reserve("sku", 2).await.unwrap());
    let holds = shell
        .events("sku")
        .into_iter()
        .filter(|(_, e)| matches!(e, SkuEvent::Held { .. }))
        .count();
    assert_eq!(holds, 2);
}

/// An actor stopped by a failed write keeps its deadlines: without any request, the
/// wake-up scheduler starts it again from the journal, and its durable hold expires at the
/// deadline to the millisecond (in a cluster a fenced or timed-out append stops an actor;
/// its SLA or hold deadlines must not wait for the next command).
#[tokio::test(start_paused = true)]
async fn an_actor_stopped_by_a_failed_write_still_expires_its_durable_hold_on_time() {
    const TTL_MS: u64 = 20_000; // shorter than the idle stop: no passivation involved
    let shell = Shell::start(TTL_MS, &[("sku", 5)]).await;
    let order_id = held(&shell.reserve("sku", 1).await.unwrap());
    let deadline = T0.plus_ms(TTL_MS);
    at(&shell.clock, T0.plus_ms(1_000)).await;
    shell.journal.fail_next_appends(1);
    let failed = shell.reserve("sku", 2).await.unwrap_err();
    assert!(matches!(failed, CommandError::Storage(_)), "{failed:?}");

    assert_eq!(
        shell.expiry("sku", &order_id).await,
        (deadline, deadline),
        "decided and durable at the deadline, with no request after the failure"
    );
    assert_eq!(shell.running_skus(), 1, "started again by the wake-up scheduler");
    let pool = &shell.figures("sku").await.pools[0].pool;
    assert_eq!((pool.available, pool.held), (5, 0));
}

/// A reply leaves only once its batch is durable, while the actor goes on deciding: two
/// reserves made while the journal's write takes a second are both answered when it ends,
/// from one group commit.
#[tokio::test(start_paused = true)]
async fn replies_wait_for_the_durable_write_and_share_one_group_commit() {
    let shell = Arc::new(Shell::start(600_000, &[("sku", 5)]).await);
    shell.figures("sku").await; // the actor is running
    let commits = shell.journal.stats().commits.load(Ordering::SeqCst);
    shell.journal.hold_writes(true);
    let reserves: Vec<_> = (1..=2)
        .map(|buyer| {
            let shell = shell.clone();
            tokio::spawn(async move { shell.reserve("sku", buyer).await })
        })
        .collect();
    at(&shell.clock, T0.plus_ms(1_000)).await;
    assert!(reserves.iter().all(|r| !r.is_finished()), "no reply before the write");
    assert_eq!(shell.journal.stats().commits.load(Ordering::SeqCst), commits);
    shell.journal.hold_writes(false);
    for reserve in reserves {
        held(&reserve.await.unwrap().unwrap());
    }
    assert_eq!(shell.clock.now(), T0.plus_ms(1_000));
    assert_eq!(shell.journal.stats().commits.load(Ordering::SeqCst), commits + 1);
    let committed: Vec<_> = shell
        .events("sku")
        .into_iter()
        .filter(|(_, e)| matches!(e, SkuEvent::Held { .. }))
        .map(|(at, _)| at)
        .collect();
    assert_eq!(committed, vec![T0.plus_ms(1_000); 2]);
}

/// `ask_many` hands the actor its commands as one message: they are decided in order (each
/// sees the ones before it), written as one append, and answered each on its own once that
/// append is durable; a refused command refuses only itself.
#[tokio::test(start_paused = true)]
async fn a_batch_is_decided_in_order_as_one_append_with_a_reply_per_command() {
    let shell = Shell::start(600_000, &[("sku", 2)]).await;
    shell.figures("sku").await; // the actor is running
    let appends = shell.journal.stats().appends.load(Ordering::SeqCst);
    // Buyer 1 twice: its second reserve is over the per-buyer limit of one unit.
    let replies = shell.reserve_many("sku", &[1, 1, 2, 3]).await;
    assert_eq!(replies.len(), 4);
    held(replies[0].as_ref().unwrap());
    assert!(
        matches!(
            &replies[1],
            Err(CommandError::Rejected(domain::Rejection::BuyerLimitReached { .. }))
        ),
        "{:?}",
        replies[1]
    );
    held(replies[2].as_ref().unwrap());
    // Stock of two, both held by the commands before it: buyer 3 joins the waitlist.
    let third = replies[3].as_ref().unwrap();
    assert_eq!(third.outcome, ReserveOutcome::Waitlisted, "{third:?}");
    assert_eq!(shell.journal.stats().appends.load(Ordering::SeqCst), appends + 1);
    let figures = &shell.figures("sku").await.pools[0];
    assert_eq!((figures.pool.held, figures.waitlisted), (2, 1), "{figures:?}");
}

/// A batch that meets a full journal queue is refused whole, each command with the same
/// overload and nothing decided; one that meets a failed write is answered with the
/// failure for each command, and the actor restarts from what is durable.
#[tokio::test(start_paused = true)]
async fn a_batch_refused_by_the_journal_changes_nothing() {
    let shell = Shell::start(600_000, &[("sku", 5)]).await;
    shell.figures("sku").await;
    shell.journal.set_full(true);
    let replies = shell.reserve_many("sku", &[1, 2]).await;
    assert!(
        replies.iter().all(|r| matches!(r, Err(CommandError::Overloaded(_)))),
        "{replies:?}"
    );
    shell.journal.set_full(false);
    shell.journal.fail_next_appends(1);
    let replies = shell.reserve_many("sku", &[1, 2]).await;
    assert!(
        replies.iter().all(|r| matches!(r, Err(CommandError::Storage(_)))),
        "{replies:?}"
    );
    assert_eq!(shell.figures("sku").await.pools[0].pool.held, 0);
    let replies = shell.reserve_many("sku", &[1, 2]).await;
    assert!(replies.iter().all(Result::is_ok), "{replies:?}");
    assert_eq!(shell.figures("sku").await.pools[0].pool.held, 2);
}

/// An actor that comes to the end of its idle spell with a write still in flight (a slow
/// disk) stops as soon as that write is durable, not a whole idle spell later.
#[tokio::test(start_paused = true)]
async fn an_idle_actor_with_a_write_in_flight_stops_once_it_is_durable() {
    let shell = Arc::new(Shell::start(3_600_000, &[("sku", 5)]).await);
    shell.figures("sku").await; // the actor is running
    shell.journal.hold_writes(true);
    let reserve = {
        let shell = shell.clone();
        tokio::spawn(async move { shell.reserve("sku", 1).await })
    };
    at(&shell.clock, T0.plus_ms(ACTOR_IDLE_STOP_MS + 1_000)).await;
    assert_eq!(shell.running_skus(), 1, "a write in flight keeps the actor running");
    // The caller gave up long ago (the command deadline); the write is still in flight.
    assert!(matches!(reserve.await.unwrap(), Err(CommandError::Timeout(_))));
    shell.journal.hold_writes(false);
    within(PASSIVATE_RETRY_MAX_MS + 1, "stopped once nothing is in flight", async {
        while shell.running_skus() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert_eq!(shell.figures("sku").await.pools[0].pool.held, 1, "the write landed");
}

/// After `SNAPSHOT_IDLE_MIN_EVENTS` events an actor writes a snapshot once it has had
/// `SNAPSHOT_QUIET_MS` without a message (a message meanwhile starts the spell again), and
/// a restart recovers from the snapshot to the same state as replaying every event.
#[tokio::test(start_paused = true)]
async fn a_snapshot_follows_a_quiet_spell_and_recovers_the_same_state() {
    let buyers = SNAPSHOT_IDLE_MIN_EVENTS;
    let shell = Shell::start(3_600_000, &[("sku", 2 * buyers as u32)]).await;
    for buyer in 0..buyers {
        held(&shell.reserve("sku", buyer).await.unwrap());
    }
    assert_eq!(shell.now(), T0, "the burst took no driven time");
    let version = shell.journal.events(&stream("sku")).len() as u64;
    assert!(version >= SNAPSHOT_IDLE_MIN_EVENTS);

    // A message 300 ms into the quiet spell starts it again.
    at(&shell.clock, T0.plus_ms(300)).await;
    assert_eq!(shell.journal.snapshot(&stream("sku")), None);
    let before = shell.figures("sku").await;
    let quiet_from = T0.plus_ms(300);
    at(&shell.clock, quiet_from.plus_ms(SNAPSHOT_QUIET_MS - 1)).await;
    assert_eq!(
        shell.journal.snapshot(&stream("sku")),
        None,
        "not before the quiet spell ends"
    );
    within(
        60_000,
        "the snapshot",
        shell.journal.wait_until(|j| j.snapshot(&stream("sku")).is_some()),
    )
    .await;
    assert_eq!(
        shell.journal.snapshot(&stream("sku")),
        Some((version, quiet_from.plus_ms(SNAPSHOT_QUIET_MS))),
        "a snapshot of every event, written when the quiet spell ended"
    );

    // The snapshot is the state that replaying every event from the start builds.
    let recovered = actors::journal::Journal::load(shell.journal.as_ref(), &stream("sku"))
        .await
        .unwrap();
    assert!(recovered.events.is_empty(), "nothing left to replay");
    let (_, bytes) = recovered.snapshot.unwrap();
    let from_snapshot: SkuState = actors::codec::decode(&bytes).unwrap();
    let spec = drop_spec(3_600_000, &[("sku", 2 * buyers as u32)]);
    let mut replayed = SkuState::new(&spec, &spec.skus[0]);
    for (_, event) in shell.events("sku") {
        replayed.apply(&event);
    }
    assert!(
        from_snapshot == replayed,
        "the snapshot differs from the replayed state"
    );

    // A restarted actor starts from it: same figures, and it appends at the next version.
    let shell = shell.restart().await;
    assert_eq!(shell.figures("sku").await, before);
    held(&shell.reserve("sku", buyers).await.unwrap());
    assert_eq!(shell.journal.events(&stream("sku")).len() as u64, version + 1);
}

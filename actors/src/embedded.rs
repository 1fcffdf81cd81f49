//! The embedded platform's bus: every actor in this process, found or started by key.

use crate::audit_log::AuditLog;
use crate::bus::CommandBus;
use crate::clock::Clock;
use crate::entity::{Cmd, Entity, EntityArgs, Passivate};
use crate::error::CommandError;
use crate::hosted::{Env, Hosted};
use crate::journal::{BoxFuture, Journal};
use crate::projections::Projections;
use crate::wakeups::Wakeups;
use domain::drop::{DropCommand, DropState, DropView, SaleStatus};
use domain::hub::{HubCommand, HubReply, HubState};
use domain::ledger::{LedgerCommand, LedgerReply, LedgerState};
use domain::limits::{ACTOR_RESTART_RETRIES, ACTOR_START_TIMEOUT_MS, COMMAND_TIMEOUT_MS, PASSIVATE_BATCH_DIVISOR};
use domain::registry::{HubSetup, RegistryCommand, RegistryReply, RegistryState};
use domain::sku::{SkuCommand, SkuReply, SkuState};
use domain::{CreatorId, DropId, HubId, Rejection, SkuId, UnixMillis};
use futures::{StreamExt, TryStreamExt};
use kameo::actor::{ActorRef, Spawn};
use kameo::error::{HookError, SendError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Live actors of one kind, by key, at most `max_live` of them running (see
/// `LIVE_ACTORS_MAX_DEFAULT`). The lock is held only to find or insert a reference, never
/// across a message.
struct Registry<H: Hosted> {
    inner: Mutex<Live<H>>,
    max_live: usize,
}

struct Live<H: Hosted> {
    actors: HashMap<H::Key, Running<H>>,
    /// Counts lookups: an entry's `used` is the count at its last lookup, so the smallest
    /// values are the least recently used actors.
    clock: u64,
    /// Entries asked to passivate and not used since: on their way out, not counted
    /// against the bound.
    passivating: usize,
}

struct Running<H: Hosted> {
    actor: ActorRef<Entity<H>>,
    used: u64,
    /// Shared with the actor, written only here under the lock (see `EntityArgs::passivate`).
    passivate: Arc<AtomicBool>,
}

impl<H: Hosted> Running<H> {
    fn passivating(&self) -> bool {
        self.passivate.load(Ordering::Relaxed)
    }
}

impl<H: Hosted> Live<H> {
    fn remove(&mut self, key: &H::Key) -> Option<Running<H>> {
        let removed = self.actors.remove(key);
        if removed.as_ref().is_some_and(|r| r.passivating()) {
            self.passivating -= 1;
        }
        removed
    }

    /// Drops entries whose actors stopped (a reference keeps a stopped actor's mailbox
    /// allocated), keeping `passivating` in step.
    fn forget_stopped(&mut self) {
        let mut forgotten = 0;
        self.actors.retain(|_, r| {
            let keep = r.actor.is_alive();
            forgotten += usize::from(!keep && r.passivating());
            keep
        });
        self.passivating -= forgotten;
    }

    /// Asks the least recently used running actors to passivate once more than `max_live`
    /// run: a batch of them (`1/PASSIVATE_BATCH_DIVISOR` of the bound), so the scan is
    /// paid once per batch of starts. An actor with a full mailbox is busy, not idle, and
    /// is left alone. The bound is soft: an actor asked to stop goes once its last write is
    /// durable (milliseconds), and one used again meanwhile stays and counts again.
    fn bound(&mut self, max_live: usize) {
        if self.actors.len() - self.passivating <= max_live {
            return;
        }
        self.forget_stopped();
        let running = self.actors.len() - self.passivating;
        if running <= max_live {
            return;
        }
        let batch = (running - max_live)
            .max(max_live / PASSIVATE_BATCH_DIVISOR)
            .min(running);
        let mut used: Vec<u64> = self
            .actors
            .values()
            .filter(|r| !r.passivating())
            .map(|r| r.used)
            .collect();
        let (_, &mut threshold, _) = used.select_nth_unstable(batch - 1);
        for running in self.actors.values() {
            if running.passivating() || running.used > threshold {
                continue;
            }
            running.passivate.store(true, Ordering::Relaxed);
            if running.actor.tell(Passivate).try_send().is_ok() {
                self.passivating += 1;
            } else {
                running.passivate.store(false, Ordering::Relaxed);
            }
        }
    }
}

impl<H: Hosted> Registry<H> {
    fn new(max_live: usize) -> Self {
        Registry {
            inner: Mutex::new(Live {
                actors: HashMap::new(),
                clock: 0,
                passivating: 0,
            }),
            max_live: max_live.max(1),
        }
    }

    fn get_or_spawn(&self, key: &H::Key, env: &Arc<Env>) -> ActorRef<Entity<H>> {
        let mut live = self.inner.lock().expect("registry lock");
        live.clock += 1;
        let now = live.clock;
        if let Some(running) = live.actors.get_mut(key) {
            if running.actor.is_alive() {
                running.used = now;
                // Used again: no longer on its way out, unless it already decided to stop
                // (then the command comes back as not delivered and `ask` starts a new one).
                let revived = running.passivate.swap(false, Ordering::Relaxed);
                let actor = running.actor.clone();
                if revived {
                    live.passivating -= 1;
                    live.bound(self.max_live);
                }
                return actor;
            }
        }
        let passivate = Arc::new(AtomicBool::new(false));
        let actor = Entity::<H>::spawn_with_mailbox(
            EntityArgs {
                key: key.clone(),
                env: env.clone(),
                passivate: passivate.clone(),
            },
            kameo::mailbox::bounded(H::mailbox_capacity()),
        );
        live.remove(key);
        live.actors.insert(
            key.clone(),
            Running {
                actor: actor.clone(),
                used: now,
                passivate,
            },
        );
        live.bound(self.max_live);
        actor
    }

    fn forget(&self, key: &H::Key, actor: &ActorRef<Entity<H>>) {
        let mut live = self.inner.lock().expect("registry lock");
        if live.actors.get(key).is_some_and(|r| r.actor.id() == actor.id()) {
            live.remove(key);
        }
    }

    async fn ask(&self, key: &H::Key, env: &Arc<Env>, command: H::Command) -> Result<H::Reply, CommandError> {
        let mut command = command;
        for _ in 0..=ACTOR_RESTART_RETRIES {
            let actor = self.get_or_spawn(key, env);
            let started = tokio::time::timeout(
                Duration::from_millis(ACTOR_START_TIMEOUT_MS),
                actor.wait_for_startup_result(),
            )
            .await;
            match started {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.forget(key, &actor);
                    return Err(match e {
                        HookError::Error(e) => e,
                        HookError::Panicked(p) => CommandError::Unavailable(format!("actor failed to start: {p}")),
                    });
                }
                Err(_) => {
                    self.forget(key, &actor);
                    actor.kill();
                    return Err(CommandError::Unavailable(format!(
                        "actor did not start within {ACTOR_START_TIMEOUT_MS} ms"
                    )));
                }
            }
            match deliver(&actor, command).await {
                Ok(replied) => return replied,
                // The actor stopped (idle) just before our command: start a fresh one.
                Err(c) => {
                    self.forget(key, &actor);
                    command = c;
                }
            }
        }
        Err(CommandError::Unavailable("actor keeps stopping".into()))
    }

    /// Gives `command` to the actor of `key` only if it is running (or starting), without
    /// starting one or counting it as a use: `None` when there is none, or it stopped first.
    /// For news an actor also reads when it starts.
    async fn ask_if_running(&self, key: &H::Key, command: H::Command) -> Option<Result<H::Reply, CommandError>> {
        let actor = {
            let live = self.inner.lock().expect("registry lock");
            live.actors.get(key).filter(|r| r.actor.is_alive())?.actor.clone()
        };
        match deliver(&actor, command).await {
            Ok(Err(CommandError::Unavailable(_))) | Err(_) => None,
            Ok(replied) => Some(replied),
        }
    }

    fn stop_matching(&self, matches: &impl Fn(&str) -> bool) -> usize {
        let mut live = self.inner.lock().expect("registry lock");
        let keys: Vec<H::Key> = live
            .actors
            .keys()
            .filter(|key| matches(&H::stream(key)))
            .cloned()
            .collect();
        for key in &keys {
            if let Some(running) = live.remove(key) {
                running.actor.kill();
            }
        }
        keys.len()
    }

    /// Forgets stopped actors.
    fn sweep(&self) {
        self.inner.lock().expect("registry lock").forget_stopped();
    }

    fn is_live(&self, key: &H::Key) -> bool {
        self.inner
            .lock()
            .expect("registry lock")
            .actors
            .get(key)
            .is_some_and(|r| r.actor.is_alive())
    }

    /// Keys of running actors that match `filter`.
    fn live_keys(&self, filter: impl Fn(&H::Key) -> bool) -> Vec<H::Key> {
        self.inner
            .lock()
            .expect("registry lock")
            .actors
            .iter()
            .filter(|(key, r)| r.actor.is_alive() && filter(key))
            .map(|(key, _)| key.clone())
            .collect()
    }

    fn live(&self) -> usize {
        self.inner
            .lock()
            .expect("registry lock")
            .actors
            .values()
            .filter(|r| r.actor.is_alive())
            .count()
    }
}

/// Asks `actor` and waits for its reply; `Err` gives the command back when the actor was
/// no longer running (it stopped just before), so the caller may start a new one.
async fn deliver<H: Hosted>(
    actor: &ActorRef<Entity<H>>,
    command: H::Command,
) -> Result<Result<H::Reply, CommandError>, H::Command> {
    let sent = actor
        .ask(Cmd::<H>(command))
        .reply_timeout(Duration::from_millis(COMMAND_TIMEOUT_MS))
        .try_send()
        .await;
    Ok(match sent {
        Ok(reply) => Ok(reply),
        Err(SendError::HandlerError(e)) => Err(e),
        Err(SendError::MailboxFull(_)) => Err(CommandError::Overloaded("actor mailbox is full".into())),
        Err(SendError::Timeout(_)) => Err(CommandError::Timeout(COMMAND_TIMEOUT_MS)),
        Err(SendError::ActorNotRunning(Cmd(c)) | SendError::ActorRestarting(Cmd(c))) => return Err(c),
        Err(SendError::ActorStopped) => Err(CommandError::Unavailable("actor stopped before replying".into())),
    })
}

/// How often stopped actors are forgotten by the registries.
const REGISTRY_SWEEP_MS: u64 = 5_000;

/// SKU actors told about a status change at once.
const STATUS_FAN_OUT: usize = 64;

/// All drop and SKU actors of this process: the embedded [`CommandBus`].
pub struct LocalActors {
    env: Arc<Env>,
    drops: Registry<DropState>,
    skus: Registry<SkuState>,
    hubs: Registry<HubState>,
    registry: Registry<RegistryState>,
    creators: Registry<LedgerState>,
}

impl LocalActors {
    /// Starts the actor system, at most `live_actors_max` actors of each kind running;
    /// deadlines recorded in the journal are scheduled at once.
    pub fn new(
        journal: Arc<dyn Journal>,
        clock: Arc<dyn Clock>,
        projections: Arc<Projections>,
        audit: Arc<dyn AuditLog>,
        live_actors_max: usize,
    ) -> Result<Arc<LocalActors>, CommandError> {
        let pending: Vec<(String, UnixMillis)> = journal
            .wakeups()
            .map_err(|e| CommandError::Storage(e.to_string()))?
            .into_iter()
            .map(|(stream, at)| (stream, UnixMillis(at)))
            .collect();
        let actors = Arc::new_cyclic(|weak: &std::sync::Weak<LocalActors>| {
            let bus: std::sync::Weak<dyn CommandBus> = weak.clone();
            LocalActors::with_bus(journal, clock, projections, audit, bus, pending, live_actors_max)
        });
        LocalActors::start_sweeper(&actors);
        Ok(actors)
    }

    /// The actors of this process, asking other actors through `bus` (the cluster's bus
    /// when this process is one node of a cluster), with `pending` deadlines scheduled and
    /// at most `live_actors_max` actors of each kind running.
    pub fn with_bus(
        journal: Arc<dyn Journal>,
        clock: Arc<dyn Clock>,
        projections: Arc<Projections>,
        audit: Arc<dyn AuditLog>,
        bus: std::sync::Weak<dyn CommandBus>,
        pending: Vec<(String, UnixMillis)>,
        live_actors_max: usize,
    ) -> LocalActors {
        // Audit entries are projection updates (every node of a cluster keeps the trail);
        // they land in this process's audit store.
        projections.set_audit(audit.clone());
        LocalActors {
            env: Arc::new(Env {
                journal,
                wakeups: Wakeups::start(bus.clone(), clock.clone(), pending),
                audit,
                runtime: tokio::runtime::Handle::current(),
                clock,
                projections,
                bus,
            }),
            drops: Registry::new(live_actors_max),
            skus: Registry::new(live_actors_max),
            hubs: Registry::new(live_actors_max),
            registry: Registry::new(live_actors_max),
            creators: Registry::new(live_actors_max),
        }
    }

    /// Forgets stopped actors every `REGISTRY_SWEEP_MS` while `actors` lives.
    pub fn start_sweeper(actors: &Arc<LocalActors>) {
        let weak = Arc::downgrade(actors);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(REGISTRY_SWEEP_MS));
            loop {
                every.tick().await;
                let Some(actors) = weak.upgrade() else { return };
                actors.drops.sweep();
                actors.skus.sweep();
                actors.hubs.sweep();
                actors.creators.sweep();
            }
        });
    }

    /// Stops at once every running actor whose journal stream matches (a partition this
    /// node no longer owns). Appends already handed to the journal still complete, or fail
    /// its fencing check.
    pub fn stop_streams(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.drops.stop_matching(&matches)
            + self.skus.stop_matching(&matches)
            + self.hubs.stop_matching(&matches)
            + self.registry.stop_matching(&matches)
            + self.creators.stop_matching(&matches)
    }

    pub fn env(&self) -> &Arc<Env> {
        &self.env
    }

    /// Number of running actors (drops, SKUs).
    pub fn live_actors(&self) -> (usize, usize) {
        (self.drops.live(), self.skus.live())
    }
}

impl CommandBus for LocalActors {
    fn sku_command(
        &self,
        drop_id: DropId,
        sku_id: SkuId,
        command: SkuCommand,
    ) -> BoxFuture<'_, Result<SkuReply, CommandError>> {
        Box::pin(async move { self.skus.ask(&(drop_id, sku_id), &self.env, command).await })
    }

    fn drop_command(&self, drop_id: DropId, command: DropCommand) -> BoxFuture<'_, Result<DropView, CommandError>> {
        Box::pin(async move {
            self.drops.ask(&drop_id, &self.env, command).await.map_err(|e| match e {
                // A drop not created yet has no spec, so its state cannot name itself: the key does.
                CommandError::Rejected(Rejection::NotFound { what, id }) if id.is_empty() => {
                    CommandError::Rejected(Rejection::not_found(&what, drop_id.as_str()))
                }
                e => e,
            })
        })
    }

    fn wake(&self, stream: String) -> BoxFuture<'_, Result<(), CommandError>> {
        Box::pin(async move {
            if let Some(key) = SkuState::key_of_stream(&stream) {
                return self.skus.ask(&key, &self.env, SkuCommand::ExpireDue).await.map(|_| ());
            }
            if let Some(key) = HubState::key_of_stream(&stream) {
                return self.hubs.ask(&key, &self.env, HubCommand::ExpireDue).await.map(|_| ());
            }
            if let Some(key) = LedgerState::key_of_stream(&stream) {
                return self
                    .creators
                    .ask(&key, &self.env, LedgerCommand::ReleaseDue)
                    .await
                    .map(|_| ());
            }
            Err(CommandError::Storage(format!(
                "no actor has deadlines in stream {stream}"
            )))
        })
    }

    fn hub_command(&self, hub_id: HubId, command: HubCommand) -> BoxFuture<'_, Result<HubReply, CommandError>> {
        Box::pin(async move { self.hubs.ask(&hub_id, &self.env, command).await })
    }

    fn registry_command(&self, command: RegistryCommand) -> BoxFuture<'_, Result<RegistryReply, CommandError>> {
        Box::pin(async move { self.registry.ask(&(), &self.env, command).await })
    }

    fn hub_setup_changed(&self, setup: HubSetup) -> BoxFuture<'_, Result<(), CommandError>> {
        Box::pin(async move {
            let hub_id = setup.spec.hub_id.clone();
            if !self.hubs.is_live(&hub_id) {
                return Ok(());
            }
            self.hubs
                .ask(&hub_id, &self.env, HubCommand::Setup(setup))
                .await
                .map(|_| ())
        })
    }

    fn creator_command(
        &self,
        creator_id: CreatorId,
        command: LedgerCommand,
    ) -> BoxFuture<'_, Result<LedgerReply, CommandError>> {
        Box::pin(async move { self.creators.ask(&creator_id, &self.env, command).await })
    }

    fn sale_status_changed(&self, drop_id: DropId, status: SaleStatus) -> BoxFuture<'_, Result<(), CommandError>> {
        Box::pin(async move {
            // An actor starting right now is already registered, so it is in this list (its
            // start-up read of the drop may predate the change); one registered after this
            // read starts by reading the drop, which already records the change.
            // Only running actors are told, and telling them is not a use (it would keep
            // them running past the bound): one that stopped meanwhile reads the status when
            // it starts again.
            let live = self.skus.live_keys(|(d, _)| *d == drop_id);
            futures::stream::iter(live.into_iter().map(|key| async move {
                self.skus
                    .ask_if_running(&key, SkuCommand::SetSaleStatus(status))
                    .await
                    .unwrap_or(Ok(SkuReply::Done))
            }))
            .buffer_unordered(STATUS_FAN_OUT)
            .try_for_each(|_| async { Ok(()) })
            .await
        })
    }
}

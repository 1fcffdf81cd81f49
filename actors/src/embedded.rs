//! The embedded platform's bus: every actor in this process, found or started by key.
//! One [`Registry`] per hosted kind, found by the kind's name; nothing here names an
//! aggregate but the list of kinds every platform hosts ([`LocalActors::with_bus`]).

use crate::ask::{Letter, Letters};
use crate::audit_log::AuditLog;
use crate::bus::{wire_decode, wire_encode, AnyReply, BatchParcel, CommandBus, Parcel};
use crate::clock::Clock;
use crate::entity::{Cmd, CmdBatch, Entity, EntityArgs, Passivate};
use crate::error::CommandError;
use crate::hosted::{kind_of_stream, Env, Hosted};
use crate::journal::{BoxFuture, Journal};
use crate::limits::{
    ACTOR_RESTART_RETRIES, ACTOR_START_TIMEOUT_MS, COMMAND_TIMEOUT_MS, PASSIVATE_BATCH_DIVISOR, REGISTRY_SWEEP_MS,
};
use crate::projections::Projections;
use crate::telemetry::KindFigures;
use crate::wakeups::Wakeups;
use domain::drop::DropState;
use domain::hub::HubState;
use domain::ledger::LedgerState;
use domain::registry::RegistryState;
use domain::sku::SkuState;
use domain::UnixMillis;
use kameo::actor::{ActorRef, Spawn};
use kameo::error::{HookError, SendError};
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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
        // The count of actors on their way out is kept exact (flags are written only under
        // this lock), or the bound would count them wrongly from here on. O(n), as the scan.
        debug_assert_eq!(
            self.passivating,
            self.actors.values().filter(|r| r.passivating()).count()
        );
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
        self.ask_started(key, env, command).await.map_err(|e| match e {
            CommandError::Rejected(rejection) => CommandError::Rejected(H::name_rejection(key, rejection)),
            e => e,
        })
    }

    async fn ask_started(&self, key: &H::Key, env: &Arc<Env>, command: H::Command) -> Result<H::Reply, CommandError> {
        let mut command = command;
        for _ in 0..=ACTOR_RESTART_RETRIES {
            let actor = self.started(key, env).await?;
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

    /// [`Registry::ask`] for several commands, decided in order into one journal batch.
    async fn ask_batch(
        &self,
        key: &H::Key,
        env: &Arc<Env>,
        commands: Vec<H::Command>,
    ) -> Vec<Result<H::Reply, CommandError>> {
        let count = commands.len();
        let outcomes = match self.ask_started_batch(key, env, commands).await {
            Ok(outcomes) => outcomes,
            Err(e) => return (0..count).map(|_| Err(e.clone())).collect(),
        };
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.map_err(|e| match e {
                    CommandError::Rejected(rejection) => CommandError::Rejected(H::name_rejection(key, rejection)),
                    e => e,
                })
            })
            .collect()
    }

    /// [`Registry::ask_started`] for a batch: `Err` when the batch reached no actor (every
    /// command gets that error), else one outcome per command.
    async fn ask_started_batch(
        &self,
        key: &H::Key,
        env: &Arc<Env>,
        commands: Vec<H::Command>,
    ) -> Result<Vec<Result<H::Reply, CommandError>>, CommandError> {
        let mut commands = commands;
        for _ in 0..=ACTOR_RESTART_RETRIES {
            let actor = self.started(key, env).await?;
            match deliver_batch(&actor, commands).await {
                Ok(replied) => return replied,
                Err(c) => {
                    self.forget(key, &actor);
                    commands = c;
                }
            }
        }
        Err(CommandError::Unavailable("actor keeps stopping".into()))
    }

    /// The running actor of `key`, started (and recovered) first if needed.
    async fn started(&self, key: &H::Key, env: &Arc<Env>) -> Result<ActorRef<Entity<H>>, CommandError> {
        let actor = self.get_or_spawn(key, env);
        let started = tokio::time::timeout(
            Duration::from_millis(ACTOR_START_TIMEOUT_MS),
            actor.wait_for_startup_result(),
        )
        .await;
        match started {
            Ok(Ok(())) => Ok(actor),
            Ok(Err(e)) => {
                self.forget(key, &actor);
                Err(match e {
                    HookError::Error(e) => e,
                    HookError::Panicked(p) => CommandError::Unavailable(format!("actor failed to start: {p}")),
                })
            }
            Err(_) => {
                self.forget(key, &actor);
                actor.kill();
                Err(CommandError::Unavailable(format!(
                    "actor did not start within {ACTOR_START_TIMEOUT_MS} ms"
                )))
            }
        }
    }

    /// Hands `command` to the actor of `key` if it is running (or starting), without waiting
    /// for its reply, starting one or counting it as a use. For news an actor also reads
    /// when it starts: one that is not running, or stops first, learns it then.
    fn tell(&self, key: &H::Key, command: H::Command) -> Result<(), CommandError> {
        let actor = {
            let live = self.inner.lock().expect("registry lock");
            match live.actors.get(key).filter(|r| r.actor.is_alive()) {
                Some(running) => running.actor.clone(),
                None => return Ok(()),
            }
        };
        match actor.tell(Cmd::<H>(command, tracing::Span::none())).try_send() {
            Err(SendError::MailboxFull(_)) => Err(CommandError::Overloaded("actor mailbox is full".into())),
            Ok(()) | Err(_) => Ok(()),
        }
    }

    fn stop_matching(&self, matches: &dyn Fn(&str) -> bool) -> usize {
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

    fn live(&self) -> usize {
        self.inner
            .lock()
            .expect("registry lock")
            .actors
            .values()
            .filter(|r| r.actor.is_alive())
            .count()
    }

    /// Running actors and what waits in their mailboxes, read from the mailboxes' free
    /// capacity (nothing is counted on the command path). Takes the lock for one pass over
    /// the running actors: a scrape's cost, not a command's.
    fn figures(&self) -> KindFigures {
        let live = self.inner.lock().expect("registry lock");
        let mut figures = KindFigures {
            kind: H::KIND,
            running: 0,
            queued: 0,
            queued_max: 0,
        };
        for running in live.actors.values().filter(|r| r.actor.is_alive()) {
            let mailbox = running.actor.mailbox_sender();
            let queued = mailbox
                .max_capacity()
                .zip(mailbox.capacity())
                .map_or(0, |(max, free)| max.saturating_sub(free)) as u64;
            figures.running += 1;
            figures.queued += queued;
            figures.queued_max = figures.queued_max.max(queued);
        }
        figures
    }
}

/// Asks `actor` and waits for its reply; `Err` gives the command back when the actor was
/// no longer running (it stopped just before), so the caller may start a new one.
async fn deliver<H: Hosted>(
    actor: &ActorRef<Entity<H>>,
    command: H::Command,
) -> Result<Result<H::Reply, CommandError>, H::Command> {
    let sent = actor
        .ask(Cmd::<H>(command, tracing::Span::current()))
        .reply_timeout(Duration::from_millis(COMMAND_TIMEOUT_MS))
        .try_send()
        .await;
    Ok(match sent {
        Ok(reply) => Ok(reply),
        Err(SendError::HandlerError(e)) => Err(e),
        Err(SendError::MailboxFull(_)) => Err(CommandError::Overloaded("actor mailbox is full".into())),
        Err(SendError::Timeout(_)) => Err(CommandError::Timeout(COMMAND_TIMEOUT_MS)),
        Err(SendError::ActorNotRunning(Cmd(c, _)) | SendError::ActorRestarting(Cmd(c, _))) => return Err(c),
        Err(SendError::ActorStopped) => Err(CommandError::Unavailable("actor stopped before replying".into())),
    })
}

/// [`deliver`] for a batch of commands (`entity::CmdBatch`): one message, one reply with
/// every command's outcome.
async fn deliver_batch<H: Hosted>(
    actor: &ActorRef<Entity<H>>,
    commands: Vec<H::Command>,
) -> Result<Result<Vec<Result<H::Reply, CommandError>>, CommandError>, Vec<H::Command>> {
    let sent = actor
        .ask(CmdBatch::<H>(commands, tracing::Span::current()))
        .reply_timeout(Duration::from_millis(COMMAND_TIMEOUT_MS))
        .try_send()
        .await;
    Ok(match sent {
        Ok(outcomes) => Ok(outcomes),
        Err(SendError::HandlerError(never)) => match never {},
        Err(SendError::MailboxFull(_)) => Err(CommandError::Overloaded("actor mailbox is full".into())),
        Err(SendError::Timeout(_)) => Err(CommandError::Timeout(COMMAND_TIMEOUT_MS)),
        Err(SendError::ActorNotRunning(CmdBatch(c, _)) | SendError::ActorRestarting(CmdBatch(c, _))) => return Err(c),
        Err(SendError::ActorStopped) => Err(CommandError::Unavailable("actor stopped before replying".into())),
    })
}

/// One hosted kind's registry, its aggregate's type erased: what the bus and the cluster
/// need to reach actors of a kind they know only by name.
trait Host: Send + Sync + 'static {
    /// Runs a [`Letter`] of this kind.
    fn ask<'a>(
        &'a self,
        env: &'a Arc<Env>,
        letter: Box<dyn Any + Send>,
    ) -> BoxFuture<'a, Result<AnyReply, CommandError>>;
    /// Runs a [`Letters`] of this kind: one outcome per command, in order.
    fn ask_batch<'a>(
        &'a self,
        env: &'a Arc<Env>,
        letters: Box<dyn Any + Send>,
        count: usize,
    ) -> BoxFuture<'a, Vec<Result<AnyReply, CommandError>>>;
    /// Hands a [`Letter`] of this kind to its actor if it runs.
    fn tell(&self, letter: Box<dyn Any + Send>) -> Result<(), CommandError>;
    /// Runs the timer command of the actor of `stream`.
    fn wake<'a>(&'a self, env: &'a Arc<Env>, stream: &'a str) -> BoxFuture<'a, Result<(), CommandError>>;
    /// Runs (or, with `tell`, hands over) an encoded command for the actor of `stream`, and
    /// encodes its reply (empty for `tell`).
    fn serve<'a>(
        &'a self,
        env: &'a Arc<Env>,
        stream: &'a str,
        command: &'a [u8],
        tell: bool,
    ) -> BoxFuture<'a, Result<Vec<u8>, CommandError>>;
    fn stop_matching(&self, matches: &dyn Fn(&str) -> bool) -> usize;
    fn sweep(&self);
    fn live(&self) -> usize;
    fn figures(&self) -> KindFigures;
}

fn letter<H: Hosted>(letter: Box<dyn Any + Send>) -> Result<Letter<H>, CommandError> {
    letter.downcast::<Letter<H>>().map(|letter| *letter).map_err(|_| {
        CommandError::Unavailable(format!(
            "a command for kind {} is of another type: two kinds share the name",
            H::KIND
        ))
    })
}

fn key_of<H: Hosted>(stream: &str) -> Result<H::Key, CommandError> {
    H::key_of_stream(stream)
        .ok_or_else(|| CommandError::Unavailable(format!("{stream} is not a stream of kind {}", H::KIND)))
}

impl<H: Hosted> Host for Registry<H> {
    fn ask<'a>(
        &'a self,
        env: &'a Arc<Env>,
        parcel: Box<dyn Any + Send>,
    ) -> BoxFuture<'a, Result<AnyReply, CommandError>> {
        Box::pin(async move {
            let Letter { key, command } = letter::<H>(parcel)?;
            let reply = Registry::ask(self, &key, env, command).await?;
            Ok(Box::new(reply) as AnyReply)
        })
    }

    fn ask_batch<'a>(
        &'a self,
        env: &'a Arc<Env>,
        letters: Box<dyn Any + Send>,
        count: usize,
    ) -> BoxFuture<'a, Vec<Result<AnyReply, CommandError>>> {
        Box::pin(async move {
            let Letters { key, commands } = match letters.downcast::<Letters<H>>() {
                Ok(letters) => *letters,
                Err(_) => {
                    let error = CommandError::Unavailable(format!(
                        "commands for kind {} are of another type: two kinds share the name",
                        H::KIND
                    ));
                    return (0..count).map(|_| Err(error.clone())).collect();
                }
            };
            Registry::ask_batch(self, &key, env, commands)
                .await
                .into_iter()
                .map(|outcome| outcome.map(|reply| Box::new(reply) as AnyReply))
                .collect()
        })
    }

    fn tell(&self, parcel: Box<dyn Any + Send>) -> Result<(), CommandError> {
        let Letter { key, command } = letter::<H>(parcel)?;
        Registry::tell(self, &key, command)
    }

    fn wake<'a>(&'a self, env: &'a Arc<Env>, stream: &'a str) -> BoxFuture<'a, Result<(), CommandError>> {
        Box::pin(async move {
            let command = H::timer_command()
                .ok_or_else(|| CommandError::Storage(format!("no actor has deadlines in stream {stream}")))?;
            Registry::ask(self, &key_of::<H>(stream)?, env, command).await.map(drop)
        })
    }

    fn serve<'a>(
        &'a self,
        env: &'a Arc<Env>,
        stream: &'a str,
        command: &'a [u8],
        tell: bool,
    ) -> BoxFuture<'a, Result<Vec<u8>, CommandError>> {
        Box::pin(async move {
            let key = key_of::<H>(stream)?;
            let command: H::Command = wire_decode(command)?;
            if tell {
                Registry::tell(self, &key, command)?;
                return Ok(Vec::new());
            }
            wire_encode(&Registry::ask(self, &key, env, command).await?)
        })
    }

    fn stop_matching(&self, matches: &dyn Fn(&str) -> bool) -> usize {
        Registry::stop_matching(self, matches)
    }

    fn sweep(&self) {
        Registry::sweep(self)
    }

    fn live(&self) -> usize {
        Registry::live(self)
    }

    fn figures(&self) -> KindFigures {
        Registry::figures(self)
    }
}

/// Every actor of this process, by kind: the embedded [`CommandBus`], and the local part
/// of a cluster node.
pub struct LocalActors {
    env: Arc<Env>,
    /// By [`Hosted::KIND`]; written only when a kind is added.
    hosts: RwLock<HashMap<&'static str, Arc<dyn Host>>>,
    live_actors_max: usize,
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
    /// at most `live_actors_max` actors of each kind running. Hosts the platform's kinds:
    /// drops, SKUs, hubs, the partner registry and creators' ledgers.
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
        let actors = LocalActors {
            env: Arc::new(Env {
                journal,
                wakeups: Wakeups::start(bus.clone(), clock.clone(), pending),
                audit,
                runtime: tokio::runtime::Handle::current(),
                clock,
                projections,
                bus,
                stats: Arc::default(),
            }),
            hosts: RwLock::new(HashMap::new()),
            live_actors_max,
        };
        actors.host::<DropState>();
        actors.host::<SkuState>();
        actors.host::<HubState>();
        actors.host::<RegistryState>();
        actors.host::<LedgerState>();
        actors
    }

    /// Hosts the actors of `H` here (if not yet): commands for them are run here, and, in a
    /// cluster, commands for them from other nodes are decoded here. Every node of a cluster
    /// must host the same kinds.
    pub fn host<H: Hosted>(&self) {
        let mut hosts = self.hosts.write().expect("hosts lock");
        hosts
            .entry(H::KIND)
            .or_insert_with(|| Arc::new(Registry::<H>::new(self.live_actors_max)));
    }

    fn host_of(&self, kind: &str) -> Result<Arc<dyn Host>, CommandError> {
        self.hosts
            .read()
            .expect("hosts lock")
            .get(kind)
            .cloned()
            .ok_or_else(|| CommandError::Unavailable(format!("no actor of kind {kind} is hosted here")))
    }

    fn hosts(&self) -> Vec<Arc<dyn Host>> {
        self.hosts.read().expect("hosts lock").values().cloned().collect()
    }

    /// Forgets stopped actors every `REGISTRY_SWEEP_MS` while `actors` lives.
    pub fn start_sweeper(actors: &Arc<LocalActors>) {
        let weak = Arc::downgrade(actors);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(REGISTRY_SWEEP_MS));
            loop {
                every.tick().await;
                let Some(actors) = weak.upgrade() else { return };
                for host in actors.hosts() {
                    host.sweep();
                }
            }
        });
    }

    /// Stops at once every running actor whose journal stream matches (a partition this
    /// node no longer owns). Appends already handed to the journal still complete, or fail
    /// its fencing check.
    pub fn stop_streams(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.hosts().iter().map(|host| host.stop_matching(&matches)).sum()
    }

    pub fn env(&self) -> &Arc<Env> {
        &self.env
    }

    /// Number of running actors of kind `H`.
    pub fn live<H: Hosted>(&self) -> usize {
        self.host_of(H::KIND).map_or(0, |host| host.live())
    }

    /// Running actors and queued commands of every hosted kind, by kind name.
    pub fn figures(&self) -> Vec<KindFigures> {
        let mut figures: Vec<KindFigures> = self.hosts().iter().map(|host| host.figures()).collect();
        figures.sort_by_key(|f| f.kind);
        figures
    }

    /// What the actors of this process counted (hubs' swaps and SLA misses).
    pub fn stats(&self) -> &Arc<crate::telemetry::ActorStats> {
        &self.env.stats
    }

    /// Number of running actors (drops, SKUs).
    pub fn live_actors(&self) -> (usize, usize) {
        (self.live::<DropState>(), self.live::<SkuState>())
    }

    /// Runs an encoded command from another node (see [`Host::serve`]).
    pub async fn serve(&self, kind: &str, stream: &str, command: &[u8], tell: bool) -> Result<Vec<u8>, CommandError> {
        self.host_of(kind)?.serve(&self.env, stream, command, tell).await
    }
}

impl CommandBus for LocalActors {
    fn ask_parcel(&self, parcel: Box<dyn Parcel>) -> BoxFuture<'_, Result<AnyReply, CommandError>> {
        Box::pin(async move {
            let host = self.host_of(parcel.kind())?;
            host.ask(&self.env, parcel.into_any()).await
        })
    }

    fn ask_batch_parcel(&self, batch: Box<dyn BatchParcel>) -> BoxFuture<'_, Vec<Result<AnyReply, CommandError>>> {
        Box::pin(async move {
            let count = batch.count();
            match self.host_of(batch.kind()) {
                Ok(host) => host.ask_batch(&self.env, batch.into_any(), count).await,
                Err(e) => (0..count).map(|_| Err(e.clone())).collect(),
            }
        })
    }

    fn tell_parcel(&self, parcel: Box<dyn Parcel>) -> BoxFuture<'_, Result<(), CommandError>> {
        Box::pin(async move { self.host_of(parcel.kind())?.tell(parcel.into_any()) })
    }

    fn wake(&self, stream: String) -> BoxFuture<'_, Result<(), CommandError>> {
        Box::pin(async move { self.host_of(kind_of_stream(&stream))?.wake(&self.env, &stream).await })
    }
}

//! The one actor shell every aggregate runs in. For each command it: takes a journal
//! permit (RESOURCE_EXHAUSTED at once if the journal queue is full), decides, applies the
//! events in memory, and hands them to the journal with the reply. The journal writer
//! group-commits whatever all actors handed it and runs the completions after the flush,
//! so a reply (even a rejection or a read) never reveals state that is not yet durable,
//! while the actor goes on deciding the next commands meanwhile: one fsync per batch, not
//! per buyer.
//!
//! While the journal refuses writes (its disk is full, or its storage failed), a command
//! that would change the state gets that refusal and nothing is applied: the state stays
//! what the journal holds, and reads and rejections are still answered (through barriers).
//!
//! Actors start on first use (snapshot + journal replay), keep their earliest deadline
//! (hold expiry, outbox retry) in their own receive loop rather than in a timer task, and
//! stop when idle with nothing pending.

use crate::audit_log::AuditEntry;
use crate::codec;
use crate::error::CommandError;
use crate::hosted::{Env, Hosted, Publication};
use crate::journal::{AppendBatch, AppendPermit, JournalError};
use crate::limits::{
    ACTOR_IDLE_STOP_MS, INVARIANT_CHECK_SHARE, PASSIVATE_POLL_MS, PASSIVATE_RETRY_MAX_MS, SNAPSHOT_BUSY_MIN_EVENTS,
    SNAPSHOT_IDLE_MIN_EVENTS, SNAPSHOT_OFF_WORKER_ENTRIES, SNAPSHOT_QUIET_MS, SNAPSHOT_STATE_FACTOR, TIMER_RETRY_MS,
};
use crate::projections::ProjectionUpdate;
use domain::UnixMillis;
use kameo::actor::{ActorRef, WeakActorRef};
use kameo::mailbox::{MailboxReceiver, Signal};
use kameo::message::{Context, Message};
use kameo::reply::DelegatedReply;
use kameo::Actor;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

/// A command for the hosted aggregate; the reply comes once it is durable. The span is the
/// caller's (a gRPC call's, with its request id; `Span::none()` for timers and untraced
/// callers): with `actors::entity=debug` spans on (trace export turns them on), it parents
/// a `command` span the command is decided in, and that one a `journal_append` span that
/// closes when the batch is durable.
pub struct Cmd<H: Hosted>(pub H::Command, pub tracing::Span);

/// Commands for the hosted aggregate decided one after another into one journal batch: one
/// permit, one append, one completion for all of them, each with its own reply (a
/// rejection refuses only its own command). A caller with many commands for one actor (a
/// storefront's stream of reserves) pays the mailbox, the journal queue and the completion
/// once per batch instead of once per command. The replies come once the batch is durable.
/// The span as for [`Cmd`].
pub struct CmdBatch<H: Hosted>(pub Vec<H::Command>, pub tracing::Span);

/// Wakes a running actor whose registry set its `passivate` flag (see [`EntityArgs`]), so
/// it stops as soon as it is idle instead of waiting out `ACTOR_IDLE_STOP_MS`.
pub struct Passivate;

type ReplyFn<R> = Box<dyn FnOnce(Result<R, CommandError>) + Send>;
type BatchReplyFn<R> = Box<dyn FnOnce(Vec<Result<R, CommandError>>) + Send>;

pub struct EntityArgs<H: Hosted> {
    pub key: H::Key,
    pub env: Arc<Env>,
    /// Set and cleared only by the actor's registry, under its lock: set when it asks the
    /// actor to stop early (the running actors are bounded), cleared when it hands the actor
    /// a new command. The actor only reads it, so the registry's count of actors on their
    /// way out stays exact.
    pub passivate: Arc<AtomicBool>,
}

pub struct Entity<H: Hosted> {
    stream: String,
    /// Boxed: kameo keeps the actor inside its lifecycle future, in more than one place,
    /// so an inline state (624 bytes for a SKU) is paid several times per running actor.
    state: Box<H>,
    /// Number of events in the stream (the version of the last one).
    version: u64,
    events_since_snapshot: u64,
    env: Arc<Env>,
    /// The deadline whose timer command last ran, and when it may run again should that
    /// deadline still be the earliest afterwards (the command did not go through, e.g. the
    /// journal was full): a retry 100 ms later, not a tight loop.
    fired: Option<(UnixMillis, UnixMillis)>,
    /// Appends handed to the journal and not yet completed.
    in_flight: Arc<AtomicUsize>,
    /// The version the next completed batch starts at (debug builds: see `append`).
    next_completed: Arc<AtomicU64>,
    /// The next deadline last handed to the journal (`None`: not known yet). An actor stops
    /// only once its current deadline is durable there, for the wake-up scheduler.
    wakeup_written: Option<Option<UnixMillis>>,
    /// Asked by the registry to stop early (see [`EntityArgs::passivate`]).
    passivate: Arc<AtomicBool>,
    /// Events applied since the invariants were last checked (debug builds, see `check`).
    unchecked: u64,
    /// The size of the last snapshot encoded (0: none yet), to size the next one's buffer.
    snapshot_bytes: usize,
}

fn decode<T: serde::de::DeserializeOwned>(stream: &str, bytes: &[u8]) -> Result<T, CommandError> {
    codec::decode(bytes).map_err(|e| CommandError::Storage(format!("{stream}: undecodable journal entry: {e}")))
}

impl<H: Hosted> Entity<H> {
    /// The span a traced caller's command is decided in: a `command` child of the caller's
    /// span when `actors::entity` spans are enabled at debug (what trace export turns on),
    /// and its append then gets a `journal_append` child. Otherwise none: the caller's span
    /// is only carried, not entered, since entering and leaving it costs more per command
    /// than the shell's rare log lines are worth (a disabled span costs a filter check).
    fn command_span(&self, caller: tracing::Span, commands: usize) -> Option<tracing::Span> {
        if caller.is_none() {
            return None;
        }
        let span = tracing::debug_span!(parent: &caller, "command", kind = H::KIND, stream = %self.stream, commands);
        (!span.is_disabled()).then_some(span)
    }

    /// Decides a command and hands the outcome to the journal; `reply` runs when durable.
    fn execute(&mut self, command: H::Command, actor: WeakActorRef<Self>, reply: ReplyFn<H::Reply>) {
        let permit = match self.env.journal.try_reserve() {
            Ok(permit) => permit,
            Err(JournalError::Full) => return reply(Err(CommandError::Overloaded("journal queue is full".into()))),
            Err(e) => return reply(Err(CommandError::from_journal(e))),
        };
        let now = self.env.clock.now();
        let (events, outcome) = match self.state.decide(command, now) {
            Ok((events, answer)) => (events, Ok(answer)),
            Err(rejection) => (Vec::new(), Err(CommandError::Rejected(rejection))),
        };
        let refusal = (!events.is_empty()).then(|| self.env.journal.write_refusal()).flatten();
        let (events, outcome) = match refusal {
            // The events are not applied: the state stays what the journal holds, and the
            // barrier below keeps this answer behind everything earlier.
            Some(refusal) => (Vec::new(), Err(CommandError::from_journal(refusal))),
            None => (events, outcome),
        };
        for event in &events {
            self.state.apply(event);
        }
        let (batch, publication) = self.batch_of(&events);
        self.append(permit, batch, actor, move |written| match written {
            Ok(()) => {
                if let Some(publish) = publication {
                    publish();
                }
                reply(outcome);
            }
            Err(e) => reply(Err(CommandError::from_journal(e))),
        });
    }

    /// Decides `commands` in order, each seeing the events of those before it, and hands all
    /// their events to the journal as one batch; `reply` gets every outcome, in order, once
    /// that batch is durable.
    fn execute_batch(&mut self, commands: Vec<H::Command>, actor: WeakActorRef<Self>, reply: BatchReplyFn<H::Reply>) {
        let refuse_all = |n: usize, error: CommandError| (0..n).map(|_| Err(error.clone())).collect();
        let permit = match self.env.journal.try_reserve() {
            Ok(permit) => permit,
            Err(JournalError::Full) => {
                return reply(refuse_all(
                    commands.len(),
                    CommandError::Overloaded("journal queue is full".into()),
                ))
            }
            Err(e) => return reply(refuse_all(commands.len(), CommandError::from_journal(e))),
        };
        let now = self.env.clock.now();
        let refusal = self.env.journal.write_refusal();
        let mut outcomes = Vec::with_capacity(commands.len());
        let mut events = Vec::new();
        for command in commands {
            match self.state.decide(command, now) {
                // Nothing applied while the journal refuses writes: each command is decided
                // against the state the journal holds.
                Ok((decided, _)) if !decided.is_empty() && refusal.is_some() => {
                    outcomes.push(Err(CommandError::from_journal(refusal.clone().expect("a refusal"))));
                }
                Ok((decided, answer)) => {
                    for event in &decided {
                        self.state.apply(event);
                    }
                    events.extend(decided);
                    outcomes.push(Ok(answer));
                }
                Err(rejection) => outcomes.push(Err(CommandError::Rejected(rejection))),
            }
        }
        let (batch, publication) = self.batch_of(&events);
        self.append(permit, batch, actor, move |written| match written {
            Ok(()) => {
                if let Some(publish) = publication {
                    publish();
                }
                reply(outcomes);
            }
            Err(e) => {
                let error = CommandError::from_journal(e);
                reply(refuse_all(outcomes.len(), error));
            }
        });
    }

    /// The journal batch for `events`, already applied to the state (none: a barrier for a
    /// rejection or a read), with a snapshot when one is due and the next deadline if it
    /// changed, and what to publish once it is durable.
    fn batch_of(&mut self, events: &[H::Event]) -> (AppendBatch, Option<Publication>) {
        let mut batch = AppendBatch {
            stream: self.stream.clone(),
            first_version: self.version + 1,
            ..AppendBatch::default()
        };
        let mut publication = None;
        if !events.is_empty() {
            batch.events = events.iter().map(codec::encode).collect();
            self.check(events.len() as u64);
            self.version += events.len() as u64;
            self.events_since_snapshot += events.len() as u64;
            let busy_limit = SNAPSHOT_BUSY_MIN_EVENTS.max(SNAPSHOT_STATE_FACTOR * self.state.snapshot_weight());
            if self.events_since_snapshot >= busy_limit {
                batch.snapshot = Some((self.version, self.encode_snapshot()));
                self.events_since_snapshot = 0;
            }
            publication = self.state.publication(events, &self.env);
            let audit = self.state.audit_entries(events);
            if self.env.journal.keeps_audit() {
                batch.audit = audit.iter().map(AuditEntry::to_write).collect();
            } else if !audit.is_empty() {
                // Published once the batch is durable, before the rest: in a cluster the
                // projection updates reach every node, and each writes its copy of the trail.
                let projections = self.env.projections.clone();
                let rest = publication.take();
                publication = Some(Box::new(move || {
                    projections.emit(audit.into_iter().map(ProjectionUpdate::Audit).collect());
                    if let Some(publish) = rest {
                        publish();
                    }
                }));
            }
        }
        // A barrier carries no change while the journal refuses writes (a read of an actor
        // started meanwhile must not fail on its first deadline): the deadline is written
        // with a later batch, and the actor does not stop before it is.
        if !events.is_empty() || self.env.journal.write_refusal().is_none() {
            batch.wakeup = self.wakeup_change();
        }
        (batch, publication)
    }

    /// Asserts the aggregate's invariants (debug builds): after recovery, and after applied
    /// batches at the amortized cost described at `INVARIANT_CHECK_SHARE`.
    fn check(&mut self, applied: u64) {
        if !cfg!(debug_assertions) {
            return;
        }
        self.unchecked += applied;
        if self.unchecked.saturating_mul(INVARIANT_CHECK_SHARE) >= self.state.snapshot_weight() {
            self.check_now();
        }
    }

    fn check_now(&mut self) {
        self.unchecked = 0;
        if cfg!(debug_assertions) {
            let checked = self.state.invariants();
            debug_assert!(checked.is_ok(), "{}: invariant broken: {checked:?}", self.stream);
        }
    }

    /// The state, encoded for a snapshot. A big state takes a while (a SKU with 100,000
    /// holds: 35 MB, ~300 ms on the benchmark machine, mostly the kernel zeroing fresh
    /// pages), so on a multi-threaded runtime the worker first hands its other tasks to
    /// another thread: other actors and requests do not wait behind this one.
    fn encode_snapshot(&mut self) -> Vec<u8> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        // A state grows between snapshots: an eighth more than the last, and a little.
        let last = self.snapshot_bytes;
        let capacity = last + last / 8 + 4_096;
        let encoded = if multi_thread && self.state.snapshot_weight() >= SNAPSHOT_OFF_WORKER_ENTRIES {
            tokio::task::block_in_place(|| codec::encode_with_capacity(&self.state, capacity))
        } else {
            codec::encode_with_capacity(&self.state, capacity)
        };
        self.snapshot_bytes = encoded.len();
        encoded
    }

    /// The change of the next deadline since it was last written, if any, noted as written.
    fn wakeup_change(&mut self) -> Option<Option<i64>> {
        let deadline = self.state.next_deadline();
        if self.wakeup_written == Some(deadline) {
            return None;
        }
        self.wakeup_written = Some(deadline);
        Some(deadline.map(|at| at.0))
    }

    /// Hands a batch to the journal, counting it in flight until it completes. A failed
    /// write leaves the in-memory state ahead of the journal: the actor is killed, and the
    /// next command rebuilds it from what is durable.
    fn append(
        &mut self,
        permit: Box<dyn AppendPermit>,
        batch: AppendBatch,
        actor: WeakActorRef<Self>,
        done: impl FnOnce(Result<(), JournalError>) + Send + 'static,
    ) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let in_flight = self.in_flight.clone();
        let waker = H::timer_command()
            .is_some()
            .then(|| (self.env.clone(), self.stream.clone()));
        // The journal completes an actor's batches in the order they were handed over (its
        // port's contract): replies, publications and the count in flight rely on it.
        let order = cfg!(debug_assertions).then(|| {
            let next = batch.first_version + batch.events.len() as u64;
            (
                self.next_completed.clone(),
                batch.stream.clone(),
                batch.first_version,
                next,
            )
        });
        // A traced command's append is a span of its own, from the hand-over to the journal
        // until the batch is durable (it ends before the replies leave).
        let current = tracing::Span::current();
        let appending = if current.is_none() {
            current
        } else {
            tracing::debug_span!(
                parent: &current,
                "journal_append",
                stream = %batch.stream,
                events = batch.events.len()
            )
        };
        permit.append(
            batch,
            Box::new(move |written| {
                drop(appending);
                if let Some((next_completed, stream, first, next)) = order {
                    let expected = next_completed.swap(next, Ordering::SeqCst);
                    // Said, not asserted: this runs on the journal's writer, and a panic
                    // there would close the journal for every actor (seen once in the CI
                    // nemesis under NATS faults, for a creator's ledger; not understood yet).
                    if first != expected {
                        tracing::error!(%stream, first, expected, "a batch completed out of order");
                    }
                }
                let failed = written.is_err();
                done(written);
                // Counted out only once `done` has published the batch's figures: an actor
                // that saw nothing in flight could stop, and its last figures would land
                // after those of the actor started in its place.
                in_flight.fetch_sub(1, Ordering::SeqCst);
                if failed {
                    if let Some(actor) = actor.upgrade() {
                        actor.kill();
                    }
                    // Its deadlines go with it, and nothing else would start it again before
                    // a command came (in a cluster, a fenced or timed-out append): the
                    // wake-up scheduler starts it from the journal, which arms them. After
                    // the timer retry delay, not at once: a journal that refuses every write
                    // would otherwise restart it in a tight loop.
                    if let Some((env, stream)) = waker {
                        env.wakeups.register(stream, env.clock.now().plus_ms(TIMER_RETRY_MS));
                    }
                }
            }),
        );
    }

    /// Writes, without any command, what an idle actor owes the journal: a snapshot (after a
    /// quiet spell, so no buyer waits behind it) or its current deadline (before it stops,
    /// see `next`). A full journal queue means a burst: the write waits for the next quiet
    /// moment.
    fn write_when_idle(&mut self, snapshot: bool, actor: WeakActorRef<Self>) {
        if self.env.journal.write_refusal().is_some() {
            return;
        }
        let Ok(permit) = self.env.journal.try_reserve() else {
            return;
        };
        let mut batch = AppendBatch {
            stream: self.stream.clone(),
            first_version: self.version + 1,
            wakeup: self.wakeup_change(),
            ..AppendBatch::default()
        };
        if snapshot {
            batch.snapshot = Some((self.version, self.encode_snapshot()));
            self.events_since_snapshot = 0;
        }
        let stream = self.stream.clone();
        self.append(permit, batch, actor, move |written| {
            if let Err(e) = written {
                warn!(%stream, error = %e, "idle write (snapshot or deadline) failed");
            }
        });
    }

    /// Recovers the actor: snapshot, journal replay, the aggregate's own recovery step.
    async fn start(args: EntityArgs<H>, actor_ref: ActorRef<Self>) -> Result<Self, CommandError> {
        let EntityArgs { key, env, passivate } = args;
        let stream = H::stream(&key);
        let recovered = env
            .journal
            .load(&stream)
            .await
            .map_err(|e| CommandError::Storage(e.to_string()))?;
        let (mut state, mut version) = match &recovered.snapshot {
            Some((version, bytes)) => (
                H::decode_state(bytes)
                    .map_err(|e| CommandError::Storage(format!("{stream}: undecodable snapshot: {e}")))?,
                *version,
            ),
            None => (H::initial(&key, &env).await?, 0),
        };
        let replayed = recovered.events.len();
        for (event_version, bytes) in &recovered.events {
            // The journal hands back the events right after the snapshot, in order (its
            // port's contract): the next append's version is counted from them, and a gap
            // or a repeat would be written into the stream as it is.
            assert_eq!(
                *event_version,
                version + 1,
                "{stream}: recovered events are not consecutive"
            );
            state.apply(&decode::<H::Event>(&stream, bytes)?);
            version = *event_version;
        }
        debug!(%stream, version, replayed, "actor recovered");
        let mut entity = Entity {
            stream,
            state: Box::new(state),
            version,
            events_since_snapshot: replayed as u64,
            env,
            fired: None,
            in_flight: Arc::new(AtomicUsize::new(0)),
            next_completed: Arc::new(AtomicU64::new(version + 1)),
            // Aggregates without timers never have a deadline to write.
            wakeup_written: if H::timer_command().is_some() { None } else { Some(None) },
            passivate,
            unchecked: 0,
            snapshot_bytes: 0,
        };
        entity.check_now();
        if let Some(command) = entity.state.after_recovery(&entity.env).await? {
            let (tx, rx) = tokio::sync::oneshot::channel();
            entity.execute(
                command,
                actor_ref.downgrade(),
                Box::new(move |result| drop(tx.send(result))),
            );
            rx.await
                .map_err(|_| CommandError::Unavailable("journal stopped".into()))??;
        }
        if let Some(publish) = entity.state.publication(&[], &entity.env) {
            publish();
        }
        Ok(entity)
    }

    /// The earliest deadline and when its timer command is due (the deadline itself, or a
    /// retry time if its command already ran and the deadline stayed), or `None`.
    fn timer_due(&self) -> Option<(UnixMillis, UnixMillis)> {
        H::timer_command()?;
        let deadline = self.state.next_deadline()?;
        match self.fired {
            Some((fired, retry_at)) if fired == deadline => Some((deadline, retry_at)),
            _ => Some((deadline, deadline)),
        }
    }

    /// Runs the timer command for `deadline` (expiring holds, retrying outboxes).
    fn fire_timer(&mut self, deadline: UnixMillis, actor: &WeakActorRef<Self>, now: UnixMillis) {
        let Some(command) = H::timer_command() else { return };
        debug!(stream = %self.stream, deadline = deadline.0, late_ms = now.0 - deadline.0, "timer command");
        self.fired = Some((deadline, UnixMillis(now.0 + TIMER_RETRY_MS as i64)));
        let stream = self.stream.clone();
        self.execute(
            command,
            actor.clone(),
            Box::new(move |result| {
                if let Err(e) = result {
                    warn!(%stream, deadline = deadline.0, error = %e, "timer command failed; retrying in {TIMER_RETRY_MS} ms");
                }
            }),
        );
    }
}

impl<H: Hosted> Actor for Entity<H> {
    type Args = EntityArgs<H>;
    type Error = CommandError;

    async fn on_start(args: EntityArgs<H>, actor_ref: ActorRef<Self>) -> Result<Self, CommandError> {
        // Boxed: kameo keeps this future inside the actor's task for the task's whole life,
        // so inline it would add its largest await state (journal load, asking the drop)
        // to every live actor's memory; boxed it costs one allocation, freed once started.
        Box::pin(Self::start(args, actor_ref)).await
    }

    async fn next(
        &mut self,
        actor: WeakActorRef<Self>,
        mailbox: &mut MailboxReceiver<Self>,
    ) -> Result<Option<Signal<Self>>, CommandError> {
        // Asked to stop early, the actor looks again after 1 ms, then backs off while it
        // cannot stop yet (a write in flight, a full journal or wake-up queue): no busy loop.
        // Once idle long enough to stop, the same short waits apply while it writes what it
        // owes the journal: it does not wait out another idle spell first.
        let mut passivate_wait = PASSIVATE_POLL_MS;
        let mut stopping = false;
        let back_off = |wait: &mut u64| *wait = (*wait * 2).min(PASSIVATE_RETRY_MAX_MS);
        loop {
            // A due deadline goes first, between messages, so a busy actor expires holds on
            // time too.
            let now = self.env.clock.now();
            let due = self.timer_due();
            if let Some((deadline, _)) = due.filter(|(_, at)| *at <= now) {
                self.fire_timer(deadline, &actor, now);
                continue;
            }
            let due_in = due.map(|(_, at)| (at.0 - now.0) as u64);
            // Under load the next message is usually there already: take it without a timer.
            if let Ok(signal) = mailbox.try_recv() {
                return Ok(Some(signal));
            }
            // With enough events since the last snapshot, wait only for a short quiet spell,
            // then write one: snapshots happen between bursts, off the buyers' latency path.
            let snapshot_due = self.events_since_snapshot >= SNAPSHOT_IDLE_MIN_EVENTS;
            let early = stopping || self.passivate.load(Ordering::Relaxed);
            let idle_wait = if snapshot_due {
                SNAPSHOT_QUIET_MS
            } else if early {
                passivate_wait
            } else {
                ACTOR_IDLE_STOP_MS
            };
            let deadline_first = due_in.is_some_and(|ms| ms <= idle_wait);
            let wait = due_in.map_or(idle_wait, |ms| ms.min(idle_wait));
            match tokio::time::timeout(Duration::from_millis(wait), mailbox.recv()).await {
                Ok(signal) => return Ok(signal),
                // The deadline's turn: fired at the top of the loop.
                Err(_) if deadline_first => continue,
                Err(_) if snapshot_due => self.write_when_idle(true, actor.clone()),
                // Passivate: stop with nothing in flight (a restarted actor finds everything
                // in the journal) and the next deadline durable and handed to the wake-up
                // scheduler, which starts the actor again when it comes due.
                Err(_) if self.in_flight.load(Ordering::SeqCst) == 0 => {
                    stopping = true;
                    // Stopping early, a deadline due soon (a timer command waiting for its
                    // retry) runs here first rather than through a restart.
                    if early && due_in.is_some_and(|ms| ms <= TIMER_RETRY_MS) {
                        back_off(&mut passivate_wait);
                        continue;
                    }
                    let deadline = self.state.next_deadline();
                    if self.wakeup_written != Some(deadline) {
                        self.write_when_idle(false, actor.clone());
                        back_off(&mut passivate_wait);
                        continue;
                    }
                    if let Some(at) = deadline {
                        if !self.env.wakeups.register(self.stream.clone(), at) {
                            back_off(&mut passivate_wait);
                            continue;
                        }
                    }
                    // A message that came in meanwhile is served here: stopping would hand
                    // it back, and the registry would start a fresh actor for it.
                    if let Ok(signal) = mailbox.try_recv() {
                        return Ok(Some(signal));
                    }
                    // Closed before stopping, so no command is lost in the hand-over: from
                    // here a send fails at once with the command handed back
                    // (ActorNotRunning) and the registry starts a fresh actor for it, and
                    // kameo hands back what is still queued the same way. Left open, an ask
                    // sent after kameo's last look at the mailbox but before the mailbox was
                    // dropped lost its reply: UNAVAILABLE for a command that never ran.
                    mailbox.close();
                    debug!(stream = %self.stream, ?deadline, early, "actor idle, passivating");
                    return Ok(Some(Signal::Stop));
                }
                // Idle long enough, but a write is still in flight: look again shortly.
                Err(_) => {
                    stopping = true;
                    back_off(&mut passivate_wait);
                }
            }
        }
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        reason: kameo::error::ActorStopReason,
    ) -> Result<(), CommandError> {
        // Killed: a failed append (logged by the journal) or a partition handed to another
        // node; neither is news here.
        if !matches!(
            reason,
            kameo::error::ActorStopReason::Normal | kameo::error::ActorStopReason::Killed
        ) {
            warn!(stream = %self.stream, ?reason, "actor stopped abnormally");
        }
        Ok(())
    }
}

impl<H: Hosted> Message<Cmd<H>> for Entity<H> {
    type Reply = DelegatedReply<Result<H::Reply, CommandError>>;

    async fn handle(&mut self, Cmd(command, caller): Cmd<H>, ctx: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let (delegated, sender) = ctx.reply_sender();
        let reply: ReplyFn<H::Reply> = match sender {
            Some(sender) => Box::new(move |result| sender.send(result)),
            None => Box::new(|_| {}),
        };
        let actor = ctx.actor_ref().downgrade();
        match self.command_span(caller, 1) {
            Some(span) => span.in_scope(|| self.execute(command, actor, reply)),
            None => self.execute(command, actor, reply),
        }
        delegated
    }
}

impl<H: Hosted> Message<CmdBatch<H>> for Entity<H> {
    type Reply = DelegatedReply<Vec<Result<H::Reply, CommandError>>>;

    async fn handle(
        &mut self,
        CmdBatch(commands, caller): CmdBatch<H>,
        ctx: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        let (delegated, sender) = ctx.reply_sender();
        let reply: BatchReplyFn<H::Reply> = match sender {
            Some(sender) => Box::new(move |outcomes| sender.send(outcomes)),
            None => Box::new(|_| {}),
        };
        let actor = ctx.actor_ref().downgrade();
        match self.command_span(caller, commands.len()) {
            Some(span) => span.in_scope(|| self.execute_batch(commands, actor, reply)),
            None => self.execute_batch(commands, actor, reply),
        }
        delegated
    }
}

impl<H: Hosted> Message<Passivate> for Entity<H> {
    type Reply = ();

    /// Nothing to do: receiving it ends the actor's wait in `next`, which reads the flag.
    async fn handle(&mut self, _: Passivate, _: &mut Context<Self, Self::Reply>) {}
}

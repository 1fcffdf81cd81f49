//! The tokio runtime the platform runs on, and the one scheduler setting it changes.
//!
//! tokio's multi-threaded scheduler runs a task woken by the running task next, ahead of
//! everything already queued (the *LIFO slot*). That favours one message's latency; under a
//! burst it costs throughput twice over on the hot path. Each buyer's request task wakes
//! the SKU actor, which then runs for that one command before the next request task gets to
//! send its own; and each reply wakes the HTTP/2 connection task, which then writes that one
//! reply to the socket before the next request task queues its reply. With the slot off,
//! woken tasks queue in order: the actor takes the whole queue of commands in one turn and
//! the connection writes a batch of replies per system call. Measured on the benchmark
//! machine over eight alternating pairs of single-round bursts (two sets of four): 4–23 %
//! (mean 15 %) less server CPU per run, and a higher throughput in every pair (README,
//! *Benchmarks*).
//!
//! Turning the slot off is a tokio API behind `--cfg tokio_unstable`, which the workspace's
//! `.cargo/config.toml` sets. Other rustflags replace that file's (`RUSTFLAGS` or
//! `CARGO_ENCODED_RUSTFLAGS` in the environment, a `target.<triple>.rustflags` in any cargo
//! config): such a build runs with tokio's default scheduler, correct but slower, and
//! [`Scheduler::describe`] says which one a process got (`dropline serve` logs it as a
//! warning). The workspace's own tests fail on such a build, so CI cannot lose it unseen.

use std::io;

/// How the runtime schedules woken tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// tokio's default, as asked: a woken task runs next (the LIFO slot).
    LifoSlot,
    /// Woken tasks queue in order: batches form under load.
    Fifo,
    /// tokio's default although the slot was asked off: this build lacks tokio's unstable
    /// API.
    LifoSlotFallback,
}

impl Scheduler {
    /// The scheduler a runtime gets for `lifo_slot`: with the slot asked off, FIFO when this
    /// build has tokio's unstable API, tokio's default otherwise.
    pub fn chosen(lifo_slot: bool) -> Scheduler {
        if lifo_slot {
            Scheduler::LifoSlot
        } else if cfg!(tokio_unstable) {
            Scheduler::Fifo
        } else {
            Scheduler::LifoSlotFallback
        }
    }

    /// One line for the startup log.
    pub fn describe(self) -> &'static str {
        match self {
            Scheduler::Fifo => "woken tasks run in order (tokio's LIFO slot off)",
            Scheduler::LifoSlot => "tokio's default (LIFO slot on, as asked)",
            Scheduler::LifoSlotFallback => {
                "tokio's default (LIFO slot on): this build lacks --cfg tokio_unstable, so it \
                 cannot be turned off (see .cargo/config.toml)"
            }
        }
    }
}

/// A multi-threaded runtime with I/O and timers, one worker per core, and the scheduler
/// [`Scheduler::chosen`] picks for `lifo_slot`.
pub fn multi_thread(lifo_slot: bool) -> io::Result<(tokio::runtime::Runtime, Scheduler)> {
    build(lifo_slot, None)
}

fn build(lifo_slot: bool, workers: Option<usize>) -> io::Result<(tokio::runtime::Runtime, Scheduler)> {
    let scheduler = Scheduler::chosen(lifo_slot);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    #[cfg(tokio_unstable)]
    if scheduler == Scheduler::Fifo {
        builder.disable_lifo_slot();
    }
    Ok((builder.build()?, scheduler))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order in which tasks spawned by one task run, on a single worker (so that no
    /// other worker steals any of them).
    fn run_order(lifo_slot: bool) -> (Scheduler, Vec<u32>) {
        let (runtime, scheduler) = build(lifo_slot, Some(1)).expect("runtime builds");
        let order = runtime.block_on(async {
            let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let spawner = order.clone();
            // Spawned from a task on the worker: spawns from outside go to the shared queue.
            let children = tokio::spawn(async move {
                (1..=3u32)
                    .map(|i| {
                        let order = spawner.clone();
                        tokio::spawn(async move { order.lock().expect("not poisoned").push(i) })
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .expect("spawner completes");
            for child in children {
                child.await.expect("child completes");
            }
            let order = order.lock().expect("not poisoned").clone();
            order
        });
        (scheduler, order)
    }

    #[test]
    fn this_build_can_turn_the_slot_off() {
        assert_eq!(
            Scheduler::chosen(false),
            Scheduler::Fifo,
            "built without --cfg tokio_unstable: other rustflags replaced .cargo/config.toml's \
             (RUSTFLAGS, CARGO_ENCODED_RUSTFLAGS or target.<triple>.rustflags)"
        );
    }

    #[test]
    fn with_the_slot_off_woken_tasks_run_in_order() {
        let (scheduler, order) = run_order(false);
        match scheduler {
            Scheduler::Fifo => assert_eq!(order, [1, 2, 3]),
            // A build without tokio's unstable API: the default, checked below.
            Scheduler::LifoSlot | Scheduler::LifoSlotFallback => assert_eq!(order, [3, 1, 2]),
        }
    }

    #[test]
    fn with_the_slot_on_the_last_woken_task_jumps_the_queue() {
        // tokio's default, which the FIFO setting exists to avoid under bursts. Should a
        // tokio release change it, the reasoning in this module needs measuring again.
        assert_eq!(run_order(true), (Scheduler::LifoSlot, vec![3, 1, 2]));
    }

    #[test]
    fn the_runtime_runs_tasks_with_either_setting() {
        for lifo_slot in [true, false] {
            let (runtime, scheduler) = multi_thread(lifo_slot).expect("runtime builds");
            assert_eq!(scheduler, Scheduler::chosen(lifo_slot));
            let sum = runtime.block_on(async {
                let tasks: Vec<_> = (1..=100u64).map(|i| tokio::spawn(async move { i })).collect();
                let mut sum = 0;
                for task in tasks {
                    sum += task.await.expect("task completes");
                }
                sum
            });
            assert_eq!(sum, 5_050);
        }
    }
}

//! One reactor per core: one thread per CPU, each running a current-thread
//! runtime, and each connection on one of them, its reader and its writer
//! together. The requests a connection does not serve on its thread (see
//! `connection`) go to that runtime's blocking pool.
//!
//! On tokio's work-stealing runtime a connection's tasks are woken on
//! whichever worker is idle. Under fio's 1 MiB writes the reader sat on
//! one worker polling for payloads while each reply, handed over by a
//! blocking-pool thread, woke the other worker to send 16 bytes, and that
//! worker went back to sleep: 11 context switches per request, against
//! nbdkit's 6. With the connection on one thread a reply waits for the
//! reader to step aside, and nothing is woken for it: 5.5 switches per
//! request, 5.0k-5.1k IOPS against 3.6k-4.0k, at 225 µs of server CPU each
//! instead of 278-303 (alternating runs). 1 MiB reads did 4.5k-4.8k IOPS
//! against 4.6k-5.1k; 4k requests, and nbdcopy both ways on four
//! connections over the two cores, did as before.
//!
//! Connections are placed on the core with the fewest at accept time, and
//! stay there.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// Blocking-pool threads of all cores together: tokio's default for one
/// runtime, shared out among the cores.
const BLOCKING_THREADS: usize = 512;

/// The server's connection threads.
pub struct Cores {
    cores: Vec<Core>,
}

struct Core {
    handle: Handle,
    connections: Arc<AtomicUsize>,
    /// Dropping it ends the thread's runtime, and with it any connection
    /// still there.
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Cores {
    /// One core per CPU this process may run on (its affinity mask, so
    /// `taskset` gives it fewer).
    pub fn start() -> io::Result<Cores> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = (BLOCKING_THREADS / n).max(1);
        let cores = (0..n)
            .map(|index| Core::start(index, pool))
            .collect::<io::Result<_>>()?;
        Ok(Cores { cores })
    }

    /// Runs `connection` on the core that has the fewest.
    pub fn spawn(&self, connection: impl Future<Output = ()> + Send + 'static) {
        let core = self
            .cores
            .iter()
            .min_by_key(|core| core.connections.load(Ordering::Relaxed))
            .expect("there is at least one core");
        let placed = Placed::new(core.connections.clone());
        core.handle.spawn(async move {
            let _placed = placed;
            connection.await;
        });
    }

    /// Ends every core's runtime and waits for its thread, which blocks:
    /// for when no connection is left.
    pub fn stop(self) {
        for core in self.cores {
            drop(core.stop);
            if core.thread.join().is_err() {
                tracing::warn!("a connection thread panicked");
            }
        }
    }
}

impl Core {
    fn start(index: usize, pool: usize) -> io::Result<Core> {
        let runtime = Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(pool)
            .thread_name(format!("nbd-core-{index}-pool"))
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("nbd-core-{index}"))
            .spawn(move || {
                // Either a stop or a dropped sender ends it.
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Core {
            handle,
            connections: Arc::new(AtomicUsize::new(0)),
            stop,
            thread,
        })
    }
}

/// A connection counted on its core for as long as it lives, however it
/// ends.
struct Placed(Arc<AtomicUsize>);

impl Placed {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Placed(count)
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Connections spread over the cores by count, and a finished one
    /// frees its place: once the last core's connections are done, the
    /// next connection goes there, not round the cores in turn.
    #[tokio::test]
    async fn connections_go_to_the_core_with_the_fewest() {
        let cores = Cores::start().unwrap();
        let n = cores.cores.len();
        let (seen, mut threads) = tokio::sync::mpsc::unbounded_channel();
        let spawn = |id: usize| {
            let (release, released) = oneshot::channel::<()>();
            let seen = seen.clone();
            cores.spawn(async move {
                let _ = seen.send((id, std::thread::current().name().map(str::to_owned)));
                let _ = released.await;
            });
            release
        };
        let releases: Vec<_> = (0..2 * n).map(spawn).collect();
        let mut on = vec![String::new(); 2 * n];
        for _ in 0..2 * n {
            let (id, name) = threads.recv().await.unwrap();
            on[id] = name.unwrap();
        }
        for i in 0..n {
            let here = on.iter().filter(|t| **t == format!("nbd-core-{i}")).count();
            assert_eq!(here, 2, "{on:?}");
        }
        let last = format!("nbd-core-{}", n - 1);
        let (freed, held): (Vec<_>, Vec<_>) = releases
            .into_iter()
            .enumerate()
            .partition(|(id, _)| on[*id] == last);
        drop(freed);
        for _ in 0..1000 {
            if cores.cores[n - 1].connections.load(Ordering::Relaxed) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(cores.cores[n - 1].connections.load(Ordering::Relaxed), 0);
        let next = spawn(2 * n);
        let (_, name) = threads.recv().await.unwrap();
        assert_eq!(
            name.unwrap(),
            last,
            "the next connection goes to the idle core"
        );
        drop(held);
        drop(next);
        tokio::task::spawn_blocking(move || cores.stop())
            .await
            .unwrap();
    }
}

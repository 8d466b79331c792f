//! Work of one big transfer (hashing an upload, reading and verifying a download) moved off the task
//! that serves the connection, onto a thread of its own.
//!
//! Why a thread and not a task: hyper reads a request's body on the connection's own task, and a task
//! spawned from there lands in the same worker's next-to-run slot, so receiving and hashing still take
//! turns on one core (measured: no gain). A blocking-pool thread is scheduled by the OS onto whichever
//! core is free, and the socket's reads and the SHA-256 overlap (a 256 MiB upload went from ~200 to
//! ~155 ms in the bench that isolates it). The threads come from tokio's blocking pool, so they are
//! reused; a fixed number of permits bounds how many transfers hold one, so the pool always has threads
//! left for the blocking work the backends themselves hand it (the fs writer thread), and a transfer
//! past the limit simply runs on its connection's task as before.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::error::Error;

/// The most transfers that hold a thread of their own at once, however many cores.
const MAX_THREADS: usize = 32;

/// Transfers that may hold a thread of their own at once.
#[derive(Clone, Debug)]
pub(crate) struct Offload {
    permits: Arc<Semaphore>,
}

impl Default for Offload {
    fn default() -> Self {
        // Two per core keeps every core busy with a transfer while another waits on its socket; the
        // ceiling bounds the memory they hold (each up to ~8 MiB of buffers) on a big machine.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Offload::new((2 * cores).clamp(4, MAX_THREADS))
    }
}

impl Offload {
    pub(crate) fn new(threads: usize) -> Self {
        Offload {
            permits: Arc::new(Semaphore::new(threads)),
        }
    }

    /// A thread's place, if one is free now (never waits: a transfer without one runs where it is).
    /// None on a current-thread runtime (an embedder's): only its own thread drives its I/O there.
    pub(crate) fn try_place(&self) -> Option<OwnedSemaphorePermit> {
        let flavor = tokio::runtime::Handle::try_current().ok()?.runtime_flavor();
        if flavor != tokio::runtime::RuntimeFlavor::MultiThread {
            return None;
        }
        self.permits.clone().try_acquire_owned().ok()
    }
}

/// Runs `work` on a thread of its own, holding `place`. Dropping the returned future drops `work` too
/// (at its next await), so a cancelled request cleans up as it would inline. `None` if `work` panicked.
pub(crate) async fn run_on<F>(place: OwnedSemaphorePermit, work: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (_cancel_on_drop, cancelled) = tokio::sync::oneshot::channel::<()>();
    let joined = on_thread(place, async move {
        tokio::select! {
            biased;
            _ = cancelled => None,
            out = work => Some(out),
        }
    })
    .await;
    joined.ok().flatten()
}

/// The sending end of a [`handover`].
pub(crate) struct Handover(mpsc::Sender<Option<crate::Result<Bytes>>>);

impl Handover {
    /// Queues `item`; `false` once the receiving end is gone (the consumer stopped: stop producing).
    pub(crate) async fn send(&self, item: crate::Result<Bytes>) -> bool {
        self.0.send(Some(item)).await.is_ok()
    }

    /// Ends the stream cleanly. Only this does: a `Handover` dropped without it (its task cancelled
    /// or panicked half-way) ends the stream with an error.
    pub(crate) async fn finish(self) {
        let _ = self.0.send(None).await;
    }
}

/// A queue of `depth` chunks between a producer and a consumer on different threads, received as a
/// stream that ends cleanly only when the producer says it is done: a producer that goes away half-way
/// shows as an error, never as a shorter body that looks complete (an upload would be published
/// truncated; a download would end early and look whole to the code before the socket).
pub(crate) fn handover(depth: usize) -> (Handover, crate::ByteStream) {
    let (tx, rx) = mpsc::channel(depth);
    let stream = futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(Some(item)) => Some((item, Some(rx))),
            Some(None) => None,
            None => Some((
                Err(Error::stream(std::io::Error::other(
                    "the transfer's other end stopped half-way",
                ))),
                None,
            )),
        }
    });
    (Handover(tx), stream.boxed())
}

/// Polls `work` to completion on a blocking-pool thread, holding `place` until it is done.
pub(crate) fn on_thread<F>(
    place: OwnedSemaphorePermit,
    work: F,
) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _place = place;
        runtime.block_on(work)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_current_thread_runtime_gets_no_places() {
        assert!(Offload::new(4).try_place().is_none());
    }

    #[tokio::test]
    async fn a_handover_ends_cleanly_only_when_finished() {
        let (tx, mut rx) = handover(2);
        assert!(tx.send(Ok(Bytes::from_static(b"ab"))).await);
        tx.finish().await;
        assert_eq!(rx.next().await.unwrap().unwrap(), "ab");
        assert!(rx.next().await.is_none(), "finished: a clean end");

        let (tx, mut rx) = handover(2);
        assert!(tx.send(Ok(Bytes::from_static(b"ab"))).await);
        drop(tx);
        assert_eq!(rx.next().await.unwrap().unwrap(), "ab");
        assert!(
            matches!(rx.next().await, Some(Err(Error::Stream { .. }))),
            "dropped half-way: an error, not a shorter body"
        );
        assert!(rx.next().await.is_none(), "and nothing after the error");

        let (tx, rx) = handover(2);
        drop(rx);
        assert!(!tx.send(Ok(Bytes::new())).await, "the consumer is gone");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn places_are_bounded_and_the_work_runs_on_a_thread_of_its_own() {
        let offload = Offload::new(1);
        let place = offload.try_place().expect("one place");
        assert!(offload.try_place().is_none(), "only one place");
        let here = std::thread::current().id();
        let away = run_on(place, async { std::thread::current().id() })
            .await
            .unwrap();
        assert_ne!(away, here, "the work ran on a thread of its own");
        assert!(offload.try_place().is_some(), "the place is given back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_caller_drops_the_work_on_its_thread() {
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let offload = Offload::new(1);
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Flag(dropped.clone());
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let run = run_on(offload.try_place().unwrap(), async move {
            let _flag = flag;
            let _ = started_tx.send(());
            std::future::pending::<()>().await
        });
        let caller = tokio::spawn(run);
        started.await.unwrap();
        caller.abort();
        let _ = caller.await;
        for _ in 0..200 {
            if dropped.load(std::sync::atomic::Ordering::SeqCst) && offload.try_place().is_some() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the work outlived its caller, or its place was never given back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_on_the_thread_is_none_not_a_crash() {
        let offload = Offload::new(1);
        let out = run_on(offload.try_place().unwrap(), async {
            if true {
                panic!("boom")
            }
        })
        .await;
        assert!(out.is_none());
    }
}

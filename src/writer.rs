//! The push-style writer: for producers that generate bytes (an encoder, a model) and want to *push*
//! them rather than hand over a stream. Backpressure is a byte high-water mark: while that many pushed
//! bytes are not yet taken by the backend, `push` waits. Finishing, aborting or dropping the writer
//! releases a waiting producer, and so does a backend failure, with the backend's error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::engine::{BlobOptions, Cache};
use crate::error::{Error, Result};

pub use crate::options::DEFAULT_HIGH_WATER_MARK;

/// A pushed chunk and the credits it took.
type Msg = (Bytes, u32);

/// Shared between the writer, its abort handles and the consumer stream.
#[derive(Debug)]
struct Shared {
    /// One credit per byte the producer may still push before it waits.
    credits: Semaphore,
    buffered: AtomicUsize,
    aborted: AtomicBool,
}

/// Push bytes into a binary task output; see [`Cache::writer`].
#[derive(Debug)]
pub struct BlobWriter {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    shared: Arc<Shared>,
    high_water: usize,
    task: Option<JoinHandle<Result<Value>>>,
}

/// Aborts a [`BlobWriter`] from another task (for instance while the producer is waiting in `push`).
#[derive(Debug, Clone)]
pub struct WriterAbortHandle {
    shared: Arc<Shared>,
    task: tokio::task::AbortHandle,
}

impl WriterAbortHandle {
    /// Abort the write: a waiting `push` returns at once with an error, the backend's write is cancelled
    /// (publishing nothing) and later pushes fail.
    pub fn abort(&self) {
        self.shared.aborted.store(true, Ordering::SeqCst);
        self.shared.credits.close();
        self.task.abort();
    }
}

fn aborted() -> Error {
    Error::stream("the write was aborted by its producer")
}

impl Cache {
    /// A writer that stores what is pushed into it as the binary output of `task_type` run on `inputs`
    /// (inline or a blob, as [`Cache::put_stream`] decides). Memory stays within the high-water mark
    /// ([`crate::CacheOptions::high_water_mark`]) plus one chunk. Must be called within a Tokio runtime.
    pub fn writer(&self, task_type: &str, inputs: &Value, blob: BlobOptions) -> BlobWriter {
        let high_water = self.options().high_water_mark.clamp(1, u32::MAX as usize);
        let shared = Arc::new(Shared {
            credits: Semaphore::new(high_water),
            buffered: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::unbounded_channel::<Msg>();
        let consumer = shared.clone();
        // Credits come back when the backend *takes* a chunk, not when it was queued.
        let stream = futures::stream::unfold(rx, move |mut rx| {
            let shared = consumer.clone();
            async move {
                let (bytes, credits) = rx.recv().await?;
                shared.buffered.fetch_sub(bytes.len(), Ordering::SeqCst);
                shared.credits.add_permits(credits as usize);
                Some((Ok(bytes), rx))
            }
        });
        let (cache, task_type, inputs, ended) = (
            self.clone(),
            task_type.to_owned(),
            inputs.clone(),
            shared.clone(),
        );
        let task = tokio::spawn(async move {
            let result = cache
                .put_stream(&task_type, &inputs, stream.boxed(), blob)
                .await;
            // Wake a producer waiting for credits that will never come back.
            ended.credits.close();
            result
        });
        BlobWriter {
            tx: Some(tx),
            shared,
            high_water,
            task: Some(task),
        }
    }
}

impl BlobWriter {
    /// Queue `bytes` for the backend, first waiting while the high-water mark is reached. Fails with the
    /// backend's error if the write failed, or with a stream error if it was aborted.
    pub async fn push(&mut self, bytes: Bytes) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let credits = bytes.len().min(self.high_water) as u32;
        let acquired = self
            .shared
            .credits
            .acquire_many(credits)
            .await
            .map(|p| p.forget());
        if acquired.is_err() {
            return Err(self.failure().await); // closed: aborted, or the backend's write ended
        }
        self.shared
            .buffered
            .fetch_add(bytes.len(), Ordering::SeqCst);
        let sent = self.tx.as_ref().map(|tx| tx.send((bytes, credits)));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(self.failure().await),
        }
    }

    /// Bytes pushed and not yet taken by the backend.
    pub fn buffered(&self) -> usize {
        self.shared.buffered.load(Ordering::SeqCst)
    }

    /// A handle that aborts this write from elsewhere.
    // `task` is `Some` from construction until `finish` or `abort`, which consume the writer.
    #[allow(clippy::expect_used)]
    pub fn abort_handle(&self) -> WriterAbortHandle {
        WriterAbortHandle {
            shared: self.shared.clone(),
            task: self
                .task
                .as_ref()
                .expect("the task lives until finish or abort")
                .abort_handle(),
        }
    }

    /// End the output and wait for it to be stored; returns the stored output (as
    /// [`Cache::put_stream`] does).
    pub async fn finish(mut self) -> Result<Value> {
        self.tx = None; // ends the stream
        self.join().await
    }

    /// Abort the write: nothing is published.
    pub async fn abort(mut self) {
        self.abort_handle().abort();
        let _ = self.join().await;
    }

    async fn join(&mut self) -> Result<Value> {
        match self.task.take() {
            Some(task) => match task.await {
                Ok(result) => result,
                Err(e) if e.is_cancelled() => Err(aborted()),
                Err(e) => Err(Error::stream(format!("the write task failed: {e}"))),
            },
            None => Err(aborted()),
        }
    }

    /// Why pushing cannot go on: aborted, or the backend's error.
    async fn failure(&mut self) -> Error {
        if self.shared.aborted.load(Ordering::SeqCst) {
            return aborted();
        }
        match self.join().await {
            Err(e) => e,
            Ok(_) => Error::stream("the write ended before the producer finished"),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Dropped without `finish`: cancel the backend's write so nothing half-pushed is published.
        if let Some(task) = self.task.take() {
            self.shared.aborted.store(true, Ordering::SeqCst);
            self.shared.credits.close();
            task.abort();
        }
    }
}

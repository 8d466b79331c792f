//! The accept loop under the router: what a connection may hold and for how long, and how the server
//! stops. `axum::serve` sets no limits at all, so a client that sends half a request line (or keeps a
//! connection idle) held it for ever, and enough of them ran the process out of file descriptors.
//!
//! Here every connection gets the idle timeout for its request head too (and between keep-alive
//! requests, where hyper waits for the next head under the same timer), at most `max_connections`
//! are open at once (the rest wait in the kernel's backlog, as nginx's `worker_connections` makes
//! them), and a graceful stop lets each connection finish the request it is on, then closes it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// What one accept loop allows its connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Longest a connection may take to send a request head, or stay idle between requests; zero
    /// turns the limit off.
    pub(crate) idle: Duration,
    /// Connections open at once; further ones wait to be accepted.
    pub(crate) max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets every
/// connection finish the request in flight, and returns once all are closed. Dropping the returned
/// future drops every connection with it (their uploads store nothing, as a cut-off one does).
pub(crate) async fn run(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stopping, stop) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut accept_errors = AcceptErrors::default();
    loop {
        let place = tokio::select! {
            () = &mut shutdown => break,
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break, // closed: never, as nothing here closes it
            },
        };
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_errors.wait_after(e).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        // Responses are written whole or in big chunks: Nagle would only delay the last segment.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        connections.spawn(async move {
            let _place = place;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).keep_alive(true);
            // hyper's own default (30 s) applies once a timer is set: say what the operator said.
            http.header_read_timeout((!limits.idle.is_zero()).then_some(limits.idle));
            let connection = http.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stop.wait_for(|stopping| *stopping) => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(listener); // new connections are refused from here on
    let _ = stopping.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Accept errors that are not about one connection (EMFILE, ENFILE, ENOBUFS) come back at once when
/// retried: wait a little before the next try, and say so once, not once per try.
#[derive(Default)]
struct AcceptErrors {
    logged: Option<std::io::ErrorKind>,
}

impl AcceptErrors {
    async fn wait_after(&mut self, e: std::io::Error) {
        use std::io::ErrorKind::*;
        if matches!(
            e.kind(),
            ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
        ) {
            return; // that client gave up between connecting and being accepted
        }
        if self.logged != Some(e.kind()) {
            super::failed(format_args!("accepting connections: {e} (retrying)"));
            self.logged = Some(e.kind());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

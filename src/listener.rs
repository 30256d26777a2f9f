//! The daemon's two listeners (the control API's unix socket, the metrics and webhook TCP port)
//! under limits, so that no caller, however slow or numerous, can hold the daemon's file
//! descriptors or memory: a connection serves one request, must send its headers within
//! [`Limits::header_timeout`] and is closed after [`Limits::lifetime`] whatever it does; at most
//! [`Limits::connections`] are open per listener, and on the socket at most [`Limits::per_user`]
//! per uid other than root's, so one read-only member cannot take every place. A connection over
//! a cap is accepted and closed at once (a queue in the kernel's backlog would only make the
//! wait longer for everyone). What is left of the process's descriptors is the daemon's own:
//! fetches, checkouts, D-Bus, applies ([`raise_fd_limit`]).
//!
//! axum's own `serve` has none of these limits, so connections are served here with hyper's
//! HTTP/1 connection builder and the same axum `Router`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, warn};

/// How much a listener lets its callers take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once on the listener.
    pub connections: usize,
    /// Connections open at once per peer uid (unix socket only); root has no limit of its own.
    pub per_user: usize,
    /// Time from accepting a connection to having its request's headers.
    pub header_timeout: Duration,
    /// Longest a connection stays open, its request, the answer and a slow reader included.
    pub lifetime: Duration,
}

/// The control API: a pull or rollback answers once its fetch, checkout and apply are done, so a
/// connection may live as long as those can take.
pub const API: Limits = Limits {
    connections: 64,
    per_user: 8,
    header_timeout: Duration::from_secs(10),
    lifetime: Duration::from_secs(15 * 60),
};

/// `/metrics` and the push webhook: both answer at once.
pub const METRICS: Limits = Limits {
    connections: 64,
    per_user: usize::MAX,
    header_timeout: Duration::from_secs(10),
    lifetime: Duration::from_secs(60),
};

/// The soft limit on open files this process asks for: the two listeners take at most
/// `2 * 64` (plus one transient descriptor each while refusing a connection); the rest is for
/// fetches, checkouts, D-Bus and applies.
pub const WANTED_FDS: u64 = 65_536;

/// Raises the soft limit on open files towards [`WANTED_FDS`] (never above the hard limit, never
/// down). Returns the soft limit in force afterwards. The default soft limit of 1,024 would
/// leave the daemon's own work little beside the listeners' caps.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let wanted = WANTED_FDS.min(hard).max(soft);
    if wanted > soft {
        setrlimit(Resource::RLIMIT_NOFILE, wanted, hard)?;
    }
    Ok(wanted)
}

/// A listener the limits apply to: where a connection comes from, as the handlers see it.
pub trait Accept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What [`ConnectInfo`] gives the handlers.
    type Peer: Clone + Send + Sync + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Stream, Self::Peer)>> + Send;
    /// The uid a per-user cap counts against; `None`: no per-user cap.
    fn uid(peer: &Self::Peer) -> Option<u32>;
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Peer = std::net::SocketAddr;
    async fn accept(&self) -> std::io::Result<(Self::Stream, Self::Peer)> {
        tokio::net::TcpListener::accept(self).await
    }
    fn uid(_: &Self::Peer) -> Option<u32> {
        None
    }
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Peer = crate::api::Peer;
    async fn accept(&self) -> std::io::Result<(Self::Stream, Self::Peer)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        let peer = crate::api::Peer::of(&stream);
        Ok((stream, peer))
    }
    fn uid(peer: &Self::Peer) -> Option<u32> {
        // Unknown credentials share one count with every other unknown caller.
        Some(peer.uid.unwrap_or(u32::MAX)).filter(|uid| *uid != 0)
    }
}

/// Places per uid, given back when a connection ends.
#[derive(Debug, Default)]
struct PerUser(Mutex<HashMap<u32, usize>>);

/// One connection's place in [`PerUser`].
struct UserPlace {
    users: Arc<PerUser>,
    uid: u32,
}

impl PerUser {
    fn take(self: &Arc<Self>, uid: u32, cap: usize) -> Option<UserPlace> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(uid).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(UserPlace {
            users: self.clone(),
            uid,
        })
    }
}

impl Drop for UserPlace {
    fn drop(&mut self) {
        let mut counts = self.users.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown`, then lets the connections in
/// flight finish (each within its lifetime) and returns. `what` names the listener in the log.
pub async fn serve<L: Accept>(
    what: &'static str,
    listener: L,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let places = Arc::new(Semaphore::new(limits.connections));
    let users = Arc::new(PerUser::default());
    let tracker = TaskTracker::new();
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: try again shortly rather than
                // spin; the connections in flight give theirs back within their lifetime.
                warn!("{what}: cannot accept a connection: {e}");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let place = places.clone().try_acquire_owned().ok();
        let user = match L::uid(&peer) {
            Some(uid) => users.take(uid, limits.per_user).map(Some),
            None => Some(None),
        };
        let (Some(place), Some(user)) = (place, user) else {
            refused += 1;
            // One line per power of two: a flood is visible without flooding the journal.
            if refused.is_power_of_two() {
                warn!(
                    "{what}: {refused} connections refused so far: at most {} open at once, {} per user",
                    limits.connections, limits.per_user
                );
            }
            drop(stream);
            continue;
        };
        let conn = connection(stream, peer, router.clone(), limits, shutdown.clone());
        tracker.spawn(async move {
            conn.await;
            drop((place, user));
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// One connection: one request, within the header timeout and the lifetime.
async fn connection<S, P>(
    stream: S,
    peer: P,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Clone + Send + Sync + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer.clone()));
        let router = router.clone();
        async move { Ok::<_, Infallible>(router.oneshot(request).await.unwrap_or_else(|e| match e {})) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let deadline = tokio::time::sleep(limits.lifetime);
    let mut deadline = std::pin::pin!(deadline);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!("connection ended: {e}");
                }
                return;
            }
            () = &mut deadline => {
                debug!("connection closed after {:?}", limits.lifetime);
                return;
            }
            () = shutdown.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_its_places_back_when_its_connections_end() {
        let users = Arc::new(PerUser::default());
        let a: Vec<UserPlace> = (0..3).map(|_| users.take(1000, 3).unwrap()).collect();
        assert!(
            users.take(1000, 3).is_none(),
            "a fourth connection of uid 1000"
        );
        let other = users
            .take(1001, 3)
            .expect("another uid has places of its own");
        drop(a);
        assert!(users.take(1000, 3).is_some());
        drop(other);
        assert!(
            users.0.lock().unwrap().is_empty(),
            "counts of ended connections are gone"
        );
    }

    #[test]
    fn root_has_no_per_user_cap_and_unknown_callers_share_one() {
        use tokio::net::UnixListener;
        let peer = |uid| crate::api::Peer {
            uid,
            gid: None,
            pid: None,
        };
        assert_eq!(<UnixListener as Accept>::uid(&peer(Some(0))), None);
        assert_eq!(<UnixListener as Accept>::uid(&peer(Some(7))), Some(7));
        assert_eq!(<UnixListener as Accept>::uid(&peer(None)), Some(u32::MAX));
    }
}

//! plumb's own git transports, and the crate's one `unsafe` block (registering them).
//!
//! libgit2 speaks git's protocol; these modules only carry its bytes. They replace libgit2's
//! OpenSSL-backed https and libssh2-backed ssh, so neither library is linked:
//!
//! - `http`: `http://` and `https://` through ureq on rustls (ring), each request on a
//!   `TCP_NODELAY` socket, the CA roots read once, the first time an https upstream is fetched;
//! - `ssh`: `ssh://`, `git+ssh://`, `ssh+git://` and scp-like URLs through the system's OpenSSH
//!   client, one `ssh` process per fetch, so the user's ssh_config, agent and ProxyJump apply;
//! - `daemon`: `git://`, a plain TCP stream;
//! - `file://` through this machine's `git-upload-pack` (in `ssh`), as git does it: libgit2's
//!   own local transport builds the pack in memory, whole blobs included.
//!
//! Every read and write of every transport checks the fetch's [`Context`]: the deadline
//! (`fetch_timeout` bounds the whole fetch, not each read) and the cancellation flag. libgit2
//! creates transports through a process-wide factory that cannot carry arguments, so the context
//! of the fetch running on a thread is handed over in a thread-local ([`enter`]).

mod daemon;
mod http;

pub(crate) use http::{split_credentials, tls_config};
mod ssh;

use std::cell::RefCell;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use git2::transport::Transport as GitTransport;

use super::Transport;

/// Why a fetch stopped on plumb's request.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stop {
    Cancelled,
    TimedOut(Duration),
}

/// What one fetch's transport needs and what it learned: the limits to obey, the ssh options,
/// and the reason for a refusal, which libgit2 would otherwise flatten into a generic message.
#[derive(Debug)]
pub(super) struct Context {
    /// The upstream as shown to people (no password).
    pub shown: String,
    pub ssh_key: Option<PathBuf>,
    pub known_hosts: Vec<PathBuf>,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    cancel: Arc<AtomicBool>,
    stopped: Mutex<Option<Stop>>,
    refusal: Mutex<Option<String>>,
}

/// The longest a transport blocks before it looks at the cancellation flag again.
const CANCEL_CHECK: Duration = Duration::from_millis(500);

impl Context {
    /// The context of a fetch of `shown` starting now.
    pub fn new(shown: &str, transport: &Transport) -> Context {
        Context {
            shown: shown.to_owned(),
            ssh_key: transport.ssh_key.clone(),
            known_hosts: transport.known_hosts.clone(),
            timeout: transport.timeout,
            deadline: transport.timeout.map(|t| Instant::now() + t),
            cancel: Arc::clone(&transport.cancel),
            stopped: Mutex::new(None),
            refusal: Mutex::new(None),
        }
    }

    /// A context without limits, for a transport libgit2 creates outside [`Store::fetch`]
    /// (nothing in plumb does; a test or a tool might).
    ///
    /// [`Store::fetch`]: super::Store::fetch
    fn unbounded() -> Context {
        Context::new("(upstream)", &Transport::default())
    }

    /// Whether the fetch may go on; records why not.
    pub fn keep_going(&self) -> bool {
        self.check().is_ok()
    }

    /// `Err` (a `TimedOut` I/O error) once cancellation was requested or the deadline passed.
    pub fn check(&self) -> io::Result<()> {
        let stop = if self.cancel.load(Ordering::Relaxed) {
            Some(Stop::Cancelled)
        } else {
            match (self.deadline, self.timeout) {
                (Some(deadline), Some(timeout)) if Instant::now() >= deadline => {
                    Some(Stop::TimedOut(timeout))
                }
                _ => None,
            }
        };
        match stop {
            None => Ok(()),
            Some(stop) => {
                *lock(&self.stopped) = Some(stop);
                Err(stopped_error(stop))
            }
        }
    }

    /// How long the next blocking step may wait: until the deadline, and never longer than
    /// [`CANCEL_CHECK`] so a cancellation is seen. Checks first.
    pub fn slice(&self) -> io::Result<Duration> {
        self.check()?;
        Ok(self
            .remaining()
            .map_or(CANCEL_CHECK, |r| r.min(CANCEL_CHECK))
            .max(Duration::from_millis(1)))
    }

    /// Time left before the deadline; `None` without one.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Notes that a transport hit the deadline (a socket timeout at the very end of it).
    pub fn timed_out(&self) -> io::Error {
        let stop = Stop::TimedOut(self.timeout.unwrap_or_default());
        *lock(&self.stopped) = Some(stop);
        stopped_error(stop)
    }

    /// Why the fetch was stopped, if plumb stopped it.
    pub fn stopped(&self) -> Option<Stop> {
        *lock(&self.stopped)
    }

    /// Records that plumb refuses to go on (host key, credentials) and returns the error that
    /// makes libgit2 stop. `reason` says what to fix.
    pub fn refuse(&self, reason: String) -> io::Error {
        let err = io::Error::new(io::ErrorKind::PermissionDenied, reason.clone());
        *lock(&self.refusal) = Some(reason);
        err
    }

    /// The refusal recorded during this fetch, taken.
    pub fn take_refusal(&self) -> Option<String> {
        lock(&self.refusal).take()
    }
}

fn stopped_error(stop: Stop) -> io::Error {
    match stop {
        // Not `Interrupted`: `write_all` and `read_exact` retry those forever, and libgit2 writes
        // a last flush packet with `write_all` when it closes a cancelled fetch.
        Stop::Cancelled => io::Error::other("cancelled"),
        Stop::TimedOut(_) => io::Error::new(io::ErrorKind::TimedOut, "timed out"),
    }
}

/// A poisoned lock only means another thread panicked while holding plain data: keep going.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Context>>> = const { RefCell::new(None) };
}

/// Makes `context` the one transports created on this thread use, until the guard drops.
pub(super) fn enter(context: Arc<Context>) -> Entered {
    register();
    CURRENT.with(|c| *c.borrow_mut() = Some(context));
    Entered(())
}

/// Clears the thread's fetch context when dropped.
pub(super) struct Entered(());

impl Drop for Entered {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = None);
    }
}

fn current() -> Arc<Context> {
    CURRENT
        .with(|c| c.borrow().clone())
        .unwrap_or_else(|| Arc::new(Context::unbounded()))
}

static REGISTER: Once = Once::new();

/// Registers plumb's transports with libgit2, once per process, before the first fetch.
#[allow(unsafe_code)]
fn register() {
    REGISTER.call_once(|| {
        type Factory = fn(&git2::Remote<'_>) -> Result<GitTransport, git2::Error>;
        let schemes: [(&str, Factory); 7] = [
            ("http", http_transport),
            ("https", http_transport),
            ("ssh", ssh_transport),
            ("ssh+git", ssh_transport),
            ("git+ssh", ssh_transport),
            ("git", daemon_transport),
            ("file", local_transport),
        ];
        for (scheme, factory) in schemes {
            // SAFETY: git_transport_register edits libgit2's global list of custom transports
            // without a lock, and every remote connect reads that list; git2 marks it unsafe
            // because a registration racing a connect is a data race. In plumb every connect
            // happens inside `Store::fetch` after `enter`, which runs this `Once` first; `Once`
            // makes these the only writes, and every caller returns from `call_once` only after
            // they completed (happens-before), so no read can overlap them. The list is never
            // unregistered. Registering a scheme twice cannot happen (each once, here); were it
            // to fail anyway, libgit2's built-in transport would stay in place.
            if let Err(e) = unsafe { git2::transport::register(scheme, factory) } {
                tracing::error!(scheme, error = %e, "cannot register plumb's git transport");
            }
        }
    });
}

fn http_transport(remote: &git2::Remote<'_>) -> Result<GitTransport, git2::Error> {
    GitTransport::smart(remote, true, http::Http::new(current()))
}

fn ssh_transport(remote: &git2::Remote<'_>) -> Result<GitTransport, git2::Error> {
    GitTransport::smart(
        remote,
        false,
        OneConnection::new(current(), ssh::Session::open),
    )
}

fn local_transport(remote: &git2::Remote<'_>) -> Result<GitTransport, git2::Error> {
    GitTransport::smart(
        remote,
        false,
        OneConnection::new(current(), ssh::Session::local),
    )
}

fn daemon_transport(remote: &git2::Remote<'_>) -> Result<GitTransport, git2::Error> {
    GitTransport::smart(
        remote,
        false,
        OneConnection::new(current(), daemon::Connection::open),
    )
}

/// The error libgit2 gets when asked to push: plumb only fetches.
fn push_refused() -> git2::Error {
    git2::Error::from_str("plumb's transports only fetch")
}

/// A subtransport of one connection (git://, ssh, file://): libgit2 asks for the ref
/// advertisement and then, on the same connection, for the pack. `open` makes the connection on
/// the first action; it is held until libgit2 closes the transport.
struct OneConnection<C> {
    ctx: Arc<Context>,
    open: fn(&Arc<Context>, &str) -> io::Result<C>,
    conn: Mutex<Option<Arc<Mutex<C>>>>,
}

impl<C> OneConnection<C> {
    fn new(ctx: Arc<Context>, open: fn(&Arc<Context>, &str) -> io::Result<C>) -> OneConnection<C> {
        OneConnection {
            ctx,
            open,
            conn: Mutex::new(None),
        }
    }
}

impl<C: io::Read + io::Write + Send + 'static> git2::transport::SmartSubtransport
    for OneConnection<C>
{
    fn action(
        &self,
        url: &str,
        action: git2::transport::Service,
    ) -> Result<Box<dyn git2::transport::SmartSubtransportStream>, git2::Error> {
        use git2::transport::Service;
        if matches!(action, Service::ReceivePackLs | Service::ReceivePack) {
            return Err(push_refused());
        }
        let mut held = lock(&self.conn);
        let conn = match &*held {
            Some(conn) => Arc::clone(conn),
            None => {
                let opened = (self.open)(&self.ctx, url)
                    .map_err(|e| git2::Error::from_str(&e.to_string()))?;
                let conn = Arc::new(Mutex::new(opened));
                *held = Some(Arc::clone(&conn));
                conn
            }
        };
        Ok(Box::new(Shared(conn)))
    }

    fn close(&self) -> Result<(), git2::Error> {
        lock(&self.conn).take();
        Ok(())
    }
}

/// A handle on a held connection, as libgit2 wants one per action.
struct Shared<C>(Arc<Mutex<C>>);

impl<C: io::Read> io::Read for Shared<C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        lock(&self.0).read(buf)
    }
}

impl<C: io::Write> io::Write for Shared<C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.0).flush()
    }
}

/// A git protocol request line (`git-upload-pack /path\0host=...\0`) as one pkt-line.
fn pkt_line(payload: &[u8]) -> Vec<u8> {
    let mut line = format!("{:04x}", payload.len() + 4).into_bytes();
    line.extend_from_slice(payload);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkt_lines_carry_their_length() {
        assert_eq!(pkt_line(b"a\0"), b"0006a\0");
        assert_eq!(pkt_line(b""), b"0004");
    }

    #[test]
    fn the_deadline_bounds_every_slice() {
        let within = Transport {
            timeout: Some(Duration::from_millis(50)),
            ..Transport::default()
        };
        assert!(Context::new("u", &within).slice().unwrap() <= Duration::from_millis(50));
        let past = Transport {
            timeout: Some(Duration::ZERO),
            ..Transport::default()
        };
        let ctx = Context::new("u", &past);
        let err = ctx.slice().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(matches!(ctx.stopped(), Some(Stop::TimedOut(_))));
    }

    #[test]
    fn cancellation_stops_at_the_next_check() {
        let transport = Transport::default();
        let ctx = Context::new("u", &transport);
        assert!(ctx.keep_going());
        assert_eq!(ctx.slice().unwrap(), CANCEL_CHECK);
        transport.cancel.store(true, Ordering::Relaxed);
        assert!(!ctx.keep_going());
        assert!(matches!(ctx.stopped(), Some(Stop::Cancelled)));
        // A cancelled write fails once, and is not retried by `write_all`.
        let err = ctx.check().unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::Interrupted);
    }
}

//! The control API: HTTP/1.1 with JSON bodies on a local unix socket, so
//! `curl --unix-socket /run/plumb/plumb.sock http://plumb/v1/services` is a complete client and
//! `plumbctl` is a convenience. Other machines are reached through their own sshd, never over TCP.
//!
//! Every route maps to one [`daemon::Command`] sent through a [`daemon::Handle`]; the daemon's actor
//! stays the only owner of service state. Who may do what is decided per request from the caller's
//! unix credentials (SO_PEERCRED, read once per connection) and its groups (read from the user
//! database per request, so a change in `/etc/group` counts without a restart): root and members of
//! the admin group may do everything, members of the read-only group may read, anyone else gets 403.
//! Every write, allowed or refused, is appended to the audit log as one JSON line.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use nix::unistd::{Gid, Group, Uid, User};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::daemon::{self, Command, CommandError, RollbackError};
use crate::listener;
use crate::proto;

/// The audit log's file name under the state directory.
pub const AUDIT_LOG: &str = "audit.log";

/// The largest request body read. The write routes take a few dozen bytes of JSON; a larger body
/// is refused (413) before it is read, so a caller cannot make the daemon read, hold or audit
/// megabytes.
pub const MAX_BODY: usize = 4 << 10;

/// The size at which the audit log is rotated: it is renamed to `audit.log.1` (replacing the one
/// before) and a new one is started, so the log and its one predecessor take at most twice this.
pub const AUDIT_MAX_BYTES: u64 = 8 << 20;

/// Entries `GET /v1/audit` returns without `?limit=`.
pub const AUDIT_DEFAULT_LIMIT: usize = 1000;

/// The longest audit line read back; longer ones (from before bodies were bounded) are skipped.
const AUDIT_MAX_LINE: usize = 64 << 10;

/// The result of an entry written before its write is carried out; a later entry with the same
/// `id` holds the outcome and replaces it when the log is read.
pub const AUDIT_STARTED: &str = "started";

/// Why the API could not start or stopped. Requests never end the API: their errors are answers.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot create the socket's directory {path}")]
    Directory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: another process is listening on this socket (is plumb already running?)")]
    InUse { path: PathBuf },
    #[error("cannot remove the stale socket {path}")]
    Stale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set owner and mode of {path}")]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The audit log of the state directory `state_dir`.
pub fn audit_path(state_dir: &Path) -> PathBuf {
    state_dir.join(AUDIT_LOG)
}

/// Listens on `path`, replacing a socket left by a plumb that did not stop cleanly, and gives it
/// mode 0660 and the read-only group, so exactly the users who may call the API can connect (admins
/// are members of both groups; root always can). A group that does not exist yet does not stop the
/// daemon: the socket falls back to the admin group, then to root only, with a warning. Must be
/// called inside a tokio runtime.
pub fn bind(
    path: &Path,
    admin_group: &str,
    readonly_group: &str,
) -> Result<UnixListener, ApiError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| ApiError::Directory {
                path: dir.to_owned(),
                source,
            })?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ApiError::NotASocket {
                path: path.to_owned(),
            });
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse {
                    path: path.to_owned(),
                });
            }
            fs::remove_file(path).map_err(|source| ApiError::Stale {
                path: path.to_owned(),
                source,
            })?;
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let (gid, mode) = match (group_id(readonly_group), group_id(admin_group)) {
        (Some(g), _) => (Some(g), 0o660),
        (None, Some(g)) => {
            warn!(
                "group {readonly_group:?} does not exist: only root and group {admin_group:?} can reach the API"
            );
            (Some(g), 0o660)
        }
        (None, None) => {
            warn!(
                "groups {admin_group:?} and {readonly_group:?} do not exist: only root can reach the API"
            );
            (None, 0o600)
        }
    };
    let permissions = || -> io::Result<()> {
        std::os::unix::fs::chown(path, None, gid)?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    };
    permissions().map_err(|source| ApiError::Permissions {
        path: path.to_owned(),
        source,
    })?;
    Ok(listener)
}

/// What the API needs besides the daemon: who may do what, where the audit goes, and the machines
/// of the config the daemon started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Members may read and write; root always may.
    pub admin_group: String,
    /// Members may read.
    pub readonly_group: String,
    /// The audit log, one JSON line per write.
    pub audit_log: PathBuf,
    /// `GET /v1/machines`. A snapshot of the config given at start: a SIGHUP that changes the
    /// machines is seen here after a restart (the services themselves are always current).
    pub machines: proto::Machines,
}

impl Access {
    /// From the config the daemon starts with, this machine's names (`Config::machine_names`) and
    /// the state directory in use (`--state-dir` or the config's).
    pub fn new(config: &Config, this: Vec<String>, state_dir: &Path) -> Access {
        Access {
            admin_group: config.settings.admin_group.clone(),
            readonly_group: config.settings.readonly_group.clone(),
            audit_log: audit_path(state_dir),
            machines: machines(config, this),
        }
    }
}

/// Every machine named in `config` with its services, in name order; `this` names this machine.
pub fn machines(config: &Config, this: Vec<String>) -> proto::Machines {
    let mut by_machine: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for s in &config.services {
        by_machine
            .entry(s.machine.as_str())
            .or_default()
            .push(s.name.clone());
    }
    proto::Machines {
        this,
        machines: by_machine
            .into_iter()
            .map(|(machine, mut services)| {
                services.sort();
                proto::MachineEntry {
                    machine: machine.to_owned(),
                    services,
                }
            })
            .collect(),
    }
}

/// The caller's credentials as the kernel reported them when it connected (SO_PEERCRED); `None`
/// when they could not be read, which authorises nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

impl Peer {
    /// The credentials of the process at the other end of `stream`, read once when it connected.
    pub fn of(stream: &tokio::net::UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(c) => Peer {
                uid: Some(c.uid()),
                gid: Some(c.gid()),
                pid: c.pid(),
            },
            Err(e) => {
                warn!("cannot read the credentials of an API connection: {e}");
                Peer::default()
            }
        }
    }
}

/// What a caller may do, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Nothing,
    Read,
    Admin,
}

/// The decision itself, pure: root and members of the admin group may write, members of the
/// read-only group may read. A group that does not exist (`None`) admits nobody.
pub fn role(uid: u32, gids: &[u32], admin: Option<u32>, readonly: Option<u32>) -> Role {
    let member = |g: Option<u32>| g.is_some_and(|g| gids.contains(&g));
    if uid == 0 || member(admin) {
        Role::Admin
    } else if member(readonly) {
        Role::Read
    } else {
        Role::Nothing
    }
}

/// A caller, resolved for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Caller {
    uid: u32,
    user: String,
    role: Role,
}

/// Looks the caller's groups up (primary, the peer's gid, supplementary) and decides its role.
/// The lookups read the user database (NSS), so they run on a blocking thread.
async fn resolve(peer: Peer, access: &Access) -> Caller {
    let Some(uid) = peer.uid else {
        return Caller {
            uid: u32::MAX,
            user: "unknown".into(),
            role: Role::Nothing,
        };
    };
    let admin_group = access.admin_group.clone();
    let readonly_group = access.readonly_group.clone();
    let lookup = move || {
        let mut gids: Vec<u32> = peer.gid.into_iter().collect();
        let user = match User::from_uid(Uid::from_raw(uid)) {
            Ok(Some(u)) => {
                gids.push(u.gid.as_raw());
                if let Ok(name) = CString::new(u.name.clone())
                    && let Ok(groups) = nix::unistd::getgrouplist(&name, u.gid)
                {
                    gids.extend(groups.into_iter().map(Gid::as_raw));
                }
                u.name
            }
            _ => uid.to_string(),
        };
        let role = role(
            uid,
            &gids,
            group_id(&admin_group),
            group_id(&readonly_group),
        );
        Caller { uid, user, role }
    };
    match tokio::task::spawn_blocking(lookup).await {
        Ok(caller) => caller,
        Err(e) => {
            error!("looking up uid {uid}: {e}");
            Caller {
                uid,
                user: uid.to_string(),
                role: Role::Nothing,
            }
        }
    }
}

fn group_id(name: &str) -> Option<u32> {
    match Group::from_name(name) {
        Ok(Some(g)) => Some(g.gid.as_raw()),
        _ => None,
    }
}

/// Serves the API on `listener` until `shutdown` is cancelled, then lets requests in flight finish
/// and removes the socket file. Connections are limited as [`listener::API`] says.
pub async fn serve(
    listener: UnixListener,
    handle: daemon::Handle,
    access: Access,
    shutdown: CancellationToken,
) {
    let socket = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned));
    let app = router(handle, access);
    listener::serve("control API", listener, app, listener::API, shutdown).await;
    if let Some(path) = socket {
        let _ = fs::remove_file(path);
    }
}

struct App {
    handle: daemon::Handle,
    access: Access,
    /// Serialises appends, so lines are written and synced one after the other.
    audit: tokio::sync::Mutex<()>,
    /// The next audit entry id: unix time in nanoseconds at start, then counted up, so ids stay
    /// unique across restarts.
    ids: std::sync::atomic::AtomicU64,
    /// Callers resolved lately, by (uid, gid): a user's groups are read from the user database
    /// (dozens of NSS probes) once per [`CALLER_TTL`], not at every request.
    callers: std::sync::Mutex<Callers>,
}

/// Resolved callers by (uid, gid), with when each was resolved.
type Callers = HashMap<(u32, Option<u32>), (Instant, Caller)>;

/// How long a caller's resolved groups are trusted: a user added to or removed from a group is
/// let in or turned away at most this late.
const CALLER_TTL: Duration = Duration::from_secs(5);

impl App {
    /// The caller of a request: root at once, others from the cache or the user database.
    async fn caller(&self, peer: Peer) -> Caller {
        match peer.uid {
            Some(0) => {
                return Caller {
                    uid: 0,
                    user: "root".into(),
                    role: Role::Admin,
                };
            }
            None => return resolve(peer, &self.access).await,
            Some(_) => {}
        }
        let key = (peer.uid.unwrap_or(u32::MAX), peer.gid);
        let cached = |callers: &mut Callers| {
            callers.retain(|_, (at, _)| at.elapsed() < CALLER_TTL);
            callers.get(&key).map(|(_, c)| c.clone())
        };
        if let Some(caller) = cached(&mut self.callers.lock().unwrap_or_else(|e| e.into_inner())) {
            return caller;
        }
        let caller = resolve(peer, &self.access).await;
        self.callers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (Instant::now(), caller.clone()));
        caller
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Appends `entry` to the audit log and syncs it, one append at a time.
    async fn audit(&self, entry: proto::AuditEntry) -> io::Result<()> {
        let _guard = self.audit.lock().await;
        let path = self.access.audit_log.clone();
        tokio::task::spawn_blocking(move || append_audit(&path, &entry, AUDIT_MAX_BYTES))
            .await
            .map_err(io::Error::other)?
    }
}

type Shared = State<Arc<App>>;
type Conn = ConnectInfo<Peer>;

/// The routes; separate from [`serve`] so their mapping can be read in one place.
fn router(handle: daemon::Handle, access: Access) -> Router {
    let app = Arc::new(App {
        handle,
        access,
        audit: tokio::sync::Mutex::new(()),
        callers: std::sync::Mutex::new(HashMap::new()),
        ids: std::sync::atomic::AtomicU64::new(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        ),
    });
    let v1 = proto::Route::ALL
        .into_iter()
        .fold(Router::new(), |v1, route| {
            v1.route(route.pattern(), handler(route))
        });
    Router::new()
        .nest(proto::PREFIX, v1)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// The handler of each route of [`proto::Route`]'s table, under the table's method.
fn handler(route: proto::Route) -> MethodRouter<Arc<App>> {
    use proto::Route;
    let method = match route.method() {
        "POST" => MethodFilter::POST,
        _ => MethodFilter::GET,
    };
    match route {
        Route::Machines => on(method, get_machines),
        Route::Services => on(method, get_services),
        Route::Service => on(method, get_service),
        Route::Freeze => on(method, freeze),
        Route::Unfreeze => on(method, unfreeze),
        Route::Rollback => on(method, rollback),
        Route::Pull => on(method, pull),
        Route::Diff => on(method, get_diff),
        Route::Wipe => on(method, wipe),
        Route::Promote => on(method, promote),
        Route::Audit => on(method, get_audit),
    }
}

/// An answer that is not a success: a status and the message of its [`proto::ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        json(
            self.status,
            &proto::ErrorBody {
                error: self.message,
            },
        )
    }
}

impl From<CommandError> for Failure {
    fn from(e: CommandError) -> Failure {
        Failure::new(command_status(&e), crate::error::chain(&e))
    }
}

/// The HTTP status of each way the daemon refuses a command.
fn command_status(e: &CommandError) -> StatusCode {
    match e {
        CommandError::UnknownService(_) => StatusCode::NOT_FOUND,
        CommandError::Rollback(e) if matches!(**e, RollbackError::Store(_)) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        CommandError::Noop { .. }
        | CommandError::NothingCheckedOut(_)
        | CommandError::NotWaiting(_)
        | CommandError::Rollback(_) => StatusCode::UNPROCESSABLE_ENTITY,
        CommandError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        CommandError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
        )
            .into_response(),
    }
}

async fn no_route(method: Method, uri: Uri) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {method} {}; routes are under {}/",
            uri.path(),
            proto::PREFIX
        ),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> Failure {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

fn refusal(caller: &Caller, access: &Access, write: bool) -> Failure {
    let (admin, ro) = (&access.admin_group, &access.readonly_group);
    let message = if write && caller.role == Role::Read {
        format!(
            "{} (uid {}) may only read: changes need root or group {admin:?}",
            caller.user, caller.uid
        )
    } else {
        format!(
            "{} (uid {}) is not root and not in group {admin:?} (read and write) or {ro:?} (read only)",
            caller.user, caller.uid
        )
    };
    Failure::new(StatusCode::FORBIDDEN, message)
}

/// Resolves the caller of a read and refuses it unless it may read.
async fn reader(app: &App, peer: Peer) -> Result<Caller, Failure> {
    let caller = app.caller(peer).await;
    if caller.role >= Role::Read {
        Ok(caller)
    } else {
        Err(refusal(&caller, &app.access, false))
    }
}

fn path_name(name: Result<UrlPath<String>, PathRejection>) -> Result<String, Failure> {
    name.map(|UrlPath(n)| n)
        .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, e.body_text()))
}

async fn get_machines(State(app): Shared, ConnectInfo(peer): Conn) -> Response {
    match reader(&app, peer).await {
        Ok(_) => json(StatusCode::OK, &app.access.machines),
        Err(f) => f.into_response(),
    }
}

async fn get_services(State(app): Shared, ConnectInfo(peer): Conn) -> Response {
    let answer = async {
        reader(&app, peer).await?;
        let services = app.handle.services().await?;
        Ok::<_, Failure>(proto::Services { services })
    };
    match answer.await {
        Ok(s) => json(StatusCode::OK, &s),
        Err(f) => f.into_response(),
    }
}

async fn get_service(
    State(app): Shared,
    ConnectInfo(peer): Conn,
    name: Result<UrlPath<String>, PathRejection>,
) -> Response {
    let answer = async {
        reader(&app, peer).await?;
        let name = path_name(name)?;
        Ok::<_, Failure>(app.handle.status(&name).await?)
    };
    match answer.await {
        Ok(s) => json(StatusCode::OK, &s),
        Err(f) => f.into_response(),
    }
}

async fn get_diff(
    State(app): Shared,
    ConnectInfo(peer): Conn,
    name: Result<UrlPath<String>, PathRejection>,
) -> Response {
    let answer = async {
        reader(&app, peer).await?;
        let name = path_name(name)?;
        Ok::<_, Failure>(app.handle.diff(&name).await?)
    };
    match answer.await {
        Ok(d) => json(StatusCode::OK, &d),
        Err(f) => f.into_response(),
    }
}

/// `?limit=N` on `GET /v1/audit`.
#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn get_audit(
    State(app): Shared,
    ConnectInfo(peer): Conn,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Response {
    let answer = async {
        reader(&app, peer).await?;
        let Query(q) = query.map_err(|e| Failure::new(StatusCode::BAD_REQUEST, e.body_text()))?;
        let path = app.access.audit_log.clone();
        let entries = tokio::task::spawn_blocking(move || read_audit(&path, q.limit))
            .await
            .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| {
                Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot read the audit log: {e}"),
                )
            })?;
        Ok::<_, Failure>(entries)
    };
    match answer.await {
        Ok(entries) => json(StatusCode::OK, &entries),
        Err(f) => f.into_response(),
    }
}

/// The audit log's entries, oldest first, the last `limit` of them ([`AUDIT_DEFAULT_LIMIT`] when
/// `None`), from `path` and its rotated predecessor `path.1`. Read from the end, so the cost is
/// the entries returned, not the log's size. An entry written before its write was carried out is
/// replaced by the later one with its outcome (same `id`); one without (the daemon stopped, or the
/// outcome could not be written) stays `started`. A missing log is empty; a line that is not an
/// entry (cut short by a crash, or too long) is skipped with a warning.
pub fn read_audit(path: &Path, limit: Option<usize>) -> io::Result<Vec<proto::AuditEntry>> {
    let limit = limit.unwrap_or(AUDIT_DEFAULT_LIMIT);
    let mut newest_first = Vec::new();
    let mut outcomes = std::collections::HashSet::new();
    let rotated = rotated_path(path);
    for file in [path, rotated.as_path()] {
        let mut lines = match fs::File::open(file) {
            Ok(f) => LinesFromEnd::new(f)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        while newest_first.len() < limit {
            let Some(line) = lines.next_line()? else {
                break;
            };
            let entry: proto::AuditEntry = match line {
                Line::Long => {
                    warn!(
                        "{}: skipped an audit line over {AUDIT_MAX_LINE} bytes",
                        file.display()
                    );
                    continue;
                }
                Line::Text(text) if text.trim_ascii().is_empty() => continue,
                Line::Text(text) => match serde_json::from_slice(&text) {
                    Ok(e) => e,
                    Err(e) => {
                        warn!("{}: not an audit entry: {e}", file.display());
                        continue;
                    }
                },
            };
            if entry.id != 0 {
                if entry.result == AUDIT_STARTED {
                    if outcomes.contains(&entry.id) {
                        continue;
                    }
                } else {
                    outcomes.insert(entry.id);
                }
            }
            newest_first.push(entry);
        }
    }
    newest_first.reverse();
    Ok(newest_first)
}

/// `audit.log.1` beside `audit.log`.
fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// One line read backwards.
enum Line {
    Text(Vec<u8>),
    /// Longer than [`AUDIT_MAX_LINE`]: not kept.
    Long,
}

/// A file's lines, last first, read in blocks from the end; memory is one block and one line.
struct LinesFromEnd {
    file: fs::File,
    /// Where the part of the file not yet read ends.
    pos: u64,
    /// Read but not yet returned: the tail of a line whose start is still in the file.
    pending: Vec<u8>,
    /// The line being gathered is over the limit: drop it whole.
    long: bool,
}

impl LinesFromEnd {
    const BLOCK: u64 = 64 << 10;

    fn new(file: fs::File) -> io::Result<LinesFromEnd> {
        let pos = file.metadata()?.len();
        Ok(LinesFromEnd {
            file,
            pos,
            pending: Vec::new(),
            long: false,
        })
    }

    fn next_line(&mut self) -> io::Result<Option<Line>> {
        use std::os::unix::fs::FileExt;
        loop {
            if let Some(nl) = self.pending.iter().rposition(|b| *b == b'\n') {
                let line = self.pending.split_off(nl + 1);
                self.pending.truncate(nl);
                let long = std::mem::take(&mut self.long);
                if long || line.len() > AUDIT_MAX_LINE {
                    return Ok(Some(Line::Long));
                }
                if line.is_empty() {
                    continue;
                }
                return Ok(Some(Line::Text(line)));
            }
            if self.pos == 0 {
                if self.pending.is_empty() && !self.long {
                    return Ok(None);
                }
                let line = std::mem::take(&mut self.pending);
                let long = std::mem::take(&mut self.long);
                return Ok(Some(if long || line.len() > AUDIT_MAX_LINE {
                    Line::Long
                } else {
                    Line::Text(line)
                }));
            }
            if self.pending.len() > AUDIT_MAX_LINE {
                // No line start in sight: keep only that this line is too long.
                self.pending.clear();
                self.long = true;
            }
            let n = Self::BLOCK.min(self.pos);
            self.pos -= n;
            let mut block = vec![0; n as usize];
            self.file.read_exact_at(&mut block, self.pos)?;
            block.append(&mut self.pending);
            self.pending = block;
        }
    }
}

/// Appends `entry` as one line and syncs it: an audit entry that a crash can lose is worth little.
/// A log that would grow past `max_bytes` is first rotated to `audit.log.1` (see
/// [`AUDIT_MAX_BYTES`]).
pub fn append_audit(path: &Path, entry: &proto::AuditEntry, max_bytes: u64) -> io::Result<()> {
    let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
    line.push(b'\n');
    match fs::metadata(path) {
        Ok(m) if m.len() > 0 && m.len() + line.len() as u64 > max_bytes => {
            fs::rename(path, rotated_path(path))?;
        }
        _ => {}
    }
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)?;
    f.write_all(&line)?;
    f.sync_data()
}

/// The four writes, with their request bodies parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Freeze(proto::FreezeRequest),
    Unfreeze,
    Rollback(proto::RollbackRequest),
    Pull(proto::PullRequest),
    Wipe,
    Promote,
}

impl Change {
    /// The daemon command for this write on `service`, with times taken from `now` (unix seconds).
    fn command(self, service: String, now: u64) -> Result<Command, Failure> {
        Ok(match self {
            Change::Freeze(r) => {
                let until = match r.duration.as_deref() {
                    None => None,
                    Some(d) => Some(now.saturating_add(parse_duration(d)?.as_secs())),
                };
                Command::Freeze { service, until }
            }
            Change::Unfreeze => Command::Unfreeze(service),
            Change::Rollback(r) => Command::Rollback {
                service,
                revision: r.revision,
            },
            Change::Pull(r) => Command::Pull {
                service,
                force: r.force,
            },
            Change::Wipe => Command::Wipe(service),
            Change::Promote => Command::Promote(service),
        })
    }
}

/// The write `action` (the route's last segment) with its request body parsed.
fn change(action: &str, bytes: &[u8]) -> Result<Change, Failure> {
    match action {
        "freeze" => body(bytes).map(Change::Freeze),
        "unfreeze" => body::<NoArguments>(bytes).map(|_| Change::Unfreeze),
        "rollback" => body(bytes).map(Change::Rollback),
        "pull" => body(bytes).map(Change::Pull),
        "wipe" => body::<NoArguments>(bytes).map(|_| Change::Wipe),
        "promote" => body::<NoArguments>(bytes).map(|_| Change::Promote),
        other => Err(Failure::new(
            StatusCode::NOT_FOUND,
            format!("no write {other:?}"),
        )),
    }
}

/// The parsing half of a write, pure: the daemon command that `action` ("freeze", "unfreeze",
/// "rollback", "pull", "wipe", "promote") with the request body `bytes` asks for on `service` at `now` (unix
/// seconds), or the status and message the caller gets. The handlers run exactly this; it is
/// public for the fuzz targets (`fuzz/`).
pub fn write_command(
    action: &str,
    service: String,
    bytes: &[u8],
    now: u64,
) -> Result<Command, (StatusCode, String)> {
    change(action, bytes)
        .and_then(|c| c.command(service, now))
        .map_err(|f| (f.status, f.message))
}

/// The longest freeze with a duration: a hundred years. Longer is refused rather than kept, since
/// the daemon schedules the freeze's end as a point in time (an `Instant`), which a duration near
/// `u64::MAX` seconds would overflow; "until unfrozen" is a freeze without a duration.
pub const MAX_FREEZE: Duration = crate::config::MAX_DURATION;

/// A freeze's duration: "90m", "2h", "1d" and anything humantime reads, more than zero and at most
/// [`MAX_FREEZE`].
fn parse_duration(d: &str) -> Result<Duration, Failure> {
    let invalid = |why: String| {
        Failure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("duration {d:?} is not a duration like \"90m\", \"2h\" or \"1d\": {why}"),
        )
    };
    match humantime::parse_duration(d) {
        // Freezes end on whole seconds: "500ms" would end the moment it began.
        Ok(x) if x < Duration::from_secs(1) => Err(invalid("it must be at least 1s".into())),
        Ok(x) if x > MAX_FREEZE => Err(invalid(
            "it must be at most 100 years; freeze without a duration to freeze until unfrozen"
                .into(),
        )),
        Ok(x) => Ok(x),
        Err(e) => Err(invalid(e.to_string())),
    }
}

/// A JSON request body: an object whose keys are all the route's (a misspelt key is an error
/// naming it, never a default); an empty body reads as `{}` so optional fields take their defaults.
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    let bad = |why: String| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON for this route: {why}"),
        )
    };
    let value: serde_json::Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::json!({})
    } else {
        serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?
    };
    if !value.is_object() {
        return Err(bad(format!("expected a JSON object, got {}", kind(&value))));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// What a JSON value is, for messages.
fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The body of the writes that take no arguments: empty or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArguments {}

/// The request body as the audit log records it: the JSON as sent, or the text when it is not JSON.
pub fn arguments(bytes: &[u8]) -> serde_json::Value {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return serde_json::json!({});
    }
    serde_json::from_slice(bytes).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(bytes);
        let cut: String = text.chars().take(1024).collect();
        serde_json::json!({ "body": cut })
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

type Body = Result<Bytes, BytesRejection>;
type Name = Result<UrlPath<String>, PathRejection>;

async fn freeze(State(app): Shared, ConnectInfo(peer): Conn, name: Name, bytes: Body) -> Response {
    write(&app, peer, "freeze", name, bytes).await
}

async fn unfreeze(
    State(app): Shared,
    ConnectInfo(peer): Conn,
    name: Name,
    bytes: Body,
) -> Response {
    write(&app, peer, "unfreeze", name, bytes).await
}

async fn rollback(
    State(app): Shared,
    ConnectInfo(peer): Conn,
    name: Name,
    bytes: Body,
) -> Response {
    write(&app, peer, "rollback", name, bytes).await
}

async fn pull(State(app): Shared, ConnectInfo(peer): Conn, name: Name, bytes: Body) -> Response {
    write(&app, peer, "pull", name, bytes).await
}

async fn wipe(State(app): Shared, ConnectInfo(peer): Conn, name: Name, bytes: Body) -> Response {
    write(&app, peer, "wipe", name, bytes).await
}

async fn promote(State(app): Shared, ConnectInfo(peer): Conn, name: Name, bytes: Body) -> Response {
    write(&app, peer, "promote", name, bytes).await
}

/// One write: authorise, parse, record it, call the daemon, and record the outcome. A write the
/// audit log cannot record is not carried out (503, nothing changes): its entry is synced before
/// the daemon is asked, and the outcome follows in a second entry with the same id. A write
/// refused before that (403, a bad body) has one entry, the refusal.
async fn write(app: &App, peer: Peer, action: &'static str, name: Name, bytes: Body) -> Response {
    let caller = app.caller(peer).await;
    let service = name.as_ref().ok().map(|UrlPath(n)| n.clone());
    let (arguments, command) = match bytes {
        Err(e) => (
            serde_json::json!({}),
            Err(Failure::new(e.status(), e.body_text())),
        ),
        Ok(bytes) if caller.role < Role::Admin => {
            (arguments(&bytes), Err(refusal(&caller, &app.access, true)))
        }
        Ok(bytes) => (
            arguments(&bytes),
            path_name(name).and_then(|name| change(action, &bytes)?.command(name, unix_now())),
        ),
    };
    let id = app.next_id();
    let entry = |result: String, arguments: &serde_json::Value| proto::AuditEntry {
        id,
        time: unix_now(),
        uid: caller.uid,
        user: caller.user.clone(),
        action: action.to_owned(),
        service: service.clone(),
        arguments: arguments.clone(),
        result,
    };
    let outcome = match command {
        Err(f) => Err(f),
        Ok(command) => match app.audit(entry(AUDIT_STARTED.to_owned(), &arguments)).await {
            Err(e) => Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "nothing was changed: the write cannot be recorded in the audit log {}: {e}",
                    app.access.audit_log.display()
                ),
            )),
            Ok(()) => app.handle.call(command).await.map_err(Failure::from),
        },
    };
    let result = match &outcome {
        Ok(r) if r.ok => "ok".to_owned(),
        Ok(r) => format!("failed: {}", r.message),
        Err(f) if f.status == StatusCode::FORBIDDEN => format!("refused: {}", f.message),
        Err(f) => format!("error {}: {}", f.status.as_u16(), f.message),
    };
    info!(
        user = %caller.user,
        uid = caller.uid,
        pid = ?peer.pid,
        service = ?service,
        "{action}: {result}"
    );
    // A rollback's revision as typed ("HEAD~1", an abbreviated hash) names different commits as
    // the branch moves: the outcome records the commit it was resolved to beside it.
    let mut arguments = arguments;
    if let (Ok(r), Some(fields)) = (&outcome, arguments.as_object_mut())
        && action == "rollback"
        && let Some(pinned) = &r.status.pinned
    {
        fields.insert("resolved".to_owned(), serde_json::json!(pinned));
    }
    if let Err(e) = app.audit(entry(result, &arguments)).await {
        error!(
            "cannot append to the audit log {}: {e}",
            app.access.audit_log.display()
        );
    }
    match outcome {
        Ok(r) => json(StatusCode::OK, &r),
        Err(f) => f.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        let (admin, ro) = (Some(900), Some(901));
        assert_eq!(role(0, &[], None, None), Role::Admin);
        assert_eq!(role(0, &[], admin, ro), Role::Admin);
        assert_eq!(role(1000, &[1000, 900], admin, ro), Role::Admin);
        assert_eq!(role(1000, &[1000, 900, 901], admin, ro), Role::Admin);
        assert_eq!(role(1000, &[901], admin, ro), Role::Read);
        assert_eq!(role(1000, &[1000, 27], admin, ro), Role::Nothing);
        assert_eq!(role(1000, &[], admin, ro), Role::Nothing);
        // Missing groups admit nobody but root.
        assert_eq!(role(1000, &[900, 901], None, None), Role::Nothing);
        assert_eq!(role(1000, &[901], None, ro), Role::Read);
        assert!(Role::Admin > Role::Read && Role::Read > Role::Nothing);
    }

    #[test]
    fn command_errors_map_to_statuses() {
        for (e, status) in [
            (CommandError::UnknownService("x".into()), 404),
            (CommandError::NothingCheckedOut("x".into()), 422),
            (CommandError::NotWaiting("x".into()), 422),
            (
                CommandError::Rollback(std::sync::Arc::new(RollbackError::NoHead)),
                422,
            ),
            (
                CommandError::Rollback(std::sync::Arc::new(RollbackError::Store(
                    crate::git::GitError::Cancelled { url: "u".into() },
                ))),
                500,
            ),
            (CommandError::Unavailable, 503),
        ] {
            let f = Failure::from(e.clone());
            assert_eq!(f.status.as_u16(), status, "{e:?}");
            assert_eq!(f.message, crate::error::chain(&e));
        }
    }

    #[test]
    fn writes_become_commands() {
        let freeze = |d: Option<&str>| {
            Change::Freeze(proto::FreezeRequest {
                duration: d.map(str::to_owned),
            })
            .command("nginx".into(), 1000)
        };
        assert_eq!(
            freeze(None).unwrap(),
            Command::Freeze {
                service: "nginx".into(),
                until: None
            }
        );
        assert_eq!(
            freeze(Some("90m")).unwrap(),
            Command::Freeze {
                service: "nginx".into(),
                until: Some(1000 + 90 * 60)
            }
        );
        for bad in ["soon", "0s", "500ms", "", "101y", "18446744073709551615s"] {
            let f = freeze(Some(bad)).unwrap_err();
            assert_eq!(f.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(f.message.contains(&format!("{bad:?}")), "{}", f.message);
        }
        assert_eq!(
            Change::Pull(proto::PullRequest { force: true })
                .command("a".into(), 0)
                .unwrap(),
            Command::Pull {
                service: "a".into(),
                force: true
            }
        );
        assert_eq!(
            Change::Unfreeze.command("a".into(), 0).unwrap(),
            Command::Unfreeze("a".into())
        );
    }

    #[test]
    fn bodies() {
        let r: proto::FreezeRequest = body(b"").unwrap();
        assert_eq!(r.duration, None);
        let r: proto::PullRequest = body(b" \n").unwrap();
        assert!(!r.force);
        let r: proto::RollbackRequest = body(br#"{"revision":"abc"}"#).unwrap();
        assert_eq!(r.revision, "abc");
        let f = body::<proto::RollbackRequest>(b"").unwrap_err();
        assert_eq!(f.status, StatusCode::BAD_REQUEST);
        assert!(f.message.contains("revision"), "{}", f.message);
        let f = body::<proto::FreezeRequest>(b"{not json").unwrap_err();
        assert_eq!(f.status, StatusCode::BAD_REQUEST);
        // A misspelt key is an error naming it, never a freeze until unfrozen.
        let f = body::<proto::FreezeRequest>(br#"{"duraton":"2h"}"#).unwrap_err();
        assert_eq!(f.status, StatusCode::BAD_REQUEST);
        assert!(
            f.message.contains("unknown field `duraton`"),
            "{}",
            f.message
        );
        for not_object in [&b"[]"[..], b"null", b"\"2h\"", b"1"] {
            let f = body::<proto::PullRequest>(not_object).unwrap_err();
            assert!(
                f.message.contains("expected a JSON object"),
                "{}",
                f.message
            );
        }
        assert!(body::<NoArguments>(b"{}").is_ok());
        let f = body::<NoArguments>(br#"{"force":true}"#).unwrap_err();
        assert!(f.message.contains("unknown field `force`"), "{}", f.message);
        assert_eq!(arguments(b""), serde_json::json!({}));
        assert_eq!(
            arguments(b"{\"force\":true}"),
            serde_json::json!({"force": true})
        );
        assert_eq!(arguments(b"x"), serde_json::json!({"body": "x"}));
    }

    fn entry(id: u64, result: &str) -> proto::AuditEntry {
        proto::AuditEntry {
            id,
            time: id,
            uid: 0,
            user: "root".into(),
            action: "freeze".into(),
            service: Some("nginx".into()),
            arguments: serde_json::json!({}),
            result: result.into(),
        }
    }

    #[test]
    fn audit_log_round_trip_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = audit_path(dir.path());
        assert!(read_audit(&path, None).unwrap().is_empty());
        for i in 1..=3 {
            append_audit(&path, &entry(i, "ok"), AUDIT_MAX_BYTES).unwrap();
        }
        // A torn line from a crash is skipped, not fatal.
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"time\":")
            .unwrap();
        let all = read_audit(&path, None).unwrap();
        assert_eq!(all, vec![entry(1, "ok"), entry(2, "ok"), entry(3, "ok")]);
        assert_eq!(
            read_audit(&path, Some(2)).unwrap(),
            vec![entry(2, "ok"), entry(3, "ok")]
        );
        assert_eq!(read_audit(&path, Some(10)).unwrap().len(), 3);
        assert!(read_audit(&path, Some(0)).unwrap().is_empty());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "the audit log is not world-readable");
    }

    #[test]
    fn an_outcome_replaces_its_started_entry_and_a_lost_one_stays_started() {
        let dir = tempfile::tempdir().unwrap();
        let path = audit_path(dir.path());
        for e in [
            entry(1, AUDIT_STARTED),
            entry(2, "refused: may only read"),
            entry(3, AUDIT_STARTED),
            entry(1, "ok"),
            entry(4, AUDIT_STARTED),
            entry(4, "failed: frozen"),
        ] {
            append_audit(&path, &e, AUDIT_MAX_BYTES).unwrap();
        }
        let results: Vec<(u64, String)> = read_audit(&path, None)
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.result))
            .collect();
        assert_eq!(
            results,
            [
                (2, "refused: may only read".to_owned()),
                (3, AUDIT_STARTED.to_owned()),
                (1, "ok".to_owned()),
                (4, "failed: frozen".to_owned()),
            ]
        );
    }

    #[test]
    fn the_audit_log_rotates_once_and_is_read_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = audit_path(dir.path());
        // Ids of one length, so each file has room for exactly ten entries.
        let line = serde_json::to_vec(&entry(100, "ok")).unwrap().len() as u64 + 1;
        let max = line * 10;
        for i in 100..=134 {
            append_audit(&path, &entry(i, "ok"), max).unwrap();
        }
        assert!(fs::metadata(&path).unwrap().len() <= max);
        assert!(fs::metadata(rotated_path(&path)).unwrap().len() <= max);
        let ids: Vec<u64> = read_audit(&path, None)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(
            ids,
            (120..=134).collect::<Vec<_>>(),
            "this file and the one before"
        );
        let ids: Vec<u64> = read_audit(&path, Some(3))
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, [132, 133, 134]);
    }

    #[test]
    fn lines_from_the_end_of_any_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines");
        let long = "y".repeat(AUDIT_MAX_LINE + 10);
        let block = "z".repeat(LinesFromEnd::BLOCK as usize * 2 + 3);
        let text = format!("a\n{long}\n\nb\n{block}\nc");
        fs::write(&path, &text).unwrap();
        let mut lines = LinesFromEnd::new(fs::File::open(&path).unwrap()).unwrap();
        let mut got = Vec::new();
        while let Some(line) = lines.next_line().unwrap() {
            got.push(match line {
                Line::Text(t) if t.len() > 10 => format!("{} bytes", t.len()),
                Line::Text(t) => String::from_utf8(t).unwrap(),
                Line::Long => "long".to_owned(),
            });
        }
        assert_eq!(got, ["c", "long", "b", "long", "a"]);
    }

    #[test]
    fn machines_from_config() {
        let c = Config::parse(
            Path::new("p.toml"),
            "[global]\nupstream = \"u\"\n[[services]]\nmachine = \"b\"\nservice = \"z\"\n[[services]]\nmachine = \"a\"\nservice = \"y\"\n[[services]]\nmachine = \"b\"\nservice = \"x\"\n",
        )
        .unwrap();
        let m = machines(&c, vec!["a".into()]);
        assert_eq!(m.this, ["a"]);
        let got: Vec<(&str, Vec<&str>)> = m
            .machines
            .iter()
            .map(|e| {
                (
                    e.machine.as_str(),
                    e.services.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(got, [("a", vec!["y"]), ("b", vec!["x", "z"])]);
    }
}

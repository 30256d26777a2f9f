//! A small typed client for systemd's manager over D-Bus (`org.freedesktop.systemd1`).
//!
//! plumb never runs `systemctl`: it asks the manager directly, through `#[zbus::proxy]` traits for
//! the manager, units and services, so every call and answer is typed and no process is spawned
//! per reload. What this client adds over the calls is waiting for jobs correctly: `StartUnit`,
//! `ReloadUnit` and friends only *queue* a job and return its object path; the outcome comes
//! later, in a `JobRemoved(id, job, unit, result)` signal. That signal can reach the client before
//! the method's reply (the job may finish first), so every job operation
//!
//! 1. has the bus deliver `JobRemoved` to this connection (`Subscribe` once per connection, plus a
//!    signal stream per operation), *before* the method is called;
//! 2. keeps every `JobRemoved` seen while the call is in flight (the stream is read concurrently
//!    with the call, so a burst of other jobs' signals can neither be lost nor stall the reply);
//! 3. once the reply names the job, takes its result from what was kept, or waits for it with a
//!    deadline.
//!
//! A job that ends badly is not a D-Bus error: a reload of a stopped unit ends with result
//! `invalid`, a failed `ExecReload=` with `failed`. Those come back as [`JobResult`]; errors are
//! for calls systemd refused (no such unit, job type not applicable) and for a lost connection.

use std::fmt;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::proxy::CacheProperties;
use zbus::{Connection, OwnedObjectPath};

/// The manager's interface (`org.freedesktop.systemd1.Manager`), as much of it as plumb uses.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    /// Makes systemd emit its signals to this connection until it closes.
    fn subscribe(&self) -> zbus::Result<()>;

    /// `systemctl daemon-reload`; the reply comes once the reload is done.
    fn reload(&self) -> zbus::Result<()>;

    /// `systemctl reset-failed UNIT`.
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;

    /// The loaded units matching `patterns` (and `states`, when not empty): name, description,
    /// load state, active state, sub state, followed unit, object path, job id, job type, job path.
    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<
        Vec<(
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        )>,
    >;

    /// The unit's object path, loading it first if needed.
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    /// Queues a start job; returns the job's path.
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Queues a restart job; returns the job's path.
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Queues a reload job; returns the job's path.
    fn reload_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Queues a reload, or a restart for a unit that cannot reload; returns the job's path.
    fn reload_or_restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Queues a stop job; returns the job's path.
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// A job ended: its id, path, unit and result (`done`, `failed`, ...).
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;

    /// A daemon-reload began (`true`) or ended (`false`).
    #[zbus(signal)]
    fn reloading(&self, active: bool) -> zbus::Result<()>;
}

/// A unit's interface (`org.freedesktop.systemd1.Unit`) at the path [`ManagerProxy::load_unit`]
/// gives: the states `systemctl status` shows.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    /// `loaded`, `not-found`, `masked`, ...
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;

    /// `active`, `inactive`, `failed`, ...
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;

    /// The unit type's own state: `running`, `dead`, `mounted`, ...
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;

    /// When the unit last entered `active`, in microseconds of `CLOCK_MONOTONIC`.
    #[zbus(property)]
    fn active_enter_timestamp_monotonic(&self) -> zbus::Result<u64>;

    /// The unit's files changed since systemd loaded them.
    #[zbus(property)]
    fn need_daemon_reload(&self) -> zbus::Result<bool>;
}

/// A service unit's own interface (`org.freedesktop.systemd1.Service`).
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    /// The main process, 0 when there is none.
    #[zbus(property(emits_changed_signal = "false"), name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
}

/// The jobs plumb queues, each one method of the manager.
#[derive(Debug, Clone, Copy)]
enum Job {
    Start,
    Restart,
    Reload,
    ReloadOrRestart,
    Stop,
}

impl Job {
    /// The operation as errors name it (`systemctl`'s verb).
    fn op(self) -> &'static str {
        match self {
            Job::Start => "start",
            Job::Restart => "restart",
            Job::Reload => "reload",
            Job::ReloadOrRestart => "reload-or-restart",
            Job::Stop => "stop",
        }
    }

    /// Queues the job for `unit`, replacing a conflicting one; returns the job's path.
    async fn queue(self, manager: &ManagerProxy<'_>, unit: &str) -> zbus::Result<OwnedObjectPath> {
        const MODE: &str = "replace";
        match self {
            Job::Start => manager.start_unit(unit, MODE).await,
            Job::Restart => manager.restart_unit(unit, MODE).await,
            Job::Reload => manager.reload_unit(unit, MODE).await,
            Job::ReloadOrRestart => manager.reload_or_restart_unit(unit, MODE).await,
            Job::Stop => manager.stop_unit(unit, MODE).await,
        }
    }
}

/// How long a job may take before [`Systemd`] stops waiting for it, unless set otherwise with
/// [`Systemd::with_job_timeout`]. A restart is a stop plus a start, each allowed 90 s by systemd's
/// defaults; this leaves room for both.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(200);

/// What went wrong talking to systemd. Each names the operation and, when there is one, the unit;
/// the cause is its `source`, so [`crate::error::Chain`] tells an operator what failed, e.g.
/// `reload nginx.service: org.freedesktop.systemd1.JobTypeNotApplicable: Job type reload is not
/// applicable for unit nginx.service.`
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// The bus could not be reached, or systemd refused the subscription to its signals.
    #[error("cannot connect to systemd on {address}")]
    Connect {
        address: String,
        #[source]
        source: zbus::Error,
    },
    /// A call was refused or failed on the wire.
    #[error("{op}{}", unit_suffix(unit))]
    Call {
        op: &'static str,
        unit: Option<String>,
        #[source]
        source: zbus::Error,
    },
    /// A job was queued but its `JobRemoved` did not arrive in time; the job may still be running.
    #[error("{op} {unit}: job {job} still running after {}", humantime::format_duration(*.timeout))]
    JobTimeout {
        op: &'static str,
        unit: String,
        job: String,
        timeout: Duration,
    },
    /// systemd did not answer the call that queues a job in time (it may be busy or hung).
    #[error("{op} {unit}: no reply from systemd after {}", humantime::format_duration(*.timeout))]
    NoReply {
        op: &'static str,
        unit: String,
        timeout: Duration,
    },
    /// The connection to the bus closed while a job was awaited.
    #[error("{op} {unit}: the connection to systemd closed while waiting for job {job}")]
    Disconnected {
        op: &'static str,
        unit: String,
        job: String,
    },
}

fn unit_suffix(unit: &Option<String>) -> String {
    unit.as_ref().map(|u| format!(" {u}")).unwrap_or_default()
}

impl SystemdError {
    /// The D-Bus error name systemd answered with, e.g.
    /// `org.freedesktop.systemd1.NoSuchUnit`, when it refused a call.
    pub fn dbus_error_name(&self) -> Option<String> {
        match self {
            SystemdError::Call { source, .. } | SystemdError::Connect { source, .. } => {
                match source {
                    zbus::Error::MethodError(name, _, _) => Some(name.as_str().to_owned()),
                    zbus::Error::FDO(e) => Some(zbus::DBusError::name(e.as_ref()).to_string()),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Whether systemd answered that the unit does not exist (no unit file, nothing generated).
    pub fn is_no_such_unit(&self) -> bool {
        self.dbus_error_name().as_deref() == Some("org.freedesktop.systemd1.NoSuchUnit")
    }
}

/// How a job ended, from the `result` of its `JobRemoved` signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    /// The job did what it was asked.
    Done,
    /// The unit's command failed (an `ExecReload=` exiting non-zero, a start that failed).
    Failed,
    /// Another job replaced it, or it was cancelled.
    Canceled,
    /// systemd's own job timeout (`JobTimeoutSec=`) hit.
    Timeout,
    /// A unit it depends on failed.
    Dependency,
    /// Nothing to do (e.g. a start of a unit already running as a dependency of the job).
    Skipped,
    /// The job did not apply to the unit's state, e.g. a reload of a stopped unit.
    Invalid,
    /// A result this client does not know (newer systemd: `unsupported`, `once`, `frozen`, ...).
    Other(String),
}

impl JobResult {
    /// Reads the `result` string of `JobRemoved`.
    pub fn parse(s: &str) -> JobResult {
        match s {
            "done" => JobResult::Done,
            "failed" => JobResult::Failed,
            "canceled" => JobResult::Canceled,
            "timeout" => JobResult::Timeout,
            "dependency" => JobResult::Dependency,
            "skipped" => JobResult::Skipped,
            "invalid" => JobResult::Invalid,
            other => JobResult::Other(other.to_owned()),
        }
    }

    /// The name systemd uses for this result.
    pub fn as_str(&self) -> &str {
        match self {
            JobResult::Done => "done",
            JobResult::Failed => "failed",
            JobResult::Canceled => "canceled",
            JobResult::Timeout => "timeout",
            JobResult::Dependency => "dependency",
            JobResult::Skipped => "skipped",
            JobResult::Invalid => "invalid",
            JobResult::Other(s) => s,
        }
    }

    /// Whether the job did what it was asked.
    pub fn is_done(&self) -> bool {
        *self == JobResult::Done
    }
}

impl fmt::Display for JobResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A unit's state as `systemctl status` shows it in its `Loaded:` and `Active:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    /// `loaded`, `not-found`, `bad-setting`, `error`, `masked`, ...
    pub load: String,
    /// `active`, `reloading`, `inactive`, `failed`, `activating`, `deactivating`, ...
    pub active: String,
    /// The unit type's own state: `running`, `exited`, `dead`, `mounted`, ...
    pub sub: String,
    /// When the unit last entered `active`, in microseconds of `CLOCK_MONOTONIC`; 0 when never.
    /// Lets a caller see that a unit only just started (a reload right after a start can reach
    /// a process before it handles the signal).
    pub active_enter_monotonic_usec: u64,
    /// The unit's files (unit file, drop-ins) changed on disk since systemd loaded them: it runs
    /// on an old definition until a daemon-reload.
    pub need_daemon_reload: bool,
}

impl UnitState {
    /// Whether the unit is up (`active`, or `reloading`, which is active and re-reading its files).
    pub fn is_active(&self) -> bool {
        matches!(self.active.as_str(), "active" | "reloading")
    }
}

impl fmt::Display for UnitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}), {}", self.active, self.sub, self.load)
    }
}

/// A connection to systemd's manager. Cheap to clone (one bus connection underneath); every
/// operation may run concurrently with others on the same client.
#[derive(Debug, Clone)]
pub struct Systemd {
    manager: ManagerProxy<'static>,
    job_timeout: Duration,
}

impl Systemd {
    /// Connects to systemd on the system bus (where `systemctl` finds it too).
    pub async fn system() -> Result<Systemd, SystemdError> {
        let connect = |source| SystemdError::Connect {
            address: "the system bus".into(),
            source,
        };
        let conn = zbus::connection::Builder::system()
            .method_timeout(DEFAULT_JOB_TIMEOUT)
            .build()
            .await
            .map_err(connect)?;
        Systemd::subscribe(conn, "the system bus").await
    }

    /// Connects to the bus at `address` (a D-Bus address such as
    /// `unix:path=/run/dbus/system_bus_socket`), for tests that reach another machine's bus.
    pub async fn from_address(address: &str) -> Result<Systemd, SystemdError> {
        let connect = |source| SystemdError::Connect {
            address: address.to_owned(),
            source,
        };
        let conn = zbus::connection::Builder::address(address)
            .method_timeout(DEFAULT_JOB_TIMEOUT)
            .build()
            .await
            .map_err(connect)?;
        Systemd::subscribe(conn, address).await
    }

    /// Asks systemd to send its signals (it only emits `JobRemoved` once a client subscribed;
    /// the subscription ends when this connection does).
    async fn subscribe(conn: Connection, address: &str) -> Result<Systemd, SystemdError> {
        let connect = |source| SystemdError::Connect {
            address: address.to_owned(),
            source,
        };
        // The manager's properties are never read: no cache, so no PropertiesChanged to follow.
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(connect)?;
        manager.subscribe().await.map_err(connect)?;
        Ok(Systemd {
            manager,
            job_timeout: DEFAULT_JOB_TIMEOUT,
        })
    }

    /// Waits at most `timeout` for each job (its call and its `JobRemoved`) instead of
    /// [`DEFAULT_JOB_TIMEOUT`].
    pub fn with_job_timeout(mut self, timeout: Duration) -> Systemd {
        self.job_timeout = timeout;
        self
    }

    /// Re-reads every unit file and re-runs the generators (`systemctl daemon-reload`). Returns
    /// when systemd has finished: the reply to `Reload` comes after the reload.
    pub async fn daemon_reload(&self) -> Result<(), SystemdError> {
        self.manager
            .reload()
            .await
            .map_err(|source| call_error("daemon-reload", None, source))
    }

    /// Clears `unit`'s failed state and its start rate counter (`systemctl reset-failed`), so a
    /// start plumb asks for is not refused as "start request repeated too quickly". A unit that
    /// is not loaded has nothing to clear, which is not an error.
    pub async fn reset_failed(&self, unit: &str) -> Result<(), SystemdError> {
        match self
            .manager
            .reset_failed_unit(unit)
            .await
            .map_err(|source| call_error("reset-failed", Some(unit), source))
        {
            Err(e) if e.is_no_such_unit() => Ok(()),
            other => other,
        }
    }

    /// The loaded units whose names match `pattern` (a glob, as `systemctl list-units PATTERN`),
    /// each with its `ActiveState`.
    pub async fn units_matching(
        &self,
        pattern: &str,
    ) -> Result<Vec<(String, String)>, SystemdError> {
        let units = self
            .manager
            .list_units_by_patterns(&[], &[pattern])
            .await
            .map_err(|source| call_error("list units", None, source))?;
        Ok(units
            .into_iter()
            .map(|(name, _, _, active, ..)| (name, active))
            .collect())
    }

    /// A stream that yields once at the end of every daemon-reload (systemd's `Reloading(false)`
    /// signal), whoever asked for it: the generators have run again then.
    pub async fn reloads(
        &self,
    ) -> Result<impl futures_util::Stream<Item = ()> + use<>, SystemdError> {
        let signals = self
            .manager
            .receive_reloading()
            .await
            .map_err(|source| call_error("watch daemon-reloads", None, source))?;
        Ok(signals.filter_map(|signal| async move {
            let active = signal.args().ok()?.active;
            (!active).then_some(())
        }))
    }

    /// Starts `unit` and waits for the job's result (`done` when it was already running).
    pub async fn start(&self, unit: &str) -> Result<JobResult, SystemdError> {
        self.job(Job::Start, unit).await
    }

    /// Stops `unit` if it runs, and starts it, waiting for the job's result.
    pub async fn restart(&self, unit: &str) -> Result<JobResult, SystemdError> {
        self.job(Job::Restart, unit).await
    }

    /// Reloads `unit` (its `ExecReload=`), waiting for the job's result: `invalid` when the unit is
    /// not running; an error when it has no way to reload.
    pub async fn reload(&self, unit: &str) -> Result<JobResult, SystemdError> {
        self.job(Job::Reload, unit).await
    }

    /// Reloads `unit` when it can, restarts it otherwise (starting it when stopped), waiting for
    /// the job's result.
    pub async fn reload_or_restart(&self, unit: &str) -> Result<JobResult, SystemdError> {
        self.job(Job::ReloadOrRestart, unit).await
    }

    /// Stops `unit`, waiting for the job's result.
    pub async fn stop(&self, unit: &str) -> Result<JobResult, SystemdError> {
        self.job(Job::Stop, unit).await
    }

    /// The unit's load, active and sub state. Loads the unit if systemd has not yet (a name no
    /// file defines comes back as `not-found`, not as an error).
    pub async fn unit_state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let err = |source| call_error("read the state of", Some(unit), source);
        let path = self.load_unit(unit).await.map_err(err)?;
        // Cached lazily: the first property read fetches all of them in one `GetAll`, so the
        // states read together are one moment's.
        let props = UnitProxy::builder(self.manager.inner().connection())
            .path(path)
            .build()
            .await
            .map_err(err)?;
        Ok(UnitState {
            load: props.load_state().await.map_err(err)?,
            active: props.active_state().await.map_err(err)?,
            sub: props.sub_state().await.map_err(err)?,
            active_enter_monotonic_usec: props
                .active_enter_timestamp_monotonic()
                .await
                .unwrap_or(0),
            need_daemon_reload: props.need_daemon_reload().await.unwrap_or(false),
        })
    }

    /// The main process of a service unit; `None` when it has none (stopped). An error for a unit
    /// that is not a service (no `MainPID` to read).
    pub async fn main_pid(&self, unit: &str) -> Result<Option<u32>, SystemdError> {
        let err = |source| call_error("read the main PID of", Some(unit), source);
        let path = self.load_unit(unit).await.map_err(err)?;
        let service = ServiceProxy::builder(self.manager.inner().connection())
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(err)?;
        let pid = service.main_pid().await.map_err(err)?;
        Ok((pid != 0).then_some(pid))
    }

    /// The unit's object path (`LoadUnit`).
    async fn load_unit(&self, unit: &str) -> zbus::Result<OwnedObjectPath> {
        self.manager.load_unit(unit).await
    }

    /// Queues `job` for `unit` and waits for its `JobRemoved`; see the module doc for why the
    /// signal stream is set up first and read during the call.
    async fn job(&self, job: Job, unit: &str) -> Result<JobResult, SystemdError> {
        let op = job.op();
        let err = |source| call_error(op, Some(unit), source);
        // Every unit's: the signal names the unit by its id, which an alias or a name without
        // its type suffix is not, so only the job's path identifies it.
        let mut signals = self.manager.receive_job_removed().await.map_err(err)?;
        let deadline = tokio::time::Instant::now() + self.job_timeout;
        let mut seen = Vec::new();
        let job_path = {
            let call = job.queue(&self.manager, unit);
            tokio::pin!(call);
            loop {
                tokio::select! {
                    reply = &mut call => break reply.map_err(err)?,
                    _ = tokio::time::sleep_until(deadline) => {
                        return Err(SystemdError::NoReply {
                            op,
                            unit: unit.to_owned(),
                            timeout: self.job_timeout,
                        });
                    }
                    Some(signal) = signals.next() => {
                        if let Ok(removed) = signal.args() {
                            seen.push((removed.job, removed.result));
                        }
                    }
                }
            }
        };
        if let Some((_, result)) = seen.into_iter().find(|(path, _)| *path == job_path) {
            return Ok(JobResult::parse(&result));
        }
        loop {
            let next = tokio::time::timeout_at(deadline, signals.next()).await;
            match next {
                Err(_) => {
                    return Err(SystemdError::JobTimeout {
                        op,
                        unit: unit.to_owned(),
                        job: job_path.to_string(),
                        timeout: self.job_timeout,
                    });
                }
                Ok(None) => {
                    return Err(SystemdError::Disconnected {
                        op,
                        unit: unit.to_owned(),
                        job: job_path.to_string(),
                    });
                }
                Ok(Some(signal)) => {
                    if let Ok(removed) = signal.args()
                        && removed.job == job_path
                    {
                        return Ok(JobResult::parse(&removed.result));
                    }
                }
            }
        }
    }
}

fn call_error(op: &'static str, unit: Option<&str>, source: zbus::Error) -> SystemdError {
    SystemdError::Call {
        op,
        unit: unit.map(str::to_owned),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_results_round_trip() {
        for s in [
            "done",
            "failed",
            "canceled",
            "timeout",
            "dependency",
            "skipped",
            "invalid",
            "frozen",
        ] {
            assert_eq!(JobResult::parse(s).as_str(), s);
        }
        assert_eq!(JobResult::parse("invalid"), JobResult::Invalid);
        assert_eq!(JobResult::parse("once"), JobResult::Other("once".into()));
        assert!(JobResult::parse("done").is_done());
        assert!(!JobResult::parse("skipped").is_done());
    }

    #[test]
    fn errors_name_operation_and_unit() {
        let e = call_error(
            "reload",
            Some("nginx.service"),
            zbus::Error::Failure("boom".into()),
        );
        assert_eq!(e.to_string(), "reload nginx.service");
        assert_eq!(crate::error::chain(&e), "reload nginx.service: boom");
        let e = call_error("daemon-reload", None, zbus::Error::Failure("boom".into()));
        assert_eq!(crate::error::chain(&e), "daemon-reload: boom");
        let e = SystemdError::JobTimeout {
            op: "restart",
            unit: "x.mount".into(),
            job: "/org/freedesktop/systemd1/job/7".into(),
            timeout: Duration::from_secs(200),
        };
        assert_eq!(
            e.to_string(),
            "restart x.mount: job /org/freedesktop/systemd1/job/7 still running after 3m 20s"
        );
    }

    #[test]
    fn unit_state_activity() {
        let state = |active: &str| UnitState {
            load: "loaded".into(),
            active: active.into(),
            sub: "running".into(),
            active_enter_monotonic_usec: 0,
            need_daemon_reload: false,
        };
        assert!(state("active").is_active());
        assert!(state("reloading").is_active());
        assert!(!state("failed").is_active());
        assert!(!state("activating").is_active());
        assert_eq!(state("active").to_string(), "active (running), loaded");
    }
}

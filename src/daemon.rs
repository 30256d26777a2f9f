//! The sync loop: polls each upstream, feeds the results to the services' state machines, and runs the
//! effects they ask for.
//!
//! One task (the actor in [`run`]) owns every service's state; git work runs on blocking threads and
//! comes back as messages, so state changes happen in one place and in order. All work on one upstream
//! (its fetch, then its services' checkouts) is one job at a time: the store is never used by two
//! threads, and a tick costs the server one fetch whatever the number of services on it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn};

use crate::apply;
use crate::bootstrap::{self, Bootstrap, BootstrapError};
use crate::config::{self, Config, ConfigError};
use crate::exec;
use crate::git::{self, FetchReport, GitError, Oid, Store};
use crate::layout::{self, Layout};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::service::{self, Effect, Event, Refusal, State};
use crate::systemd::Systemd;

/// How the daemon was started; everything it reads or binds is named here, so tests use temp dirs.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// Other names of this machine given on the command line (`--hosts`); the hostname and the
    /// config's `[plumb] hosts` always count too.
    pub hosts: Vec<String>,
    /// Overrides the config's `state_dir`.
    pub state_dir: Option<PathBuf>,
    /// Overrides the config's `interval`.
    pub interval: Option<Duration>,
    /// Run one cycle over every upstream, then return.
    pub once: bool,
    /// Drive `plumb apply` through systemd after each deploy. Off, the daemon only writes `.rev`
    /// files (a test and simulation mode; the `.path` units still apply where they exist).
    pub apply: bool,
    /// Every service only reports what it would deploy (`--noop`), whatever the config says.
    pub noop: bool,
    /// Where the daemon's state is exported for Prometheus, if anywhere.
    pub metrics: Option<Arc<Metrics>>,
    /// Take the config from git and install it over `config` (`--bootstrap`).
    pub bootstrap: Option<Bootstrap>,
}

/// Why the daemon could not start. Once it runs, nothing a service does stops it.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why moving a service's checkout failed. Becomes the service's BROKEN info, except `Refused`,
/// which is the deploy job declining a head on purpose (the files on disk are untouched).
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("refused: {why}")]
    Refused {
        revision: Option<Oid>,
        why: service::Refusal,
    },
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("{0}")]
    Store(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Each service's state when the daemon returned (after `--once` or shutdown).
#[derive(Debug, Clone)]
pub struct Summary {
    pub services: Vec<(String, service::Service)>,
}

impl Summary {
    /// True when every service is tracking its upstream and every upstream answered (cron users
    /// exit non-zero otherwise).
    pub fn healthy(&self) -> bool {
        self.services
            .iter()
            .all(|(_, s)| matches!(s.state, State::Ok | State::Freeze) && s.unreachable.is_none())
    }
}

/// Runs until `shutdown` is cancelled (or one cycle, with `once`). A `()` on `reload` re-reads the
/// config; a bad new config is logged and the running one kept.
pub async fn run(
    opts: Options,
    mut reload: mpsc::Receiver<()>,
    mut commands: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
) -> Result<Summary, DaemonError> {
    let config = load_config(&opts)?;
    let mut d = Daemon::new(opts, config)?;
    let (tx, mut rx) = mpsc::channel::<Done>(64);
    if d.opts.apply {
        d.connect_systemd(&tx).await;
    }
    // A config checked out from git but not yet installed (a crash in between) is installed now.
    if let Some(revision) = d
        .services
        .get(bootstrap::SELF)
        .and_then(|e| e.state.deployed)
        && d.opts.bootstrap.is_some()
    {
        d.apply(bootstrap::SELF, revision, &tx);
    }
    let notify = Notifier::from_env();
    let mut ready = false;
    let mut watchdog =
        tokio::time::interval(Notifier::watchdog_interval().unwrap_or(Duration::from_secs(3600)));
    loop {
        if !ready && d.all_cycled() {
            // Ready once every upstream was tried: units ordered after plumb see checkouts.
            ready = true;
            notify.send("READY=1");
        }
        // A one-shot run ends when every upstream has had a cycle and none is running (a config
        // installed by bootstrap may have started another: it must not be cancelled).
        let once_done =
            d.opts.once && d.all_cycled() && d.upstreams.values().all(|u| !u.busy && !u.again);
        let stopping = shutdown.is_cancelled() || once_done;
        if stopping {
            d.cancel.store(true, Ordering::Relaxed);
            if d.upstreams.values().all(|u| !u.busy) {
                break;
            }
        } else {
            d.tick(&tx);
            d.start_due(&tx);
        }
        let next = d.next_due();
        tokio::select! {
            Some(done) = rx.recv() => d.finish(done, &tx),
            _ = shutdown.cancelled(), if !stopping => {
                info!("shutting down");
                notify.send("STOPPING=1");
            }
            Some(()) = reload.recv(), if !stopping => {
                notify.send("RELOADING=1");
                d.reload();
                notify.send("READY=1");
            }
            Some(request) = commands.recv(), if !stopping => d.command(request, &tx),
            _ = watchdog.tick() => notify.send("WATCHDOG=1"),
            _ = tokio::time::sleep_until(next), if !stopping => {}
        }
    }
    Ok(d.summary())
}

/// A service as the daemon holds it: its config and its state machine.
struct Entry {
    config: config::Service,
    state: service::Service,
    /// Changes to the service's files on its branch after the deployed revision (derived at each
    /// fetch, so not persisted).
    behind: Option<u64>,
}

struct Upstream {
    next: Instant,
    busy: bool,
    cycles: u64,
    /// Checkouts asked for outside a fetch (a rollback), run when the store is free.
    queued: Vec<DeployJob>,
    /// Operators waiting for this upstream's current or next cycle to end.
    waiters: Vec<Waiter>,
    /// A fetch was asked for (pull, webhook) while one ran, which may have read the heads before
    /// the push that asked: another one starts as soon as this one ends.
    again: bool,
    /// Operators waiting for that next cycle.
    after: Vec<Waiter>,
    /// Services were added to it (or moved onto it) since its last fetch started: it does not
    /// count as cycled (`--once`) until a fetch starts after the change.
    stale: bool,
}

impl Upstream {
    /// Makes a fetch that starts after this call due now, and has `waiter` answered when it ends.
    fn fetch_now(&mut self, waiter: Option<Waiter>) {
        if self.busy {
            self.again = true;
            self.after.extend(waiter);
        } else {
            self.next = Instant::now();
            self.waiters.extend(waiter);
        }
    }
}

/// An operator's write, answered when its upstream's cycle is done.
struct Waiter {
    service: String,
    action: &'static str,
    reply: oneshot::Sender<Result<Reply, CommandError>>,
}

/// A finished job, back on the actor.
enum Done {
    Fetched {
        url: String,
        result: Result<FetchReport, GitError>,
        /// Local edits per service (checked after a good fetch).
        drift: BTreeMap<String, Vec<String>>,
        /// Changes to each service's files between its deployed revision and the head.
        behind: BTreeMap<String, Option<u64>>,
        /// Services whose last checkout did not finish (crash, failure): redone, not drift.
        interrupted: BTreeSet<String>,
        /// How long the fetch (with its checks) took.
        took: Duration,
    },
    Deployed {
        url: String,
        events: Vec<(String, Event)>,
    },
    Applied {
        service: String,
        revision: Oid,
        error: Option<String>,
    },
    /// A rollback's revision, resolved in the store (or why not).
    Resolved {
        service: String,
        result: Result<Oid, String>,
        reply: oneshot::Sender<Result<Reply, CommandError>>,
    },
}

struct Daemon {
    opts: Options,
    config: Config,
    layout: Layout,
    interval: Duration,
    jitter: Duration,
    transport: git::Transport,
    cancel: Arc<AtomicBool>,
    /// The system manager, when there is one to talk to (not in tests on a host without systemd).
    systemd: Option<Arc<Systemd>>,
    /// Services whose checkout was rebuilt (wipe): their mounts are re-bound after the deploy.
    rebind: BTreeSet<String>,
    /// Applies running per service, and the operators waiting for them to end.
    applying: BTreeMap<String, usize>,
    held: Vec<Waiter>,
    services: BTreeMap<String, Entry>,
    upstreams: BTreeMap<String, Upstream>,
    /// `daemon-reload`s asked for since start, and (shared with their tasks) how many of them
    /// finished: an apply started after a config change waits for the generator to have run.
    reloads_asked: u64,
    reloads_done: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Reads the config (none yet is an empty one in bootstrap mode).
fn load_config(opts: &Options) -> Result<Config, ConfigError> {
    bootstrap::load_config(&opts.config, opts.bootstrap.is_some())
}

/// This machine's services in `config`, and plumb itself in bootstrap mode.
fn select(
    opts: &Options,
    config: &Config,
    layout: &Layout,
) -> Result<Vec<config::Service>, BootstrapError> {
    let hosts = config.machine_names(&opts.hosts);
    let Some(b) = &opts.bootstrap else {
        return Ok(config.select(&hosts)?);
    };
    bootstrap::validate(config, &opts.hosts)?;
    let mut selected = config.select(&hosts)?;
    let machine = hosts.first().map(String::as_str).unwrap_or("localhost");
    selected.push(b.service(
        machine,
        &opts.hosts,
        &opts.config,
        &layout.root().join("checkouts"),
    ));
    Ok(selected)
}

impl Daemon {
    fn new(opts: Options, config: Config) -> Result<Daemon, DaemonError> {
        let layout = Layout::new(
            opts.state_dir
                .clone()
                .unwrap_or_else(|| config.settings.state_dir.clone()),
        );
        let selected = select(&opts, &config, &layout)?;
        layout.create().map_err(|source| DaemonError::StateDir {
            path: layout.root().to_owned(),
            source,
        })?;
        let cancel = Arc::new(AtomicBool::new(false));
        let mut d = Daemon {
            interval: Duration::ZERO,
            jitter: Duration::ZERO,
            transport: git::Transport::default(),
            cancel,
            systemd: None,
            rebind: BTreeSet::new(),
            applying: BTreeMap::new(),
            held: Vec::new(),
            layout,
            opts,
            config,
            services: BTreeMap::new(),
            upstreams: BTreeMap::new(),
            reloads_asked: 0,
            reloads_done: Arc::new(tokio::sync::watch::channel(0).0),
        };
        d.adopt(selected);
        Ok(d)
    }

    /// Takes `selected` as the services to run: keeps the state of those that stay, loads the persisted
    /// state of new ones, forgets the removed ones (their files stay where they are).
    fn adopt(&mut self, selected: Vec<config::Service>) {
        let s = &self.config.settings;
        self.interval = self.opts.interval.unwrap_or(s.interval);
        self.jitter = s.jitter.min(self.interval / 2);
        self.transport = git::Transport {
            ssh_key: s.ssh_key.clone(),
            known_hosts: s.known_hosts.clone(),
            timeout: Some(s.fetch_timeout),
            cancel: self.cancel.clone(),
        };
        let now = unix_now();
        let mut services = BTreeMap::new();
        // Upstreams with a service new to them: fetched now, not at their next tick.
        let mut due = BTreeSet::new();
        for cfg in selected {
            let noop = self.opts.noop || cfg.noop;
            let mut entry = match self.services.remove(&cfg.name) {
                Some(mut old) => {
                    let moved = old.config.upstream != cfg.upstream
                        || old.config.branch != cfg.branch
                        || old.config.dirs != cfg.dirs
                        || old.config.mount != cfg.mount;
                    if moved {
                        // Its paths changed: the next fetch checks it out afresh.
                        info!(service = %cfg.name, "configuration changed; redeploying now");
                        old.state.synced = None;
                        due.insert(cfg.upstream.clone());
                    }
                    Entry {
                        config: cfg,
                        state: old.state,
                        behind: old.behind,
                    }
                }
                None => {
                    due.insert(cfg.upstream.clone());
                    Entry {
                        state: load_state(&self.layout, &cfg.name, now),
                        config: cfg,
                        behind: None,
                    }
                }
            };
            if entry.state.noop != noop {
                if noop {
                    info!(service = %entry.config.name, "noop: reporting what would be deployed, touching nothing");
                } else if entry.state.would.is_some() {
                    info!(service = %entry.config.name, "noop is off: deploying what is pending");
                    due.insert(entry.config.upstream.clone());
                }
                entry.state.handle(Event::Reconfigured { noop }, now);
            }
            services.insert(entry.config.name.clone(), entry);
        }
        for gone in self.services.keys() {
            info!(service = %gone, "no longer configured for this machine; leaving its files as they are");
            if let Some(m) = &self.opts.metrics {
                m.forget(gone);
            }
        }
        self.services = services;
        if self.services.is_empty() {
            warn!(hosts = ?self.config.machine_names(&self.opts.hosts), "no services configured for this machine");
        }
        let urls: BTreeSet<String> = self
            .services
            .values()
            .map(|e| e.config.upstream.clone())
            .collect();
        self.upstreams.retain(|url, _| urls.contains(url));
        for url in urls {
            self.upstreams.entry(url).or_insert(Upstream {
                next: Instant::now(),
                busy: false,
                cycles: 0,
                queued: Vec::new(),
                waiters: Vec::new(),
                again: false,
                after: Vec::new(),
                stale: false,
            });
        }
        for url in due {
            if let Some(u) = self.upstreams.get_mut(&url) {
                u.stale = true;
                u.fetch_now(None);
            }
        }
    }

    fn reload(&mut self) {
        info!(config = %self.opts.config.display(), "re-reading the configuration");
        let config = match load_config(&self.opts) {
            Ok(c) => c,
            Err(e) => {
                error!("keeping the running configuration: {e}");
                return;
            }
        };
        let selected = match select(&self.opts, &config, &self.layout) {
            Ok(s) => s,
            Err(e) => {
                error!("keeping the running configuration: {e}");
                return;
            }
        };
        if self.opts.state_dir.is_none()
            && config.settings.state_dir != self.config.settings.state_dir
        {
            warn!("state_dir changed; it takes effect at the next restart");
        }
        let (old, new) = (&self.config.settings, &config.settings);
        let at_start = [
            ("socket", old.socket != new.socket),
            ("admin_group", old.admin_group != new.admin_group),
            ("readonly_group", old.readonly_group != new.readonly_group),
            (
                "metrics_address",
                old.metrics_address != new.metrics_address,
            ),
            ("webhook_secret", old.webhook_secret != new.webhook_secret),
            (
                "webhook_secret_file",
                old.webhook_secret_file != new.webhook_secret_file,
            ),
            // The whole-fetch limit moves now; libgit2's socket timeouts are set once per process.
            (
                "fetch_timeout (its socket timeouts)",
                old.fetch_timeout != new.fetch_timeout,
            ),
        ];
        let changed: Vec<&str> = at_start
            .iter()
            .filter(|(_, c)| *c)
            .map(|(k, _)| *k)
            .collect();
        if !changed.is_empty() {
            // The listeners are bound at start; their settings are not re-read.
            warn!(settings = ?changed, "changed; they take effect at the next restart (systemctl restart plumb)");
        }
        let state_dir = self.config.settings.state_dir.clone();
        self.config = config;
        self.config.settings.state_dir = state_dir;
        self.adopt(selected);
        if let Some(systemd) = self.systemd.clone() {
            // The generator reads the config: let systemd run it again for new mounts and units.
            // Applies from now on wait for it (a new service's mounts must exist first).
            self.reloads_asked += 1;
            let asked = self.reloads_asked;
            let done = self.reloads_done.clone();
            tokio::spawn(async move {
                if let Err(e) = systemd.daemon_reload().await {
                    warn!("daemon-reload after the config changed: {e}");
                }
                done.send_modify(|n| *n = (*n).max(asked));
            });
        }
    }

    fn all_cycled(&self) -> bool {
        self.upstreams.values().all(|u| u.cycles > 0 && !u.stale)
    }

    fn next_due(&self) -> Instant {
        let now = Instant::now();
        let unix = unix_now();
        let expiry = self
            .services
            .values()
            .filter_map(|e| e.state.frozen_until)
            // checked: `frozen_until` comes from the API and the state files, and a time past the
            // clock's range would panic; such a freeze just never ends by itself.
            .filter_map(|t| now.checked_add(Duration::from_secs(t.saturating_sub(unix))));
        self.upstreams
            .values()
            .filter(|u| !u.busy)
            .map(|u| if u.queued.is_empty() { u.next } else { now })
            .chain(expiry)
            .min()
            .unwrap_or_else(|| now + Duration::from_secs(3600))
    }

    /// Ends freezes whose time is up; their services follow upstream again from the next fetch,
    /// which is made due now.
    fn tick(&mut self, tx: &mpsc::Sender<Done>) {
        let now = unix_now();
        let expired: Vec<String> = self
            .services
            .iter()
            .filter(|(_, e)| e.state.frozen && e.state.frozen_until.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            info!(service = %name, "freeze expired");
            self.feed(&name, Event::Tick, now, tx);
            self.fetch_soon(&name);
        }
    }

    /// Makes the fetch of `service`'s upstream due now.
    fn fetch_soon(&mut self, service: &str) {
        if let Some(url) = self
            .services
            .get(service)
            .map(|e| e.config.upstream.clone())
            && let Some(u) = self.upstreams.get_mut(&url)
        {
            u.fetch_now(None);
        }
    }

    fn command(&mut self, request: Request, tx: &mpsc::Sender<Done>) {
        let Request { command, reply } = request;
        let now = unix_now();
        let known = |d: &Daemon, s: &str| {
            d.services
                .get(s)
                .map(|e| e.config.upstream.clone())
                .ok_or_else(|| CommandError::UnknownService(s.to_owned()))
        };
        match command {
            Command::Services => {
                let all = self.services.keys().map(|n| self.status(n)).collect();
                let _ = reply.send(Ok(Reply::Services(all)));
            }
            Command::Status(service) => {
                let answer =
                    known(self, &service).map(|_| Reply::Services(vec![self.status(&service)]));
                let _ = reply.send(answer);
            }
            Command::Freeze { service, until } => {
                if let Err(e) = known(self, &service) {
                    let _ = reply.send(Err(e));
                    return;
                }
                info!(service = %service, until, "frozen by an operator");
                self.feed(&service, Event::Freeze { until }, now, tx);
                let _ = reply.send(Ok(self.action(&service, "freeze")));
            }
            Command::Unfreeze(service) => {
                if let Err(e) = known(self, &service) {
                    let _ = reply.send(Err(e));
                    return;
                }
                info!(service = %service, "unfrozen by an operator");
                // The checkout follows at the next fetch, made due now.
                self.feed(&service, Event::Unfreeze, now, tx);
                self.fetch_soon(&service);
                let _ = reply.send(Ok(self.action(&service, "unfreeze")));
            }
            Command::Rollback { service, revision } => {
                let url = match known(self, &service) {
                    Ok(url) => url,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                let Some(entry) = self.services.get(&service) else {
                    return;
                };
                if entry.state.noop {
                    let _ = reply.send(Err(noop_refusal(&service, "rollback")));
                    return;
                }
                let head = entry.state.upstream.or(entry.state.synced);
                let stores = self.layout.stores();
                let tx = tx.clone();
                let trust = self.config.settings.upstream(&url);
                // Read-only: safe beside a fetch running on the same store.
                tokio::task::spawn_blocking(move || {
                    let result = resolve_in_history(&stores, &url, &revision, head, &trust);
                    let _ = tx.blocking_send(Done::Resolved {
                        service,
                        result,
                        reply,
                    });
                });
            }
            Command::Wipe(service) => {
                let Some(e) = self.services.get(&service) else {
                    let _ = reply.send(Err(CommandError::UnknownService(service)));
                    return;
                };
                if e.state.noop {
                    let _ = reply.send(Err(noop_refusal(&service, "wipe")));
                    return;
                }
                let Some(head) = e.state.synced else {
                    let _ = reply.send(Err(CommandError::Invalid(format!(
                        "{service} has nothing checked out yet"
                    ))));
                    return;
                };
                warn!(service = %service, "wipe: rebuilding the checkout");
                let job = DeployJob {
                    service: e.config.clone(),
                    upstream: self.config.settings.upstream(&e.config.upstream),
                    limits: self.config.settings.limits(),
                    avoid: None,
                    follow: false,
                    head,
                    from: None,
                    deployed: e.state.deployed,
                    restore: true,
                    fresh: true,
                    noop: false,
                };
                self.rebind.insert(service.clone());
                if let Some(u) = self.upstreams.get_mut(&e.config.upstream) {
                    u.queued.push(job);
                    u.waiters.push(Waiter {
                        service,
                        action: "wipe",
                        reply,
                    });
                }
            }
            Command::Poke { repositories } => {
                let keys: BTreeSet<String> = repositories
                    .iter()
                    .map(|r| git::repository_key(r))
                    .collect();
                let named = |url: &String| keys.contains(&git::repository_key(url));
                let any = self.upstreams.keys().any(named);
                if !any && !keys.is_empty() {
                    debug!(repositories = ?repositories, "push webhook: no upstream is one of its repositories; fetching all");
                }
                for (url, u) in self.upstreams.iter_mut() {
                    if !any || named(url) {
                        u.fetch_now(None);
                    }
                }
                let _ = reply.send(Ok(Reply::Services(Vec::new())));
            }
            Command::Diff(service) => {
                let Some(e) = self.services.get(&service) else {
                    let _ = reply.send(Err(CommandError::UnknownService(service)));
                    return;
                };
                let (url, links) = (e.config.upstream.clone(), e.config.links());
                let (from, to, commits) = (e.state.synced, e.state.upstream, e.behind);
                let stores = self.layout.stores();
                // Read-only on the store, so it needs no turn of the upstream's job.
                tokio::task::spawn_blocking(move || {
                    let files = match to {
                        None => Ok(Vec::new()),
                        Some(to) => Store::open_readonly(&stores, &url)
                            .and_then(|s| s.file_changes(from, to, &links))
                            .map_err(|e| CommandError::Invalid(e.to_string())),
                    };
                    let hex = |o: Option<Oid>| o.map(|o| o.to_string());
                    let _ = reply.send(files.map(|files| {
                        Reply::Diff(crate::proto::DiffResult {
                            service,
                            from: hex(from),
                            to: hex(to),
                            commits,
                            files: files
                                .into_iter()
                                .map(|f| crate::proto::FileDiff {
                                    path: f.path,
                                    change: f.change.to_owned(),
                                })
                                .collect(),
                        })
                    }));
                });
            }
            Command::Pull { service, force } => {
                let url = match known(self, &service) {
                    Ok(url) => url,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                // A head refused before (check, health, signature) is tried again.
                self.feed(&service, Event::Retry, unix_now(), tx);
                if force {
                    info!(service = %service, "pull --force: local edits will be dropped");
                    self.feed(&service, Event::Force, unix_now(), tx);
                }
                if let Some(u) = self.upstreams.get_mut(&url) {
                    if u.busy {
                        debug!(service = %service, "pull: after the fetch running now");
                    }
                    u.fetch_now(Some(Waiter {
                        service,
                        action: "pull",
                        reply,
                    }));
                }
            }
        }
    }

    /// A service's status as the API shows it.
    fn status(&self, name: &str) -> crate::proto::ServiceStatus {
        use crate::proto::{ApplyStatus, DirStatus, ServiceStatus};
        let hex = |o: Option<Oid>| o.map(|o| o.to_string());
        let Some(e) = self.services.get(name) else {
            unreachable!("status of a service checked to exist")
        };
        let (c, s) = (&e.config, &e.state);
        ServiceStatus {
            service: c.name.clone(),
            machine: c.machine.clone(),
            state: s.state.as_str().to_owned(),
            info: s.info.clone(),
            since: s.since,
            upstream: git::redact_url(&c.upstream),
            branch: c.branch.clone(),
            deployed: hex(s.deployed),
            upstream_head: hex(s.upstream),
            behind: e.behind,
            frozen_until: s.frozen_until,
            pinned: hex(s.pinned),
            dirs: c
                .dirs
                .iter()
                .map(|d| DirStatus {
                    local: d.local.display().to_string(),
                    link: d.link.clone(),
                    file: d.file,
                    ro: d.ro,
                })
                .collect(),
            notes: notes(c, s),
            last_apply: apply::read_applied(&self.layout, name).map(|o| ApplyStatus {
                revision: o.revision.to_string(),
                ok: o.ok,
                message: o.message.clone(),
                time: o.time,
            }),
        }
    }

    fn action(&self, service: &str, action: &str) -> Reply {
        let status = self.status(service);
        let ok = !matches!(status.state.as_str(), "BROKEN" | "DIFF");
        let message = if status.info.is_empty() {
            format!("{action}: done, {}", status.state)
        } else {
            format!("{action}: {}: {}", status.state, status.info)
        };
        Reply::Action(Box::new(crate::proto::ActionResult {
            action: action.to_owned(),
            ok,
            message,
            status,
        }))
    }

    fn start_due(&mut self, tx: &mpsc::Sender<Done>) {
        let now = Instant::now();
        for (url, u) in self.upstreams.iter_mut() {
            if !u.busy && !u.queued.is_empty() {
                u.busy = true;
                let jobs = std::mem::take(&mut u.queued);
                let (layout, url, tx) = (self.layout.clone(), url.clone(), tx.clone());
                tokio::task::spawn_blocking(move || {
                    let events = deploy_all(&layout, &url, jobs);
                    let _ = tx.blocking_send(Done::Deployed { url, events });
                });
            }
        }
        let due: Vec<String> = self
            .upstreams
            .iter()
            .filter(|(_, u)| !u.busy && u.next <= now)
            .map(|(url, _)| url.clone())
            .collect();
        for url in due {
            let branches: Vec<String> = self
                .services
                .values()
                .filter(|e| e.config.upstream == url)
                .map(|e| e.config.branch.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if let Some(u) = self.upstreams.get_mut(&url) {
                u.busy = true;
                u.stale = false;
            }
            // Checkouts to look for local edits in, at the revision each was made from, and how
            // far behind each service's files are.
            let checks: Vec<Check> = self
                .services
                .values()
                .filter(|e| e.config.upstream == url)
                .map(|e| Check {
                    interrupted: self.layout.service_deploying(&e.config.name).exists(),
                    name: e.config.name.clone(),
                    target: e.config.checkout_dir(),
                    index: self.layout.service_index(&e.config.name),
                    synced: e.state.synced,
                    deployed: e.state.deployed,
                    branch: e.config.branch.clone(),
                    links: e.config.links(),
                })
                .collect();
            let stores = self.layout.stores();
            let transport = self.transport.clone();
            let tx = tx.clone();
            let span = info_span!("fetch", upstream = %git::redact_url(&url));
            tokio::task::spawn_blocking(move || {
                let _g = span.enter();
                let mut drift = BTreeMap::new();
                let mut behind = BTreeMap::new();
                let mut interrupted = BTreeSet::new();
                let started = std::time::Instant::now();
                let result = Store::open(&stores, &url).and_then(|mut s| {
                    let report = s.fetch(&branches, &transport)?;
                    for c in checks {
                        if c.interrupted {
                            interrupted.insert(c.name.clone());
                        } else if let Some(synced) = c.synced {
                            match s.drift(&c.target, &c.index, synced, &c.links) {
                                Ok(files) => {
                                    drift.insert(c.name.clone(), files);
                                }
                                Err(e) => {
                                    warn!(service = %c.name, "cannot check for local edits: {e}")
                                }
                            }
                        }
                        let head = report.heads.get(&c.branch).copied().flatten();
                        if let (Some(deployed), Some(head)) = (c.deployed, head) {
                            match s.changes_since(deployed, head, &c.links, BEHIND_LIMIT) {
                                Ok(n) => {
                                    behind.insert(c.name, n);
                                }
                                Err(e) => {
                                    warn!(service = %c.name, "cannot count changes behind: {e}")
                                }
                            }
                        }
                    }
                    Ok(report)
                });
                let _ = tx.blocking_send(Done::Fetched {
                    url,
                    result,
                    drift,
                    behind,
                    interrupted,
                    took: started.elapsed(),
                });
            });
        }
    }

    fn finish(&mut self, done: Done, tx: &mpsc::Sender<Done>) {
        let now = unix_now();
        match done {
            Done::Fetched {
                url,
                result,
                mut drift,
                behind,
                interrupted,
                took,
            } => {
                if let Some(m) = &self.opts.metrics {
                    m.fetched(&git::redact_url(&url), result.is_ok(), took);
                }
                for (name, n) in behind {
                    if let Some(e) = self.services.get_mut(&name) {
                        e.behind = n;
                    }
                }
                match &result {
                    Ok(report) => {
                        debug!(upstream = %git::redact_url(&url), heads = ?report.heads, "fetch done")
                    }
                    Err(e) => warn!(upstream = %git::redact_url(&url), "fetch failed: {e}"),
                }
                let mut jobs = Vec::new();
                let names: Vec<(String, String)> = self
                    .services
                    .values()
                    .filter(|e| e.config.upstream == url)
                    .map(|e| (e.config.name.clone(), e.config.branch.clone()))
                    .collect();
                for (name, branch) in names {
                    if interrupted.contains(&name) && result.is_ok() {
                        warn!(service = %name, "the last checkout did not finish; redoing it");
                        self.feed(&name, Event::Force, now, tx);
                    }
                    if let Some(files) = drift.remove(&name) {
                        if !files.is_empty() {
                            warn!(service = %name, files = ?files, "local edits in the checkout");
                        }
                        jobs.extend(self.feed(&name, Event::Drift { files }, now, tx));
                    }
                    let event = match &result {
                        Ok(report) => Event::Fetched {
                            head: report.heads.get(&branch).copied().flatten(),
                            branch,
                        },
                        Err(e) => Event::FetchFailed {
                            error: e.to_string(),
                        },
                    };
                    jobs.extend(self.feed(&name, event, now, tx));
                }
                if jobs.is_empty() || self.cancel.load(Ordering::Relaxed) {
                    self.done_with(&url);
                } else {
                    let layout = self.layout.clone();
                    let tx = tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let events = deploy_all(&layout, &url, jobs);
                        let _ = tx.blocking_send(Done::Deployed { url, events });
                    });
                }
            }
            Done::Applied {
                service,
                revision,
                error,
            } => {
                let Some(entry) = self.services.get(&service) else {
                    self.apply_ended(&service);
                    return;
                };
                let short = service::short(Some(revision));
                if entry.state.deployed != Some(revision) {
                    // Overtaken by a newer deploy, whose own apply reports.
                    debug!(service = %service, revision = %short, "apply outcome of an older revision");
                    self.apply_ended(&service);
                    return;
                }
                match &error {
                    None => info!(service = %service, revision = %short, "applied"),
                    Some(e) => error!(service = %service, revision = %short, "apply failed: {e}"),
                }
                let health = entry.config.health.is_some();
                if let Some(m) = &self.opts.metrics {
                    m.applied(&service, error.is_none());
                    if health && error.is_some() {
                        m.refused(&service, "health");
                    }
                }
                let event = match error {
                    // With `health`, a failed apply or health check goes back to the last good
                    // revision; without it the service stays BROKEN on the revision.
                    Some(error) if health => Event::Unhealthy { revision, error },
                    error => Event::Applied { revision, error },
                };
                self.feed(&service, event, now, tx);
                self.apply_ended(&service);
            }
            Done::Resolved {
                service,
                result,
                reply,
            } => match result {
                Err(e) => {
                    let _ = reply.send(Err(CommandError::Invalid(e)));
                }
                Ok(target) => {
                    let Some(url) = self
                        .services
                        .get(&service)
                        .map(|e| e.config.upstream.clone())
                    else {
                        let _ = reply.send(Err(CommandError::UnknownService(service)));
                        return;
                    };
                    info!(service = %service, target = %service::short(Some(target)), "rollback by an operator");
                    let jobs = self.feed(&service, Event::Rollback { target }, now, tx);
                    if let Some(u) = self.upstreams.get_mut(&url) {
                        u.queued.extend(jobs);
                        u.waiters.push(Waiter {
                            service,
                            action: "rollback",
                            reply,
                        });
                    }
                }
            },
            Done::Deployed { url, events } => {
                for (name, event) in events {
                    let Some(entry) = self.services.get_mut(&name) else {
                        continue; // removed by a reload meanwhile
                    };
                    if let Event::Deployed { head, .. } = &event {
                        // At the branch head its files are current; after a rollback the next
                        // fetch counts.
                        entry.behind = (Some(*head) == entry.state.upstream).then_some(0);
                    }
                    let rebuilt = self.rebind.remove(&name);
                    match &event {
                        Event::Deployed { revision, .. } if *revision != entry.state.deployed => {
                            info!(service = %name, revision = %service::short(*revision), "deployed")
                        }
                        Event::DeployFailed { error, .. } => {
                            error!(service = %name, "deploy failed: {error}")
                        }
                        _ => {}
                    }
                    if let (Event::Refused { why, .. }, Some(m)) = (&event, &self.opts.metrics) {
                        m.refused(&name, why.reason());
                    }
                    let deployed = matches!(event, Event::Deployed { .. });
                    self.feed(&name, event, now, tx);
                    let saved = deployed
                        && self
                            .services
                            .get(&name)
                            .is_some_and(|e| persist(&self.layout, &name, &e.state));
                    if saved {
                        // The deploy is on disk: the checkout is no longer half-made.
                        let marker = self.layout.service_deploying(&name);
                        if let Err(e) = std::fs::remove_file(&marker)
                            && e.kind() != std::io::ErrorKind::NotFound
                        {
                            warn!(service = %name, "{}: {e}", marker.display());
                        }
                    }
                    if rebuilt && deployed {
                        // A rebuilt checkout is clean, and its mounts must move onto it.
                        self.feed(&name, Event::Drift { files: Vec::new() }, now, tx);
                        if let Some(revision) =
                            self.services.get(&name).and_then(|e| e.state.deployed)
                        {
                            self.apply(&name, revision, tx);
                        }
                    }
                }
                self.done_with(&url);
            }
        }
    }

    /// Feeds one event to a service and runs the effects that need no store; returns the checkouts
    /// to run, which the caller batches per upstream.
    fn feed(
        &mut self,
        name: &str,
        event: Event,
        now: u64,
        tx: &mpsc::Sender<Done>,
    ) -> Vec<DeployJob> {
        let Some(entry) = self.services.get_mut(name) else {
            return Vec::new(); // removed by a reload meanwhile
        };
        let mut jobs = Vec::new();
        let mut applies = Vec::new();
        let upstream = self.config.settings.upstream(&entry.config.upstream);
        let limits = self.config.settings.limits();
        let effects = entry.state.handle(event, now);
        let st = &entry.state;
        let avoid = st.rejected.as_ref().and_then(|r| r.revision);
        let follow = |head: Oid| st.pinned.is_none() && st.upstream == Some(head);
        for effect in effects {
            match effect {
                Effect::Persist => {
                    persist(&self.layout, name, &entry.state);
                }
                Effect::Deploy {
                    head,
                    from,
                    deployed,
                } => jobs.push(DeployJob {
                    service: entry.config.clone(),
                    upstream: upstream.clone(),
                    limits,
                    avoid,
                    follow: follow(head),
                    head,
                    from,
                    deployed,
                    restore: false,
                    fresh: false,
                    noop: false,
                }),
                Effect::Restore { head, deployed } => jobs.push(DeployJob {
                    service: entry.config.clone(),
                    upstream: upstream.clone(),
                    limits,
                    avoid,
                    // An operator's pull --force accepts whatever history upstream has now.
                    follow: false,
                    head,
                    from: entry.state.synced,
                    deployed,
                    restore: true,
                    fresh: false,
                    noop: false,
                }),
                Effect::Preview { head, from } => jobs.push(DeployJob {
                    service: entry.config.clone(),
                    upstream: upstream.clone(),
                    limits,
                    avoid,
                    follow: follow(head),
                    head,
                    from,
                    deployed: entry.state.deployed,
                    restore: false,
                    fresh: false,
                    noop: true,
                }),
                Effect::Apply { revision } => applies.push(revision),
                Effect::Reapply { revision } => {
                    if !self.applying.contains_key(name) {
                        info!(service = %name, revision = %service::short(Some(revision)), "applying again: the last apply failed");
                        applies.push(revision);
                    }
                }
            }
        }
        for revision in applies {
            self.apply(name, revision, tx);
        }
        self.observe(name);
        jobs
    }

    /// Brings the service's metrics in line with its state.
    fn observe(&self, name: &str) {
        if let (Some(m), Some(e)) = (&self.opts.metrics, self.services.get(name)) {
            m.service(name, &e.config.machine, &e.state, e.behind);
        }
    }

    /// Connects to systemd and applies what a crash or a restart left unapplied: a deployed revision
    /// whose outcome is missing or older (the `.path` unit only fires on a change).
    async fn connect_systemd(&mut self, tx: &mpsc::Sender<Done>) {
        match Systemd::system().await {
            Ok(sd) => self.systemd = Some(Arc::new(sd)),
            Err(e) => {
                info!(
                    "not applying through systemd ({e}); plumb-apply@.path units apply where installed"
                );
                return;
            }
        }
        let pending: Vec<(String, Oid)> = self
            .services
            .iter()
            // plumb's own config is installed at start whether or not there is a systemd.
            .filter(|(name, _)| name.as_str() != bootstrap::SELF || self.opts.bootstrap.is_none())
            .filter(|(_, e)| !e.state.noop)
            .filter_map(|(name, e)| {
                let deployed = e.state.deployed?;
                let applied = apply::read_applied(&self.layout, name).map(|o| o.revision);
                (applied != Some(deployed)).then(|| (name.clone(), deployed))
            })
            .collect();
        for (name, revision) in pending {
            self.apply(&name, revision, tx);
        }
    }

    /// Starts `plumb-apply@<service>.service` and reports its outcome as `Done::Applied`. The same
    /// unit started by the `.path` unit meanwhile is the same job, so an apply never runs twice at
    /// once.
    fn apply(&mut self, service: &str, revision: Oid, tx: &mpsc::Sender<Done>) {
        if self.services.get(service).is_none_or(|e| e.state.noop) {
            return;
        }
        if service == bootstrap::SELF && self.opts.bootstrap.is_some() {
            self.install_config(revision, tx);
            return;
        }
        let Some(systemd) = self.systemd.clone() else {
            return;
        };
        *self.applying.entry(service.to_owned()).or_default() += 1;
        let layout = self.layout.clone();
        let config = self.services.get(service).map(|e| e.config.clone());
        let service = service.to_owned();
        let tx = tx.clone();
        let reloaded = self.reloads_asked;
        let mut reloads = self.reloads_done.subscribe();
        tokio::spawn(async move {
            let _ = reloads.wait_for(|done| *done >= reloaded).await;
            let unit = format!("plumb-apply@{service}.service");
            let mut started = systemd.start(&unit).await;
            // Joining an apply that was already running may leave a mount it looked at before
            // the checkout changed (wipe): start it again, a bounded number of times.
            for _ in 0..3 {
                match (&started, &config) {
                    (Ok(_), Some(c)) if !apply::mounts_current(c) => {
                        started = systemd.start(&unit).await;
                    }
                    _ => break,
                }
            }
            // Judged on the outcome for `revision` alone: an outcome for another one is either
            // older (the apply failed before writing one: a bad config, a crash) or newer (a
            // deploy overtook this one, and the state machine drops this report as stale).
            let error = match started {
                Err(e) => Some(format!("starting {unit}: {e}")),
                Ok(job) => match apply::read_applied(&layout, &service) {
                    Some(o) if o.revision == revision => o.error(),
                    _ => Some(format!(
                        "{unit} ({job}) left no outcome for {}; see journalctl -u {unit}",
                        service::short(Some(revision))
                    )),
                },
            };
            let _ = tx
                .send(Done::Applied {
                    service,
                    revision,
                    error,
                })
                .await;
        });
    }

    /// plumb's own apply in bootstrap mode: installs the config file of the deployed revision over
    /// the local one and re-reads it (and systemd re-runs the generator). A config that fails to
    /// validate leaves the running one, and the service BROKEN.
    fn install_config(&mut self, revision: Oid, tx: &mpsc::Sender<Done>) {
        let (Some(b), Some(e)) = (&self.opts.bootstrap, self.services.get(bootstrap::SELF)) else {
            return;
        };
        let installed = b
            .checked_out(&e.config)
            .and_then(|from| bootstrap::install(&from, &self.opts.config, &self.opts.hosts));
        let error = match installed {
            Ok(changed) => {
                if changed {
                    info!(revision = %service::short(Some(revision)), config = %self.opts.config.display(), "installed the config from git");
                    self.reload();
                }
                None
            }
            Err(e) => Some(e.to_string()),
        };
        *self.applying.entry(bootstrap::SELF.to_owned()).or_default() += 1;
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tx
                .send(Done::Applied {
                    service: bootstrap::SELF.to_owned(),
                    revision,
                    error,
                })
                .await;
        });
    }

    fn done_with(&mut self, url: &str) {
        let wait = self.interval.saturating_sub(jitter(self.jitter));
        let mut waiters = Vec::new();
        if let Some(u) = self.upstreams.get_mut(url) {
            u.busy = false;
            u.cycles += 1;
            u.next = Instant::now();
            if !std::mem::take(&mut u.again) {
                u.next += wait;
            }
            waiters = std::mem::replace(&mut u.waiters, std::mem::take(&mut u.after));
        }
        for w in waiters {
            if self.applying.get(&w.service).is_some_and(|n| *n > 0) {
                // Pull and rollback answer with the apply's result too.
                self.held.push(w);
                continue;
            }
            self.answer(w);
        }
    }

    fn apply_ended(&mut self, service: &str) {
        if let Some(n) = self.applying.get_mut(service) {
            *n = n.saturating_sub(1);
            if *n > 0 {
                return;
            }
            self.applying.remove(service);
        }
        let (ready, held): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|w| w.service == service);
        self.held = held;
        for w in ready {
            self.answer(w);
        }
    }

    fn answer(&self, w: Waiter) {
        let answer = if self.services.contains_key(&w.service) {
            Ok(self.action(&w.service, w.action))
        } else {
            Err(CommandError::UnknownService(w.service))
        };
        let _ = w.reply.send(answer);
    }

    fn summary(&self) -> Summary {
        Summary {
            services: self
                .services
                .iter()
                .map(|(n, e)| (n.clone(), e.state.clone()))
                .collect(),
        }
    }
}

/// Wipe: checks the service out afresh beside its checkout, then swaps the two. The old one is
/// kept as `<checkout>.plumb-wiped` (still bound until apply re-binds the mounts, so the service
/// never sees a missing file) and removed by the next wipe.
fn rebuild(
    store: &Store,
    layout: &Layout,
    job: &DeployJob,
    target: &std::path::Path,
    links: &[String],
) -> Result<(), DeployError> {
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| DeployError::Io { path, source }
    };
    let aside = |suffix: &str| {
        let mut p = target.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    let (new, old) = (aside(".plumb-new"), aside(".plumb-wiped"));
    let index = layout.service_index(&job.service.name);
    let mut new_index = index.as_os_str().to_owned();
    new_index.push(".new");
    let new_index = std::path::PathBuf::from(new_index);
    for stale in [&new, &old] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(io(stale))?;
        }
    }
    let _ = std::fs::remove_file(&new_index);
    std::fs::create_dir_all(&new).map_err(io(&new))?;
    store.checkout_as(
        &new,
        &new_index,
        None,
        job.head,
        links,
        job.service.user.as_deref(),
    )?;
    if target.exists() {
        std::fs::rename(target, &old).map_err(io(target))?;
    }
    std::fs::rename(&new, target).map_err(io(target))?;
    std::fs::rename(&new_index, &index).map_err(io(&index))?;
    Ok(())
}

/// The first-parent commits `behind` walks at most per service and fetch.
const BEHIND_LIMIT: usize = 10_000;

/// What the fetch job looks at for one service besides fetching.
struct Check {
    name: String,
    /// A checkout of the service was interrupted (its marker file exists).
    interrupted: bool,
    target: std::path::PathBuf,
    index: std::path::PathBuf,
    synced: Option<Oid>,
    deployed: Option<Oid>,
    branch: String,
    links: Vec<String>,
}

struct DeployJob {
    service: config::Service,
    /// The upstream's trust and force-push settings.
    upstream: config::UpstreamSettings,
    /// What a revision may hold (file sizes).
    limits: git::Limits,
    /// A revision refused before: a head whose service files are these is refused again.
    avoid: Option<Oid>,
    /// The job follows the branch (not a rollback to an older commit), so a head that does not
    /// descend from `from` is a rewrite of history.
    follow: bool,
    head: Oid,
    from: Option<Oid>,
    deployed: Option<Oid>,
    /// Rewrite the checkout even if its revision did not move (drops local edits).
    restore: bool,
    /// Build the checkout afresh beside the old one and swap them (wipe).
    fresh: bool,
    /// Judge the head and count what would change, and stop there: nothing is written.
    noop: bool,
}

/// What a deploy job did for one service.
enum Deployed {
    /// The checkout holds the head: the service's revision there, and whether any file moved.
    Done { revision: Option<Oid>, files: bool },
    /// Noop: the head passed every gate; the revision it would deploy and how many files change.
    Would { revision: Option<Oid>, files: usize },
}

/// Runs the checkouts of one upstream's services, one after the other, on one store.
fn deploy_all(layout: &Layout, url: &str, jobs: Vec<DeployJob>) -> Vec<(String, Event)> {
    let store = Store::open(&layout.stores(), url);
    jobs.into_iter()
        .map(|job| {
            let span = info_span!("service", name = %job.service.name);
            let _g = span.enter();
            let head = job.head;
            let result = match &store {
                Ok(store) => deploy(store, layout, &job),
                Err(e) => Err(DeployError::Store(e.to_string())),
            };
            let event = match result {
                Ok(Deployed::Done { revision, files }) => Event::Deployed {
                    head,
                    revision,
                    files,
                },
                Ok(Deployed::Would { revision, files }) => Event::Previewed {
                    head,
                    revision,
                    files,
                },
                Err(DeployError::Refused { revision, why }) => {
                    warn!(head = %head, reason = why.reason(), "refused: {why}");
                    Event::Refused {
                        head,
                        revision,
                        why,
                    }
                }
                Err(e) => Event::DeployFailed {
                    head,
                    error: e.to_string(),
                },
            };
            (job.service.name, event)
        })
        .collect()
}

/// Moves one service's checkout to `job.head` when its paths changed, and hands a new deployed
/// revision to systemd by rewriting the service's `.rev` file. Returns the deployed revision, and
/// whether any file moved.
///
/// The revision is a function of the head alone ([`Store::last_change`]): two machines on the
/// same head report the same hash whatever they fetched before, and after a force-push the hash is
/// one the branch has. When only the hash moves (a commit restoring earlier files, an amended
/// commit), the `.rev` follows and the files stay.
fn deploy(store: &Store, layout: &Layout, job: &DeployJob) -> Result<Deployed, DeployError> {
    let svc = &job.service;
    let links = svc.links();
    let target = svc.checkout_dir();
    let refuse = |revision: Option<Oid>, why: Refusal| DeployError::Refused { revision, why };
    if job.upstream.verifies() {
        match store.verify_commit(job.head, &job.upstream.trust()) {
            Ok(signer) => debug!(head = %job.head, "signed by {signer}"),
            Err(e) => return Err(refuse(None, Refusal::Unverified(e.to_string()))),
        }
    }
    if job.follow
        && job.upstream.force_push == config::ForcePush::Refuse
        && let Some(f) = job.from.filter(|f| *f != job.head)
        && !store.in_history(f, job.head).unwrap_or(false)
    {
        return Err(refuse(
            None,
            Refusal::Rewritten(format!(
                "history rewritten upstream: {} does not descend from the deployed {}",
                service::short(Some(job.head)),
                service::short(Some(f))
            )),
        ));
    }
    // Without its checkout, or when the store no longer has the old head, start from nothing.
    let from = job
        .from
        .filter(|_| target.is_dir())
        .filter(|f| store.resolve(&f.to_string()).is_ok());
    let changed = match from {
        Some(f) => job.restore || !store.changed_paths(Some(f), job.head, &links)?.is_empty(),
        None => true,
    };
    let revision = store.last_change(job.head, &links)?;
    if changed && !job.fresh && revision.is_some() && revision == job.avoid {
        return Err(refuse(revision, Refusal::Known));
    }
    if changed || job.fresh {
        match store.inspect(job.head, &links, &job.limits) {
            Err(e @ GitError::Hostile { .. }) => {
                return Err(refuse(revision, Refusal::Hostile(e.to_string())));
            }
            other => other?,
        }
    }
    if changed
        && !job.fresh
        && let (Some(check), Some(rev)) = (&svc.check, revision)
    {
        run_check(store, layout, svc, check, job.head, rev)?;
    }
    if job.noop {
        let files = if changed {
            store.changed_paths(from, job.head, &links)?.len()
        } else {
            0
        };
        return Ok(Deployed::Would { revision, files });
    }
    let marker = layout.service_deploying(&svc.name);
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| DeployError::Io { path, source }
    };
    if job.fresh {
        rebuild(store, layout, job, &target, &links)?;
    } else if changed {
        std::fs::create_dir_all(&target).map_err(io(&target))?;
        // Until the daemon has saved the deploy, a half-made checkout must not read as local
        // edits: the marker makes the next fetch redo it instead (removed once saved).
        layout::write_atomic(&marker, format!("{}\n", job.head).as_bytes()).map_err(io(&marker))?;
        store.checkout_as(
            &target,
            &layout.service_index(&svc.name),
            from,
            job.head,
            &links,
            svc.user.as_deref(),
        )?;
    }
    let rev_file = layout.service_rev(&svc.name);
    if let Some(rev) = revision
        && (revision != job.deployed || !rev_file.exists())
    {
        layout::write_atomic(&rev_file, format!("{rev}\n").as_bytes()).map_err(|source| {
            DeployError::Io {
                path: rev_file.clone(),
                source,
            }
        })?;
    }
    Ok(Deployed::Done {
        revision,
        files: changed || job.fresh,
    })
}

/// Checks `head` out beside the live checkout and runs the service's `check` on it; a failure is
/// a refusal carrying the command's output. The staged tree is removed either way.
fn run_check(
    store: &Store,
    layout: &Layout,
    svc: &config::Service,
    check: &config::Check,
    head: Oid,
    revision: Oid,
) -> Result<(), DeployError> {
    let staging = layout.staging(&svc.name);
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| DeployError::Io { path, source }
    };
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let index = staging.with_extension("index");
    let _ = std::fs::remove_file(&index);
    let result = (|| {
        store.checkout(&staging, &index, None, head, &svc.links())?;
        let dir = svc
            .dirs
            .first()
            .map(|d| staging.join(&d.link))
            .unwrap_or_else(|| staging.clone());
        let command = check
            .command
            .replace("{dir}", &exec::shell_quote(&dir.to_string_lossy()))
            .replace("{root}", &exec::shell_quote(&staging.to_string_lossy()))
            .replace("{rev}", &revision.to_string());
        info!(command = %command, "checking {}", service::short(Some(revision)));
        let spec = exec::Spec::new("/bin/sh", check.timeout)
            .arg("-c")
            .arg(&command)
            .env("PLUMB_DIR", &dir)
            .env("PLUMB_ROOT", &staging)
            .env("PLUMB_REVISION", revision.to_string())
            .env("PLUMB_SERVICE", &svc.name)
            .dir(&staging);
        let why = match exec::run_blocking(spec) {
            Ok(out) if out.success() => return Ok(()),
            Ok(out) => out.failure(10),
            Err(e) => e.to_string(),
        };
        Err(DeployError::Refused {
            revision: Some(revision),
            why: Refusal::Check(why),
        })
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_file(&index);
    result
}

/// Turns what an operator typed into a commit of the service's branch history.
fn resolve_in_history(
    stores: &std::path::Path,
    url: &str,
    revision: &str,
    head: Option<Oid>,
    upstream: &config::UpstreamSettings,
) -> Result<Oid, String> {
    let store = Store::open_readonly(stores, url).map_err(|e| e.to_string())?;
    let target = store
        .resolve(revision)
        .map_err(|_| format!("unknown revision {revision:?} in {}", git::redact_url(url)))?;
    let head =
        head.ok_or_else(|| "the service has no branch head yet to roll back on".to_owned())?;
    match store.in_history(target, head) {
        Ok(true) if upstream.verifies() => {
            // A rollback target must be signed like any head: it is deployed as one.
            store
                .verify_commit(target, &upstream.trust())
                .map(|_| target)
                .map_err(|e| format!("refusing to roll back: {e}"))
        }
        Ok(true) => Ok(target),
        Ok(false) => Err(format!(
            "{revision:?} ({}) is not in the history of the service's branch",
            service::short(Some(target))
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn load_state(layout: &Layout, name: &str, now: u64) -> service::Service {
    let path = layout.service_state(name);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                error!(service = %name, "{}: unreadable state ({e}); starting afresh", path.display());
                service::Service::new(now)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => service::Service::new(now),
        Err(e) => {
            error!(service = %name, "{}: {e}; starting afresh", path.display());
            service::Service::new(now)
        }
    }
}

/// Writes the service's state file; false (logged) when it could not.
fn persist(layout: &Layout, name: &str, state: &service::Service) -> bool {
    let path = layout.service_state(name);
    let write = serde_json::to_vec_pretty(state)
        .map_err(std::io::Error::other)
        .and_then(|json| layout::write_atomic(&path, &json));
    if let Err(e) = &write {
        error!(service = %name, "cannot save state to {}: {e}", path.display());
    }
    write.is_ok()
}

/// What an operator should know beside a service's state: its upstream failing, what noop mode
/// holds back.
fn notes(c: &config::Service, s: &service::Service) -> Vec<String> {
    let mut notes: Vec<String> = s
        .unreachable
        .iter()
        .map(|e| format!("upstream unreachable, serving the last fetched revision: {e}"))
        .collect();
    if s.noop {
        notes.push(match s.would {
            None => "noop: nothing to deploy".to_owned(),
            Some(w) if w.files == 0 => format!(
                "noop: would move to head {} without changing a file",
                service::short(Some(w.head))
            ),
            Some(w) => format!(
                "noop: would deploy {}: {} file{} changed, {}",
                service::short(w.revision),
                w.files,
                if w.files == 1 { "" } else { "s" },
                if c.check.is_some() {
                    "check passed"
                } else {
                    "no check configured"
                }
            ),
        });
    }
    notes
}

/// Why a write that would touch a noop service's files is not carried out.
fn noop_refusal(service: &str, action: &str) -> CommandError {
    CommandError::Invalid(format!(
        "{service} is in noop mode: a {action} would change its files; turn noop off first"
    ))
}

/// A random wait in `[0, max)`, so machines started together drift apart.
fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_millis(fastrand::u64(0..max.as_millis().max(1) as u64))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the control API asks of the daemon. Answered through [`Handle::call`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Every service of this machine.
    Services,
    /// One service.
    Status(String),
    /// Stop tracking upstream, until `until` (unix seconds) or until unfrozen.
    Freeze { service: String, until: Option<u64> },
    /// Track upstream again (also ends a rollback pin).
    Unfreeze(String),
    /// Pin to `revision` (anything git accepts in the service's history) and freeze.
    Rollback { service: String, revision: String },
    /// Fetch and deploy now; answered when done. `force` also drops local edits.
    Pull { service: String, force: bool },
    /// What the next pull would change in the service's files (from the last fetch).
    Diff(String),
    /// Rebuild the service's checkout from the store at the same revision; the service keeps its
    /// current files until the new checkout is in place and re-bound. Drops local edits.
    Wipe(String),
    /// A push webhook arrived: fetch now instead of at the next tick the upstreams that are one of
    /// `repositories` (URLs from its payload, any protocol), or every upstream when none is (a
    /// mirror, a host known by another name) or the payload named none.
    Poke { repositories: Vec<String> },
}

/// The daemon's answer to a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Services(Vec<crate::proto::ServiceStatus>),
    Action(Box<crate::proto::ActionResult>),
    Diff(crate::proto::DiffResult),
}

/// Why a command was refused; the API maps each to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// 404.
    #[error("no service {0:?} on this machine")]
    UnknownService(String),
    /// 400 / 422: the request cannot be carried out as asked (unknown revision, ...).
    #[error("{0}")]
    Invalid(String),
    /// 503: the daemon is stopping.
    #[error("plumb is shutting down")]
    Unavailable,
}

/// One command in flight, with where its answer goes.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub reply: tokio::sync::oneshot::Sender<Result<Reply, CommandError>>,
}

/// The API's way into the daemon's actor: cheap to clone, one per connection if need be.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
}

impl Handle {
    /// Sends `command` to the daemon and waits for its answer.
    pub async fn call(&self, command: Command) -> Result<Reply, CommandError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(Request { command, reply })
            .await
            .map_err(|_| CommandError::Unavailable)?;
        answer.await.map_err(|_| CommandError::Unavailable)?
    }
}

/// A handle for the API and the receiving end for [`run`].
pub fn channel() -> (Handle, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(16);
    (Handle { tx }, rx)
}

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

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn};

use crate::apply;
use crate::bootstrap::{self, Bootstrap, BootstrapError};
use crate::config::{self, Config, ConfigError};
use crate::error::{self, Chain};
use crate::git::{self, Oid};
use crate::layout::Layout;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::service::{self, Effect, Event, State};

mod commands;
mod deploy;
mod executor;
mod fetch;
mod persist;
mod scheduler;

use commands::Answer;
pub use commands::{Command, CommandError, Handle, Request, channel};
pub use deploy::DeployError;
pub use deploy::RollbackError;
use deploy::{DeployJob, Kind};
use executor::{Executor, Noop, System};
use fetch::Check;
use persist::load_state;

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
    #[error("cannot create state directory {path}")]
    StateDir {
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
        self.services.iter().all(|(_, s)| {
            matches!(s.state(), State::Ok | State::Freeze) && s.unreachable().is_none()
        })
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
    let (config, text) = read_config(&opts)?;
    let mut d = Daemon::new(opts, config)?;
    if let Some(text) = &text {
        d.host.keep_accepted(&d.opts.config, text);
    }
    d.config_text = text;
    let (tx, mut rx) = mpsc::channel::<Done>(64);
    let (systemd_reloaded, mut systemd_reloads) = mpsc::channel::<()>(1);
    if d.opts.apply && !d.opts.noop {
        let system = System::connect(d.layout.clone()).await;
        if let Some(systemd) = system.systemd()
            && !d.opts.once
        {
            tokio::spawn(executor::arm_path_units(
                systemd,
                systemd_reloaded,
                shutdown.clone(),
            ));
        }
        d.host = Arc::new(system);
    }
    d.resume(&tx);
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
        let once_done = d.opts.once && d.all_cycled() && d.upstreams.values().all(|u| u.settled());
        let stopping = shutdown.is_cancelled() || once_done;
        if stopping {
            d.cancel.store(true, Ordering::Relaxed);
            if d.upstreams.values().all(|u| !u.busy()) {
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
            // An operator's daemon-reload after editing the config: the generator has run on the
            // new file, so the daemon follows it too (or says why it cannot).
            Some(()) = systemd_reloads.recv(), if !stopping => {
                if d.config_changed() {
                    notify.send("RELOADING=1");
                    d.reload();
                    notify.send("READY=1");
                }
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
    /// The (deployed, head) pair `behind` was counted for: while neither moves, a fetch does not
    /// walk the history again, so an idle tick costs nothing per commit of history.
    behind_at: Option<(Oid, Oid)>,
    /// The ignored files the last drift check found beside the checkout: while they and the
    /// checkout stay as they are, the next check needs no diff (`git::Ignored`).
    ignored: Option<git::Ignored>,
    /// The last write of the state file failed: what is on disk is older than `state`.
    unsaved: bool,
    /// The service's rollout wave above 0, from the whole config: what its deploys wait for.
    wave: Option<Arc<crate::rollout::Wave>>,
}

type Upstream = scheduler::Upstream<Waiter, DeployJob>;

/// An operator's write, answered when its upstream's cycle is done.
struct Waiter {
    service: String,
    action: &'static str,
    reply: Answer<crate::proto::ActionResult>,
}

/// A finished job, back on the actor.
enum Done {
    Fetched {
        url: String,
        job: fetch::Fetched,
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
    /// A rollback's revision, resolved in the store, with the changes of the service's files
    /// after it (or why not).
    Resolved {
        service: String,
        result: Result<(Oid, Option<u64>), deploy::RollbackError>,
        reply: Answer<crate::proto::ActionResult>,
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
    /// What acts on the host: the system (checkouts, and applies when systemd answers), or
    /// noop for the whole daemon (`--noop`).
    host: Arc<dyn Executor>,
    /// What acts for a service in noop mode: judges, writes nothing the service sees.
    noop: Arc<dyn Executor>,
    /// Applies running per service, and the operators waiting for them to end.
    applying: BTreeMap<String, usize>,
    held: Vec<Waiter>,
    services: BTreeMap<String, Entry>,
    upstreams: BTreeMap<String, Upstream>,
    /// The config file's text as last read, accepted or not: a daemon-reload re-reads the config
    /// only when it changed since.
    config_text: Option<String>,
    /// Why the config file last read was refused; the daemon runs on the last accepted one.
    config_error: Option<String>,
}

/// Reads the config and its text (none yet is an empty one in bootstrap mode).
fn read_config(opts: &Options) -> Result<(Config, Option<String>), ConfigError> {
    let (mut config, text) = bootstrap::read_config(&opts.config, opts.bootstrap.is_some())?;
    if let Some(dir) = &opts.state_dir {
        // The default checkouts move with --state-dir, as the stores and the state do.
        config.use_state_dir(dir);
    }
    Ok((config, text))
}

/// `--interval` for `selected`: a soak set shorter than it refuses the config, at start as at a
/// reload (which keeps the running one), like a `plumb.interval` longer than a soak.
fn poll_every(opts: &Options, selected: &mut [config::Service]) -> Result<(), ConfigError> {
    if let Some(interval) = opts.interval {
        for s in selected {
            s.poll_every(interval)?;
        }
    }
    Ok(())
}

/// This machine's services in `config`, and plumb itself in bootstrap mode.
fn select(
    opts: &Options,
    config: &Config,
    layout: &Layout,
) -> Result<Vec<config::Service>, BootstrapError> {
    let hosts = config.machine_names(&opts.hosts);
    let Some(b) = &opts.bootstrap else {
        let mut selected = config.select(&hosts)?;
        poll_every(opts, &mut selected)?;
        return Ok(selected);
    };
    bootstrap::validate(config, &opts.hosts)?;
    let mut selected = config.select(&hosts)?;
    poll_every(opts, &mut selected)?;
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
            host: if opts.noop {
                Arc::new(Noop)
            } else {
                Arc::new(System::new(layout.clone()))
            },
            noop: Arc::new(Noop),
            applying: BTreeMap::new(),
            held: Vec::new(),
            layout,
            opts,
            config,
            services: BTreeMap::new(),
            upstreams: BTreeMap::new(),
            config_text: None,
            config_error: None,
        };
        d.adopt(selected);
        Ok(d)
    }

    /// Takes `selected` as the services to run: keeps the state of those that stay, loads the persisted
    /// state of new ones, forgets the removed ones (their files stay where they are).
    fn adopt(&mut self, selected: Vec<config::Service>) {
        let s = &self.config.settings;
        self.interval = self.opts.interval.unwrap_or(s.interval);
        self.jitter = s.jitter_for(self.interval);
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
            let wave = crate::rollout::Wave::of(&self.config, &cfg, self.interval).map(Arc::new);
            let mut moved = false;
            let mut entry = match self.services.remove(&cfg.name) {
                Some(old) => {
                    moved = old.config.upstream != cfg.upstream
                        || old.config.branch != cfg.branch
                        || old.config.dirs != cfg.dirs
                        || old.config.mount != cfg.mount;
                    if moved {
                        info!(service = %cfg.name, "configuration changed; redeploying now");
                        due.insert(cfg.upstream.clone());
                    }
                    Entry {
                        config: cfg,
                        state: old.state,
                        behind: old.behind,
                        // Other links count other changes.
                        behind_at: old.behind_at.filter(|_| !moved),
                        ignored: old.ignored.filter(|_| !moved),
                        unsaved: old.unsaved,
                        wave,
                    }
                }
                None => {
                    due.insert(cfg.upstream.clone());
                    Entry {
                        state: load_state(&self.layout, &cfg.name, now),
                        config: cfg,
                        behind: None,
                        behind_at: None,
                        ignored: None,
                        unsaved: false,
                        wave,
                    }
                }
            };
            if entry.state.noop() != noop {
                if noop {
                    info!(service = %entry.config.name, "noop: reporting what would be deployed, touching nothing");
                } else if entry.state.would().is_some() {
                    info!(service = %entry.config.name, "noop is off: deploying what is pending");
                    due.insert(entry.config.upstream.clone());
                }
            }
            let health = entry.config.health.is_some();
            let reconfigured = Event::Reconfigured {
                noop,
                health,
                moved,
            };
            entry.state.handle(reconfigured, now);
            services.insert(entry.config.name.clone(), entry);
        }
        for gone in self.services.keys() {
            info!(service = %gone, "no longer configured for this machine; leaving its files as they are");
            if let Some(m) = &self.opts.metrics {
                m.forget(gone);
            }
        }
        self.services = services;
        // Every service has its series from the start, its counters at 0 before their first event.
        for name in self.services.keys() {
            self.observe(name);
        }
        if self.services.is_empty() {
            warn!(hosts = ?self.config.machine_names(&self.opts.hosts), "no services configured for this machine");
        }
        let urls: BTreeSet<String> = self
            .services
            .values()
            .map(|e| e.config.upstream.clone())
            .collect();
        let metrics = self.opts.metrics.clone();
        self.upstreams.retain(|url, _| {
            let keep = urls.contains(url);
            if let (false, Some(m)) = (keep, &metrics) {
                m.forget_upstream(&git::redact_url(url));
            }
            keep
        });
        for url in urls {
            self.upstreams
                .entry(url)
                .or_insert_with(|| Upstream::new(Instant::now()));
        }
        for url in due {
            if let Some(u) = self.upstreams.get_mut(&url) {
                u.changed(Instant::now());
            }
        }
    }

    /// Whether the config file's text differs from the one last read.
    fn config_changed(&self) -> bool {
        std::fs::read_to_string(&self.opts.config).ok() != self.config_text
    }

    /// The config file was refused: the daemon keeps running on the last accepted one, and says
    /// so in the journal, in every service's notes and in `plumb_config_last_reload_successful`.
    fn refuse_config(&mut self, why: String) {
        error!(
            "config refused, keeping the running one (the generator keeps the last accepted one, {}): {why}",
            config::accepted_path(&self.opts.config).display()
        );
        if let Some(m) = &self.opts.metrics {
            m.config_accepted(false);
        }
        self.config_error = Some(why);
    }

    fn reload(&mut self) {
        info!(config = %self.opts.config.display(), "re-reading the configuration");
        let (mut config, text) = match read_config(&self.opts) {
            Ok(read) => read,
            Err(e) => {
                self.config_text = std::fs::read_to_string(&self.opts.config).ok();
                return self.refuse_config(error::chain(&e));
            }
        };
        self.config_text = text;
        // state_dir takes effect at a restart: until then the default checkouts stay in the one
        // in use, with the stores and state.
        let moved_state_dir = config.settings.state_dir != self.layout.root();
        config.use_state_dir(self.layout.root());
        let selected = match select(&self.opts, &config, &self.layout) {
            Ok(s) => s,
            Err(e) => return self.refuse_config(error::chain(&e)),
        };
        self.config_error = None;
        if let Some(m) = &self.opts.metrics {
            m.config_accepted(true);
        }
        if let Some(text) = &self.config_text {
            self.host.keep_accepted(&self.opts.config, text);
        }
        if self.opts.state_dir.is_none() && moved_state_dir {
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
        self.config = config;
        self.adopt(selected);
        // The generator reads the config: systemd runs it again for new mounts and units.
        self.host.daemon_reload();
    }

    fn all_cycled(&self) -> bool {
        self.upstreams.values().all(|u| u.cycled())
    }

    fn next_due(&self) -> Instant {
        let now = Instant::now();
        let unix = unix_now();
        let expiry = self
            .services
            .values()
            .filter_map(|e| e.state.frozen_until())
            // checked: `frozen_until` comes from the API and the state files, and a time past the
            // clock's range would panic; such a freeze just never ends by itself.
            .filter_map(|t| now.checked_add(Duration::from_secs(t.saturating_sub(unix))));
        self.upstreams
            .values()
            .filter_map(|u| u.due(now))
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
            .filter(|(_, e)| e.state.frozen() && e.state.frozen_until().is_some_and(|t| t <= now))
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
            u.fetch_now(Instant::now(), None);
        }
    }

    fn start_due(&mut self, tx: &mpsc::Sender<Done>) {
        let now = Instant::now();
        let (mut due, mut checkouts) = (Vec::new(), Vec::new());
        for (url, u) in self.upstreams.iter_mut() {
            match u.start(now) {
                None => {}
                Some(scheduler::Start::Checkouts(jobs)) => checkouts.push((url.clone(), jobs)),
                Some(scheduler::Start::Fetch) => due.push(url.clone()),
            }
        }
        for (url, jobs) in checkouts {
            self.checkouts(url, jobs, tx);
        }
        for url in due {
            let branches: Vec<String> = self
                .services
                .values()
                .filter(|e| e.config.upstream == url)
                .map(|e| e.config.branch.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
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
                    synced: e.state.synced(),
                    deployed: e.state.deployed(),
                    branch: e.config.branch.clone(),
                    links: e.config.links(),
                    counted: e.behind_at,
                    ignored: e.ignored.clone(),
                })
                .collect();
            let stores = self.layout.stores();
            let transport = self.transport.clone();
            let tx = tx.clone();
            let span = info_span!("fetch", upstream = %git::redact_url(&url));
            tokio::task::spawn_blocking(move || {
                let _g = span.enter();
                let job = fetch::run(&stores, &url, &branches, checks, &transport);
                let _ = tx.blocking_send(Done::Fetched { url, job });
            });
        }
    }

    fn finish(&mut self, done: Done, tx: &mpsc::Sender<Done>) {
        let now = unix_now();
        match done {
            Done::Fetched {
                url,
                job:
                    fetch::Fetched {
                        result,
                        mut drift,
                        behind,
                        ignored,
                        interrupted,
                        took,
                    },
            } => {
                if let Some(m) = &self.opts.metrics {
                    m.fetched(&git::redact_url(&url), result.is_ok(), took);
                }
                for (name, (at, n)) in behind {
                    if let Some(e) = self.services.get_mut(&name) {
                        e.behind = n;
                        e.behind_at = Some(at);
                    }
                }
                for (name, known) in ignored {
                    if let Some(e) = self.services.get_mut(&name) {
                        e.ignored = known;
                    }
                }
                match &result {
                    Ok(report) => {
                        debug!(upstream = %git::redact_url(&url), heads = ?report.heads, "fetch done")
                    }
                    Err(e) => {
                        warn!(upstream = %git::redact_url(&url), "fetch failed: {}", Chain(e))
                    }
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
                        self.feed(&name, Event::Interrupted, now, tx);
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
                            error: error::chain(e),
                        },
                    };
                    jobs.extend(self.feed(&name, event, now, tx));
                }
                if jobs.is_empty() || self.cancel.load(Ordering::Relaxed) {
                    self.done_with(&url);
                } else {
                    self.checkouts(url, jobs, tx);
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
                if entry.state.deployed() != Some(revision) {
                    // Overtaken by a newer deploy, whose own apply reports.
                    debug!(service = %service, revision = %short, "apply outcome of an older revision");
                    self.apply_ended(&service);
                    return;
                }
                match &error {
                    None => info!(service = %service, revision = %short, "applied"),
                    Some(e) => error!(service = %service, revision = %short, "apply failed: {e}"),
                }
                if let Some(m) = &self.opts.metrics {
                    m.applied(&service, error.is_none());
                    if entry.state.health() && error.is_some() {
                        m.refused(&service, "health");
                    }
                }
                // A failed health check rolls back: its checkout runs now, not at the next poll.
                let jobs = self.feed(&service, Event::Applied { revision, error }, now, tx);
                self.queue(&service, jobs);
                self.apply_ended(&service);
            }
            Done::Resolved {
                service,
                result,
                reply,
            } => match result {
                Err(e) => {
                    let _ = reply.send(Err(CommandError::Rollback(Arc::new(e))));
                }
                Ok((target, behind)) => {
                    let Some(url) = self.services.get_mut(&service).map(|e| {
                        e.behind = behind;
                        e.config.upstream.clone()
                    }) else {
                        let _ = reply.send(Err(CommandError::UnknownService(service)));
                        return;
                    };
                    info!(service = %service, target = %service::short(Some(target)), "rollback by an operator");
                    let jobs = self.feed(&service, Event::Rollback { target }, now, tx);
                    if let Some(u) = self.upstreams.get_mut(&url) {
                        u.queue(
                            jobs,
                            Some(Waiter {
                                service,
                                action: "rollback",
                                reply,
                            }),
                        );
                    }
                }
            },
            Done::Deployed { url, events } => {
                for (name, event) in events {
                    let Some(entry) = self.services.get_mut(&name) else {
                        continue; // removed by a reload meanwhile
                    };
                    if let Event::Deployed { head, .. } = &event {
                        // At the branch head its files are current; at a rollback's pin the
                        // count was made when it was resolved; elsewhere the next fetch counts.
                        if Some(*head) == entry.state.upstream() {
                            entry.behind = Some(0);
                        } else if Some(*head) != entry.state.pinned() {
                            entry.behind = None;
                        }
                        entry.behind_at = None;
                    }
                    match &event {
                        Event::Deployed { revision, .. } if *revision != entry.state.deployed() => {
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
                    // A checkout cut short whose head was held or refused is put back now.
                    let jobs = self.feed(&name, event, now, tx);
                    self.queue(&name, jobs);
                    // The state machine asked for a write if the deploy changed what is kept on
                    // disk; one that failed earlier is tried again. Until it worked, the marker
                    // stays for the next start.
                    let (layout, host) = (&self.layout, &self.host);
                    let saved = deployed
                        && self.services.get_mut(&name).is_some_and(|e| {
                            if e.unsaved {
                                e.unsaved = !host.persist(layout, &name, &e.state);
                            }
                            !e.unsaved
                        });
                    if saved {
                        // The deploy is on disk: the checkout is no longer half-made.
                        self.host.deploy_saved(&self.layout, &name);
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
        let executor = if entry.state.noop() {
            &self.noop
        } else {
            &self.host
        };
        let upstream = self.config.settings.upstream(&entry.config.upstream);
        let limits = self.config.settings.limits();
        let effects = entry.state.handle(event, now);
        let config = &entry.config;
        let wave = &entry.wave;
        let job = |head, from, deployed, gate, kind| DeployJob {
            service: config.clone(),
            upstream: upstream.clone(),
            limits,
            gate,
            head,
            from,
            deployed,
            kind,
            wave: wave.clone(),
        };
        for effect in effects {
            match effect {
                Effect::Persist => {
                    entry.unsaved = !executor.persist(&self.layout, name, &entry.state);
                }
                Effect::Deploy {
                    head,
                    from,
                    deployed,
                    gate,
                } => jobs.push(job(head, from, deployed, gate, Kind::Deploy)),
                Effect::Restore {
                    head,
                    deployed,
                    gate,
                } => jobs.push(job(
                    head,
                    entry.state.synced(),
                    deployed,
                    gate,
                    Kind::Restore,
                )),
                Effect::Rebuild { head, deployed } => jobs.push(job(
                    head,
                    entry.state.synced(),
                    deployed,
                    service::Gate::default(),
                    Kind::Rebuild,
                )),
                Effect::Preview { head, from, gate } => {
                    jobs.push(job(head, from, entry.state.deployed(), gate, Kind::Preview))
                }
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
            m.service(name, &e.config.machine, e.config.wave, &e.state, e.behind);
        }
    }

    /// Tells every service what the last apply recorded, so that what a crash or a restart left
    /// unapplied is applied now (the `.path` unit only fires on a change) and a failure recorded
    /// meanwhile is BROKEN. plumb's own config in bootstrap mode has no record: it is installed
    /// again, in case the daemon stopped between its checkout and its install.
    fn resume(&mut self, tx: &mpsc::Sender<Done>) {
        let names: Vec<String> = self.services.keys().cloned().collect();
        let now = unix_now();
        for name in names {
            let own = name == bootstrap::SELF && self.opts.bootstrap.is_some();
            let applied = if own {
                None
            } else if self.host.applies() {
                apply::read_applied(&self.layout, &name).map(|o| (o.revision, o.error()))
            } else {
                continue;
            };
            let jobs = self.feed(&name, Event::Resumed { applied }, now, tx);
            self.queue(&name, jobs);
        }
    }

    /// Hands one upstream's checkouts to the executors on a blocking thread: those of services in
    /// noop mode to the one that only judges.
    fn checkouts(&self, url: String, jobs: Vec<DeployJob>, tx: &mpsc::Sender<Done>) {
        let noop = |job: &DeployJob| {
            self.services
                .get(&job.service.name)
                .is_some_and(|e| e.state.noop())
        };
        let (previews, jobs): (Vec<DeployJob>, Vec<DeployJob>) = jobs.into_iter().partition(noop);
        let (host, judge) = (self.host.clone(), self.noop.clone());
        let (layout, tx) = (self.layout.clone(), tx.clone());
        tokio::task::spawn_blocking(move || {
            let mut events = host.checkouts(&layout, &url, jobs);
            if !previews.is_empty() {
                events.extend(judge.checkouts(&layout, &url, previews));
            }
            let _ = tx.blocking_send(Done::Deployed { url, events });
        });
    }

    /// Queues checkouts a service's state machine asked for outside a fetch on its upstream.
    fn queue(&mut self, service: &str, jobs: Vec<DeployJob>) {
        if jobs.is_empty() {
            return;
        }
        if let Some(u) = self
            .services
            .get(service)
            .and_then(|e| self.upstreams.get_mut(&e.config.upstream))
        {
            u.queue(jobs, None);
        }
    }

    /// Starts `plumb-apply@<service>.service` and reports its outcome as `Done::Applied`. The same
    /// unit started by the `.path` unit meanwhile is the same job, so an apply never runs twice at
    /// once.
    fn apply(&mut self, service: &str, revision: Oid, tx: &mpsc::Sender<Done>) {
        let Some(e) = self.services.get(service) else {
            return;
        };
        let executor = if e.state.noop() {
            &self.noop
        } else {
            &self.host
        };
        if service == bootstrap::SELF
            && let Some(b) = &self.opts.bootstrap
        {
            let installed =
                executor.install_config(b, &e.config, &self.opts.config, &self.opts.hosts);
            return self.installed(installed, revision, tx);
        }
        let Some(outcome) = executor.apply(&e.config, revision) else {
            return;
        };
        *self.applying.entry(service.to_owned()).or_default() += 1;
        let (service, tx) = (service.to_owned(), tx.clone());
        tokio::spawn(async move {
            let error = outcome.await;
            let _ = tx
                .send(Done::Applied {
                    service,
                    revision,
                    error,
                })
                .await;
        });
    }

    /// plumb's own apply in bootstrap mode installed the config file of the deployed revision
    /// over the local one (or not): a changed one is re-read (and systemd re-runs the generator),
    /// one that fails to validate leaves the running one, and the service BROKEN.
    fn installed(
        &mut self,
        installed: Result<bool, BootstrapError>,
        revision: Oid,
        tx: &mpsc::Sender<Done>,
    ) {
        let error = match installed {
            Ok(changed) => {
                if changed {
                    info!(revision = %service::short(Some(revision)), config = %self.opts.config.display(), "installed the config from git");
                    self.reload();
                }
                None
            }
            Err(e) => Some(error::chain(&e)),
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
        let waiters = match self.upstreams.get_mut(url) {
            Some(u) => u.done(Instant::now(), wait),
            None => Vec::new(),
        };
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

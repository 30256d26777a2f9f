//! The configuration file: parsing, inheritance from `[global]`, validation, and choosing the services
//! that run on this machine.
//!
//! Two layers. The raw layer mirrors the TOML exactly (gitopper's `config.toml` plus plumb's own
//! `[plumb]` table), rejects unknown keys, and keeps the byte span of every value that can be wrong so
//! errors name the line and column. [`Config`] is the validated result the rest of plumb uses; a new
//! setting is a field in both layers and a line in the README's reference, nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Where the daemon keeps stores, checkouts and state unless the config or `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/plumb";
/// gitopper's default branch, kept so its configs mean the same here.
pub const DEFAULT_BRANCH: &str = "main";
/// How often upstreams are polled when nothing else is configured.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// A fetch that has not finished after this long is abandoned (the next tick tries again).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the control API listens: under `/run`, so a reboot never finds a stale socket.
pub const DEFAULT_SOCKET: &str = "/run/plumb/plumb.sock";
/// gitopper's metrics port, on every address.
pub const DEFAULT_METRICS_ADDRESS: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9222);

/// `host:port`, `:port` (every address, as gitopper wrote it), or empty for no listener.
pub fn parse_metrics_address(a: &str) -> Result<Option<std::net::SocketAddr>, String> {
    let a = a.trim();
    if a.is_empty() {
        return Ok(None);
    }
    let full = match a.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => a.to_owned(),
    };
    full.parse().map(Some).map_err(|_| {
        format!("{a:?} is not an address like \"127.0.0.1:9222\" or \":9222\" (empty: off)")
    })
}

/// The unix group whose members may change services through the API (root always may).
pub const DEFAULT_ADMIN_GROUP: &str = "plumb";
/// The unix group whose members may read the API (and connect to its socket).
pub const DEFAULT_READONLY_GROUP: &str = "plumb-ro";

/// Everything that can be wrong with a config file, each naming the file and, where the value has a
/// place in the text, its line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {k}{message}", path.display(), k = key_prefix(key))]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        /// The dotted key the problem is about (`services[2].dirs[0].local`), when known.
        key: Option<String>,
        message: String,
    },
    #[error("{} (plumb.webhook_secret_file): {message}", path.display())]
    Secret { path: PathBuf, message: String },
    #[error("{}: {message} (machines {hosts:?})", path.display())]
    Selection {
        path: PathBuf,
        hosts: Vec<String>,
        message: String,
    },
}

fn key_prefix(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default()
}

/// How long lower waves must be OK on a revision when a service in a later wave sets no `soak`
/// (or the poll interval, when that is longer).
pub const DEFAULT_SOAK: Duration = Duration::from_secs(5 * 60);
/// The scrape interval plumb assumes of Prometheus when `prometheus_scrape_interval` is not set:
/// Prometheus's own default.
pub const DEFAULT_SCRAPE_INTERVAL: Duration = Duration::from_secs(60);

/// `[plumb] prometheus`: the Prometheus whose samples of plumb's metrics gate rollout waves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrometheusSettings {
    /// The base URL (`http://prom:9090`), possibly with `user:password@` for basic
    /// authentication.
    pub url: String,
    /// A file holding a bearer token, read at every query (so it can be rotated).
    pub bearer_token_file: Option<PathBuf>,
    /// How often Prometheus scrapes the daemons: the step at which the soak is judged, and the
    /// longest silence between two samples that is not a gap.
    pub scrape_interval: Duration,
}

/// What a service's unit gets told when its files changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `systemctl reload`: the unit re-reads its files without a restart.
    Reload,
    /// `systemctl restart`.
    Restart,
    /// Reload when the unit supports it, otherwise restart.
    ReloadOrRestart,
    /// Files change and nothing is told (the unit reads them on each use).
    None,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Reload => "reload",
            Action::Restart => "restart",
            Action::ReloadOrRestart => "reload-or-restart",
            Action::None => "none",
        })
    }
}

/// One path of the repository bound onto one path of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    /// Absolute path on the machine (the mount target).
    pub local: PathBuf,
    /// Relative, normalised path inside the repository (no `..`, no leading or trailing `/`).
    pub link: String,
    /// `local` and `link` are single files rather than directories.
    pub file: bool,
    /// Bind read-only (a plumb extension): the service cannot change the files it is given, so what
    /// runs is what the repository says.
    pub ro: bool,
}

/// One service on one machine, with every value inherited from `[global]` already filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub machine: String,
    /// The systemd unit (`nginx` means `nginx.service`); also the service's name in plumb.
    pub name: String,
    pub upstream: String,
    pub branch: String,
    /// Directory under which the service's checkout lives, as `<mount>/<name>`.
    pub mount: PathBuf,
    /// The config sets no `mount`: it is the state directory's `checkouts`, and moves with it
    /// ([`Config::use_state_dir`]).
    pub default_mount: bool,
    pub action: Action,
    pub package: Option<String>,
    pub user: Option<String>,
    pub dirs: Vec<Dir>,
    /// A command that must accept a revision before the service's files change (`check`).
    pub check: Option<Check>,
    /// What must hold after an apply, or plumb rolls the service back by itself (`health`).
    pub health: Option<Health>,
    /// Report what would be deployed, and deploy nothing (`noop`, a plumb extension): fetch,
    /// verify, inspect and `check` run; the checkout, `.rev`, mounts, units and packages stay.
    pub noop: bool,
    /// The rollout wave (`wave`, a plumb extension): 0 deploys at once; a machine in a later wave
    /// deploys a revision only once every machine running the service from the same upstream and
    /// branch in a lower wave has been on it, OK, for `soak` (judged by Prometheus).
    pub wave: u32,
    /// How long the lower waves must have been on a revision and OK before this machine takes it
    /// (`soak`); only meaningful in a wave above 0.
    pub soak: Duration,
    /// Where `soak` is set in the file, `None` when it is the default: the poll interval a
    /// daemon uses may come from its command line ([`Service::poll_every`]), after the file was
    /// read, and a soak set shorter than it is refused at its place in the file.
    pub soak_at: Option<Place>,
}

/// A place in the config file, for a refusal found after it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The dotted key (`services[2].soak`).
    pub key: String,
}

impl Place {
    /// The refusal of what is set here, as the config's own checks word it.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            line: self.line,
            column: self.column,
            key: Some(self.key.clone()),
            message: message.into(),
        }
    }
}

impl Service {
    /// The daemon polls every `interval` given on its command line (`--interval`) instead of the
    /// config's: a soak set shorter than one poll is refused as the config's own `interval`
    /// refuses it (the gate could not see it; the operator asked for something the daemon
    /// cannot do), and a default soak grows to the interval as it does with the config's.
    pub fn poll_every(&mut self, interval: Duration) -> Result<(), ConfigError> {
        if self.wave == 0 {
            return Ok(());
        }
        match &self.soak_at {
            None => self.soak = DEFAULT_SOAK.max(interval),
            Some(place) if self.soak < interval => {
                return Err(place.error(format!(
                    "{} must be at least one poll interval ({} from --interval); set a longer \
                     soak or a shorter --interval",
                    humantime::format_duration(self.soak),
                    humantime::format_duration(interval)
                )));
            }
            Some(_) => {}
        }
        Ok(())
    }
}

/// `check`: run by `sh -c` against the staged tree of a new revision, before the live checkout
/// moves. `{dir}` is the staged copy of the first `dirs` entry, `{root}` the staged checkout (the
/// links as repository paths under it), `{rev}` the revision; the same are in `PLUMB_DIR`,
/// `PLUMB_ROOT` and `PLUMB_REVISION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub command: String,
    pub timeout: Duration,
}

/// `[services.health]`: after an apply the unit must stay active (not restarted) for `settle`, then
/// `command` (by `sh -c`) and `url` (an `http://` GET answering 2xx) must succeed within `timeout`,
/// tried again every second until then. Any failure rolls the service back to its last good
/// revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub settle: Duration,
    pub command: Option<String>,
    pub url: Option<String>,
    pub timeout: Duration,
}

/// How long a check may run before it counts as failed.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a service must stay up after an apply when `health` names no `settle`.
pub const DEFAULT_HEALTH_SETTLE: Duration = Duration::from_secs(5);
/// How long a health command or URL gets to succeed when `health` names no `timeout`.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// What a branch of an upstream moving to a commit that does not descend from the one a service
/// has checked out (a force-push) does to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForcePush {
    /// Deploy the new head, logging the old and new heads (the default).
    #[default]
    Follow,
    /// Hold the service in DIFF until an operator accepts the new history (`pull --force`).
    Refuse,
}

/// `[[plumb.upstream]]`: settings for one upstream URL, shared by every service on it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamSettings {
    /// An SSH allowed-signers file (git's `gpg.ssh.allowedSignersFile` format): heads must carry
    /// an SSH signature by one of its keys.
    pub allowed_signers: Option<PathBuf>,
    /// An OpenPGP keyring (as `gpgv --keyring` reads it): heads must carry a signature by one of
    /// its keys.
    pub keyring: Option<PathBuf>,
    pub force_push: ForcePush,
}

impl UpstreamSettings {
    /// Whether heads of this upstream must be signed.
    pub fn verifies(&self) -> bool {
        self.allowed_signers.is_some() || self.keyring.is_some()
    }

    /// The keys the git engine checks this upstream's heads against.
    pub fn trust(&self) -> crate::git::Trust {
        crate::git::Trust {
            allowed_signers: self.allowed_signers.clone(),
            keyring: self.keyring.clone(),
        }
    }
}

impl Service {
    /// The directory holding this service's links at its deployed revision (the mount sources).
    pub fn checkout_dir(&self) -> PathBuf {
        self.mount.join(&self.name)
    }

    /// The repository paths this service owns; a commit touching none of them does not concern it.
    pub fn links(&self) -> Vec<String> {
        self.dirs.iter().map(|d| d.link.clone()).collect()
    }

    /// The systemd unit this service is: its name when that ends in a unit type (`foo.socket`),
    /// otherwise `<name>.service`, as systemctl reads a bare name. The generator orders this unit
    /// after the bind mounts and the apply reloads it.
    pub fn unit(&self) -> String {
        unit_name(&self.name)
    }

    /// Whether the service deploys files where systemd reads units, drop-ins or its own
    /// configuration ([`SYSTEMD_DIRS`]): systemd reads those before plumb's mounts are up at
    /// boot, so such a service is applied again once they are.
    pub fn units_from_git(&self) -> bool {
        self.dirs
            .iter()
            .any(|d| SYSTEMD_DIRS.iter().any(|s| d.local.starts_with(s)))
    }
}

/// Unit types a `service` may end in to name a unit other than a `.service`. `.device` and `.scope`
/// units are not here: systemd cannot start either by name, so plumb could not manage them.
pub const UNIT_TYPES: &[&str] = &[
    "service",
    "socket",
    "target",
    "path",
    "timer",
    "mount",
    "automount",
    "swap",
    "slice",
];

/// The unit name for a service name: see [`Service::unit`].
pub fn unit_name(service: &str) -> String {
    match service.rsplit_once('.') {
        Some((_, suffix)) if UNIT_TYPES.contains(&suffix) => service.to_owned(),
        _ => format!("{service}.service"),
    }
}

/// The longest unit name systemd accepts (`UNIT_NAME_MAX` less the terminating NUL).
pub const UNIT_NAME_MAX: usize = 255;

/// The instance unit that applies a service's revisions is `plumb-apply@<service>.service`, the
/// longest name plumb derives from a service name; it must stay a valid unit name.
const APPLY_UNIT_OVERHEAD: usize = "plumb-apply@.service".len();

/// A key from gitopper's `keys` setting. plumb reads and ignores it: access goes through sshd and
/// unix groups instead (see the README's migration notes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub path: String,
    pub ro: bool,
}

/// plumb's own settings, from the `[plumb]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub interval: Duration,
    /// Each wait between polls of an upstream is shortened by a random amount up to this, so a
    /// fleet started together does not hit the git server in step. `None`: a tenth of the
    /// interval in use, the config's or `--interval`'s ([`Settings::jitter_for`]).
    pub jitter: Option<Duration>,
    pub fetch_timeout: Duration,
    pub ssh_key: Option<PathBuf>,
    pub known_hosts: Vec<PathBuf>,
    /// This machine's names besides its hostname. They live in the config, not only on the command
    /// line, because the systemd generator gets no arguments: the daemon and the generator must pick
    /// the same services.
    pub hosts: Vec<String>,
    /// The control API's unix socket.
    pub socket: PathBuf,
    /// Members may read and change services through the API.
    pub admin_group: String,
    /// Members may read through the API; the socket belongs to this group.
    pub readonly_group: String,
    /// Where `/metrics` is served; `None` turns the listener off.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The shared secret git hosts sign push webhooks with; `None`: the hook is off.
    pub webhook_secret: Option<String>,
    /// The same secret in a file of its own (`webhook_secret_file`), read when the daemon starts,
    /// so the config itself can be world-readable (the Nix store, a git repository).
    pub webhook_secret_file: Option<PathBuf>,
    /// Per upstream URL: signatures required, force-push policy. Absent URLs get the defaults.
    pub upstreams: BTreeMap<String, UpstreamSettings>,
    /// The largest file a revision may hold under a service's links (bytes; `u64::MAX`: no
    /// limit). A checkout holds a whole file in memory, so this bounds the daemon's memory.
    pub max_file_size: u64,
    /// The Prometheus that gates rollout waves; required by any `wave`.
    pub prometheus: Option<PrometheusSettings>,
}

impl Settings {
    /// The jitter of polls every `interval` (the config's, or `--interval`'s): the config's
    /// `jitter`, at most half the interval, or without one a tenth of it.
    pub fn jitter_for(&self, interval: Duration) -> Duration {
        self.jitter.map_or(interval / 10, |j| j.min(interval / 2))
    }

    /// What a revision may hold to be checked out.
    pub fn limits(&self) -> crate::git::Limits {
        crate::git::Limits {
            max_file_size: self.max_file_size,
        }
    }

    /// The push webhook's secret, from the config or read now from `webhook_secret_file` (one
    /// line; surrounding whitespace is not part of it).
    pub fn webhook_secret(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.webhook_secret_file else {
            return Ok(self.webhook_secret.clone());
        };
        let secret = |message: String| ConfigError::Secret {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| secret(e.to_string()))?;
        let text = text.trim();
        if text.len() < 16 {
            return Err(secret("must be at least 16 characters".to_owned()));
        }
        Ok(Some(text.to_owned()))
    }

    /// The settings of the upstream at `url` (the defaults when it has no `[[plumb.upstream]]`).
    pub fn upstream(&self, url: &str) -> UpstreamSettings {
        self.upstreams.get(url).cloned().unwrap_or_default()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            interval: DEFAULT_INTERVAL,
            jitter: None,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            ssh_key: None,
            known_hosts: Vec::new(),
            hosts: Vec::new(),
            socket: PathBuf::from(DEFAULT_SOCKET),
            admin_group: DEFAULT_ADMIN_GROUP.to_owned(),
            readonly_group: DEFAULT_READONLY_GROUP.to_owned(),
            metrics_address: Some(DEFAULT_METRICS_ADDRESS),
            webhook_secret: None,
            webhook_secret_file: None,
            upstreams: BTreeMap::new(),
            max_file_size: crate::git::DEFAULT_MAX_FILE_SIZE,
            prometheus: None,
        }
    }
}

/// A validated configuration: every service of every machine, and plumb's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub settings: Settings,
    pub services: Vec<Service>,
    pub keys: Vec<Key>,
}

// ---------------------------------------------------------------------------------------------
// The raw layer: the file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    global: RawGlobal,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
    #[serde(default)]
    plumb: RawPlumb,
    /// gitopper's early releases had `keys` at the top level: read and ignored as `[global] keys`.
    keys: Option<RawTopKeys>,
}

/// Top-level `keys`, as gitopper's early releases wrote them.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "keys: expected gitopper's [[keys]] tables with a path, or a [keys] table with a list of paths"
)]
enum RawTopKeys {
    /// `[[keys]]` with `path = "..."` (and `ro`), one table per key.
    List(Vec<RawKey>),
    /// `[keys]` with `path = ["...", ...]` (or one path).
    Table(RawKeyTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyTable {
    path: RawPaths,
    #[serde(default)]
    ro: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPaths {
    One(String),
    Many(Vec<String>),
}

/// `[global]`: gitopper's embedded service fields plus `keys`. `service` is not accepted here: a
/// default unit name for every service has no meaning.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    machine: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
    branch: Option<Spanned<String>>,
    mount: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    package: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    dirs: Option<Vec<RawDir>>,
    noop: Option<bool>,
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    machine: Option<Spanned<String>>,
    service: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
    branch: Option<Spanned<String>>,
    mount: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    package: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    dirs: Option<Vec<RawDir>>,
    check: Option<Spanned<String>>,
    check_timeout: Option<Spanned<String>>,
    health: Option<Spanned<RawHealth>>,
    noop: Option<bool>,
    wave: Option<Spanned<u32>>,
    soak: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    settle: Option<Spanned<String>>,
    command: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Spanned<String>,
    allowed_signers: Option<Spanned<String>>,
    keyring: Option<Spanned<String>>,
    force_push: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDir {
    local: Spanned<String>,
    link: Spanned<String>,
    #[serde(default)]
    file: bool,
    #[serde(default)]
    ro: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    path: String,
    #[serde(default)]
    ro: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlumb {
    state_dir: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    fetch_timeout: Option<Spanned<String>>,
    ssh_key: Option<Spanned<String>>,
    #[serde(default)]
    known_hosts: Vec<Spanned<String>>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    socket: Option<Spanned<String>>,
    admin_group: Option<Spanned<String>>,
    readonly_group: Option<Spanned<String>>,
    metrics_address: Option<Spanned<String>>,
    webhook_secret: Option<Spanned<String>>,
    webhook_secret_file: Option<Spanned<String>>,
    #[serde(default)]
    upstream: Vec<Spanned<RawUpstream>>,
    max_file_size: Option<Spanned<String>>,
    prometheus: Option<Spanned<String>>,
    prometheus_bearer_token_file: Option<Spanned<String>>,
    prometheus_scrape_interval: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------------

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (which only names the file in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let cx = Cx { path, text };
        let raw: RawFile = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
        cx.validate(raw)
    }

    /// The services whose `machine` is one of `hosts` (the hostname and `--hosts` aliases). Two of
    /// them with one name, or two binding one local path, cannot both run, so that is an error here
    /// even when the machines differ in the file.
    pub fn select(&self, hosts: &[String]) -> Result<Vec<Service>, ConfigError> {
        let mine: Vec<Service> = self
            .services
            .iter()
            .filter(|s| hosts.contains(&s.machine))
            .cloned()
            .collect();
        let mut names = BTreeMap::new();
        let mut locals = BTreeMap::new();
        for s in &mine {
            if let Some(other) = names.insert(s.name.clone(), s.machine.clone()) {
                return Err(self.selection(hosts, format!(
                    "service {:?} is configured for both machine {other:?} and machine {:?}, which are both this machine",
                    s.name, s.machine
                )));
            }
            for d in &s.dirs {
                if let Some(other) = locals.insert(d.local.clone(), s.name.clone()) {
                    return Err(self.selection(
                        hosts,
                        format!(
                            "{} is bound by both service {other:?} and service {:?}",
                            d.local.display(),
                            s.name
                        ),
                    ));
                }
            }
        }
        Ok(mine)
    }

    /// Uses `dir` as the state directory (`plumb --state-dir`): the stores and state go there, and
    /// so do the checkouts of services that set no `mount`, so that two daemons with their own
    /// state directories never share a checkout.
    pub fn use_state_dir(&mut self, dir: &Path) {
        self.settings.state_dir = dir.to_owned();
        for s in self.services.iter_mut().filter(|s| s.default_mount) {
            s.mount = dir.join("checkouts");
        }
    }

    /// This machine's names: the hostname, then `[plumb] hosts`, then `cli_aliases` (`--hosts`), each
    /// once. The daemon and the generator both select services with it, so they agree.
    pub fn machine_names(&self, cli_aliases: &[String]) -> Vec<String> {
        let aliases: Vec<String> = self
            .settings
            .hosts
            .iter()
            .chain(cli_aliases)
            .cloned()
            .collect();
        machine_names(&aliases)
    }

    fn selection(&self, hosts: &[String], message: String) -> ConfigError {
        ConfigError::Selection {
            path: self.path.clone(),
            hosts: hosts.to_vec(),
            message,
        }
    }
}

/// This machine's names: its hostname plus `aliases`, each once. [`Config::machine_names`] adds the
/// config's `[plumb] hosts`; use it once a config is loaded.
pub fn machine_names(aliases: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(h) = nix::unistd::gethostname() {
        names.push(h.to_string_lossy().into_owned());
    }
    for a in aliases {
        if !a.is_empty() && !names.contains(a) {
            names.push(a.clone());
        }
    }
    names
}

/// Parsing context: the file's path and text, to turn byte offsets into lines and columns.
struct Cx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Cx<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        (line, column)
    }

    fn at(
        &self,
        offset: usize,
        key: impl Into<Option<String>>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = self.position(offset);
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        // serde does not say which key a type error is about; the text left of `=` on that line does.
        let line_start = self.text[..offset.min(self.text.len())]
            .rfind('\n')
            .map(|i| i + 1)
            .unwrap_or(0);
        let line = self.text[line_start..].lines().next().unwrap_or("");
        let key = line
            .split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"').to_owned())
            .filter(|k| !k.is_empty() && !k.starts_with('['));
        self.at(offset, key, e.message().trim().to_owned())
    }

    fn validate(&self, raw: RawFile) -> Result<Config, ConfigError> {
        let mut raw = raw;
        let upstreams = std::mem::take(&mut raw.plumb.upstream);
        let mut settings = self.settings(std::mem::take(&mut raw.plumb))?;
        let g = &raw.global;
        let global_dirs = match &g.dirs {
            Some(d) => Some(self.dirs("global.dirs", d)?),
            None => None,
        };
        let mut services = Vec::new();
        for (i, spanned) in raw.services.iter().enumerate() {
            let start = spanned.span().start;
            let s = spanned.get_ref();
            let key = |field: &str| format!("services[{i}].{field}");
            let pick = |own: &Option<Spanned<String>>, global: &Option<Spanned<String>>| {
                own.as_ref().or(global.as_ref()).cloned()
            };
            let required =
                |v: Option<Spanned<String>>, field: &str| -> Result<Spanned<String>, ConfigError> {
                    match v {
                        Some(v) if !v.get_ref().trim().is_empty() => Ok(v),
                        Some(v) => Err(self.at(v.span().start, key(field), "must not be empty")),
                        None => Err(self.at(
                            start,
                            key(field),
                            "missing (set it here or in [global])".to_owned(),
                        )),
                    }
                };
            let machine = required(pick(&s.machine, &g.machine), "machine")?;
            let name = required(s.service.clone(), "service")?;
            self.check_name(&name, key("service"))?;
            let upstream = required(pick(&s.upstream, &g.upstream), "upstream")?;
            let branch = pick(&s.branch, &g.branch)
                .map(|b| b.into_inner())
                .filter(|b| !b.is_empty())
                .unwrap_or_else(|| DEFAULT_BRANCH.to_owned());
            let (mount, default_mount) = match pick(&s.mount, &g.mount) {
                Some(m) if !m.get_ref().is_empty() => {
                    self.absolute(&m, key("mount"))?;
                    (PathBuf::from(m.into_inner()), false)
                }
                _ => (settings.state_dir.join("checkouts"), true),
            };
            let action = match pick(&s.action, &g.action) {
                None => Action::None,
                Some(a) => self.action(&a, key("action"))?,
            };
            let dirs = match &s.dirs {
                Some(d) => self.dirs(&key("dirs"), d)?,
                None => global_dirs.clone().unwrap_or_default(),
            };
            let nonempty =
                |v: Option<Spanned<String>>| v.map(|v| v.into_inner()).filter(|v| !v.is_empty());
            let (wave, soak) = self.wave(s, &settings, &key)?;
            let soak_at = s.soak.as_ref().map(|soak| {
                let (line, column) = self.position(soak.span().start);
                Place {
                    path: self.path.to_owned(),
                    line,
                    column,
                    key: key("soak"),
                }
            });
            services.push((
                start,
                Service {
                    machine: machine.into_inner(),
                    name: name.into_inner(),
                    upstream: upstream.into_inner(),
                    branch,
                    mount,
                    default_mount,
                    action,
                    package: nonempty(pick(&s.package, &g.package)),
                    user: nonempty(pick(&s.user, &g.user)),
                    check: self.check(s, &key)?,
                    health: match &s.health {
                        Some(h) => Some(self.health(h, &key("health"))?),
                        None => None,
                    },
                    noop: s.noop.or(g.noop).unwrap_or(false),
                    dirs,
                    wave,
                    soak,
                    soak_at,
                },
            ));
        }
        self.check_unique(&services)?;
        self.check_waves(&services)?;
        settings.upstreams = self.upstreams(&upstreams, &services)?;
        Ok(Config {
            path: self.path.to_owned(),
            settings,
            services: services.into_iter().map(|(_, s)| s).collect(),
            keys: {
                let top: Vec<Key> = match raw.keys {
                    None => Vec::new(),
                    Some(RawTopKeys::List(keys)) => keys
                        .into_iter()
                        .map(|k| Key {
                            path: k.path,
                            ro: k.ro,
                        })
                        .collect(),
                    Some(RawTopKeys::Table(t)) => {
                        let paths = match t.path {
                            RawPaths::One(p) => vec![p],
                            RawPaths::Many(p) => p,
                        };
                        paths
                            .into_iter()
                            .map(|path| Key { path, ro: t.ro })
                            .collect()
                    }
                };
                raw.global
                    .keys
                    .into_iter()
                    .map(|k| Key {
                        path: k.path,
                        ro: k.ro,
                    })
                    .chain(top)
                    .collect()
            },
        })
    }

    fn check(
        &self,
        s: &RawService,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Option<Check>, ConfigError> {
        let timeout = match &s.check_timeout {
            Some(t) => self.duration(t, &key("check_timeout"))?,
            None => DEFAULT_CHECK_TIMEOUT,
        };
        match &s.check {
            None => {
                if let Some(t) = &s.check_timeout {
                    return Err(self.at(
                        t.span().start,
                        key("check_timeout"),
                        "is set but there is no check",
                    ));
                }
                Ok(None)
            }
            Some(c) if c.get_ref().trim().is_empty() => {
                Err(self.at(c.span().start, key("check"), "must not be empty"))
            }
            Some(c) => Ok(Some(Check {
                command: c.get_ref().clone(),
                timeout,
            })),
        }
    }

    /// `wave` and `soak`: a wave needs `[plumb] prometheus` to judge the lower ones by, and a soak
    /// of at least one poll interval (a shorter one could not be seen by the next poll anyway);
    /// a soak without a wave above 0 would be accepted and never used, so it is refused.
    fn wave(
        &self,
        s: &RawService,
        settings: &Settings,
        key: &dyn Fn(&str) -> String,
    ) -> Result<(u32, Duration), ConfigError> {
        let wave = s.wave.as_ref().map_or(0, |w| *w.get_ref());
        if let Some(w) = &s.wave
            && settings.prometheus.is_none()
        {
            return Err(self.at(
                w.span().start,
                key("wave"),
                "needs [plumb] prometheus, whose samples of the lower waves gate this one",
            ));
        }
        let Some(soak) = &s.soak else {
            return Ok((wave, DEFAULT_SOAK.max(settings.interval)));
        };
        if wave == 0 {
            return Err(self.at(
                soak.span().start,
                key("soak"),
                "is set but the service is in wave 0, which waits for nobody (set wave = 1 or more)",
            ));
        }
        let d = self.duration(soak, &key("soak"))?;
        if d < settings.interval {
            return Err(self.at(
                soak.span().start,
                key("soak"),
                format!(
                    "must be at least one poll interval ({})",
                    humantime::format_duration(settings.interval)
                ),
            ));
        }
        Ok((wave, d))
    }

    /// A service in a wave above 0 waits for the machines running the same service from the same
    /// upstream and branch in lower waves; without any, it would wait forever.
    fn check_waves(&self, services: &[(usize, Service)]) -> Result<(), ConfigError> {
        for (i, (start, s)) in services.iter().enumerate() {
            if s.wave == 0
                || services
                    .iter()
                    .any(|(_, o)| o.wave < s.wave && same_rollout(o, s))
            {
                continue;
            }
            return Err(self.at(
                *start,
                format!("services[{i}].wave"),
                format!(
                    "wave {} of service {:?} (branch {:?}) has no machine in a lower wave to wait for",
                    s.wave, s.name, s.branch
                ),
            ));
        }
        Ok(())
    }

    fn health(&self, h: &Spanned<RawHealth>, key: &str) -> Result<Health, ConfigError> {
        let raw = h.get_ref();
        let duration = |v: &Option<Spanned<String>>, field: &str, default: Duration| match v {
            Some(v) => self.duration(v, &format!("{key}.{field}")),
            None => Ok(default),
        };
        let url = match &raw.url {
            Some(u) => {
                http_url(u.get_ref())
                    .map_err(|m| self.at(u.span().start, format!("{key}.url"), m))?;
                Some(u.get_ref().clone())
            }
            None => None,
        };
        let command = match &raw.command {
            Some(c) if c.get_ref().trim().is_empty() => {
                return Err(self.at(
                    c.span().start,
                    format!("{key}.command"),
                    "must not be empty",
                ));
            }
            c => c.as_ref().map(|c| c.get_ref().clone()),
        };
        Ok(Health {
            settle: duration(&raw.settle, "settle", DEFAULT_HEALTH_SETTLE)?,
            command,
            url,
            timeout: duration(&raw.timeout, "timeout", DEFAULT_HEALTH_TIMEOUT)?,
        })
    }

    /// `[[plumb.upstream]]`: each URL once, and one some service of the file uses (a typo would
    /// otherwise silently verify nothing).
    fn upstreams(
        &self,
        raw: &[Spanned<RawUpstream>],
        services: &[(usize, Service)],
    ) -> Result<BTreeMap<String, UpstreamSettings>, ConfigError> {
        let mut out = BTreeMap::new();
        for (i, u) in raw.iter().enumerate() {
            let key = |field: &str| format!("plumb.upstream[{i}].{field}");
            let r = u.get_ref();
            let url = r.url.get_ref().clone();
            if !services.iter().any(|(_, s)| s.upstream == url) {
                return Err(self.at(
                    r.url.span().start,
                    key("url"),
                    format!("{url:?} is not the upstream of any service"),
                ));
            }
            let path = |v: &Option<Spanned<String>>, field: &str| -> Result<_, ConfigError> {
                match v {
                    Some(p) => {
                        self.absolute(p, key(field))?;
                        Ok(Some(PathBuf::from(p.get_ref())))
                    }
                    None => Ok(None),
                }
            };
            let force_push = match &r.force_push {
                None => ForcePush::Follow,
                Some(f) => match f.get_ref().as_str() {
                    "follow" => ForcePush::Follow,
                    "refuse" => ForcePush::Refuse,
                    other => {
                        return Err(self.at(
                            f.span().start,
                            key("force_push"),
                            format!("unknown value {other:?} (expected \"follow\" or \"refuse\")"),
                        ));
                    }
                },
            };
            let settings = UpstreamSettings {
                allowed_signers: path(&r.allowed_signers, "allowed_signers")?,
                keyring: path(&r.keyring, "keyring")?,
                force_push,
            };
            if out.insert(url.clone(), settings).is_some() {
                return Err(self.at(
                    r.url.span().start,
                    key("url"),
                    format!("{url:?} has more than one [[plumb.upstream]]"),
                ));
            }
        }
        Ok(out)
    }

    /// Per machine as written: one name once, one local path once.
    fn check_unique(&self, services: &[(usize, Service)]) -> Result<(), ConfigError> {
        let mut names = BTreeSet::new();
        let mut locals = BTreeMap::new();
        for (i, (start, s)) in services.iter().enumerate() {
            if !names.insert((s.machine.clone(), s.name.clone())) {
                return Err(self.at(
                    *start,
                    format!("services[{i}].service"),
                    format!(
                        "service {:?} is defined twice for machine {:?}",
                        s.name, s.machine
                    ),
                ));
            }
            for (j, d) in s.dirs.iter().enumerate() {
                if let Some(other) =
                    locals.insert((s.machine.clone(), d.local.clone()), s.name.clone())
                {
                    return Err(self.at(
                        *start,
                        format!("services[{i}].dirs[{j}].local"),
                        format!(
                            "{} is already bound by service {other:?} on machine {:?}",
                            d.local.display(),
                            s.machine
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A service name is a systemd unit name (`nginx`, `docker-compose@caddy`, `foo.socket`), a file
    /// name under the state directory, and the instance of `plumb-apply@.service`.
    fn check_name(&self, name: &Spanned<String>, key: String) -> Result<(), ConfigError> {
        check_unit_name(name.get_ref())
            .map_err(|m| self.at(name.span().start, key, format!("{:?} {m}", name.get_ref())))
    }

    fn absolute(&self, v: &Spanned<String>, key: String) -> Result<(), ConfigError> {
        if !Path::new(v.get_ref()).is_absolute() {
            return Err(self.at(
                v.span().start,
                key,
                format!("{:?} must be an absolute path", v.get_ref()),
            ));
        }
        Ok(())
    }

    fn action(&self, a: &Spanned<String>, key: String) -> Result<Action, ConfigError> {
        Ok(match a.get_ref().as_str() {
            "reload" => Action::Reload,
            "restart" => Action::Restart,
            "reload-or-restart" | "try-reload-or-restart" => Action::ReloadOrRestart,
            "" | "none" => Action::None,
            other => {
                return Err(self.at(
                    a.span().start,
                    key,
                    format!("unknown action {other:?} (expected reload, restart, reload-or-restart or none)"),
                ));
            }
        })
    }

    fn dirs(&self, key: &str, raw: &[RawDir]) -> Result<Vec<Dir>, ConfigError> {
        let mut dirs = Vec::new();
        for (j, d) in raw.iter().enumerate() {
            self.absolute(&d.local, format!("{key}[{j}].local"))?;
            let link = normalise_link(d.link.get_ref())
                .map_err(|m| self.at(d.link.span().start, format!("{key}[{j}].link"), m))?;
            dirs.push(Dir {
                local: PathBuf::from(d.local.get_ref()),
                link,
                file: d.file,
                ro: d.ro,
            });
        }
        Ok(dirs)
    }

    fn settings(&self, p: RawPlumb) -> Result<Settings, ConfigError> {
        let mut s = Settings::default();
        if let Some(d) = p.state_dir {
            self.absolute(&d, "plumb.state_dir".into())?;
            s.state_dir = PathBuf::from(d.into_inner());
        }
        if let Some(i) = p.interval {
            s.interval = self.duration(&i, "plumb.interval")?;
            if let Some(problem) = interval_problem(s.interval) {
                return Err(self.at(i.span().start, "plumb.interval".to_owned(), problem));
            }
        }
        if let Some(j) = p.jitter {
            let jitter = self.duration(&j, "plumb.jitter")?;
            s.jitter = Some(jitter);
            if jitter > s.interval / 2 {
                return Err(self.at(
                    j.span().start,
                    "plumb.jitter".to_owned(),
                    "must be at most half of plumb.interval",
                ));
            }
        }
        if let Some(t) = p.fetch_timeout {
            s.fetch_timeout = self.duration(&t, "plumb.fetch_timeout")?;
        }
        if let Some(k) = p.ssh_key {
            self.absolute(&k, "plumb.ssh_key".into())?;
            s.ssh_key = Some(PathBuf::from(k.into_inner()));
        }
        for (i, k) in p.known_hosts.into_iter().enumerate() {
            self.absolute(&k, format!("plumb.known_hosts[{i}]"))?;
            s.known_hosts.push(PathBuf::from(k.into_inner()));
        }
        for (i, h) in p.hosts.into_iter().enumerate() {
            let name = h.get_ref().trim();
            if name.is_empty() || name.chars().any(char::is_whitespace) {
                return Err(self.at(
                    h.span().start,
                    format!("plumb.hosts[{i}]"),
                    format!("{:?} is not a machine name", h.get_ref()),
                ));
            }
            if !s.hosts.iter().any(|x| x == name) {
                s.hosts.push(name.to_owned());
            }
        }
        if let Some(p) = p.socket {
            self.absolute(&p, "plumb.socket".into())?;
            s.socket = PathBuf::from(p.into_inner());
        }
        if let Some(g) = p.admin_group {
            s.admin_group = self.group(g, "plumb.admin_group")?;
        }
        if let Some(g) = p.readonly_group {
            s.readonly_group = self.group(g, "plumb.readonly_group")?;
        }
        if let Some(w) = p.webhook_secret {
            if w.get_ref().len() < 16 {
                return Err(self.at(
                    w.span().start,
                    "plumb.webhook_secret".to_owned(),
                    "must be at least 16 characters",
                ));
            }
            s.webhook_secret = Some(w.into_inner());
        }
        if let Some(f) = p.webhook_secret_file {
            self.absolute(&f, "plumb.webhook_secret_file".into())?;
            if s.webhook_secret.is_some() {
                return Err(self.at(
                    f.span().start,
                    "plumb.webhook_secret_file".to_owned(),
                    "set webhook_secret or webhook_secret_file, not both",
                ));
            }
            s.webhook_secret_file = Some(PathBuf::from(f.into_inner()));
        }
        if let Some(m) = p.max_file_size {
            s.max_file_size = parse_size(m.get_ref())
                .map_err(|e| self.at(m.span().start, "plumb.max_file_size".to_owned(), e))?;
        }
        if let Some(a) = p.metrics_address {
            s.metrics_address = parse_metrics_address(a.get_ref())
                .map_err(|m| self.at(a.span().start, "plumb.metrics_address".to_owned(), m))?;
        }
        s.prometheus = self.prometheus(
            p.prometheus,
            p.prometheus_bearer_token_file,
            p.prometheus_scrape_interval,
        )?;
        Ok(s)
    }

    /// `prometheus` (an http(s) URL), and its token file and scrape interval, which need it.
    fn prometheus(
        &self,
        url: Option<Spanned<String>>,
        token: Option<Spanned<String>>,
        scrape: Option<Spanned<String>>,
    ) -> Result<Option<PrometheusSettings>, ConfigError> {
        let Some(url) = url else {
            for (v, k) in [
                (&token, "plumb.prometheus_bearer_token_file"),
                (&scrape, "plumb.prometheus_scrape_interval"),
            ] {
                if let Some(v) = v {
                    return Err(self.at(
                        v.span().start,
                        k.to_owned(),
                        "is set but there is no plumb.prometheus",
                    ));
                }
            }
            return Ok(None);
        };
        let text = url.get_ref();
        let host = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("https://"))
            .map(|r| r.split('/').next().unwrap_or(""));
        if host.is_none_or(str::is_empty) {
            return Err(self.at(
                url.span().start,
                "plumb.prometheus".to_owned(),
                format!("{text:?} is not an http:// or https:// URL like \"http://prom:9090\""),
            ));
        }
        let bearer_token_file = match &token {
            Some(t) => {
                self.absolute(t, "plumb.prometheus_bearer_token_file".into())?;
                Some(PathBuf::from(t.get_ref()))
            }
            None => None,
        };
        let scrape_interval = match &scrape {
            Some(v) => {
                let d = self.duration(v, "plumb.prometheus_scrape_interval")?;
                if d < Duration::from_secs(1) {
                    return Err(self.at(
                        v.span().start,
                        "plumb.prometheus_scrape_interval".to_owned(),
                        "must be at least 1s",
                    ));
                }
                d
            }
            None => DEFAULT_SCRAPE_INTERVAL,
        };
        Ok(Some(PrometheusSettings {
            url: text.trim_end_matches('/').to_owned(),
            bearer_token_file,
            scrape_interval,
        }))
    }

    /// A unix group name as `groupadd` accepts it: not empty, no `:`, `,`, `/` or whitespace, not
    /// all digits (that would read as a gid).
    fn group(&self, g: Spanned<String>, key: &str) -> Result<String, ConfigError> {
        let name = g.get_ref();
        let bad = name.is_empty()
            || name.starts_with('-')
            || name.chars().all(|c| c.is_ascii_digit())
            || name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || ":,/".contains(c));
        if bad {
            return Err(self.at(
                g.span().start,
                key.to_owned(),
                format!("{name:?} is not a unix group name"),
            ));
        }
        Ok(g.into_inner())
    }

    fn duration(&self, v: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(v.get_ref()).map_err(|e| {
            self.at(
                v.span().start,
                key.to_owned(),
                format!(
                    "{:?} is not a duration like \"90s\" or \"5m\": {e}",
                    v.get_ref()
                ),
            )
        })?;
        if d > MAX_DURATION {
            return Err(self.at(
                v.span().start,
                key.to_owned(),
                format!("{:?} is longer than 100 years", v.get_ref()),
            ));
        }
        Ok(d)
    }
}

/// Whether two services are one rollout: the same service from the same upstream and branch.
pub fn same_rollout(a: &Service, b: &Service) -> bool {
    a.name == b.name && a.upstream == b.upstream && a.branch == b.branch
}

impl Config {
    /// The machines of the waves below `s`'s, as (wave, machine), lowest wave first: those whose
    /// samples gate `s`.
    pub fn lower_waves(&self, s: &Service) -> Vec<(u32, String)> {
        let mut lower: Vec<(u32, String)> = self
            .services
            .iter()
            .filter(|o| o.wave < s.wave && same_rollout(o, s))
            .map(|o| (o.wave, o.machine.clone()))
            .collect();
        lower.sort();
        lower.dedup();
        lower
    }
}

/// Where plumb keeps the last config it accepted: beside `config`, `<name>.accepted`
/// (`/etc/plumb/plumb.toml.accepted`). The generator falls back on it when the config does not
/// load, so a typo never takes the running services' mounts and units away; it lives in /etc
/// because the generator reads nothing else.
pub fn accepted_path(config: &Path) -> PathBuf {
    let mut name = config.file_name().unwrap_or_default().to_owned();
    name.push(".accepted");
    config.with_file_name(name)
}

/// Directories whose files systemd reads as unit files, drop-ins or manager configuration: a
/// change under one of them needs a daemon-reload to take effect.
pub const SYSTEMD_DIRS: [&str; 5] = [
    "/etc/systemd",
    "/run/systemd",
    "/usr/lib/systemd",
    "/lib/systemd",
    "/usr/local/lib/systemd",
];

/// The longest duration any setting takes. plumb schedules with `Instant::now() + duration`,
/// which panics past the clock's range (humantime reads up to u64::MAX seconds); no setting needs
/// anywhere near a century.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Why `interval` cannot be the poll interval, `None` when it can: the config's `plumb.interval`
/// and the command line's `--interval` obey the same rule (0s would poll in a busy loop).
pub fn interval_problem(interval: Duration) -> Option<&'static str> {
    if interval.is_zero() {
        Some("must be more than 0s")
    } else if interval > MAX_DURATION {
        Some("must be at most 100 years")
    } else {
        None
    }
}

/// A size like `"256MiB"`, `"1G"` (binary units: K, M, G, with or without `iB`; `KB`, `MB`, `GB`
/// are decimal), a plain number of bytes, or `"unlimited"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t == "unlimited" {
        return Ok(u64::MAX);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit_factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "{text:?} is not a size like \"256MiB\", \"1G\" or \"unlimited\""
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_factor))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a size like \"256MiB\", \"1G\" or \"unlimited\""))
}

/// Checks a health URL: plumb speaks plain HTTP to local services itself; anything else belongs in
/// a health `command` (`curl -fsS https://...`).
fn http_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "{url:?} is not an http:// URL (for https or anything else, use health.command, e.g. \"curl -fsS https://...\")"
        ));
    };
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

/// Why `name` cannot be a service: systemd's unit name characters only, at most one `@`, and a
/// template (`foo@`) only with an instance, since a template itself cannot run. The message
/// follows the quoted name.
fn check_unit_name(name: &str) -> Result<(), String> {
    if name == "." || name == ".." {
        return Err("is not a usable service name".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ":_.-@".contains(*c)))
    {
        return Err(format!(
            "is not a systemd unit name: {c:?} is not allowed (letters, digits and \":_.-@\" are)"
        ));
    }
    let unit = unit_name(name);
    let (stem, suffix) = unit.rsplit_once('.').unwrap_or((&unit, ""));
    if matches!(name.rsplit_once('.'), Some((_, "device" | "scope"))) {
        return Err(format!(
            "is not a unit plumb can manage: systemd does not start .{} units by name",
            name.rsplit_once('.').map(|(_, t)| t).unwrap_or_default()
        ));
    }
    if stem.is_empty() {
        return Err(format!("has no name before .{suffix}"));
    }
    match stem.split_once('@') {
        Some((_, instance)) if instance.contains('@') => {
            return Err("has more than one '@'".into());
        }
        Some(("", _)) => return Err("has no name before '@'".into()),
        Some((_, "")) => {
            return Err(
                "is a template without an instance; name the instance (\"foo@bar\")".into(),
            );
        }
        _ => {}
    }
    let longest = name.len() + APPLY_UNIT_OVERHEAD;
    if longest > UNIT_NAME_MAX {
        return Err(format!(
            "is too long: plumb-apply@{name}.service would be {longest} characters, systemd allows {UNIT_NAME_MAX}"
        ));
    }
    Ok(())
}

/// Checks a `link` and returns it in the one form plumb compares paths in: relative, `/`-separated,
/// no `.` or empty components, no trailing `/`. `..` and absolute paths are refused: a link must stay
/// inside the repository.
pub fn normalise_link(link: &str) -> Result<String, String> {
    if link.is_empty() {
        return Err("must not be empty".into());
    }
    let p = Path::new(link);
    if p.is_absolute() {
        return Err(format!("{link:?} must be relative to the repository root"));
    }
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => match s.to_str() {
                Some(".git") => return Err(format!("{link:?} must not point into .git")),
                Some(s) => parts.push(s),
                None => return Err(format!("{link:?} is not valid UTF-8")),
            },
            Component::CurDir => {}
            Component::ParentDir => return Err(format!("{link:?} must not contain '..'")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{link:?} must be relative to the repository root"));
            }
        }
    }
    if parts.is_empty() {
        return Err(format!(
            "{link:?} names the whole repository; name a directory or file in it"
        ));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("plumb.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text)
            .expect_err("config should be refused")
            .to_string()
    }

    /// gitopper's sample config, as shipped with it, must mean the same here.
    const GITOPPER_SAMPLE: &str = r#"[global]
upstream = "https://github.com/miekg/gitopper-config"
branch = "main"
mount = "/tmp/gitopper"
keys = [
	{ path = "keys/miek_id_ed25519_gitopper.pub", ro = true },
	{ path = "/local/home/miek/.ssh/id_ed25519_gitopper.pub"},
]

[[services]]
machine = "localhost"
service = "prometheus"
user = "prometheus"
package = "prometheus"
action = "reload"
dirs = [
	{ local = "/etc/prometheus", link = "prometheus/etc" },
]

# docker compose needs to work with systemd template files
[[services]]
machine = "docker-test"
service = "docker-compose@caddy"
user = "docker"
#package = "docker-compose"
action = "reload"
dirs = [
	{ local = "/tmp/docker-compose.yml", link = "docker-compose/caddy/docker-compose.yml", file = true },
]
"#;

    #[test]
    fn gitopper_sample_is_accepted_unchanged() {
        let c = parse(GITOPPER_SAMPLE).unwrap();
        assert_eq!(c.services.len(), 2);
        let p = &c.services[0];
        assert_eq!(p.name, "prometheus");
        assert_eq!(p.upstream, "https://github.com/miekg/gitopper-config");
        assert_eq!(p.branch, "main");
        assert_eq!(p.mount, PathBuf::from("/tmp/gitopper"));
        assert_eq!(p.checkout_dir(), PathBuf::from("/tmp/gitopper/prometheus"));
        assert_eq!(p.action, Action::Reload);
        assert_eq!(p.user.as_deref(), Some("prometheus"));
        assert_eq!(p.dirs[0].link, "prometheus/etc");
        let d = &c.services[1];
        assert!(d.dirs[0].file);
        assert_eq!(d.package, None);
        assert_eq!(c.keys.len(), 2);
        assert!(c.keys[0].ro);
        assert_eq!(c.settings, Settings::default());
    }

    #[test]
    fn gitoppers_early_top_level_keys_are_accepted_and_ignored() {
        let services =
            "[global]\nupstream = \"u\"\n[[services]]\nmachine = \"m\"\nservice = \"a\"\n";
        let tables = parse(&format!(
            "{services}\n[[keys]]\npath = \"keys/a.pub\"\nro = true\n\n[[keys]]\npath = \"keys/b.pub\"\n"
        ))
        .unwrap();
        assert_eq!(
            tables.keys,
            [
                Key {
                    path: "keys/a.pub".into(),
                    ro: true
                },
                Key {
                    path: "keys/b.pub".into(),
                    ro: false
                }
            ]
        );
        assert_eq!(tables.services.len(), 1);
        let list = parse(&format!(
            "{services}\n[keys]\npath = [\"keys/a.pub\", \"keys/b.pub\"]\n"
        ))
        .unwrap();
        assert_eq!(list.keys.len(), 2);
        assert_eq!(list.keys[1].path, "keys/b.pub");
        let one = parse(&format!("{services}\n[keys]\npath = \"keys/a.pub\"\n")).unwrap();
        assert_eq!(one.keys.len(), 1);
        // Anything else under keys is still refused, with where and what.
        let e = err(&format!("{services}\n[keys]\npaths = [\"x\"]\n"));
        assert!(
            e.contains("keys: expected gitopper's [[keys]] tables"),
            "{e}"
        );
    }

    #[test]
    fn global_values_are_inherited_including_the_ones_gitopper_drops() {
        let c = parse(
            r#"
[global]
upstream = "git://h/r.git"
user = "www"
action = "restart"
package = "nginx"
machine = "m1"
dirs = [{ local = "/etc/x", link = "x" }]
[[services]]
service = "a"
[[services]]
service = "b"
machine = "m2"
action = "reload"
branch = "canary"
dirs = [{ local = "/etc/y", link = "y/" }]
"#,
        )
        .unwrap();
        let a = &c.services[0];
        assert_eq!(
            (
                a.machine.as_str(),
                a.user.as_deref(),
                a.action,
                a.package.as_deref()
            ),
            ("m1", Some("www"), Action::Restart, Some("nginx"))
        );
        assert_eq!(a.dirs[0].local, PathBuf::from("/etc/x"));
        assert_eq!(a.branch, "main");
        assert_eq!(a.mount, PathBuf::from("/var/lib/plumb/checkouts"));
        let b = &c.services[1];
        assert_eq!(
            (b.machine.as_str(), b.action, b.branch.as_str()),
            ("m2", Action::Reload, "canary")
        );
        assert_eq!(b.dirs[0].link, "y");
    }

    #[test]
    fn plumb_settings() {
        let c = parse(
            r#"
[plumb]
state_dir = "/srv/plumb"
interval = "30s"
fetch_timeout = "10s"
known_hosts = ["/etc/plumb/known_hosts"]
[[services]]
machine = "m"
service = "a"
upstream = "file:///r"
"#,
        )
        .unwrap();
        assert_eq!(c.settings.interval, Duration::from_secs(30));
        assert_eq!(
            c.settings.jitter_for(c.settings.interval),
            Duration::from_secs(3)
        );
        assert_eq!(c.settings.fetch_timeout, Duration::from_secs(10));
        assert_eq!(c.services[0].mount, PathBuf::from("/srv/plumb/checkouts"));
    }

    #[test]
    fn the_default_jitter_follows_the_interval_in_use() {
        let default = parse("").unwrap().settings;
        // `--interval 2s` over the default 5m: a tenth of 2s, not half of it.
        assert_eq!(
            default.jitter_for(Duration::from_secs(2)),
            Duration::from_millis(200)
        );
        assert_eq!(
            default.jitter_for(default.interval),
            Duration::from_secs(30)
        );
        // A jitter the config sets stays, but never more than half the interval in use.
        let set = parse("[plumb]\ninterval = \"1m\"\njitter = \"20s\"\n")
            .unwrap()
            .settings;
        assert_eq!(set.jitter_for(set.interval), Duration::from_secs(20));
        assert_eq!(
            set.jitter_for(Duration::from_secs(10)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn a_state_dir_given_later_moves_the_default_checkouts_only() {
        let mut c = parse(
            r#"
[[services]]
machine = "m"
service = "a"
upstream = "file:///r"
[[services]]
machine = "m"
service = "b"
upstream = "file:///r"
mount = "/srv/checkouts"
"#,
        )
        .unwrap();
        assert_eq!(
            c.services[0].checkout_dir(),
            PathBuf::from("/var/lib/plumb/checkouts/a")
        );
        c.use_state_dir(Path::new("/tmp/plumb-test"));
        assert_eq!(c.settings.state_dir, PathBuf::from("/tmp/plumb-test"));
        assert_eq!(
            c.services[0].checkout_dir(),
            PathBuf::from("/tmp/plumb-test/checkouts/a")
        );
        assert_eq!(
            c.services[1].checkout_dir(),
            PathBuf::from("/srv/checkouts/b")
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e =
            err("[global]\nupstream = \"x\"\n\n[[services]]\nmachine = \"m\"\nservcie = \"a\"\n");
        assert!(
            e.starts_with("plumb.toml:6:1: servcie: unknown field `servcie`"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = err("[[services]]\nmachine = \"m\"\nservice = \"a\"\nupstream = 3\n");
        assert!(
            e.starts_with("plumb.toml:4:12: upstream: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn missing_required_fields() {
        assert!(
            err("[[services]]\nservice = \"a\"\nupstream = \"u\"\n")
                .contains("services[0].machine: missing")
        );
        assert!(
            err("[[services]]\nmachine = \"m\"\nupstream = \"u\"\n")
                .contains("services[0].service: missing")
        );
        assert!(
            err("[[services]]\nmachine = \"m\"\nservice = \"a\"\n")
                .contains("services[0].upstream: missing")
        );
        assert!(
            err("[[services]]\nmachine = \"\"\nservice = \"a\"\nupstream = \"u\"\n")
                .starts_with("plumb.toml:2:11: services[0].machine: must not be empty")
        );
    }

    #[test]
    fn local_must_be_absolute_and_link_must_stay_inside() {
        let svc = |dirs: &str| {
            format!(
                "[[services]]\nmachine = \"m\"\nservice = \"a\"\nupstream = \"u\"\ndirs = [{dirs}]\n"
            )
        };
        let e = err(&svc(r#"{ local = "etc/x", link = "x" }"#));
        assert!(
            e.starts_with(
                "plumb.toml:5:19: services[0].dirs[0].local: \"etc/x\" must be an absolute path"
            ),
            "{e}"
        );
        let e = err(&svc(r#"{ local = "/etc/x", link = "/x" }"#));
        assert!(
            e.contains("services[0].dirs[0].link: \"/x\" must be relative"),
            "{e}"
        );
        let e = err(&svc(r#"{ local = "/etc/x", link = "a/../../x" }"#));
        assert!(e.contains("must not contain '..'"), "{e}");
    }

    #[test]
    fn duplicates_on_one_machine_are_refused() {
        let e = err(
            "[global]\nupstream = \"u\"\nmachine = \"m\"\n[[services]]\nservice = \"a\"\n[[services]]\nservice = \"a\"\n",
        );
        assert!(
            e.contains("services[1].service: service \"a\" is defined twice for machine \"m\""),
            "{e}"
        );
        let e = err(
            "[global]\nupstream = \"u\"\nmachine = \"m\"\n[[services]]\nservice = \"a\"\ndirs = [{ local = \"/etc/x\", link = \"a\" }]\n[[services]]\nservice = \"b\"\ndirs = [{ local = \"/etc/x/\", link = \"b\" }]\n",
        );
        assert!(
            e.contains("services[1].dirs[0].local: /etc/x/ is already bound by service \"a\""),
            "{e}"
        );
        // The same name on two machines is the normal case.
        parse("[global]\nupstream = \"u\"\n[[services]]\nmachine = \"m1\"\nservice = \"a\"\n[[services]]\nmachine = \"m2\"\nservice = \"a\"\n").unwrap();
    }

    #[test]
    fn selection_by_hostname_and_aliases() {
        let c = parse("[global]\nupstream = \"u\"\n[[services]]\nmachine = \"m1\"\nservice = \"a\"\n[[services]]\nmachine = \"m2\"\nservice = \"b\"\n[[services]]\nmachine = \"m3\"\nservice = \"a\"\n").unwrap();
        let names = |hosts: &[&str]| {
            let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
            c.select(&hosts)
                .map(|v| v.into_iter().map(|s| s.name).collect::<Vec<_>>())
        };
        assert_eq!(names(&["m1"]).unwrap(), vec!["a"]);
        assert_eq!(names(&["m1", "m2"]).unwrap(), vec!["a", "b"]);
        assert!(names(&["nope"]).unwrap().is_empty());
        let e = names(&["m1", "m3"]).unwrap_err().to_string();
        assert!(
            e.contains("service \"a\" is configured for both machine \"m1\" and machine \"m3\""),
            "{e}"
        );
    }

    #[test]
    fn bad_values_in_plumb_table() {
        assert!(
            err("[plumb]\ninterval = \"soon\"\n")
                .starts_with("plumb.toml:2:12: plumb.interval: \"soon\" is not a duration")
        );
        assert!(
            err("[plumb]\ninterval = \"10s\"\njitter = \"6s\"\n")
                .contains("plumb.jitter: must be at most half")
        );
        assert!(err("[[services]]\nmachine = \"m\"\nservice = \"a\"\nupstream = \"u\"\naction = \"bounce\"\n").contains("unknown action \"bounce\""));
        assert!(
            err("[[services]]\nmachine = \"m\"\nservice = \"a/b\"\nupstream = \"u\"\n")
                .contains("\"a/b\" is not a systemd unit name: '/' is not allowed")
        );
    }

    fn service(name: &str) -> Result<Service, String> {
        let text = format!("[[services]]\nmachine = \"m\"\nupstream = \"u\"\nservice = {name:?}\n");
        parse(&text)
            .map(|c| c.services[0].clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn service_names_are_systemd_unit_names() {
        for (name, unit) in [
            ("nginx", "nginx.service"),
            ("nginx.service", "nginx.service"),
            ("docker-compose@caddy", "docker-compose@caddy.service"),
            ("foo.socket", "foo.socket"),
            ("backup@db.timer", "backup@db.timer"),
            ("my_app:2.1", "my_app:2.1.service"),
            ("foo.conf", "foo.conf.service"),
        ] {
            assert_eq!(service(name).unwrap().unit(), unit, "{name}");
        }
        for (name, why) in [
            ("foo@", "is a template without an instance"),
            ("foo@.service", "is a template without an instance"),
            ("foo@.socket", "is a template without an instance"),
            ("@foo", "has no name before '@'"),
            ("a@b@c", "has more than one '@'"),
            (".service", "has no name before .service"),
            ("sda.device", "systemd does not start .device units"),
            ("x.scope", "systemd does not start .scope units"),
            ("nginx web", "' ' is not allowed"),
            ("caf\u{e9}", "'\u{e9}' is not allowed"),
            ("a\\x2d", "'\\\\' is not allowed"),
            ("..", "is not a usable service name"),
        ] {
            let e = service(name).expect_err(name);
            assert!(e.contains(why), "{name}: {e}");
            assert!(
                e.starts_with("plumb.toml:4:11: services[0].service: "),
                "{e}"
            );
        }
        let longest = "x".repeat(UNIT_NAME_MAX - "plumb-apply@.service".len());
        service(&longest).unwrap();
        let e = service(&format!("{longest}x")).unwrap_err();
        assert!(e.contains("is too long: plumb-apply@"), "{e}");
    }

    #[test]
    fn hosts_setting_and_machine_names() {
        let c = parse(
            "[plumb]\nhosts = [\"web\", \"edge\", \"web\"]\n[[services]]\nmachine = \"edge\"\nservice = \"a\"\nupstream = \"u\"\n",
        )
        .unwrap();
        assert_eq!(c.settings.hosts, vec!["web", "edge"]);
        let names = c.machine_names(&["cli".to_owned(), "web".to_owned()]);
        let hostname = machine_names(&[]);
        assert_eq!(names[..hostname.len()], hostname[..]);
        assert_eq!(names[hostname.len()..], ["web", "edge", "cli"]);
        assert_eq!(c.select(&names).unwrap().len(), 1);
        assert!(
            err("[plumb]\nhosts = [\"a\", \" \"]\n")
                .starts_with("plumb.toml:2:15: plumb.hosts[1]: \" \" is not a machine name")
        );
        assert!(err("[plumb]\nhosts = \"web\"\n").contains("hosts: invalid type"));
    }

    #[test]
    fn read_only_dirs() {
        let c = parse(
            "[global]\ndirs = [{ local = \"/etc/x\", link = \"x\", ro = true }, { local = \"/etc/y\", link = \"y\" }]\n[[services]]\nmachine = \"m\"\nservice = \"a\"\nupstream = \"u\"\n",
        )
        .unwrap();
        let ro: Vec<bool> = c.services[0].dirs.iter().map(|d| d.ro).collect();
        assert_eq!(ro, [true, false]);
        assert!(
            err("[[services]]\nmachine = \"m\"\nservice = \"a\"\nupstream = \"u\"\ndirs = [{ local = \"/x\", link = \"x\", ro = \"yes\" }]\n")
                .contains("5:42: dirs: invalid type: string \"yes\", expected a boolean")
        );
    }

    #[test]
    fn api_settings() {
        let c = parse("[plumb]\n").unwrap();
        assert_eq!(c.settings.socket, PathBuf::from("/run/plumb/plumb.sock"));
        assert_eq!(c.settings.admin_group, "plumb");
        assert_eq!(c.settings.readonly_group, "plumb-ro");
        let c = parse(
            "[plumb]\nsocket = \"/srv/p.sock\"\nadmin_group = \"ops\"\nreadonly_group = \"ops-ro\"\n",
        )
        .unwrap();
        assert_eq!(c.settings.socket, PathBuf::from("/srv/p.sock"));
        assert_eq!(c.settings.admin_group, "ops");
        assert_eq!(c.settings.readonly_group, "ops-ro");
        assert!(
            err("[plumb]\nsocket = \"p.sock\"\n")
                .starts_with("plumb.toml:2:10: plumb.socket: \"p.sock\" must be an absolute path")
        );
        for bad in ["", "a b", "a:b", "123", "-x"] {
            let e = err(&format!("[plumb]\nadmin_group = {bad:?}\n"));
            assert!(
                e.starts_with(&format!(
                    "plumb.toml:2:15: plumb.admin_group: {bad:?} is not a unix group name"
                )),
                "{e}"
            );
        }
        assert!(err("[plumb]\nreadonly_group = 7\n").contains("readonly_group: invalid type"));
    }

    #[test]
    fn metrics_address() {
        assert_eq!(
            parse_metrics_address(":9222").unwrap(),
            Some(DEFAULT_METRICS_ADDRESS)
        );
        assert_eq!(parse_metrics_address("").unwrap(), None);
        assert_eq!(
            parse_metrics_address("127.0.0.1:9100")
                .unwrap()
                .unwrap()
                .port(),
            9100
        );
        assert!(err("[plumb]\nmetrics_address = \"nine\"\n").contains("plumb.metrics_address"));
    }

    #[test]
    fn link_normalisation() {
        assert_eq!(normalise_link("./a//b/").unwrap(), "a/b");
        assert!(normalise_link(".").is_err());
        assert!(normalise_link(".git/config").is_err());
        assert!(normalise_link("").is_err());
    }

    const SAFE: &str = r#"
[[plumb.upstream]]
url = "https://git.example.org/ops.git"
allowed_signers = "/etc/plumb/allowed_signers"
force_push = "refuse"

[[services]]
machine = "web1"
service = "nginx"
upstream = "https://git.example.org/ops.git"
check = "nginx -t -q -c {dir}/nginx.conf"
dirs = [{ local = "/etc/nginx", link = "nginx/etc" }]
health = { url = "http://127.0.0.1:8080/healthz" }
"#;

    #[test]
    fn check_health_and_upstream_settings_with_their_defaults() {
        let c = parse(SAFE).unwrap();
        let s = &c.services[0];
        assert_eq!(
            s.check,
            Some(Check {
                command: "nginx -t -q -c {dir}/nginx.conf".into(),
                timeout: DEFAULT_CHECK_TIMEOUT
            })
        );
        assert_eq!(
            s.health,
            Some(Health {
                settle: DEFAULT_HEALTH_SETTLE,
                command: None,
                url: Some("http://127.0.0.1:8080/healthz".into()),
                timeout: DEFAULT_HEALTH_TIMEOUT
            })
        );
        let u = c.settings.upstream("https://git.example.org/ops.git");
        assert!(u.verifies());
        assert_eq!(u.force_push, ForcePush::Refuse);
        assert_eq!(u.keyring, None);
        // Another upstream gets the defaults: no signatures, force-pushes followed.
        let other = c.settings.upstream("https://elsewhere.example/x.git");
        assert!(!other.verifies());
        assert_eq!(other.force_push, ForcePush::Follow);
    }

    const WAVES: &str = r#"[plumb]
interval = "1m"
prometheus = "http://prom.example:9090/"
prometheus_scrape_interval = "15s"

[global]
upstream = "https://git.example.org/ops.git"

[[services]]
machine = "web1"
service = "nginx"

[[services]]
machine = "web2"
service = "nginx"
wave = 1
soak = "10m"

[[services]]
machine = "web3"
service = "nginx"
wave = 3
"#;

    #[test]
    fn waves_soak_and_prometheus() {
        let c = parse(WAVES).unwrap();
        let p = c.settings.prometheus.clone().unwrap();
        assert_eq!(p.url, "http://prom.example:9090");
        assert_eq!(p.scrape_interval, Duration::from_secs(15));
        let waves: Vec<(u32, Duration)> = c.services.iter().map(|s| (s.wave, s.soak)).collect();
        assert_eq!(
            waves,
            [
                (0, DEFAULT_SOAK),
                (1, Duration::from_secs(600)),
                (3, DEFAULT_SOAK)
            ]
        );
        // Gaps are fine: wave 3 waits for waves 0 and 1.
        assert_eq!(
            c.lower_waves(&c.services[2]),
            [(0, "web1".to_owned()), (1, "web2".to_owned())]
        );
        assert!(c.lower_waves(&c.services[0]).is_empty());
        // Another branch is another rollout.
        let other = WAVES.replacen(
            "machine = \"web1\"\n",
            "machine = \"web1\"\nbranch = \"next\"\n",
            1,
        );
        let e = err(&other);
        assert_eq!(
            e,
            "plumb.toml:14:1: services[1].wave: wave 1 of service \"nginx\" (branch \"main\") has no machine in a lower wave to wait for"
        );
        // A wave needs Prometheus.
        let e = err(&WAVES.replace(
            "prometheus = \"http://prom.example:9090/\"\nprometheus_scrape_interval = \"15s\"\n",
            "",
        ));
        assert_eq!(
            e,
            "plumb.toml:14:8: services[1].wave: needs [plumb] prometheus, whose samples of the lower waves gate this one"
        );
        // A soak of less than one poll interval, or where nothing waits.
        let e = err(&WAVES.replace("soak = \"10m\"", "soak = \"30s\""));
        assert_eq!(
            e,
            "plumb.toml:17:8: services[1].soak: must be at least one poll interval (1m)"
        );
        let e = err(&WAVES.replace(
            "service = \"nginx\"\n\n[[services]]\nmachine = \"web2\"",
            "service = \"nginx\"\nsoak = \"1h\"\n\n[[services]]\nmachine = \"web2\"",
        ));
        assert!(
            e.starts_with("plumb.toml:12:8: services[0].soak: is set but the service is in wave 0"),
            "{e}"
        );
        let e = err(&WAVES.replace("http://prom.example:9090/", "prom:9090"));
        assert!(
            e.starts_with("plumb.toml:3:14: plumb.prometheus: \"prom:9090\" is not an http"),
            "{e}"
        );
        let e = err("[plumb]\nprometheus_bearer_token_file = \"/etc/plumb/token\"\n");
        assert_eq!(
            e,
            "plumb.toml:2:32: plumb.prometheus_bearer_token_file: is set but there is no plumb.prometheus"
        );
    }

    /// `--interval` is held to the soaks of this machine's services as `plumb.interval` is to
    /// every service's: a soak set shorter is refused where it is set; a default one grows.
    #[test]
    fn a_soak_shorter_than_the_command_lines_interval_is_refused_where_it_is_set() {
        let c = Config::parse(Path::new("plumb.toml"), WAVES).unwrap();
        let mut services = c.services.clone();
        for s in &mut services {
            s.poll_every(Duration::from_secs(600)).unwrap();
        }
        let soaks: Vec<Duration> = services.iter().map(|s| s.soak).collect();
        assert_eq!(
            soaks,
            [
                DEFAULT_SOAK,
                Duration::from_secs(600),
                Duration::from_secs(600)
            ]
        );
        let mut services = c.services.clone();
        let e = services[1]
            .poll_every(Duration::from_secs(900))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "plumb.toml:17:8: services[1].soak: 10m must be at least one poll interval (15m from \
             --interval); set a longer soak or a shorter --interval"
        );
        // Wave 0 waits for nobody: any interval.
        services[0].poll_every(Duration::from_secs(3600)).unwrap();
        assert_eq!(services[0].soak, DEFAULT_SOAK);
        assert_eq!(services[2].soak_at, None);
    }

    #[test]
    fn bad_safety_settings_name_their_key_and_line() {
        let https = SAFE.replace("http://127.0.0.1:8080", "https://127.0.0.1:8080");
        let e = err(&https);
        assert!(
            e.starts_with("plumb.toml:13:18: services[0].health.url: \"https://127.0.0.1:8080/healthz\" is not an http:// URL"),
            "{e}"
        );
        let e = err(&SAFE.replace("force_push = \"refuse\"", "force_push = \"never\""));
        assert_eq!(
            e,
            "plumb.toml:5:14: plumb.upstream[0].force_push: unknown value \"never\" (expected \"follow\" or \"refuse\")"
        );
        let e = err(&SAFE.replace(
            "url = \"https://git.example.org/ops.git\"",
            "url = \"https://git.example.org/opz.git\"",
        ));
        assert_eq!(
            e,
            "plumb.toml:3:7: plumb.upstream[0].url: \"https://git.example.org/opz.git\" is not the upstream of any service"
        );
        let e = err(&SAFE.replace("allowed_signers = \"/etc", "allowed_signers = \"etc"));
        assert!(e.contains("plumb.upstream[0].allowed_signers: \"etc/plumb/allowed_signers\" must be an absolute path"), "{e}");
        let e = err(&SAFE.replace(
            "check = \"nginx -t -q -c {dir}/nginx.conf\"",
            "check_timeout = \"5s\"",
        ));
        assert!(
            e.ends_with("services[0].check_timeout: is set but there is no check"),
            "{e}"
        );
        let e = err(&SAFE.replace("health = { url", "health = { settle = \"soon\", url"));
        assert!(
            e.contains("services[0].health.settle: \"soon\" is not a duration"),
            "{e}"
        );
        let e = err(&SAFE.replace("health = { url", "health = { retries = 3, url"));
        assert!(e.contains("unknown field `retries`"), "{e}");
        let twice = SAFE.replacen(
            "[[services]]",
            "[[plumb.upstream]]\nurl = \"https://git.example.org/ops.git\"\n\n[[services]]",
            1,
        );
        assert!(
            err(&twice).ends_with("has more than one [[plumb.upstream]]"),
            "{}",
            err(&twice)
        );
    }

    #[test]
    fn sizes_in_binary_and_decimal_units() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("10 KB"), Ok(10_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("unlimited"), Ok(u64::MAX));
        for bad in ["", "0", "MiB", "1.5G", "1T", "99999999999999999999G", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        let e = err("[plumb]\nmax_file_size = \"lots\"\n");
        assert_eq!(
            e,
            "plumb.toml:2:17: plumb.max_file_size: \"lots\" is not a size like \"256MiB\", \"1G\" or \"unlimited\""
        );
        assert_eq!(
            parse("[plumb]\nmax_file_size = \"1GiB\"\n")
                .unwrap()
                .settings
                .max_file_size,
            1 << 30
        );
    }

    #[test]
    fn the_webhook_secret_from_its_own_file() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("secret");
        std::fs::write(&file, "0123456789abcdefXYZ\n").unwrap();
        let text = format!("[plumb]\nwebhook_secret_file = {:?}\n", file);
        let c = Config::parse(Path::new("plumb.toml"), &text).unwrap();
        assert_eq!(
            c.settings.webhook_secret().unwrap().as_deref(),
            Some("0123456789abcdefXYZ")
        );
        std::fs::write(&file, "short\n").unwrap();
        let e = c.settings.webhook_secret().unwrap_err().to_string();
        assert!(e.contains("secret") && e.contains("16 characters"), "{e}");
        std::fs::remove_file(&file).unwrap();
        assert!(c.settings.webhook_secret().is_err());
        let both = format!("{text}webhook_secret = \"0123456789abcdefXYZ\"\n");
        let e = Config::parse(Path::new("plumb.toml"), &both)
            .unwrap_err()
            .to_string();
        assert!(e.contains("plumb.toml:2:") && e.contains("not both"), "{e}");
        let relative = "[plumb]\nwebhook_secret_file = \"secret\"\n";
        assert!(Config::parse(Path::new("plumb.toml"), relative).is_err());
    }
}

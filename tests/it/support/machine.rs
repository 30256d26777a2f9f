//! The ONE way the tests run plumb's daemon, in two shapes:
//! - [`Machine`] and [`Daemon`]: the real `plumb` binary as a child process, on a config, a state
//!   directory, an API socket and a log under a test root; killed and reaped when dropped;
//! - [`InProcess`]: the daemon (and, if asked, its control API) in this process on a runtime of
//!   its own, for tests that call the daemon's [`Handle`] or must hold the API's socket; stopped
//!   when dropped.
//!
//! Neither uses a fixed port or the default socket: a metrics listener, where a test wants one, is
//! `127.0.0.1:0` and its port is read back from the kernel ([`Daemon::metrics_port`]).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use plumb::config::Config;
use plumb::daemon::{self, CommandError, Handle};
use plumb::proto::{ActionResult, DiffResult, ServiceStatus};
use tokio_util::sync::CancellationToken;

use super::{DEADLINE, wait_until};

/// The machine name every test config uses (`--hosts testbox`).
pub const HOST: &str = "testbox";

/// A metrics listener the kernel gives a free port to: `metrics_address = "127.0.0.1:0"` (or
/// `--metrics-address`), its port read back with [`Daemon::metrics_port`]. No port is picked
/// before the daemon binds it, so no other process can take it in between.
pub const ANY_METRICS_PORT: &str = "metrics_address = \"127.0.0.1:0\"\n";

/// A machine: its config file, state directory, API socket and log, under a test root.
pub struct Machine {
    pub config: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    /// The daemon's stdout and stderr (debug log), appended to by every [`Machine::spawn`].
    pub log: PathBuf,
}

impl Machine {
    /// The paths of a machine under `root`, with no config written: `root/plumb.toml`,
    /// `root/state`, `root/plumb.sock`, `root/plumb.log`.
    pub fn at(root: &Path) -> Machine {
        let root = std::path::absolute(root).unwrap();
        Machine {
            config: root.join("plumb.toml"),
            state: root.join("state"),
            socket: root.join("plumb.sock"),
            log: root.join("plumb.log"),
        }
    }

    /// A machine under `root` whose config holds `services` (see [`Machine::write_config`]).
    pub fn new(root: &Path, services: &str) -> Machine {
        Machine::with_settings(root, "", services)
    }

    /// A machine under `root` whose config holds `settings` and `services` (see
    /// [`Machine::write_config_with`]).
    pub fn with_settings(root: &Path, settings: &str, services: &str) -> Machine {
        let m = Machine::at(root);
        m.write_config_with(settings, services);
        m
    }

    /// Writes the config: `services` after a `[plumb]` table naming this machine's paths.
    pub fn write_config(&self, services: &str) {
        self.write_config_with("", services)
    }

    /// The same, with more `[plumb]` settings. Unless they name their own: a 1 s interval, and no
    /// metrics listener (the default, every address' port 9222, may be anyone's).
    pub fn write_config_with(&self, settings: &str, services: &str) {
        let interval = if settings.contains("interval") {
            ""
        } else {
            "interval = \"1s\"\n"
        };
        let metrics = if settings.contains("metrics_address") {
            ""
        } else {
            "metrics_address = \"\"\n"
        };
        // The test's own user may change services through the API, root or not.
        let admin = if settings.contains("admin_group") {
            String::new()
        } else {
            format!("admin_group = {:?}\n", own_group())
        };
        let text = format!(
            "[plumb]\nstate_dir = {:?}\nsocket = {:?}\n{interval}{metrics}{admin}{settings}\n{services}",
            self.state, self.socket
        );
        fs::write(&self.config, text).unwrap();
    }

    /// `plumb -c CONFIG --hosts testbox`, logging at debug, as argv.
    pub fn args(&self) -> Vec<String> {
        vec![
            env!("CARGO_BIN_EXE_plumb").to_owned(),
            "-c".to_owned(),
            self.config.display().to_string(),
            "--hosts".to_owned(),
            HOST.to_owned(),
        ]
    }

    /// [`Machine::args`] as a command, to add arguments to (`--once`, `--noop`, ...).
    pub fn command(&self) -> Command {
        let argv = self.args();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).env("PLUMB_LOG", "debug");
        cmd
    }

    /// The long-running daemon on this machine's config; its output goes to [`Machine::log`].
    pub fn spawn(&self) -> Daemon {
        self.spawn_with(&self.args())
    }

    /// Runs `argv` (the daemon with more arguments, or a wrapper that becomes it) with its stdout
    /// and stderr appended to the machine's log; killed when the handle drops.
    pub fn spawn_with(&self, argv: &[String]) -> Daemon {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("PLUMB_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?}: {e}"));
        Daemon(child)
    }

    /// `plumb --once`, asserting its exit status.
    pub fn once(&self, expect_success: bool) -> Output {
        let out = self.command().arg("--once").output().unwrap();
        assert_eq!(
            out.status.success(),
            expect_success,
            "plumb --once exited {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The `.rev` file of `service`, trimmed.
    pub fn rev(&self, service: &str) -> Option<String> {
        read_rev(&self.state, service)
    }

    /// The inode of the `.rev` file: a rewrite (even with the same content) gives a new one, and
    /// systemd's path unit would fire on it.
    pub fn rev_inode(&self, service: &str) -> u64 {
        fs::metadata(self.state.join("state").join(format!("{service}.rev")))
            .unwrap()
            .ino()
    }

    pub fn state_json(&self, service: &str) -> serde_json::Value {
        let text =
            fs::read_to_string(self.state.join("state").join(format!("{service}.json"))).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    pub fn checkout(&self, service: &str) -> PathBuf {
        self.state.join("checkouts").join(service)
    }

    /// A file of `service`'s checkout, `None` while it is not there.
    pub fn read(&self, service: &str, path: &str) -> Option<String> {
        fs::read_to_string(self.checkout(service).join(path)).ok()
    }

    /// The object stores, sorted.
    pub fn stores(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.state.join("stores"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    /// The service as the API shows it, `None` while the daemon does not answer.
    pub fn status(&self, service: &str) -> Option<ServiceStatus> {
        serde_json::from_str(&api_get(&self.socket, &format!("/v1/services/{service}"))).ok()
    }

    /// What the daemon logged so far (empty before it starts).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A `[[services]]` entry for machine [`HOST`] with one directory link per entry of `links`, each
/// to `/srv/<name>/<link, '/' as '-'>`.
pub fn service(name: &str, upstream: &str, links: &[&str]) -> String {
    let dirs: Vec<String> = links
        .iter()
        .map(|l| {
            format!(
                "{{ local = \"/srv/{name}/{}\", link = \"{l}\" }}",
                l.replace('/', "-")
            )
        })
        .collect();
    format!(
        "[[services]]\nmachine = \"{HOST}\"\nservice = \"{name}\"\nupstream = \"{upstream}\"\ndirs = [{}]\n\n",
        dirs.join(", ")
    )
}

/// The daemon's `/metrics` on 127.0.0.1:`port`, or empty while it does not answer.
pub fn scrape(port: u16) -> String {
    Command::new("curl")
        .args([
            "-sf",
            "--max-time",
            "10",
            &format!("http://127.0.0.1:{port}/metrics"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The name of the primary group of the user the tests run as (`root` in CI).
pub fn own_group() -> String {
    let gid = nix::unistd::getegid();
    nix::unistd::Group::from_gid(gid)
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

/// The `.rev` file of `service` under the state directory `state`, trimmed.
pub fn read_rev(state: &Path, service: &str) -> Option<String> {
    fs::read_to_string(state.join("state").join(format!("{service}.rev")))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// `curl -sf` GET on a daemon's API at `socket`: the body, empty when it does not answer (yet).
fn api_get(socket: &Path, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://plumb{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `plumb` daemon (or the wrapper that became one, or a server a test stops and starts
/// itself) as a child, killed and reaped when dropped, also when the test fails midway.
pub struct Daemon(pub Child);

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), sig).unwrap();
    }

    /// Panics with the machine's log if the daemon has exited: a fault must never stop it.
    pub fn assert_alive(&mut self, m: &Machine) {
        if let Some(status) = self.0.try_wait().unwrap() {
            panic!("plumb exited ({status}); its log:\n{}", m.log_text());
        }
    }

    /// The port of the daemon's metrics listener, bound to port 0 ([`ANY_METRICS_PORT`]): waits
    /// until the process listens on TCP, then reads the port from the kernel.
    pub fn metrics_port(&self) -> u16 {
        let pid = self.pid();
        let mut port = None;
        wait_until("the daemon's metrics listener", DEADLINE, || {
            port = super::listening_ports(pid).first().copied();
            port.is_some()
        });
        port.unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon, and with [`InProcess::with_api`] its control API, running in this process on a
/// runtime of their own, for [`HOST`], polling once an hour (a test pulls); stopped when dropped.
pub struct InProcess {
    pub handle: Handle,
    /// The API's socket, with [`InProcess::with_api`].
    pub socket: Option<PathBuf>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    rt: tokio::runtime::Runtime,
}

impl InProcess {
    /// The daemon alone on `config`.
    pub fn start(config: &Path) -> InProcess {
        InProcess::launch(config, None)
    }

    /// The daemon on `config` and its control API on `socket`, answering before this returns. The
    /// API's groups and audit log are the config's.
    pub fn with_api(config: &Path, socket: &Path) -> InProcess {
        let p = InProcess::launch(config, Some(socket));
        wait_until("the API to answer", DEADLINE, || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        });
        p
    }

    fn launch(config: &Path, socket: Option<&Path>) -> InProcess {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let (handle, commands) = daemon::channel();
        let hosts = vec![HOST.to_owned()];
        let mut tasks = Vec::new();
        if let Some(socket) = socket {
            let loaded = Config::load(config).unwrap();
            let s = &loaded.settings;
            let access =
                plumb::api::Access::new(&loaded, loaded.machine_names(&hosts), &s.state_dir);
            let listener = rt
                .block_on(async { plumb::api::bind(socket, &s.admin_group, &s.readonly_group) })
                .unwrap();
            tasks.push(rt.spawn(plumb::api::serve(
                listener,
                handle.clone(),
                access,
                shutdown.clone(),
            )));
        }
        let opts = daemon::Options {
            config: config.to_owned(),
            hosts,
            state_dir: None,
            interval: Some(Duration::from_secs(3600)),
            once: false,
            apply: false,
            noop: false,
            metrics: None,
            bootstrap: None,
        };
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let sd = shutdown.clone();
        tasks.push(rt.spawn(async move {
            let _keep_reload_open = reload_tx;
            if let Err(e) = daemon::run(opts, reload_rx, commands, sd).await {
                panic!("daemon: {e}");
            }
        }));
        InProcess {
            handle,
            socket: socket.map(Path::to_owned),
            shutdown,
            tasks,
            rt,
        }
    }

    /// A command through the daemon's handle, as the API makes it.
    pub fn call(&self, c: daemon::Command) -> Result<ActionResult, CommandError> {
        self.rt.block_on(self.handle.call(c))
    }

    pub fn status(&self, service: &str) -> ServiceStatus {
        self.try_status(service).unwrap()
    }

    pub fn try_status(&self, service: &str) -> Result<ServiceStatus, CommandError> {
        self.rt.block_on(self.handle.status(service))
    }

    /// What a pull of `service` would change, as `plumbctl diff` asks it.
    pub fn diff(&self, service: &str) -> Result<DiffResult, CommandError> {
        self.rt.block_on(self.handle.diff(service))
    }

    /// The revision `service` has deployed.
    pub fn deployed(&self, service: &str) -> Option<String> {
        self.status(service).deployed
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let tasks = std::mem::take(&mut self.tasks);
        let stopped = self.rt.block_on(async {
            tokio::time::timeout(DEADLINE, async {
                for t in tasks {
                    let _ = t.await;
                }
            })
            .await
        });
        if stopped.is_err() && !std::thread::panicking() {
            panic!("plumb did not stop within {DEADLINE:?}");
        }
    }
}

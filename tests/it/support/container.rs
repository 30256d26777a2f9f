//! A real systemd to test against: a Debian bookworm rootfs booted with `systemd-nspawn`.
//!
//! plumb hands its work to systemd (a generator, bind mounts, `.path` units, reloads over D-Bus),
//! and the CI machines do not run systemd as PID 1. So the tests that need systemd boot one in a
//! container, drive it from the host and throw it away. [`Container::boot`] takes about 0.3 s.
//!
//! How it is built, and why:
//! - **One pristine rootfs, never written.** `tests/infra/rootfs.sh` builds the rootfs (cached as a
//!   tarball under `/var/cache/plumb-ci`, keyed by the script's hash); the harness unpacks it once
//!   per machine to `/var/lib/plumb-ci/rootfs-<key>` and uses it only as the lower layer of an
//!   overlay.
//! - **An overlay per container, on disk.** Each container gets its own upper directory under
//!   `/var/lib/plumb-ci/run/<machine>/`, so everything it writes survives [`Container::reboot`]
//!   (nspawn exits on a reboot and the harness starts it again on the same upper) and vanishes with
//!   the container. nspawn cannot overlay `/` itself (`--volatile=overlay` keeps the upper in a
//!   tmpfs that dies with nspawn), so the overlay is mounted by a wrapper in a private mount
//!   namespace (`unshare -m`) that then becomes nspawn: the host never sees the mount, even if
//!   the test process is killed.
//! - **One container at a time on the machine.** The container shares the host's network (it
//!   reaches the tests' git servers on 127.0.0.1, and the host reaches its services there; the
//!   rootfs's nginx listens on port 80, of every address), so two at once would fight over ports.
//!   A test that wants port 80 for itself masks nginx with [`Boot::symlink`]. Every [`Container`] holds an exclusive
//!   `flock` on `/var/lib/plumb-ci/lock` for its whole life. `flock` locks belong to the open file,
//!   so the same lock serializes the threads of one test binary and separate test processes
//!   (other binaries, other checkouts). A test thread may hold only one container: a second
//!   [`Container::boot`] in the same thread would wait for itself forever, and panics instead.
//! - **Nothing left behind.** Dropping a [`Container`] powers it off (SIGTERM to nspawn, which
//!   sends SIGRTMIN+3 to the container's systemd), SIGKILLs its PID 1 and nspawn if it is not down
//!   by a deadline, and removes its directory. nspawn runs with `setpriv --pdeathsig TERM`, so it
//!   also powers off if the test process dies; the next boot removes the directories (and any
//!   straggler) of such a run.
//! - **No machined here**, so `systemctl -M` and `machinectl shell` do not work: commands run
//!   inside through `nsenter -t LEADER -a` ([`Container::exec`], [`Container::sh`]).
//!
//! The packages it needs (systemd-container, debootstrap, zstd) are installed by
//! `scripts/install-deps.sh`; everything else (util-linux, coreutils) is in every Debian.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Everything the harness keeps on the machine: the lock, the unpacked rootfs, the containers'
/// directories. Public so that tests can check that nothing under it is mounted on the host.
pub const CI_DIR: &str = "/var/lib/plumb-ci";

/// From spawning nspawn to `systemctl is-system-running` saying running (about 0.3 s when idle;
/// generous because cargo may be compiling on every core meanwhile).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a container gets to power off (about 0.15 s) or to go down for a reboot before
/// nspawn is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Any single command run inside is killed after this long, so a wedged command fails its test
/// instead of hanging the whole run.
const EXEC_TIMEOUT_SECS: u64 = 120;

/// nspawn's exit status when the container rebooted (the one `systemd-nspawn@.service` restarts on).
const NSPAWN_REBOOT_STATUS: i32 = 133;

/// The environment of commands run inside: the container's own, not the test process's.
const CONTAINER_ENV: [(&str, &str); 3] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LC_ALL", "C"),
];

/// Mounts the overlay (`$1` lower, `$2` upper, `$3` work, `$4` merged), then becomes nspawn (the
/// rest of the arguments). Run in a private mount namespace, so the mount is nspawn's alone.
const OVERLAY_THEN_NSPAWN: &str = r#"mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$4" && shift 4 && exec "$@""#;

/// Threads that hold a container now: a second boot from one of them would deadlock on the lock.
static HOLDERS: Mutex<Vec<ThreadId>> = Mutex::new(Vec::new());

/// Makes machine names unique within the process (the pid makes them unique between processes).
static BOOTS: AtomicUsize = AtomicUsize::new(0);

/// A systemd booted in `systemd-nspawn` on a pristine rootfs, for the tests that need a real
/// systemd (generator, mounts, `.path` units, reloads over D-Bus). See the module documentation
/// for the design; in short: one at a time, shares the host network, state survives
/// [`Container::reboot`], dropping it leaves nothing behind.
pub struct Container {
    machine: String,
    dir: PathBuf,
    rootfs: PathBuf,
    nspawn_args: Vec<String>,
    nspawn: Option<Child>,
    leader: u32,
    holder: ThreadId,
    _lock: Flock<File>,
}

/// What to set up before the first boot: binds from the host and files in the container's
/// filesystem. Made by [`Container::builder`]; [`Container::boot`] is `builder(name).boot()`.
pub struct Boot {
    hostname: String,
    binds: Vec<(PathBuf, String)>,
    files: Vec<(String, Seed)>,
}

/// One entry [`Boot`] writes into the container's filesystem before it boots.
enum Seed {
    /// A regular file: contents and mode.
    File(Vec<u8>, u32),
    /// A symbolic link to this target, taken literally.
    Symlink(String),
}

impl Boot {
    /// Binds the host directory or file `host` at `container_path` (read-write), e.g. a test's
    /// temp root at the same path, so a `file://` upstream or a shared scratch dir works on both
    /// sides. Lives in the container's own mount namespace: nothing is mounted on the host.
    pub fn bind(mut self, host: &Path, container_path: &str) -> Boot {
        let host = std::path::absolute(host)
            .unwrap_or_else(|e| panic!("absolute {}: {e}", host.display()));
        check_plain(host.to_str().expect("utf-8 path"), ":,");
        check_plain(container_path, ":,");
        self.binds.push((host, container_path.to_string()));
        self
    }

    /// Writes `contents` to `container_path` (mode `mode`, owner root) before the first boot, so
    /// that the container boots with it: e.g. an nginx site on another port than 80, or plumb's
    /// config and units for its generator to run at boot. Parents must be given by their real
    /// path (`/usr/lib/...`, not `/lib/...`).
    pub fn file(mut self, container_path: &str, contents: impl AsRef<[u8]>, mode: u32) -> Boot {
        let seed = Seed::File(contents.as_ref().to_vec(), mode);
        self.files.push((container_path.to_string(), seed));
        self
    }

    /// Makes `container_path` a symlink to `target` before the first boot: enables a unit
    /// (`/etc/systemd/system/multi-user.target.wants/x.service` -> `/etc/systemd/system/x.service`)
    /// or masks one (-> `/dev/null`, e.g. nginx when a test wants port 80 for itself).
    pub fn symlink(mut self, container_path: &str, target: &str) -> Boot {
        let seed = Seed::Symlink(target.to_string());
        self.files.push((container_path.to_string(), seed));
        self
    }

    /// Copies the host file `host` to `container_path` before the first boot (see [`Boot::file`]).
    pub fn copy(self, host: &Path, container_path: &str, mode: u32) -> Boot {
        let contents = fs::read(host).unwrap_or_else(|e| panic!("read {}: {e}", host.display()));
        self.file(container_path, contents, mode)
    }

    /// Boots the container: waits for the machine-wide lock, makes sure the rootfs is unpacked
    /// (building it with `tests/infra/rootfs.sh` if its cache is missing, about a minute), starts
    /// nspawn and returns once systemd says the system is running (or degraded). Panics with the
    /// console log and the failed units if it is not up within the boot deadline.
    pub fn boot(self) -> Container {
        let holder = std::thread::current().id();
        {
            let mut holders = HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
            assert!(
                !holders.contains(&holder),
                "this thread already holds a Container: one at a time (they share the host network), \
                 and a second boot here would wait for the first forever"
            );
            holders.push(holder);
        }
        // Undo the registration if anything below panics before the Container exists.
        let registration = Registration(holder);

        fs::create_dir_all(CI_DIR).unwrap_or_else(|e| panic!("create {CI_DIR}: {e}"));
        let lock = machine_lock();
        sweep_stale_runs();
        let rootfs = ensure_rootfs();

        let n = BOOTS.fetch_add(1, Ordering::Relaxed);
        let machine = format!("{}-{}-{n}", self.hostname, std::process::id());
        let dir = Path::new(CI_DIR).join("run").join(&machine);
        let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        // The merged root takes the upper directory's owner and mode. Not the rootfs's: its top
        // directory was debootstrap's mktemp dir, mode 0700, and a 0700 `/` locks every
        // unprivileged daemon out (dbus-daemon as messagebus hangs the boot).
        std::os::unix::fs::chown(&upper, Some(0), Some(0))
            .unwrap_or_else(|e| panic!("chown {}: {e}", upper.display()));
        fs::set_permissions(&upper, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", upper.display()));
        let hostname = Seed::File(format!("{}\n", self.hostname).into_bytes(), 0o644);
        seed(&rootfs, &upper, "/etc/hostname", &hostname);
        for (path, what) in &self.files {
            seed(&rootfs, &upper, path, what);
        }

        let mut nspawn_args = vec![
            format!("--directory={}", merged.display()),
            format!("--machine={machine}"),
            "--boot".to_string(),
            // No systemd on the host to register with or to make a scope unit.
            "--register=no".to_string(),
            "--keep-unit".to_string(),
            "--console=read-only".to_string(),
            // Never link the container's journal into the host's /var/log/journal.
            "--link-journal=no".to_string(),
        ];
        for (host, inside) in &self.binds {
            nspawn_args.push(format!("--bind={}:{inside}", host.display()));
        }

        std::mem::forget(registration); // the Container takes it over
        let mut container = Container {
            machine,
            dir,
            rootfs,
            nspawn_args,
            nspawn: None,
            leader: 0,
            holder,
            _lock: lock,
        };
        container.start();
        container
    }
}

/// Removes a thread from [`HOLDERS`] when dropped: a boot that panics before it has a
/// [`Container`] must not leave its thread unable to boot again.
struct Registration(ThreadId);

impl Drop for Registration {
    fn drop(&mut self) {
        release_thread(self.0);
    }
}

impl Container {
    /// Boots a pristine container whose hostname is `name` (a plumb `machine`): see
    /// [`Boot::boot`]. `name` is lowercase letters, digits and dashes, at most 40 of them.
    pub fn boot(name: &str) -> Container {
        Container::builder(name).boot()
    }

    /// A container to set up before it boots (binds, files); finish with [`Boot::boot`].
    pub fn builder(name: &str) -> Boot {
        assert!(
            !name.is_empty()
                && name.len() <= 40
                && !name.starts_with('-')
                && !name.ends_with('-')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "container name {name:?}: want 1 to 40 of [a-z0-9-], not starting or ending with '-'"
        );
        Boot {
            hostname: name.to_string(),
            binds: Vec::new(),
            files: Vec::new(),
        }
    }

    /// The harness's directory for this container on the host (`upper/`, `work/`, the console
    /// log): removed when the container is dropped. For checks that it is gone, and for debugging.
    pub fn run_dir(&self) -> &Path {
        &self.dir
    }

    /// The pid of the container's PID 1 as the host sees it. Changes on [`Container::reboot`].
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// Runs `args` inside the container: in all its namespaces and root, with the container's
    /// environment, no stdin, killed after two minutes. Returns what it did, whatever its status.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run nsenter {args:?}: {e}"))
    }

    /// Runs `sh -c script` inside; panics with its status, stdout and stderr if it fails. Returns
    /// its stdout, trimmed.
    pub fn sh(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-c", script]);
        if !out.status.success() {
            panic!(
                "in container {}: sh -c {script:?} failed ({}){}\nstdout:\n{}\nstderr:\n{}",
                self.machine,
                out.status,
                if out.status.code() == Some(124) {
                    " (killed by the harness's timeout)"
                } else {
                    ""
                },
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Like [`Container::sh`], but never panics: whether the script succeeded, and its stdout,
    /// trimmed. For conditions polled with `wait_until`.
    pub fn try_sh(&self, script: &str) -> (bool, String) {
        let out = self.exec(&["sh", "-c", script]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    }

    /// `/proc/LEADER/root`: the container's filesystem seen from the host, to read or write
    /// plain files quickly. Beware: an ABSOLUTE symlink met on the way resolves against the
    /// HOST's root (e.g. `etc/systemd/system/*.wants/*`), so write through [`Container::install`]
    /// or [`Container::sh`] unless the path is known to hold no symlink.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.leader))
    }

    /// Copies the host file `host_path` into the running container at `container_path` (parents
    /// created, mode `mode`, owner root). Written inside the container and renamed into place, so
    /// symlinks resolve as the container sees them and a running binary can be replaced.
    pub fn install(&self, host_path: &Path, container_path: &str, mode: u32) {
        check_plain(container_path, "");
        let source =
            File::open(host_path).unwrap_or_else(|e| panic!("open {}: {e}", host_path.display()));
        let mode = format!("{mode:o}");
        let out = self
            .command(&[
                "sh",
                "-c",
                r#"set -e; mkdir -p -- "${1%/*}"; cat > "$1.plumb-ci-new"; chmod "$2" "$1.plumb-ci-new"; mv -f -- "$1.plumb-ci-new" "$1""#,
                "sh",
                container_path,
                &mode,
            ])
            .stdin(source)
            .output()
            .unwrap_or_else(|e| panic!("cannot run nsenter: {e}"));
        if !out.status.success() {
            panic!(
                "in container {}: install {} to {container_path} failed ({}):\n{}",
                self.machine,
                host_path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Installs this build's Debian package ([`plumb_deb`]) with `dpkg -i`: its postinst creates
    /// the groups and the state directory, runs `daemon-reload` (so the generator runs), enables
    /// plumb.service and starts it when `/etc/plumb/plumb.toml` exists. The package is what
    /// the systemd tests run.
    pub fn install_deb(&self) {
        self.install(plumb_deb(), "/var/cache/plumb-test/plumb.deb", 0o644);
        self.sh("dpkg -i /var/cache/plumb-test/plumb.deb >/dev/null");
    }

    /// Installs the Debian package file `deb` with `dpkg -i`: an upgrade (or a downgrade) when
    /// plumb is installed already, e.g. to a [`plumb_deb_version`] build. Returns what dpkg and
    /// the maintainer scripts printed, stdout and stderr together.
    pub fn install_deb_file(&self, deb: &Path) -> String {
        let name = deb
            .file_name()
            .unwrap_or_else(|| panic!("{}: not a file", deb.display()))
            .to_string_lossy();
        let inside = format!("/var/cache/plumb-test/{name}");
        self.install(deb, &inside, 0o644);
        self.sh(&format!("dpkg -i '{inside}' 2>&1"))
    }

    /// Installs plumb the way a package would, then `systemctl daemon-reload` (which also runs the
    /// generators): each `(host_path, container_path)` of `bins` with mode 0755, and every file
    /// of the repository's `units/` directory into `/etc/systemd/system`. The binaries' paths come
    /// from the test crate, since only it sees `env!("CARGO_BIN_EXE_...")`, e.g.
    /// `c.install_plumb(&[(Path::new(env!("CARGO_BIN_EXE_plumb")), "/usr/bin/plumb")])`; the
    /// generator goes to `/usr/lib/systemd/system-generators/plumb-generator`.
    pub fn install_plumb(&self, bins: &[(&Path, &str)]) {
        for (host, inside) in bins {
            self.install(host, inside, 0o755);
        }
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
        if let Ok(entries) = fs::read_dir(&units) {
            let mut files: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for file in files {
                let name = file.file_name().expect("file name").to_string_lossy();
                self.install(&file, &format!("/etc/systemd/system/{name}"), 0o644);
            }
        }
        self.sh("systemctl daemon-reload");
    }

    /// `journalctl -u unit` inside: the unit's messages, from every boot of this container (the
    /// rootfs has /var/log/journal, so the journal is persistent and kept across
    /// [`Container::reboot`]). journald writes asynchronously: poll for a line rather than
    /// expecting it right after the unit acted.
    pub fn journal(&self, unit: &str) -> String {
        self.sh(&format!(
            "journalctl --no-pager -o short-precise -u '{unit}'"
        ))
    }

    /// The container's console as nspawn printed it (systemd's boot and shutdown messages), for
    /// every boot of this container so far.
    pub fn log(&self) -> String {
        let log = self.dir.join("nspawn.log");
        fs::read_to_string(&log).unwrap_or_else(|e| format!("(cannot read {}: {e})", log.display()))
    }

    /// Reboots the container with `systemctl reboot` and waits until it is running again. What
    /// was written to its filesystem survives (the overlay's upper layer is kept); tmpfs mounts
    /// (/run, /tmp) and processes do not. Panics with the console log if it does not come back.
    pub fn reboot(&mut self) {
        // The job is queued before systemctl returns; the connection may drop as it does.
        let _ = self.exec(&["systemctl", "reboot"]);
        let status = self.wait_nspawn(STOP_TIMEOUT);
        match status {
            Some(status) if status.code() == Some(NSPAWN_REBOOT_STATUS) => {}
            Some(status) => panic!(
                "container {}: nspawn exited with {status} instead of {NSPAWN_REBOOT_STATUS} (reboot)\n{}",
                self.machine,
                self.report()
            ),
            None => panic!(
                "container {}: not down for the reboot within {STOP_TIMEOUT:?}\n{}",
                self.machine,
                self.report()
            ),
        }
        self.nspawn = None;
        self.start();
    }

    /// Starts nspawn on this container's overlay and waits until systemd is up.
    fn start(&mut self) {
        let log = self.dir.join("nspawn.log");
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let mut cmd = Command::new("setpriv");
        // If the test process dies, nspawn powers the container off: no orphan keeps the port.
        cmd.args(["--pdeathsig", "TERM", "--"])
            .args(["unshare", "--mount", "--propagation", "private", "--"])
            .args(["sh", "-c", OVERLAY_THEN_NSPAWN, "sh"])
            .arg(&self.rootfs)
            .arg(self.dir.join("upper"))
            .arg(self.dir.join("work"))
            .arg(self.dir.join("merged"))
            .arg("systemd-nspawn")
            .args(&self.nspawn_args)
            // nspawn hands TERM to the container's console: no colour codes in the log.
            .env("TERM", "dumb")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log file"))
            .stderr(log_file);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start systemd-nspawn ({cmd:?}): {e}"));
        let pid = child.id();
        fs::write(self.dir.join("nspawn.pid"), pid.to_string()).expect("write nspawn.pid");
        self.nspawn = Some(child);
        self.leader = 0;
        let deadline = started + BOOT_TIMEOUT;

        // The leader is nspawn's child that is PID 1 of its own pid namespace; it is ready for
        // nsenter once it has become systemd (before, it is nspawn still setting up).
        loop {
            self.check_nspawn_alive();
            if let Some(leader) = find_leader(pid)
                && fs::read_to_string(format!("/proc/{leader}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            {
                self.leader = leader;
                break;
            }
            self.check_deadline(deadline, "its init to start");
            std::thread::sleep(Duration::from_millis(5));
        }

        // `--wait` blocks until the boot is over; before PID 1 listens on its private socket,
        // systemctl fails at once with "Failed to connect to bus": retry.
        loop {
            self.check_nspawn_alive();
            let left = deadline.saturating_duration_since(Instant::now());
            let out = self
                .command_with_timeout(
                    &["systemctl", "is-system-running", "--wait"],
                    left.as_secs() + 1,
                )
                .output()
                .expect("run nsenter");
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                return;
            }
            self.check_deadline(
                deadline,
                &format!(
                    "systemd to be running (last `systemctl is-system-running --wait`: {}, \
                     stdout {state:?}, stderr {:?})",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Panics with the console log if nspawn has exited.
    fn check_nspawn_alive(&mut self) {
        let child = self.nspawn.as_mut().expect("nspawn started");
        if let Some(status) = child.try_wait().expect("wait for nspawn") {
            panic!(
                "container {}: systemd-nspawn exited ({status}) during boot; console:\n{}",
                self.machine,
                self.log()
            );
        }
    }

    /// Panics with the state of the container if the boot deadline has passed.
    fn check_deadline(&self, deadline: Instant, what: &str) {
        if Instant::now() >= deadline {
            panic!(
                "container {}: timed out after {BOOT_TIMEOUT:?} waiting for {what}\n{}",
                self.machine,
                self.report()
            );
        }
    }

    /// What a failure message needs: the end of the console log, the failed units and the jobs
    /// still queued (when PID 1 is still there to ask).
    fn report(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        let mut report = format!("--- console (last 80 lines) ---\n{tail}\n");
        if self.leader != 0 && Path::new(&format!("/proc/{}", self.leader)).exists() {
            let questions: [&[&str]; 3] = [
                &["systemctl", "is-system-running"],
                &["systemctl", "--failed", "--no-pager"],
                &["systemctl", "list-jobs", "--no-pager"],
            ];
            for args in questions {
                let out = self.command_with_timeout(args, 10).output();
                let text = match out {
                    Ok(out) => format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                    Err(e) => format!("(cannot run: {e})"),
                };
                report.push_str(&format!("--- {} ---\n{text}", args.join(" ")));
            }
        }
        report
    }

    /// `nsenter` into the container with the default command timeout.
    fn command(&self, args: &[&str]) -> Command {
        self.command_with_timeout(args, EXEC_TIMEOUT_SECS)
    }

    /// `timeout SECS nsenter -t LEADER -a -- args` with the container's environment, no stdin.
    fn command_with_timeout(&self, args: &[&str], secs: u64) -> Command {
        assert!(self.leader != 0, "container {} is not up", self.machine);
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=5", &secs.to_string(), "nsenter", "-t"])
            .arg(self.leader.to_string())
            .args(["-a", "--"])
            .args(args)
            .env_clear()
            .envs(CONTAINER_ENV)
            .stdin(Stdio::null());
        cmd
    }

    /// Waits up to `timeout` for nspawn to exit; its status, or None if it is still running.
    fn wait_nspawn(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.nspawn.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => return None,
                Err(e) => panic!("wait for systemd-nspawn: {e}"),
            }
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Power off: nspawn turns SIGTERM into SIGRTMIN+3 for the container's systemd.
        if let Some(child) = self.nspawn.as_ref() {
            let nspawn = child.id();
            let _ = kill(Pid::from_raw(nspawn as i32), Signal::SIGTERM);
            if self.wait_nspawn(STOP_TIMEOUT).is_none() {
                eprintln!(
                    "container {}: not down {STOP_TIMEOUT:?} after SIGTERM, killing it",
                    self.machine
                );
                kill_container(nspawn);
            }
            if let Some(mut child) = self.nspawn.take() {
                let _ = child.wait();
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!(
                "container {}: remove {}: {e}",
                self.machine,
                self.dir.display()
            );
        }
        release_thread(self.holder);
        // The machine lock is released after this, when the fields drop.
    }
}

/// SIGKILLs the container of the nspawn process `nspawn`, then nspawn. Killing nspawn alone is
/// not enough: the container's PID 1 has no parent-death signal and would run on, orphaned, with
/// its nginx on port 80. Killed, the PID 1 of a pid namespace takes every process in it along.
/// Waits (up to [`STOP_TIMEOUT`]) until that PID 1 has finished dying: the kernel kills the
/// namespace's processes as it exits, and until then they may still hold ports.
fn kill_container(nspawn: u32) {
    let leader = find_leader(nspawn);
    if let Some(leader) = leader {
        let _ = kill(Pid::from_raw(leader as i32), Signal::SIGKILL);
    }
    let _ = kill(Pid::from_raw(nspawn as i32), Signal::SIGKILL);
    if let Some(leader) = leader {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while is_running(leader) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim().starts_with('Z'))
}

/// Forgets that `thread` holds a container.
fn release_thread(thread: ThreadId) {
    HOLDERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|t| *t != thread);
}

/// Takes the machine-wide container lock, waiting for whoever holds it.
fn machine_lock() -> Flock<File> {
    let path = Path::new(CI_DIR).join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    Flock::lock(file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("flock {}: {e}", path.display()))
}

/// Removes what containers of dead test processes left in `CI_DIR/run`: with the lock held, every
/// entry there is stale. An nspawn still powering off (parent-death SIGTERM) is waited for, then
/// killed, so that it no longer holds ports when the new container starts.
fn sweep_stale_runs() {
    let run = Path::new(CI_DIR).join("run");
    let Ok(entries) = fs::read_dir(&run) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let pid = fs::read_to_string(dir.join("nspawn.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let mine = |pid: i32| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                is_running(pid as u32)
                    && String::from_utf8_lossy(&cmdline).contains(dir.to_str().unwrap_or("\0"))
            };
            if mine(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                let deadline = Instant::now() + STOP_TIMEOUT;
                while mine(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if mine(pid) {
                    kill_container(pid as u32);
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&dir) {
            eprintln!("remove stale container dir {}: {e}", dir.display());
        }
    }
}

/// The unpacked rootfs for the current `tests/infra/rootfs.sh`, unpacking (or building) it first
/// if needed; removes rootfs of other versions. Called with the machine lock held, on every boot:
/// a test process of another checkout may have swapped it meanwhile.
fn ensure_rootfs() -> PathBuf {
    static KEY: OnceLock<String> = OnceLock::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/infra/rootfs.sh");
    // The script's own cache key: the first 16 hex digits of its sha256.
    let key = KEY.get_or_init(|| {
        let out = Command::new("sha256sum")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run sha256sum: {e}"));
        assert!(
            out.status.success(),
            "sha256sum {} failed",
            script.display()
        );
        String::from_utf8_lossy(&out.stdout)[..16].to_string()
    });
    let name = format!("rootfs-{key}");
    let dir = Path::new(CI_DIR).join(&name);
    let done_name = format!("{name}.done");
    let done = Path::new(CI_DIR).join(&done_name);
    if !done.exists() {
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        if !out.status.success() {
            panic!(
                "{} {} failed ({}):\n{}{}",
                script.display(),
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        fs::write(&done, "").unwrap_or_else(|e| panic!("write {}: {e}", done.display()));
        eprintln!(
            "container harness: rootfs {} ready in {:?}",
            dir.display(),
            started.elapsed()
        );
    }
    // Other versions' rootfs are dead weight (no container runs while we hold the lock). The
    // marker goes first, so an interrupted removal is redone as a fresh unpack.
    if let Ok(entries) = fs::read_dir(CI_DIR) {
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let other = file_name.to_string_lossy();
            if other.starts_with("rootfs-") && other.ends_with(".done") && *other != *done_name {
                let _ = fs::remove_file(entry.path());
                let stale = Path::new(CI_DIR).join(other.trim_end_matches(".done"));
                if let Err(e) = fs::remove_dir_all(&stale) {
                    eprintln!("remove stale rootfs {}: {e}", stale.display());
                }
            }
        }
    }
    dir
}

/// The pid of `nspawn`'s child that is PID 1 of its own pid namespace, once there is one.
fn find_leader(nspawn: u32) -> Option<u32> {
    let tasks = fs::read_dir(format!("/proc/{nspawn}/task")).ok()?;
    for task in tasks.flatten() {
        let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace() {
            let status = fs::read_to_string(format!("/proc/{child}/status")).unwrap_or_default();
            let nspid = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default();
            if nspid.len() >= 2 && nspid.last() == Some(&"1") {
                return child.parse().ok();
            }
        }
    }
    None
}

/// Panics unless `path` is absolute, has no `..`, and none of the characters in `forbidden`
/// (nspawn's `--bind` and overlay options split on `:` and `,`).
fn check_plain(path: &str, forbidden: &str) {
    assert!(
        path.starts_with('/')
            && !Path::new(path)
                .components()
                .any(|c| c == Component::ParentDir)
            && !path.contains(|c: char| forbidden.contains(c) || c.is_control()),
        "path {path:?}: want an absolute path without '..'{}",
        if forbidden.is_empty() {
            String::new()
        } else {
            format!(" or any of {forbidden:?}")
        }
    );
}

/// Gives `to` the owner and mode of `from`.
fn copy_owner_and_mode(from: &Path, to: &Path) {
    let meta = fs::metadata(from).unwrap_or_else(|e| panic!("stat {}: {e}", from.display()));
    std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid()))
        .unwrap_or_else(|e| panic!("chown {}: {e}", to.display()));
    fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", to.display()));
}

/// Writes `what` at `path` in the overlay's `upper` layer before boot. A directory made in
/// the upper layer hides the lower one's owner and mode, so each parent made here copies them
/// from the rootfs; a parent that is a symlink in the rootfs (e.g. `/lib`) would be shadowed by
/// a directory, so it is refused: give the real path (`/usr/lib`).
fn seed(lower: &Path, upper: &Path, path: &str, what: &Seed) {
    check_plain(path, "");
    let rel = Path::new(path.trim_start_matches('/'));
    let (mut l, mut u) = (lower.to_path_buf(), upper.to_path_buf());
    for part in rel.parent().into_iter().flat_map(Path::components) {
        l.push(part);
        u.push(part);
        if u.is_dir() {
            continue;
        }
        match fs::symlink_metadata(&l) {
            Ok(m) if m.file_type().is_symlink() => panic!(
                "{path}: {} is a symlink in the rootfs; give the path it points to",
                l.strip_prefix(lower).unwrap_or(&l).display()
            ),
            Ok(m) if !m.is_dir() => panic!("{path}: {} is not a directory", l.display()),
            Ok(_) => {
                fs::create_dir(&u).unwrap_or_else(|e| panic!("mkdir {}: {e}", u.display()));
                copy_owner_and_mode(&l, &u);
            }
            Err(_) => fs::create_dir(&u).unwrap_or_else(|e| panic!("mkdir {}: {e}", u.display())),
        }
    }
    let file = upper.join(rel);
    if file.symlink_metadata().is_ok() {
        fs::remove_file(&file).unwrap_or_else(|e| panic!("rm {}: {e}", file.display()));
    }
    match what {
        Seed::File(contents, mode) => {
            fs::write(&file, contents).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
            fs::set_permissions(&file, fs::Permissions::from_mode(*mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", file.display()));
        }
        Seed::Symlink(target) => std::os::unix::fs::symlink(target, &file)
            .unwrap_or_else(|e| panic!("symlink {} -> {target}: {e}", file.display())),
    }
}

/// plumb's Debian package, built from this test build's binaries by `scripts/build-deb.sh`
/// (uncompressed), once per test process, under cargo's temp dir for integration tests. The man
/// pages and completions come from the library in-process: no cargo runs from inside a test.
pub fn plumb_deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plumb-deb");
        // Leftovers of test processes that have ended.
        if let Ok(entries) = fs::read_dir(&base) {
            for e in entries.flatten() {
                let pid = e.file_name().to_string_lossy().parse::<u32>().ok();
                if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(std::process::id().to_string());
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the package build dir");
        let docs = dir.join("docs");
        plumb::docs::write_docs(&docs).expect("generate man pages and completions");
        let bins = Path::new(env!("CARGO_BIN_EXE_plumb"))
            .parent()
            .expect("binary dir");
        let deb = dir.join("plumb.deb");
        let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-deb.sh"))
            .arg("--bin-dir")
            .arg(bins)
            .arg("--docs-dir")
            .arg(&docs)
            .arg("--fast")
            .arg(&deb)
            .output()
            .expect("run scripts/build-deb.sh");
        assert!(
            out.status.success(),
            "scripts/build-deb.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        deb
    })
}

/// plumb's Debian package as [`plumb_deb`] (the same binaries, man pages and completions), but
/// with the package version `version` (`scripts/build-deb.sh --version`): a newer build of the
/// package to upgrade to. Built once per version and test process, beside [`plumb_deb`].
pub fn plumb_deb_version(version: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    assert!(
        !version.is_empty()
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+~".contains(c)),
        "package version {version:?}: want [A-Za-z0-9.+~]"
    );
    // Held while building: two threads asking for the same version wait for one build.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, deb)) = built.iter().find(|(v, _)| v == version) {
        return deb.clone();
    }
    let dir = plumb_deb().parent().expect("the package build dir");
    let bins = Path::new(env!("CARGO_BIN_EXE_plumb"))
        .parent()
        .expect("binary dir");
    let deb = dir.join(format!("plumb_{version}.deb"));
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-deb.sh"))
        .arg("--bin-dir")
        .arg(bins)
        .arg("--docs-dir")
        .arg(dir.join("docs"))
        .args(["--version", version, "--fast"])
        .arg(&deb)
        .output()
        .expect("run scripts/build-deb.sh");
    assert!(
        out.status.success(),
        "scripts/build-deb.sh --version {version} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    built.push((version.to_string(), deb.clone()));
    deb
}

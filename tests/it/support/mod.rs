//! Shared harness for plumb's integration tests: real git servers on loopback.
//!
//! It owns everything a test needs to talk to an upstream the way a machine in the field does:
//! - [`Upstream`]: a bare repository plus a private work clone to write, commit and push history with;
//! - [`GitDaemon`] (`git://`), [`HttpServer`] (smart HTTP: lighttpd + `git http-backend`) and
//!   [`SshServer`] (OpenSSH `sshd`, key auth): real servers, each on its own free port of 127.0.0.1;
//! - [`Accounts`]: real users and groups made for one test (`useradd`), removed afterwards;
//! - [`Machine`], [`Daemon`] and [`InProcess`] (`machine.rs`): the one way a test runs plumb's daemon;
//! - [`Node`], [`snapshot`] and [`git_checkout`] (`tree.rs`): the one snapshot of a directory tree
//!   a checkout is compared with, and the real git client's checkout to compare it to;
//! - [`git`], [`wait_until`] with the one [`DEADLINE`], [`require_root`]: the small helpers every
//!   test module would repeat otherwise.
//!
//! Rules it keeps so that tests can run in parallel threads of one process:
//! - every test makes its own root ([`temp_root`]) and its own servers in it: nothing is shared, no
//!   fixed port is used;
//! - servers run in the foreground as children; dropping the handle kills and reaps them;
//! - nothing sleeps for a fixed time: readiness is polled with a deadline, and a server that exits
//!   early makes the test panic with the server's log.
//!
//! The packages it needs (lighttpd, openssh-server, git) are installed by `scripts/install-deps.sh`.

pub mod container;
mod machine;
mod tree;

pub use machine::{
    ANY_METRICS_PORT, Daemon, InProcess, Machine, own_group, read_rev, scrape, service,
};
pub use tree::{Node, git_checkout, snapshot, snapshot_links};

use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long anything a test waits for may take before the test fails: a deploy, an answer, a
/// state, a unit. Generous, since the whole suite shares one process and two cores; a wait is a
/// poll ([`wait_until`]), so a condition that holds sooner costs no more.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How long a server gets from spawn to accepting connections before the test fails.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a server's connection handlers get to finish, and then the server to exit on SIGTERM,
/// before they are killed.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a server whose port was taken between probe and bind is restarted on another port.
const SERVER_START_ATTEMPTS: usize = 5;

/// The identity every commit made through [`git`] carries, so tests never depend on the host's.
const GIT_IDENTITY: [&str; 4] = [
    "-c",
    "user.name=plumb test",
    "-c",
    "user.email=plumb-test@example.invalid",
];

/// Panics unless the test runs as root. The ONE place that says a test needs root, so the reason
/// reads the same everywhere: bind mounts, sshd and lighttpd's privilege drop all require it.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (CI runs as root)");
    }
}

/// Polls `f` every `every` until it returns true (true) or `timeout` has passed (false). The one
/// poll loop: [`wait_until`] is it with a panic; a test that has more to show when a wait times
/// out (a log, a status) calls this and panics with that.
pub fn poll(timeout: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Polls `f` every 10 ms until it returns true; panics naming `what` after `timeout` (mostly
/// [`DEADLINE`]). Use this instead of sleeping: it is as fast as the condition allows and fails
/// loudly.
pub fn wait_until(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    if !poll(timeout, Duration::from_millis(10), f) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// A temporary test root, mode 0755 so that servers dropping privileges (lighttpd's CGI runs as
/// www-data) can traverse it. Each test makes its own and passes `root.path()` to the harness.
pub fn temp_root() -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix("plumb-it-")
        .tempdir()
        .expect("create temp root");
    open_dir(root.path());
    root
}

/// A `git -C dir` command isolated from the host: fixed identity, no global or system config, no
/// prompts, English messages. Callers add arguments and environment (e.g. `GIT_SSH_COMMAND`).
pub fn git_command(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args(GIT_IDENTITY)
        // No auto maintenance: it runs detached after commits and pushes, touching the
        // repositories behind a test's back and leaving orphans for init to reap.
        .args(["-c", "maintenance.auto=false", "-c", "gc.auto=0"])
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_CONFIG_PARAMETERS")
        .stdin(Stdio::null());
    cmd
}

/// Runs `git -C dir args...` isolated from the host (see [`git_command`]); panics with stderr on
/// failure and returns trimmed stdout. Tests build fixtures with the real git so that plumb's own
/// git code is checked against what git itself writes.
pub fn git(dir: &Path, args: &[&str]) -> String {
    git_env(dir, &[], args)
}

/// Like [`git`], with extra environment, e.g. `GIT_SSH_COMMAND` from [`SshServer::ssh_command`].
pub fn git_env(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> String {
    let mut cmd = git_command(dir);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run git {args:?} in {}: {e}", dir.display()));
    if !out.status.success() {
        panic!(
            "git {args:?} in {} failed ({}):\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Sets mode 0755 on `dir`, creating it if needed: servers that drop privileges must traverse it.
fn open_dir(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", dir.display()));
}

/// `root` as an absolute path, so the URLs built from it are valid.
fn absolute(root: &Path) -> PathBuf {
    std::path::absolute(root).unwrap_or_else(|e| panic!("absolute {}: {e}", root.display()))
}

/// Runs a non-git helper program, panicking with its output on failure.
fn run_tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `useradd` and `groupadd` lock `/etc/passwd` and `/etc/group`; tests of one file run in parallel
/// threads, so they take turns.
static ACCOUNTS: Mutex<()> = Mutex::new(());

/// Groups and users made for one test, removed when dropped, even when the test fails.
#[derive(Default)]
pub struct Accounts {
    groups: Vec<String>,
    users: Vec<String>,
}

impl Accounts {
    pub fn new() -> Accounts {
        Accounts::default()
    }

    /// A unique name: tests of several runs and threads never share an account.
    fn unique(prefix: &str) -> String {
        format!(
            "{prefix}{}x{}",
            std::process::id(),
            fastrand::u32(..1_000_000)
        )
    }

    pub fn group(&mut self, prefix: &str) -> String {
        let name = Accounts::unique(prefix);
        let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        run_tool("groupadd", &[&name]);
        self.groups.push(name.clone());
        name
    }

    /// A user without a home or a login shell, in `groups` besides the default primary group.
    pub fn user(&mut self, prefix: &str, groups: &[&str]) -> String {
        let name = Accounts::unique(prefix);
        let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        let joined = groups.join(",");
        let mut args = vec!["-M", "-N", "-s", "/usr/sbin/nologin"];
        if !groups.is_empty() {
            args.extend(["-G", &joined]);
        }
        args.push(&name);
        run_tool("useradd", &args);
        self.users.push(name.clone());
        name
    }

    /// Takes `user` out of `group` (`gpasswd -d`), as an administrator would.
    pub fn leave(&self, user: &str, group: &str) {
        let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        run_tool("gpasswd", &["-d", user, group]);
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        for u in &self.users {
            let _ = Command::new("userdel").arg(u).status();
        }
        for g in &self.groups {
            let _ = Command::new("groupdel").arg(g).status();
        }
    }
}

/// The upstream repository of a test: what the daemon under test fetches from.
///
/// `bare` is served by every server of the same root (all use `root/srv` as their base). History is
/// made in a private work clone and pushed, exactly as a person would, so refs, packs and reflogs
/// look like a real upstream's.
pub struct Upstream {
    /// The bare repository, `root/srv/<name>.git`.
    pub bare: PathBuf,
    work: PathBuf,
    name: String,
}

impl Upstream {
    /// A bare repository at `root/srv/<name>.git` with no commits and HEAD on `refs/heads/main`,
    /// exported to git daemon and HTTP (push over HTTP allowed, `--filter` honoured), readable by
    /// every user whatever the umask; plus the work clone `root/work/<name>` that pushes to it.
    pub fn new(root: &Path, name: &str) -> Upstream {
        let root = absolute(root);
        open_dir(&root);
        open_dir(&root.join("srv"));
        let bare = root.join("srv").join(format!("{name}.git"));
        let work = root.join("work").join(name);
        let bare_s = bare.to_str().expect("utf-8 path");
        // --shared=all keeps objects pushed later world-readable (lighttpd's CGI runs as www-data),
        // but also turns on receive.denyNonFastforwards, which force_reset needs off.
        git(
            &root,
            &["init", "-q", "--bare", "--shared=all", "-b", "main", bare_s],
        );
        for (key, value) in [
            ("receive.denyNonFastforwards", "false"),
            ("http.receivepack", "true"),
            ("uploadpack.allowFilter", "true"),
            ("uploadpack.allowReachableSHA1InWant", "true"),
            // No auto gc after a push: receive-pack does not see the `-c` of `git`, and a
            // detached gc would touch the repository behind the test's back.
            ("receive.autogc", "false"),
            ("gc.auto", "0"),
            ("maintenance.auto", "false"),
        ] {
            git(&bare, &["config", key, value]);
        }
        fs::write(bare.join("git-daemon-export-ok"), "").expect("write git-daemon-export-ok");

        fs::create_dir_all(&work).expect("create work clone dir");
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["remote", "add", "origin", bare_s]);
        Upstream {
            bare,
            work,
            name: name.to_string(),
        }
    }

    /// `file:///abs/path/<name>.git`: the upstream without any server in between.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    /// Writes `content` to `path` in the work clone, creating parent directories. A symlink at
    /// `path` is replaced by the file rather than written through.
    pub fn write(&self, path: &str, content: &str) -> &Self {
        let full = self.path(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir -p {}: {e}", parent.display()));
        }
        if full
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            fs::remove_file(&full).unwrap_or_else(|e| panic!("rm {}: {e}", full.display()));
        }
        fs::write(&full, content).unwrap_or_else(|e| panic!("write {}: {e}", full.display()));
        self
    }

    /// Sets `path`'s modification time an hour back, so git trusts its stat data from then on: a
    /// later commit does not read it again (as it would a file written in the same second as the
    /// index), which would apply attributes added since, such as `text`.
    pub fn age(&self, path: &str) -> &Self {
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(self.path(path))
            .and_then(|f| f.set_modified(hour_ago))
            .unwrap_or_else(|e| panic!("set the time of {path}: {e}"));
        self
    }

    /// Removes `path` (a file, a symlink, or a directory with everything below) from the work
    /// clone. Panics if it does not exist: a test removing nothing is a broken test.
    pub fn remove(&self, path: &str) -> &Self {
        let full = self.path(path);
        let meta = full
            .symlink_metadata()
            .unwrap_or_else(|e| panic!("remove {path}: {e}"));
        let res = if meta.is_dir() {
            fs::remove_dir_all(&full)
        } else {
            fs::remove_file(&full)
        };
        res.unwrap_or_else(|e| panic!("remove {}: {e}", full.display()));
        self
    }

    /// Makes `path` a symlink to `target` (taken literally, relative or absolute), replacing a
    /// file or symlink already there and creating parent directories.
    pub fn symlink(&self, path: &str, target: &str) -> &Self {
        let full = self.path(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir -p {}: {e}", parent.display()));
        }
        if full.symlink_metadata().is_ok() {
            fs::remove_file(&full).unwrap_or_else(|e| panic!("rm {}: {e}", full.display()));
        }
        std::os::unix::fs::symlink(target, &full)
            .unwrap_or_else(|e| panic!("symlink {} -> {target}: {e}", full.display()));
        self
    }

    /// Sets (0755) or clears (0644) the executable bit of a file: the only mode git records.
    pub fn chmod_exec(&self, path: &str, exec: bool) -> &Self {
        let full = self.path(path);
        let mode = if exec { 0o755 } else { 0o644 };
        fs::set_permissions(&full, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", full.display()));
        self
    }

    /// A clone of the bare repository at `dir`, for commits that [`Upstream::write`] cannot make
    /// (index-only entries such as gitlinks, branches and merges); push from it, and the work clone
    /// of [`Upstream::commit`] is behind.
    pub fn clone_into(&self, dir: &Path) -> PathBuf {
        let parent = dir.parent().expect("a clone directory with a parent");
        git(
            parent,
            &[
                "clone",
                "-q",
                self.bare.to_str().unwrap(),
                dir.to_str().unwrap(),
            ],
        );
        dir.to_path_buf()
    }

    /// Stages everything (`add -A`), commits (empty commits allowed) and pushes the current branch
    /// to the bare repository. Returns the new commit's full hash.
    pub fn commit(&self, msg: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", msg]);
        git(&self.work, &["push", "-q", "origin", "HEAD"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Stages everything and commits without pushing: several commits then reach the upstream in
    /// one [`Upstream::push`], as one fetch sees them. Returns the new commit's full hash.
    pub fn commit_local(&self, msg: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", msg]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Pushes the current branch of the work clone.
    pub fn push(&self) {
        git(&self.work, &["push", "-q", "origin", "HEAD"]);
    }

    /// Like [`Upstream::commit`], with `git -c` settings and extra `commit` arguments, e.g. to sign
    /// (`["gpg.format=ssh", "user.signingkey=/k"]`, `["-S"]`).
    pub fn commit_with(&self, config: &[&str], args: &[&str], msg: &str) -> String {
        git(&self.work, &["add", "-A"]);
        let mut cmd: Vec<&str> = Vec::new();
        for c in config {
            cmd.extend(["-c", c]);
        }
        cmd.extend(["commit", "-q", "--allow-empty", "-m", msg]);
        cmd.extend(args);
        git(&self.work, &cmd);
        git(&self.work, &["push", "-q", "origin", "HEAD"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Switches the work clone to branch `name`, creating it from the current HEAD if it does not
    /// exist. Nothing is pushed: the branch reaches the bare repository with the next commit.
    pub fn branch(&self, name: &str) {
        let exists = git_command(&self.work)
            .args(["show-ref", "--verify", "-q", &format!("refs/heads/{name}")])
            .status()
            .expect("run git show-ref")
            .success();
        if exists {
            git(&self.work, &["switch", "-q", name]);
        } else {
            git(&self.work, &["switch", "-q", "-c", name]);
        }
    }

    /// Rewrites history: `reset --hard rev` on the current branch and force-pushes it, as an
    /// upstream whose branch was rewound or rebased. Returns the new head hash.
    pub fn force_reset(&self, rev: &str) -> String {
        git(&self.work, &["reset", "-q", "--hard", rev]);
        git(&self.work, &["push", "-q", "--force", "origin", "HEAD"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Rewrites the last commit with a new message (same tree, new hash) and force-pushes it, as
    /// an upstream that amended its head. Returns the new head hash.
    pub fn amend(&self, msg: &str) -> String {
        git(
            &self.work,
            &["commit", "-q", "--amend", "--allow-empty", "-m", msg],
        );
        git(&self.work, &["push", "-q", "--force", "origin", "HEAD"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Number of commits reachable from `branch` in the bare repository; 0 when the branch does not
    /// exist there (an unborn `main` of a new upstream, or a branch never pushed).
    pub fn rev_count(&self, branch: &str) -> usize {
        let refname = format!("refs/heads/{branch}");
        let exists = git_command(&self.bare)
            .args(["show-ref", "--verify", "-q", &refname])
            .status()
            .expect("run git show-ref")
            .success();
        if !exists {
            return 0;
        }
        let count = git(&self.bare, &["rev-list", "--count", &refname]);
        count
            .parse()
            .unwrap_or_else(|e| panic!("rev-list --count said {count:?}: {e}"))
    }

    /// Writes an object of type `kind` with exactly `content` into the bare repository, unchecked
    /// (`--literally`), as a git server without `receive.fsckObjects` stores what it is pushed.
    /// Returns its hash.
    pub fn write_literally(&self, kind: &str, content: &[u8]) -> String {
        let mut hash = git_command(&self.bare)
            .args(["hash-object", "-t", kind, "--literally", "-w", "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run git hash-object");
        hash.stdin
            .take()
            .unwrap()
            .write_all(content)
            .expect("write to git hash-object");
        let out = hash.wait_with_output().expect("wait for git hash-object");
        assert!(out.status.success(), "git hash-object -t {kind}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// A tree of `entries` (mode, name, object hash), written byte for byte in the order given:
    /// any name and any order, as a crafted tree can have them. Returns its hash.
    pub fn raw_tree(&self, entries: &[(&str, &[u8], &str)]) -> String {
        let mut content = Vec::new();
        for (mode, name, id) in entries {
            content.extend_from_slice(mode.as_bytes());
            content.push(b' ');
            content.extend_from_slice(name);
            content.push(0);
            let id = plumb::git::Oid::from_str(id).expect("an object hash");
            content.extend_from_slice(id.as_bytes());
        }
        self.write_literally("tree", &content)
    }

    /// A commit of `tree` on top of `parent`, made the head of `main` in the bare repository (the
    /// work clone does not see it). Returns its hash.
    pub fn commit_tree(&self, tree: &str, parent: &str, msg: &str) -> String {
        let commit = git(&self.bare, &["commit-tree", tree, "-p", parent, "-m", msg]);
        self.set_main(&commit);
        commit
    }

    /// Points `main` of the bare repository at `rev`, as a push that rewrote it would.
    pub fn set_main(&self, rev: &str) {
        git(&self.bare, &["update-ref", "refs/heads/main", rev]);
    }

    /// `path` inside the work clone; refuses absolute paths and `..` so a test cannot write
    /// outside it by mistake.
    fn path(&self, path: &str) -> PathBuf {
        let rel = Path::new(path);
        assert!(
            rel.components().all(|c| matches!(c, Component::Normal(_))),
            "upstream path {path:?} must be relative, without `..`"
        );
        self.work.join(rel)
    }
}

/// A free TCP port on 127.0.0.1. It is free when this returns, not after: use it only for a
/// program that cannot be given a listener or report the port it bound to port 0 (plumb's daemon
/// can, see [`ANY_METRICS_PORT`]): git daemon, lighttpd and sshd here, which are restarted on
/// another port when they lose the race (see [`Server::start`]), Prometheus' targets, nginx in a
/// container, and a port for a client to find closed.
///
/// Drawn at random below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`): a port
/// from that range, what binding port 0 gives, can meanwhile become the local end of any
/// outgoing connection of a test running beside this one (curl, git, ssh), and the server's bind
/// then fails. Below it only another explicit bind can take it.
pub fn free_port() -> u16 {
    let low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(20000);
    loop {
        let port = fastrand::u16(10000..low);
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
}

/// The TCP ports process `pid` listens on, read from the kernel: its socket descriptors
/// (`/proc/PID/fd`) matched with the listening sockets of its network namespace
/// (`/proc/PID/net/tcp` and `tcp6`). How a test learns the port a daemon bound to port 0.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: Vec<String> = fds
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        // "sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode"
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3) == Some(&"0A");
            if listening && f.get(9).is_some_and(|i| inodes.iter().any(|x| x == i)) {
                let port = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                ports.extend(port);
            }
        }
    }
    ports
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A server process in the foreground, its stdout and stderr in `log`. Dropping it kills and
/// reaps the process, so no test leaves a server behind, even when it panics.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts the server that `command(port)` describes on a free port, and waits until
    /// the port accepts connections. If the process exits first, it is retried on another port
    /// when its log says the address was taken, and the test panics with its log otherwise.
    fn start(what: &str, run_dir: &Path, mut command: impl FnMut(u16) -> Command) -> (Server, u16) {
        for attempt in 1..=SERVER_START_ATTEMPTS {
            let port = free_port();
            let log = run_dir.join(format!("{what}-{port}.log"));
            let log_file =
                fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
            let mut cmd = command(port);
            // Its own process group, so that Drop can signal the server with its children.
            cmd.process_group(0)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("dup log file"))
                .stderr(log_file);
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
            let mut server = Server { child, log };
            let Err(status) = server.wait_accepting(what, port) else {
                return (server, port);
            };
            let log = server.log_text();
            if log.contains("in use") && attempt < SERVER_START_ATTEMPTS {
                continue; // lost the port to someone else: try another one
            }
            panic!(
                "{what} exited ({status}) before accepting connections on {port}; its log:\n{log}"
            );
        }
        unreachable!("the last attempt panics instead of trying again")
    }

    /// Waits until `port` accepts connections; the server's exit status if it exits first. Panics
    /// with its log when neither happens within the start timeout.
    fn wait_accepting(&mut self, what: &str, port: u16) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for server") {
                return Err(status);
            }
            if accepts(port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what} did not accept connections on {port} within {SERVER_START_TIMEOUT:?}; its log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the server printed so far, or why it cannot be read.
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Orphans are reaped late by this machine's init (zombies pile up meanwhile), so a server
        // should outlive the children it forked per connection (git daemon's upload-pack,
        // lighttpd's CGI, sshd's sessions) and reap them itself: let the last handler finish.
        let pid = self.child.id();
        let deadline = Instant::now() + SERVER_STOP_TIMEOUT;
        while has_children(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Then SIGTERM the server's process group, SIGKILL what lingers, and reap the server.
        let group = nix::unistd::Pid::from_raw(-(pid as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + SERVER_STOP_TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Whether process `pid` has live or unreaped children (any of its threads').
fn has_children(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        fs::read_to_string(task.path().join("children")).is_ok_and(|c| !c.trim().is_empty())
    })
}

/// Where a root's servers keep configs, keys and logs: `root/run`.
fn run_dir(root: &Path) -> PathBuf {
    let dir = absolute(root).join("run");
    open_dir(&dir);
    dir
}

/// `git daemon` serving every repository under `root/srv` over `git://127.0.0.1:PORT/<name>.git`
/// (push enabled), the cheapest real network transport.
pub struct GitDaemon {
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    server: Server,
}

impl GitDaemon {
    /// Starts `git daemon` in the foreground on a free port of 127.0.0.1, base path `root/srv`.
    /// Waits until the port accepts connections.
    pub fn start(root: &Path) -> GitDaemon {
        let root = absolute(root);
        open_dir(&root);
        let srv = root.join("srv");
        open_dir(&srv);
        let run = run_dir(&root);
        // The dashed program itself, not `git daemon`: the `git` wrapper would run it as a child
        // that outlives a killed wrapper.
        let program = Path::new(&git(&root, &["--exec-path"])).join("git-daemon");
        let (server, port) = Server::start("git-daemon", &run, |port| {
            let mut cmd = Command::new(&program);
            cmd.current_dir(&root)
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                // Read by the upload-pack children too; the repositories need not be our user's.
                .env("GIT_CONFIG_PARAMETERS", "'safe.directory'='*'")
                .args(["--reuseaddr", "--verbose"])
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(format!("--base-path={}", srv.display()))
                .args([
                    "--export-all",
                    "--enable=receive-pack",
                    "--informative-errors",
                ]);
            cmd
        });
        GitDaemon { port, server }
    }

    /// `git://127.0.0.1:PORT/<name>.git` for `up`.
    pub fn url(&self, up: &Upstream) -> String {
        format!("git://127.0.0.1:{}/{}.git", self.port, up.name)
    }
}

/// Smart HTTP: lighttpd running `git http-backend` through mod_cgi (as www-data, like a packaged
/// web server), serving `root/srv` at `http://127.0.0.1:PORT/git/<name>.git`, push enabled.
pub struct HttpServer {
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    /// The request log behind [`HttpServer::requests`]: one line per request, written by the CGI
    /// before it answers (lighttpd's own access log buffers lines for up to 4 seconds).
    pub access_log: PathBuf,
    /// With TLS: the test CA that signed the server's certificate (PEM), for `SSL_CERT_FILE`.
    pub ca: Option<PathBuf>,
    server: Server,
}

impl HttpServer {
    /// Writes a lighttpd config under `root/run` and starts `lighttpd -D` on a free port.
    /// Waits until the port accepts connections.
    pub fn start(root: &Path) -> HttpServer {
        HttpServer::launch(root, false)
    }

    /// [`HttpServer::start`] serving https, with a certificate for `127.0.0.1` signed by a CA
    /// made for this server alone ([`HttpServer::ca`]), which no client trusts unless told to.
    pub fn start_tls(root: &Path) -> HttpServer {
        HttpServer::launch(root, true)
    }

    fn launch(root: &Path, tls: bool) -> HttpServer {
        let root = absolute(root);
        open_dir(&root);
        let srv = root.join("srv");
        open_dir(&srv);
        let run = run_dir(&root);
        let exec_path = git(&root, &["--exec-path"]);
        let backend = Path::new(&exec_path).join("git-http-backend");
        assert!(
            backend.exists(),
            "no git-http-backend at {}",
            backend.display()
        );

        let mut access_log = PathBuf::new();
        let certs = tls.then(|| test_certificates(&run));
        let (server, port) = Server::start("lighttpd", &run, |port| {
            let dir = run.join(format!("lighttpd-{port}"));
            open_dir(&dir);
            access_log = dir.join("access.log");
            // The CGI runs as www-data and appends to it.
            fs::write(&access_log, "").expect("create access log");
            chown_www_data(&access_log);
            let cgi = dir.join("git-cgi");
            fs::write(&cgi, cgi_wrapper(&backend, &access_log)).expect("write CGI wrapper");
            fs::set_permissions(&cgi, fs::Permissions::from_mode(0o755)).expect("chmod CGI");
            let conf = dir.join("lighttpd.conf");
            let mut text = lighttpd_conf(port, &srv, &cgi);
            if let Some((_, pem, key)) = &certs {
                check_unquoted(pem);
                check_unquoted(key);
                text.push_str(&format!(
                    "server.modules += (\"mod_openssl\")\nssl.engine = \"enable\"\nssl.pemfile = \"{}\"\nssl.privkey = \"{}\"\n",
                    pem.display(),
                    key.display()
                ));
            }
            fs::write(&conf, text).expect("write lighttpd.conf");
            let mut cmd = Command::new("lighttpd");
            cmd.arg("-D").arg("-f").arg(&conf);
            cmd
        });
        HttpServer {
            port,
            access_log,
            ca: certs.map(|(ca, _, _)| ca),
            server,
        }
    }

    /// `http://127.0.0.1:PORT/git/<name>.git` for `up` (`https://` with TLS).
    pub fn url(&self, up: &Upstream) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/git/{}.git", self.port, up.name)
    }

    /// One line per request that reached git-http-backend, in order, e.g.
    /// `GET /git/app.git/info/refs?service=git-upload-pack HTTP/1.1 "git/2.47.3"` (method, URI,
    /// protocol, quoted User-Agent), so a test can tell that a fetch really went over HTTP and
    /// which client made it. Each line is written before the request is answered, so it is
    /// there as soon as the client has its response: no polling needed.
    pub fn requests(&self) -> Vec<String> {
        fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// lighttpd's own log (its stderr, where CGI errors from git-http-backend land too).
    pub fn log(&self) -> String {
        self.server.log_text()
    }
}

/// A CA and a server certificate for `127.0.0.1` it signed, made with openssl under `run`:
/// (CA certificate, server certificate, server key), the key readable by lighttpd after it drops
/// to www-data.
fn test_certificates(run: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("tls-")
        .tempdir_in(run)
        .expect("tls dir")
        .keep();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run openssl (scripts/install-deps.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=plumb test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&ca);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(&csr);
    fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n",
    )
    .expect("write server.ext");
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
    for name in ["server.pem", "server.key"] {
        chown_www_data(&dir.join(name));
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod tls dir");
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// Gives `path` to www-data, the user lighttpd drops to; panics if there is no such user.
fn chown_www_data(path: &Path) {
    let user = nix::unistd::User::from_name("www-data")
        .ok()
        .flatten()
        .expect("user www-data (made by the lighttpd package; see scripts/install-deps.sh)");
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))
        .unwrap_or_else(|e| panic!("chown www-data {}: {e}", path.display()));
}

/// A CGI script that appends the request line to `access_log`, then becomes git-http-backend.
///
/// Not lighttpd's mod_accesslog: it buffers lines written to a file for up to 4 seconds, and its
/// piped logger (written per request) is a process that lighttpd abandons on exit, an orphan for
/// init to reap.
fn cgi_wrapper(backend: &Path, access_log: &Path) -> String {
    check_unquoted(access_log);
    check_unquoted(backend);
    format!(
        r#"#!/bin/sh
printf '%s %s %s "%s"\n' "$REQUEST_METHOD" "$REQUEST_URI" "$SERVER_PROTOCOL" "$HTTP_USER_AGENT" >> {log}
exec {backend}
"#,
        log = access_log.display(),
        backend = backend.display(),
    )
}

/// lighttpd's config: alias `/git` to the CGI wrapper and run it with the project root and
/// `safe.directory=*` (the repositories are root's, the CGI runs as www-data).
fn lighttpd_conf(port: u16, srv: &Path, cgi: &Path) -> String {
    check_unquoted(srv);
    check_unquoted(cgi);
    format!(
        r#"server.modules = ("mod_alias", "mod_cgi", "mod_setenv")
server.document-root = "{srv}"
server.bind = "127.0.0.1"
server.port = {port}
server.username = "www-data"
server.groupname = "www-data"
alias.url += ( "/git" => "{cgi}" )
$HTTP["url"] =~ "^/git" {{
  cgi.assign = ( "" => "" )
  setenv.set-environment = (
    "GIT_PROJECT_ROOT" => "{srv}",
    "GIT_HTTP_EXPORT_ALL" => "",
    "GIT_CONFIG_NOSYSTEM" => "1",
    "GIT_CONFIG_PARAMETERS" => "'safe.directory'='*'"
  )
}}
"#,
        srv = srv.display(),
        cgi = cgi.display(),
    )
}

/// Panics unless `path` can go into lighttpd.conf or a shell command without quoting (temp dirs
/// and git's exec path always can).
fn check_unquoted(path: &Path) {
    let text = path.to_str().expect("utf-8 path");
    assert!(
        !text.contains(|c: char| c.is_whitespace() || "\"'\\$`;&|<>()*?[]#~".contains(c)),
        "path {text:?} cannot go into lighttpd.conf or a shell command unquoted"
    );
}

/// OpenSSH `sshd` on 127.0.0.1, key authentication only, login as root, serving repositories by
/// absolute path: `ssh://root@127.0.0.1:PORT/abs/path/<name>.git`. Comes with a client key and a
/// known_hosts file for its host key, so a client can connect with strict host key checking.
pub struct SshServer {
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    /// Private key (ed25519, no passphrase) that sshd accepts for root.
    pub client_key: PathBuf,
    /// A known_hosts file with one line, `[127.0.0.1]:PORT ssh-ed25519 AAAA...`, for sshd's host key.
    pub known_hosts: PathBuf,
    host_key_line: String,
    dir: PathBuf,
    server: Server,
}

impl SshServer {
    /// Makes host and client keys in a new directory `root/run/ssh-XXXXXX`, writes an sshd_config
    /// and starts `sshd -D -e` on a free port. Waits until the port accepts connections.
    pub fn start(root: &Path) -> SshServer {
        let root = absolute(root);
        open_dir(&root);
        let run = run_dir(&root);
        // Its own directory (mode 0700), so that several servers can share a root.
        let dir = tempfile::Builder::new()
            .prefix("ssh-")
            .tempdir_in(&run)
            .expect("create ssh dir")
            .keep();
        // sshd's privilege separation directory, normally made by its systemd unit.
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755))
            .expect("chmod /run/sshd");

        let host_key = dir.join("host_ed25519");
        let client_key = dir.join("client_ed25519");
        for key in [&host_key, &client_key] {
            run_tool(
                "ssh-keygen",
                &[
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "plumb-test",
                    "-f",
                    key.to_str().expect("utf-8 path"),
                ],
            );
        }
        let authorized_keys = dir.join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized_keys)
            .expect("write authorized_keys");
        let host_pub = fs::read_to_string(host_key.with_extension("pub")).expect("read host key");
        // "ssh-ed25519 AAAA... comment" -> "ssh-ed25519 AAAA..."
        let host_key_line = host_pub
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");

        let (server, port) = Server::start("sshd", &run, |port| {
            let conf = dir.join(format!("sshd_config-{port}"));
            fs::write(&conf, sshd_config(port, &host_key, &authorized_keys))
                .expect("write sshd_config");
            // sshd re-executes itself per connection, which needs its absolute path.
            let mut cmd = Command::new("/usr/sbin/sshd");
            cmd.arg("-D").arg("-e").arg("-f").arg(&conf);
            cmd
        });

        let known_hosts = dir.join("known_hosts");
        fs::write(
            &known_hosts,
            format!("[127.0.0.1]:{port} {host_key_line}\n"),
        )
        .expect("write known_hosts");
        SshServer {
            port,
            client_key,
            known_hosts,
            host_key_line,
            dir,
            server,
        }
    }

    /// `ssh://root@127.0.0.1:PORT/abs/path/<name>.git` for `up`.
    pub fn url(&self, up: &Upstream) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, up.bare.display())
    }

    /// The same known_hosts entry with its host name hashed (`ssh-keygen -H`), as many distributions
    /// write by default (`HashKnownHosts yes`): a client must match it without seeing the name.
    pub fn hashed_known_hosts(&self) -> PathBuf {
        let path = self.dir.join("known_hosts.hashed");
        fs::write(
            &path,
            format!("[127.0.0.1]:{} {}\n", self.port, self.host_key_line),
        )
        .expect("write known_hosts.hashed");
        run_tool(
            "ssh-keygen",
            &["-q", "-H", "-f", path.to_str().expect("utf-8 path")],
        );
        let _ = fs::remove_file(self.dir.join("known_hosts.hashed.old"));
        path
    }

    /// A `GIT_SSH_COMMAND` for the real git client: this server's client key and known_hosts,
    /// strict host key checking, no agent keys, no prompts, no user ssh config.
    pub fn ssh_command(&self) -> String {
        format!(
            "ssh -F /dev/null -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes",
            self.client_key.display(),
            self.known_hosts.display()
        )
    }

    /// sshd's log (`-e`: its stderr, LogLevel VERBOSE).
    pub fn log(&self) -> String {
        self.server.log_text()
    }
}

/// sshd_config for one test server: loopback only, root by key only, no PAM (it would need a
/// session stack), no StrictModes (the keys live in a temp dir), and `GIT_PROTOCOL` accepted so git
/// speaks protocol v2 over ssh (partial clone needs it).
fn sshd_config(port: u16, host_key: &Path, authorized_keys: &Path) -> String {
    format!(
        "Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AcceptEnv GIT_PROTOCOL
LogLevel VERBOSE
",
        host_key = host_key.display(),
        authorized_keys = authorized_keys.display(),
    )
}

impl Server {
    /// Kills the server (as dropping it does), runs `down` while nothing listens on `port`, then
    /// starts the same program again (same arguments, environment and working directory, read
    /// from `/proc`) on the same port, appending to the same log; waits until it accepts
    /// connections. An upstream that goes away and comes back where it was.
    fn restart_after(self, port: u16, down: impl FnOnce()) -> Server {
        let pid = self.child.id();
        let read = |what: &str| {
            fs::read(format!("/proc/{pid}/{what}"))
                .unwrap_or_else(|e| panic!("read /proc/{pid}/{what}: {e}"))
        };
        let split = |bytes: Vec<u8>| -> Vec<std::ffi::OsString> {
            use std::os::unix::ffi::OsStringExt;
            bytes
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| std::ffi::OsString::from_vec(s.to_vec()))
                .collect()
        };
        let argv = split(read("cmdline"));
        let env = split(read("environ"));
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).expect("read the server's cwd");
        let log = self.log.clone();
        drop(self);
        down();
        for attempt in 1..=SERVER_START_ATTEMPTS {
            let log_file = fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]).current_dir(&cwd).env_clear();
            for kv in &env {
                let kv = kv.to_string_lossy();
                if let Some((k, v)) = kv.split_once('=') {
                    cmd.env(k, v);
                }
            }
            cmd.process_group(0)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("dup log file"))
                .stderr(log_file);
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot restart {argv:?}: {e}"));
            let mut server = Server {
                child,
                log: log.clone(),
            };
            let Err(status) = server.wait_accepting(&format!("{argv:?}"), port) else {
                return server;
            };
            // The port may linger for a moment after the kill: try again.
            if attempt < SERVER_START_ATTEMPTS {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            panic!(
                "{argv:?} exited ({status}) when restarted on port {port}; its log:\n{}",
                server.log_text()
            );
        }
        unreachable!("the last attempt panics instead of trying again")
    }
}

impl GitDaemon {
    /// Kills the daemon, runs `down` while the upstream is unreachable (connections refused),
    /// then starts it again on the same port: the same URLs work again.
    pub fn restart_after(self, down: impl FnOnce()) -> GitDaemon {
        let port = self.port;
        GitDaemon {
            port,
            server: self.server.restart_after(port, down),
        }
    }
}

impl HttpServer {
    /// Kills lighttpd, runs `down` while the upstream is unreachable (connections refused), then
    /// starts it again on the same port with the same config: the same URLs work again.
    pub fn restart_after(self, down: impl FnOnce()) -> HttpServer {
        let port = self.port;
        HttpServer {
            port,
            access_log: self.access_log,
            ca: self.ca,
            server: self.server.restart_after(port, down),
        }
    }
}

/// A tmpfs mounted for one test, unmounted when dropped (also when the test fails).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// How a [`Relay`] treats a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relaying {
    /// What the server answers passes 64 bytes every 100 ms: each read of the client's comes well
    /// within any per-read timeout, while a whole answer takes minutes.
    Trickle,
    /// An HTTP proxy: the client's `CONNECT` request is answered 200, then the tunnel leads to
    /// the target, whatever host it named.
    Connect,
}

/// A TCP relay on 127.0.0.1 in front of `target`, counting the connections it relays (see
/// [`Relaying`]). Its threads end with the connections; the listener lives as long as the test
/// process.
pub struct Relay {
    pub port: u16,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    pub fn start(target: u16, how: Relaying) -> Relay {
        use std::io::Read as _;
        let trickle = how == Relaying::Trickle;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&connections);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                if how == Relaying::Connect && !tunnel(&mut client) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    return;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (mut up_from, mut up_to) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_from, &mut up_to);
                    let _ = up_to.shutdown(std::net::Shutdown::Write);
                });
                let (mut down_from, mut down_to) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; if trickle { 64 } else { 64 << 10 }];
                    loop {
                        match down_from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if down_to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                        if trickle {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    let _ = down_to.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Relay { port, connections }
    }

    /// Connections relayed so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads an HTTP `CONNECT` request's head from `client` and answers 200; false (the connection
/// dropped) for anything else.
fn tunnel(client: &mut TcpStream) -> bool {
    use std::io::Read as _;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) if head.len() < 8192 => head.push(byte[0]),
            _ => return false,
        }
    }
    head.starts_with(b"CONNECT ")
        && client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .is_ok()
}

//! ssh upstreams through the system's OpenSSH client, as git itself reaches them: one `ssh`
//! process per fetch, running `git-upload-pack` on the server, its standard input and output
//! carrying git's protocol. `file://` upstreams the same way without ssh: `git-upload-pack` of
//! this machine ([`Session::local`]).
//!
//! The user's ssh_config, agent and ProxyJump apply. plumb adds what a daemon needs: never a
//! prompt (`BatchMode=yes`), never an unknown or changed host key (`StrictHostKeyChecking=yes`,
//! the config's `known_hosts` as the only files when it names any), never a write to known_hosts
//! (`UpdateHostKeys=no`), only the configured `ssh_key` when there is one (`IdentitiesOnly`), and
//! a connect bounded by the fetch's deadline. ssh's own failures (exit status 255) are turned
//! into one line saying what to fix.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::Context;
use crate::exec::{self, Piped, Spec};
use crate::git::url::{SshEndpoint, ssh_endpoint};

/// The ssh client; `PLUMB_SSH` names another (tests, or a wrapper of the operator's).
fn ssh_program() -> String {
    std::env::var("PLUMB_SSH").unwrap_or_else(|_| "ssh".to_owned())
}

/// git's server side for `file://` upstreams, from the git package.
fn upload_pack_program() -> String {
    "git-upload-pack".to_owned()
}

/// The path of a `file:///path` (or `file://localhost/path`) URL, percent escapes decoded.
fn local_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .get(..7)?
        .eq_ignore_ascii_case("file://")
        .then(|| &url[7..])?;
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    path.starts_with('/')
        .then(|| PathBuf::from(crate::git::url::percent_decode(path)))
}

/// Where an ssh URL points: the endpoint and the repository path on the server.
#[derive(Debug, PartialEq, Eq)]
struct Remote {
    endpoint: SshEndpoint,
    path: String,
}

fn parse(url: &str) -> Option<Remote> {
    let endpoint = ssh_endpoint(url)?;
    let path = match url.split_once("://") {
        Some((_, rest)) => {
            let path = &rest[rest.find('/')?..];
            // `ssh://host/~user/repo` means `~user/repo`, as git reads it.
            path.strip_prefix("/~")
                .map_or_else(|| path.to_owned(), |home| format!("~{home}"))
        }
        None => {
            let after = match url
                .strip_prefix('[')
                .or_else(|| url.split_once("@[").map(|(_, rest)| rest))
            {
                Some(bracketed) => bracketed.split_once("]:")?.1,
                None => url.split_once(':')?.1,
            };
            after.to_owned()
        }
    };
    (!path.is_empty()).then_some(Remote { endpoint, path })
}

/// The `ssh` command line for `remote`.
fn command(ctx: &Context, remote: &Remote) -> Spec {
    let mut spec = Spec::new(ssh_program(), Duration::ZERO)
        .arg("-x")
        .arg("-T")
        .arg("-o")
        .arg("BatchMode=yes")
        .arg("-o")
        .arg("StrictHostKeyChecking=yes")
        .arg("-o")
        .arg("UpdateHostKeys=no");
    if let Some(remaining) = ctx.remaining() {
        let seconds = remaining.as_secs_f64().ceil().max(1.0);
        spec = spec.arg("-o").arg(format!("ConnectTimeout={seconds}"));
    }
    if !ctx.known_hosts.is_empty() {
        let files: Vec<String> = ctx
            .known_hosts
            .iter()
            .map(|f| format!("\"{}\"", f.display()))
            .collect();
        spec = spec
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", files.join(" ")))
            .arg("-o")
            .arg("GlobalKnownHostsFile=/dev/null");
    }
    if let Some(key) = &ctx.ssh_key {
        spec = spec.arg("-i").arg(key).arg("-o").arg("IdentitiesOnly=yes");
    }
    let endpoint = &remote.endpoint;
    if endpoint.port != 22 {
        spec = spec.arg("-p").arg(endpoint.port.to_string());
    }
    if let Some(user) = &endpoint.user {
        spec = spec.arg("-l").arg(user);
    }
    spec.arg("--").arg(&endpoint.host).arg(format!(
        "git-upload-pack {}",
        exec::shell_quote(&remote.path)
    ))
}

/// A running `ssh` (or, for `file://`, a local `git-upload-pack`) whose every read and write
/// obeys the fetch's context.
pub(super) struct Session {
    ctx: Arc<Context>,
    /// The ssh upstream, whose failures are put in words; `None` for a local one.
    remote: Option<Remote>,
    child: Piped,
}

impl Session {
    /// Starts `ssh` for the upstream `url`.
    pub(super) fn open(ctx: &Arc<Context>, url: &str) -> io::Result<Session> {
        let remote = parse(url).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an ssh URL (ssh://[user@]host[:port]/path or [user@]host:path)",
            )
        })?;
        if let Some(key) = &ctx.ssh_key
            && !key.exists()
        {
            return Err(ctx.refuse(format!("ssh key {} does not exist", key.display())));
        }
        let spec = command(ctx, &remote);
        Session::spawn(ctx, &spec, Some(remote))
    }

    /// `git-upload-pack` on a repository of this machine, as git fetches a `file://` URL: the
    /// pack streams through a pipe into libgit2's indexer, so memory stays bounded whatever the
    /// blobs' size (libgit2's own local transport builds the pack in memory). Without
    /// `--strict`, as git runs it: the path may be a bare repository or a work tree's top.
    pub(super) fn local(ctx: &Arc<Context>, url: &str) -> io::Result<Session> {
        let path = local_path(url)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file:///path URL"))?;
        let spec = Spec::new(upload_pack_program(), Duration::ZERO).arg(&path);
        Session::spawn(ctx, &spec, None)
    }

    fn spawn(ctx: &Arc<Context>, spec: &Spec, remote: Option<Remote>) -> io::Result<Session> {
        ctx.check()?;
        let child = Piped::spawn(spec).map_err(io::Error::other)?;
        for fd in [
            child.stdout.as_fd(),
            child.stdin.as_ref().expect("open").as_fd(),
        ] {
            let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
            fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        }
        Ok(Session {
            ctx: Arc::clone(ctx),
            remote,
            child,
        })
    }

    /// Waits until `fd` is ready for `events` or the slice ends.
    fn wait(&self, ready: PollFlags, write: bool) -> io::Result<()> {
        let slice = self.ctx.slice()?;
        let timeout = PollTimeout::try_from(slice).unwrap_or(PollTimeout::MAX);
        let fd = if write {
            match &self.child.stdin {
                Some(stdin) => stdin.as_fd(),
                None => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        } else {
            self.child.stdout.as_fd()
        };
        let mut fds = [PollFd::new(fd, ready)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The error to give libgit2 when ssh's pipes closed: ssh's own failure in words when it
    /// exited with one, else `fallback`.
    fn ended(&mut self, fallback: io::Error) -> io::Error {
        match self.child.exit_within(Duration::from_secs(2)) {
            Ok(Some(exit)) if !exit.success() => self.explain(exit),
            _ => fallback,
        }
    }

    fn explain(&self, exit: exec::Output) -> io::Error {
        let failure = match &self.remote {
            Some(remote) => explain(&exit.stderr, &remote.endpoint, &self.ctx),
            None => Failure::Other(first_line(&exit.stderr).to_owned()),
        };
        match failure {
            Failure::Refused(reason) => self.ctx.refuse(reason),
            Failure::Other(line) => io::Error::other(line),
        }
    }
}

impl Read for Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.wait(PollFlags::POLLIN, false)?;
            match self.child.stdout.read(buf) {
                Ok(0) => {
                    let eof =
                        io::Error::new(io::ErrorKind::UnexpectedEof, "ssh closed the connection");
                    return match self.ended(eof) {
                        e if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                        e => Err(e),
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

impl Write for Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.wait(PollFlags::POLLOUT, true)?;
            let Some(stdin) = self.child.stdin.as_mut() else {
                return Err(io::ErrorKind::BrokenPipe.into());
            };
            match stdin.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(self.ended(e)),
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What ssh's standard error says went wrong.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// plumb will not go on until the operator acts (host key, credentials): what to do.
    Refused(String),
    /// Anything else, as ssh said it (its first meaningful line).
    Other(String),
}

fn explain(stderr: &str, endpoint: &SshEndpoint, ctx: &Context) -> Failure {
    let name = endpoint.known_hosts_name();
    let files = known_hosts_files(ctx);
    let listed = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let first = files.first().map_or_else(
        || "~/.ssh/known_hosts".to_owned(),
        |f| f.display().to_string(),
    );
    let keyscan = endpoint.keyscan_command();
    if stderr.contains("Host key verification failed") {
        if stderr.contains("REVOKED HOST KEY") {
            return Failure::Refused(format!(
                "host key for {name} is marked @revoked in {listed}; refusing to connect"
            ));
        }
        if stderr.contains("HOST IDENTIFICATION HAS CHANGED") {
            let offered = offered_key(stderr);
            return Failure::Refused(format!(
                "host key for {name} does not match {listed} (the server offered {offered}); if the key really changed, replace the old line (ssh-keygen -R '{name}' -f {first}; {keyscan} >> {first})"
            ));
        }
        return Failure::Refused(format!(
            "host key for {name} not found in {listed}; add it with {keyscan} >> {first}"
        ));
    }
    if stderr.contains("Permission denied") {
        let user = endpoint.user.clone().unwrap_or_else(local_user);
        let tried = match &ctx.ssh_key {
            Some(key) => format!("key {}", key.display()),
            None => "the ssh agent and the default keys of ~/.ssh".to_owned(),
        };
        return Failure::Refused(format!(
            "ssh authentication as {user} to {name} failed; tried {tried}"
        ));
    }
    let line = first_line(stderr);
    Failure::Other(format!(
        "ssh: {}",
        line.strip_prefix("ssh: ").unwrap_or(line)
    ))
}

/// The first line of a child's standard error that says something.
fn first_line(stderr: &str) -> &str {
    stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
        .unwrap_or("failed and said nothing")
}

/// "ED25519 SHA256:..." from ssh's changed-key banner, as far as it says.
fn offered_key(stderr: &str) -> String {
    let kind = stderr
        .split("The fingerprint for the ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next());
    let fingerprint = stderr
        .split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .map(|w| w.trim_end_matches('.'));
    match (kind, fingerprint) {
        (Some(k), Some(f)) => format!("{k} {f}"),
        (None, Some(f)) => f.to_owned(),
        _ => "another key".to_owned(),
    }
}

/// The known_hosts files ssh reads: the configured ones, else OpenSSH's defaults.
fn known_hosts_files(ctx: &Context) -> Vec<PathBuf> {
    if !ctx.known_hosts.is_empty() {
        return ctx.known_hosts.clone();
    }
    let mut files = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        files.push(Path::new(&home).join(".ssh/known_hosts"));
    }
    files.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
    files
}

/// The name of the user plumb runs as: what `ssh` logs in as when the URL names no user.
fn local_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map_or_else(|| "root".to_owned(), |u| u.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::Transport;

    fn remote(url: &str) -> (String, String) {
        let r = parse(url).unwrap();
        (r.endpoint.known_hosts_name(), r.path)
    }

    #[test]
    fn local_paths() {
        assert_eq!(
            local_path("file:///srv/a%20b.git"),
            Some("/srv/a b.git".into())
        );
        assert_eq!(local_path("file://localhost/srv/a"), Some("/srv/a".into()));
        assert_eq!(local_path("file://host/srv/a"), None);
        assert_eq!(local_path("/srv/a"), None);
    }

    #[test]
    fn paths_on_the_server() {
        assert_eq!(
            remote("ssh://git@h:2222/srv/r.git"),
            ("[h]:2222".into(), "/srv/r.git".into())
        );
        assert_eq!(remote("ssh://h/~u/r.git"), ("h".into(), "~u/r.git".into()));
        assert_eq!(
            remote("git@github.com:o/r.git"),
            ("github.com".into(), "o/r.git".into())
        );
        assert_eq!(remote("[::1]:r.git"), ("::1".into(), "r.git".into()));
        assert_eq!(remote("u@[::1]:/r.git"), ("::1".into(), "/r.git".into()));
        assert!(parse("ssh://h").is_none());
        assert!(parse("https://h/r").is_none());
    }

    fn words(spec: &Spec) -> Vec<String> {
        spec.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_command_line_never_prompts_and_trusts_only_known_keys() {
        let transport = Transport {
            ssh_key: Some("/etc/plumb/id".into()),
            known_hosts: vec!["/etc/plumb/known hosts".into()],
            ..Transport::default()
        };
        let ctx = Context::new("u", &transport);
        let spec = command(&ctx, &parse("ssh://deploy@h:2222/srv/it's.git").unwrap());
        assert_eq!(
            words(&spec).join(" "),
            "-x -T -o BatchMode=yes -o StrictHostKeyChecking=yes -o UpdateHostKeys=no \
             -o UserKnownHostsFile=\"/etc/plumb/known hosts\" -o GlobalKnownHostsFile=/dev/null \
             -i /etc/plumb/id -o IdentitiesOnly=yes -p 2222 -l deploy -- h \
             git-upload-pack '/srv/it'\\''s.git'"
        );
        let plain = command(
            &Context::new("u", &Transport::default()),
            &parse("h:r.git").unwrap(),
        );
        assert_eq!(
            words(&plain).join(" "),
            "-x -T -o BatchMode=yes -o StrictHostKeyChecking=yes -o UpdateHostKeys=no -- h git-upload-pack r.git"
        );
    }

    #[test]
    fn ssh_failures_say_what_to_fix() {
        let transport = Transport {
            known_hosts: vec!["/k".into()],
            ..Transport::default()
        };
        let ctx = Context::new("u", &transport);
        let endpoint = parse("ssh://root@127.0.0.1:2222/r").unwrap().endpoint;
        let unknown = "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\r\nHost key verification failed.\r\n";
        assert_eq!(
            explain(unknown, &endpoint, &ctx),
            Failure::Refused(
                "host key for [127.0.0.1]:2222 not found in /k; add it with ssh-keyscan -p 2222 127.0.0.1 >> /k".into()
            )
        );
        let changed = "@@@\r\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\n@@@\r\nThe fingerprint for the ED25519 key sent by the remote host is\nSHA256:abc.\r\nHost key verification failed.\r\n";
        let Failure::Refused(text) = explain(changed, &endpoint, &ctx) else {
            panic!("a changed key is a refusal");
        };
        assert!(
            text.starts_with("host key for [127.0.0.1]:2222 does not match /k (the server offered ED25519 SHA256:abc)"),
            "{text}"
        );
        assert_eq!(
            explain("root@127.0.0.1: Permission denied (publickey).\r\n", &endpoint, &ctx),
            Failure::Refused(
                "ssh authentication as root to [127.0.0.1]:2222 failed; tried the ssh agent and the default keys of ~/.ssh".into()
            )
        );
        assert_eq!(
            explain(
                "\nssh: connect to host 127.0.0.1 port 2222: Connection refused\r\n",
                &endpoint,
                &ctx
            ),
            Failure::Other("ssh: connect to host 127.0.0.1 port 2222: Connection refused".into())
        );
    }
}

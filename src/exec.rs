//! The one place plumb spawns a process.
//!
//! plumb does its work in-process (git through libgit2, systemd over D-Bus). A few things have no
//! library interface worth the weight, such as reading a unit's last journal lines for an error
//! message; they go through [`run`], which bounds how long a child may take and captures what it
//! printed, so a hung helper can never hold up an apply. Keeping every spawn here makes the rule
//! "no code spawns a process" checkable with one grep.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

/// Why a child process could not give its output.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The program could not be started (missing, not executable, ...).
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading the child's output or waiting for it failed.
    #[error("{program}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The child ran longer than allowed and was killed.
    #[error("{program}: killed after {}", humantime::format_duration(*.timeout))]
    TimedOut { program: String, timeout: Duration },
}

/// What a finished child left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The exit code; `None` when a signal ended the child.
    pub code: Option<i32>,
    /// Standard output, decoded lossily.
    pub stdout: String,
    /// Standard error, decoded lossily.
    pub stderr: String,
}

impl Output {
    /// Whether the child exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// How the child failed, on one line for a state's info: its exit status, then the last
    /// `lines` non-empty lines it printed (stdout, then stderr), joined by ` | `.
    pub fn failure(&self, lines: usize) -> String {
        let status = match self.code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_owned(),
        };
        let printed: Vec<&str> = self
            .stdout
            .lines()
            .chain(self.stderr.lines())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        match &printed[printed.len().saturating_sub(lines)..] {
            [] => status,
            tail => format!("{status}: {}", tail.join(" | ")),
        }
    }
}

/// A child to run: what [`run_with`] needs beyond a program and its arguments.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub program: String,
    pub args: Vec<std::ffi::OsString>,
    /// Bytes written to the child's standard input (then closed); `None` gives it /dev/null.
    pub stdin: Option<Vec<u8>>,
    /// Variables added to the inherited environment.
    pub env: Vec<(String, std::ffi::OsString)>,
    /// The working directory; the daemon's own when `None`.
    pub dir: Option<std::path::PathBuf>,
    /// How long the child may run before it is killed.
    pub timeout: Duration,
}

impl Spec {
    pub fn new(program: impl Into<String>, timeout: Duration) -> Spec {
        Spec {
            program: program.into(),
            timeout,
            ..Spec::default()
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Spec {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn stdin(mut self, bytes: Vec<u8>) -> Spec {
        self.stdin = Some(bytes);
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl AsRef<OsStr>) -> Spec {
        self.env.push((key.into(), value.as_ref().to_owned()));
        self
    }

    pub fn dir(mut self, dir: impl Into<std::path::PathBuf>) -> Spec {
        self.dir = Some(dir.into());
        self
    }
}

/// Runs `program` with `args`, stdin from /dev/null, and returns its output; a child still
/// running after `timeout` is killed (and reaped) and [`ExecError::TimedOut`] returned. A non-zero
/// exit is not an error here: the caller decides what it means.
pub async fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<Output, ExecError> {
    let mut spec = Spec::new(program, timeout);
    spec.args = args.iter().map(|a| a.as_ref().to_owned()).collect();
    run_with(spec).await
}

/// Runs a [`Spec`]: like [`run`], with standard input, environment and working directory.
pub async fn run_with(spec: Spec) -> Result<Output, ExecError> {
    use tokio::io::AsyncWriteExt;
    let program = spec.program.clone();
    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in &spec.env {
        command.env(k, v);
    }
    if let Some(dir) = &spec.dir {
        command.current_dir(dir);
    }
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    let feed = child.stdin.take().zip(spec.stdin).map(|(mut pipe, bytes)| {
        tokio::spawn(async move {
            // A child that exits without reading all of its input is not an error here.
            let _ = pipe.write_all(&bytes).await;
        })
    });
    // Dropping the future on timeout drops the child, which kills it (kill_on_drop); tokio reaps it.
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let wait = async {
        let (stdout, stderr, status) = tokio::join!(capture(stdout), capture(stderr), child.wait());
        status.map(|status| (status, stdout, stderr))
    };
    let result = match tokio::time::timeout(spec.timeout, wait).await {
        Ok(Ok((status, stdout, stderr))) => Ok(Output {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }),
        Ok(Err(source)) => Err(ExecError::Wait { program, source }),
        Err(_) => Err(ExecError::TimedOut {
            program,
            timeout: spec.timeout,
        }),
    };
    if let Some(feed) = feed {
        feed.abort();
    }
    result
}

/// The most of each output stream kept; the rest is read and dropped, so a child printing without
/// end (a check on a hostile revision, a broken remote plumbctl) costs time, bounded by the
/// timeout, but not memory. The control API's answers are bounded the same (`ctl`).
pub const MAX_OUTPUT: usize = 64 << 20;

/// Reads `pipe` to its end, keeping the first [`MAX_OUTPUT`] bytes.
async fn capture(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else {
        return kept;
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// [`run_with`] from a thread that is not a runtime worker (the daemon's blocking git jobs, or
/// plain threads in tests): uses the current runtime when there is one, else a small one of its own.
pub fn run_blocking(spec: Spec) -> Result<Output, ExecError> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(run_with(spec)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ExecError::Spawn {
                program: spec.program.clone(),
                source,
            })?
            .block_on(run_with(spec)),
    }
}

/// A child this process talks to through pipes while it runs (ssh carrying git's protocol). Its
/// standard error goes to an unnamed temporary file, read once the child failed, so a chatty
/// child can never block on a full pipe nobody reads. Dropping it kills and reaps the child.
#[derive(Debug)]
pub struct Piped {
    program: String,
    child: std::process::Child,
    /// The child's standard input; `None` once closed.
    pub stdin: Option<std::process::ChildStdin>,
    /// The child's standard output.
    pub stdout: std::process::ChildStdout,
    stderr: std::fs::File,
}

impl Piped {
    /// Starts `spec`'s program with piped standard input and output (`spec.stdin` and
    /// `spec.timeout` do not apply: the caller bounds each read and write itself).
    pub fn spawn(spec: &Spec) -> Result<Piped, ExecError> {
        let spawn_error = |source| ExecError::Spawn {
            program: spec.program.clone(),
            source,
        };
        let stderr = tempfile::tempfile().map_err(spawn_error)?;
        let mut command = std::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.try_clone().map_err(spawn_error)?);
        for (k, v) in &spec.env {
            command.env(k, v);
        }
        if let Some(dir) = &spec.dir {
            command.current_dir(dir);
        }
        let mut child = command.spawn().map_err(spawn_error)?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            unreachable!("both pipes were requested");
        };
        Ok(Piped {
            program: spec.program.clone(),
            child,
            stdin: Some(stdin),
            stdout,
            stderr,
        })
    }

    /// The child's exit, waiting at most `limit` for it; `None` while it still runs.
    pub fn exit_within(&mut self, limit: Duration) -> Result<Option<Output>, ExecError> {
        use std::io::{Read, Seek};
        let started = std::time::Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => return Ok(None),
                Err(source) => {
                    return Err(ExecError::Wait {
                        program: self.program.clone(),
                        source,
                    });
                }
            }
        };
        let mut stderr = Vec::new();
        let read = self.stderr.rewind().and_then(|()| {
            (&self.stderr)
                .take(MAX_OUTPUT as u64)
                .read_to_end(&mut stderr)
        });
        if let Err(source) = read {
            return Err(ExecError::Wait {
                program: self.program.clone(),
                source,
            });
        }
        Ok(Some(Output {
            code: status.code(),
            stdout: String::new(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }))
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        self.stdin.take();
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `word` as one word for a POSIX shell (`sh -c` commands, ssh's remote command line): unchanged
/// when it is only safe characters, else in single quotes.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_output_and_exit_code() {
        let out = run(
            "sh",
            &["-c", "echo out; echo err >&2; exit 3"],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(out.code, Some(3));
        assert!(!out.success());
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        assert_eq!(out.failure(1), "exit status 3: err");
        assert_eq!(out.failure(5), "exit status 3: out | err");
    }

    #[tokio::test]
    async fn endless_output_is_cut_not_kept() {
        let out = run(
            "sh",
            &["-c", "head -c 70000000 /dev/zero; echo done >&2"],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert!(out.success());
        assert_eq!(out.stdout.len(), MAX_OUTPUT);
        assert_eq!(out.stderr, "done\n");
    }

    #[tokio::test]
    async fn a_hung_child_is_killed_at_the_deadline() {
        let started = std::time::Instant::now();
        let err = run("sleep", &["30"], Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::TimedOut { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(err.to_string(), "sleep: killed after 200ms");
    }

    #[test]
    fn quoting_for_the_remote_shell() {
        assert_eq!(shell_quote("docker-compose@caddy"), "docker-compose@caddy");
        assert_eq!(shell_quote("/opt/bin/plumbctl"), "/opt/bin/plumbctl");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's;rm"), r"'it'\''s;rm'");
    }

    #[test]
    fn stdin_env_and_dir_reach_the_child_from_a_plain_thread() {
        let dir = tempfile::tempdir().unwrap();
        let out = run_blocking(
            Spec::new("sh", Duration::from_secs(10))
                .arg("-c")
                .arg("read line; echo \"$line $PLUMB_X $(pwd)\"")
                .stdin(b"hello\n".to_vec())
                .env("PLUMB_X", "x")
                .dir(dir.path()),
        )
        .unwrap();
        let pwd = dir.path().canonicalize().unwrap();
        assert_eq!(out.stdout, format!("hello x {}\n", pwd.display()));
    }

    #[test]
    fn a_piped_child_talks_and_its_errors_are_kept() {
        use std::io::{Read, Write};
        let mut child = Piped::spawn(
            &Spec::new("sh", Duration::ZERO)
                .arg("-c")
                .arg("read line; echo \"got $line\"; echo oops >&2; exit 4"),
        )
        .unwrap();
        child.stdin.as_mut().unwrap().write_all(b"ping\n").unwrap();
        let mut out = String::new();
        child.stdout.read_to_string(&mut out).unwrap();
        assert_eq!(out, "got ping\n");
        let exit = child.exit_within(Duration::from_secs(30)).unwrap().unwrap();
        assert_eq!((exit.code, exit.stderr.as_str()), (Some(4), "oops\n"));
    }

    #[test]
    fn dropping_a_piped_child_ends_it() {
        let mut child = Piped::spawn(&Spec::new("sleep", Duration::ZERO).arg("600")).unwrap();
        assert!(child.exit_within(Duration::ZERO).unwrap().is_none());
        let pid = child.child.id();
        drop(child);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[tokio::test]
    async fn a_missing_program_names_itself() {
        let err = run(
            "/nonexistent/plumb-helper",
            &[] as &[&str],
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(
            crate::error::chain(&err)
                .starts_with("cannot run /nonexistent/plumb-helper: No such file"),
            "{err}"
        );
    }
}

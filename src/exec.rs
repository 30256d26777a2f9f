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
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading the child's output or waiting for it failed.
    #[error("{program}: {source}")]
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
}

/// Runs `program` with `args`, stdin from /dev/null, and returns its output; a child still
/// running after `timeout` is killed (and reaped) and [`ExecError::TimedOut`] returned. A non-zero
/// exit is not an error here: the caller decides what it means.
pub async fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<Output, ExecError> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ExecError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    // Dropping the future on timeout drops the child, which kills it (kill_on_drop); tokio reaps it.
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(source)) => Err(ExecError::Wait {
            program: program.to_owned(),
            source,
        }),
        Err(_) => Err(ExecError::TimedOut {
            program: program.to_owned(),
            timeout,
        }),
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
            err.to_string()
                .starts_with("cannot run /nonexistent/plumb-helper:"),
            "{err}"
        );
    }
}

//! The state directory's layout, and the one way plumb writes a file another process reads.
//!
//! ```text
//! <state_dir>/stores/<store id>.git     bare object store per upstream URL
//! <state_dir>/state/<service>.json      the service's persisted state (service::Service)
//! <state_dir>/state/<service>.rev       the deployed revision: watched by systemd, the hand-over to apply
//! <state_dir>/state/<service>.index     git index of the service's checkout
//! <state_dir>/state/<service>.applied   the last apply's outcome (apply::Outcome, JSON)
//! <state_dir>/checkouts/<service>/      the checkout, unless the config sets `mount`
//! ```

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Paths under one state directory; injected so tests use temp dirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn stores(&self) -> PathBuf {
        self.root.join("stores")
    }

    pub fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn service_state(&self, service: &str) -> PathBuf {
        self.state().join(format!("{service}.json"))
    }

    pub fn service_rev(&self, service: &str) -> PathBuf {
        self.state().join(format!("{service}.rev"))
    }

    pub fn service_index(&self, service: &str) -> PathBuf {
        self.state().join(format!("{service}.index"))
    }

    /// The outcome of the last `plumb apply` of `service`: which revision the unit took, or why it
    /// did not. Compared with [`Layout::service_rev`] to know whether an apply is due.
    pub fn service_applied(&self, service: &str) -> PathBuf {
        self.state().join(format!("{service}.applied"))
    }

    /// Present while a checkout of `service` runs (it holds the head being checked out): a
    /// checkout interrupted by a crash or a failure is redone, not taken for local edits.
    pub fn service_deploying(&self, service: &str) -> PathBuf {
        self.state().join(format!("{service}.deploying"))
    }

    /// Where a new revision of `service` is checked out for its `check` command, apart from the
    /// live checkout; removed after each check.
    pub fn staging(&self, service: &str) -> PathBuf {
        self.root.join("staging").join(service)
    }

    /// Creates the directories the daemon writes into, and removes the temp files that
    /// [`write_atomic`] calls of dead processes left in the state directory (the daemon starts
    /// here, after a crash or a `kill -9` too).
    pub fn create(&self) -> io::Result<()> {
        fs::create_dir_all(self.stores())?;
        fs::create_dir_all(self.state())?;
        sweep_temp_files(&self.state());
        Ok(())
    }
}

/// [`write_atomic`]'s temp files start with this, then the writer's pid and a dash.
const TEMP_PREFIX: &str = ".plumb-";
const TEMP_SUFFIX: &str = ".tmp";

/// Removes the temp files of [`write_atomic`] in `dir` whose writer is no longer running: a
/// process killed between creating one and renaming it over its target leaves it behind for good
/// otherwise. A live writer's (another plumb, `plumb apply`) are left alone. Failures are logged,
/// never fatal: a stray temp file wastes a few bytes, nothing more.
pub fn sweep_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .filter(|n| n.ends_with(TEMP_SUFFIX))
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // Signal 0 only asks whether the process exists (EPERM: it does, as another user).
        let alive = pid <= 0
            || !matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                Err(nix::errno::Errno::ESRCH)
            );
        if alive {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => {
                tracing::warn!(file = %entry.path().display(), pid, "removed a temp file a dead writer left")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %entry.path().display(), "cannot remove a stale temp file: {e}")
            }
        }
    }
}

/// Replaces `path` with `bytes` so that a reader, or the file system after a crash at any instruction,
/// sees either the old content or the new, never a mix: temp file in the same directory, fsync,
/// rename over, fsync the directory. The temp file is `.plumb-<pid>-XXXXXX.tmp`, removed when
/// any step fails (a full disk included); one left by a killed process is removed by
/// [`sweep_temp_files`] when the daemon starts.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.rev");
        write_atomic(&p, b"one\n").unwrap();
        write_atomic(&p, b"two\n").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two\n");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.rev")]);
    }

    #[test]
    fn temp_files_of_dead_writers_are_swept_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = std::process::id();
        for name in [
            format!(".plumb-{dead}-abc123.tmp"),
            format!(".plumb-{mine}-def456.tmp"),
            "a.json".to_owned(),
            ".plumb-xyz.tmp".to_owned(),
            format!(".plumb-{dead}-abc123.json"),
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        sweep_temp_files(dir.path());
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want = vec![
            format!(".plumb-{mine}-def456.tmp"),
            format!(".plumb-{dead}-abc123.json"),
            ".plumb-xyz.tmp".to_owned(),
            "a.json".to_owned(),
        ];
        want.sort();
        assert_eq!(names, want);
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming over a directory fails after the temp file was written and synced.
        fs::create_dir(dir.path().join("x.json")).unwrap();
        fs::write(dir.path().join("x.json/keep"), b"").unwrap();
        assert!(write_atomic(&dir.path().join("x.json"), b"{}").is_err());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.json")]);
    }
}

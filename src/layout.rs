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

    /// Where a new revision of `service` is checked out for its `check` command, apart from the
    /// live checkout; removed after each check.
    pub fn staging(&self, service: &str) -> PathBuf {
        self.root.join("staging").join(service)
    }

    /// Creates the directories the daemon writes into.
    pub fn create(&self) -> io::Result<()> {
        fs::create_dir_all(self.stores())?;
        fs::create_dir_all(self.state())
    }
}

/// Replaces `path` with `bytes` so that a reader, or the file system after a crash at any instruction,
/// sees either the old content or the new, never a mix: temp file in the same directory, fsync,
/// rename over, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".plumb-")
        .suffix(".tmp")
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
}

//! The git engine: one bare object store per upstream, fetched in-process with libgit2, and
//! per-service checkouts that hold only the service's `link` paths at one revision.
//!
//! Layout on disk: `stores_dir/<store_id>.git` is a bare repository holding the full history of the
//! fetched branches of one upstream URL, under `refs/remotes/origin/<branch>`. It is shared by every
//! service that uses that URL. A service's files live in its own target directory, with its own
//! index file (a stat cache that makes in-place updates cheap and exact).
//!
//! Submodules:
//! - `url`: store names, URL redaction, ssh endpoints;
//! - `store`: opening, creating and healing stores;
//! - `fetch`: one fetch (one connection, only the wanted branches, plumb's own refs);
//! - `transport`: the bytes' way to the upstream: http(s) on rustls, ssh through OpenSSH,
//!   git://, each obeying the fetch's deadline and cancellation (and the crate's only `unsafe`,
//!   registering them with libgit2);
//! - `history`: `changed_paths` and `last_change`;
//! - `inspect`: what a revision must not hold before it is checked out (escaping symlinks,
//!   oversized files);
//! - `checkout`: per-service checkouts, including the symlink scrub and the owner;
//! - `drift`: local edits in a checkout, by its stat data when that shows nothing could have
//!   changed, by libgit2's diff otherwise;
//! - `confined`: a directory tree worked on only through descriptors of its own directories;
//! - `stage`: all-or-nothing checkouts ([`Store::checkout_atomic`]): what changed is staged
//!   beside the checkout, then renamed in;
//! - `verify`: commit signatures (ssh and OpenPGP), checked with the real tools through `exec`.
//!
//! # Invariants the caller keeps
//! - **One thread per store.** All operations on one store (fetch, checkout, history) are
//!   serialised by the daemon: a checkout points the store's `HEAD` file at the service's
//!   previously deployed commit (libgit2 takes the checkout baseline from `HEAD`), and opening or
//!   fetching a store removes stale `*.lock` files left by a crash. Neither is safe with a
//!   concurrent user of the same store, including a second daemon.
//! - **Targets are plumb's.** A checkout overwrites, deletes and replaces anything under the link
//!   paths of its target; nothing else may write there but the service's `user`, to whom the
//!   checkout is given. The target's parent directory is root's: the checkout itself is opened
//!   without following a symlink, and everything below it only by directory descriptor
//!   (`confined`), so what the user does in it never makes plumb write, remove or chown outside.
//!
//! # Limits (libgit2 through git2 0.21)
//! - [`Transport::timeout`] is a deadline for the whole fetch, and [`Transport::cancel`] stops
//!   it: both are checked at every read and write of plumb's transports (at least every half
//!   second while one waits) and whenever libgit2 reports progress. A `file://` upstream is
//!   read by libgit2 itself, bounded by the progress callbacks only.
//! - Stores are never repacked or garbage-collected (libgit2 has no `gc`): each fetch that brings
//!   something adds one pack.
//! - libgit2 reads the usual git config files (`/etc/gitconfig`, `~/.gitconfig`), so settings such
//!   as `url.<base>.insteadOf` there apply to fetches; `http.proxy` does not (plumb's http
//!   transport takes the proxy from `ALL_PROXY`, `HTTPS_PROXY` or `HTTP_PROXY`, and ssh from
//!   ssh_config's `ProxyJump`).

mod checkout;
mod confined;
mod drift;
mod fetch;
mod history;
mod inspect;
mod stage;
mod store;
mod transport;
mod url;
mod verify;

/// Object ids as hex strings in the files plumb writes (state, apply outcomes): one encoding for
/// every `#[serde(with = ...)]`.
pub mod serde_hex {
    /// A required id.
    pub mod oid {
        use crate::git::Oid;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(oid: &Oid, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&oid.to_string())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Oid, D::Error> {
            let hex = String::deserialize(d)?;
            Oid::from_str(&hex).map_err(serde::de::Error::custom)
        }
    }

    /// An optional id (`null` when absent).
    pub mod opt_oid {
        use crate::git::Oid;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(oid: &Option<Oid>, s: S) -> Result<S::Ok, S::Error> {
            match oid {
                Some(o) => s.serialize_some(&o.to_string()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Oid>, D::Error> {
            let hex: Option<String> = Option::deserialize(d)?;
            hex.map(|h| Oid::from_str(&h).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub use drift::{DriftChecks, Ignored};
pub use git2::Oid;
pub use history::{FileChange, under_links};
pub use inspect::{DEFAULT_MAX_FILE_SIZE, Limits, human_size, name_problem};
pub(crate) use transport::{split_credentials, tls_config};
pub use url::{redact_url, repository_key, store_id};
pub use verify::Trust;

/// Errors of the git engine. Each names what it was working on (URL — always redacted —, path,
/// revision, branch); the cause (libgit2's, the file system's) is its `source`, so
/// [`crate::error::Chain`] tells an operator what failed, e.g.
/// `fetch git://127.0.0.1:9418/x.git: failed to connect to 127.0.0.1: Connection refused`.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// A file-system operation on a store failed (create, set aside, clean up).
    #[error("store {} for {url}: {action}", .path.display())]
    StoreIo {
        url: String,
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// libgit2 could not open, create or update a store.
    #[error("store {} for {url}", .path.display())]
    Store {
        url: String,
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    /// The fetch failed in libgit2 (network, protocol, server, or a damaged store).
    #[error("fetch {url}")]
    Fetch {
        url: String,
        #[source]
        source: git2::Error,
    },
    /// plumb refused to go on with a fetch: unknown or changed host key, no usable credentials.
    /// `reason` says what to fix.
    #[error("fetch {url}: {reason}")]
    Refused {
        url: String,
        reason: String,
        #[source]
        source: Option<git2::Error>,
    },
    /// A branch name that cannot be fetched (not a valid git ref name).
    #[error("fetch {url}: branch {branch:?}: {reason}")]
    Branch {
        url: String,
        branch: String,
        reason: &'static str,
    },
    /// [`Transport::cancel`] was set during the fetch (shutdown).
    #[error("fetch {url}: cancelled")]
    Cancelled { url: String },
    /// The fetch ran longer than [`Transport::timeout`].
    #[error("fetch {url}: timed out after {}", humantime::format_duration(*.timeout))]
    TimedOut { url: String, timeout: Duration },
    /// A revision given by a person (rollback) names no commit of the store.
    #[error("{url}: unknown revision {revision:?}")]
    Resolve {
        url: String,
        revision: String,
        #[source]
        source: git2::Error,
    },
    /// Reading a commit, tree or history that the store should have failed.
    #[error("{url}: reading {revision}")]
    Object {
        url: String,
        revision: String,
        #[source]
        source: git2::Error,
    },
    /// libgit2's checkout (or the per-service index) failed.
    #[error("checkout {revision} of {url} into {}", .path.display())]
    Checkout {
        url: String,
        path: PathBuf,
        revision: String,
        #[source]
        source: git2::Error,
    },
    /// A file-system operation of a checkout failed (creating the target, removing a symlink).
    #[error("checkout {revision} of {url} into {}: {action}", .path.display())]
    CheckoutIo {
        url: String,
        path: PathBuf,
        revision: String,
        action: String,
        #[source]
        source: std::io::Error,
    },
    /// [`Store::checkout`] or [`Store::checkout_as`] was given a target in which another user
    /// owns a directory (`dir`, owned by `uid`). libgit2 writes, replaces and removes files there
    /// by path, and that user could swap a directory on the way for a symlink to anywhere; such a
    /// checkout is only ever updated by [`Store::checkout_atomic`].
    #[error(
        "checkout {revision} of {url} into {}: {} belongs to uid {uid}, who could swap a path libgit2 writes through",
        .path.display(), .dir.display()
    )]
    HeldTarget {
        url: String,
        path: PathBuf,
        revision: String,
        dir: PathBuf,
        uid: u32,
    },
    /// A `link` path that would reach outside the checkout or is not a plain relative path.
    #[error("link {link:?}: {reason}")]
    Link { link: String, reason: &'static str },
    /// A revision refused before anything of it is checked out ([`Store::inspect`]): a symlink
    /// that leaves its link, a file larger than [`Limits::max_file_size`]. `commit` is the full
    /// hash, `path` the repository path of the offending entry.
    #[error("{url}: refusing {commit}: {path}: {reason}")]
    Hostile {
        url: String,
        commit: String,
        path: String,
        reason: String,
    },
    /// Giving a checkout's files to the service's `user` failed (unknown user, chown refused).
    #[error("checkout {revision} of {url} into {}", .path.display())]
    Owner {
        url: String,
        path: PathBuf,
        revision: String,
        #[source]
        source: Box<crate::owner::OwnerError>,
    },
    /// A commit that is not signed by a trusted key (or whose signature could not be checked):
    /// never deployed. `commit` is the full hash; `reason` says what is wrong with the signature.
    #[error("commit {}: {reason}", verify::short(.commit))]
    Unverified { commit: String, reason: String },
}

impl GitError {
    /// Whether this error means the store itself is damaged (objects, references or repository
    /// files unreadable), as opposed to network, authentication or input problems. Damage is healed
    /// by the next [`Store::fetch`]; other errors are not helped by re-creating the store.
    pub fn is_corruption(&self) -> bool {
        match self {
            GitError::Store { source, .. }
            | GitError::Fetch { source, .. }
            | GitError::Object { source, .. } => store::is_damage(source),
            GitError::Checkout { source, .. } => matches!(
                source.class(),
                git2::ErrorClass::Odb | git2::ErrorClass::Zlib | git2::ErrorClass::Object
            ),
            _ => false,
        }
    }
}

/// How to reach upstreams: credentials, host keys, limits. Shared by every fetch of a daemon.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// Private key for ssh upstreams (no passphrase), the only one offered; `None` leaves the
    /// choice to ssh (the agent, ssh_config's `IdentityFile`, `~/.ssh/id_*`).
    pub ssh_key: Option<PathBuf>,
    /// known_hosts files to check ssh host keys against; empty means `~/.ssh/known_hosts` and
    /// `/etc/ssh/ssh_known_hosts`. A host that is not in them is refused.
    pub known_hosts: Vec<PathBuf>,
    /// Give up on a fetch that runs longer than this, so one stuck upstream cannot hold its store
    /// thread forever: a deadline for the whole fetch, connect included (see the module doc).
    pub timeout: Option<Duration>,
    /// Set to abort a running fetch (shutdown).
    pub cancel: Arc<AtomicBool>,
}

/// What one fetch saw: the head of every requested branch, `None` when the branch does not exist
/// upstream (yet, or any more), including an upstream with no commits at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// Requested branch -> its head commit upstream, as now stored under
    /// `refs/remotes/origin/<branch>`; `None` when the branch does not exist upstream.
    pub heads: BTreeMap<String, Option<Oid>>,
    /// Branches this fetch force-updated: branch -> (old head, new head), the new head not a
    /// descendant of the old one (a force-push or rewrite upstream; logged at warn).
    pub rewritten: BTreeMap<String, (Oid, Oid)>,
}

/// A bare object store for one upstream URL, shared by every service on that upstream.
///
/// Not `Sync`: one thread owns a store and performs every operation on it (see the module doc).
pub struct Store {
    repo: git2::Repository,
    path: PathBuf,
    /// The URL as configured, credentials included: needed to fetch, never printed.
    url: String,
    /// [`redact_url`] of `url`: what errors and logs show.
    shown: String,
    /// Set when an operation hit damage; the next fetch heals the store first.
    damaged: Cell<bool>,
    /// Whether a fetch error that looks like damage may set the store aside. Such an error can
    /// also come from a broken upstream, and then re-creating the store does not help: so it heals
    /// at most once until a fetch succeeds again (damage found on the store itself always heals).
    heal_on_fetch_error: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// The store's directory (`stores_dir/<store_id>.git`), for logs and metrics.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The upstream URL without credentials, as errors show it.
    pub fn redacted_url(&self) -> &str {
        &self.shown
    }

    /// The commit that `spec` names: anything `git rev-parse` accepts (full or abbreviated hash,
    /// `<hash>~2`, ...), and a fetched branch by its plain name (`main`, looked up as
    /// `origin/main`). Rollback uses it to turn what a person typed into a commit.
    pub fn resolve(&self, spec: &str) -> Result<Oid, GitError> {
        let found = self
            .repo
            .revparse_single(spec)
            .or_else(|first| {
                self.repo
                    .revparse_single(&format!("origin/{spec}"))
                    .map_err(|_| first)
            })
            .and_then(|object| object.peel_to_commit());
        found.map(|c| c.id()).map_err(|source| GitError::Resolve {
            url: self.shown.clone(),
            revision: spec.to_string(),
            source,
        })
    }

    /// Whether `rev` is `head` or one of its ancestors: a rollback target must come from the
    /// service's own branch, not from whatever else the store holds.
    pub fn in_history(&self, rev: Oid, head: Oid) -> Result<bool, GitError> {
        if rev == head {
            return Ok(true);
        }
        self.repo
            .graph_descendant_of(head, rev)
            .map_err(|e| self.object_error(head, e))
    }

    /// Number of commits reachable from `head`: lets tests and metrics confirm the store holds the
    /// full history, not a shallow part of it.
    pub fn commit_count(&self, head: Oid) -> Result<usize, GitError> {
        let mut walk = self
            .repo
            .revwalk()
            .map_err(|e| self.object_error(head, e))?;
        walk.push(head).map_err(|e| self.object_error(head, e))?;
        let mut n = 0;
        for oid in walk {
            oid.map_err(|e| self.reached_error(head, e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Wraps an error looking up `rev` itself. The store not having `rev` is no damage: callers
    /// may ask for commits it never had (a revision deployed before the store was re-created).
    fn object_error(&self, rev: Oid, source: git2::Error) -> GitError {
        let err = GitError::Object {
            url: self.shown.clone(),
            revision: rev.to_string(),
            source,
        };
        if err.is_corruption() {
            self.damaged.set(true);
        }
        err
    }

    /// Wraps an error reading what `rev` leads to (trees, parents, blobs). A store that has a
    /// commit must have everything it reaches, so a missing object there is damage, remembered
    /// for the next fetch to heal.
    fn reached_error(&self, rev: Oid, source: git2::Error) -> GitError {
        let source = if source.code() == git2::ErrorCode::NotFound {
            git2::Error::new(
                git2::ErrorCode::GenericError,
                git2::ErrorClass::Odb,
                source.message(),
            )
        } else {
            source
        };
        self.object_error(rev, source)
    }
}

/// Commits made with libgit2 directly, for the unit tests of this module and of the deploy job.
#[cfg(test)]
pub(crate) mod fixture {
    /// Writes a tree of `files` (path, mode, content) into `repo`: `0o100644` for a file,
    /// `0o120000` for a symlink whose target is the content.
    pub(crate) fn tree(repo: &git2::Repository, files: &[(&str, u32, &[u8])]) -> git2::Oid {
        let mut index = git2::Index::new().unwrap();
        for (path, mode, content) in files {
            let entry = git2::IndexEntry {
                ctime: git2::IndexTime::new(0, 0),
                mtime: git2::IndexTime::new(0, 0),
                dev: 0,
                ino: 0,
                mode: *mode,
                uid: 0,
                gid: 0,
                file_size: content.len() as u32,
                id: repo.blob(content).unwrap(),
                flags: 0,
                flags_extended: 0,
                path: path.as_bytes().to_vec(),
            };
            index.add(&entry).unwrap();
        }
        index.write_tree_to(repo).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon moves each store into the thread that owns it.
    #[test]
    fn store_and_transport_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Store>();
        send::<Transport>();
        send::<GitError>();
        fn sync<T: Sync>() {}
        sync::<Transport>();
        sync::<GitError>();
    }

    #[test]
    fn messages_name_what_failed() {
        let err = GitError::TimedOut {
            url: "git://h/x.git".into(),
            timeout: Duration::from_secs(90),
        };
        assert_eq!(
            err.to_string(),
            "fetch git://h/x.git: timed out after 1m 30s"
        );
        let err = GitError::Branch {
            url: "git://h/x.git".into(),
            branch: "a..b".into(),
            reason: "not a valid branch name",
        };
        assert_eq!(
            err.to_string(),
            "fetch git://h/x.git: branch \"a..b\": not a valid branch name"
        );
        assert!(!err.is_corruption());
    }
}

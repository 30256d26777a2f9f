//! The fetch job: one fetch of an upstream, then, per service on it, what only a look at the
//! store and the checkout tells: local edits, a checkout left half-made, and how far behind the
//! service's files are. Runs on a blocking thread; its result goes back to the actor whole.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;

use crate::error::Chain;
use crate::git::{FetchReport, GitError, Ignored, Oid, Store, Transport};

/// The first-parent commits `behind` walks at most per service and fetch.
pub(super) const BEHIND_LIMIT: usize = 10_000;

/// What the fetch job looks at for one service besides fetching.
pub(super) struct Check {
    pub(super) name: String,
    /// A checkout of the service was interrupted (its marker file exists).
    pub(super) interrupted: bool,
    pub(super) target: PathBuf,
    pub(super) index: PathBuf,
    pub(super) synced: Option<Oid>,
    pub(super) deployed: Option<Oid>,
    pub(super) branch: String,
    pub(super) links: Vec<String>,
    /// The (deployed, head) pair the daemon's count of changes behind is for: not counted again
    /// while both are the same.
    pub(super) counted: Option<(Oid, Oid)>,
    /// What the last drift check found ignored beside the checkout.
    pub(super) ignored: Option<Ignored>,
}

/// What one fetch job found.
pub(super) struct Fetched {
    pub(super) result: Result<FetchReport, GitError>,
    /// Local edits per service (checked after a good fetch).
    pub(super) drift: BTreeMap<String, Vec<String>>,
    /// Changes to each service's files between its deployed revision and the head, with that
    /// (deployed, head) pair; only for services where either moved.
    pub(super) behind: BTreeMap<String, ((Oid, Oid), Option<u64>)>,
    /// What each drift check found ignored, for the next one (every service checked).
    pub(super) ignored: BTreeMap<String, Option<Ignored>>,
    /// Services whose last checkout did not finish (crash, failure): redone, not drift.
    pub(super) interrupted: BTreeSet<String>,
    /// How long the fetch (with its checks) took.
    pub(super) took: Duration,
}

/// Fetches `branches` of `url` into its store under `stores`, then looks at each of `checks`.
pub(super) fn run(
    stores: &Path,
    url: &str,
    branches: &[String],
    checks: Vec<Check>,
    transport: &Transport,
) -> Fetched {
    let mut drift = BTreeMap::new();
    let mut behind = BTreeMap::new();
    let mut ignored = BTreeMap::new();
    let mut interrupted = BTreeSet::new();
    let started = std::time::Instant::now();
    let result = Store::open(stores, url).and_then(|mut s| {
        let report = s.fetch(branches, transport)?;
        // One session for all the services: they mostly share their synced revision's tree.
        let drift_checks = s.drift_checks();
        // The behind counts, one walk of the history per head for all the services on it.
        let mut counting: BTreeMap<Oid, Vec<(&Check, Oid)>> = BTreeMap::new();
        for c in &checks {
            if c.interrupted {
                interrupted.insert(c.name.clone());
            } else if let Some(synced) = c.synced {
                let known = c.ignored.as_ref();
                match drift_checks.drift(&c.target, &c.index, synced, &c.links, known) {
                    Ok((files, beside)) => {
                        drift.insert(c.name.clone(), files);
                        ignored.insert(c.name.clone(), beside);
                    }
                    Err(e) => {
                        warn!(service = %c.name, "cannot check for local edits: {}", Chain(&e))
                    }
                }
            }
            let head = report.heads.get(&c.branch).copied().flatten();
            if let (Some(deployed), Some(head)) = (c.deployed, head)
                && c.counted != Some((deployed, head))
            {
                counting.entry(head).or_default().push((c, deployed));
            }
        }
        for (head, services) in counting {
            let wanted: Vec<(Oid, &[String])> = services
                .iter()
                .map(|(c, deployed)| (*deployed, c.links.as_slice()))
                .collect();
            match s.changes_since_many(head, &wanted, BEHIND_LIMIT) {
                Ok(counts) => {
                    for ((c, deployed), n) in services.into_iter().zip(counts) {
                        behind.insert(c.name.clone(), ((deployed, head), n));
                    }
                }
                Err(e) => {
                    for (c, _) in services {
                        warn!(service = %c.name, "cannot count changes behind: {}", Chain(&e))
                    }
                }
            }
        }
        Ok(report)
    });
    Fetched {
        result,
        drift,
        behind,
        ignored,
        interrupted,
        took: started.elapsed(),
    }
}

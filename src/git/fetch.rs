//! The network side of a store: fetching the requested branches of its upstream in one connection,
//! with full history, checked ssh host keys, bounded credential attempts, cancellation and a
//! time limit.
//!
//! A fetch connects once, reads the ref advertisement, and downloads only the requested branches
//! that exist upstream (a missing branch or an empty upstream is reported as `None`, not an
//! error). Over smart HTTP (protocol v0, which libgit2 speaks) a fetch that finds every branch up
//! to date is therefore exactly one request, `GET info/refs`. Branch references are then written
//! by plumb itself (`refs/remotes/origin/<branch>`, force-updated so a force-push upstream is
//! followed); tags are never fetched and `FETCH_HEAD` is never written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use git2::Oid;
use git2::{
    AutotagOption, Direction, ErrorClass, ErrorCode, FetchOptions, FetchPrune, RemoteCallbacks,
};

use super::store::BRANCH_PREFIX;
use super::transport::{self, Context, Stop};
use super::{FetchReport, GitError, Store, Transport};

impl Store {
    /// Fetches `branches` (full history, no depth, no filter, no tags) in one connection and
    /// returns their heads; a branch missing upstream is `None` and its local copy is dropped.
    ///
    /// The store is re-opened first (so nothing cached hides files that changed on disk) and its
    /// branches checked; a store found damaged (then, by this fetch, or by an earlier operation on
    /// it) is set aside, re-created and fetched again, once, within this call.
    pub fn fetch(
        &mut self,
        branches: &[String],
        transport: &Transport,
    ) -> Result<FetchReport, GitError> {
        for branch in branches {
            let valid = !branch.is_empty()
                && !branch.contains('*')
                && git2::Reference::is_valid_name(&format!("refs/heads/{branch}"));
            if !valid {
                return Err(GitError::Branch {
                    url: self.shown.clone(),
                    branch: branch.clone(),
                    reason: "not a valid branch name",
                });
            }
        }
        if transport.cancel.load(Ordering::Relaxed) {
            return Err(GitError::Cancelled {
                url: self.shown.clone(),
            });
        }
        if branches.is_empty() {
            return Ok(FetchReport {
                heads: BTreeMap::new(),
                rewritten: BTreeMap::new(),
            });
        }
        self.refresh()?;
        let report = match self.fetch_once(branches, transport) {
            Err(e) if e.is_corruption() && self.heal_on_fetch_error => {
                self.heal(&crate::error::chain(&e))?;
                self.mark_healed_after_fetch();
                self.fetch_once(branches, transport)
            }
            other => other,
        }?;
        self.heal_on_fetch_error = true;
        self.unmark_healed_after_fetch();
        Ok(report)
    }

    fn fetch_once(
        &self,
        branches: &[String],
        transport: &Transport,
    ) -> Result<FetchReport, GitError> {
        let session = Session::new(&self.shown, transport);
        let _entered = transport::enter(Arc::clone(&session.ctx));
        let mut remote = self
            .repo
            .remote_anonymous(&self.url)
            .map_err(|e| session.error(e))?;
        let mut heads: BTreeMap<String, Option<Oid>> = BTreeMap::new();
        {
            let mut connection = remote
                .connect_auth(Direction::Fetch, Some(session.callbacks()), None)
                .map_err(|e| session.error(e))?;
            // The ref advertisement: every branch upstream and its head, as of this connection.
            let advertised: BTreeMap<String, Oid> = connection
                .list()
                .map_err(|e| session.error(e))?
                .iter()
                .filter_map(|head| {
                    let branch = head.name().strip_prefix("refs/heads/")?;
                    Some((branch.to_string(), head.oid()))
                })
                .collect();
            let mut refspecs = Vec::new();
            for branch in branches {
                if heads.contains_key(branch) {
                    continue;
                }
                let head = advertised.get(branch).copied();
                if head.is_some() {
                    refspecs.push(format!("+refs/heads/{branch}:{BRANCH_PREFIX}{branch}"));
                }
                heads.insert(branch.clone(), head);
            }
            if !refspecs.is_empty() {
                let mut options = FetchOptions::new();
                options
                    .remote_callbacks(session.callbacks())
                    .download_tags(AutotagOption::None)
                    .update_fetchhead(false)
                    .prune(FetchPrune::Off);
                // Negotiates with the objects already in the store; downloads nothing (and sends
                // no request) when every head is present.
                connection
                    .remote()
                    .download(&refspecs, Some(&mut options))
                    .map_err(|e| session.error(e))?;
                let stats = connection.remote().stats();
                if stats.received_objects() > 0 {
                    tracing::debug!(
                        url = self.shown,
                        objects = stats.received_objects(),
                        bytes = stats.received_bytes(),
                        "fetched"
                    );
                }
            }
        }
        let mut rewritten = BTreeMap::new();
        for (branch, head) in heads.iter_mut() {
            let refname = format!("{BRANCH_PREFIX}{branch}");
            let old = self
                .repo
                .find_reference(&refname)
                .ok()
                .and_then(|r| r.target());
            match *head {
                Some(oid) => {
                    let commit = self
                        .repo
                        .find_object(oid, None)
                        .and_then(|o| o.peel_to_commit())
                        .map_err(|e| {
                            // The head was just fetched (or found present): not having it now
                            // means the store lost objects.
                            let damage = git2::Error::new(
                                ErrorCode::GenericError,
                                ErrorClass::Odb,
                                format!(
                                    "branch {branch} is at {oid}, which the store lacks after fetching: {}",
                                    e.message()
                                ),
                            );
                            session.error(damage)
                        })?;
                    *head = Some(commit.id());
                    if let Some(old) = old.filter(|o| *o != commit.id()) {
                        let forward = self
                            .repo
                            .graph_descendant_of(commit.id(), old)
                            .map_err(|e| session.error(e))?;
                        if !forward {
                            tracing::warn!(
                                url = self.shown,
                                branch = %branch,
                                old = %old,
                                new = %commit.id(),
                                "branch was force-pushed upstream: the new head does not descend from the old one"
                            );
                            rewritten.insert(branch.clone(), (old, commit.id()));
                        }
                    }
                    self.repo
                        .reference(&refname, commit.id(), true, "plumb: fetch")
                        .map_err(|e| session.error(e))?;
                }
                None => {
                    if let Ok(mut stale) = self.repo.find_reference(&refname) {
                        stale.delete().map_err(|e| session.error(e))?;
                    }
                }
            }
        }
        Ok(FetchReport { heads, rewritten })
    }
}

/// The callbacks' side of one fetch: cancellation and the deadline, checked whenever libgit2
/// reports progress, and the errors, which prefer what plumb's transports know about a failure
/// over libgit2's generic words.
struct Session {
    ctx: Arc<Context>,
}

impl Session {
    fn new(shown: &str, transport: &Transport) -> Self {
        Session {
            ctx: Arc::new(Context::new(shown, transport)),
        }
    }

    /// A fresh set of callbacks over this session (libgit2 takes one set for connecting and
    /// another for downloading).
    fn callbacks(&self) -> RemoteCallbacks<'_> {
        let mut callbacks = RemoteCallbacks::new();
        callbacks
            .transfer_progress(|_| self.ctx.keep_going())
            .sideband_progress(|_| self.ctx.keep_going());
        callbacks
    }

    /// The error of a failed fetch step, preferring what plumb itself knows about the failure.
    fn error(&self, source: git2::Error) -> GitError {
        let url = self.ctx.shown.clone();
        match self.ctx.stopped() {
            Some(Stop::Cancelled) => return GitError::Cancelled { url },
            Some(Stop::TimedOut(timeout)) => return GitError::TimedOut { url, timeout },
            None => {}
        }
        match self.ctx.take_refusal() {
            Some(reason) => GitError::Refused {
                url,
                reason,
                source: Some(source),
            },
            None => GitError::Fetch { url, source },
        }
    }
}

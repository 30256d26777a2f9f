//! The per-service state machine: what a service is doing, and what should happen next.
//!
//! It is pure: [`Service::handle`] takes an [`Event`] and the current time, changes the service's
//! state and returns the [`Effect`]s the daemon must run. Effects' results come back as events. Nothing
//! here touches git, the disk or systemd, so every transition is tested without root.
//!
//! The revision a service reports as deployed is the newest commit (on the branch's first-parent
//! chain) that changed one of the service's paths, not the branch head: every machine with the same
//! files shows the same hash, and a commit elsewhere in the repository changes nothing for it.

use serde::{Deserialize, Serialize};

use crate::git::Oid;

/// The five states an operator sees (ARCHITECTURE.md has the table of ways in and out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    /// Tracking upstream; the last deploy succeeded (or the service waits for its first commit).
    Ok,
    /// Not tracking upstream, by an operator's choice.
    Freeze,
    /// Pinned to an older revision that is being applied.
    Rollback,
    /// The machine side failed: checkout, apply, mount, package.
    Broken,
    /// The git side cannot be reconciled: fetch failed, branch gone, drift.
    Diff,
}

impl State {
    /// Every state, for exporters that show one series per state.
    pub const ALL: [State; 5] = [
        State::Ok,
        State::Freeze,
        State::Rollback,
        State::Broken,
        State::Diff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Freeze => "FREEZE",
            State::Rollback => "ROLLBACK",
            State::Broken => "BROKEN",
            State::Diff => "DIFF",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to a service, as the daemon saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The upstream was fetched; `head` is the service's branch, `None` when the branch does not exist
    /// there (an empty upstream, a branch not pushed yet, or one deleted).
    Fetched { branch: String, head: Option<Oid> },
    /// The fetch of the service's upstream failed.
    FetchFailed { error: String },
    /// The checkout now holds the service's paths at `head`; `revision` is the last commit that changed
    /// them (`None` when none of them exists on the branch yet).
    Deployed { head: Oid, revision: Option<Oid> },
    /// Moving the checkout to `head` failed; the files on disk are those of the previous revision.
    DeployFailed { head: Oid, error: String },
    /// `plumb apply` finished for `revision`: the unit took the new files (`error == None`) or not.
    Applied {
        revision: Oid,
        error: Option<String>,
    },
    /// An operator stops tracking upstream, until `until` (unix seconds) or until unfrozen.
    Freeze { until: Option<u64> },
    /// An operator resumes tracking upstream; ends a rollback pin too.
    Unfreeze,
    /// An operator pins the service to `target` (a commit of its branch's store) and freezes it.
    Rollback { target: Oid },
    /// Time passes: a freeze whose time is up ends.
    Tick,
    /// What differs between the checkout and the revision it was made from (local edits), found
    /// at every fetch; empty when nothing does.
    Drift { files: Vec<String> },
    /// An operator's `pull --force`: the next deploy may drop local edits.
    Force,
    /// The last checkout did not finish (a crash, a full disk): what is on disk may be neither
    /// revision, so the next fetch rewrites it whole at the head rather than taking the difference
    /// for local edits, through the gates a deploy of the head passes; when they hold or refuse
    /// the head, it is rewritten at `synced`, the last head saved, instead.
    Interrupted,
    /// An operator's `pull`: a refused head or revision is tried again at the fetch the pull makes.
    Retry,
    /// The daemon started: `applied` is what `plumb apply` last recorded for the service (its
    /// revision, and why it failed), `None` when nothing is. A deployed revision without a
    /// record of its own is applied now (it was deployed while no daemon could apply it); a
    /// failure recorded meanwhile is taken as [`Event::Applied`] would be.
    Resumed {
        applied: Option<(Oid, Option<String>)>,
    },
    /// An operator's `wipe`: the checkout is rebuilt from the store at the head it holds, local
    /// edits dropped, and the unit's mounts move onto the new one once it is in place.
    Wipe,
    /// The deploy job would not let the service see `head`; nothing on disk changed. `revision` is
    /// the last commit that changed the service's files at `head`, when it got that far.
    Refused {
        head: Oid,
        revision: Option<Oid>,
        why: Refusal,
    },
    /// In noop mode, the deploy job judged `head` and would deploy it: `revision` is the
    /// service's revision there, `files` how many of its files would change. Nothing moved.
    Previewed {
        head: Oid,
        revision: Option<Oid>,
        files: usize,
    },
    /// The configuration was read (at start, or again): `noop` is whether the service only
    /// reports what it would deploy (turning it off deploys what is pending at the next fetch);
    /// `health` whether it has a health check, which makes a failed apply roll back by itself;
    /// `moved` that its upstream, branch or paths changed, so the next fetch checks it out afresh.
    Reconfigured {
        noop: bool,
        health: bool,
        moved: bool,
    },
    /// The deploy job held `head` back: its `revision` waits for the lower rollout waves (`why`
    /// says who blocks, or that Prometheus did not answer). Nothing on disk changed; the service
    /// keeps its state and the next fetch asks again.
    Held {
        head: Oid,
        revision: Oid,
        why: String,
    },
    /// An operator opens the wave gate for the revision the service waits for now, once.
    Promote,
}

/// Why the deploy job refused a head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The service's `check` command failed on the staged tree (its output).
    Check(String),
    /// The tree is not safe to mount (a symlink leaving the service's directories, ...).
    Hostile(String),
    /// The head is not signed by a trusted key, when the upstream requires signatures.
    Unverified(String),
    /// The head does not descend from the checked-out one, and the upstream refuses force-pushes.
    Rewritten(String),
    /// The head's files are those of a revision refused or rolled back before.
    Known,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Check(output) => write!(f, "check failed: {output}"),
            Refusal::Hostile(why) | Refusal::Unverified(why) | Refusal::Rewritten(why) => {
                f.write_str(why)
            }
            Refusal::Known => f.write_str("the service's files are a revision refused before"),
        }
    }
}

impl Refusal {
    /// The label the refusal is counted under in metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Check(_) => "check",
            Refusal::Hostile(_) => "hostile",
            Refusal::Unverified(_) => "signature",
            Refusal::Rewritten(_) => "history",
            Refusal::Known => "known",
        }
    }
}

/// A head the service will not deploy, and why; persisted, so a restart does not try it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The branch head last refused: while the branch stays there, nothing is tried.
    #[serde(with = "crate::git::serde_hex::oid")]
    pub head: Oid,
    /// The service revision refused (a failed check or health): later heads with the same files
    /// are refused too, so only a newer commit of the service's files is tried.
    #[serde(default, with = "crate::git::serde_hex::opt_oid")]
    pub revision: Option<Oid>,
    /// The head an automatic rollback went back to.
    #[serde(default, with = "crate::git::serde_hex::opt_oid")]
    pub fallback: Option<Oid>,
    /// BROKEN (check, health, hostile tree) or DIFF (signature, history).
    pub state: State,
    pub info: String,
}

/// A revision the unit took and kept healthy, with the head its files were checked out from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Good {
    #[serde(with = "crate::git::serde_hex::oid")]
    pub head: Oid,
    #[serde(with = "crate::git::serde_hex::oid")]
    pub revision: Oid,
}

/// What the daemon must do for a service after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Bring the checkout from `from` (the head whose tree is on disk) to `head`, and hand the new
    /// revision to systemd when it differs from `deployed`. Answered by `Deployed` or `DeployFailed`.
    Deploy {
        head: Oid,
        from: Option<Oid>,
        deployed: Option<Oid>,
        gate: Gate,
    },
    /// Tell the unit about its new files (`plumb apply` through systemd). Answered by `Applied`
    /// when the daemon can reach systemd; without it the `.path` unit is the only trigger.
    Apply { revision: Oid },
    /// Like `Deploy`, but the checkout is rewritten even where its revision did not move: local
    /// edits are dropped (only on an operator's `pull --force`).
    Restore {
        head: Oid,
        deployed: Option<Oid>,
        gate: Gate,
    },
    /// Build the checkout afresh at `head` beside the old one and swap it in (an operator's
    /// wipe); the old one is served until then. Answered by `Deployed` or `DeployFailed`.
    Rebuild { head: Oid, deployed: Option<Oid> },
    /// Noop mode: judge `head` as a deploy would (signature, history, tree, `check` on a staged
    /// copy) and say what would change since `from`, touching nothing. Answered by `Previewed` or
    /// `Refused`.
    Preview {
        head: Oid,
        from: Option<Oid>,
        gate: Gate,
    },
    /// Apply again the deployed revision, whose apply failed: at every poll, until it works, since
    /// its cause (a package mirror, a file outside git, the unit's own config) may pass without a
    /// new commit. Skipped while an apply of the service runs. Answered by `Applied`.
    Reapply { revision: Oid },
    /// Write the service's state to disk: something worth surviving a restart changed.
    Persist,
}

/// What the deploy job holds a head to, besides its signature and its tree: decided here, from
/// the state the event left, so the job only carries it out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gate {
    /// The head is the branch head the service follows (not a rollback target, not an operator's
    /// `pull --force`): one that does not descend from the checkout's rewrites history.
    pub follow: bool,
    /// A revision refused before (check, health): a head whose service files are these is
    /// refused again without running anything.
    pub avoid: Option<Oid>,
    /// The revision an operator promoted: let through the wave gate without asking (once).
    pub promoted: Option<Oid>,
    /// Nothing is deployed yet: when the wave gate holds the head's revision, the deploy takes
    /// instead the revision every lower machine is on, once they have soaked on it (a new
    /// machine joins the fleet where the fleet is, rather than serving nothing until the next
    /// rollout reaches its wave). Answered by `Deployed` at that older head, then `Held` for the
    /// head's revision; the next fetch gates the head again, as for any machine behind.
    pub settle: bool,
}

/// A revision held back by the wave gate, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The branch head it comes from.
    pub head: Oid,
    /// The service's revision there, which the lower waves must have soaked on.
    pub revision: Oid,
    /// Who blocks ("waiting for wave 0: web1 BROKEN on 3f2a1c5d0e9b"), or that Prometheus did not
    /// answer.
    pub why: String,
}

/// One service's state. Serialised as the service's state file, so a restart resumes where it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    state: State,
    /// Why the service is in its state, for operators ("fetch failed: ...").
    info: String,
    /// Unix seconds when `state` was entered.
    since: u64,
    /// The last commit that changed the service's files, whose files are deployed.
    #[serde(with = "crate::git::serde_hex::opt_oid")]
    deployed: Option<Oid>,
    /// The branch head whose tree the checkout holds (the baseline of the next checkout).
    #[serde(with = "crate::git::serde_hex::opt_oid")]
    synced: Option<Oid>,
    /// Unix seconds when `deployed` last changed.
    changed_at: Option<u64>,
    /// Unix seconds of the last fetch and deploy that both succeeded.
    last_sync: Option<u64>,
    /// The deployed revision whose apply failed: the service stays BROKEN until another revision
    /// is deployed or an apply succeeds, however often the branch moves elsewhere.
    #[serde(default, with = "crate::git::serde_hex::opt_oid")]
    failed_apply: Option<Oid>,
    /// Not tracking upstream (an operator's freeze, or a rollback). Kept apart from `state`, which
    /// may show a failure meanwhile, so no failure or recovery ever unfreezes a service.
    #[serde(default)]
    frozen: bool,
    /// Unix seconds when the freeze ends by itself; `None` while frozen means until unfrozen.
    #[serde(default)]
    frozen_until: Option<u64>,
    /// The commit a rollback pinned the service to.
    #[serde(default, with = "crate::git::serde_hex::opt_oid")]
    pinned: Option<Oid>,
    /// The last revision whose apply (and health check) succeeded: where a failed health check
    /// goes back to.
    #[serde(default)]
    last_good: Option<Good>,
    /// A head (and revision) refused, so it is not tried again until the branch moves on or an
    /// operator pulls.
    #[serde(default)]
    rejected: Option<Rejected>,
    /// Files edited locally, from the last drift check; found again at every fetch.
    #[serde(skip)]
    drift: Vec<String>,
    /// The next deploy may drop local edits (`pull --force`).
    #[serde(skip)]
    force: bool,
    /// The last checkout was cut short and is not rewritten yet (see [`Event::Interrupted`]).
    #[serde(skip)]
    interrupted: bool,
    /// A rebuilt checkout is on its way (wipe): once it is in place the unit is applied again,
    /// whatever the revision, since its mounts must move onto the new directories.
    #[serde(skip)]
    rebuilding: bool,
    /// The branch head last seen upstream; not persisted, the next fetch tells.
    #[serde(skip)]
    upstream: Option<Oid>,
    /// Why the last fetch of the service's upstream failed, while it does. The upstream's
    /// condition, shown beside the state and never a state of its own: the files stay served and
    /// a frozen service stays FREEZE.
    #[serde(skip)]
    unreachable: Option<String>,
    /// Only report what would be deployed (the config's `noop`, or `plumb --noop`).
    #[serde(skip)]
    noop: bool,
    /// In noop mode, what the last preview found; a head is judged once.
    #[serde(skip)]
    would: Option<Would>,
    /// The service has a health check: a failed apply rolls it back to its last good revision.
    #[serde(skip)]
    health: bool,
    /// The revision the wave gate holds back, while it does; the next fetch asks again.
    #[serde(skip)]
    waiting: Option<Waiting>,
    /// The revision an operator let through the wave gate (`promote`), until it is deployed or a
    /// newer one replaces it.
    #[serde(default, with = "crate::git::serde_hex::opt_oid")]
    promoted: Option<Oid>,
}

/// What a service in noop mode would deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Would {
    /// The branch head judged.
    pub head: Oid,
    /// The service's revision at that head.
    pub revision: Option<Oid>,
    /// How many of the service's files would change.
    pub files: usize,
}

impl Service {
    /// A service plumb has never deployed.
    pub fn new(now: u64) -> Service {
        Service {
            state: State::Ok,
            info: "waiting for the first fetch".into(),
            since: now,
            deployed: None,
            synced: None,
            changed_at: None,
            last_sync: None,
            failed_apply: None,
            frozen: false,
            frozen_until: None,
            pinned: None,
            last_good: None,
            rejected: None,
            drift: Vec::new(),
            force: false,
            interrupted: false,
            rebuilding: false,
            upstream: None,
            unreachable: None,
            noop: false,
            would: None,
            health: false,
            waiting: None,
            promoted: None,
        }
    }

    /// A service that fetched and deployed `head` (its own revision) at `now`, as the state
    /// machine leaves it: for exporters' and renderers' tests.
    pub fn deployed_at(head: Oid, now: u64) -> Service {
        let mut s = Service::new(now);
        s.handle(
            Event::Fetched {
                branch: "main".into(),
                head: Some(head),
            },
            now,
        );
        s.handle(
            Event::Deployed {
                head,
                revision: Some(head),
            },
            now,
        );
        s
    }

    /// The state an operator sees.
    pub fn state(&self) -> State {
        self.state
    }

    /// Why the service is in its state.
    pub fn info(&self) -> &str {
        &self.info
    }

    /// Unix seconds when the state was entered.
    pub fn since(&self) -> u64 {
        self.since
    }

    /// The last commit that changed the service's files, whose files are deployed.
    pub fn deployed(&self) -> Option<Oid> {
        self.deployed
    }

    /// The branch head whose tree the checkout holds.
    pub fn synced(&self) -> Option<Oid> {
        self.synced
    }

    /// Unix seconds when the deployed revision last changed.
    pub fn changed_at(&self) -> Option<u64> {
        self.changed_at
    }

    /// Unix seconds of the last fetch and deploy that both succeeded.
    pub fn last_sync(&self) -> Option<u64> {
        self.last_sync
    }

    /// Not tracking upstream (a freeze or a rollback).
    pub fn frozen(&self) -> bool {
        self.frozen
    }

    /// When a freeze ends by itself (unix seconds).
    pub fn frozen_until(&self) -> Option<u64> {
        self.frozen_until
    }

    /// The commit a rollback pinned the service to.
    pub fn pinned(&self) -> Option<Oid> {
        self.pinned
    }

    /// The branch head last seen upstream.
    pub fn upstream(&self) -> Option<Oid> {
        self.upstream
    }

    /// Why the upstream's last fetch failed, while it does.
    pub fn unreachable(&self) -> Option<&str> {
        self.unreachable.as_deref()
    }

    /// Only reporting what would be deployed.
    pub fn noop(&self) -> bool {
        self.noop
    }

    /// In noop mode, what the last preview found.
    pub fn would(&self) -> Option<Would> {
        self.would
    }

    /// A failed apply rolls the service back by itself.
    pub fn health(&self) -> bool {
        self.health
    }

    /// The revision the wave gate holds back, and why.
    pub fn waiting(&self) -> Option<&Waiting> {
        self.waiting.as_ref()
    }

    /// The revision an operator let through the wave gate, not deployed yet.
    pub fn promoted(&self) -> Option<Oid> {
        self.promoted
    }

    /// Feeds one event in; returns what the daemon must do.
    pub fn handle(&mut self, event: Event, now: u64) -> Vec<Effect> {
        let before = self.clone();
        let mut effects = Vec::new();
        // A restore of a checkout cut short is judged as a deploy of the head would be.
        let mut restore_follows = false;
        match event {
            Event::Fetched { branch, head: None } => {
                self.upstream = None;
                self.unreachable = None;
                self.waiting = None;
                match self.deployed {
                    None if self.synced.is_none() => self.set(
                        State::Ok,
                        format!("waiting: branch {branch:?} does not exist upstream yet"),
                        now,
                    ),
                    _ => self.set(
                        State::Diff,
                        format!(
                            "branch {branch:?} is gone upstream; keeping revision {}",
                            short(self.deployed.or(self.synced))
                        ),
                        now,
                    ),
                }
            }
            Event::Fetched {
                head: Some(head), ..
            } => {
                self.upstream = Some(head);
                self.unreachable = None;
                // A failed checkout leaves `synced` behind, so it is retried here every tick.
                if self.interrupted && !self.noop && !self.frozen {
                    // Rewritten whole at the head, through the gates a deploy of the head passes
                    // (history, the rollout wave): held or refused, it goes back to `synced`.
                    restore_follows = true;
                    effects.push(Effect::Restore {
                        head,
                        deployed: self.deployed,
                        gate: Gate::default(),
                    });
                } else if self.frozen {
                    if self.state == State::Diff {
                        let info = self.resting_info();
                        self.set(State::Freeze, info, now);
                    }
                } else if self.force && !self.noop {
                    self.force = false;
                    effects.push(Effect::Restore {
                        head,
                        deployed: self.deployed,
                        gate: Gate::default(),
                    });
                } else if !self.drift.is_empty() {
                    // Local edits: held in DIFF until an operator drops them or they are undone.
                } else if let Some(r) = self.rejected.as_ref().filter(|r| r.head == head) {
                    // Refused already; tried again when the branch moves or an operator pulls.
                    // A rollback whose checkout failed is retried, though.
                    if let Some(fallback) = r.fallback.filter(|f| self.synced != Some(*f)) {
                        effects.push(Effect::Deploy {
                            head: fallback,
                            from: self.synced,
                            deployed: self.deployed,
                            gate: Gate::default(),
                        });
                    }
                } else if self.synced != Some(head) {
                    effects.extend(self.deploy(head));
                } else {
                    // A fetch that worked again after failures: nothing to move, just healthy again.
                    self.last_sync = Some(now);
                    self.would = None;
                    if self.state == State::Diff {
                        self.rest(now);
                    }
                }
                if effects.is_empty() {
                    effects.extend(self.reapply());
                }
            }
            Event::FetchFailed { error } => {
                // The upstream's condition, not the service's: its files and state stay as they
                // are (a frozen service stays FREEZE), and the failure shows beside the state.
                self.unreachable = Some(error);
                effects.extend(self.reapply());
            }
            Event::Deployed { head, revision } => {
                if self
                    .rejected
                    .as_ref()
                    .is_some_and(|r| r.fallback != Some(head))
                {
                    // Files other than the refused ones are in place: a newer commit is tried.
                    self.rejected = None;
                }
                self.synced = Some(head);
                self.last_sync = Some(now);
                self.waiting = None;
                self.interrupted = false;
                if revision.is_some() && revision == self.promoted {
                    // Through the gate once; the next revision waits again.
                    self.promoted = None;
                }
                let rebuilt = std::mem::take(&mut self.rebuilding);
                if rebuilt {
                    // A rebuilt checkout holds no local edits.
                    self.drift.clear();
                }
                if revision != self.deployed {
                    self.deployed = revision;
                    self.changed_at = Some(now);
                    // Also when only the hash moved: `plumb apply` then finds the files the unit
                    // already has and records the new hash without touching the unit.
                    if let Some(revision) = revision {
                        effects.push(Effect::Apply { revision });
                    }
                } else if let Some(revision) = revision.filter(|_| rebuilt) {
                    // Same files, new directories: the mounts are re-bound onto them.
                    effects.push(Effect::Apply { revision });
                }
                if revision.is_some() && revision == self.failed_apply {
                    // Nothing new for this service: it stays as broken as its apply left it.
                } else {
                    self.rest(now);
                    if revision.is_none() && !self.frozen {
                        self.info =
                            "waiting: none of the service's paths exist on the branch yet".into();
                    }
                }
            }
            Event::Applied { revision, error } => {
                if Some(revision) != self.deployed {
                    // An outcome overtaken by a newer deploy; that one's apply will report.
                } else if let Some(error) = error.clone().filter(|_| self.health) {
                    // With a health check, a failed apply or health check goes back to the last
                    // good revision; without one the service stays BROKEN on the revision.
                    effects.extend(self.roll_back(revision, error, now));
                } else if let Some(error) = error {
                    self.failed_apply = Some(revision);
                    self.set(
                        State::Broken,
                        format!("apply of {} failed: {error}", short(Some(revision))),
                        now,
                    );
                } else {
                    self.failed_apply = None;
                    if let Some(head) = self.synced {
                        self.last_good = Some(Good { head, revision });
                    }
                    if self.state == State::Broken {
                        self.rest(now);
                    }
                }
            }
            Event::Retry => {
                self.rejected = None;
                self.would = None;
            }
            Event::Previewed {
                head,
                revision,
                files,
            } => {
                if self.noop {
                    self.would = Some(Would {
                        head,
                        revision,
                        files,
                    });
                }
            }
            Event::Reconfigured {
                noop,
                health,
                moved,
            } => {
                self.health = health;
                if moved {
                    self.synced = None;
                    self.waiting = None;
                }
                if self.noop != noop {
                    self.noop = noop;
                    self.would = None;
                }
            }
            Event::Refused {
                head,
                revision,
                why,
            } => {
                self.rebuilding = false;
                self.waiting = None;
                self.refused(head, revision, why, now);
                effects.extend(self.put_back());
            }
            Event::Held {
                head,
                revision,
                why,
            } => {
                // A newer revision replaces the one promoted: it is gated again.
                if self.promoted.is_some_and(|p| p != revision) {
                    self.promoted = None;
                }
                // The service stays as it is (OK on what it runs, or whatever it was); the
                // waiting is a note beside the state.
                self.waiting = Some(Waiting {
                    head,
                    revision,
                    why,
                });
                effects.extend(self.put_back());
            }
            Event::Promote => {
                if let Some(w) = self.waiting.as_ref().filter(|_| !self.frozen && !self.noop) {
                    self.promoted = Some(w.revision);
                    effects.extend(self.redeploy());
                }
            }
            Event::Freeze { until } => {
                self.frozen = true;
                self.waiting = None;
                // A rollback's pin ends only by an unfreeze: a freeze with a duration on a pinned
                // service must not end the pin when its time is up.
                self.frozen_until = until.filter(|_| self.pinned.is_none());
                if !matches!(self.state, State::Broken | State::Diff) {
                    let info = self.resting_info();
                    self.set(State::Freeze, info, now);
                }
            }
            Event::Unfreeze => effects.extend(self.unfreeze(now, true)),
            Event::Drift { files } => {
                if files.is_empty() {
                    if self.state == State::Diff && !self.drift.is_empty() {
                        self.rest(now);
                    }
                } else if files != self.drift
                    || self.state != State::Diff
                    || !self.info.starts_with("local edits")
                {
                    let shown: Vec<&str> = files.iter().take(5).map(String::as_str).collect();
                    let more = files.len().saturating_sub(shown.len());
                    let more = if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    };
                    self.set(
                        State::Diff,
                        format!(
                            "local edits to {}{more}; plumbctl pull --force or wipe drops them",
                            shown.join(", ")
                        ),
                        now,
                    );
                }
                self.drift = files;
            }
            Event::Force => self.force = true,
            Event::Interrupted => self.interrupted = true,
            Event::Resumed { applied } => match (self.deployed, applied) {
                (None, _) => {}
                _ if self.noop => {}
                (Some(deployed), Some((revision, error))) if revision == deployed => {
                    if error.is_some() {
                        return self.handle(Event::Applied { revision, error }, now);
                    }
                }
                (Some(revision), _) => effects.push(Effect::Apply { revision }),
            },
            Event::Wipe => {
                // Refused before it gets here in noop mode or with nothing checked out (the
                // operator is told); ignored the same way should it come anyway.
                if let Some(head) = self.synced.filter(|_| !self.noop) {
                    self.rebuilding = true;
                    effects.push(Effect::Rebuild {
                        head,
                        deployed: self.deployed,
                    });
                }
            }
            Event::Tick => {
                if self.frozen && self.frozen_until.is_some_and(|t| t <= now) {
                    if self.pinned.is_some() {
                        // A pin from a state file of an older plumb, which timed it: it stays.
                        self.frozen_until = None;
                        if self.state == State::Freeze {
                            self.info = self.resting_info();
                        }
                    } else {
                        effects.extend(self.unfreeze(now, false));
                    }
                }
            }
            Event::Rollback { target } => {
                // The operator chose a revision: nothing refused before stands in its way.
                self.rejected = None;
                self.waiting = None;
                self.frozen = true;
                self.frozen_until = None;
                self.pinned = Some(target);
                self.set(
                    State::Rollback,
                    format!("rolling back to {}", short(Some(target))),
                    now,
                );
                effects.push(Effect::Deploy {
                    head: target,
                    from: self.synced,
                    deployed: self.deployed,
                    gate: Gate::default(),
                });
            }
            Event::DeployFailed { head, error } => {
                self.rebuilding = false;
                self.waiting = None;
                let what = if self.pinned == Some(head) {
                    "rollback to"
                } else {
                    "checkout of"
                };
                self.set(
                    State::Broken,
                    format!("{what} {} failed: {error}", short(Some(head))),
                    now,
                );
            }
        }
        let restore_follows = restore_follows;
        let gate = |head: Oid, follows: bool| {
            let follow = follows && self.pinned.is_none() && self.upstream == Some(head);
            Gate {
                follow,
                avoid: self.rejected.as_ref().and_then(|r| r.revision),
                promoted: self.promoted,
                settle: follow && self.deployed.is_none(),
            }
        };
        for effect in &mut effects {
            match effect {
                Effect::Deploy { head, gate: g, .. } | Effect::Preview { head, gate: g, .. } => {
                    *g = gate(*head, true);
                }
                Effect::Restore { head, gate: g, .. } => *g = gate(*head, restore_follows),
                _ => {}
            }
        }
        if self.persisted_differs(&before) {
            effects.push(Effect::Persist);
        }
        effects
    }

    /// A checkout cut short whose head was held or refused: rewritten at `synced`, the last head
    /// saved, so the files are whole again without letting the head through.
    fn put_back(&mut self) -> Option<Effect> {
        if !std::mem::take(&mut self.interrupted) {
            return None;
        }
        Some(Effect::Restore {
            head: self.synced?,
            deployed: self.deployed,
            gate: Gate::default(),
        })
    }

    /// Goes back to the last good revision after `revision` failed its apply or health check;
    /// without one (or when the failing one is it, or an operator pinned the service), stays
    /// BROKEN on it.
    fn roll_back(&mut self, revision: Oid, error: String, now: u64) -> Vec<Effect> {
        let failed = format!("apply of {} failed: {error}", short(Some(revision)));
        let target = self
            .last_good
            .filter(|g| g.revision != revision && self.pinned.is_none());
        let Some(good) = target else {
            self.failed_apply = Some(revision);
            let why = if self.pinned.is_some() {
                "; pinned by an operator, not rolled back"
            } else {
                "; no earlier good revision to roll back to"
            };
            self.set(State::Broken, format!("{failed}{why}"), now);
            return Vec::new();
        };
        let info = format!(
            "rolled back from {} to {}: {error}",
            short(Some(revision)),
            short(Some(good.revision))
        );
        self.rejected = Some(Rejected {
            head: self.upstream.or(self.synced).unwrap_or(good.head),
            revision: Some(revision),
            fallback: Some(good.head),
            state: State::Broken,
            info: info.clone(),
        });
        self.set(State::Broken, info, now);
        vec![Effect::Deploy {
            head: good.head,
            from: self.synced,
            deployed: self.deployed,
            gate: Gate::default(),
        }]
    }

    fn refused(&mut self, head: Oid, revision: Option<Oid>, why: Refusal, now: u64) {
        let (state, info) = match why {
            Refusal::Known => {
                if let Some(r) = &mut self.rejected {
                    r.head = head;
                    let (state, info) = (r.state, r.info.clone());
                    self.set(state, info, now);
                }
                return;
            }
            Refusal::Check(output) => (
                State::Broken,
                format!(
                    "check of {} failed, files not changed: {output}",
                    short(revision.or(Some(head)))
                ),
            ),
            Refusal::Hostile(reason) => (
                State::Broken,
                format!("refused {}: {reason}", short(Some(head))),
            ),
            Refusal::Unverified(reason) => (
                State::Diff,
                format!(
                    "refused {}: {reason}; keeping revision {}",
                    short(Some(head)),
                    short(self.deployed)
                ),
            ),
            Refusal::Rewritten(reason) => (
                State::Diff,
                format!("{reason}; plumbctl pull --force accepts the new history"),
            ),
        };
        self.rejected = Some(Rejected {
            head,
            revision: match state {
                State::Broken => revision,
                _ => None,
            },
            fallback: None,
            state,
            info: info.clone(),
        });
        self.set(state, info, now);
    }

    /// The deploy of `head`, or in noop mode its preview (once per head).
    fn deploy(&self, head: Oid) -> Option<Effect> {
        if !self.noop {
            return Some(Effect::Deploy {
                head,
                from: self.synced,
                deployed: self.deployed,
                gate: Gate::default(),
            });
        }
        (self.would.map(|w| w.head) != Some(head)).then_some(Effect::Preview {
            head,
            from: self.synced,
            gate: Gate::default(),
        })
    }

    /// The apply of the deployed revision again, when its last one failed (never in noop mode).
    fn reapply(&self) -> Vec<Effect> {
        match self.failed_apply {
            Some(revision) if self.deployed == Some(revision) && !self.noop => {
                vec![Effect::Reapply { revision }]
            }
            _ => Vec::new(),
        }
    }

    /// The deploy of the branch head seen last, when the checkout is not there yet and the head
    /// was not refused.
    fn redeploy(&self) -> Vec<Effect> {
        let refused = |h: Oid| self.rejected.as_ref().is_some_and(|r| r.head == h);
        match self.upstream {
            Some(head) if self.synced != Some(head) && !refused(head) => {
                self.deploy(head).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// The state a service settles in when nothing is wrong: FREEZE while frozen, else OK. A
    /// refused head keeps its state (BROKEN or DIFF) until a newer commit deploys.
    fn rest(&mut self, now: u64) {
        if let Some(r) = &self.rejected {
            let (state, info) = (r.state, r.info.clone());
            self.set(state, info, now);
            return;
        }
        let state = if self.frozen {
            State::Freeze
        } else {
            State::Ok
        };
        let info = self.resting_info();
        self.set(state, info, now);
    }

    fn resting_info(&self) -> String {
        if !self.frozen {
            return String::new();
        }
        match (self.pinned, self.frozen_until) {
            // The service's files at the pinned commit are those of the last commit before it
            // that changed them: that is the revision deployed, and what an operator sees.
            (Some(p), _) if self.deployed.is_some_and(|d| d != p) => format!(
                "rolled back to {}: the service's files there are those of {}; pinned there \
                 until unfrozen",
                short(Some(p)),
                short(self.deployed)
            ),
            (Some(p), _) => format!(
                "rolled back to {}; pinned there until unfrozen",
                short(Some(p))
            ),
            (None, Some(t)) => format!("frozen until {}", rfc3339(t)),
            (None, None) => "frozen until unfrozen".into(),
        }
    }

    fn unfreeze(&mut self, now: u64, by_hand: bool) -> Vec<Effect> {
        if !self.frozen {
            return Vec::new();
        }
        self.frozen = false;
        self.frozen_until = None;
        self.pinned = None;
        // Unfreezing by hand tries the branch head again, refused or not.
        let was_refused = by_hand && self.rejected.take().is_some();
        if was_refused || !matches!(self.state, State::Broken | State::Diff) {
            self.rest(now);
        }
        self.redeploy()
    }

    fn set(&mut self, state: State, info: String, now: u64) {
        if self.state != state {
            self.since = now;
        }
        self.state = state;
        self.info = info;
    }

    /// Whether a field kept on disk changed. `synced` moving on its own (the branch moved, the
    /// service's files did not, so `deployed` stayed) is not worth a write: the checkout holds the
    /// files of `deployed` either way, and after a restart the first fetch moves `synced` again
    /// with nothing to check out. So a pull writes the state of the services it changed, not of
    /// every service on the upstream.
    fn persisted_differs(&self, before: &Service) -> bool {
        let files_stayed = self.deployed == before.deployed;
        let strip = |s: &Service| Service {
            upstream: None,
            unreachable: None,
            would: None,
            waiting: None,
            drift: Vec::new(),
            force: false,
            interrupted: false,
            rebuilding: false,
            last_sync: None,
            synced: if files_stayed { None } else { s.synced },
            ..s.clone()
        };
        strip(self) != strip(before)
    }
}

/// Unix seconds as UTC RFC 3339 ("2026-12-01T13:03:00Z"), as times appear in messages: readable
/// in the API and the journal whatever the reader's zone (plumbctl shows them in its own).
pub fn rfc3339(secs: u64) -> String {
    let at = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs));
    match at {
        // humantime formats years up to 9999; a freeze is at most a hundred years.
        Some(at) if secs < 253_402_300_800 => humantime::format_rfc3339_seconds(at).to_string(),
        _ => format!("{secs} (unix time)"),
    }
}

/// The abbreviated hash operators see in messages.
pub fn short(oid: Option<Oid>) -> String {
    match oid {
        Some(o) => o.to_string()[..12].to_owned(),
        None => "(none)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(n: u8) -> Oid {
        Oid::from_bytes(&[n; 20]).unwrap()
    }

    /// `s`, configured with a health check.
    fn checked(mut s: Service) -> Service {
        s.handle(
            Event::Reconfigured {
                noop: false,
                health: true,
                moved: false,
            },
            0,
        );
        s
    }

    /// The gate of a deploy of the branch head, with nothing refused.
    const FOLLOW: Gate = Gate {
        follow: true,
        avoid: None,
        promoted: None,
        settle: false,
    };

    fn fetched(head: Option<Oid>) -> Event {
        Event::Fetched {
            branch: "main".into(),
            head,
        }
    }

    /// A service that has deployed head 1 (revision 1) at time 10.
    fn deployed() -> Service {
        let mut s = Service::new(0);
        s.handle(fetched(Some(oid(1))), 5);
        s.handle(
            Event::Deployed {
                head: oid(1),
                revision: Some(oid(1)),
            },
            10,
        );
        s
    }

    #[test]
    fn first_fetch_deploys_from_nothing() {
        let mut s = Service::new(0);
        let fx = s.handle(fetched(Some(oid(1))), 5);
        // Nothing deployed: a wave gate holding the head lets it take the lower waves' revision.
        assert_eq!(
            fx,
            vec![Effect::Deploy {
                head: oid(1),
                from: None,
                deployed: None,
                gate: Gate {
                    settle: true,
                    ..FOLLOW
                },
            }]
        );
        assert_eq!(s.upstream, Some(oid(1)));
        let fx = s.handle(
            Event::Deployed {
                head: oid(1),
                revision: Some(oid(1)),
            },
            10,
        );
        assert_eq!(
            fx,
            vec![Effect::Apply { revision: oid(1) }, Effect::Persist]
        );
        assert_eq!(
            (s.state, s.deployed, s.synced),
            (State::Ok, Some(oid(1)), Some(oid(1)))
        );
        assert_eq!(
            (s.changed_at, s.last_sync, s.info.as_str()),
            (Some(10), Some(10), "")
        );
    }

    #[test]
    fn empty_upstream_or_missing_branch_waits_without_error() {
        let mut s = Service::new(0);
        let fx = s.handle(fetched(None), 5);
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!(s.state, State::Ok);
        assert!(
            s.info
                .contains("branch \"main\" does not exist upstream yet"),
            "{}",
            s.info
        );
    }

    #[test]
    fn paths_not_on_branch_yet_is_waiting_not_an_error() {
        let mut s = Service::new(0);
        s.handle(fetched(Some(oid(1))), 5);
        s.handle(
            Event::Deployed {
                head: oid(1),
                revision: None,
            },
            6,
        );
        assert_eq!(
            (s.state, s.deployed, s.synced),
            (State::Ok, None, Some(oid(1)))
        );
        assert!(s.info.starts_with("waiting"));
    }

    #[test]
    fn nothing_new_does_nothing() {
        let mut s = deployed();
        assert_eq!(s.handle(fetched(Some(oid(1))), 20), vec![]);
        assert_eq!(s.last_sync, Some(20));
    }

    #[test]
    fn new_head_deploys_from_the_synced_head() {
        let mut s = deployed();
        let fx = s.handle(fetched(Some(oid(2))), 20);
        assert_eq!(
            fx,
            vec![Effect::Deploy {
                head: oid(2),
                from: Some(oid(1)),
                deployed: Some(oid(1)),
                gate: FOLLOW,
            }]
        );
    }

    #[test]
    fn a_commit_elsewhere_moves_synced_but_not_deployed_and_writes_nothing() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        let fx = s.handle(
            Event::Deployed {
                head: oid(2),
                revision: Some(oid(1)),
            },
            21,
        );
        // Nothing on disk needs to change: the files are those of oid(1) still.
        assert_eq!(fx, vec![]);
        assert_eq!(
            (s.deployed, s.synced, s.changed_at),
            (Some(oid(1)), Some(oid(2)), Some(10))
        );
    }

    #[test]
    fn a_fetch_failure_is_the_upstreams_condition_not_a_state() {
        let mut s = deployed();
        let before = (s.state, s.since, s.info.clone());
        let fx = s.handle(
            Event::FetchFailed {
                error: "connection refused".into(),
            },
            20,
        );
        assert_eq!(fx, vec![], "nothing to persist, nothing to run");
        assert_eq!((s.state, s.since, s.info.clone()), before);
        assert_eq!(s.unreachable.as_deref(), Some("connection refused"));
        s.handle(
            Event::FetchFailed {
                error: "timed out".into(),
            },
            30,
        );
        assert_eq!(s.unreachable.as_deref(), Some("timed out"));
        let fx = s.handle(fetched(Some(oid(1))), 40);
        assert_eq!(fx, vec![]);
        assert_eq!(
            (s.state, s.since, s.unreachable.clone()),
            (State::Ok, before.1, None)
        );
    }

    #[test]
    fn a_failed_apply_is_applied_again_at_every_poll_until_it_works() {
        let mut s = deployed();
        s.handle(
            Event::Applied {
                revision: oid(1),
                error: Some("unknown field".into()),
            },
            11,
        );
        assert_eq!(s.state, State::Broken);
        let again = vec![Effect::Reapply { revision: oid(1) }];
        // A poll whose fetch moved nothing, and one whose fetch failed: both apply again.
        assert_eq!(s.handle(fetched(Some(oid(1))), 20), again);
        assert_eq!(
            s.handle(Event::FetchFailed { error: "x".into() }, 30),
            again
        );
        // A head that moves elsewhere in the repository: the deploy, then the apply again.
        assert!(matches!(
            s.handle(fetched(Some(oid(2))), 40)[..],
            [Effect::Deploy { .. }]
        ));
        s.handle(
            Event::Deployed {
                head: oid(2),
                revision: Some(oid(1)),
            },
            41,
        );
        assert_eq!(s.state, State::Broken);
        assert_eq!(s.handle(fetched(Some(oid(2))), 50), again);
        applied(&mut s, 1, 51);
        assert_eq!((s.state, s.failed_apply), (State::Ok, None));
        assert_eq!(s.handle(fetched(Some(oid(2))), 60), vec![]);
    }

    #[test]
    fn a_new_hash_over_the_same_files_is_applied_and_its_outcome_recorded() {
        let mut s = deployed();
        applied(&mut s, 1, 11);
        s.handle(fetched(Some(oid(3))), 20);
        // Commit 3 restored the files of commit 1 after a commit 2 this machine never fetched:
        // `plumb apply` is asked, finds the unit's files unchanged and records the new hash.
        let fx = s.handle(
            Event::Deployed {
                head: oid(3),
                revision: Some(oid(3)),
            },
            21,
        );
        assert_eq!(
            fx,
            vec![Effect::Apply { revision: oid(3) }, Effect::Persist]
        );
        applied(&mut s, 3, 22);
        assert_eq!(
            (s.deployed, s.changed_at, s.state),
            (Some(oid(3)), Some(21), State::Ok)
        );
        assert_eq!(
            s.last_good,
            Some(Good {
                head: oid(3),
                revision: oid(3)
            })
        );
    }

    #[test]
    fn fetch_failure_then_new_head_deploys_then_ok() {
        let mut s = deployed();
        s.handle(Event::FetchFailed { error: "x".into() }, 20);
        let fx = s.handle(fetched(Some(oid(2))), 30);
        assert!(matches!(fx[0], Effect::Deploy { head, .. } if head == oid(2)));
        s.handle(
            Event::Deployed {
                head: oid(2),
                revision: Some(oid(2)),
            },
            31,
        );
        assert_eq!(
            (s.state, s.deployed, s.changed_at),
            (State::Ok, Some(oid(2)), Some(31))
        );
    }

    #[test]
    fn branch_gone_after_deploy_is_diff_and_keeps_files() {
        let mut s = deployed();
        let fx = s.handle(fetched(None), 20);
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!(s.state, State::Diff);
        assert!(
            s.info
                .contains("gone upstream; keeping revision 010101010101"),
            "{}",
            s.info
        );
        assert_eq!(s.deployed, Some(oid(1)));
    }

    #[test]
    fn failed_deploy_is_broken_and_retried_on_the_next_fetch_of_the_same_head() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        let fx = s.handle(
            Event::DeployFailed {
                head: oid(2),
                error: "disk full".into(),
            },
            21,
        );
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!(s.state, State::Broken);
        assert!(s.info.contains("disk full"));
        assert_eq!((s.deployed, s.synced), (Some(oid(1)), Some(oid(1))));
        let fx = s.handle(fetched(Some(oid(2))), 30);
        assert!(
            matches!(fx[0], Effect::Deploy { head, from, .. } if head == oid(2) && from == Some(oid(1)))
        );
        s.handle(
            Event::Deployed {
                head: oid(2),
                revision: Some(oid(2)),
            },
            31,
        );
        assert_eq!((s.state, s.since), (State::Ok, 31));
    }

    #[test]
    fn failed_apply_is_broken_until_a_new_revision_or_a_good_apply() {
        let mut s = deployed();
        let fx = s.handle(
            Event::Applied {
                revision: oid(1),
                error: Some("nginx: unknown directive".into()),
            },
            20,
        );
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!(s.state, State::Broken);
        assert!(
            s.info
                .contains("apply of 010101010101 failed: nginx: unknown directive"),
            "{}",
            s.info
        );
        // A commit elsewhere moves the head: nothing new for this service, still broken.
        s.handle(fetched(Some(oid(2))), 30);
        let fx = s.handle(
            Event::Deployed {
                head: oid(2),
                revision: Some(oid(1)),
            },
            31,
        );
        assert!(!fx.iter().any(|e| matches!(e, Effect::Apply { .. })));
        assert_eq!((s.state, s.since), (State::Broken, 20));
        // The fix arrives: deployed, applied, OK.
        s.handle(fetched(Some(oid(3))), 40);
        let fx = s.handle(
            Event::Deployed {
                head: oid(3),
                revision: Some(oid(3)),
            },
            41,
        );
        assert!(fx.contains(&Effect::Apply { revision: oid(3) }));
        s.handle(
            Event::Applied {
                revision: oid(3),
                error: None,
            },
            42,
        );
        assert_eq!((s.state, s.failed_apply), (State::Ok, None));
    }

    #[test]
    fn a_good_apply_of_the_same_revision_clears_broken() {
        let mut s = deployed();
        s.handle(
            Event::Applied {
                revision: oid(1),
                error: Some("failed".into()),
            },
            20,
        );
        let fx = s.handle(
            Event::Applied {
                revision: oid(1),
                error: None,
            },
            30,
        );
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!((s.state, s.since, s.info.as_str()), (State::Ok, 30, ""));
    }

    #[test]
    fn an_outcome_overtaken_by_a_newer_deploy_is_ignored() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        s.handle(
            Event::Deployed {
                head: oid(2),
                revision: Some(oid(2)),
            },
            21,
        );
        let fx = s.handle(
            Event::Applied {
                revision: oid(1),
                error: Some("old".into()),
            },
            22,
        );
        assert_eq!(fx, vec![]);
        assert_eq!(s.state, State::Ok);
    }

    #[test]
    fn a_frozen_service_does_not_follow_upstream_until_unfrozen() {
        let mut s = deployed();
        let fx = s.handle(Event::Freeze { until: None }, 20);
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!((s.state, s.frozen, s.since), (State::Freeze, true, 20));
        assert_eq!(s.handle(fetched(Some(oid(2))), 30), vec![]);
        assert_eq!((s.synced, s.upstream), (Some(oid(1)), Some(oid(2))));
        // Failures and recoveries while frozen never unfreeze it.
        s.handle(
            Event::FetchFailed {
                error: "down".into(),
            },
            40,
        );
        assert_eq!((s.state, s.frozen), (State::Freeze, true));
        s.handle(fetched(Some(oid(2))), 50);
        assert_eq!(s.state, State::Freeze);
        let fx = s.handle(Event::Unfreeze, 60);
        assert_eq!(
            fx,
            vec![
                Effect::Deploy {
                    head: oid(2),
                    from: Some(oid(1)),
                    deployed: Some(oid(1)),
                    gate: FOLLOW,
                },
                Effect::Persist
            ]
        );
        assert_eq!((s.state, s.frozen, s.info.as_str()), (State::Ok, false, ""));
    }

    #[test]
    fn a_freeze_with_a_duration_ends_by_itself() {
        let mut s = deployed();
        s.handle(Event::Freeze { until: Some(100) }, 20);
        assert_eq!(s.info, "frozen until 1970-01-01T00:01:40Z");
        assert_eq!(s.handle(Event::Tick, 99), vec![]);
        assert!(s.frozen);
        let fx = s.handle(Event::Tick, 100);
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!(
            (s.state, s.frozen, s.frozen_until),
            (State::Ok, false, None)
        );
        // Unfreezing what is not frozen does nothing.
        assert_eq!(s.handle(Event::Unfreeze, 101), vec![]);
    }

    #[test]
    fn rollback_pins_freezes_and_unfreeze_returns_to_the_head() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(3))), 20);
        s.handle(
            Event::Deployed {
                head: oid(3),
                revision: Some(oid(3)),
            },
            21,
        );
        let fx = s.handle(Event::Rollback { target: oid(1) }, 30);
        assert_eq!(
            fx,
            vec![
                Effect::Deploy {
                    head: oid(1),
                    from: Some(oid(3)),
                    deployed: Some(oid(3)),
                    gate: Gate::default(),
                },
                Effect::Persist
            ]
        );
        assert_eq!(
            (s.state, s.pinned, s.frozen),
            (State::Rollback, Some(oid(1)), true)
        );
        let fx = s.handle(
            Event::Deployed {
                head: oid(1),
                revision: Some(oid(1)),
            },
            31,
        );
        assert!(fx.contains(&Effect::Apply { revision: oid(1) }));
        assert_eq!(s.state, State::Freeze);
        assert!(s.info.contains("rolled back to 010101010101"), "{}", s.info);
        // The head moves on; the pin holds.
        assert_eq!(s.handle(fetched(Some(oid(4))), 40), vec![]);
        let fx = s.handle(Event::Unfreeze, 50);
        assert!(
            matches!(fx[0], Effect::Deploy { head, from, .. } if head == oid(4) && from == Some(oid(1)))
        );
        assert_eq!((s.pinned, s.frozen, s.state), (None, false, State::Ok));
    }

    /// A service deployed at the head, commit 3 (at 21), then rolled back to `target`, whose
    /// files are those of `files` (at 31).
    fn rolled_back_from_3(target: Oid, files: Oid) -> Service {
        let mut s = deployed();
        s.handle(fetched(Some(oid(3))), 20);
        s.handle(
            Event::Deployed {
                head: oid(3),
                revision: Some(oid(3)),
            },
            21,
        );
        s.handle(Event::Rollback { target }, 30);
        s.handle(
            Event::Deployed {
                head: target,
                revision: Some(files),
            },
            31,
        );
        s
    }

    #[test]
    fn a_pin_outlives_a_freeze_with_a_duration() {
        let mut s = rolled_back_from_3(oid(1), oid(1));
        // The freeze keeps the service where the rollback put it, and its time does not apply.
        let fx = s.handle(Event::Freeze { until: Some(100) }, 40);
        assert_eq!(fx, vec![]);
        assert_eq!(
            (s.state, s.pinned, s.frozen, s.frozen_until),
            (State::Freeze, Some(oid(1)), true, None)
        );
        assert_eq!(s.handle(Event::Tick, 1000), vec![]);
        assert_eq!(s.handle(fetched(Some(oid(3))), 1001), vec![]);
        assert_eq!((s.pinned, s.frozen), (Some(oid(1)), true));
        assert_eq!(
            s.info,
            "rolled back to 010101010101; pinned there until unfrozen"
        );
        // A state file of an older plumb may hold a timed pin: the time ends, the pin stays.
        s.frozen_until = Some(1500);
        assert_eq!(s.handle(Event::Tick, 1500), vec![Effect::Persist]);
        assert_eq!(
            (s.pinned, s.frozen, s.frozen_until, s.state),
            (Some(oid(1)), true, None, State::Freeze)
        );
        // Only an unfreeze ends it.
        let fx = s.handle(Event::Unfreeze, 1600);
        assert!(matches!(fx[0], Effect::Deploy { head, .. } if head == oid(3)));
        assert_eq!((s.pinned, s.frozen), (None, false));
    }

    #[test]
    fn a_rollback_to_a_commit_elsewhere_names_the_revision_of_the_services_files() {
        // Commit 2 changed other services' files only: this one's there are revision 1's.
        let s = rolled_back_from_3(oid(2), oid(1));
        assert_eq!(
            (s.state, s.pinned, s.deployed),
            (State::Freeze, Some(oid(2)), Some(oid(1)))
        );
        assert_eq!(
            s.info,
            "rolled back to 020202020202: the service's files there are those of 010101010101; \
             pinned there until unfrozen"
        );
    }

    #[test]
    fn a_failed_rollback_is_broken_and_stays_pinned() {
        let mut s = deployed();
        s.handle(Event::Rollback { target: oid(9) }, 20);
        s.handle(
            Event::DeployFailed {
                head: oid(9),
                error: "no such tree".into(),
            },
            21,
        );
        assert_eq!(
            (s.state, s.pinned, s.frozen),
            (State::Broken, Some(oid(9)), true)
        );
        assert!(
            s.info.starts_with("rollback to 090909090909 failed"),
            "{}",
            s.info
        );
    }

    #[test]
    fn local_edits_hold_the_service_in_diff_until_forced_or_undone() {
        let mut s = deployed();
        let fx = s.handle(
            Event::Drift {
                files: vec!["app/conf".into()],
            },
            20,
        );
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!(s.state, State::Diff);
        assert!(s.info.starts_with("local edits to app/conf;"), "{}", s.info);
        // A new head is not deployed over them.
        assert_eq!(s.handle(fetched(Some(oid(2))), 21), vec![]);
        // Forced: the next fetch restores, whatever the head.
        s.handle(Event::Force, 30);
        let fx = s.handle(fetched(Some(oid(2))), 31);
        assert_eq!(
            fx,
            vec![Effect::Restore {
                head: oid(2),
                deployed: Some(oid(1)),
                gate: Gate::default(),
            }]
        );
        assert!(!s.force, "force is for one deploy only");
        // Undone by hand: back to OK by itself.
        let mut s = deployed();
        s.handle(
            Event::Drift {
                files: vec!["app/x".into()],
            },
            20,
        );
        s.handle(Event::Drift { files: vec![] }, 30);
        assert_eq!((s.state, s.since), (State::Ok, 30));
    }

    #[test]
    fn state_file_round_trips_and_keeps_hashes_readable() {
        let s = deployed();
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"state\":\"OK\""), "{json}");
        assert!(json.contains(&oid(1).to_string()), "{json}");
        let back: Service = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back,
            Service {
                upstream: None,
                ..s
            }
        );
    }

    fn deployed_at(s: &mut Service, n: u8, now: u64) -> Vec<Effect> {
        s.handle(fetched(Some(oid(n))), now);
        s.handle(
            Event::Deployed {
                head: oid(n),
                revision: Some(oid(n)),
            },
            now,
        )
    }

    fn applied(s: &mut Service, n: u8, now: u64) {
        s.handle(
            Event::Applied {
                revision: oid(n),
                error: None,
            },
            now,
        );
    }

    #[test]
    fn a_failed_check_leaves_the_files_and_is_not_retried_until_a_newer_commit() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        let fx = s.handle(
            Event::Refused {
                head: oid(2),
                revision: Some(oid(2)),
                why: Refusal::Check("nginx: bad directive".into()),
            },
            21,
        );
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!(
            (s.state, s.deployed, s.synced),
            (State::Broken, Some(oid(1)), Some(oid(1)))
        );
        assert!(
            s.info.starts_with(
                "check of 020202020202 failed, files not changed: nginx: bad directive"
            ),
            "{}",
            s.info
        );
        // The same head again: nothing is tried.
        assert_eq!(s.handle(fetched(Some(oid(2))), 30), vec![]);
        // A commit elsewhere on top: tried, and refused as the known revision by the deploy job.
        assert_eq!(s.handle(fetched(Some(oid(3))), 40).len(), 1);
        s.handle(
            Event::Refused {
                head: oid(3),
                revision: Some(oid(2)),
                why: Refusal::Known,
            },
            41,
        );
        assert_eq!(s.state, State::Broken);
        assert_eq!(s.rejected.as_ref().map(|r| r.head), Some(oid(3)));
        assert_eq!(s.handle(fetched(Some(oid(3))), 50), vec![]);
        // A newer commit of the service's files deploys and clears the refusal.
        let fx = deployed_at(&mut s, 4, 60);
        assert_eq!(
            fx,
            vec![Effect::Apply { revision: oid(4) }, Effect::Persist]
        );
        assert_eq!((s.state, s.rejected.clone()), (State::Ok, None));
    }

    #[test]
    fn a_failed_health_check_rolls_back_to_the_last_good_revision_and_does_not_return() {
        let mut s = checked(deployed());
        applied(&mut s, 1, 11);
        assert_eq!(
            s.last_good,
            Some(Good {
                head: oid(1),
                revision: oid(1)
            })
        );
        deployed_at(&mut s, 2, 20);
        let fx = s.handle(
            Event::Applied {
                revision: oid(2),
                error: Some("health: GET http://127.0.0.1/ answered 500".into()),
            },
            25,
        );
        assert_eq!(
            fx,
            vec![
                Effect::Deploy {
                    head: oid(1),
                    from: Some(oid(2)),
                    deployed: Some(oid(2)),
                    gate: Gate {
                        follow: false,
                        avoid: Some(oid(2)),
                        promoted: None,
                        settle: false,
                    },
                },
                Effect::Persist
            ]
        );
        assert_eq!(s.state, State::Broken);
        assert_eq!(
            s.info,
            "rolled back from 020202020202 to 010101010101: health: GET http://127.0.0.1/ answered 500"
        );
        // The rollback lands and applies; the service stays BROKEN saying why.
        let fx = s.handle(
            Event::Deployed {
                head: oid(1),
                revision: Some(oid(1)),
            },
            26,
        );
        assert_eq!(
            fx,
            vec![Effect::Apply { revision: oid(1) }, Effect::Persist]
        );
        applied(&mut s, 1, 27);
        assert_eq!((s.state, s.deployed), (State::Broken, Some(oid(1))));
        assert!(
            s.info.starts_with("rolled back from 020202020202"),
            "{}",
            s.info
        );
        // The bad head is not deployed again.
        assert_eq!(s.handle(fetched(Some(oid(2))), 30), vec![]);
        // An operator's pull overrides: the head is tried again at the pull's fetch.
        assert_eq!(s.handle(Event::Retry, 40), vec![Effect::Persist]);
        assert_eq!(
            s.handle(fetched(Some(oid(2))), 41),
            vec![Effect::Deploy {
                head: oid(2),
                from: Some(oid(1)),
                deployed: Some(oid(1)),
                gate: FOLLOW,
            }]
        );
        assert_eq!(s.rejected, None);
    }

    #[test]
    fn a_failing_rollback_checkout_is_retried_at_the_next_fetch() {
        let mut s = checked(deployed());
        applied(&mut s, 1, 11);
        deployed_at(&mut s, 2, 20);
        s.handle(
            Event::Applied {
                revision: oid(2),
                error: Some("down".into()),
            },
            25,
        );
        s.handle(
            Event::DeployFailed {
                head: oid(1),
                error: "disk".into(),
            },
            26,
        );
        assert_eq!(s.state, State::Broken);
        assert_eq!(
            s.handle(fetched(Some(oid(2))), 30),
            vec![Effect::Deploy {
                head: oid(1),
                from: Some(oid(2)),
                deployed: Some(oid(2)),
                gate: Gate {
                    follow: false,
                    avoid: Some(oid(2)),
                    promoted: None,
                    settle: false,
                },
            }]
        );
    }

    #[test]
    fn unhealthy_without_a_good_revision_or_when_pinned_stays_broken() {
        let mut s = checked(deployed());
        let fx = s.handle(
            Event::Applied {
                revision: oid(1),
                error: Some("down".into()),
            },
            20,
        );
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!((s.state, s.failed_apply), (State::Broken, Some(oid(1))));
        assert!(
            s.info.ends_with("no earlier good revision to roll back to"),
            "{}",
            s.info
        );

        let mut s = checked(deployed());
        applied(&mut s, 1, 11);
        deployed_at(&mut s, 2, 20);
        applied(&mut s, 2, 21);
        s.handle(Event::Rollback { target: oid(1) }, 30);
        s.handle(
            Event::Deployed {
                head: oid(1),
                revision: Some(oid(1)),
            },
            31,
        );
        let fx = s.handle(
            Event::Applied {
                revision: oid(1),
                error: Some("down".into()),
            },
            32,
        );
        assert_eq!(fx, vec![Effect::Persist]);
        assert_eq!((s.state, s.deployed), (State::Broken, Some(oid(1))));
        assert!(
            s.info.ends_with("pinned by an operator, not rolled back"),
            "{}",
            s.info
        );
        // An outcome for a revision no longer deployed changes nothing.
        let before = s.clone();
        assert_eq!(
            s.handle(
                Event::Applied {
                    revision: oid(2),
                    error: Some("x".into())
                },
                40
            ),
            vec![]
        );
        assert_eq!(s, before);
    }

    #[test]
    fn an_unsigned_head_is_diff_and_the_next_head_is_tried() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        s.handle(
            Event::Refused {
                head: oid(2),
                revision: None,
                why: Refusal::Unverified("commit 020202020202: not signed".into()),
            },
            21,
        );
        assert_eq!((s.state, s.deployed), (State::Diff, Some(oid(1))));
        assert_eq!(
            s.info,
            "refused 020202020202: commit 020202020202: not signed; keeping revision 010101010101"
        );
        assert_eq!(s.handle(fetched(Some(oid(2))), 30), vec![]);
        assert_eq!(s.handle(fetched(Some(oid(3))), 40).len(), 1);
        s.handle(
            Event::Deployed {
                head: oid(3),
                revision: Some(oid(3)),
            },
            41,
        );
        assert_eq!(s.state, State::Ok);
    }

    #[test]
    fn a_refused_rewrite_waits_for_pull_force() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        s.handle(
            Event::Refused {
                head: oid(2),
                revision: None,
                why: Refusal::Rewritten("history rewritten upstream".into()),
            },
            21,
        );
        assert_eq!(s.state, State::Diff);
        assert!(
            s.info
                .ends_with("plumbctl pull --force accepts the new history"),
            "{}",
            s.info
        );
        assert_eq!(s.handle(fetched(Some(oid(2))), 30), vec![]);
        s.handle(Event::Force, 31);
        assert_eq!(
            s.handle(fetched(Some(oid(2))), 32),
            vec![Effect::Restore {
                head: oid(2),
                deployed: Some(oid(1)),
                gate: Gate::default(),
            }]
        );
    }

    #[test]
    fn a_hostile_tree_is_broken() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        s.handle(
            Event::Refused {
                head: oid(2),
                revision: None,
                why: Refusal::Hostile(
                    "nginx/etc/x: symlink to /etc/shadow leaves the service".into(),
                ),
            },
            21,
        );
        assert_eq!((s.state, s.synced), (State::Broken, Some(oid(1))));
        assert!(
            s.info.starts_with("refused 020202020202: nginx/etc/x"),
            "{}",
            s.info
        );
    }

    #[test]
    fn unfreezing_by_hand_retries_a_refused_head_and_expiry_does_not() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        s.handle(
            Event::Refused {
                head: oid(2),
                revision: Some(oid(2)),
                why: Refusal::Check("bad".into()),
            },
            21,
        );
        s.handle(Event::Freeze { until: Some(100) }, 22);
        assert_eq!((s.state, s.frozen), (State::Broken, true));
        let mut expired = s.clone();
        assert_eq!(expired.handle(Event::Tick, 100), vec![Effect::Persist]);
        assert_eq!((expired.state, expired.frozen), (State::Broken, false));
        let fx = s.handle(Event::Unfreeze, 50);
        assert_eq!(
            fx,
            vec![
                Effect::Deploy {
                    head: oid(2),
                    from: Some(oid(1)),
                    deployed: Some(oid(1)),
                    gate: FOLLOW,
                },
                Effect::Persist
            ]
        );
        assert_eq!((s.state, s.rejected.clone()), (State::Ok, None));
    }

    #[test]
    fn an_operator_rollback_clears_a_refusal() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        s.handle(
            Event::Refused {
                head: oid(2),
                revision: None,
                why: Refusal::Unverified("x".into()),
            },
            21,
        );
        s.handle(Event::Rollback { target: oid(1) }, 30);
        assert_eq!((s.state, s.rejected.clone()), (State::Rollback, None));
    }

    #[test]
    fn refusals_and_the_last_good_revision_survive_a_restart() {
        let mut s = checked(deployed());
        applied(&mut s, 1, 11);
        deployed_at(&mut s, 2, 20);
        s.handle(
            Event::Applied {
                revision: oid(2),
                error: Some("down".into()),
            },
            25,
        );
        let json = serde_json::to_string(&s).unwrap();
        let back: Service = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (back.last_good, back.rejected.clone()),
            (s.last_good, s.rejected.clone())
        );
        // A state file from before these fields existed still loads.
        let old = r#"{"state":"OK","info":"","since":1,"deployed":null,"synced":null,"changed_at":null,"last_sync":null}"#;
        let back: Service = serde_json::from_str(old).unwrap();
        assert_eq!((back.last_good, back.rejected), (None, None));
    }

    /// The checkout holds head `n`, whose revision is `n`.
    fn in_place(s: &mut Service, n: u8, now: u64) -> Vec<Effect> {
        s.handle(
            Event::Deployed {
                head: oid(n),
                revision: Some(oid(n)),
            },
            now,
        )
    }

    fn asks_apply(fx: &[Effect]) -> bool {
        fx.iter().any(|e| matches!(e, Effect::Apply { .. }))
    }

    #[test]
    fn a_wipe_rebuilds_at_the_synced_head_and_applies_again_once_in_place() {
        let mut s = deployed();
        s.handle(
            Event::Drift {
                files: vec!["a".into()],
            },
            11,
        );
        assert_eq!(s.state, State::Diff);
        let fx = s.handle(Event::Wipe, 12);
        assert_eq!(
            fx,
            vec![Effect::Rebuild {
                head: oid(1),
                deployed: Some(oid(1)),
            }]
        );
        // Same revision, new directories: applied again so the mounts move, and clean.
        let fx = in_place(&mut s, 1, 13);
        assert!(fx.contains(&Effect::Apply { revision: oid(1) }), "{fx:?}");
        assert_eq!(s.state, State::Ok);
        assert!(s.drift.is_empty());
        // An ordinary deploy of the same revision later does not apply again.
        let fx = in_place(&mut s, 1, 14);
        assert!(!asks_apply(&fx), "{fx:?}");
    }

    #[test]
    fn a_failed_wipe_keeps_the_old_checkout_and_forgets_the_rebuild() {
        let mut s = deployed();
        s.handle(Event::Wipe, 12);
        s.handle(
            Event::DeployFailed {
                head: oid(1),
                error: "disk full".into(),
            },
            13,
        );
        assert_eq!(s.state, State::Broken);
        assert_eq!(s.deployed, Some(oid(1)));
        let fx = in_place(&mut s, 1, 14);
        assert!(!asks_apply(&fx), "{fx:?}");
    }

    #[test]
    fn a_wipe_does_nothing_in_noop_mode_or_before_a_first_checkout() {
        let mut s = Service::new(0);
        assert_eq!(s.handle(Event::Wipe, 1), vec![]);
        let mut s = deployed();
        s.handle(
            Event::Reconfigured {
                noop: true,
                health: false,
                moved: false,
            },
            11,
        );
        assert_eq!(s.handle(Event::Wipe, 12), vec![]);
    }

    #[test]
    fn a_restart_applies_what_has_no_record_and_takes_a_recorded_failure_as_broken() {
        // Deployed while no daemon could apply: no record, or one of an older revision.
        for applied in [None, Some((oid(0), None))] {
            let mut s = deployed();
            let fx = s.handle(Event::Resumed { applied }, 20);
            assert_eq!(fx, vec![Effect::Apply { revision: oid(1) }]);
        }
        // Applied meanwhile (the .path unit): nothing to do.
        let mut s = deployed();
        let fx = s.handle(
            Event::Resumed {
                applied: Some((oid(1), None)),
            },
            20,
        );
        assert_eq!(fx, vec![]);
        assert_eq!(s.state, State::Ok);
        // Failed meanwhile: BROKEN, as if the daemon had seen it.
        let fx = s.handle(
            Event::Resumed {
                applied: Some((oid(1), Some("unit failed".into()))),
            },
            21,
        );
        assert_eq!(s.state, State::Broken);
        assert!(s.info.contains("unit failed"), "{}", s.info);
        assert_eq!(fx, vec![Effect::Persist]);
        // Nothing deployed, or noop: nothing to apply.
        let mut s = Service::new(0);
        assert_eq!(s.handle(Event::Resumed { applied: None }, 1), vec![]);
        let mut s = deployed();
        s.handle(
            Event::Reconfigured {
                noop: true,
                health: false,
                moved: false,
            },
            11,
        );
        assert_eq!(s.handle(Event::Resumed { applied: None }, 12), vec![]);
    }

    fn held(s: &mut Service, head: u8, revision: u8, now: u64) -> Vec<Effect> {
        s.handle(
            Event::Held {
                head: oid(head),
                revision: oid(revision),
                why: format!("waiting for wave 0: web1 not on {revision} OK for 5m"),
            },
            now,
        )
    }

    #[test]
    fn a_held_revision_keeps_the_state_notes_why_and_is_asked_again_at_the_next_fetch() {
        let mut s = deployed();
        assert_eq!(s.handle(fetched(Some(oid(2))), 20).len(), 1);
        let before = s.clone();
        assert_eq!(held(&mut s, 2, 2, 21), vec![]);
        assert_eq!(
            (s.state, s.info.as_str()),
            (before.state, before.info.as_str())
        );
        assert_eq!((s.deployed, s.synced), (Some(oid(1)), Some(oid(1))));
        let w = s.waiting().unwrap();
        assert_eq!((w.head, w.revision), (oid(2), oid(2)));
        // The next fetch of the same head asks the gate again.
        assert_eq!(
            s.handle(fetched(Some(oid(2))), 30),
            vec![Effect::Deploy {
                head: oid(2),
                from: Some(oid(1)),
                deployed: Some(oid(1)),
                gate: FOLLOW,
            }]
        );
        // A newer commit replaces the one waited for.
        held(&mut s, 3, 3, 31);
        assert_eq!(s.waiting().map(|w| w.revision), Some(oid(3)));
        // Once through, the note goes.
        s.handle(
            Event::Deployed {
                head: oid(3),
                revision: Some(oid(3)),
            },
            40,
        );
        assert_eq!((s.state, s.waiting()), (State::Ok, None));
    }

    #[test]
    fn a_freeze_or_a_rollback_ends_the_waiting() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        held(&mut s, 2, 2, 21);
        let mut frozen = s.clone();
        frozen.handle(Event::Freeze { until: None }, 22);
        assert_eq!(frozen.waiting(), None);
        s.handle(Event::Rollback { target: oid(1) }, 22);
        assert_eq!(s.waiting(), None);
    }

    #[test]
    fn promote_lets_the_revision_waited_for_through_once() {
        let mut s = deployed();
        // Not waiting: nothing to promote.
        assert_eq!(s.handle(Event::Promote, 15), vec![]);
        assert_eq!(s.promoted(), None);
        s.handle(fetched(Some(oid(2))), 20);
        held(&mut s, 2, 2, 21);
        let promoted = Gate {
            promoted: Some(oid(2)),
            ..FOLLOW
        };
        assert_eq!(
            s.handle(Event::Promote, 22),
            vec![
                Effect::Deploy {
                    head: oid(2),
                    from: Some(oid(1)),
                    deployed: Some(oid(1)),
                    gate: promoted,
                },
                Effect::Persist
            ]
        );
        // Deployed: the promotion is used up, and the next revision is gated again.
        s.handle(
            Event::Deployed {
                head: oid(2),
                revision: Some(oid(2)),
            },
            23,
        );
        assert_eq!(s.promoted(), None);
        assert_eq!(
            s.handle(fetched(Some(oid(3))), 30),
            vec![Effect::Deploy {
                head: oid(3),
                from: Some(oid(2)),
                deployed: Some(oid(2)),
                gate: FOLLOW,
            }]
        );
    }

    #[test]
    fn a_newer_revision_replaces_a_promoted_one_and_is_gated() {
        let mut s = deployed();
        s.handle(fetched(Some(oid(2))), 20);
        held(&mut s, 2, 2, 21);
        s.handle(Event::Promote, 22);
        // A newer commit arrived before the promoted one was deployed: its deploy still carries
        // the promotion, which the deploy job uses only for the promoted revision.
        let fx = s.handle(fetched(Some(oid(3))), 23);
        assert!(
            matches!(fx[..], [Effect::Deploy { head, gate, .. }] if head == oid(3) && gate.promoted == Some(oid(2))),
            "{fx:?}"
        );
        assert_eq!(held(&mut s, 3, 3, 24), vec![Effect::Persist]);
        assert_eq!(s.promoted(), None);
        // Promotion survives a restart until used.
        s.handle(Event::Promote, 25);
        let back: Service = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.promoted(), Some(oid(3)));
        // Frozen or noop: no promotion.
        let mut frozen = deployed();
        frozen.handle(fetched(Some(oid(2))), 20);
        held(&mut frozen, 2, 2, 21);
        frozen.frozen = true;
        assert_eq!(frozen.handle(Event::Promote, 22), vec![]);
    }

    /// A machine with nothing deployed may take the lower waves' revision while the head's waits
    /// (`settle`); it is then behind like any machine, and the next fetch gates the head again.
    #[test]
    fn a_new_machine_settles_on_the_lower_waves_revision_and_the_head_is_gated_again() {
        let mut s = Service::new(0);
        let fx = s.handle(fetched(Some(oid(3))), 10);
        assert!(
            matches!(fx[..], [Effect::Deploy { head, from: None, deployed: None, gate }]
                if head == oid(3) && gate == Gate { settle: true, ..FOLLOW }),
            "{fx:?}"
        );
        // The deploy job took oid(1), where the lower waves are, and the head's revision waits.
        let fx = s.handle(
            Event::Deployed {
                head: oid(1),
                revision: Some(oid(1)),
            },
            11,
        );
        assert_eq!(
            fx,
            vec![Effect::Apply { revision: oid(1) }, Effect::Persist]
        );
        assert_eq!(held(&mut s, 3, 3, 11), vec![]);
        assert_eq!(
            (s.state, s.deployed, s.synced, s.upstream),
            (State::Ok, Some(oid(1)), Some(oid(1)), Some(oid(3)))
        );
        assert_eq!(s.waiting().map(|w| w.revision), Some(oid(3)));
        // The next fetch gates the head again, from what is deployed, and settles no more.
        assert_eq!(
            s.handle(fetched(Some(oid(3))), 20),
            vec![Effect::Deploy {
                head: oid(3),
                from: Some(oid(1)),
                deployed: Some(oid(1)),
                gate: FOLLOW,
            }]
        );
        // A rollback target or an operator's pull --force never settles.
        let mut s = Service::new(0);
        s.handle(fetched(Some(oid(3))), 10);
        let fx = s.handle(Event::Rollback { target: oid(2) }, 11);
        assert!(
            matches!(fx[..], [Effect::Deploy { gate, .. }, ..] if !gate.settle),
            "{fx:?}"
        );
    }

    #[test]
    fn a_checkout_cut_short_is_rewritten_at_the_head_through_its_gates_or_put_back() {
        // Rewritten at the head, judged as a deploy of the head (it follows the branch).
        let mut s = deployed();
        s.handle(Event::Interrupted, 11);
        let fx = s.handle(fetched(Some(oid(2))), 12);
        assert!(
            matches!(fx[..], [Effect::Restore { head, gate, .. }] if head == oid(2) && gate.follow),
            "{fx:?}"
        );
        // The rollout wave holds the head: the files go back to the last saved head, whole.
        let fx = s.handle(
            Event::Held {
                head: oid(2),
                revision: oid(2),
                why: "waiting for wave 0".into(),
            },
            13,
        );
        assert!(
            matches!(fx[..], [Effect::Restore { head, gate, .. }] if head == oid(1) && !gate.follow),
            "{fx:?}"
        );
        in_place(&mut s, 1, 14);
        // Then the head is a deploy like any other, gated again.
        let fx = s.handle(fetched(Some(oid(2))), 15);
        assert!(
            matches!(fx[..], [Effect::Deploy { head, gate, .. }] if head == oid(2) && gate.follow),
            "{fx:?}"
        );
        // Refused (a rewritten history), the same.
        let mut s = deployed();
        s.handle(Event::Interrupted, 11);
        s.handle(fetched(Some(oid(2))), 12);
        let fx = s.handle(
            Event::Refused {
                head: oid(2),
                revision: None,
                why: Refusal::Rewritten("history rewritten".into()),
            },
            13,
        );
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Restore { head, .. } if *head == oid(1))),
            "{fx:?}"
        );
        // An operator's pull --force is never gated.
        let mut s = deployed();
        s.handle(Event::Force, 11);
        let fx = s.handle(fetched(Some(oid(2))), 12);
        assert!(
            matches!(fx[..], [Effect::Restore { head, gate, .. }] if head == oid(2) && !gate.follow),
            "{fx:?}"
        );
    }
}

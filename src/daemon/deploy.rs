//! The deploy job: the gates a head passes before it reaches a service's checkout (signature,
//! history, a revision refused before, the rollout wave, the tree's inspection, the service's
//! `check` on a staged copy), the checkout itself, and the `.rev` hand-over to systemd. Runs on a blocking thread,
//! one upstream's services one after the other on its store; every outcome becomes an event.

use std::path::PathBuf;

use tracing::{debug, info, info_span, warn};

use crate::config;
use crate::error;
use crate::exec;
use crate::git::{self, GitError, Oid, Store};
use crate::layout::{self, Layout};
use crate::rollout;
use crate::service::{self, Event, Refusal};

/// Why moving a service's checkout failed. Becomes the service's BROKEN info, except `Refused`,
/// which is the deploy job declining a head on purpose (the files on disk are untouched).
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("refused: {why}")]
    Refused {
        revision: Option<Oid>,
        why: service::Refusal,
    },
    /// The wave gate is closed for `revision`: the lower waves have not soaked on it (or
    /// Prometheus did not say). Nothing on disk changed.
    #[error("{}", closed.why)]
    Held {
        revision: Oid,
        closed: rollout::Closed,
    },
    #[error(transparent)]
    Git(#[from] GitError),
    /// The upstream's store could not be opened: the one error of every job of the upstream.
    #[error(transparent)]
    Store(std::sync::Arc<GitError>),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(super) struct DeployJob {
    pub(super) service: config::Service,
    /// The upstream's trust and force-push settings.
    pub(super) upstream: config::UpstreamSettings,
    /// What a revision may hold (file sizes).
    pub(super) limits: git::Limits,
    /// What the state machine holds the head to: history, a revision refused before.
    pub(super) gate: service::Gate,
    pub(super) head: Oid,
    pub(super) from: Option<Oid>,
    pub(super) deployed: Option<Oid>,
    pub(super) kind: Kind,
    /// The service's rollout wave, when it is above 0: the gate a new revision of the branch
    /// head waits at.
    pub(super) wave: Option<std::sync::Arc<rollout::Wave>>,
}

/// What a deploy job does with a head that passed the gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Move the checkout to the head, where the service's files changed.
    Deploy,
    /// The same, rewriting the checkout even where its revision did not move: drops local edits
    /// (`pull --force`) and finishes a checkout cut short.
    Restore,
    /// Build the checkout afresh beside the old one and swap them (wipe).
    Rebuild,
    /// Noop: judge the head, count what would change, and write nothing.
    Preview,
}

/// What a deploy job did for one service.
pub(super) enum Deployed {
    /// The checkout holds the head: the service's revision there.
    Done { revision: Option<Oid> },
    /// Nothing was deployed and the head's `held` revision waits at the wave gate: the checkout
    /// holds `head` instead, an older commit of the branch whose `revision` every lower machine
    /// has soaked on (`service::Gate::settle`). `why` is the head's note.
    Settled {
        head: Oid,
        revision: Option<Oid>,
        held: Oid,
        why: String,
    },
    /// Noop: the head passed every gate; the revision it would deploy and how many files change.
    Would { revision: Option<Oid>, files: usize },
}

/// Runs the checkouts of one upstream's services, one after the other, on one store.
pub(super) fn deploy_all(layout: &Layout, url: &str, jobs: Vec<DeployJob>) -> Vec<(String, Event)> {
    let store = Store::open(&layout.stores(), url).map_err(std::sync::Arc::new);
    // Prometheus failing once is not asked again in this run (one timeout per upstream).
    let mut asked = rollout::Asked::default();
    let mut events = Vec::with_capacity(jobs.len());
    for job in jobs {
        let span = info_span!("service", name = %job.service.name);
        let _g = span.enter();
        let head = job.head;
        let (head, result) = match &store {
            Ok(store) => deploy(store, layout, &job, &mut asked),
            Err(e) => (head, Err(DeployError::Store(e.clone()))),
        };
        let name = &job.service.name;
        match result {
            Ok(Deployed::Done { revision }) => {
                events.push((name.clone(), Event::Deployed { head, revision }))
            }
            Ok(Deployed::Settled {
                head,
                revision,
                held,
                why,
            }) => {
                // What is now in place, then what still waits: the head, gated again at the
                // next fetch.
                events.push((name.clone(), Event::Deployed { head, revision }));
                events.push((
                    name.clone(),
                    Event::Held {
                        head: job.head,
                        revision: held,
                        why,
                    },
                ));
            }
            Ok(Deployed::Would { revision, files }) => events.push((
                name.clone(),
                Event::Previewed {
                    head,
                    revision,
                    files,
                },
            )),
            Err(DeployError::Held { revision, closed }) => {
                let why = closed.why;
                info!(head = %head, revision = %service::short(Some(revision)), "held: {why}");
                events.push((
                    name.clone(),
                    Event::Held {
                        head,
                        revision,
                        why,
                    },
                ));
            }
            Err(DeployError::Refused { revision, why }) => {
                warn!(head = %head, reason = why.reason(), "refused: {why}");
                events.push((
                    name.clone(),
                    Event::Refused {
                        head,
                        revision,
                        why,
                    },
                ));
            }
            Err(e) => events.push((
                name.clone(),
                Event::DeployFailed {
                    head,
                    error: error::chain(&e),
                },
            )),
        }
    }
    events
}

/// [`deploy_at`] the job's head; when the wave gate holds it and the state machine allows
/// (`settle`), the revision the lower waves are all on instead ([`settle`]). Returns the head
/// the outcome is about.
fn deploy(
    store: &Store,
    layout: &Layout,
    job: &DeployJob,
    asked: &mut rollout::Asked,
) -> (Oid, Result<Deployed, DeployError>) {
    match deploy_at(store, layout, job, job.head, Some(asked)) {
        Err(DeployError::Held { revision, closed }) if job.gate.settle => {
            settle(store, layout, job, asked, revision, closed)
        }
        other => (job.head, other),
    }
}

/// A service with nothing deployed whose head's `revision` the wave gate holds takes the
/// revision every lower machine is on instead, when the branch went through it (first-parent
/// chain), it is its own revision there, and the lower machines have soaked on it (the gate for
/// it is open). Otherwise, or when that revision is refused here, the head stays held, saying
/// so. The older head goes through every other gate as any head does.
fn settle(
    store: &Store,
    layout: &Layout,
    job: &DeployJob,
    asked: &mut rollout::Asked,
    revision: Oid,
    mut closed: rollout::Closed,
) -> (Oid, Result<Deployed, DeployError>) {
    let held = |closed| (job.head, Err(DeployError::Held { revision, closed }));
    let (Some(wave), Some(now)) = (&job.wave, &closed.now) else {
        return held(closed);
    };
    let Some(lower) = wave
        .common(now)
        .filter(|y| *y != revision && Some(*y) != job.gate.avoid)
    else {
        return held(closed);
    };
    let links = job.service.links();
    let ours = store
        .on_first_parent_chain(lower, job.head)
        .and_then(|on| Ok(on && store.last_change(lower, &links)? == Some(lower)));
    match ours {
        Ok(true) => {}
        Ok(false) => {
            debug!(lower = %lower, "the lower waves' revision is not one of the branch's own");
            return held(closed);
        }
        Err(e) => {
            warn!(lower = %lower, "cannot look for the lower waves' revision: {}", error::chain(&e));
            return held(closed);
        }
    }
    if let Err(not) = wave.judge(lower, asked) {
        debug!(lower = %lower, "the lower waves' revision is not soaked either: {}", not.why);
        return held(closed);
    }
    match deploy_at(store, layout, job, lower, None) {
        Ok(Deployed::Done { revision: r }) => {
            info!(
                revision = %service::short(r),
                waiting = %service::short(Some(revision)),
                "nothing deployed yet: taking the revision the lower waves are on"
            );
            let why = std::mem::take(&mut closed.why);
            (
                job.head,
                Ok(Deployed::Settled {
                    head: lower,
                    revision: r,
                    held: revision,
                    why,
                }),
            )
        }
        Err(DeployError::Refused { why, .. }) => {
            warn!(lower = %lower, "the lower waves' revision is refused here: {why}");
            closed.why = format!(
                "{}; the lower waves' {} is refused here: {why}",
                closed.why,
                service::short(Some(lower))
            );
            held(closed)
        }
        other => (lower, other),
    }
}

/// Moves one service's checkout to `head` when its paths changed, and hands a new deployed
/// revision to systemd by rewriting the service's `.rev` file. Returns what it did.
///
/// The revision is a function of the head alone ([`Store::last_change`]): two machines on the
/// same head report the same hash whatever they fetched before, and after a force-push the hash is
/// one the branch has. When only the hash moves (a commit restoring earlier files, an amended
/// commit), the `.rev` follows, the files stay, and `plumb apply` leaves the unit alone.
///
/// The wave gate is asked only with `asked` (the lower waves' revision comes here judged).
fn deploy_at(
    store: &Store,
    layout: &Layout,
    job: &DeployJob,
    head: Oid,
    asked: Option<&mut rollout::Asked>,
) -> Result<Deployed, DeployError> {
    let svc = &job.service;
    let links = svc.links();
    let target = svc.checkout_dir();
    let refuse = |revision: Option<Oid>, why: Refusal| DeployError::Refused { revision, why };
    if job.upstream.verifies() {
        match store.verify_commit(head, &job.upstream.trust()) {
            Ok(signer) => debug!(head = %head, "signed by {signer}"),
            Err(e) => return Err(refuse(None, Refusal::Unverified(error::chain(&e)))),
        }
    }
    if job.gate.follow
        && job.upstream.force_push == config::ForcePush::Refuse
        && let Some(f) = job.from.filter(|f| *f != head)
        && !store.in_history(f, head).unwrap_or(false)
    {
        return Err(refuse(
            None,
            Refusal::Rewritten(format!(
                "history rewritten upstream: {} does not descend from the deployed {}",
                service::short(Some(head)),
                service::short(Some(f))
            )),
        ));
    }
    // Without its checkout, or when the store no longer has the old head, start from nothing.
    let from = job
        .from
        .filter(|_| target.is_dir())
        .filter(|f| store.resolve(&f.to_string()).is_ok());
    // Every service file of the head when there is nothing to start from.
    let paths = store.changed_paths(from, head, &links)?;
    let fresh = job.kind == Kind::Rebuild;
    let changed =
        from.is_none() || !paths.is_empty() || matches!(job.kind, Kind::Restore | Kind::Rebuild);
    let revision = store.last_change(head, &links)?;
    if changed && !fresh && revision.is_some() && revision == job.gate.avoid {
        return Err(refuse(revision, Refusal::Known));
    }
    if let Some(asked) = asked {
        wave_gate(job, revision, asked)?;
    }
    if changed {
        match store.inspect(head, &links, &job.limits) {
            Err(e @ GitError::Hostile { .. }) => {
                return Err(refuse(revision, Refusal::Hostile(e.to_string())));
            }
            other => other?,
        }
    }
    if changed
        && !fresh
        && let (Some(check), Some(rev)) = (&svc.check, revision)
    {
        run_check(store, layout, svc, check, head, rev)?;
    }
    if job.kind == Kind::Preview {
        return Ok(Deployed::Would {
            revision,
            files: paths.len(),
        });
    }
    let marker = layout.service_deploying(&svc.name);
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| DeployError::Io { path, source }
    };
    if fresh {
        rebuild(store, layout, job, &target, &links)?;
    } else if changed {
        std::fs::create_dir_all(&target).map_err(io(&target))?;
        // Until the daemon has saved the deploy, a checkout cut short (kill -9 while its files
        // are renamed into place) must not read as local edits: the marker makes the next fetch
        // redo it instead (removed once saved). Anything failing before the renames leaves the
        // live files as they were: the new revision is written beside them first.
        layout::write_atomic(&marker, format!("{}\n", head).as_bytes()).map_err(io(&marker))?;
        store.checkout_atomic(
            &target,
            &layout.service_index(&svc.name),
            from,
            head,
            &links,
            svc.user.as_deref(),
        )?;
    }
    // Written when it names another revision than the one in place (or is missing): also after
    // a checkout cut short was put back at the last saved head, whose `.rev` may name the newer
    // revision that never finished. Never rewritten with the same content: the `.path` unit
    // would apply again.
    let rev_file = layout.service_rev(&svc.name);
    let named = std::fs::read_to_string(&rev_file).ok();
    if let Some(rev) = revision
        && named.as_deref().map(str::trim) != Some(rev.to_string().as_str())
    {
        layout::write_atomic(&rev_file, format!("{rev}\n").as_bytes()).map_err(|source| {
            DeployError::Io {
                path: rev_file.clone(),
                source,
            }
        })?;
    }
    Ok(Deployed::Done { revision })
}

/// The rollout wave's gate: a new revision of the branch head (not a rollback, an operator's
/// restore or a wipe; not one already deployed; not one an operator promoted) waits until Prometheus shows
/// every machine of the lower waves on it and OK for the soak. Blocking: one or two queries.
fn wave_gate(
    job: &DeployJob,
    revision: Option<Oid>,
    asked: &mut rollout::Asked,
) -> Result<(), DeployError> {
    let (Some(wave), Some(revision)) = (&job.wave, revision) else {
        return Ok(());
    };
    // A restore that follows the branch is a checkout cut short being rewritten at the head:
    // gated like the deploy it finishes (an operator's pull --force does not follow).
    if !job.gate.follow
        || !matches!(job.kind, Kind::Deploy | Kind::Restore)
        || Some(revision) == job.deployed
        || Some(revision) == job.gate.promoted
    {
        return Ok(());
    }
    match wave.judge(revision, asked) {
        Ok(()) => {
            info!(revision = %service::short(Some(revision)), wave = wave.wave, "the lower waves are on it: deploying");
            Ok(())
        }
        Err(closed) => Err(DeployError::Held { revision, closed }),
    }
}

/// Checks `head` out beside the live checkout and runs the service's `check` on it; a failure is
/// a refusal carrying the command's output. The staged tree is removed either way.
fn run_check(
    store: &Store,
    layout: &Layout,
    svc: &config::Service,
    check: &config::Check,
    head: Oid,
    revision: Oid,
) -> Result<(), DeployError> {
    let staging = layout.staging(&svc.name);
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| DeployError::Io { path, source }
    };
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let index = staging.with_extension("index");
    let _ = std::fs::remove_file(&index);
    let result = (|| {
        store.checkout(&staging, &index, None, head, &svc.links())?;
        let dir = svc
            .dirs
            .first()
            .map(|d| staging.join(&d.link))
            .unwrap_or_else(|| staging.clone());
        let command = check
            .command
            .replace("{dir}", &exec::shell_quote(&dir.to_string_lossy()))
            .replace("{root}", &exec::shell_quote(&staging.to_string_lossy()))
            .replace("{rev}", &revision.to_string());
        info!(command = %command, "checking {}", service::short(Some(revision)));
        let spec = exec::Spec::new("/bin/sh", check.timeout)
            .arg("-c")
            .arg(&command)
            .env("PLUMB_DIR", &dir)
            .env("PLUMB_ROOT", &staging)
            .env("PLUMB_REVISION", revision.to_string())
            .env("PLUMB_SERVICE", &svc.name)
            .dir(&staging);
        let why = match exec::run_blocking(spec) {
            Ok(out) if out.success() => return Ok(()),
            Ok(out) => out.failure(10),
            Err(e) => error::chain(&e),
        };
        Err(DeployError::Refused {
            revision: Some(revision),
            why: Refusal::Check(why),
        })
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_file(&index);
    result
}

/// Why a rollback target cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The store could not be opened or its history walked.
    #[error(transparent)]
    Store(GitError),
    /// What the operator typed names no commit; `hint` says what to try (or is empty).
    #[error("unknown revision {revision:?} in {url}{hint}")]
    Unknown {
        revision: String,
        url: String,
        hint: &'static str,
    },
    /// Nothing was fetched yet.
    #[error("the service has no branch head yet to roll back on")]
    NoHead,
    /// The upstream requires signatures and the target's does not hold.
    #[error("refusing to roll back")]
    Unverified(#[source] GitError),
    /// The commit is not on the service's branch.
    #[error("{revision:?} ({}) is not in the history of the service's branch", service::short(Some(*.target)))]
    NotInHistory { revision: String, target: Oid },
}

/// Turns what an operator typed into a commit of the service's branch history.
pub(super) fn resolve_in_history(
    stores: &std::path::Path,
    url: &str,
    revision: &str,
    head: Option<Oid>,
    upstream: &config::UpstreamSettings,
) -> Result<Oid, RollbackError> {
    let store = Store::open_readonly(stores, url).map_err(RollbackError::Store)?;
    let target = store
        .resolve(revision)
        .map_err(|e| unknown_revision(revision, url, &e))?;
    let head = head.ok_or(RollbackError::NoHead)?;
    match store.in_history(target, head) {
        Ok(true) if upstream.verifies() => {
            // A rollback target must be signed like any head: it is deployed as one.
            store
                .verify_commit(target, &upstream.trust())
                .map(|_| target)
                .map_err(RollbackError::Unverified)
        }
        Ok(true) => Ok(target),
        Ok(false) => Err(RollbackError::NotInHistory {
            revision: revision.to_owned(),
            target,
        }),
        Err(e) => Err(RollbackError::Store(e)),
    }
}

/// Why `revision` names no commit, with what to try: an abbreviated hash too short to be one, or
/// one that more than one object starts with, asks for more of the hash.
fn unknown_revision(revision: &str, url: &str, e: &GitError) -> RollbackError {
    let hex = !revision.is_empty() && revision.bytes().all(|b| b.is_ascii_hexdigit());
    let ambiguous = matches!(e, GitError::Resolve { source, .. } if source.code() == git2::ErrorCode::Ambiguous);
    let hint = if hex && revision.len() < 4 {
        "; an abbreviated hash needs at least 4 characters (7 or more are rarely ambiguous)"
    } else if ambiguous {
        "; more than one object's hash starts with it: give more characters \
         (plumbctl status shows whole hashes)"
    } else if hex {
        "; no commit fetched starts with it: is it on the branch upstream? \
         (plumbctl pull fetches)"
    } else {
        ""
    };
    RollbackError::Unknown {
        revision: revision.to_owned(),
        url: git::redact_url(url),
        hint,
    }
}

/// Wipe: checks the service out afresh beside its checkout, then swaps the two. The old one is
/// kept as `<checkout>.plumb-wiped` (still bound until apply re-binds the mounts, so the service
/// never sees a missing file) and removed by the next wipe.
fn rebuild(
    store: &Store,
    layout: &Layout,
    job: &DeployJob,
    target: &std::path::Path,
    links: &[String],
) -> Result<(), DeployError> {
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| DeployError::Io { path, source }
    };
    let aside = |suffix: &str| {
        let mut p = target.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    let (new, old) = (aside(".plumb-new"), aside(".plumb-wiped"));
    let index = layout.service_index(&job.service.name);
    let mut new_index = index.as_os_str().to_owned();
    new_index.push(".new");
    let new_index = std::path::PathBuf::from(new_index);
    for stale in [&new, &old] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(io(stale))?;
        }
    }
    let _ = std::fs::remove_file(&new_index);
    std::fs::create_dir_all(&new).map_err(io(&new))?;
    store.checkout_as(
        &new,
        &new_index,
        None,
        job.head,
        links,
        job.service.user.as_deref(),
    )?;
    if target.exists() {
        std::fs::rename(target, &old).map_err(io(target))?;
    }
    std::fs::rename(&new, target).map_err(io(target))?;
    std::fs::rename(&new_index, &index).map_err(io(&index))?;
    Ok(())
}

/// The gates and the noop executor on a real repository (libgit2, and `git-upload-pack` for the
/// `file://` fetch); no root needed.
#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::executor::{Executor, Noop};
    use super::*;
    use crate::config::Config;

    /// An upstream repository, a state directory and a config with one service `app` whose
    /// files are `app/` (a `check` that refuses a file named `bad`), and its store fetched.
    struct Fixture {
        _root: tempfile::TempDir,
        upstream: git2::Repository,
        url: String,
        layout: Layout,
        config: Config,
    }

    impl Fixture {
        fn new(force_push: &str) -> Fixture {
            let root = tempfile::tempdir().unwrap();
            let upstream = git2::Repository::init(root.path().join("upstream")).unwrap();
            let url = format!("file://{}", root.path().join("upstream").display());
            let state = root.path().join("state");
            let text = format!(
                "[plumb]\nstate_dir = {state:?}\n\n[[plumb.upstream]]\nurl = {url:?}\n\
                 force_push = {force_push:?}\n\n[[services]]\nmachine = \"m\"\nservice = \"app\"\n\
                 upstream = {url:?}\ncheck = \"test ! -e {{dir}}/bad\"\n\
                 dirs = [{{ local = \"/srv/app\", link = \"app\" }}]\n"
            );
            let config = Config::parse(Path::new("plumb.toml"), &text).unwrap();
            let layout = Layout::new(&state);
            layout.create().unwrap();
            Fixture {
                _root: root,
                upstream,
                url,
                layout,
                config,
            }
        }

        /// Commits `files` (path, content; a path ending in `@` is a symlink to the content) on
        /// top of `parent`, moves `main` there and fetches it into the store.
        fn commit(&self, parent: Option<Oid>, files: &[(&str, &str)]) -> Oid {
            let files: Vec<(&str, u32, &[u8])> = files
                .iter()
                .map(|(path, content)| match path.strip_suffix('@') {
                    Some(link) => (link, 0o120000, content.as_bytes()),
                    None => (*path, 0o100644, content.as_bytes()),
                })
                .collect();
            let tree = self
                .upstream
                .find_tree(crate::git::fixture::tree(&self.upstream, &files))
                .unwrap();
            let sig = git2::Signature::new("t", "t@example.org", &git2::Time::new(1, 0)).unwrap();
            let parents: Vec<git2::Commit> = parent
                .map(|p| self.upstream.find_commit(p).unwrap())
                .into_iter()
                .collect();
            let parents: Vec<&git2::Commit> = parents.iter().collect();
            let oid = self
                .upstream
                .commit(None, &sig, &sig, "c", &tree, &parents)
                .unwrap();
            self.upstream
                .reference("refs/heads/main", oid, true, "test")
                .unwrap();
            let mut store = Store::open(&self.layout.stores(), &self.url).unwrap();
            store
                .fetch(&["main".to_owned()], &git::Transport::default())
                .unwrap();
            oid
        }

        fn service(&self) -> config::Service {
            self.config.select(&["m".to_owned()]).unwrap().remove(0)
        }

        fn job(&self, head: Oid, from: Option<Oid>, gate: service::Gate, kind: Kind) -> DeployJob {
            DeployJob {
                service: self.service(),
                upstream: self.config.settings.upstream(&self.url),
                limits: self.config.settings.limits(),
                gate,
                head,
                from,
                deployed: from,
                kind,
                wave: None,
            }
        }

        fn run(&self, executor: &dyn Executor, job: DeployJob) -> Event {
            let mut events = executor.checkouts(&self.layout, &self.url, vec![job]);
            assert_eq!(events.len(), 1);
            events.remove(0).1
        }

        fn live(&self, file: &str) -> Option<String> {
            std::fs::read_to_string(self.service().checkout_dir().join("app").join(file)).ok()
        }

        fn rev(&self) -> Option<String> {
            std::fs::read_to_string(self.layout.service_rev("app")).ok()
        }
    }

    const FOLLOW: service::Gate = service::Gate {
        follow: true,
        avoid: None,
        promoted: None,
        settle: false,
    };

    fn system(f: &Fixture) -> super::super::executor::System {
        super::super::executor::System::new(f.layout.clone())
    }

    #[test]
    fn a_good_head_is_checked_out_and_its_revision_handed_over() {
        let f = Fixture::new("follow");
        let c1 = f.commit(None, &[("app/conf", "1")]);
        let event = f.run(&system(&f), f.job(c1, None, FOLLOW, Kind::Deploy));
        assert_eq!(
            event,
            Event::Deployed {
                head: c1,
                revision: Some(c1)
            }
        );
        assert_eq!(f.live("conf").as_deref(), Some("1"));
        assert_eq!(f.rev(), Some(format!("{c1}\n")));
    }

    #[test]
    fn a_failing_check_refuses_the_head_and_leaves_the_files() {
        let f = Fixture::new("follow");
        let c1 = f.commit(None, &[("app/conf", "1")]);
        f.run(&system(&f), f.job(c1, None, FOLLOW, Kind::Deploy));
        let c2 = f.commit(Some(c1), &[("app/conf", "2"), ("app/bad", "x")]);
        let event = f.run(&system(&f), f.job(c2, Some(c1), FOLLOW, Kind::Deploy));
        assert!(
            matches!(&event, Event::Refused { head, revision: Some(r), why: Refusal::Check(_) } if *head == c2 && *r == c2),
            "{event:?}"
        );
        assert_eq!(f.live("conf").as_deref(), Some("1"));
        assert_eq!(f.rev(), Some(format!("{c1}\n")));
    }

    #[test]
    fn a_revision_refused_before_is_refused_without_running_anything() {
        let f = Fixture::new("follow");
        let c1 = f.commit(None, &[("app/conf", "1")]);
        f.run(&system(&f), f.job(c1, None, FOLLOW, Kind::Deploy));
        let c2 = f.commit(Some(c1), &[("app/conf", "2")]);
        // A later head whose service files are still c2's (a commit elsewhere).
        let c3 = f.commit(Some(c2), &[("app/conf", "2"), ("other/x", "x")]);
        let gate = service::Gate {
            follow: true,
            avoid: Some(c2),
            promoted: None,
            settle: false,
        };
        let event = f.run(&system(&f), f.job(c3, Some(c1), gate, Kind::Deploy));
        assert_eq!(
            event,
            Event::Refused {
                head: c3,
                revision: Some(c2),
                why: Refusal::Known
            }
        );
        assert_eq!(f.live("conf").as_deref(), Some("1"));
    }

    #[test]
    fn a_rewritten_history_is_refused_only_when_the_upstream_says_so() {
        for (setting, refused) in [("refuse", true), ("follow", false)] {
            let f = Fixture::new(setting);
            let c1 = f.commit(None, &[("app/conf", "1")]);
            f.run(&system(&f), f.job(c1, None, FOLLOW, Kind::Deploy));
            // Not a descendant of c1: a force-push.
            let other = f.commit(None, &[("app/conf", "2")]);
            let event = f.run(&system(&f), f.job(other, Some(c1), FOLLOW, Kind::Deploy));
            assert_eq!(
                matches!(
                    &event,
                    Event::Refused {
                        why: Refusal::Rewritten(_),
                        ..
                    }
                ),
                refused,
                "{setting}: {event:?}"
            );
            // An operator's pull --force (a restore) does not follow the branch: never refused.
            let restore = service::Gate::default();
            let event = f.run(&system(&f), f.job(other, Some(c1), restore, Kind::Restore));
            assert!(matches!(event, Event::Deployed { .. }), "{event:?}");
        }
    }

    #[test]
    fn a_symlink_out_of_the_service_is_refused_as_hostile() {
        let f = Fixture::new("follow");
        let c1 = f.commit(None, &[("app/conf", "1")]);
        f.run(&system(&f), f.job(c1, None, FOLLOW, Kind::Deploy));
        let c2 = f.commit(Some(c1), &[("app/conf", "2"), ("app/escape@", "../../etc")]);
        let event = f.run(&system(&f), f.job(c2, Some(c1), FOLLOW, Kind::Deploy));
        assert!(
            matches!(
                &event,
                Event::Refused {
                    why: Refusal::Hostile(_),
                    ..
                }
            ),
            "{event:?}"
        );
        assert_eq!(f.live("conf").as_deref(), Some("1"));
    }

    #[test]
    fn the_noop_executor_judges_whatever_it_is_asked_and_writes_nothing() {
        let f = Fixture::new("follow");
        let c1 = f.commit(None, &[("app/conf", "1"), ("app/other", "o")]);
        for kind in [Kind::Deploy, Kind::Restore, Kind::Rebuild, Kind::Preview] {
            let event = f.run(&Noop, f.job(c1, None, FOLLOW, kind));
            assert_eq!(
                event,
                Event::Previewed {
                    head: c1,
                    revision: Some(c1),
                    files: 2
                },
                "{kind:?}"
            );
            assert!(!f.service().checkout_dir().exists(), "{kind:?}");
            assert_eq!(f.rev(), None, "{kind:?}");
            assert!(!f.layout.service_deploying("app").exists(), "{kind:?}");
        }
        // Its gates still hold: a failing check is a refusal, as it would be for real.
        let c2 = f.commit(Some(c1), &[("app/conf", "2"), ("app/bad", "x")]);
        let event = f.run(&Noop, f.job(c2, Some(c1), FOLLOW, Kind::Deploy));
        assert!(
            matches!(
                &event,
                Event::Refused {
                    why: Refusal::Check(_),
                    ..
                }
            ),
            "{event:?}"
        );
        assert!(!f.service().checkout_dir().exists());
        // And it starts no apply, installs nothing.
        assert!(Noop.apply(&f.service(), c1).is_none());
        assert!(!Noop.applies());
    }
}

//! Operators' commands to the daemon: the messages the control API sends (`Command`, answered
//! through a [`Handle`]), and how the actor carries each out.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Daemon, Done, Waiter, deploy, fetch, unix_now};
use crate::apply;
use crate::config;
use crate::git::{self, Oid, Store};
use crate::proto::{ActionResult, DiffResult, ServiceStatus};
use crate::service::{self, Event};

impl Daemon {
    /// Carries out one request: reads at once, writes that need the store once their upstream's
    /// work is done.
    pub(super) fn command(&mut self, request: Request, tx: &mpsc::Sender<Done>) {
        match request {
            Request::Services(reply) => {
                let _ = reply.send(self.services.keys().map(|n| self.status(n)).collect());
            }
            Request::Status(service, reply) => {
                let answer = match self.services.contains_key(&service) {
                    true => Ok(self.status(&service)),
                    false => Err(CommandError::UnknownService(service)),
                };
                let _ = reply.send(answer);
            }
            Request::Diff(service, reply) => self.diff(service, reply),
            Request::Poke(repositories, reply) => {
                self.poke(&repositories);
                let _ = reply.send(());
            }
            Request::Write(command, reply) => self.write(command, reply, tx),
        }
    }

    /// Carries out one operator's write; those that need the store answer later.
    fn write(&mut self, command: Command, reply: Answer<ActionResult>, tx: &mpsc::Sender<Done>) {
        let now = unix_now();
        let known = |d: &Daemon, s: &str| {
            d.services
                .get(s)
                .map(|e| e.config.upstream.clone())
                .ok_or_else(|| CommandError::UnknownService(s.to_owned()))
        };
        match command {
            Command::Freeze { service, until } => {
                if let Err(e) = known(self, &service) {
                    let _ = reply.send(Err(e));
                    return;
                }
                info!(service = %service, until, "frozen by an operator");
                self.feed(&service, Event::Freeze { until }, now, tx);
                let mut answer = self.action(&service, "freeze");
                let pinned = self.services.get(&service).and_then(|e| e.state.pinned());
                if let (Some(_), Some(pinned)) = (until, pinned) {
                    // The state machine keeps a pin until an unfreeze: say so, since the caller
                    // asked for an end.
                    answer.message = format!(
                        "freeze: {service} stays pinned to {} by its rollback until unfrozen; \
                         a pin has no end time, so the duration does not apply",
                        service::short(Some(pinned))
                    );
                }
                let _ = reply.send(Ok(answer));
            }
            Command::Unfreeze(service) => {
                if let Err(e) = known(self, &service) {
                    let _ = reply.send(Err(e));
                    return;
                }
                info!(service = %service, "unfrozen by an operator");
                // The checkout follows at the next fetch, made due now.
                self.feed(&service, Event::Unfreeze, now, tx);
                self.fetch_soon(&service);
                let _ = reply.send(Ok(self.action(&service, "unfreeze")));
            }
            Command::Rollback { service, revision } => {
                let url = match known(self, &service) {
                    Ok(url) => url,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                let Some(entry) = self.services.get(&service) else {
                    return;
                };
                if entry.state.noop() {
                    let _ = reply.send(Err(noop_refusal(&service, "rollback")));
                    return;
                }
                let head = entry.state.upstream().or(entry.state.synced());
                let links = entry.config.links();
                let stores = self.layout.stores();
                let tx = tx.clone();
                let trust = self.config.settings.upstream(&url);
                // Read-only: safe beside a fetch running on the same store.
                tokio::task::spawn_blocking(move || {
                    let result = deploy::resolve_in_history(&stores, &url, &revision, head, &trust)
                        .map(|target| {
                            // How far the pin trails the head, counted now: the answer and every
                            // view show it at once, not from the next fetch on.
                            let behind = head.and_then(|head| {
                                Store::open_readonly(&stores, &url)
                                    .and_then(|s| {
                                        s.changes_since(target, head, &links, fetch::BEHIND_LIMIT)
                                    })
                                    .ok()
                                    .flatten()
                            });
                            (target, behind)
                        });
                    let _ = tx.blocking_send(Done::Resolved {
                        service,
                        result,
                        reply,
                    });
                });
            }
            Command::Wipe(service) => {
                let Some(e) = self.services.get(&service) else {
                    let _ = reply.send(Err(CommandError::UnknownService(service)));
                    return;
                };
                let url = e.config.upstream.clone();
                if e.state.noop() {
                    let _ = reply.send(Err(noop_refusal(&service, "wipe")));
                    return;
                }
                if e.state.synced().is_none() {
                    let _ = reply.send(Err(CommandError::NothingCheckedOut(service)));
                    return;
                }
                warn!(service = %service, "wipe: rebuilding the checkout");
                let jobs = self.feed(&service, Event::Wipe, now, tx);
                let waiter = Waiter {
                    service,
                    action: "wipe",
                    reply,
                };
                if let Some(u) = self.upstreams.get_mut(&url) {
                    u.queue(jobs, Some(waiter));
                }
            }
            Command::Promote(service) => {
                let Some(e) = self.services.get(&service) else {
                    let _ = reply.send(Err(CommandError::UnknownService(service)));
                    return;
                };
                let url = e.config.upstream.clone();
                let Some(w) = e.state.waiting().filter(|_| !e.state.frozen()) else {
                    let _ = reply.send(Err(CommandError::NotWaiting(service)));
                    return;
                };
                warn!(service = %service, revision = %service::short(Some(w.revision)), "promoted past the wave gate by an operator");
                let jobs = self.feed(&service, Event::Promote, now, tx);
                let waiter = Waiter {
                    service,
                    action: "promote",
                    reply,
                };
                if let Some(u) = self.upstreams.get_mut(&url) {
                    u.queue(jobs, Some(waiter));
                }
            }
            Command::Pull { service, force } => {
                let url = match known(self, &service) {
                    Ok(url) => url,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                // A head refused before (check, health, signature) is tried again.
                self.feed(&service, Event::Retry, unix_now(), tx);
                if force {
                    info!(service = %service, "pull --force: local edits will be dropped");
                    self.feed(&service, Event::Force, unix_now(), tx);
                }
                if let Some(u) = self.upstreams.get_mut(&url) {
                    if u.busy() {
                        debug!(service = %service, "pull: after the fetch running now");
                    }
                    u.fetch_now(
                        Instant::now(),
                        Some(Waiter {
                            service,
                            action: "pull",
                            reply,
                        }),
                    );
                }
            }
        }
    }

    /// A push webhook arrived: the upstreams that are one of `repositories` (any protocol) fetch
    /// now instead of at their next tick, or every upstream when none is (a mirror, a host known
    /// by another name) or the payload named none.
    fn poke(&mut self, repositories: &[String]) {
        let keys: BTreeSet<String> = repositories
            .iter()
            .map(|r| git::repository_key(r))
            .collect();
        let named = |url: &String| keys.contains(&git::repository_key(url));
        let any = self.upstreams.keys().any(named);
        if !any && !keys.is_empty() {
            debug!(repositories = ?repositories, "push webhook: no upstream is one of its repositories; fetching all");
        }
        for (url, u) in self.upstreams.iter_mut() {
            if !any || named(url) {
                u.fetch_now(Instant::now(), None);
            }
        }
    }

    /// What the next pull would change in `service`'s files, from the last fetch. Read-only on
    /// the store, so it needs no turn of the upstream's job.
    fn diff(&self, service: String, reply: Answer<DiffResult>) {
        let Some(e) = self.services.get(&service) else {
            let _ = reply.send(Err(CommandError::UnknownService(service)));
            return;
        };
        let (url, links) = (e.config.upstream.clone(), e.config.links());
        let (from, to, commits) = (e.state.synced(), e.state.upstream(), e.behind);
        let stores = self.layout.stores();
        tokio::task::spawn_blocking(move || {
            let files = match to {
                None => Ok(Vec::new()),
                Some(to) => Store::open_readonly(&stores, &url)
                    .and_then(|s| s.file_changes(from, to, &links))
                    .map_err(|e| CommandError::Store(Arc::new(e))),
            };
            let hex = |o: Option<Oid>| o.map(|o| o.to_string());
            let _ = reply.send(files.map(|files| {
                DiffResult {
                    service,
                    from: hex(from),
                    to: hex(to),
                    commits,
                    files: files
                        .into_iter()
                        .map(|f| crate::proto::FileDiff {
                            path: f.path,
                            change: f.change.to_owned(),
                        })
                        .collect(),
                }
            }));
        });
    }

    /// A service's status as the API shows it.
    fn status(&self, name: &str) -> ServiceStatus {
        use crate::proto::{ApplyStatus, DirStatus};
        let hex = |o: Option<Oid>| o.map(|o| o.to_string());
        let Some(e) = self.services.get(name) else {
            unreachable!("status of a service checked to exist")
        };
        let (c, s) = (&e.config, &e.state);
        ServiceStatus {
            service: c.name.clone(),
            machine: c.machine.clone(),
            state: s.state().into(),
            info: s.info().to_owned(),
            since: s.since(),
            upstream: git::redact_url(&c.upstream),
            branch: c.branch.clone(),
            deployed: hex(s.deployed()),
            upstream_head: hex(s.upstream()),
            behind: e.behind,
            frozen: s.frozen(),
            frozen_until: s.frozen_until(),
            pinned: hex(s.pinned()),
            dirs: c
                .dirs
                .iter()
                .map(|d| DirStatus {
                    local: d.local.display().to_string(),
                    link: d.link.clone(),
                    file: d.file,
                    ro: d.ro,
                })
                .collect(),
            notes: notes(c, s, e.wave.as_deref(), self.config_error.as_deref()),
            last_apply: apply::read_applied(&self.layout, name).map(|o| ApplyStatus {
                revision: o.revision.to_string(),
                ok: o.ok,
                message: o.message.clone(),
                time: o.time,
            }),
        }
    }

    /// The answer to a write: what was asked, whether the service is fine, and its status.
    pub(super) fn action(&self, service: &str, action: &str) -> ActionResult {
        let status = self.status(service);
        let ok = !status.state.failing();
        let message = if status.info.is_empty() {
            format!("{action}: done, {}", status.state)
        } else {
            format!("{action}: {}: {}", status.state, status.info)
        };
        ActionResult {
            action: action.to_owned(),
            ok,
            message,
            status,
        }
    }
}

/// What an operator should know beside a service's state: the config file refused, its upstream
/// failing, what noop mode holds back, what a rollout wave waits for (and the query that decides,
/// to paste into Prometheus or Grafana).
fn notes(
    c: &config::Service,
    s: &service::Service,
    wave: Option<&crate::rollout::Wave>,
    config_error: Option<&str>,
) -> Vec<String> {
    let mut notes: Vec<String> = config_error
        .map(|e| format!("config refused, running on the last accepted one: {e}"))
        .into_iter()
        .collect();
    notes.extend(
        s.unreachable()
            .iter()
            .map(|e| format!("upstream unreachable, serving the last fetched revision: {e}")),
    );
    if let Some(w) = s.waiting() {
        notes.push(format!(
            "{}; plumbctl promote {} lets {} through here",
            w.why,
            c.name,
            service::short(Some(w.revision))
        ));
        if let Some(wave) = wave {
            notes.push(format!(
                "wave {} gate (1 per machine once soaked): {}",
                wave.wave,
                wave.gate_query(w.revision)
            ));
        }
    }
    if let Some(p) = s.promoted().filter(|_| s.waiting().is_none()) {
        notes.push(format!(
            "{} promoted past the wave gate by an operator",
            service::short(Some(p))
        ));
    }
    if s.noop() {
        notes.push(match s.would() {
            None => "noop: nothing to deploy".to_owned(),
            Some(w) if w.files == 0 => format!(
                "noop: would move to head {} without changing a file",
                service::short(Some(w.head))
            ),
            Some(w) => format!(
                "noop: would deploy {}: {} file{} changed, {}",
                service::short(w.revision),
                w.files,
                if w.files == 1 { "" } else { "s" },
                if c.check.is_some() {
                    "check passed"
                } else {
                    "no check configured"
                }
            ),
        });
    }
    notes
}

/// Why a write that would touch a noop service's files is not carried out.
fn noop_refusal(service: &str, action: &'static str) -> CommandError {
    CommandError::Noop {
        service: service.to_owned(),
        action,
    }
}

/// An operator's write: what the control API's POST routes ask of the daemon, answered with an
/// [`ActionResult`] through [`Handle::call`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Stop tracking upstream, until `until` (unix seconds) or until unfrozen.
    Freeze { service: String, until: Option<u64> },
    /// Track upstream again (also ends a rollback pin).
    Unfreeze(String),
    /// Pin to `revision` (anything git accepts in the service's history) and freeze.
    Rollback { service: String, revision: String },
    /// Fetch and deploy now; answered when done. `force` also drops local edits.
    Pull { service: String, force: bool },
    /// Rebuild the service's checkout from the store at the same revision; the service keeps its
    /// current files until the new checkout is in place and re-bound. Drops local edits.
    Wipe(String),
    /// Let the revision the service's rollout wave waits for now through the gate, once;
    /// answered once its deploy is done.
    Promote(String),
}

/// Where the answer to one request goes.
pub(super) type Answer<T> = oneshot::Sender<Result<T, CommandError>>;

/// Why a command was refused; the API maps each to an HTTP status. Causes are `source`s: shown
/// with [`crate::error::Chain`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    /// 404.
    #[error("no service {0:?} on this machine")]
    UnknownService(String),
    /// 422: the command would change the files of a service in noop mode.
    #[error("{service} is in noop mode: a {action} would change its files; turn noop off first")]
    Noop {
        service: String,
        action: &'static str,
    },
    /// 422: a wipe of a service that has no checkout yet.
    #[error("{0} has nothing checked out yet")]
    NothingCheckedOut(String),
    /// 422: a promote of a service that waits for no rollout wave.
    #[error("{0} is not waiting for a rollout wave: nothing to promote")]
    NotWaiting(String),
    /// 422 (500 when the store could not be read): a rollback target that cannot be used.
    #[error(transparent)]
    Rollback(Arc<deploy::RollbackError>),
    /// 500: the upstream's store could not be read.
    #[error(transparent)]
    Store(Arc<git::GitError>),
    /// 503: the daemon is stopping.
    #[error("plumb is shutting down")]
    Unavailable,
}

/// One request in flight, each kind with the type of its own answer: the actor cannot answer a
/// status with a diff.
#[derive(Debug)]
pub enum Request {
    Services(oneshot::Sender<Vec<ServiceStatus>>),
    Status(String, Answer<ServiceStatus>),
    Diff(String, Answer<DiffResult>),
    Poke(Vec<String>, oneshot::Sender<()>),
    Write(Command, Answer<ActionResult>),
}

/// The API's way into the daemon's actor: cheap to clone, one per connection if need be.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
}

impl Handle {
    /// Carries out an operator's write and waits for its answer.
    pub async fn call(&self, command: Command) -> Result<ActionResult, CommandError> {
        self.ask(|reply| Request::Write(command, reply)).await?
    }

    /// Every service of this machine.
    pub async fn services(&self) -> Result<Vec<ServiceStatus>, CommandError> {
        self.ask(Request::Services).await
    }

    /// One service.
    pub async fn status(&self, service: &str) -> Result<ServiceStatus, CommandError> {
        self.ask(|reply| Request::Status(service.to_owned(), reply))
            .await?
    }

    /// What the next pull would change in the service's files (from the last fetch).
    pub async fn diff(&self, service: &str) -> Result<DiffResult, CommandError> {
        self.ask(|reply| Request::Diff(service.to_owned(), reply))
            .await?
    }

    /// A push webhook arrived: fetch now instead of at the next tick the upstreams that are one
    /// of `repositories` (URLs from its payload, any protocol), or every upstream when none is.
    pub async fn poke(&self, repositories: Vec<String>) -> Result<(), CommandError> {
        self.ask(|reply| Request::Poke(repositories, reply)).await
    }

    /// Sends the request `make` builds around a reply channel and waits for what comes back.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, CommandError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| CommandError::Unavailable)?;
        answer.await.map_err(|_| CommandError::Unavailable)
    }
}

/// A handle for the API and the receiving end for [`run`](super::run).
pub fn channel() -> (Handle, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(16);
    (Handle { tx }, rx)
}

//! The executor: every action of the daemon on the host, behind one interface.
//!
//! The state machines decide; the actor turns their effects into calls on an [`Executor`]; only
//! the executor writes checkouts, `.rev` files and state files, starts applies and reloads
//! systemd. [`System`] is the real one. [`Noop`] is noop mode (`plumb --noop`, a service's
//! `noop = true`): it only judges revisions (signature, history, tree, `check` on a staged copy)
//! and writes nothing a service sees, whatever effect it is asked for. plumb's own bookkeeping
//! (state files, the last accepted config) is still written, since it is not the service's.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::deploy::{self, DeployJob, Kind};
use super::persist;
use crate::apply;
use crate::bootstrap::{self, Bootstrap, BootstrapError};
use crate::config;
use crate::error::Chain;
use crate::git::Oid;
use crate::layout::Layout;
use crate::service::{self, Event};
use crate::systemd::Systemd;

/// What the daemon does to the host. Blocking methods run on the job's blocking thread; the
/// others are cheap and run on the actor.
pub(super) trait Executor: Send + Sync {
    /// Runs one upstream's checkouts in order on its store and says how each went, as the events
    /// for the services' state machines. Blocking.
    fn checkouts(&self, layout: &Layout, url: &str, jobs: Vec<DeployJob>) -> Vec<(String, Event)>;

    /// Has the service's unit take `revision` (`plumb apply` through systemd). The future
    /// resolves to why it failed, `None` once applied; no future when nothing was started (no
    /// systemd to ask, or noop), and then no outcome comes either.
    fn apply(
        &self,
        service: &config::Service,
        revision: Oid,
    ) -> Option<BoxFuture<'static, Option<String>>>;

    /// Can [`apply`](Executor::apply) start anything: the actor only then takes over the
    /// outcomes a restart left behind.
    fn applies(&self) -> bool;

    /// Has systemd re-run the generator on a changed config. Applies asked for afterwards start
    /// once it is done (a new service's mounts must exist first).
    fn daemon_reload(&self);

    /// Installs the config checked out by bootstrap over the local one (plumb's own apply);
    /// `Ok(true)` when the file changed.
    fn install_config(
        &self,
        bootstrap: &Bootstrap,
        service: &config::Service,
        config: &Path,
        hosts: &[String],
    ) -> Result<bool, BootstrapError>;

    /// Writes a service's state file; false (logged) when it could not.
    fn persist(&self, layout: &Layout, name: &str, state: &service::Service) -> bool;

    /// A deploy is saved in the state file: its checkout is no longer half-made.
    fn deploy_saved(&self, layout: &Layout, name: &str);

    /// Keeps the config text just accepted as the generator's fallback.
    fn keep_accepted(&self, config: &Path, text: &str);
}

/// The real host: checkouts and `.rev` files on disk, applies through systemd when there is one.
pub(super) struct System {
    /// The system manager, when there is one to talk to (not with `--no-apply`, not in tests on a
    /// host without systemd).
    systemd: Option<Arc<Systemd>>,
    layout: Layout,
    /// `daemon-reload`s asked for, and (shared with their tasks) how many of them finished.
    reloads_asked: AtomicU64,
    reloads_done: Arc<watch::Sender<u64>>,
}

impl System {
    /// The host without systemd: checkouts and `.rev` files only (the `.path` units apply
    /// where they exist).
    pub(super) fn new(layout: Layout) -> System {
        System {
            systemd: None,
            layout,
            reloads_asked: AtomicU64::new(0),
            reloads_done: Arc::new(watch::channel(0).0),
        }
    }

    /// The host with the system manager, if one answers on the bus.
    pub(super) async fn connect(layout: Layout) -> System {
        let mut system = System::new(layout);
        match Systemd::system().await {
            Ok(sd) => system.systemd = Some(Arc::new(sd)),
            Err(e) => info!(
                "not applying through systemd ({}); plumb-apply@.path units apply where installed",
                Chain(&e)
            ),
        }
        system
    }

    /// The system manager, for the tasks that keep the path units armed.
    pub(super) fn systemd(&self) -> Option<Arc<Systemd>> {
        self.systemd.clone()
    }
}

impl Executor for System {
    fn checkouts(&self, layout: &Layout, url: &str, jobs: Vec<DeployJob>) -> Vec<(String, Event)> {
        deploy::deploy_all(layout, url, jobs)
    }

    fn apply(
        &self,
        service: &config::Service,
        revision: Oid,
    ) -> Option<BoxFuture<'static, Option<String>>> {
        let systemd = self.systemd.clone()?;
        let layout = self.layout.clone();
        let config = service.clone();
        let reloaded = self.reloads_asked.load(Ordering::Relaxed);
        let mut reloads = self.reloads_done.subscribe();
        Some(Box::pin(async move {
            let _ = reloads.wait_for(|done| *done >= reloaded).await;
            let unit = format!("plumb-apply@{}.service", config.name);
            let mut started = systemd.start(&unit).await;
            // Joining an apply that was already running may leave a mount it looked at before
            // the checkout changed (wipe): start it again, a bounded number of times.
            for _ in 0..3 {
                match &started {
                    Ok(_) if !apply::mounts_current(&config) => {
                        started = systemd.start(&unit).await;
                    }
                    _ => break,
                }
            }
            // Judged on the outcome for `revision` alone: an outcome for another one is either
            // older (the apply failed before writing one: a bad config, a crash) or newer (a
            // deploy overtook this one, and the state machine drops this report as stale).
            match started {
                Err(e) => Some(format!("starting {unit}: {}", Chain(&e))),
                Ok(job) => match apply::read_applied(&layout, &config.name) {
                    Some(o) if o.revision == revision => o.error(),
                    _ => Some(format!(
                        "{unit} ({job}) left no outcome for {}; see journalctl -u {unit}",
                        service::short(Some(revision))
                    )),
                },
            }
        }))
    }

    fn applies(&self) -> bool {
        self.systemd.is_some()
    }

    fn daemon_reload(&self) {
        let Some(systemd) = self.systemd.clone() else {
            return;
        };
        let asked = self.reloads_asked.fetch_add(1, Ordering::Relaxed) + 1;
        let done = self.reloads_done.clone();
        tokio::spawn(async move {
            if let Err(e) = systemd.daemon_reload().await {
                warn!("daemon-reload after the config changed: {}", Chain(&e));
            }
            done.send_modify(|n| *n = (*n).max(asked));
        });
    }

    fn install_config(
        &self,
        bootstrap: &Bootstrap,
        service: &config::Service,
        config: &Path,
        hosts: &[String],
    ) -> Result<bool, BootstrapError> {
        let from = bootstrap.checked_out(service)?;
        bootstrap::install(&from, config, hosts)
    }

    fn persist(&self, layout: &Layout, name: &str, state: &service::Service) -> bool {
        persist::persist(layout, name, state)
    }

    fn deploy_saved(&self, layout: &Layout, name: &str) {
        let marker = layout.service_deploying(name);
        if let Err(e) = std::fs::remove_file(&marker)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(service = %name, "{}: {e}", marker.display());
        }
    }

    fn keep_accepted(&self, config: &Path, text: &str) {
        persist::keep_accepted(config, text);
    }
}

/// Noop mode: judges what it is asked to deploy and changes nothing a service sees.
pub(super) struct Noop;

impl Executor for Noop {
    fn checkouts(&self, layout: &Layout, url: &str, jobs: Vec<DeployJob>) -> Vec<(String, Event)> {
        // Whatever was asked, only the read-only gates run: the answers are previews.
        let previews = jobs
            .into_iter()
            .map(|job| DeployJob {
                kind: Kind::Preview,
                ..job
            })
            .collect();
        deploy::deploy_all(layout, url, previews)
    }

    fn apply(&self, _: &config::Service, _: Oid) -> Option<BoxFuture<'static, Option<String>>> {
        None
    }

    fn applies(&self) -> bool {
        false
    }

    fn daemon_reload(&self) {}

    fn install_config(
        &self,
        _: &Bootstrap,
        _: &config::Service,
        _: &Path,
        _: &[String],
    ) -> Result<bool, BootstrapError> {
        Ok(false)
    }

    fn persist(&self, layout: &Layout, name: &str, state: &service::Service) -> bool {
        persist::persist(layout, name, state)
    }

    fn deploy_saved(&self, _: &Layout, _: &str) {}

    fn keep_accepted(&self, config: &Path, text: &str) {
        persist::keep_accepted(config, text);
    }
}

/// Keeps every `plumb-apply@<service>.path` unit the generator made armed: now, and after every
/// daemon-reload (the daemon's own after a config change or a bootstrap, an operator's after
/// editing the config, the package's), and tells the actor (`reloaded`) of each daemon-reload. systemd pulls them in at boot only, through
/// `multi-user.target`; a path unit generated later would stay inactive until the next boot, and
/// with it the apply that runs while the daemon is down. Runs until `shutdown`.
pub(super) async fn arm_path_units(
    systemd: Arc<Systemd>,
    reloaded: mpsc::Sender<()>,
    shutdown: CancellationToken,
) {
    use futures_util::StreamExt;
    let reloads = match systemd.reloads().await {
        Ok(r) => Some(r),
        Err(e) => {
            warn!("path units are armed at start only: {}", Chain(&e));
            None
        }
    };
    let pattern = format!("{}@*.path", crate::generator::APPLY_PREFIX);
    let arm = || async {
        let units = match systemd.units_matching(&pattern).await {
            Ok(u) => u,
            Err(e) => return warn!("cannot list the path units: {}", Chain(&e)),
        };
        for (unit, active) in units {
            if active == "active" {
                continue;
            }
            match systemd.start(&unit).await {
                Ok(r) if r.is_done() => info!(unit, "armed"),
                Ok(r) => warn!(unit, "arming it: job {r}"),
                Err(e) => warn!("arming {unit}: {}", Chain(&e)),
            }
        }
    };
    arm().await;
    let Some(reloads) = reloads else { return };
    let mut reloads = std::pin::pin!(reloads);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            next = reloads.next() => match next {
                Some(()) => {
                    arm().await;
                    // The actor re-reads the config if it changed (at most one waiting).
                    let _ = reloaded.try_send(());
                }
                None => return,
            },
        }
    }
}

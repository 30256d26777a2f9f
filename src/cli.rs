//! `plumb`'s command line, as clap types. They live in the library rather than in the binary so that
//! `docs` can turn the same definitions into the man page and the shell completions: what `--help`
//! says and what `man plumb` says cannot drift apart.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// GitOps for machines you run yourself: keeps each service's files in step with a git branch.
#[derive(Debug, Parser)]
#[command(name = "plumb", version, about)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        short = 'c',
        long = "config",
        default_value = "/etc/plumb/plumb.toml",
        global = true
    )]
    pub config: PathBuf,
    /// Other names this machine answers to in the config's `machine` fields (the hostname always counts).
    #[arg(long = "hosts", value_delimiter = ',', global = true)]
    pub hosts: Vec<String>,
    /// Poll interval, overriding the config (e.g. "30s", "5m"); the default jitter is a tenth of it.
    /// Like the config's, at most the soak of each of this machine's services in a rollout wave
    /// (a longer one refuses the config).
    #[arg(long, value_parser = interval)]
    pub interval: Option<Duration>,
    /// State directory, overriding the config: stores, state files, and the checkouts of
    /// services that set no mount.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Run one cycle over every upstream and exit: 0 when every service is OK, 1 otherwise.
    #[arg(long)]
    pub once: bool,
    /// Only keep checkouts and .rev files; do not start plumb-apply@ units (test and simulation mode).
    #[arg(long)]
    pub no_apply: bool,
    /// Report what would be deployed and touch nothing: fetch, verify, inspect and run each
    /// service's check on a staged copy, but never move a checkout, a .rev file, a mount, a unit
    /// or a package (as the config's `noop = true`, for every service).
    #[arg(long)]
    pub noop: bool,
    /// Serve Prometheus metrics here ("127.0.0.1:9222", ":9222"; empty: off), overriding the config
    /// (also from /etc/default/plumb, for a machine that takes its config from git).
    #[arg(long, env = "PLUMB_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// The control API's socket, overriding the config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Take the configuration from this git repository and keep it in step, managing plumb itself
    /// as the service "plumb": each new config is checked, then installed over --config.
    #[arg(long, value_name = "URL", env = "PLUMB_BOOTSTRAP")]
    pub bootstrap: Option<String>,
    /// The bootstrap repository's directory holding plumb.toml (or gitopper's config.toml).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "plumb",
        env = "PLUMB_BOOTSTRAP_DIR",
        requires = "bootstrap"
    )]
    pub bootstrap_dir: String,
    /// The bootstrap repository's branch.
    #[arg(
        long,
        default_value = "main",
        env = "PLUMB_BOOTSTRAP_BRANCH",
        requires = "bootstrap"
    )]
    pub branch: String,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What `plumb` does instead of running the daemon, when a subcommand is given.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config file and print the services this machine would run; exit 0 or 1.
    CheckConfig {
        /// The file to check (default: --config); a directory means its plumb.toml, else its
        /// config.toml, checked as a bootstrap directory.
        file: Option<PathBuf>,
    },
    /// Make SERVICE's unit take its deployed revision (bind mounts, daemon-reload when unit
    /// files changed, the action); run by plumb-apply@SERVICE.service. Exit 0 or 1.
    Apply {
        /// The service's name in the config.
        service: String,
    },
}

/// `--interval`: a humantime duration under the config's rules for `plumb.interval`
/// ([`crate::config::interval_problem`]).
fn interval(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    match crate::config::interval_problem(d) {
        Some(problem) => Err(problem.to_owned()),
        None => Ok(d),
    }
}

impl Cli {
    /// Where the configuration comes from in bootstrap mode, if that is the mode.
    pub fn bootstrap(&self) -> Option<crate::bootstrap::Bootstrap> {
        self.bootstrap
            .as_ref()
            .map(|url| crate::bootstrap::Bootstrap {
                url: url.clone(),
                dir: self.bootstrap_dir.clone(),
                branch: self.branch.clone(),
            })
    }
}

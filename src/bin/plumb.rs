//! `plumb`: the daemon, and `plumb check-config` for deploy pipelines. Parses arguments and calls into
//! the library.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use plumb::bootstrap;
use plumb::cli::{Cli, Command};
use plumb::config::Config;
use plumb::daemon;
use plumb::error::Chain;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Under systemd the journal stamps each line already.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // The filter on the layer: its level is the subscriber's hint, so a disabled `log` record of
    // a library (ureq, rustls) costs one comparison, as a disabled `tracing` event does.
    let filter = log_filter();
    let logs = tracing_subscriber::registry();
    if journal {
        logs.with(fmt.without_time().with_filter(filter)).init();
    } else {
        logs.with(fmt.with_filter(filter)).init();
    }
    let result = match &cli.command {
        Some(Command::CheckConfig { file }) => check_config(
            file.as_ref().unwrap_or(&cli.config),
            &cli.hosts,
            cli.state_dir.as_deref(),
        ),
        Some(Command::Apply { service }) => Ok(plumb::apply::command(
            &cli.config,
            &cli.hosts,
            cli.state_dir.as_deref(),
            service,
        )),
        None => serve(cli),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("plumb: {}", Chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// What to log: `PLUMB_LOG` as `tracing`'s `target=level` pairs and a bare default level
/// (`debug`, `plumb::git=trace,info`); unset or empty, info. A filter that does not parse, or one
/// that leaves plumb's own logs out (a misspelt level reads as a target: `debgu`), is said once
/// on stderr, not silently obeyed. (`Targets` rather than `EnvFilter`: no span-field filters, and
/// no regex engine in the daemon's resident code.)
fn log_filter() -> Targets {
    let info = Targets::new().with_default(tracing::Level::INFO);
    let text = match std::env::var("PLUMB_LOG") {
        Err(std::env::VarError::NotPresent) => return info,
        Err(std::env::VarError::NotUnicode(raw)) => {
            eprintln!("plumb: PLUMB_LOG={raw:?} is not UTF-8; logging at info");
            return info;
        }
        Ok(text) if text.trim().is_empty() => return info,
        Ok(text) => text,
    };
    match text.parse::<Targets>() {
        Err(e) => {
            eprintln!("plumb: PLUMB_LOG={text:?} is not a log filter ({e}); logging at info");
            info
        }
        Ok(targets) => {
            let plumb = |t: &str| t == "plumb" || t.starts_with("plumb::");
            if targets.default_level().is_none() && !targets.iter().any(|(t, _)| plumb(t)) {
                eprintln!(
                    "plumb: PLUMB_LOG={text:?} names no level for plumb's own logs (a level, \
                     or plumb=LEVEL): only the targets it names log"
                );
            }
            targets
        }
    }
}

fn check_config(
    file: &Path,
    aliases: &[String],
    state_dir: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    // A directory is a bootstrap directory: its config must also leave plumb's own name free.
    let bootstrap = file.is_dir();
    let loaded = if bootstrap {
        bootstrap::find_config(file).and_then(|f| {
            let config = Config::load(&f)?;
            bootstrap::validate(&config, aliases)?;
            Ok(config)
        })
    } else {
        Config::load(file).map_err(Into::into)
    };
    let mut config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}", Chain(&e));
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(dir) = state_dir {
        config.use_state_dir(dir);
    }
    let file = config.path.clone();
    let hosts = config.machine_names(aliases);
    let services = match config.select(&hosts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}", Chain(&e));
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut out = String::new();
    if !config.keys.is_empty() {
        out.push_str(
            "note: gitopper's keys are accepted and ignored: plumb's API is reached through sshd \
             and unix groups\n",
        );
    }
    out.push_str(&format!(
        "{}: valid; {} service(s) in all, {} for this machine ({})\n",
        file.display(),
        config.services.len(),
        services.len(),
        hosts.join(", ")
    ));
    for s in services {
        out.push_str(&format!("\n[{}] machine {}\n", s.name, s.machine));
        let mut line = |key: &str, value: String| out.push_str(&format!("  {key:<9} {value}\n"));
        line("upstream", plumb::git::redact_url(&s.upstream));
        line("branch", s.branch.clone());
        line("checkout", s.checkout_dir().display().to_string());
        line("action", s.action.to_string());
        if let Some(p) = &s.package {
            line("package", p.clone());
        }
        if let Some(u) = &s.user {
            line("user", u.clone());
        }
        if let Some(c) = &s.check {
            let timeout = humantime::format_duration(c.timeout);
            line("check", format!("{} (within {timeout})", c.command));
        }
        if let Some(h) = &s.health {
            let mut what = Vec::new();
            if let Some(command) = &h.command {
                what.push(command.clone());
            }
            if let Some(url) = &h.url {
                what.push(format!("GET {}", plumb::git::redact_url(url)));
            }
            line(
                "health",
                format!(
                    "{} (after {} up, within {})",
                    what.join(" and "),
                    humantime::format_duration(h.settle),
                    humantime::format_duration(h.timeout)
                ),
            );
        }
        if s.noop {
            line(
                "noop",
                "yes: reports what it would deploy, deploys nothing".into(),
            );
        }
        for d in &s.dirs {
            let kind = if d.file { "file" } else { "dir" };
            let ro = if d.ro { " (read-only)" } else { "" };
            line(kind, format!("{} -> {}{ro}", d.link, d.local.display()));
        }
    }
    print(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to standard output. A reader that went away (`plumb check-config | head`) is
/// not an error worth a message: the rest is not wanted.
fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing to standard output")
        }
        _ => Ok(()),
    }
}

fn serve(cli: Cli) -> anyhow::Result<ExitCode> {
    // Read here too for the API's socket and groups; the daemon validates and reports it the same
    // way. In bootstrap mode there may be none yet: then the defaults hold until a restart.
    let bootstrap = cli.bootstrap();
    let mut config = bootstrap::load_config(&cli.config, bootstrap.is_some())?;
    if let Some(dir) = &cli.state_dir {
        config.use_state_dir(dir);
    }
    if !config.keys.is_empty() {
        tracing::warn!(
            "gitopper's keys are ignored: plumb's API is the local socket {} for the unix groups {:?} \
             (read and write) and {:?} (read); other machines are reached through sshd (plumbctl @host)",
            config.settings.socket.display(),
            config.settings.admin_group,
            config.settings.readonly_group
        );
    }
    let access = plumb::api::Access::new(
        &config,
        config.machine_names(&cli.hosts),
        &config.settings.state_dir,
    );
    let metrics_address = match &cli.metrics_address {
        Some(a) => plumb::config::parse_metrics_address(a)
            .map_err(|e| anyhow::anyhow!("--metrics-address: {e}"))?,
        None => config.settings.metrics_address,
    };
    let metrics = (metrics_address.is_some() && !cli.once).then(plumb::metrics::Metrics::new);
    let opts = daemon::Options {
        config: cli.config,
        hosts: cli.hosts,
        state_dir: cli.state_dir,
        interval: cli.interval,
        once: cli.once,
        apply: !cli.no_apply,
        noop: cli.noop,
        metrics: metrics.clone(),
        bootstrap,
    };
    match plumb::listener::raise_fd_limit() {
        Ok(n) => tracing::debug!("open files: up to {n}"),
        Err(e) => tracing::warn!("cannot raise the limit on open files: {e}"),
    }
    // One worker: the async side only routes (the actor, the listeners, D-Bus); fetches,
    // checkouts and state writes run on the blocking pool, whose idle threads end after a while.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let sd = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { sd.cancel(); break; }
                    _ = tokio::signal::ctrl_c() => { sd.cancel(); break; }
                    _ = hup.recv() => { let _ = reload_tx.try_send(()); }
                }
            }
        });
        let (handle, commands) = daemon::channel();
        let metrics_task = match (metrics_address, metrics) {
            (Some(addr), Some(m)) => {
                let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                    format!("metrics listener {addr} ([plumb] metrics_address)")
                })?;
                // The push webhook shares the metrics listener (the port git hosts can reach).
                let hook = config
                    .settings
                    .webhook_secret()?
                    .map(|secret| plumb::hook::Hook::new(secret, handle.clone(), Some(m.clone())));
                Some(tokio::spawn(plumb::metrics::serve(
                    listener,
                    m,
                    hook,
                    shutdown.clone(),
                )))
            }
            _ => None,
        };
        // The API listens before the daemon reports ready; a one-shot run has none.
        let api = if cli.once {
            drop(handle);
            None
        } else {
            let s = &config.settings;
            let socket = cli.socket.as_ref().unwrap_or(&s.socket);
            let listener = plumb::api::bind(socket, &s.admin_group, &s.readonly_group)
                .with_context(|| {
                    format!("control API socket {} ([plumb] socket)", socket.display())
                })?;
            Some(tokio::spawn(plumb::api::serve(
                listener,
                handle,
                access,
                shutdown.clone(),
            )))
        };
        let summary = daemon::run(opts, reload_rx, commands, shutdown.clone()).await;
        shutdown.cancel();
        if let Some(task) = metrics_task
            && let Err(e) = task.await
        {
            tracing::error!("metrics task: {e}");
        }
        if let Some(api) = api
            && let Err(e) = api.await
        {
            tracing::error!("control API task: {e}");
        }
        anyhow::Ok(summary?)
    })?;
    if cli.once {
        let mut out = String::new();
        for (name, s) in &summary.services {
            let deployed = plumb::service::short(s.deployed());
            let mut notes = s
                .unreachable()
                .as_ref()
                .map(|e| format!(" (upstream unreachable: {e})"))
                .unwrap_or_default();
            if let Some(w) = s.would() {
                notes.push_str(&format!(
                    " (noop: would deploy {}, {} files changed)",
                    plumb::service::short(w.revision),
                    w.files
                ));
            }
            out.push_str(&format!(
                "{name:<24} {:<8} {deployed}  {}{notes}\n",
                s.state().as_str(),
                s.info()
            ));
        }
        print(&out)?;
        if !summary.healthy() {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

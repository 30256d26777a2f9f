//! `plumb-generator`: the systemd generator (systemd.generator(7)), installed in
//! `/usr/lib/systemd/system-generators/`. At boot and at every `systemctl daemon-reload` it reads
//! `/etc/plumb/plumb.toml` and writes this machine's bind mounts, drop-ins and path units into the
//! normal generator directory; `plumb::generator` decides what they say.
//!
//! Rules a generator lives by, and how this one keeps them:
//! - it runs before /var may be mounted and must not talk to other processes: it reads only the
//!   config in /etc, with no network and no D-Bus;
//! - it must never break boot: a missing config writes nothing; an invalid one is reported on
//!   stderr and in the kernel log (`/dev/kmsg`, as syslog is not up) and the last config the daemon
//!   accepted (`/etc/plumb/plumb.toml.accepted`) is generated from instead, with a drop-in that
//!   puts the refusal in `systemctl status plumb`; without one, nothing is written for plumb; all
//!   exit 0;
//! - half a set of units is worse than none: everything is generated in memory first, and a failed
//!   write removes what this run wrote.
//!
//! Environment, for tests: `PLUMB_CONFIG` replaces the config path, `PLUMB_KMSG` the kernel log
//! device (so a test run as root does not log into the host's kernel log).

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use plumb::config::{self, Config, ConfigError};
use plumb::generator::{self, Output};

const DEFAULT_CONFIG: &str = "/etc/plumb/plumb.toml";
const KMSG: &str = "/dev/kmsg";
/// The longest line written to the kernel log, well under its record limit.
const KMSG_MAX: usize = 900;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    // systemd passes normal, early and late directories; one alone is the debugging form. plumb's
    // units go to the normal one: an admin's units in /etc must still win over generated ones.
    let normal = match args.as_slice() {
        [normal] | [normal, _, _] => PathBuf::from(normal),
        _ => {
            eprintln!("usage: plumb-generator NORMAL_DIR [EARLY_DIR LATE_DIR]");
            return ExitCode::from(2);
        }
    };
    let config_path = std::env::var_os("PLUMB_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    // SourcePath= in the units must be absolute.
    let config_path = std::path::absolute(&config_path).unwrap_or(config_path);
    let outputs = match outputs(&config_path) {
        Ok(Some(outputs)) => outputs,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            let e = plumb::error::chain(&e);
            // A typo must not take the running services' mounts and units away: the last config
            // plumb accepted stands in, and plumb.service's description says so.
            let accepted = config::accepted_path(&config_path);
            match outputs(&accepted) {
                Ok(Some(mut outputs)) => {
                    report(&format!(
                        "{e}; generating from the last accepted config, {}",
                        accepted.display()
                    ));
                    outputs.push(generator::refused(&e));
                    outputs
                }
                Ok(None) => {
                    report(&format!(
                        "{e}; no plumb units generated (no accepted config to fall back on)"
                    ));
                    return ExitCode::SUCCESS;
                }
                Err(fallback) => {
                    let fallback = plumb::error::chain(&fallback);
                    report(&format!(
                        "{e}; no plumb units generated (the last accepted config fails too: {fallback})"
                    ));
                    return ExitCode::SUCCESS;
                }
            }
        }
    };
    if let Err(e) = write_all(&normal, &outputs) {
        report(&format!(
            "{}: {e}; no plumb units generated",
            normal.display()
        ));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The units for this machine, or `None` when there is no config (plumb installed, not set up).
fn outputs(config_path: &Path) -> Result<Option<Vec<Output>>, ConfigError> {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(ConfigError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let hosts = config.machine_names(&[]);
    generator::generate(&config, &hosts).map(Some)
}

/// Says `message` on stderr and, when it can be opened, in the kernel log.
fn report(message: &str) {
    eprintln!("plumb-generator: {message}");
    let kmsg = std::env::var_os("PLUMB_KMSG").unwrap_or_else(|| OsString::from(KMSG));
    // Never created: when there is no kernel log device, stderr is all there is.
    if let Ok(mut f) = fs::OpenOptions::new().append(true).open(kmsg) {
        // <3>: priority "err". One write is one kernel log record; the kernel refuses records
        // longer than about 1 KiB, so a long message is cut rather than lost.
        let mut line = format!("<3>plumb-generator: {message}");
        if line.len() > KMSG_MAX {
            let mut cut = KMSG_MAX - 3;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str("...");
        }
        line.push('\n');
        let _ = f.write_all(line.as_bytes());
    }
}

/// Writes `outputs` under `dir`; on the first failure removes what it wrote and returns the error.
fn write_all(dir: &Path, outputs: &[Output]) -> io::Result<()> {
    let mut written = Vec::new();
    let result = outputs
        .iter()
        .try_for_each(|o| write_one(dir, o, &mut written));
    if result.is_err() {
        // Files and links first, then the directories this run created, deepest first.
        for path in written.iter().rev() {
            let _ = fs::remove_file(path).or_else(|_| fs::remove_dir(path));
        }
    }
    result
}

/// Writes one output, recording in `written` every path it created.
fn write_one(dir: &Path, output: &Output, written: &mut Vec<PathBuf>) -> io::Result<()> {
    let path = dir.join(output.path());
    if let Some(parent) = path.parent() {
        create_dirs(parent, written)?;
    }
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    match output {
        Output::File { content, .. } => {
            // create_new: another generator (fstab's, say) having written this unit is a conflict
            // to report, not something to overwrite.
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(context)?;
            written.push(path.clone());
            f.write_all(content.as_bytes()).map_err(context)?;
        }
        Output::Symlink { target, .. } => match symlink(target, &path) {
            Ok(()) => written.push(path.clone()),
            // Generators run in parallel and share the directory: the same link is no conflict.
            Err(e)
                if e.kind() == io::ErrorKind::AlreadyExists
                    && fs::read_link(&path).is_ok_and(|t| t == *target) => {}
            Err(e) => return Err(context(e)),
        },
    }
    Ok(())
}

/// `create_dir_all`, recording the directories it created (parents first).
fn create_dirs(dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(parent, written)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {
            written.push(dir.to_owned());
            Ok(())
        }
        // Another generator made it in the meantime.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
}

//! Self-management: plumb taking its own configuration from git (`plumb --bootstrap URL`).
//!
//! The bootstrap repository is one more service to the daemon, named [`SELF`], whose files are the
//! `--bootstrap-dir` directory of `--branch`. It is fetched, checked and checked out like any other
//! (one object store per upstream, full history), but it has no unit and no bind mount: its apply is
//! this module's [`install`], which copies the config file from the checkout over the local config
//! path (`-c`, `/etc/plumb/plumb.toml`) after validating it again. The daemon then re-reads the
//! config as on SIGHUP, and asks systemd to re-run the generator.
//!
//! Why a copy rather than a bind mount of the checkout onto `/etc/plumb`: the generator runs before
//! any mount and before `/var` may be mounted, so the file it reads at boot must be a real file in
//! `/etc`; and that file is only ever a config that passed `plumb check-config`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{self, Action, Check, Config, ConfigError, Dir};
use crate::{exec, layout};

/// The service name plumb manages itself under; a config that names a service so is refused in
/// bootstrap mode.
pub const SELF: &str = "plumb";

/// The file names looked for in the bootstrap directory, in order: plumb's own, then the one
/// gitopper's bootstrap reads, so a gitopper repository works unchanged.
pub const CONFIG_NAMES: [&str; 2] = ["plumb.toml", "config.toml"];

/// How long validating a config from git may take before the revision is refused.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// Where plumb's configuration comes from in bootstrap mode (`--bootstrap`, `--bootstrap-dir`,
/// `--branch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub url: String,
    /// The repository directory holding the config file.
    pub dir: String,
    pub branch: String,
}

/// Why a config from git was not installed. The running config stays.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{dir}: no {} in the bootstrap directory", CONFIG_NAMES.join(" or "))]
    NoConfig { dir: PathBuf },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "{path}: the service name {SELF:?} is plumb itself in bootstrap mode; rename the service"
    )]
    Reserved { path: PathBuf },
    #[error("installing {path}")]
    Install {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Bootstrap {
    /// plumb itself as a service of `machine`: the bootstrap directory checked out under
    /// `checkouts`, every new revision validated by `plumb check-config` (the running binary) before
    /// the checkout moves. `config` is the local config file, which the checkout's copy replaces.
    pub fn service(
        &self,
        machine: &str,
        hosts: &[String],
        config: &Path,
        checkouts: &Path,
    ) -> config::Service {
        let exe = current_exe();
        let mut command = format!("{} check-config", exec::shell_quote(&exe.to_string_lossy()));
        if !hosts.is_empty() {
            command.push_str(&format!(" --hosts {}", exec::shell_quote(&hosts.join(","))));
        }
        command.push_str(" {dir}");
        config::Service {
            machine: machine.to_owned(),
            name: SELF.to_owned(),
            upstream: self.url.clone(),
            branch: self.branch.clone(),
            mount: checkouts.to_owned(),
            default_mount: true,
            action: Action::None,
            package: None,
            user: None,
            dirs: vec![Dir {
                local: config
                    .parent()
                    .map(Path::to_owned)
                    .unwrap_or_else(|| PathBuf::from("/")),
                link: self.dir.clone(),
                file: false,
                ro: true,
            }],
            check: Some(Check {
                command,
                timeout: CHECK_TIMEOUT,
            }),
            health: None,
            noop: false,
            wave: 0,
            soak: config::DEFAULT_SOAK,
            soak_at: None,
        }
    }

    /// The config file in this service's checkout.
    pub fn checked_out(&self, service: &config::Service) -> Result<PathBuf, BootstrapError> {
        find_config(&service.checkout_dir().join(&self.dir))
    }
}

/// Reads the config at `path`; in bootstrap mode (`bootstrapping`) a config not installed yet is an
/// empty one, which the bootstrap repository's first revision replaces.
pub fn load_config(path: &Path, bootstrapping: bool) -> Result<Config, ConfigError> {
    read_config(path, bootstrapping).map(|(config, _)| config)
}

/// [`load_config`], with the file's text as it was read and validated (`None` for a bootstrap
/// config not installed yet), for a caller that keeps exactly what it accepted.
pub fn read_config(
    path: &Path,
    bootstrapping: bool,
) -> Result<(Config, Option<String>), ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Config::parse(path, &text).map(|c| (c, Some(text))),
        Err(source) if bootstrapping && source.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(config = %path.display(), "no config yet: taking it from the bootstrap repository");
            Config::parse(path, "").map(|c| (c, None))
        }
        Err(source) => Err(ConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The config file in a bootstrap directory: `plumb.toml`, else `config.toml`.
pub fn find_config(dir: &Path) -> Result<PathBuf, BootstrapError> {
    CONFIG_NAMES
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| BootstrapError::NoConfig {
            dir: dir.to_owned(),
        })
}

/// Validates `config` as the daemon would read it (and that it leaves the name [`SELF`] free).
pub fn validate(config: &Config, hosts: &[String]) -> Result<(), BootstrapError> {
    let selected = config.select(&config.machine_names(hosts))?;
    if config.services.iter().any(|s| s.name == SELF) || selected.iter().any(|s| s.name == SELF) {
        return Err(BootstrapError::Reserved {
            path: config.path.clone(),
        });
    }
    Ok(())
}

/// Copies the config file `from` (in the bootstrap checkout) over `to` once it validates; returns
/// whether `to` changed. A failure leaves `to` as it was.
pub fn install(from: &Path, to: &Path, hosts: &[String]) -> Result<bool, BootstrapError> {
    let text = std::fs::read_to_string(from).map_err(|source| ConfigError::Read {
        path: from.to_owned(),
        source,
    })?;
    validate(&Config::parse(from, &text)?, hosts)?;
    if std::fs::read_to_string(to).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    let io = |source| BootstrapError::Install {
        path: to.to_owned(),
        source,
    };
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    layout::write_atomic(to, text.as_bytes()).map_err(io)?;
    // The config may hold secrets (webhook_secret): readable by root only, like a fresh install's.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o640)).map_err(io)?;
    Ok(true)
}

/// The running binary, for the check command. After a package upgrade replaced it, the kernel
/// names the old inode "… (deleted)"; the path itself then holds the new binary, which is the one
/// to ask.
fn current_exe() -> PathBuf {
    match std::env::current_exe() {
        Ok(p) => {
            let s = p.to_string_lossy();
            match s.strip_suffix(" (deleted)") {
                Some(live) => PathBuf::from(live),
                None => p,
            }
        }
        Err(_) => PathBuf::from("plumb"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const GOOD: &str = "[[services]]\nmachine = \"m1\"\nservice = \"nginx\"\nupstream = \"https://git.example/ops.git\"\ndirs = [{ local = \"/etc/nginx\", link = \"nginx/etc\" }]\n";

    #[test]
    fn prefers_plumb_toml_then_gitoppers_name() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            find_config(d.path()),
            Err(BootstrapError::NoConfig { .. })
        ));
        let gitopper = write(d.path(), "config.toml", GOOD);
        assert_eq!(find_config(d.path()).unwrap(), gitopper);
        let own = write(d.path(), "plumb.toml", GOOD);
        assert_eq!(find_config(d.path()).unwrap(), own);
    }

    #[test]
    fn install_copies_a_valid_config_once() {
        let d = tempfile::tempdir().unwrap();
        let from = write(d.path(), "new.toml", GOOD);
        let to = d.path().join("etc/plumb/plumb.toml");
        assert!(install(&from, &to, &["m1".into()]).unwrap());
        assert_eq!(std::fs::read_to_string(&to).unwrap(), GOOD);
        assert!(!install(&from, &to, &["m1".into()]).unwrap(), "unchanged");
    }

    #[test]
    fn install_refuses_a_bad_config_and_keeps_the_old_one() {
        let d = tempfile::tempdir().unwrap();
        let to = write(d.path(), "plumb.toml", GOOD);
        let bad = write(d.path(), "bad.toml", "[[services]]\nservice = 3\n");
        let e = install(&bad, &to, &[]).unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
        let reserved = write(
            d.path(),
            "self.toml",
            &GOOD.replace("\"nginx\"", "\"plumb\""),
        );
        let e = install(&reserved, &to, &["m1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("plumb itself"), "{e}");
        assert_eq!(std::fs::read_to_string(&to).unwrap(), GOOD);
    }

    #[test]
    fn the_self_service_checks_with_this_binary_and_binds_nothing_itself() {
        let b = Bootstrap {
            url: "https://git.example/ops.git".into(),
            dir: "plumb".into(),
            branch: "main".into(),
        };
        let s = b.service(
            "m1",
            &["m1".into(), "web".into()],
            Path::new("/etc/plumb/plumb.toml"),
            Path::new("/var/lib/plumb/checkouts"),
        );
        assert_eq!(s.name, SELF);
        assert_eq!(s.links(), vec!["plumb".to_owned()]);
        assert_eq!(s.dirs[0].local, PathBuf::from("/etc/plumb"));
        let check = s.check.unwrap().command;
        assert!(
            check.ends_with(" check-config --hosts m1,web {dir}"),
            "{check}"
        );
    }
}

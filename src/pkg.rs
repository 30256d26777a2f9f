//! A service's `package`: installed when missing, never upgraded or removed.
//!
//! The package manager is chosen from `/etc/os-release` (`ID`, then `ID_LIKE`): apt on Debian and
//! its derivatives, dnf on Fedora and the Red Hat family, pacman on Arch. On anything else a
//! service with a package fails its apply with a message saying so, instead of silently doing
//! nothing. The choice is a pure function of the file's text ([`Manager::from_os_release`]); the
//! commands run through [`crate::exec`].
//!
//! Installing runs in `plumb apply` (the `plumb-apply@` oneshot), not in the daemon: the daemon's
//! unit keeps `/usr` read-only, and an apply is where the unit that needs the package is started.
//! apt runs without questions (`DEBIAN_FRONTEND=noninteractive`) and keeps configuration files
//! already on the machine (`--force-confold`), which plumb's bind mounts may cover anyway.

use std::time::Duration;

use crate::exec::{self, Spec};

/// How long one package manager command may take (a download on a slow mirror included).
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// apt's option to wait up to two minutes for dpkg's lock instead of failing at once.
const APT_LOCK_WAIT: &str = "DPkg::Lock::Timeout=120";

/// How long asking whether a package is installed may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a package could not be made present.
#[derive(Debug, thiserror::Error)]
pub enum PkgError {
    #[error(
        "package {package}: cannot install on this system ({system}); plumb installs with apt, dnf or pacman"
    )]
    Unsupported { package: String, system: String },
    #[error("package {package}: {manager} failed: {detail}")]
    Install {
        package: String,
        manager: &'static str,
        detail: String,
    },
    #[error("package {package}")]
    Exec {
        package: String,
        #[source]
        source: exec::ExecError,
    },
}

/// The package managers plumb drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    Apt,
    Dnf,
    Pacman,
}

impl Manager {
    /// The manager for the system `/etc/os-release` describes, or the system's name when plumb
    /// has none for it.
    pub fn from_os_release(text: &str) -> Result<Manager, String> {
        let field = |key: &str| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
                .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_owned())
                .next()
                .unwrap_or_default()
        };
        let id = field("ID");
        let like = field("ID_LIKE");
        for name in std::iter::once(id.as_str()).chain(like.split_whitespace()) {
            match name {
                "debian" | "ubuntu" | "raspbian" | "linuxmint" | "pop" => return Ok(Manager::Apt),
                "fedora" | "rhel" | "centos" | "rocky" | "almalinux" | "ol" | "amzn" => {
                    return Ok(Manager::Dnf);
                }
                "arch" | "archarm" | "manjaro" | "endeavouros" => return Ok(Manager::Pacman),
                _ => {}
            }
        }
        Err(if id.is_empty() {
            "no ID in /etc/os-release".to_owned()
        } else {
            format!("ID={id}")
        })
    }

    /// The manager of this machine.
    pub fn detect() -> Result<Manager, String> {
        let text = std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
            .map_err(|e| format!("no /etc/os-release: {e}"))?;
        Manager::from_os_release(&text)
    }

    pub fn name(self) -> &'static str {
        match self {
            Manager::Apt => "apt-get",
            Manager::Dnf => "dnf",
            Manager::Pacman => "pacman",
        }
    }

    /// The command that exits 0 exactly when `package` is installed.
    fn query(self, package: &str) -> Spec {
        match self {
            Manager::Apt => Spec::new("dpkg-query", QUERY_TIMEOUT)
                .arg("-W")
                .arg("-f=${db:Status-Status}")
                .arg(package),
            Manager::Dnf => Spec::new("rpm", QUERY_TIMEOUT).arg("-q").arg(package),
            Manager::Pacman => Spec::new("pacman", QUERY_TIMEOUT).arg("-Q").arg(package),
        }
    }

    /// The command that installs `package` without upgrading anything else or asking.
    fn install(self, package: &str) -> Spec {
        match self {
            Manager::Apt => Spec::new("apt-get", INSTALL_TIMEOUT)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .arg("-q")
                .arg("-y")
                // dpkg may be busy with something else (plumb's own package being installed,
                // an operator's apt): wait for it rather than fail.
                .arg("-o")
                .arg(APT_LOCK_WAIT)
                .arg("-o")
                .arg("Dpkg::Options::=--force-confdef")
                .arg("-o")
                .arg("Dpkg::Options::=--force-confold")
                .arg("install")
                .arg("--no-upgrade")
                .arg(package),
            Manager::Dnf => Spec::new("dnf", INSTALL_TIMEOUT)
                .arg("-y")
                .arg("install")
                .arg(package),
            Manager::Pacman => Spec::new("pacman", INSTALL_TIMEOUT)
                .arg("-S")
                .arg("--noconfirm")
                .arg("--needed")
                .arg(package),
        }
    }

    /// Refreshes the package lists (apt only: dnf and pacman refresh when installing, or need
    /// `-Sy`, which plumb does not do behind an operator's back on Arch).
    fn refresh(self) -> Option<Spec> {
        match self {
            Manager::Apt => Some(
                Spec::new("apt-get", INSTALL_TIMEOUT)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .arg("-q")
                    .arg("-o")
                    .arg(APT_LOCK_WAIT)
                    .arg("update"),
            ),
            Manager::Dnf | Manager::Pacman => None,
        }
    }
}

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The package was there already; nothing ran but the query.
    Present,
    /// The package was installed now.
    Installed,
}

/// Makes `package` present with this machine's package manager. Installed packages are left as
/// they are: no upgrade, no removal, ever.
pub async fn ensure(package: &str) -> Result<Ensured, PkgError> {
    let manager = Manager::detect().map_err(|system| PkgError::Unsupported {
        package: package.to_owned(),
        system,
    })?;
    ensure_with(manager, package).await
}

/// [`ensure`] with a given manager.
pub async fn ensure_with(manager: Manager, package: &str) -> Result<Ensured, PkgError> {
    let run = |spec: Spec| async move {
        exec::run_with(spec).await.map_err(|source| PkgError::Exec {
            package: package.to_owned(),
            source,
        })
    };
    let query = run(manager.query(package)).await?;
    // dpkg-query knows packages once seen but removed ("not-installed", "config-files").
    if query.success() && (manager != Manager::Apt || query.stdout.trim() == "installed") {
        return Ok(Ensured::Present);
    }
    let mut out = run(manager.install(package)).await?;
    if !out.success()
        && let Some(refresh) = manager.refresh()
    {
        // Package lists missing or stale (a fresh image has none): refresh once and try again.
        // Its own failure is not fatal: some sources may be unreachable while this one is not.
        let _ = run(refresh).await?;
        out = run(manager.install(package)).await?;
    }
    if out.success() {
        return Ok(Ensured::Installed);
    }
    Err(PkgError::Install {
        package: package.to_owned(),
        manager: manager.name(),
        detail: out.failure(3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manager_comes_from_id_then_id_like() {
        let os = |t: &str| Manager::from_os_release(t);
        assert_eq!(
            os("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n"),
            Ok(Manager::Apt)
        );
        assert_eq!(os("ID=ubuntu\nID_LIKE=debian\n"), Ok(Manager::Apt));
        assert_eq!(
            os("ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n"),
            Ok(Manager::Dnf)
        );
        assert_eq!(os("ID=fedora\n"), Ok(Manager::Dnf));
        assert_eq!(os("ID=arch\n"), Ok(Manager::Pacman));
        // A derivative plumb does not know by name, through its ID_LIKE.
        assert_eq!(os("ID=kali\nID_LIKE=debian\n"), Ok(Manager::Apt));
        // VERSION_ID must not be read as ID.
        assert_eq!(
            os("VERSION_ID=12\nID=alpine\n"),
            Err("ID=alpine".to_owned())
        );
        assert_eq!(os("NAME=x\n"), Err("no ID in /etc/os-release".to_owned()));
    }

    #[test]
    fn unsupported_systems_say_so() {
        let e = PkgError::Unsupported {
            package: "nginx".into(),
            system: "ID=alpine".into(),
        };
        assert_eq!(
            e.to_string(),
            "package nginx: cannot install on this system (ID=alpine); plumb installs with apt, dnf or pacman"
        );
    }
}

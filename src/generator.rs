//! The systemd generator's logic: from a validated [`Config`], the unit files, drop-ins and `.wants/`
//! symlinks that hand this machine's services to systemd. Pure: it returns [`Output`]s and touches
//! nothing; `generators/plumb-generator.rs` reads the config and writes them (systemd.generator(7)).
//!
//! Per service of this machine:
//! - one `.mount` unit per `dirs` entry, binding `<mount>/<service>/<link>` onto `local`. Named by
//!   systemd's path escaping of `local` ([`escape_path`]), because systemd refuses a mount unit whose
//!   name does not match its `Where=`. `ConditionPathExists=` on the source: without it systemd would
//!   create a missing source as an empty directory and bind that over the service's real files; a
//!   failed condition only skips the mount, and is checked again at every start. When the mount point
//!   is missing, systemd 252 creates it as a directory, or as an empty file when the source is not a
//!   directory (systemd.mount(5), `Where=`), so single-file binds need nothing more;
//!   `DirectoryMode=` sets the mode of the directories it creates.
//! - a drop-in `<unit>.d/50-plumb.conf` with `Wants=` and `After=` on those mounts. Not `Requires=`
//!   or `RequiresMountsFor=`: with those, restarting a mount to re-bind it would restart the service.
//! - `plumb-apply@<service>.path`, watching `<state_dir>/state/<service>.rev` and starting
//!   `plumb-apply@<service>.service` (the shipped template, `units/plumb-apply@.service`) when the
//!   daemon deploys. A service name may itself hold an `@` (`docker-compose@caddy`): systemd takes the
//!   instance as everything between the first `@` and the suffix, so
//!   `plumb-apply@docker-compose@caddy.path` is a valid name and `%i` is `docker-compose@caddy`.
//! - for a service whose unit file or drop-ins come from git (a `local` under a systemd directory):
//!   `plumb-apply@<service>.service` wanted at boot, after its mounts and its unit, and the daemon
//!   after it (`plumb.service.d/50-plumb.conf`). systemd loads units before it mounts anything, so
//!   at boot it has the empty placeholder of a file bind (a masked unit) or the unit without git's
//!   drop-ins; that apply reloads systemd and restarts the unit once git's files are in place.
//! - `.wants/` symlinks from `multi-user.target` to the mounts, the path unit and the managed unit
//!   (the mounts too, so the files are in place at boot even where no unit wants them): generated
//!   units cannot be `systemctl enable`d. systemd takes the dependency from the link's *name*; the
//!   target is only checked to be the same name or, for an instance, its template (anything else
//!   logs "has different name"). So links point at `../<unit>`, or `../<template>` for an instance,
//!   the form systemd's own generators use; they may dangle (the unit lives in /usr or /etc).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, Dir, Service, UNIT_NAME_MAX};
use crate::layout::Layout;

/// The generator's name, as written at the top of every file it generates (systemd.generator(7)
/// asks for it, so an admin reading /run/systemd/generator knows where a unit came from).
pub const GENERATOR: &str = "plumb-generator";
/// The drop-in's file name in `<unit>.d/`. 50: after vendor drop-ins numbered lower, before an
/// admin's higher-numbered overrides.
pub const DROPIN: &str = "50-plumb.conf";
/// The target that pulls in the path units and the managed units at boot.
pub const WANTED_BY: &str = "multi-user.target";
/// The template whose instances apply a deployed revision (shipped as `units/plumb-apply@.service`).
pub const APPLY_PREFIX: &str = "plumb-apply";
/// The drop-in that says the config was refused ([`refused`]).
pub const REFUSED_DROPIN: &str = "40-plumb-config-refused.conf";
/// The daemon's unit (shipped as `units/plumb.service`).
pub const DAEMON: &str = "plumb.service";

/// One thing the generator creates, relative to its output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A unit file or drop-in.
    File { path: PathBuf, content: String },
    /// A `.wants/` symlink: `path` links to `target` (relative to the link's directory).
    Symlink { path: PathBuf, target: PathBuf },
}

impl Output {
    /// Where this output goes, relative to the generator's output directory.
    pub fn path(&self) -> &Path {
        match self {
            Output::File { path, .. } | Output::Symlink { path, .. } => path,
        }
    }
}

/// Why a path cannot be written into a unit file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{0:?} is not an absolute path")]
    Relative(String),
    #[error("{0:?} contains '..', which systemd refuses in unit paths")]
    ParentDir(String),
    #[error("{0:?} contains a control character, which cannot be written in a unit file")]
    Control(String),
    #[error("{0:?} ends in whitespace or '\\', which a unit file cannot hold at the end of a line")]
    Trailing(String),
    #[error("{0:?} is the root directory, which plumb cannot bind over")]
    Root(String),
    #[error(
        "{path:?} gives the unit name {unit:?}, longer than systemd's {UNIT_NAME_MAX} characters"
    )]
    TooLong { path: String, unit: String },
}

/// The units for every service of this machine (`hosts`: its names, see
/// [`Config::machine_names`]), sorted by path. Fails, generating nothing, when the selection is
/// invalid or a path cannot be expressed in a unit file: half a set of units is worse than none.
pub fn generate(config: &Config, hosts: &[String]) -> Result<Vec<Output>, ConfigError> {
    let services = config.select(hosts)?;
    let error = |message: String| ConfigError::Selection {
        path: config.path.clone(),
        hosts: hosts.to_vec(),
        message,
    };
    let invalid = |service: &Service, key: String, e: PathError| {
        error(format!("service {:?}: {key}: {e}", service.name))
    };
    let source = Source {
        header: format!(
            "# Generated by {GENERATOR} from {}\n",
            config.path.display()
        ),
        // SourcePath= lets systemctl say "changed on disk, run daemon-reload" after a config edit.
        path: unit_path(&config.path.to_string_lossy())
            .map_err(|e| error(format!("the config's own path: {e}")))?,
    };
    let mut out = Vec::new();
    let mut after_boot_applies = Vec::new();
    for s in &services {
        let unit = s.unit();
        let mut mounts = Vec::new();
        for (j, d) in s.dirs.iter().enumerate() {
            let (name, file) = mount_unit(s, d, &source, &unit)
                .map_err(|(key, e)| invalid(s, format!("dirs[{j}].{key}"), e))?;
            // Wanted at boot by the target too, not only by the unit: a service whose unit does
            // not exist (action "none", files read on use) still gets its files.
            out.push(wants(&name, PathBuf::from(format!("../{name}"))));
            mounts.push(name);
            out.push(file);
        }
        if !mounts.is_empty() {
            out.push(dropin(&unit, &mounts, &source.header));
        }
        // The file the daemon writes, from the one place that names it.
        let rev = Layout::new(&config.settings.state_dir).service_rev(&s.name);
        let rev = unit_path(&rev.to_string_lossy())
            .map_err(|e| invalid(s, "state file (plumb.state_dir)".into(), e))?;
        let path_unit = format!("{APPLY_PREFIX}@{}.path", s.name);
        out.push(Output::File {
            path: PathBuf::from(&path_unit),
            content: format!(
                "{header}\
                 [Unit]\n\
                 Description=plumb: apply deployed revisions of {name}\n\
                 Documentation=man:plumb(8)\n\
                 SourcePath={source_path}\n\
                 \n\
                 [Path]\n\
                 # Written by the daemon only when the service's files changed.\n\
                 PathChanged={rev}\n\
                 Unit={APPLY_PREFIX}@{name}.service\n",
                header = source.header,
                name = s.name,
                source_path = source.path,
            ),
        });
        out.push(wants(&path_unit, PathBuf::from(format!("../{path_unit}"))));
        out.push(wants(
            &unit,
            PathBuf::from(format!("../{}", template_of(&unit))),
        ));
        if s.units_from_git() {
            let apply = format!("{APPLY_PREFIX}@{}.service", s.name);
            out.push(boot_apply(&apply, &unit, &mounts, &source.header));
            out.push(wants(
                &apply,
                PathBuf::from(format!("../{APPLY_PREFIX}@.service")),
            ));
            after_boot_applies.push(apply);
        }
    }
    if !after_boot_applies.is_empty() {
        let mut content = format!(
            "{}\
             # The daemon starts once the boot's applies are done, and reads their outcomes.\n\
             [Unit]\n",
            source.header
        );
        for apply in &after_boot_applies {
            content.push_str(&format!("After={apply}\n"));
        }
        out.push(Output::File {
            path: Path::new(&format!("{DAEMON}.d")).join(DROPIN),
            content,
        });
    }
    out.sort_by(|a, b| a.path().cmp(b.path()));
    let mut seen = BTreeSet::new();
    for o in &out {
        if !seen.insert(o.path()) {
            return Err(error(format!(
                "two services would generate {}",
                o.path().display()
            )));
        }
    }
    Ok(out)
}

/// What every generated unit says about where it came from.
struct Source {
    /// The comment line that starts every file.
    header: String,
    /// The config's path as a `SourcePath=` value.
    path: String,
}

/// The `.mount` unit binding `d` for service `s`: its name and its file. Errors name the `dirs`
/// key at fault.
fn mount_unit(
    s: &Service,
    d: &Dir,
    source: &Source,
    unit: &str,
) -> Result<(String, Output), (&'static str, PathError)> {
    let local = d.local.to_string_lossy();
    let name = mount_unit_name(&local).map_err(|e| ("local", e))?;
    let where_ = unit_path(&local).map_err(|e| ("local", e))?;
    let what = s.checkout_dir().join(&d.link);
    let what = unit_path(&what.to_string_lossy()).map_err(|e| ("link", e))?;
    let link = unit_value(&d.link).map_err(|e| ("link", e))?;
    let options = if d.ro { "bind,ro" } else { "bind" };
    // For a file bind, systemd creates a missing mount point as an empty file (What= is a file).
    let directory_mode = if d.file { "" } else { "DirectoryMode=0755\n" };
    let content = format!(
        "{header}\
         [Unit]\n\
         Description=plumb: {link} for {unit}\n\
         Documentation=man:plumb(8)\n\
         SourcePath={source_path}\n\
         # Skipped, not failed, until plumb has checked the files out; checked again at every start.\n\
         ConditionPathExists={what}\n\
         Before={unit}\n\
         \n\
         [Mount]\n\
         What={what}\n\
         Where={where_}\n\
         Type=none\n\
         Options={options}\n\
         # Re-binding must work while the service holds a file open.\n\
         LazyUnmount=yes\n\
         {directory_mode}",
        header = source.header,
        source_path = source.path,
    );
    Ok((
        name.clone(),
        Output::File {
            path: PathBuf::from(name),
            content,
        },
    ))
}

/// `<unit>.d/50-plumb.conf`: the managed unit wants and starts after its mounts.
fn dropin(unit: &str, mounts: &[String], header: &str) -> Output {
    let mut content = format!(
        "{header}\
         # Wants=, not Requires=: restarting a mount to re-bind it must not restart {unit}.\n\
         [Unit]\n"
    );
    for m in mounts {
        content.push_str(&format!("Wants={m}\nAfter={m}\n"));
    }
    Output::File {
        path: Path::new(&format!("{unit}.d")).join(DROPIN),
        content,
    }
}

/// `plumb-apply@<service>.service.d/50-plumb.conf` for a service whose unit files or drop-ins come
/// from git: systemd loads units before any mount, so after a boot it has the empty placeholder a
/// file bind mounts over (the unit is masked) or the unit without git's drop-ins. The apply, wanted
/// at boot, runs once the mounts are up and the unit had its start: it reloads systemd and
/// restarts the unit on git's files.
fn boot_apply(apply: &str, unit: &str, mounts: &[String], header: &str) -> Output {
    let mut content = format!(
        "{header}\
         # Wanted at boot: systemd read {unit}'s files before these mounts brought git's.\n\
         [Unit]\n\
         After={unit}\n"
    );
    for m in mounts {
        content.push_str(&format!("Wants={m}\nAfter={m}\n"));
    }
    Output::File {
        path: Path::new(&format!("{apply}.d")).join(DROPIN),
        content,
    }
}

/// The drop-in the generator writes for `plumb.service` when the config was refused with `error`
/// and it generated from the last accepted one: the unit's description carries the refusal, so
/// `systemctl status plumb` shows it on its first line.
pub fn refused(error: &str) -> Output {
    let first = error.lines().next().unwrap_or_default();
    let text: String = first
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    let text = text.trim_end().trim_end_matches('\\').replace('%', "%%");
    Output::File {
        path: Path::new(&format!("{DAEMON}.d")).join(REFUSED_DROPIN),
        content: format!(
            "# Generated by {GENERATOR}: the config was refused; units come from the last accepted one.\n\
             [Unit]\n\
             Description=plumb: CONFIG REFUSED, running on the last accepted one: {text}\n"
        ),
    }
}

/// `multi-user.target.wants/<unit>` linking to `target`.
fn wants(unit: &str, target: PathBuf) -> Output {
    Output::Symlink {
        path: Path::new(&format!("{WANTED_BY}.wants")).join(unit),
        target,
    }
}

/// The template of an instance unit (`foo@bar.service` -> `foo@.service`), or the unit itself.
fn template_of(unit: &str) -> String {
    match (unit.split_once('@'), unit.rsplit_once('.')) {
        (Some((prefix, _)), Some((_, suffix))) => format!("{prefix}@.{suffix}"),
        _ => unit.to_owned(),
    }
}

/// The name of the `.mount` unit for mount point `path`: [`escape_path`] plus `.mount`, refused when
/// systemd could not mount there (the root, `..`) or the name is longer than systemd allows.
pub fn mount_unit_name(path: &str) -> Result<String, PathError> {
    let escaped = escape_path(path)?;
    if escaped == "-" {
        return Err(PathError::Root(path.to_owned()));
    }
    let unit = format!("{escaped}.mount");
    if unit.len() > UNIT_NAME_MAX {
        return Err(PathError::TooLong {
            path: path.to_owned(),
            unit,
        });
    }
    Ok(unit)
}

/// systemd's path escaping (`systemd-escape --path`): the unit-name form of an absolute path, so
/// `/etc/nginx/conf.d` is `etc-nginx-conf.d`. The path is first simplified (repeated, trailing and
/// `.` components dropped); `/` becomes `-`; letters, digits, `:`, `_` and `.` stay, except a `.`
/// that would start the name; every other byte becomes `\xNN` (so `-` is `\x2d`, a space `\x20`,
/// `é` `\xc3\xa9`). The root is `-`. Paths with `..` are refused, as systemd refuses them.
pub fn escape_path(path: &str) -> Result<String, PathError> {
    let parts = components(path)?;
    if parts.is_empty() {
        return Ok("-".to_owned());
    }
    let mut out = String::new();
    for (i, b) in parts.join("/").bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b':' | b'_' | b'.' => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    Ok(out)
}

/// The non-empty, non-`.` components of an absolute path.
fn components(path: &str) -> Result<Vec<&str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::Relative(path.to_owned()));
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(PathError::ParentDir(path.to_owned())),
            c => parts.push(c),
        }
    }
    Ok(parts)
}

/// An absolute path as a unit file setting: simplified like [`escape_path`] does (so `Where=` matches
/// the unit name) and escaped like [`unit_value`].
pub fn unit_path(path: &str) -> Result<String, PathError> {
    let parts = components(path)?;
    unit_value(&format!("/{}", parts.join("/")))
}

/// Text as the value of a unit file setting: `%` doubled, because systemd expands `%` specifiers in
/// paths and descriptions; refused when it holds a control character (a newline would end the
/// setting) or ends in whitespace (systemd strips it) or `\` (a line continuation).
pub fn unit_value(text: &str) -> Result<String, PathError> {
    if text.chars().any(char::is_control) {
        return Err(PathError::Control(text.to_owned()));
    }
    if text.ends_with(|c: char| c.is_whitespace() || c == '\\') {
        return Err(PathError::Trailing(text.to_owned()));
    }
    Ok(text.replace('%', "%%"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("/etc/plumb/plumb.toml"), text).expect("valid test config")
    }

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|h| h.to_string()).collect()
    }

    fn file<'a>(out: &'a [Output], path: &str) -> &'a str {
        out.iter()
            .find_map(|o| match o {
                Output::File { path: p, content } if p == Path::new(path) => Some(content.as_str()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no file {path} in {out:#?}"))
    }

    #[test]
    fn escapes_like_systemd_escape() {
        for (path, escaped) in [
            ("/etc/nginx", "etc-nginx"),
            ("/etc/nginx/conf.d", "etc-nginx-conf.d"),
            ("/var/lib/grafana/dashboards", "var-lib-grafana-dashboards"),
            ("/etc/my-app", "etc-my\\x2dapp"),
            ("/etc/a b", "etc-a\\x20b"),
            ("/etc/.hidden", "etc-.hidden"),
            ("/.hidden/x", "\\x2ehidden-x"),
            ("/etc/caf\u{e9}", "etc-caf\\xc3\\xa9"),
            ("/etc/x%y\\z", "etc-x\\x25y\\x5cz"),
            ("/etc/a:b_c.conf", "etc-a:b_c.conf"),
            ("//etc/./nginx//", "etc-nginx"),
            ("/", "-"),
        ] {
            assert_eq!(escape_path(path).as_deref(), Ok(escaped), "{path}");
        }
        assert_eq!(
            escape_path("/etc/../x"),
            Err(PathError::ParentDir("/etc/../x".into()))
        );
        assert_eq!(
            escape_path("etc/x"),
            Err(PathError::Relative("etc/x".into()))
        );
    }

    #[test]
    fn mount_unit_names_systemd_can_load() {
        assert_eq!(mount_unit_name("/etc/nginx").unwrap(), "etc-nginx.mount");
        assert!(matches!(mount_unit_name("/"), Err(PathError::Root(_))));
        let longest = format!("/{}", "a".repeat(UNIT_NAME_MAX - ".mount".len()));
        assert_eq!(mount_unit_name(&longest).unwrap().len(), UNIT_NAME_MAX);
        assert!(matches!(
            mount_unit_name(&format!("{longest}a")),
            Err(PathError::TooLong { .. })
        ));
    }

    #[test]
    fn unit_values_escape_specifiers_and_refuse_what_a_unit_file_cannot_hold() {
        assert_eq!(unit_value("/srv/50%").unwrap(), "/srv/50%%");
        assert_eq!(unit_path("/srv//a/./b/").unwrap(), "/srv/a/b");
        assert!(matches!(unit_value("/a\nb"), Err(PathError::Control(_))));
        assert!(matches!(unit_value("/a "), Err(PathError::Trailing(_))));
        assert!(matches!(unit_value("/a\\"), Err(PathError::Trailing(_))));
        assert_eq!(unit_value("/a\\b").unwrap(), "/a\\b");
    }

    #[test]
    fn templates_of_instances() {
        assert_eq!(
            template_of("docker-compose@caddy.service"),
            "docker-compose@.service"
        );
        assert_eq!(template_of("foo@a@b.socket"), "foo@.socket");
        assert_eq!(template_of("nginx.service"), "nginx.service");
    }

    const BASE: &str = "[global]\nupstream = \"file:///r\"\nmachine = \"m\"\n";

    #[test]
    fn unit_files_from_git_are_applied_at_boot_before_the_daemon_starts() {
        let c = config(&format!(
            "{BASE}[[services]]\nservice = \"hello\"\ndirs = [\n  {{ local = \"/etc/systemd/system/hello.service\", link = \"hello/hello.service\", file = true }},\n  {{ local = \"/etc/systemd/system/hello.service.d\", link = \"hello/dropins\" }},\n]\n[[services]]\nservice = \"web\"\ndirs = [{{ local = \"/srv/web\", link = \"web\" }}]\n"
        ));
        let out = generate(&c, &hosts(&["m"])).unwrap();
        let apply = file(&out, "plumb-apply@hello.service.d/50-plumb.conf");
        for line in [
            "After=hello.service",
            "Wants=etc-systemd-system-hello.service.mount",
            "After=etc-systemd-system-hello.service.mount",
            "After=etc-systemd-system-hello.service.d.mount",
        ] {
            assert!(apply.lines().any(|l| l == line), "{line} in {apply}");
        }
        assert!(out.contains(&Output::Symlink {
            path: "multi-user.target.wants/plumb-apply@hello.service".into(),
            target: "../plumb-apply@.service".into(),
        }));
        let daemon = file(&out, "plumb.service.d/50-plumb.conf");
        assert!(
            daemon
                .lines()
                .any(|l| l == "After=plumb-apply@hello.service"),
            "{daemon}"
        );
        // A service whose files are not systemd's is not applied at boot.
        assert!(!daemon.contains("web"), "{daemon}");
        assert!(
            !out.iter()
                .any(|o| o.path().starts_with("plumb-apply@web.service.d"))
        );
    }

    #[test]
    fn only_this_machines_services_and_a_service_without_dirs_has_no_dropin() {
        let c = config(&format!(
            "{BASE}[[services]]\nservice = \"a\"\n[[services]]\nservice = \"b\"\nmachine = \"other\"\ndirs = [{{ local = \"/etc/b\", link = \"b\" }}]\n"
        ));
        let out = generate(&c, &hosts(&["m"])).unwrap();
        let paths: Vec<_> = out.iter().map(|o| o.path().to_owned()).collect();
        assert_eq!(
            paths,
            [
                "multi-user.target.wants/a.service",
                "multi-user.target.wants/plumb-apply@a.path",
                "plumb-apply@a.path",
            ]
            .map(PathBuf::from)
        );
        assert!(generate(&c, &hosts(&["nobody"])).unwrap().is_empty());
    }

    #[test]
    fn read_only_and_file_binds() {
        let c = config(&format!(
            "{BASE}[[services]]\nservice = \"a\"\ndirs = [{{ local = \"/etc/a\", link = \"a\", ro = true }}, {{ local = \"/etc/a.conf\", link = \"a.conf\", file = true }}]\n"
        ));
        let out = generate(&c, &hosts(&["m"])).unwrap();
        let dir = file(&out, "etc-a.mount");
        assert!(dir.contains("\nOptions=bind,ro\n"), "{dir}");
        assert!(dir.contains("\nDirectoryMode=0755\n"), "{dir}");
        let f = file(&out, "etc-a.conf.mount");
        assert!(f.contains("\nOptions=bind\n"), "{f}");
        assert!(!f.contains("DirectoryMode"), "{f}");
        assert!(
            f.contains("\nWhat=/var/lib/plumb/checkouts/a/a.conf\n"),
            "{f}"
        );
    }

    #[test]
    fn percent_signs_are_doubled_and_unrepresentable_paths_refused() {
        let c = config(&format!(
            "{BASE}[[services]]\nservice = \"a\"\nmount = \"/srv/100%\"\ndirs = [{{ local = \"/etc/50%\", link = \"x%y\" }}]\n"
        ));
        let out = generate(&c, &hosts(&["m"])).unwrap();
        let m = file(&out, "etc-50\\x25.mount");
        assert!(m.contains("\nWhere=/etc/50%%\n"), "{m}");
        assert!(m.contains("\nWhat=/srv/100%%/a/x%%y\n"), "{m}");
        assert!(
            m.contains("\nDescription=plumb: x%%y for a.service\n"),
            "{m}"
        );

        for (dirs, why) in [
            (
                "{ local = \"/etc/../x\", link = \"x\" }",
                "dirs[0].local: \"/etc/../x\" contains '..'",
            ),
            (
                "{ local = \"/\", link = \"x\" }",
                "dirs[0].local: \"/\" is the root",
            ),
            (
                "{ local = \"/etc/x\\n\", link = \"x\" }",
                "dirs[0].local: \"/etc/x\\n\" contains a control character",
            ),
            (
                "{ local = \"/etc/x \", link = \"x\" }",
                "dirs[0].local: \"/etc/x \" ends in whitespace",
            ),
            (
                "{ local = \"/etc/x\", link = \"x\\\\\" }",
                "dirs[0].link: \"/var/lib/plumb/checkouts/a/x\\\\\" ends in",
            ),
        ] {
            let c = config(&format!(
                "{BASE}[[services]]\nservice = \"a\"\ndirs = [{dirs}]\n"
            ));
            let e = generate(&c, &hosts(&["m"])).unwrap_err().to_string();
            assert!(
                e.starts_with("/etc/plumb/plumb.toml: service \"a\": "),
                "{e}"
            );
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn selection_errors_come_through() {
        let c = config(&format!(
            "{BASE}[[services]]\nservice = \"a\"\n[[services]]\nservice = \"a\"\nmachine = \"alias\"\n"
        ));
        let e = generate(&c, &hosts(&["m", "alias"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("configured for both machine"), "{e}");
    }
}

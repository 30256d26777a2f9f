//! Tests of the systemd generator: the text it generates (snapshots), that systemd accepts every
//! generated unit and the shipped units in `units/` (the real `systemd-analyze verify`), that its
//! path escaping is systemd's (the real `systemd-escape`), and the `plumb-generator` binary's
//! contract with systemd: write everything or nothing, and exit 0 on a missing or invalid config.
//!
//! Snapshots live in `tests/snapshots/generator/`, one file per case, all outputs of a case in
//! one file (`==> path <==` then the content; `==> link -> target <==` for a symlink), compared
//! byte for byte. A mismatch fails with a line diff. After a deliberate change, regenerate them
//! with `UPDATE_SNAPSHOTS=1 cargo test --test it generator::` and review the diff in git.
//!
//! `systemd-analyze` and `systemd-escape` come with Debian's `systemd` package; they work without
//! systemd running. Nothing here needs root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output as ProcessOutput};

use plumb::config::Config;
use plumb::generator::{self, Output};

/// The snapshot case: a directory bind, a read-only one, a file bind, a read-only file bind, a path
/// with characters systemd escapes, two services of this machine (one a template instance, on an
/// alias and with its own `mount`), a service of another machine, and a custom `state_dir`.
const CONFIG: &str = r#"[global]
upstream = "https://git.example.org/ops/config.git"
machine = "web1"

[plumb]
state_dir = "/srv/plumb"
hosts = ["web1", "edge"]

[[services]]
service = "nginx"
action = "reload"
dirs = [
  { local = "/etc/nginx/conf.d", link = "nginx/conf.d" },
  { local = "/etc/nginx/snippets", link = "nginx/snippets", ro = true },
  { local = "/etc/default/nginx", link = "nginx/default", file = true },
  { local = "/srv/www/my-site", link = "www/my site", ro = true },
]

[[services]]
machine = "edge"
service = "docker-compose@caddy"
mount = "/opt/plumb"
action = "restart"
dirs = [
  { local = "/etc/docker/compose/caddy.yml", link = "caddy/docker-compose.yml", file = true, ro = true },
]

[[services]]
machine = "db1"
service = "postgresql"
dirs = [{ local = "/etc/postgresql", link = "postgresql" }]
"#;

const CONFIG_PATH: &str = "/etc/plumb/plumb.toml";

fn config() -> Config {
    Config::parse(Path::new(CONFIG_PATH), CONFIG).expect("the snapshot config is valid")
}

/// Every output of a case as one text: what the snapshot files hold.
fn render(outputs: &[Output]) -> String {
    let mut text = String::new();
    for o in outputs {
        match o {
            Output::File { path, content } => {
                text.push_str(&format!("==> {} <==\n{content}\n", path.display()));
            }
            Output::Symlink { path, target } => {
                text.push_str(&format!(
                    "==> {} -> {} <==\n\n",
                    path.display(),
                    target.display()
                ));
            }
        }
    }
    text
}

/// A line diff of `old` and `new` (longest common subsequence): `-` old only, `+` new only.
fn diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            (i, j) = (i + 1, j + 1);
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        }
    }
    out
}

/// Compares `actual` with snapshot `name`, or rewrites the snapshot when `UPDATE_SNAPSHOTS=1`.
fn assert_snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots/generator")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        fs::create_dir_all(path.parent().expect("snapshot dir")).expect("create snapshot dir");
        fs::write(&path, actual).expect("write snapshot");
        return;
    }
    let expected = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "{} differs (- snapshot, + generated); UPDATE_SNAPSHOTS=1 rewrites it:\n{}",
            path.display(),
            diff(&expected, actual)
        );
    }
}

#[test]
fn generated_units_match_snapshot() {
    let c = config();
    let outputs = generator::generate(&c, &c.settings.hosts).expect("generate");
    // The other machine's service is not there at all.
    assert!(
        outputs
            .iter()
            .all(|o| !o.path().to_string_lossy().contains("postgresql")),
        "{outputs:#?}"
    );
    assert_snapshot("web1-edge.txt", &render(&outputs));
}

#[test]
fn snapshot_diff_shows_changed_lines() {
    assert_eq!(diff("a\nb\nc\n", "a\nx\nc\n"), "  a\n- b\n+ x\n  c\n");
    assert_eq!(diff("", "a\n"), "+ a\n");
}

/// Runs a command, failing the test with its output when it cannot start.
fn run(cmd: &mut Command) -> ProcessOutput {
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (systemd-analyze and systemd-escape come with the Debian package systemd)")
    })
}

/// `systemd-escape --path --suffix=mount`, the reference [`generator::mount_unit_name`] follows.
fn systemd_escape(path: &str) -> String {
    let out = run(Command::new("systemd-escape").args(["--path", "--suffix=mount", "--", path]));
    assert!(out.status.success(), "systemd-escape {path:?}: {out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim_end_matches('\n')
        .to_owned()
}

#[test]
fn escaping_matches_systemd_escape() {
    for path in [
        "/etc/nginx",
        "/etc/nginx/conf.d",
        "/var/lib/grafana/dashboards",
        "/srv/www/my-site",
        "/etc/with space",
        "/etc/.hidden/x",
        "/.dot-first",
        "/etc/caf\u{e9}/\u{65e5}\u{672c}",
        "/etc/x%y\\z",
        "/etc/a:b_c.conf",
        "/etc/tab\there",
        "/etc/\"quoted\"",
        "//etc/./nginx//",
    ] {
        assert_eq!(
            generator::mount_unit_name(path).expect(path),
            systemd_escape(path),
            "{path:?}"
        );
    }
}

/// Every file and symlink under `dir`, as [`Output`]s relative to it, sorted by path.
fn read_tree(dir: &Path) -> Vec<Output> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<Output>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            let rel = path.strip_prefix(root).expect("under root").to_owned();
            let meta = fs::symlink_metadata(&path).expect("metadata");
            if meta.is_symlink() {
                let target = fs::read_link(&path).expect("read_link");
                out.push(Output::Symlink { path: rel, target });
            } else if meta.is_dir() {
                walk(root, &path, out);
            } else {
                let content = fs::read_to_string(&path).expect("read");
                out.push(Output::File { path: rel, content });
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort_by(|a, b| a.path().cmp(b.path()));
    out
}

fn generator_cmd(config: &Path, kmsg: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plumb-generator"));
    cmd.env("PLUMB_CONFIG", config).env("PLUMB_KMSG", kmsg);
    cmd
}

/// A scratch directory with a config, a kernel log stand-in and an empty output directory.
struct Scratch {
    _dir: tempfile::TempDir,
    config: PathBuf,
    kmsg: PathBuf,
    out: PathBuf,
}

impl Scratch {
    fn new(config: Option<&str>) -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("plumb.toml");
        if let Some(text) = config {
            fs::write(&config_path, text).expect("write config");
        }
        let kmsg = dir.path().join("kmsg");
        fs::write(&kmsg, "").expect("kmsg stand-in");
        let out = dir.path().join("generator");
        fs::create_dir(&out).expect("output dir");
        Scratch {
            config: config_path,
            kmsg,
            out,
            _dir: dir,
        }
    }

    /// Runs the generator the way systemd does: normal, early and late directories.
    fn generate(&self) -> ProcessOutput {
        let early = self.out.with_file_name("generator.early");
        let late = self.out.with_file_name("generator.late");
        run(generator_cmd(&self.config, &self.kmsg).args([&self.out, &early, &late]))
    }

    fn kmsg(&self) -> String {
        fs::read_to_string(&self.kmsg).expect("read kmsg")
    }

    fn written(&self) -> Vec<Output> {
        read_tree(&self.out)
    }
}

#[test]
fn every_generated_and_shipped_unit_passes_systemd_analyze_verify() {
    let scratch = Scratch::new(Some(CONFIG));
    let run_out = scratch.generate();
    assert!(run_out.status.success(), "{run_out:?}");
    let written = scratch.written();
    // The binary wrote exactly what the library generates for the names it finds.
    let c = Config::load(&scratch.config).expect("config");
    let expected = generator::generate(&c, &c.machine_names(&[])).expect("generate");
    assert_eq!(render(&written), render(&expected));

    // The units the generated ones refer to: the managed units, and the shipped ones with
    // /usr/bin/plumb (not installed here) replaced by the plumb binary just built.
    let stubs = scratch.out.with_file_name("stubs");
    fs::create_dir(&stubs).expect("stubs dir");
    fs::write(
        stubs.join("nginx.service"),
        "[Service]\nExecStart=/bin/true\nExecReload=/bin/true\n",
    )
    .expect("stub");
    fs::write(
        stubs.join("docker-compose@.service"),
        "[Unit]\nDescription=compose %i\n[Service]\nExecStart=/bin/true %i\n",
    )
    .expect("stub");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
    let shipped = ["plumb.service", "plumb-apply@.service"];
    for name in shipped {
        let text = fs::read_to_string(units.join(name)).expect("shipped unit");
        assert!(text.contains("/usr/bin/plumb "), "{name}");
        let text = text.replace(
            "/usr/bin/plumb ",
            &format!("{} ", env!("CARGO_BIN_EXE_plumb")),
        );
        fs::write(stubs.join(name), text).expect("shipped copy");
    }

    let mut names: Vec<String> = written
        .iter()
        .filter(|o| matches!(o, Output::File { .. }) && o.path().parent() == Some(Path::new("")))
        .map(|o| o.path().to_string_lossy().into_owned())
        .collect();
    assert!(names.len() >= 7, "{names:?}");
    names.extend(
        [
            // Their drop-ins, and the instances of the shipped template the path units start.
            "nginx.service",
            "docker-compose@caddy.service",
            "plumb-apply@nginx.service",
            "plumb-apply@docker-compose@caddy.service",
            // Its .wants/ links (a link with the wrong name is a warning here).
            "multi-user.target",
            "plumb.service",
        ]
        .map(String::from),
    );
    let search = format!("{}:{}:", scratch.out.display(), stubs.display());
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&names)
        .env("SYSTEMD_UNIT_PATH", search)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .current_dir(&scratch.out));
    // verify exits 0 on mere warnings (an unknown key, a relative path it ignores): any output fails.
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify {names:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn verify_catches_what_the_generator_must_not_write() {
    // The check above would pass vacuously if verify said nothing about broken units.
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(
        dir.path().join("etc-x.mount"),
        "[Mount]\nWhat=/srv/x\nWhere=/etc/y\nType=none\nOptions=bind\n",
    )
    .expect("unit");
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no", "etc-x.mount"])
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display())));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Where= setting doesn't match unit name"),
        "{out:?}"
    );
    // A .wants/ link whose target is neither its name nor its template: exit 0, one warning.
    let wants = dir.path().join("multi-user.target.wants");
    fs::create_dir(&wants).expect("wants dir");
    std::os::unix::fs::symlink("../other.service", wants.join("nginx.service")).expect("link");
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no", "multi-user.target"])
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display())));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has different name"), "{out:?}");
}

const TESTBOX: &str = r#"[global]
upstream = "file:///srv/upstream"
machine = "testbox"

[plumb]
hosts = ["testbox"]

[[services]]
service = "nginx"
dirs = [{ local = "/etc/nginx", link = "nginx" }]
"#;

#[test]
fn binary_writes_units_and_links_for_a_valid_config() {
    let scratch = Scratch::new(Some(TESTBOX));
    let out = scratch.generate();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let paths: Vec<PathBuf> = scratch
        .written()
        .iter()
        .map(|o| o.path().to_owned())
        .collect();
    assert_eq!(
        paths,
        [
            "etc-nginx.mount",
            "multi-user.target.wants/etc-nginx.mount",
            "multi-user.target.wants/nginx.service",
            "multi-user.target.wants/plumb-apply@nginx.path",
            "nginx.service.d/50-plumb.conf",
            "plumb-apply@nginx.path",
        ]
        .map(PathBuf::from)
    );
    let link = scratch
        .out
        .join("multi-user.target.wants/plumb-apply@nginx.path");
    assert!(
        fs::metadata(&link).is_ok(),
        "{} must resolve",
        link.display()
    );
    let mount = fs::read_to_string(scratch.out.join("etc-nginx.mount")).expect("mount unit");
    assert!(
        mount.starts_with(&format!(
            "# Generated by plumb-generator from {}\n",
            scratch.config.display()
        )),
        "{mount}"
    );
    assert_eq!(scratch.kmsg(), "");

    // The single-directory form systemd.generator(7) allows for debugging.
    let single = Scratch::new(Some(TESTBOX));
    let out = run(generator_cmd(&single.config, &single.kmsg).arg(&single.out));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(single.written().len(), 6);
}

#[test]
fn binary_writes_nothing_and_exits_0_for_an_invalid_config() {
    let scratch = Scratch::new(Some(
        "[global]\nupstream = \"u\"\nmachine = \"testbox\"\n[plumb]\nhosts = [\"testbox\"]\n\n[[services]]\nservice = \"nginx\"\ndirs = [{ local = \"etc/nginx\", link = \"nginx\" }]\n",
    ));
    let out = scratch.generate();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let place = format!(
        "plumb-generator: {}:9:19: services[0].dirs[0].local: \"etc/nginx\" must be an absolute path",
        scratch.config.display()
    );
    assert!(stderr.starts_with(&place), "{stderr}");
    assert!(
        stderr.ends_with("; no plumb units generated (no accepted config to fall back on)\n"),
        "{stderr}"
    );
    assert_eq!(scratch.kmsg(), format!("<3>{stderr}"));
    assert!(scratch.written().is_empty());

    // A config that parses but cannot be turned into units is refused the same way.
    let scratch = Scratch::new(Some(
        "[global]\nupstream = \"u\"\nmachine = \"testbox\"\n[plumb]\nhosts = [\"testbox\"]\n\n[[services]]\nservice = \"nginx\"\ndirs = [{ local = \"/etc/../nginx\", link = \"nginx\" }]\n",
    ));
    let out = scratch.generate();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("service \"nginx\": dirs[0].local: \"/etc/../nginx\" contains '..'"),
        "{stderr}"
    );
    assert!(scratch.written().is_empty());
}

/// A typo in the config does not take plumb's units away: the last config the daemon accepted
/// stands in, and `plumb.service`'s description carries the refusal.
#[test]
fn binary_generates_from_the_last_accepted_config_when_the_config_is_refused() {
    let scratch = Scratch::new(Some(CONFIG));
    scratch.generate();
    let good = scratch.written();
    assert!(!good.is_empty());
    let accepted = plumb::config::accepted_path(&scratch.config);
    fs::write(&accepted, CONFIG).unwrap();
    fs::write(
        &scratch.config,
        format!("{CONFIG}\n[[services]]\nservice = \"typo\"\nupstrem = \"u\"\n"),
    )
    .unwrap();
    fs::remove_dir_all(&scratch.out).unwrap();
    fs::create_dir(&scratch.out).unwrap();

    let out = scratch.generate();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("upstrem"), "{stderr}");
    assert!(
        stderr.ends_with(&format!(
            "; generating from the last accepted config, {}\n",
            accepted.display()
        )),
        "{stderr}"
    );
    assert_eq!(scratch.kmsg(), format!("<3>{stderr}"));
    let mut written = scratch.written();
    let refused = written
        .iter()
        .position(|o| o.path() == Path::new("plumb.service.d/40-plumb-config-refused.conf"))
        .map(|i| written.remove(i))
        .expect("the refusal's drop-in");
    let Output::File { content, .. } = refused else {
        panic!("a file: {refused:?}")
    };
    assert!(
        content.contains("Description=plumb: CONFIG REFUSED, running on the last accepted one: ")
            && content.contains("upstrem"),
        "{content}"
    );
    // The same units as the accepted config gives, but for where the config's path is named.
    let accepted_s = accepted.display().to_string();
    let config_s = scratch.config.display().to_string();
    let renamed: Vec<Output> = written
        .into_iter()
        .map(|o| match o {
            Output::File { path, content } => Output::File {
                path,
                content: content.replace(&accepted_s, &config_s),
            },
            link => link,
        })
        .collect();
    assert_eq!(renamed, good);
}

#[test]
fn binary_cuts_long_messages_to_what_the_kernel_log_takes() {
    let long = "x/".repeat(1000);
    let scratch = Scratch::new(Some(&format!(
        "[[services]]\nmachine = \"m\"\nservice = \"a\"\nupstream = \"u\"\ndirs = [{{ local = \"{long}\", link = \"x\" }}]\n"
    )));
    let out = scratch.generate();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&long));
    let kmsg = scratch.kmsg();
    assert!(kmsg.starts_with("<3>plumb-generator: "), "{kmsg}");
    assert!(kmsg.ends_with("...\n") && kmsg.len() <= 901, "{kmsg}");
}

#[test]
fn binary_writes_nothing_and_exits_0_without_a_config() {
    let scratch = Scratch::new(None);
    let out = scratch.generate();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    assert!(scratch.written().is_empty());
    assert_eq!(scratch.kmsg(), "");
}

#[test]
fn binary_removes_what_it_wrote_when_a_write_fails() {
    let scratch = Scratch::new(Some(TESTBOX));
    // Another generator already wrote a unit of the same name: a conflict, reported.
    fs::write(scratch.out.join("plumb-apply@nginx.path"), "other\n").expect("conflict");
    let out = scratch.generate();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plumb-apply@nginx.path: File exists"),
        "{stderr}"
    );
    let left = scratch.written();
    assert_eq!(render(&left), "==> plumb-apply@nginx.path <==\nother\n\n");
    assert_eq!(fs::read_dir(&scratch.out).expect("read_dir").count(), 1);
}

#[test]
fn binary_refuses_a_wrong_command_line() {
    let scratch = Scratch::new(Some(TESTBOX));
    let out = run(generator_cmd(&scratch.config, &scratch.kmsg).args(["a", "b"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(scratch.written().is_empty());
}

//! `plumb`'s command line as an operator types it: what `check-config` reports and how it ends
//! when its reader goes away, gitopper's early `keys`, and `--state-dir` moving the checkouts of
//! services that set no `mount`, and the `PLUMB_LOG` filter. The real binary, on files and a
//! `file://` upstream.

use crate::support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::{Upstream, temp_root};

fn plumb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plumb"))
        .args(args)
        .env_remove("PLUMB_BOOTSTRAP")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

#[test]
fn check_config_lists_check_and_health() {
    let root = temp_root();
    let config = root.path().join("plumb.toml");
    fs::write(
        &config,
        r#"[global]
upstream = "https://deploy:hunter2@git.example.org/ops.git"

[[services]]
machine = "web1"
service = "nginx"
action = "reload"
check = "nginx -t -q -c {dir}/nginx.conf"
check_timeout = "20s"
health = { settle = "10s", url = "http://127.0.0.1/healthz", command = "curl -fs localhost", timeout = "30s" }
dirs = [{ local = "/etc/nginx", link = "nginx/etc", ro = true }]
"#,
    )
    .unwrap();
    let out = plumb(&["check-config", path(&config), "--hosts", "web1"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    let block: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("[nginx]"))
        .collect();
    assert_eq!(
        block,
        [
            "[nginx] machine web1",
            "  upstream  https://git.example.org/ops.git",
            "  branch    main",
            "  checkout  /var/lib/plumb/checkouts/nginx",
            "  action    reload",
            "  check     nginx -t -q -c {dir}/nginx.conf (within 20s)",
            "  health    curl -fs localhost and GET http://127.0.0.1/healthz (after 10s up, within 30s)",
            "  dir       nginx/etc -> /etc/nginx (read-only)",
        ],
        "{stdout}"
    );
}

/// `plumb check-config FILE | head -1`: head leaves after one line; plumb ends as tools do, quietly
/// and with the check's own status, not with a panic and exit 101.
#[test]
fn check_config_into_a_closed_pipe_ends_quietly() {
    let root = temp_root();
    let config = root.path().join("plumb.toml");
    // More than a pipe holds (64 KiB), so the reader is gone before plumb is done writing.
    let services: String = (0..3000)
        .map(|i| format!("[[services]]\nmachine = \"m\"\nservice = \"s{i}\"\nupstream = \"u\"\n"))
        .collect();
    fs::write(&config, services).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_plumb"))
        .args(["check-config", path(&config), "--hosts", "m"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("valid; 3000 service(s)"), "{first}");
    // The reader is dropped here, as head exits.
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
}

/// gitopper's early releases put `keys` at the top level; plumb reads and ignores them.
#[test]
fn gitoppers_top_level_keys_are_accepted() {
    let root = temp_root();
    let services = "[global]\nupstream = \"u\"\n\n[[services]]\nmachine = \"m\"\nservice = \"a\"\n";
    for keys in [
        "[[keys]]\npath = \"keys/miek.pub\"\nro = true\n",
        "[keys]\npath = [\"keys/miek.pub\", \"keys/other.pub\"]\n",
    ] {
        let config = root.path().join("config.toml");
        fs::write(&config, format!("{services}\n{keys}")).unwrap();
        let out = plumb(&["check-config", path(&config), "--hosts", "m"]);
        assert!(out.status.success(), "{keys}: {}", text(&out.stderr));
        assert!(
            text(&out.stdout).starts_with("note: gitopper's keys are accepted and ignored"),
            "{}",
            text(&out.stdout)
        );
    }
}

/// `--state-dir` moves the checkouts of services that set no `mount` along with the stores and
/// the state, so two daemons with their own state directories share nothing; the config's own
/// state directory is left alone.
#[test]
fn state_dir_moves_the_default_checkouts() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "cli");
    up.write("app/conf", "1").commit("v1");
    let configured = root.path().join("configured");
    let config = root.path().join("plumb.toml");
    fs::write(
        &config,
        format!(
            "[plumb]\nstate_dir = {configured:?}\nmetrics_address = \"\"\n\n[[services]]\n\
             machine = \"m\"\nservice = \"app\"\nupstream = \"{}\"\n\
             dirs = [{{ local = \"/srv/app\", link = \"app\" }}]\n",
            up.file_url()
        ),
    )
    .unwrap();
    for name in ["one", "two"] {
        let dir = root.path().join(name);
        let out = plumb(&[
            "-c",
            path(&config),
            "--hosts",
            "m",
            "--state-dir",
            path(&dir),
            "--once",
            "--no-apply",
        ]);
        assert!(
            out.status.success(),
            "{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert_eq!(
            fs::read_to_string(dir.join("checkouts/app/app/conf")).unwrap(),
            "1"
        );
        let shown = plumb(&[
            "--state-dir",
            path(&dir),
            "check-config",
            path(&config),
            "--hosts",
            "m",
        ]);
        assert!(
            text(&shown.stdout).contains(&format!("checkout  {}/checkouts/app\n", dir.display())),
            "{}",
            text(&shown.stdout)
        );
    }
    assert!(
        !configured.exists(),
        "the config's state_dir was written to"
    );
}

/// `PLUMB_LOG` picks levels per module; one that does not parse is said, and the daemon still logs
/// at info instead of going quiet.
#[test]
fn plumb_log_filters_by_module_and_a_bad_filter_is_said() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "ops");
    up.write("nginx/etc/x", "1").commit("A");
    // Each run is a machine's first: it deploys, and keeps its config as the accepted one.
    let run = |filter: &str| {
        let dir = tempfile::tempdir_in(root.path()).unwrap();
        let m = support::Machine::new(
            dir.path(),
            &support::service("nginx", &up.file_url(), &["nginx/etc"]),
        );
        let out = m
            .command()
            .env("PLUMB_LOG", filter)
            .arg("--once")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        text(&out.stderr)
    };
    let lines = |log: &str, level: &str, target: &str| {
        log.lines()
            .filter(|l| l.contains(level) && l.contains(target))
            .count()
    };

    let default = run("");
    assert_eq!(lines(&default, "DEBUG", "plumb"), 0, "{default}");
    assert!(
        lines(&default, "INFO", "plumb::daemon::persist") > 0,
        "{default}"
    );

    let debug = run("plumb::daemon=debug,plumb::daemon::persist=warn");
    assert!(lines(&debug, "DEBUG", "plumb::daemon:") > 0, "{debug}");
    assert_eq!(
        lines(&debug, "INFO", "plumb::daemon::persist"),
        0,
        "{debug}"
    );

    let bad = run("plumb=[x");
    assert!(
        bad.contains("PLUMB_LOG=\"plumb=[x\" is not a log filter"),
        "{bad}"
    );
    assert_eq!(lines(&bad, "DEBUG", "plumb"), 0, "{bad}");
    assert!(lines(&bad, "INFO", "plumb::daemon") > 0, "{bad}");

    // A misspelt level reads as a target name: plumb's own logs would go quiet, so it is said.
    let typo = run("debgu");
    assert!(
        typo.contains("PLUMB_LOG=\"debgu\" names no level for plumb's own logs"),
        "{typo}"
    );
}

//! Faults around the daemon, on the real `plumb` binary: an upstream that goes down or hangs, a branch
//! force-pushed upstream, a state directory that fills up, and `kill -9` at random moments under a
//! real systemd. In each, no file plumb hands over is ever half-written, the last good revision stays
//! deployed, the failure shows in the service's state, and plumb recovers by itself.
//!
//! Nothing here measures time: every wait is a poll with a generous deadline, so a fix that makes
//! something slower cannot make a test flaky, only a hang makes it fail.

use crate::support;

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use plumb::git::{Store, Transport};
use plumb::proto::ServiceStatus;
use support::{
    ANY_METRICS_PORT, DEADLINE, GitDaemon, HttpServer, Machine, SshServer, Upstream, poll,
    read_rev, require_root, scrape, service, temp_root, wait_until,
};

/// The daemons' `fetch_timeout` in the hang test: a fetch that has to give up does so after this.
const FETCH_TIMEOUT: &str = "3s";

/// Deadline for a fetch against a server that never answers to give up: generous, so only a fetch
/// that hangs for good fails the test.
const HANG_DEADLINE: Duration = Duration::from_secs(90);

/// A machine under `root` polling every 500 ms unless `settings` names an interval, with no
/// metrics listener unless they name one.
fn machine(root: &Path, settings: &str, services: &str) -> Machine {
    let interval = if settings.contains("interval") {
        ""
    } else {
        "interval = \"500ms\"\n"
    };
    Machine::with_settings(root, &format!("{interval}{settings}"), services)
}

/// `curl` on a daemon's API at `socket`: the answer's body, empty when it does not answer (yet) or
/// refuses. The one POST used here is `pull --force`, so a POST sends `{"force":true}`.
fn api(socket: &Path, method: &str, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10", "-X", method, "--unix-socket"])
        .arg(socket)
        .args(["-H", "content-type: application/json"])
        .args(if method == "POST" {
            &["-d", r#"{"force":true}"#][..]
        } else {
            &[]
        })
        .arg(format!("http://plumb{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the `plumb_git_fetch_total` series of `upstream` with `result`, 0 when absent.
fn fetches(metrics: &str, upstream: &str, result: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("plumb_git_fetch_total{"))
        .filter(|l| {
            l.contains(&format!("result=\"{result}\"")) && l.contains(&format!("\"{upstream}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Waits until `service`'s state (as the API shows it) satisfies `ok`; panics with the last status
/// and the daemon's log otherwise.
fn wait_for_status(
    m: &Machine,
    service: &str,
    what: &str,
    deadline: Duration,
    mut ok: impl FnMut(&ServiceStatus) -> bool,
) -> ServiceStatus {
    let mut last = None;
    let mut done = None;
    let met = poll(deadline, Duration::from_millis(50), || {
        match m.status(service) {
            Some(s) if ok(&s) => done = Some(s),
            Some(s) => last = Some(s),
            None => {}
        }
        done.is_some()
    });
    if let (true, Some(s)) = (met, done) {
        return s;
    }
    panic!(
        "timed out after {deadline:?} waiting for {service}: {what}; last status: {last:#?}\nlog:\n{}",
        m.log_text()
    );
}

#[test]
fn an_upstream_that_goes_down_keeps_states_and_files_and_recovers_by_itself() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let http = HttpServer::start(root.path());
    let up = Upstream::new(root.path(), "down");
    let v1 = up
        .write("a/conf", "1")
        .write("b/conf", "1")
        .write("c/conf", "1")
        .commit("v1");
    let (git_url, http_url) = (gitd.url(&up), http.url(&up));
    let m = machine(
        root.path(),
        ANY_METRICS_PORT,
        &format!(
            "{}{}{}",
            service("a", &git_url, &["a"]),
            service("b", &http_url, &["b"]),
            service("c", &git_url, &["c"])
        ),
    );
    let mut d = m.spawn();
    let port = d.metrics_port();
    for s in ["a", "b", "c"] {
        wait_for_status(&m, s, "v1 deployed, OK", DEADLINE, |st| {
            st.state == "OK" && st.deployed.as_deref() == Some(v1.as_str())
        });
    }
    let frozen = Command::new("curl")
        .args(["-sf", "-X", "POST", "--unix-socket"])
        .arg(&m.socket)
        .args(["-H", "content-type: application/json", "-d", "{}"])
        .arg("http://plumb/v1/services/c/freeze")
        .output()
        .unwrap();
    assert!(frozen.status.success(), "{frozen:?}");
    let unreachable = |st: &ServiceStatus| {
        st.notes
            .iter()
            .any(|n| n.starts_with("upstream unreachable") && n.contains(&git_url))
    };

    // git daemon killed: a and c keep their state (OK, FREEZE) and v1 on disk, and say why
    // nothing moves; b (another upstream) is not affected. The upstream's condition is its own
    // metric. A commit made meanwhile arrives by itself once the server is back on its port.
    let mut v2 = String::new();
    let gitd = gitd.restart_after(|| {
        let s = wait_for_status(&m, "a", "OK, upstream unreachable", DEADLINE, |st| {
            st.state == "OK" && unreachable(st)
        });
        assert_eq!(s.deployed.as_deref(), Some(v1.as_str()));
        assert_eq!(m.rev("a").as_deref(), Some(v1.as_str()));
        assert_eq!(m.read("a", "a/conf").as_deref(), Some("1"));
        wait_for_status(&m, "c", "FREEZE, upstream unreachable", DEADLINE, |st| {
            st.state == "FREEZE" && unreachable(st)
        });
        let persisted: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(m.state.join("state/c.json")).unwrap())
                .unwrap();
        assert_eq!(persisted["state"], "FREEZE", "{persisted}");
        wait_until("the failed fetches in the metrics", DEADLINE, || {
            fetches(&scrape(port), &git_url, "error") >= 2
        });
        let metrics = scrape(port);
        for line in [
            format!("plumb_upstream_up{{upstream=\"{git_url}\"}} 0"),
            format!("plumb_upstream_up{{upstream=\"{http_url}\"}} 1"),
            "plumb_service_state{machine=\"testbox\",service=\"c\",state=\"FREEZE\"} 1".to_owned(),
            "plumb_service_state{machine=\"testbox\",service=\"a\",state=\"OK\"} 1".to_owned(),
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }
        let b = m.status("b").unwrap();
        assert_eq!((b.state.as_str(), b.notes.len()), ("OK", 0), "{b:?}");
        v2 = up
            .write("a/conf", "2")
            .commit("v2 while git daemon is down");
        d.assert_alive(&m);
    });
    let s = wait_for_status(&m, "a", "v2 deployed, OK", DEADLINE, |st| {
        st.state == "OK" && st.deployed.as_deref() == Some(v2.as_str())
    });
    assert_eq!((s.info.as_str(), s.notes.len()), ("", 0), "{s:?}");
    let c = wait_for_status(&m, "c", "FREEZE, upstream back", DEADLINE, |st| {
        st.notes.is_empty()
    });
    assert_eq!(c.state, "FREEZE", "{c:?}");
    assert_eq!(m.read("a", "a/conf").as_deref(), Some("2"));
    assert!(fetches(&scrape(port), &git_url, "ok") >= 2);

    // The same over HTTP: lighttpd killed and restarted.
    let mut v3 = String::new();
    let http = http.restart_after(|| {
        wait_for_status(&m, "b", "OK, upstream unreachable", DEADLINE, |st| {
            st.state == "OK" && st.notes.iter().any(|n| n.contains(&http_url))
        });
        assert_eq!(m.rev("b").as_deref(), Some(v1.as_str()));
        assert_eq!(m.read("b", "b/conf").as_deref(), Some("1"));
        wait_until("the failed fetches in the metrics", DEADLINE, || {
            fetches(&scrape(port), &http_url, "error") >= 2
        });
        assert_eq!(m.status("a").unwrap().state, "OK");
        v3 = up.write("b/conf", "3").commit("v3 while lighttpd is down");
        d.assert_alive(&m);
    });
    wait_for_status(&m, "b", "v3 deployed, OK", DEADLINE, |st| {
        st.state == "OK" && st.deployed.as_deref() == Some(v3.as_str())
    });
    assert_eq!(m.read("b", "b/conf").as_deref(), Some("3"));
    d.assert_alive(&m);
    drop((gitd, http));
}

/// A TCP front on 127.0.0.1 for a server: forwards each connection to it, or, while hanging,
/// accepts connections and never answers them (a server that is up but stuck).
struct Gate {
    port: u16,
    hang: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Gate {
    fn new(target: u16) -> Gate {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hang = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hang.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        if h.load(Ordering::Relaxed) {
                            held.push(client);
                        } else {
                            forward(client, target);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("gate accept: {e}"),
                }
            }
        });
        Gate {
            port,
            hang,
            stop,
            thread: Some(thread),
        }
    }

    /// From now on, new connections hang (`true`) or are forwarded (`false`).
    fn hang(&self, on: bool) {
        self.hang.store(on, Ordering::Relaxed);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies bytes both ways between `client` and a new connection to `target`, until each side
/// closes.
fn forward(client: TcpStream, target: u16) {
    let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, target)) else {
        return;
    };
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    };
    pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
    pipe(server, client);
}

#[test]
fn a_hanging_upstream_times_out_keeps_the_last_good_revision_and_recovers() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let http = HttpServer::start(root.path());
    let sshd = SshServer::start(root.path());
    let up = Upstream::new(root.path(), "hang");
    let v1 = up
        .write("g/conf", "1")
        .write("h/conf", "1")
        .write("s/conf", "1")
        .commit("v1");
    let gates = [
        Gate::new(gitd.port),
        Gate::new(http.port),
        Gate::new(sshd.port),
    ];
    let urls = [
        format!("git://127.0.0.1:{}/hang.git", gates[0].port),
        format!("http://127.0.0.1:{}/git/hang.git", gates[1].port),
        format!(
            "ssh://root@127.0.0.1:{}{}",
            gates[2].port,
            up.bare.display()
        ),
    ];
    // sshd's host key, under the gate's address.
    let known_hosts = root.path().join("gate_known_hosts");
    let line = fs::read_to_string(&sshd.known_hosts).unwrap();
    fs::write(
        &known_hosts,
        line.replace(
            &format!("]:{} ", sshd.port),
            &format!("]:{} ", gates[2].port),
        ),
    )
    .unwrap();
    let m = machine(
        root.path(),
        &format!(
            "fetch_timeout = \"{FETCH_TIMEOUT}\"\nssh_key = {:?}\nknown_hosts = [{:?}]\n",
            sshd.client_key, known_hosts
        ),
        &format!(
            "{}{}{}",
            service("g", &urls[0], &["g"]),
            service("h", &urls[1], &["h"]),
            service("s", &urls[2], &["s"])
        ),
    );
    let mut d = m.spawn();
    let names = ["g", "h", "s"];
    for s in names {
        wait_for_status(&m, s, "v1 deployed, OK", DEADLINE, |st| {
            st.state == "OK" && st.deployed.as_deref() == Some(v1.as_str())
        });
    }

    // Every server now accepts connections and never answers. Without the fetch's deadline a
    // fetch would wait forever, and its upstream would never be tried again.
    for g in &gates {
        g.hang(true);
    }
    let v2 = up
        .write("g/conf", "2")
        .write("h/conf", "2")
        .write("s/conf", "2")
        .commit("v2");
    for (s, url) in names.iter().zip(&urls) {
        let st = wait_for_status(&m, s, "the fetch gave up", HANG_DEADLINE, |st| {
            st.state == "OK" && !st.notes.is_empty()
        });
        // "fetch URL: timed out after 3s", whatever the transport.
        let note = &st.notes[0];
        assert!(note.contains(&format!("fetch {url}: ")), "{st:?}");
        assert!(note.to_lowercase().contains("timed out"), "{st:?}");
        assert_eq!(st.deployed.as_deref(), Some(v1.as_str()));
        assert_eq!(m.rev(s).as_deref(), Some(v1.as_str()));
        assert_eq!(m.read(s, &format!("{s}/conf")).as_deref(), Some("1"));
    }
    d.assert_alive(&m);

    // Answering again: each upstream is tried again by itself and catches up.
    for g in &gates {
        g.hang(false);
    }
    for s in names {
        wait_for_status(&m, s, "v2 deployed, OK", DEADLINE, |st| {
            st.state == "OK" && st.deployed.as_deref() == Some(v2.as_str())
        });
        assert_eq!(m.read(s, &format!("{s}/conf")).as_deref(), Some("2"));
    }
    d.assert_alive(&m);
}

#[test]
fn a_force_push_is_reported_with_the_old_and_the_new_head() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "rewritten");
    let v1 = up.write("app/a", "1").commit("v1");
    let v2 = up.write("app/a", "2").commit("v2");
    let stores = root.path().join("stores");
    let mut store = Store::open(&stores, &up.file_url()).unwrap();
    let transport = Transport::default();
    let main = ["main".to_owned()];
    let fetch = |store: &mut Store| store.fetch(&main, &transport).unwrap();

    // The first fetch and a fast-forward rewrite nothing.
    let r = fetch(&mut store);
    assert_eq!(r.heads["main"].map(|o| o.to_string()), Some(v2.clone()));
    assert!(r.rewritten.is_empty(), "{r:?}");
    let v3 = up.write("app/a", "3").commit("v3");
    assert!(fetch(&mut store).rewritten.is_empty());

    // Rewritten on top of v1: v3 is no ancestor of v4.
    up.force_reset(&v1);
    let v4 = up.write("app/a", "4").commit("v4, rewritten");
    let r = fetch(&mut store);
    let pairs: BTreeMap<String, (String, String)> = r
        .rewritten
        .iter()
        .map(|(b, (o, n))| (b.clone(), (o.to_string(), n.to_string())))
        .collect();
    assert_eq!(
        pairs,
        BTreeMap::from([("main".to_owned(), (v3.clone(), v4.clone()))])
    );
    assert_eq!(r.heads["main"].map(|o| o.to_string()), Some(v4.clone()));
    // Nothing moved since: nothing to report.
    assert!(fetch(&mut store).rewritten.is_empty());
    // Rewound (no new commit at all): also a force-update.
    up.force_reset(&v1);
    let r = fetch(&mut store);
    assert_eq!(
        r.rewritten["main"],
        (v4.parse().unwrap(), v1.parse().unwrap())
    );

    // The daemon logs it at warn, with the branch and both heads.
    let m = machine(root.path(), "", &service("app", &up.file_url(), &["app"]));
    let once = |m: &Machine| {
        let out = Command::new(env!("CARGO_BIN_EXE_plumb"))
            .args(&m.args()[1..])
            .arg("--once")
            .env("PLUMB_LOG", "info")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    once(&m);
    let v5 = up.write("app/a", "5").commit("v5");
    once(&m);
    up.force_reset(&v1);
    let v6 = up.write("app/a", "6").commit("v6, rewritten");
    let log = once(&m);
    let line = log
        .lines()
        .find(|l| l.contains("force-pushed"))
        .unwrap_or_else(|| panic!("no force-push warning in:\n{log}"));
    assert!(line.contains("WARN"), "{line}");
    for part in ["branch=main", &format!("old={v5}"), &format!("new={v6}")] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert_eq!(m.rev("app").as_deref(), Some(v6.as_str()));
}

/// The seed of a randomised test: `PLUMB_FAULTS_SEED` replays a run, else a new one; printed, so
/// that a failure can be reproduced.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("PLUMB_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{test}: seed {seed} (PLUMB_FAULTS_SEED={seed} replays it)");
    seed
}

/// What is wrong with the files plumb hands over under `state` (`<state>/state/`): every `.json`
/// must parse, every `.rev` be one object id and a newline, every `.applied` parse as an apply
/// outcome. A file that vanishes between listing and reading (replaced by a rename) is skipped.
fn bad_state_files(state: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let Ok(entries) = fs::read_dir(state.join("state")) else {
        return bad;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = match fs::read(entry.path()) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => {
                bad.push(format!("{name}: {e}"));
                continue;
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let ok = if name.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .is_ok_and(|v| v["state"].is_string())
        } else if name.ends_with(".rev") {
            text.len() == 41
                && text.ends_with('\n')
                && text[..40].bytes().all(|b| b.is_ascii_hexdigit())
        } else if name.ends_with(".applied") {
            serde_json::from_slice::<plumb::apply::Outcome>(&bytes).is_ok()
        } else {
            true
        };
        if !ok {
            bad.push(format!("{name}: {text:?}"));
        }
    }
    bad
}

/// plumb's temp files (`write_atomic`'s `.plumb-*.tmp`) in `<state>/state`.
fn temp_files(state: &Path) -> Vec<String> {
    fs::read_dir(state.join("state"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".plumb-") && n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks [`bad_state_files`] over and over on another thread until dropped, then reports every
/// problem it saw: a reader at a random moment must never see a half-written file.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(usize, Vec<String>)>>,
}

impl Watcher {
    fn start(state: PathBuf) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut rounds, mut seen) = (0, Vec::new());
            while !s.load(Ordering::Relaxed) {
                seen.extend(bad_state_files(&state));
                rounds += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (rounds, seen)
        });
        Watcher {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it; how many times it looked, and what was wrong.
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Makes the file system holding `filler` full but for `pages` pages of 4 KiB: appends to `filler`
/// until ENOSPC, then gives `pages` pages back (so there is never more room than before meanwhile).
fn fill(filler: &Path, pages: u64) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .unwrap();
    for chunk in [vec![0u8; 64 << 10], vec![0u8; 4096], vec![0u8; 1]] {
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("fill {}: {e}", filler.display()),
            }
        }
    }
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(pages * 4096)).unwrap();
}

#[test]
fn a_full_state_directory_never_leaves_a_half_written_file_and_recovers() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "full");
    let v1 = up.write("a/conf", "1").write("b/conf", "1").commit("v1");
    let url = up.file_url();
    let m = machine(
        root.path(),
        &format!("interval = \"200ms\"\n{ANY_METRICS_PORT}"),
        &format!(
            "{}{}",
            service("a", &url, &["a"]),
            service("b", &url, &["b"])
        ),
    );
    fs::create_dir_all(&m.state).unwrap();
    // The daemon in a mount namespace of its own, with a 1 MiB tmpfs on its state directory: the
    // host never sees the mount, and it goes away with the daemon.
    let mut argv: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        r#"mount -t tmpfs -o size=1m,mode=0755 plumb-faults "$1" && shift && exec "$@""#,
        "sh",
    ]
    .map(String::from)
    .to_vec();
    argv.push(m.state.display().to_string());
    argv.extend(m.args());
    let mut d = m.spawn_with(&argv);
    let port = d.metrics_port();
    // The state directory as the daemon sees it (unshare and sh exec'd it: same pid).
    let state =
        PathBuf::from(format!("/proc/{}/root", d.pid())).join(m.state.strip_prefix("/").unwrap());
    wait_until("v1 deployed on the tmpfs", DEADLINE, || {
        read_rev(&state, "a").as_deref() == Some(v1.as_str())
            && read_rev(&state, "b").as_deref() == Some(v1.as_str())
    });
    let mounts = fs::read_to_string(format!("/proc/{}/mountinfo", d.pid())).unwrap();
    let target = format!(" {} ", m.state.display());
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(&target) && l.contains("tmpfs")),
        "{mounts}"
    );
    let host = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host.contains(&target), "{host}");
    assert!(
        read_rev(&m.state, "a").is_none(),
        "written to the host's directory"
    );

    let watcher = Watcher::start(state.clone());
    let filler = state.join("filler");
    let cycles = || {
        let text = scrape(port);
        fetches(&text, &url, "ok") + fetches(&text, &url, "error")
    };
    // From a full file system to a few pages free: every write plumb makes (objects and refs in the
    // store, checkouts, index, state, .rev) fails at one level or another.
    let mut last = v1.clone();
    let mut made = 0;
    let mut commit = |what: &str| {
        made += 1;
        up.write("a/conf", &format!("a{made}"))
            .write("b/conf", &format!("b{made}"))
            .commit(what)
    };
    // A full file system, then a page more at each step: the fetch fails writing the pack, then
    // the reference, then it goes through.
    for pages in [0, 0, 1, 2, 3, 4] {
        fill(&filler, pages);
        last = commit(&format!("{pages} pages free"));
        // A fetch that started after the commit, and its checkouts, are done.
        let seen = cycles();
        wait_until("three more fetches", DEADLINE, || cycles() >= seen + 3);
        d.assert_alive(&m);
    }
    let log = m.log_text();
    let path = m.state.join("state/a.json");
    assert!(
        log.contains(&format!(
            "cannot save state to {}: No space left on device",
            path.display()
        )),
        "no error naming {} in the log:\n{log}",
        path.display()
    );

    // Then the free space comes and goes at random while commits arrive, so that any write
    // (objects, references, checkouts, indexes, .rev, state) may be the one that fails.
    let seed = seed("disk full");
    let stop = Arc::new(AtomicBool::new(false));
    let squeezer = {
        let (stop, filler) = (stop.clone(), filler.clone());
        std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(seed);
            while !stop.load(Ordering::Relaxed) {
                fill(&filler, rng.u64(0..8));
                std::thread::sleep(Duration::from_millis(rng.u64(0..20)));
            }
        })
    };
    for i in 0..12 {
        last = commit(&format!("squeezed {i}"));
        let seen = cycles();
        wait_until("two more fetches", DEADLINE, || cycles() >= seen + 2);
        d.assert_alive(&m);
    }
    stop.store(true, Ordering::Relaxed);
    squeezer.join().unwrap();

    // Space again: the daemon catches up by itself.
    let mark = m.log_text().len();
    fs::remove_file(&filler).unwrap();
    for s in ["a", "b"] {
        // A checkout that failed midway is redone, never taken for local edits.
        wait_for_status(&m, s, "the last commit deployed, OK", DEADLINE, |st| {
            st.state == "OK" && st.deployed.as_deref() == Some(last.as_str())
        });
        let drift = format!("local edits in the checkout service={s} ");
        assert!(
            !m.log_text()[mark..].contains(&drift),
            "{s}: a half-made checkout read as local edits"
        );
    }
    assert_eq!(read_rev(&state, "a").as_deref(), Some(last.as_str()));
    assert_eq!(
        fs::read_to_string(state.join("checkouts/a/a/conf")).unwrap(),
        format!("a{made}")
    );
    let (looks, bad) = watcher.finish();
    assert!(
        bad.is_empty(),
        "half-written files seen in {looks} looks: {bad:#?}"
    );
    assert!(looks > 100, "the watcher looked only {looks} times");
    assert_eq!(temp_files(&state), Vec::<String>::new());
    d.assert_alive(&m);
    let log = m.log_text();
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    eprintln!(
        "disk full: {looks} looks at the state files; {} failed fetches, {} failed deploys, {} state files not saved",
        count("fetch failed"),
        count("deploy failed"),
        count("cannot save state")
    );
}

/// A `dirs` entry of the kill test: local, link, file.
type KillDir = (&'static str, &'static str, bool);

/// The kill test's services: name, action, dirs.
const KILL_SERVICES: [(&str, &str, &[KillDir]); 3] = [
    ("fa", "reload", &[("/srv/fa", "fa/conf", false)]),
    (
        "fb",
        "reload",
        &[
            ("/srv/fb", "fb/conf", false),
            ("/etc/fb.conf", "fb/fb.conf", true),
        ],
    ),
    ("fc", "restart", &[("/srv/fc", "fc/conf", false)]),
];

/// The file each commit of the kill test writes under a dir's link: `<link>/x` for a directory,
/// the link itself for a file.
fn kill_file(link: &str, file: bool) -> String {
    if file {
        link.to_owned()
    } else {
        format!("{link}/x")
    }
}

/// The container's state directory, under the container's root as the host sees it.
const CONTAINER_STATE: &str = "var/lib/plumb";

/// What is not yet as it must be once plumb has converged in the container: each service's `.rev`
/// is the last commit that changed its files, its apply of that revision succeeded, each mount
/// target is mounted exactly once and shows the file's last content, and every state file parses.
/// Empty when converged.
fn not_converged(
    c: &support::container::Container,
    expected: &BTreeMap<&str, String>,
    content: &BTreeMap<String, String>,
) -> Vec<String> {
    let root = c.root();
    let state = root.join(CONTAINER_STATE);
    let mut wrong = bad_state_files(&state);
    for (name, _, dirs) in KILL_SERVICES {
        let want = &expected[name];
        let rev = read_rev(&state, name);
        if rev.as_ref() != Some(want) {
            wrong.push(format!("{name}: .rev {rev:?}, want {want}"));
            continue;
        }
        let applied = fs::read(state.join(format!("state/{name}.applied")))
            .ok()
            .and_then(|b| serde_json::from_slice::<plumb::apply::Outcome>(&b).ok());
        match applied {
            Some(o) if o.ok && o.revision.to_string() == *want => {}
            other => wrong.push(format!("{name}: applied {other:?}, want {want}")),
        }
        for (local, link, file) in dirs {
            let shown = if *file {
                PathBuf::from(local)
            } else {
                Path::new(local).join("x")
            };
            let seen = fs::read_to_string(root.join(shown.strip_prefix("/").unwrap())).ok();
            let want = content.get(&kill_file(link, *file));
            if seen.as_ref() != want {
                wrong.push(format!("{}: {seen:?}, want {want:?}", shown.display()));
            }
        }
    }
    let mountinfo =
        fs::read_to_string(format!("/proc/{}/mountinfo", c.leader())).unwrap_or_default();
    for (_, _, dirs) in KILL_SERVICES {
        for (local, _, _) in dirs {
            let n = mountinfo
                .lines()
                .filter(|l| l.split(' ').nth(4) == Some(*local))
                .count();
            if n != 1 {
                wrong.push(format!("{local}: mounted {n} times"));
            }
        }
    }
    wrong
}

#[test]
fn kill_9_at_random_moments_never_leaves_a_mess() {
    require_root();
    use support::container::Container;
    let started = Instant::now();
    let seed = seed("kill -9");
    let mut rng = fastrand::Rng::with_seed(seed);
    let rounds: usize = std::env::var("PLUMB_FAULTS_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);

    let root = temp_root();
    let up = Upstream::new(root.path(), "kill");
    let gitd = GitDaemon::start(root.path());
    let url = gitd.url(&up);
    let host = "plumb-kill";
    let mut config = "[plumb]\ninterval = \"500ms\"\nmetrics_address = \"\"\n\n".to_owned();
    let mut boot = Container::builder(host);
    for (name, action, dirs) in KILL_SERVICES {
        let dirs: Vec<String> = dirs
            .iter()
            .map(|(local, link, file)| {
                format!("{{ local = \"{local}\", link = \"{link}\", file = {file} }}")
            })
            .collect();
        config.push_str(&format!(
            "[[services]]\nmachine = \"{host}\"\nservice = \"{name}\"\nupstream = \"{url}\"\naction = \"{action}\"\ndirs = [{}]\n\n",
            dirs.join(", ")
        ));
        // No start limit: fc is restarted at every change, faster than systemd's default allows.
        let unit = "[Unit]\nStartLimitIntervalSec=0\n\n[Service]\nExecStart=/bin/sleep infinity\nExecReload=/bin/true\n";
        boot = boot.file(&format!("/etc/systemd/system/{name}.service"), unit, 0o644);
    }
    // plumb is restarted 100 ms after each kill, however often.
    let dropin = "[Unit]\nStartLimitIntervalSec=0\n\n[Service]\nRestartSec=100ms\n";
    let c = boot
        .file("/etc/plumb/plumb.toml", &config, 0o644)
        .file(
            "/etc/systemd/system/plumb.service.d/faults.conf",
            dropin,
            0o644,
        )
        .boot();

    // The first commit, then plumb as the package installs it.
    let mut content: BTreeMap<String, String> = BTreeMap::new();
    for (_, _, dirs) in KILL_SERVICES {
        for (_, link, file) in dirs {
            let path = kill_file(link, *file);
            up.write(&path, &format!("{path} first\n"));
            content.insert(path.clone(), format!("{path} first\n"));
        }
    }
    let first = up.commit("first");
    let mut expected: BTreeMap<&str, String> = KILL_SERVICES
        .iter()
        .map(|(name, _, _)| (*name, first.clone()))
        .collect();
    c.install_plumb(&[
        (Path::new(env!("CARGO_BIN_EXE_plumb")), "/usr/bin/plumb"),
        (
            Path::new(env!("CARGO_BIN_EXE_plumb-generator")),
            "/usr/lib/systemd/system-generators/plumb-generator",
        ),
    ]);
    let paths: Vec<String> = KILL_SERVICES
        .iter()
        .map(|(name, _, _)| format!("plumb-apply@{name}.path"))
        .collect();
    c.sh(&format!(
        "systemctl start {} plumb.service",
        paths.join(" ")
    ));
    // Every state file, read at random moments all along, from the host.
    let watcher = Watcher::start(c.root().join(CONTAINER_STATE));

    let main_pid = || c.try_sh("systemctl show -P MainPID plumb.service").1;
    let socket = c.root().join("run/plumb/plumb.sock");
    let converge =
        |what: &str, expected: &BTreeMap<&str, String>, content: &BTreeMap<String, String>| {
            let mut wrong = Vec::new();
            let converged = poll(DEADLINE, Duration::from_millis(20), || {
                wrong = not_converged(&c, expected, content);
                wrong.is_empty() && !matches!(main_pid().as_str(), "0" | "")
            });
            if !converged {
                let journal = c.journal("plumb.service");
                let lines: Vec<&str> = journal.lines().collect();
                panic!(
                    "seed {seed}: not converged after {what} within {DEADLINE:?}: {wrong:#?}\n\
                     services: {}\nplumb.service's journal (end):\n{}",
                    api(&socket, "GET", "/v1/services"),
                    lines[lines.len().saturating_sub(60)..].join("\n")
                );
            }
        };
    converge("the first start", &expected, &content);

    let mut kills = 0;
    for round in 0..rounds {
        // One or two commits, each changing the files of some services (or of none).
        for _ in 0..rng.usize(1..=2) {
            let mut touched = Vec::new();
            for (name, _, dirs) in KILL_SERVICES {
                if !rng.bool() {
                    continue;
                }
                // A non-empty subset of its dirs.
                let mask = rng.u32(1..1 << dirs.len());
                for (i, (_, link, file)) in dirs.iter().enumerate() {
                    if mask & (1 << i) != 0 {
                        let path = kill_file(link, *file);
                        let text = format!("{path} {round} {}\n", rng.u32(..));
                        up.write(&path, &text);
                        content.insert(path, text);
                    }
                }
                touched.push(name);
            }
            up.write("elsewhere", &format!("{round} {}\n", rng.u32(..)));
            let head = up.commit(&format!("round {round}: {touched:?}"));
            for name in touched {
                expected.insert(name, head.clone());
            }
        }
        // The kill lands anywhere in the next poll (500 ms), its fetch, checkouts and applies;
        // half of the time a second one lands while the restarted daemon catches up.
        std::thread::sleep(Duration::from_millis(rng.u64(0..900)));
        let before = main_pid();
        c.try_sh("systemctl kill -s KILL plumb.service");
        kills += 1;
        if rng.bool() {
            wait_until("plumb restarted", DEADLINE, || {
                let now = main_pid();
                now != before && now != "0" && !now.is_empty()
            });
            std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
            c.try_sh("systemctl kill -s KILL plumb.service");
            kills += 1;
        }
        converge(&format!("round {round}"), &expected, &content);
    }
    let (looks, bad) = watcher.finish();
    assert!(
        bad.is_empty(),
        "seed {seed}: half-written state files seen in {looks} looks: {bad:#?}"
    );
    // Temp files of killed writers are swept when plumb starts again.
    assert_eq!(
        temp_files(&c.root().join(CONTAINER_STATE)),
        Vec::<String>::new()
    );
    eprintln!(
        "kill -9: {rounds} rounds, {kills} kills, {looks} looks at the state files in {:?}",
        started.elapsed()
    );
    drop(gitd);
}

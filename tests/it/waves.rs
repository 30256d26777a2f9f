//! Rollout waves against a real Prometheus: three daemons (`--no-apply`, waves 0, 1 and 2, a 3 s
//! soak, polling every second) on one `file://` upstream, scraped every second by Debian's
//! `prometheus` on loopback. A good commit walks the waves in order, each wave deploying only
//! once the lower ones were on it and OK for the soak; a commit whose `check` fails in wave 0
//! holds the later waves, and the next good one walks through; a Prometheus that is down holds
//! them, saying so, and the rollout resumes once it is back (its gap not counted as soak); an
//! operator's promote opens the gate on one machine, once. A `--interval` longer than a soak
//! is refused like a bad config, at start and at a reload. The dashboard's wave panel is asked of
//! the same Prometheus. A machine that joins while a newer
//! commit waits takes the revision the lower waves are on, then follows the rollout. No root
//! needed.

use crate::support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use plumb::proto::ServiceStatus;
use support::{DEADLINE, Daemon, Upstream, accepts, free_port, own_group, temp_root, wait_until};

const SOAK: Duration = Duration::from_secs(3);

/// Debian's Prometheus on 127.0.0.1, scraping the daemons every second, its data in `root`.
struct Prometheus {
    port: u16,
    dir: PathBuf,
    process: Option<Daemon>,
}

impl Prometheus {
    fn new(root: &Path, targets: &[u16]) -> Prometheus {
        let dir = root.join("prometheus");
        fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: plumb\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let mut p = Prometheus {
            port: free_port(),
            dir,
            process: None,
        };
        p.start();
        p
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                self.dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's package)");
        self.process = Some(Daemon(child));
        let port = self.port;
        wait_until("Prometheus to listen", Duration::from_secs(30), || {
            accepts(port)
        });
    }

    fn stop(&mut self) {
        self.process = None;
    }

    /// The answer of an instant query, as JSON text.
    fn query(&self, expr: &str) -> String {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "--data-urlencode"])
            .arg(format!("query={expr}"))
            .arg(format!("{}/api/v1/query", self.url()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The query `ref_id` of the shipped dashboard's panel `id`, for every service.
fn dashboard_query(id: u64, ref_id: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana/plumb-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let panel = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap();
    let target = panel["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["refId"] == ref_id)
        .unwrap();
    target["expr"].as_str().unwrap().replace("$service", ".*")
}

/// One machine: a daemon with its own name, state directory, socket and metrics address.
struct Machine {
    name: String,
    state: PathBuf,
    socket: PathBuf,
    metrics: u16,
    process: Option<Daemon>,
}

impl Machine {
    fn new(root: &Path, name: &str) -> Machine {
        Machine {
            name: name.to_owned(),
            state: root.join(name).join("state"),
            socket: root.join(name).join("plumb.sock"),
            metrics: free_port(),
            process: None,
        }
    }

    fn start(&mut self, config: &Path) {
        self.start_with(config, &[]);
    }

    /// Starts the daemon with `extra` arguments (`--interval 1h`: a machine that fetches at
    /// start and then only when asked).
    fn start_with(&mut self, config: &Path, extra: &[&str]) {
        fs::create_dir_all(&self.state).unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.with_file_name("plumb.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_plumb"))
            .arg("-c")
            .arg(config)
            .args(["--hosts", &self.name, "--no-apply", "--state-dir"])
            .arg(&self.state)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--metrics-address")
            .arg(format!("127.0.0.1:{}", self.metrics))
            .args(extra)
            .env("PLUMB_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut daemon = Daemon(child);
        // This daemon's own listener, not just anything on the port: one that could not bind it
        // says so with its log at once.
        let (port, pid) = (self.metrics, daemon.pid());
        wait_until("the daemon's metrics", DEADLINE, || {
            if let Some(status) = daemon.0.try_wait().unwrap() {
                panic!("{} exited ({status}):\n{}", self.name, self.log());
            }
            support::listening_ports(pid).contains(&port)
        });
        self.process = Some(daemon);
    }

    fn rev(&self) -> Option<String> {
        fs::read_to_string(self.state.join("state/app.rev"))
            .ok()
            .map(|r| r.trim().to_owned())
    }

    /// When the `.rev` file was last written.
    fn rev_time(&self) -> SystemTime {
        fs::metadata(self.state.join("state/app.rev"))
            .and_then(|m| m.modified())
            .unwrap()
    }

    fn status(&self) -> Option<ServiceStatus> {
        serde_json::from_str(&api(&self.socket, "GET", "/v1/services/app", None)).ok()
    }

    fn notes(&self) -> String {
        self.status()
            .map(|s| s.notes.join("\n"))
            .unwrap_or_default()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.state.with_file_name("plumb.log")).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{}/metrics", self.metrics))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn api(socket: &Path, method: &str, path: &str, body: Option<&str>) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "20", "-X", method, "--unix-socket"])
        .arg(socket)
        .args(["-H", "content-type: application/json"]);
    if let Some(body) = body {
        cmd.args(["-d", body]);
    }
    let out = cmd.arg(format!("http://plumb{path}")).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn config(root: &Path, upstream: &str, prometheus: &str) -> PathBuf {
    config_of(
        root,
        upstream,
        prometheus,
        &[("m0", 0), ("m1", 1), ("m2", 2)],
    )
}

/// Machines named `names` under `root`, and a Prometheus scraping their metrics.
fn scraped_machines(root: &Path, names: &[&str]) -> (Vec<Machine>, Prometheus) {
    let machines: Vec<Machine> = names.iter().map(|n| Machine::new(root, n)).collect();
    let ports: Vec<u16> = machines.iter().map(|m| m.metrics).collect();
    let prometheus = Prometheus::new(root, &ports);
    (machines, prometheus)
}

/// The config of `machines` (name, wave), each running `app` with a soak of [`SOAK`].
fn config_of(root: &Path, upstream: &str, prometheus: &str, machines: &[(&str, u32)]) -> PathBuf {
    let group = own_group();
    let mut text = format!(
        "[plumb]\ninterval = \"1s\"\nprometheus = {prometheus:?}\n\
         prometheus_scrape_interval = \"1s\"\nadmin_group = {group:?}\nreadonly_group = {group:?}\n\n\
         [global]\nupstream = {upstream:?}\n"
    );
    for &(machine, wave) in machines {
        text.push_str(&format!(
            "\n[[services]]\nmachine = \"{machine}\"\nservice = \"app\"\n\
             check = \"test ! -e {{dir}}/bad\"\ndirs = [{{ local = \"/srv/app\", link = \"app\" }}]\n"
        ));
        if wave > 0 {
            text.push_str(&format!("wave = {wave}\nsoak = \"{}s\"\n", SOAK.as_secs()));
        }
    }
    let path = root.join("plumb.toml");
    fs::write(&path, text).unwrap();
    path
}

fn on(machine: &Machine, revision: &str) -> bool {
    machine.rev().as_deref() == Some(revision)
}

/// Waits for `machine` to be on `revision`, panicking with every log when it is not in time.
fn wait_on(machines: &[Machine], i: usize, revision: &str) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while !on(&machines[i], revision) {
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = machines
                .iter()
                .map(|m| format!("--- {}: {:?}\n{}", m.name, m.status(), m.log()))
                .collect();
            panic!(
                "{} not on {revision} in time:\n{}",
                machines[i].name,
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every one of `needles` is in `machine`'s notes; panics with the notes if not.
fn wait_notes(machine: &Machine, what: &str, needles: &[String]) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let notes = machine.notes();
        if needles.iter().all(|n| notes.contains(n.as_str())) {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}: {needles:?} not all in {}'s notes:\n{notes}\n{:?}",
                machine.name,
                machine.status()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that `later` was written at least the soak after `earlier`.
fn soaked(earlier: SystemTime, later: SystemTime, what: &str) {
    let gap = later.duration_since(earlier).unwrap_or_default();
    assert!(gap >= SOAK, "{what}: only {gap:?} after the wave before");
}

#[test]
fn a_rollout_walks_the_waves_and_holds_on_what_prometheus_knows() {
    let root = temp_root();
    let root = std::path::absolute(root.path()).unwrap();
    let up = Upstream::new(&root, "fleet");
    let (mut machines, mut prometheus) = scraped_machines(&root, &["m0", "m1", "m2"]);
    let config = config(&root, &up.file_url(), &prometheus.url());
    for m in &mut machines {
        m.start(&config);
    }

    // A good commit walks the waves in order, each one the soak after the one before.
    up.write("app/conf", "1");
    let c1 = up.commit("one");
    for i in 0..3 {
        wait_on(&machines, i, &c1);
    }
    let times: Vec<SystemTime> = machines.iter().map(Machine::rev_time).collect();
    soaked(times[0], times[1], "m1 on the first commit");
    soaked(times[1], times[2], "m2 on the first commit");
    // The dashboard's wave panel, asked of this Prometheus: one machine per wave, on c1.
    let panel = dashboard_query(8, "A");
    wait_until("the wave panel to show each wave on c1", DEADLINE, || {
        let answer = prometheus.query(&panel);
        (0..3).all(|w| {
            answer.contains(&format!(
                "{{\"hash\":\"{c1}\",\"service\":\"app\",\"wave\":\"{w}\"}},\"value\":["
            ))
        }) && answer.matches("\"1\"]").count() == 3
    });
    // Every per-service series carries the machine, so the gate does not depend on scrape labels.
    assert!(
        machines[1]
            .metrics()
            .contains("plumb_service_state{machine=\"m1\",service=\"app\",state=\"OK\"} 1"),
        "{}",
        machines[1].metrics()
    );

    // A commit whose check fails in wave 0 holds the later waves, and they say who blocks.
    up.write("app/bad", "x");
    let c2 = up.commit("bad");
    let short1 = &c1[..12];
    wait_until("m1 to wait for m0, BROKEN", DEADLINE, || {
        machines[1]
            .notes()
            .contains(&format!("waiting for wave 0: m0 BROKEN on {short1}"))
    });
    let status = machines[1].status().unwrap();
    assert_eq!(
        (status.state, status.deployed.as_deref()),
        (plumb::proto::State::Ok, Some(c1.as_str()))
    );
    assert!(
        status.notes.iter().any(|n| n.contains("min_over_time(")),
        "the note shows the gate's query: {:?}",
        status.notes
    );
    assert!(
        machines[1]
            .metrics()
            .contains("plumb_service_rollout_waiting{machine=\"m1\",service=\"app\"} 1")
    );
    let waiting = dashboard_query(8, "B");
    let series = format!("{{\"hash\":\"{c1}\",\"service\":\"app\",\"wave\":\"1\"}}");
    wait_until("the wave panel to count m1 waiting on c1", DEADLINE, || {
        let answer = prometheus.query(&waiting);
        answer.find(&series).is_some_and(|i| {
            answer[i..]
                .split_once(']')
                .is_some_and(|(v, _)| v.ends_with("\"1\""))
        })
    });
    assert!(on(&machines[2], &c1));
    assert_eq!(
        machines[0].status().unwrap().state,
        plumb::proto::State::Broken
    );

    // The next good commit walks through.
    up.remove("app/bad");
    up.write("app/conf", "3");
    let c3 = up.commit("three");
    for i in 0..3 {
        wait_on(&machines, i, &c3);
    }
    let times: Vec<SystemTime> = machines.iter().map(Machine::rev_time).collect();
    soaked(times[0], times[1], "m1 on the third commit");
    soaked(times[1], times[2], "m2 on the third commit");
    assert!(machines.iter().all(|m| m.rev() != Some(c2.clone())));
    wait_until("m1's waiting gauge back at 0", DEADLINE, || {
        machines[1]
            .metrics()
            .contains("plumb_service_rollout_waiting{machine=\"m1\",service=\"app\"} 0")
    });

    // Prometheus down: the later waves hold and say so.
    prometheus.stop();
    up.write("app/conf", "4");
    let c4 = up.commit("four");
    wait_on(&machines, 0, &c4);
    let url = prometheus.url();
    wait_until("m1 to say Prometheus does not answer", DEADLINE, || {
        machines[1]
            .notes()
            .contains(&format!("waiting: Prometheus at {url} did not answer"))
    });
    assert!(on(&machines[1], &c3) && on(&machines[2], &c3));
    // Back: the rollout resumes, the gap not counted as soak.
    std::thread::sleep(Duration::from_secs(1));
    prometheus.start();
    let back = SystemTime::now();
    for i in 1..3 {
        wait_on(&machines, i, &c4);
    }
    soaked(
        back,
        machines[1].rev_time(),
        "m1 after Prometheus came back",
    );
    soaked(
        machines[1].rev_time(),
        machines[2].rev_time(),
        "m2 after Prometheus came back",
    );

    // An operator's promote opens the gate on one machine, once. m0 frozen keeps c4, so m1 and
    // m2 wait for it on c5.
    let frozen = api(
        &machines[0].socket,
        "POST",
        "/v1/services/app/freeze",
        Some("{}"),
    );
    assert!(frozen.contains("\"ok\":true"), "{frozen}");
    up.write("app/conf", "5");
    let c5 = up.commit("five");
    let short4 = &c4[..12];
    let short5 = &c5[..12];
    wait_notes(
        &machines[1],
        "m1 to wait for m0, frozen on c4",
        &[
            format!("waiting for wave 0: m0 FREEZE on {short4}"),
            format!("plumbctl promote app lets {short5} through here"),
        ],
    );
    let promoted = api(
        &machines[1].socket,
        "POST",
        "/v1/services/app/promote",
        Some("{}"),
    );
    assert!(promoted.contains("\"ok\":true"), "{promoted}");
    wait_on(&machines, 1, &c5);
    assert!(on(&machines[0], &c4));
    wait_until("m2 to wait for m0 on c5", DEADLINE, || {
        machines[2]
            .notes()
            .contains(&format!("waiting for wave 0: m0 FREEZE on {short4}"))
    });
    assert!(on(&machines[2], &c4));
    // Once: the next commit waits again on m1.
    up.write("app/conf", "6");
    let c6 = up.commit("six");
    let short6 = &c6[..12];
    wait_until("m1 to wait for m0 on c6", DEADLINE, || {
        machines[1]
            .notes()
            .contains(&format!("plumbctl promote app lets {short6} through here"))
    });
    assert!(on(&machines[1], &c5));
}

#[test]
fn a_new_machine_takes_what_the_lower_waves_run_while_a_newer_commit_waits() {
    let root = temp_root();
    let root = std::path::absolute(root.path()).unwrap();
    let up = Upstream::new(&root, "fleet");
    let (mut machines, _prometheus) = scraped_machines(&root, &["m0", "m1", "m3"]);
    let config = config_of(
        &root,
        &up.file_url(),
        &_prometheus.url(),
        &[("m0", 0), ("m1", 1), ("m3", 2)],
    );

    // The lower waves on A. m0 fetches at start and then only when asked, so it stays on A.
    up.write("app/conf", "A");
    let a = up.commit("A");
    machines[0].start_with(&config, &["--interval", "1h"]);
    machines[1].start(&config);
    wait_on(&machines, 0, &a);
    wait_on(&machines, 1, &a);

    // B waits at m1 for m0, which has not fetched it.
    up.write("app/conf", "B");
    let b = up.commit("B");
    let (short_a, short_b) = (&a[..12], &b[..12]);
    wait_notes(
        &machines[1],
        "m1 to hold B",
        &[format!(
            "waiting for wave 0: m0 on {short_a}, not {short_b}"
        )],
    );

    // A machine joining wave 2 now takes A, where the lower waves are soaked, not nothing and
    // not B; it says B waits, and that it is one change behind.
    let joined = SystemTime::now();
    machines[2].start(&config);
    wait_on(&machines, 2, &a);
    assert!(on(&machines[1], &a) && on(&machines[0], &a));
    soaked(
        machines[1].rev_time(),
        machines[2].rev_time(),
        "m3 on A after m1",
    );
    assert!(machines[2].rev_time() >= joined);
    wait_until(
        "m3 to say B waits and it is behind by one",
        DEADLINE,
        || {
            machines[2].status().is_some_and(|s| {
                s.behind == Some(1)
                    && s.notes.iter().any(|n| {
                        n.contains(&format!("plumbctl promote app lets {short_b} through here"))
                    })
            })
        },
    );
    assert!(
        machines[2]
            .log()
            .contains("nothing deployed yet: taking the revision the lower waves are on"),
        "{}",
        machines[2].log()
    );

    // Once m0 fetches B, the rollout walks the waves as usual, m3 last.
    let pulled = api(
        &machines[0].socket,
        "POST",
        "/v1/services/app/pull",
        Some("{}"),
    );
    assert!(pulled.contains("\"ok\":true"), "{pulled}");
    for i in 0..3 {
        wait_on(&machines, i, &b);
    }
    let times: Vec<SystemTime> = machines.iter().map(Machine::rev_time).collect();
    soaked(times[0], times[1], "m1 on B");
    soaked(times[1], times[2], "m3 on B");
}

/// A checkout cut short (its `.deploying` mark left, a file half written) is rewritten whole at
/// the next fetch, through the gate a deploy of the head passes: while the head waits for the
/// lower wave, the checkout goes back to the last revision saved, not on to the head.
#[test]
fn a_checkout_cut_short_goes_back_to_the_last_saved_revision_while_the_head_waits() {
    let root = temp_root();
    let root = std::path::absolute(root.path()).unwrap();
    let up = Upstream::new(&root, "fleet");
    let (mut machines, prometheus) = scraped_machines(&root, &["m0", "m1"]);
    let config = config_of(
        &root,
        &up.file_url(),
        &prometheus.url(),
        &[("m0", 0), ("m1", 1)],
    );
    up.write("app/conf", "A");
    let a = up.commit("A");
    // m0 fetches at start and then only when asked, so it stays on A.
    machines[0].start_with(&config, &["--interval", "1h"]);
    machines[1].start(&config);
    wait_on(&machines, 0, &a);
    wait_on(&machines, 1, &a);

    // m1 stops in the middle of a checkout: its mark stays, a file is half written.
    machines[1].process = None;
    let live = machines[1].state.join("checkouts/app/app/conf");
    let mark = machines[1].state.join("state/app.deploying");
    fs::write(&live, "B, half").unwrap();
    fs::write(&mark, "0000000000000000000000000000000000000000\n").unwrap();
    up.write("app/conf", "B");
    let b = up.commit("B");

    machines[1].start(&config);
    wait_until("m1's checkout to be whole again", DEADLINE, || {
        fs::read_to_string(&live).is_ok_and(|c| c == "A") && !mark.exists()
    });
    assert!(on(&machines[1], &a), "{}", machines[1].log());
    wait_notes(
        &machines[1],
        "m1 to hold B",
        &[format!(
            "waiting for wave 0: m0 on {}, not {}",
            &a[..12],
            &b[..12]
        )],
    );
    assert_eq!(fs::read_to_string(&live).unwrap(), "A");
    assert!(on(&machines[1], &a));
}

/// A soak shorter than the daemon's `--interval` could not be seen by its polls: refused like
/// a bad config, where the soak is set, at start (the daemon exits) and at a reload (the daemon
/// keeps the config it runs, saying why).
#[test]
fn an_interval_longer_than_a_soak_is_refused_at_start_and_at_reload() {
    let root = temp_root();
    let root = std::path::absolute(root.path()).unwrap();
    let up = Upstream::new(&root, "fleet");
    up.write("app/conf", "1");
    up.commit("one");
    // Nothing listens there: the gate is never asked in this test.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let config = config_of(&root, &up.file_url(), &nowhere, &[("m0", 0), ("m1", 1)]);
    let mut m1 = Machine::new(&root, "m1");

    fs::create_dir_all(&m1.state).unwrap();
    let mut refused = Command::new(env!("CARGO_BIN_EXE_plumb"))
        .arg("-c")
        .arg(&config)
        .args([
            "--hosts",
            "m1",
            "--no-apply",
            "--interval",
            "10s",
            "--state-dir",
        ])
        .arg(&m1.state)
        .arg("--socket")
        .arg(&m1.socket)
        .arg("--metrics-address")
        .arg(format!("127.0.0.1:{}", m1.metrics))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the daemon to refuse to start", DEADLINE, || {
        refused.try_wait().unwrap().is_some()
    });
    let out = refused.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "services[1].soak: 3s must be at least one poll interval (10s from --interval)"
        ),
        "{stderr}"
    );

    // Accepted with a soak of at least --interval; a reload that shortens it is refused, and
    // the daemon goes on with what it runs.
    m1.start_with(&config, &["--interval", "2s"]);
    let text = fs::read_to_string(&config).unwrap();
    fs::write(&config, text.replace("soak = \"3s\"", "soak = \"1s\"")).unwrap();
    let pid = nix::unistd::Pid::from_raw(m1.process.as_ref().unwrap().0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_notes(
        &m1,
        "the reload to be refused",
        &[
            "config refused, running on the last accepted one: ".to_owned(),
            "services[1].soak: 1s must be at least one poll interval (2s from --interval)"
                .to_owned(),
        ],
    );
    assert!(m1.process.as_mut().unwrap().0.try_wait().unwrap().is_none());
}

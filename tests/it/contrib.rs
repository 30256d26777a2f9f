//! The monitoring files shipped in `contrib/`: the alert rules pass `promtool check rules` and their
//! own `promtool test rules` cases (each alert fires when it should and not before), and every
//! query of the Grafana dashboard is PromQL that `promtool` accepts, on metrics plumb exports.

use std::path::Path;
use std::process::Command;

use plumb::git::Oid;
use plumb::metrics::Metrics;

fn contrib(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path)
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(contrib("prometheus"))
        .output()
        .expect("promtool (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_are_valid_and_fire_when_they_should() {
    promtool(&["check", "rules", "plumb-alerts.yml"]);
    promtool(&["test", "rules", "plumb-alerts.test.yml"]);
}

/// The metric names plumb exports, every one given a series first.
fn exported() -> Vec<String> {
    let m = Metrics::new();
    let s = plumb::service::Service::deployed_at(Oid::from_bytes(&[1; 20]).unwrap(), 1);
    m.service("nginx", "web1", 1, &s, Some(0));
    m.fetched(
        "https://git.example.org/ops.git",
        true,
        std::time::Duration::from_millis(3),
    );
    m.applied("nginx", true);
    m.render()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_dashboard_queries_only_metrics_plumb_exports() {
    let text = std::fs::read_to_string(contrib("grafana/plumb-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dashboard["uid"], "plumb-rollouts");
    let exported = exported();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 5);
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let mut queried = 0;
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("plumb_") {
                    continue;
                }
                let name = word.strip_suffix("_bucket").unwrap_or(word);
                assert!(
                    exported.iter().any(|e| e == name),
                    "panel {:?} queries {name}, which plumb does not export ({exported:?})",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 7, "{queried}");
    // The rollout view is there: machines per deployed hash, and per wave.
    assert!(text.contains("count by (service, hash) (plumb_service_hash"));
    assert!(text.contains("count by (service, wave, hash) (plumb_service_hash"));
    assert!(
        text.contains("group_left (wave) max by (service, machine, wave) (plumb_service_wave_info")
    );
}

/// Every query of the dashboard parses: each one, with Grafana's variables filled in, as a
/// recording rule that `promtool check rules` reads.
#[test]
fn the_dashboards_queries_are_promql() {
    let text = std::fs::read_to_string(contrib("grafana/plumb-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$service", ".*")
                .replace("$__rate_interval", "5m");
            rules.push_str(&format!(
                "      - record: dashboard_panel_{}_{}\n        expr: {}\n",
                panel["id"],
                target["refId"].as_str().unwrap(),
                serde_json::Value::String(expr)
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    promtool(&["check", "rules", file.to_str().unwrap()]);
}

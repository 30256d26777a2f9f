//! The config file: any text, as `Config::parse` reads `/etc/plumb/plumb.toml`, then, when it is
//! valid, everything the daemon and the generator derive from it. Nothing may panic, and the
//! generator's output must stay inside its directory with one setting per line, whatever the
//! config says (a service name or a path must not smuggle in a `..`, a newline or a section).

#![no_main]

use std::path::{Component, Path};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use plumb::config::Config;
use plumb::generator::{self, Output};

const PATH: &str = "/etc/plumb/plumb.toml";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The generator's path helpers take any string from the config.
    for line in text.lines().take(8) {
        let _ = generator::escape_path(line);
        let _ = generator::mount_unit_name(line);
        let _ = generator::unit_path(line);
        let _ = generator::unit_value(line);
        let _ = plumb::config::normalise_link(line);
        let _ = plumb::config::parse_metrics_address(line);
    }
    let config = match Config::parse(Path::new(PATH), &text) {
        Ok(c) => c,
        Err(e) => {
            // Errors turn byte offsets into lines and columns: the formatting is part of parsing.
            let _ = e.to_string();
            return;
        }
    };
    // Every machine of the file, so every service is selected and generated.
    let mut hosts: Vec<String> = config.services.iter().map(|s| s.machine.clone()).collect();
    hosts.sort();
    hosts.dedup();
    // The daemon and apply schedule with `Instant::now() + duration`: every duration must fit.
    let fits = |d: Duration| Instant::now().checked_add(d.saturating_mul(2)).is_some();
    let st = &config.settings;
    for d in [st.interval, st.jitter_for(st.interval), st.fetch_timeout] {
        assert!(fits(d), "duration {d:?} in [plumb] overflows an Instant");
    }
    for s in &config.services {
        let check = s.check.as_ref().map(|c| c.timeout);
        let health = s.health.as_ref().map(|h| [h.settle, h.timeout]);
        for d in check.into_iter().chain(health.into_iter().flatten()) {
            assert!(fits(d), "duration {d:?} of {} overflows an Instant", s.name);
        }
        let _ = s.unit();
        let _ = s.links();
        let _ = s.checkout_dir();
        let _ = config.settings.upstream(&s.upstream);
        let _ = plumb::git::redact_url(&s.upstream);
        let _ = plumb::git::store_id(&s.upstream);
        let _ = plumb::git::repository_key(&s.upstream);
    }
    let _ = plumb::api::machines(&config, hosts.clone());
    if let Err(e) = config.select(&hosts) {
        let _ = e.to_string();
    }
    match generator::generate(&config, &hosts) {
        Ok(outputs) => {
            for o in &outputs {
                check_output(o);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

/// A generated file: a relative path of plain components, and unit-file text in which every line
/// is a comment, a section header or one `Key=value` setting.
fn check_output(o: &Output) {
    let inside = |p: &Path| {
        p.components().count() > 0 && p.components().all(|c| matches!(c, Component::Normal(_)))
    };
    assert!(inside(o.path()), "generated path escapes: {:?}", o.path());
    match o {
        Output::File { content, .. } => {
            for line in content.lines() {
                let ok = line.is_empty()
                    || line.starts_with('#')
                    || (line.starts_with('[') && line.ends_with(']'))
                    || line.split_once('=').is_some_and(|(k, _)| {
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric())
                    });
                assert!(ok, "line {line:?} of {:?} is not a setting", o.path());
                assert!(!line.contains('\r'), "carriage return in {:?}", o.path());
            }
        }
        Output::Symlink { target, .. } => {
            let mut parts = target.components();
            assert_eq!(parts.next(), Some(Component::ParentDir), "{target:?}");
            assert!(
                parts.clone().count() == 1 && parts.all(|c| matches!(c, Component::Normal(_))),
                "symlink target {target:?}"
            );
        }
    }
}

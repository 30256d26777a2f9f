//! What plumbctl reads from others: the daemon's HTTP answer on the unix socket
//! (`ctl::parse_response`, then `ctl::read_answer` for every action), a remote plumbctl's `--json`
//! output through ssh (`ctl::parse_remote`), and everything rendered from them (tables, status
//! blocks, `--json`). A broken or malicious peer must get an error, never a panic.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use plumb::ctl::{self, Action, HttpResponse, ListWhat, Report};
use plumb::exec::Output;

const NOWS: [u64; 3] = [0, 1_700_000_000, u64::MAX];

fn actions() -> Vec<Action> {
    let service = || "nginx".to_owned();
    vec![
        Action::List(ListWhat::Machines),
        Action::List(ListWhat::Services),
        Action::Status { service: service() },
        Action::Freeze {
            service: service(),
            duration: Some("1h".into()),
        },
        Action::Unfreeze { service: service() },
        Action::Rollback {
            service: service(),
            hash: "abc".into(),
        },
        Action::Pull {
            service: service(),
            force: false,
        },
        Action::Wipe { service: service() },
        Action::Diff { service: service() },
        Action::Log { limit: Some(5) },
    ]
}

fuzz_target!(|data: &[u8]| {
    let socket = Path::new("/run/plumb/plumb.sock");
    let framed = ctl::parse_response(data);
    // The body alone as a 200 answer too: valid JSON rarely survives HTTP framing by chance.
    let bare = HttpResponse {
        status: 200,
        body: data.to_vec(),
    };
    let text = String::from_utf8_lossy(data).into_owned();
    for action in actions() {
        let mut reports = Vec::new();
        if let Ok(response) = &framed {
            reports.push(report("local", ctl::read_answer(socket, &action, response)));
        }
        reports.push(report("bare", ctl::read_answer(socket, &action, &bare)));
        for code in [Some(0), Some(1), None] {
            let output = Output {
                code,
                stdout: text.clone(),
                stderr: text.clone(),
            };
            reports.push(report("remote", ctl::parse_remote(&action, &output)));
        }
        let _ = ctl::render_json(&reports);
        let _ = ctl::exit_code(&reports);
        for now in NOWS {
            for with_machine in [false, true] {
                for verbose in [false, true] {
                    let view = ctl::View {
                        with_machine,
                        verbose,
                        clock: ctl::Clock {
                            now,
                            zone: jiff::tz::TimeZone::fixed(jiff::tz::offset(-5)),
                        },
                    };
                    let _ = ctl::render_text(&action, &reports, &view);
                }
            }
        }
    }
});

fn report(machine: &str, outcome: Result<ctl::Body, ctl::CtlError>) -> Report {
    Report {
        machine: machine.to_owned(),
        outcome,
    }
}

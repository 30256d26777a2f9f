//! `plumbctl`: the operator's client. The control API arrives with a later change; until then this
//! prints what it will do.

use clap::Parser;

/// Freeze, unfreeze, roll back and inspect services managed by plumb (not available yet).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!(
        "plumbctl: the control API is not built yet; `plumb --once` and the state directory show what plumb did"
    );
    std::process::exit(2);
}

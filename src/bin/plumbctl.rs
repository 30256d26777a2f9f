//! `plumbctl`: the operator's client of plumb's control API, here or on other machines through ssh.
//! Argument wiring and exit codes only; `plumb::ctl` does the work.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use plumb::ctl;
use plumb::error::Chain;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("plumbctl: {}", Chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let args = match ctl::utf8_args(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(bad) => {
            eprintln!("plumbctl: argument {bad:?} is not UTF-8");
            return Ok(ExitCode::from(2));
        }
    };
    // The shells' completion scripts ask this hidden command for the candidates of a word.
    if args.first().map(String::as_str) == Some(ctl::complete::COMMAND) {
        let mut out = std::io::stdout().lock();
        for candidate in ctl::complete::candidates(&args[1..]) {
            if writeln!(out, "{candidate}").is_err() {
                break;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let split = match ctl::split_hosts(&args) {
        Ok(split) => split,
        Err(e) => {
            eprintln!("plumbctl: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    // Exits with status 2 on a usage error, 0 for --help and --version.
    let cli = ctl::Cli::parse_from(std::iter::once("plumbctl".to_owned()).chain(split.words));
    let settings = ctl::Settings::from_env(cli.socket.as_deref());
    let reports = ctl::run(&cli.action, &split.hosts, &settings)?;
    let (stdout, stderr) = if cli.json {
        (ctl::render_json(&reports), String::new())
    } else {
        let view = ctl::View {
            with_machine: !split.hosts.is_empty(),
            verbose: cli.verbose,
            clock: ctl::Clock::system(),
        };
        let text = ctl::render_text(&cli.action, &reports, &view);
        (text.stdout, text.stderr)
    };
    // A closed pipe (`plumbctl ... | head`) is not worth a panic.
    let _ = std::io::stderr().write_all(stderr.as_bytes());
    std::io::stdout()
        .write_all(stdout.as_bytes())
        .and_then(|()| std::io::stdout().flush())
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => Ok(()),
            _ => Err(e),
        })
        .context("writing the answer")?;
    Ok(ExitCode::from(ctl::exit_code(&reports)))
}

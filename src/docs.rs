//! Man pages and shell completions, generated from the clap definitions of `plumb` ([`crate::cli`])
//! and `plumbctl` ([`crate::ctl`]), so the installed documentation says what the binaries accept.
//!
//! Nothing here runs in the binaries: `cargo run --example gen-docs -- DIR` (and `make docs`, and the
//! Debian packaging) calls [`write_docs`]. Each binary gets one page in section 8 with every
//! subcommand in it (rather than clap_mangen's default of one page per subcommand), plus bash, zsh
//! and fish completions. `plumb.toml(5)` is written by hand (`man/plumb.toml.5`) and copied along,
//! so the output directory holds everything a package installs.

use std::fs;
use std::io;
use std::path::Path;

use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::{Generator, Shell};
use clap_mangen::Man;
use clap_mangen::roff::{Inline, Roff, bold, italic, roman};

/// The configuration file's page, kept in the repository (it documents TOML keys, not arguments).
const PLUMB_TOML_5: &str = include_str!("../man/plumb.toml.5");

/// The pages of the set, as `name(section)`; each page's SEE ALSO names the others.
const PAGES: &[&str] = &["plumb(8)", "plumbctl(8)", "plumb.toml(5)"];

/// The shells completions are written for: the three whose completion directories Debian packages
/// install into.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// The clap commands of the binaries that have one: `plumb` and `plumbctl`. `plumb-generator` takes
/// no arguments (systemd runs it), so it has none.
pub fn commands() -> Vec<Command> {
    vec![crate::cli::Cli::command(), crate::ctl::Cli::command()]
}

/// Writes `man/plumb.8`, `man/plumbctl.8`, `man/plumb.toml.5` and, under `completions/`,
/// `plumb.bash`, `_plumb`, `plumb.fish` and the same three for plumbctl into `out_dir` (created
/// when missing), replacing what is there. Errors name the file.
pub fn write_docs(out_dir: &Path) -> io::Result<()> {
    let man_dir = out_dir.join("man");
    let completion_dir = out_dir.join("completions");
    for dir in [&man_dir, &completion_dir] {
        fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
    }
    for cmd in commands() {
        let name = cmd.get_name().to_owned();
        let page = man_dir.join(format!("{name}.8"));
        fs::write(&page, man_page(cmd.clone())).map_err(|e| at(&page, e))?;
        for shell in SHELLS {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut script);
            let file = completion_dir.join(shell.file_name(&name));
            fs::write(&file, script).map_err(|e| at(&file, e))?;
        }
    }
    let toml_page = man_dir.join("plumb.toml.5");
    fs::write(&toml_page, PLUMB_TOML_5).map_err(|e| at(&toml_page, e))
}

/// The section 8 page for `cmd`, in roff: clap_mangen's title, NAME and SYNOPSIS, this module's
/// DESCRIPTION, clap_mangen's OPTIONS, then a COMMANDS section with each subcommand's synopsis, description and arguments,
/// the command's after-help as NOTES, and SEE ALSO.
pub fn man_page(cmd: Command) -> Vec<u8> {
    // `help` is a subcommand clap adds; the page documents `--help` already.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_owned();
    let man = Man::new(cmd.clone())
        .title(name.to_uppercase())
        .section("8")
        .manual("System Manager's Manual");
    let mut out = Vec::new();
    // Writing to a Vec cannot fail; the results are the writer's.
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);
    let _ = man.render_synopsis_section(&mut out);
    // clap_mangen's DESCRIPTION would repeat the one-line about of NAME (there is no long about);
    // the page says what --help has no room for instead.
    if let Some(text) = description(&name) {
        let mut roff = Roff::new();
        roff.control("SH", ["DESCRIPTION"]);
        for paragraph in text {
            roff.control("PP", []).text([roman(*paragraph)]);
        }
        let _ = roff.to_writer(&mut out);
    }
    let _ = man.render_options_section(&mut out);

    let mut roff = Roff::new();
    if cmd.has_subcommands() {
        roff.control("SH", ["COMMANDS"]);
        subcommands(&mut roff, &cmd, &name);
    }
    if let Some(notes) = cmd.get_after_long_help().or_else(|| cmd.get_after_help()) {
        roff.control("SH", ["NOTES"]);
        // Indented lines are examples: each on its own line, as in --help.
        for line in notes.to_string().lines() {
            if line.starts_with(' ') {
                roff.control("RS", []).control("nf", []);
                roff.text([roman(line.trim())]);
                roff.control("fi", []).control("RE", []);
            } else {
                roff.control("PP", []).text([roman(line)]);
            }
        }
    }
    roff.control("SH", ["SEE ALSO"]);
    let own = format!("{name}(8)");
    let others: Vec<&str> = PAGES.iter().copied().filter(|p| *p != own).collect();
    let mut line = Vec::new();
    for (i, page) in others.iter().enumerate() {
        let (page_name, section) = page.split_once('(').unwrap_or((page, ""));
        line.push(bold(page_name));
        let sep = if i + 1 < others.len() { ", " } else { "" };
        line.push(roman(format!("({section}{sep}")));
    }
    roff.text(line);
    let _ = roff.to_writer(&mut out);
    let _ = man.render_version_section(&mut out);
    out
}

/// The DESCRIPTION of a binary's page, by paragraph: how it behaves as a whole, which the help of
/// its arguments does not say.
fn description(name: &str) -> Option<&'static [&'static str]> {
    match name {
        "plumb" => Some(&[
            "Without a command, plumb is the daemon. It polls each upstream every interval, keeps \
             each service's checkout at the last commit that changed the service's files, and has \
             systemd apply each new revision (plumb-apply@SERVICE.service), which reloads the \
             unit only when its files changed. SIGHUP re-reads the configuration, keeping the \
             running one if the new one is wrong; SIGTERM stops the daemon between two steps.",
            "Logs go to standard error; PLUMB_LOG sets their filter (for example debug).",
        ]),
        "plumbctl" => Some(&[
            "plumbctl asks the local daemon's control API, on its unix socket; the caller's unix \
             groups decide what it may do. With @host arguments it runs plumbctl --json on each \
             host through ssh instead, all at once, and merges the answers into one table.",
            "Exit status: 0 when every machine answered and every change worked, 1 when one was \
             refused, failed or could not be reached, 2 for a usage error.",
        ]),
        _ => None,
    }
}

/// One `.SS` per runnable subcommand of `cmd`, depth first; `path` is how the user types `cmd`
/// (`plumbctl list`). A subcommand with subcommands of its own (`list`) is a prefix of theirs.
fn subcommands(roff: &mut Roff, cmd: &Command, path: &str) {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let path = format!("{path} {}", sub.get_name());
        if sub.has_subcommands() {
            subcommands(roff, sub, &path);
            continue;
        }
        let args: Vec<&Arg> = sub.get_arguments().filter(|a| own_arg(a)).collect();
        // The synopsis, as the heading: `plumbctl pull [--force] service`.
        let mut heading = vec![bold(path)];
        for arg in args.iter().filter(|a| !a.is_positional()) {
            heading.push(roman(" ["));
            heading.extend(option_label(arg));
            heading.push(roman("]"));
        }
        for arg in args.iter().filter(|a| a.is_positional()) {
            heading.push(roman(" "));
            heading.extend(positional_label(arg));
        }
        roff.control("SS", []).text(heading);
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            roff.text([roman(about.to_string())]);
        }
        for arg in args {
            roff.control("TP", []);
            if arg.is_positional() {
                roff.text(positional_label(arg));
            } else {
                roff.text(option_label(arg));
            }
            let help = arg
                .get_long_help()
                .or_else(|| arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            roff.text([roman(help)]);
        }
    }
}

/// An argument of the subcommand itself: not a global option (the OPTIONS section has those), not
/// `--help`, not hidden.
fn own_arg(arg: &Arg) -> bool {
    !arg.is_hide_set()
        && !arg.is_global_set()
        && !matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        )
}

/// `service`, or `[duration]` when it may be left out.
fn positional_label(arg: &Arg) -> Vec<Inline> {
    let name = italic(value_name(arg).to_lowercase());
    if arg.is_required_set() {
        vec![name]
    } else {
        vec![roman("["), name, roman("]")]
    }
}

/// `-c, --config FILE`, or `--force` for a flag.
fn option_label(arg: &Arg) -> Vec<Inline> {
    let mut label = Vec::new();
    if let Some(short) = arg.get_short() {
        label.push(bold(format!("-{short}")));
    }
    if let Some(long) = arg.get_long() {
        if !label.is_empty() {
            label.push(roman(", "));
        }
        label.push(bold(format!("--{long}")));
    }
    if arg.get_action().takes_values() {
        label.push(roman(" "));
        label.push(italic(value_name(arg)));
    }
    label
}

fn value_name(arg: &Arg) -> String {
    arg.get_value_names()
        .map(|names| {
            names
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase())
}

/// The path in an I/O error, which `io::Error` alone does not carry.
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

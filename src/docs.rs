//! Man pages and shell completions, generated from the clap definitions of `plumb` ([`crate::cli`])
//! and `plumbctl` ([`crate::ctl`]), so the installed documentation says what the binaries accept.
//!
//! Nothing here runs in the binaries: `cargo run --example gen-docs -- DIR` (and `make docs`, and the
//! Debian packaging) calls [`write_docs`]. Each binary gets one page with every subcommand in it
//! (rather than clap_mangen's default of one page per subcommand): `plumb(8)`, for administrators,
//! and `plumbctl(1)`, used by members of the read-only group too, like systemctl(1). Each page has
//! FILES, ENVIRONMENT and EXAMPLES sections written here. `plumb-generator(8)` has no clap
//! definition (systemd runs it with its directories) and is written here whole; `plumb.toml(5)` is
//! written by hand (`man/plumb.toml.5`) and copied along, so the output directory holds everything
//! a package installs.
//!
//! Completions: bash, zsh and fish scripts for `plumb` come from clap_complete. Those for
//! `plumbctl` ask `plumbctl __complete` ([`crate::ctl::complete`]) for each word, which completes
//! subcommands and options from the same definitions, the local daemon's services, and `@host`
//! from the user's ssh_config and known_hosts.

use std::fs;
use std::io;
use std::path::Path;

use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::{Generator, Shell};
use clap_mangen::Man;
use clap_mangen::roff::{Inline, Roff, bold, italic, roman};

/// The configuration file's page, kept in the repository (it documents TOML keys, not arguments).
const PLUMB_TOML_5: &str = include_str!("../man/plumb.toml.5");

/// The pages of the set, as (name, section); each page's SEE ALSO names the others.
pub const PAGES: &[(&str, &str)] = &[
    ("plumb", "8"),
    ("plumbctl", "1"),
    ("plumb-generator", "8"),
    ("plumb.toml", "5"),
];

/// The shells completions are written for: the three whose completion directories Debian packages
/// install into.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// The clap commands of the binaries that have one: `plumb` and `plumbctl`. `plumb-generator` takes
/// no options (systemd runs it), so it has none.
pub fn commands() -> Vec<Command> {
    vec![crate::cli::Cli::command(), crate::ctl::Cli::command()]
}

/// The section of page `name`: 1 for plumbctl, 5 for the config file, 8 for the rest.
pub fn section(name: &str) -> &'static str {
    PAGES
        .iter()
        .find(|(page, _)| *page == name)
        .map_or("8", |(_, section)| section)
}

/// Writes `man/plumb.8`, `man/plumbctl.1`, `man/plumb-generator.8`, `man/plumb.toml.5` and,
/// under `completions/`, `plumb.bash`, `_plumb`, `plumb.fish` and the same three for plumbctl
/// into `out_dir` (created when missing), replacing what is there. Errors name the file.
pub fn write_docs(out_dir: &Path) -> io::Result<()> {
    let man_dir = out_dir.join("man");
    let completion_dir = out_dir.join("completions");
    for dir in [&man_dir, &completion_dir] {
        fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
    }
    for cmd in commands() {
        let name = cmd.get_name().to_owned();
        let page = man_dir.join(format!("{name}.{}", section(&name)));
        fs::write(&page, man_page(cmd.clone())).map_err(|e| at(&page, e))?;
        for shell in SHELLS {
            let file = completion_dir.join(shell.file_name(&name));
            fs::write(&file, completion(&cmd, shell)).map_err(|e| at(&file, e))?;
        }
    }
    let generator_page = man_dir.join("plumb-generator.8");
    fs::write(&generator_page, generator_page_text()).map_err(|e| at(&generator_page, e))?;
    let toml_page = man_dir.join("plumb.toml.5");
    fs::write(&toml_page, PLUMB_TOML_5).map_err(|e| at(&toml_page, e))
}

/// The completion script of `cmd` for `shell`.
pub fn completion(cmd: &Command, shell: Shell) -> Vec<u8> {
    let name = cmd.get_name().to_owned();
    if name == "plumbctl" {
        return match shell {
            Shell::Bash => PLUMBCTL_BASH,
            Shell::Zsh => PLUMBCTL_ZSH,
            _ => PLUMBCTL_FISH,
        }
        .as_bytes()
        .to_vec();
    }
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd.clone(), &name, &mut script);
    script
}

/// plumbctl's bash completion: every word is plumbctl's to complete, but the value of --socket.
const PLUMBCTL_BASH: &str = r#"# bash completion for plumbctl: subcommands and options, the local daemon's services, and
# @host from ssh_config and known_hosts. plumbctl itself says what fits (plumbctl __complete).
_plumbctl() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    if [[ ${COMP_WORDS[COMP_CWORD-1]} == --socket ]]; then
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
        return
    fi
    mapfile -t COMPREPLY < <(plumbctl __complete "$COMP_CWORD" "${COMP_WORDS[@]}" 2>/dev/null)
}
complete -F _plumbctl plumbctl
"#;

/// plumbctl's zsh completion, autoloaded from `_plumbctl` (or sourced).
const PLUMBCTL_ZSH: &str = r#"#compdef plumbctl
# zsh completion for plumbctl: subcommands and options, the local daemon's services, and @host
# from ssh_config and known_hosts. plumbctl itself says what fits (plumbctl __complete).
_plumbctl() {
    if [[ ${words[CURRENT-1]} == --socket ]]; then
        _files
        return
    fi
    local -a candidates
    candidates=("${(@f)$(plumbctl __complete $((CURRENT - 1)) "${words[@]}" 2>/dev/null)}")
    candidates=(${candidates:#})
    compadd -a candidates
}
if [ "$funcstack[1]" = "_plumbctl" ]; then
    _plumbctl "$@"
else
    compdef _plumbctl plumbctl
fi
"#;

/// plumbctl's fish completion.
const PLUMBCTL_FISH: &str = r#"# fish completion for plumbctl: subcommands and options, the local daemon's services, and
# @host from ssh_config and known_hosts. plumbctl itself says what fits (plumbctl __complete).
function __plumbctl_complete
    set -l words (commandline -opc)
    plumbctl __complete (count $words) $words (commandline -ct) 2>/dev/null
end
complete -c plumbctl -f -a '(__plumbctl_complete)'
complete -c plumbctl -l socket -r -F
"#;

/// The page of `cmd`, in roff: clap_mangen's title, NAME and SYNOPSIS (plumbctl's own, which has
/// `@host`), this module's DESCRIPTION, clap_mangen's OPTIONS, a COMMANDS section with each
/// subcommand's synopsis, description and arguments, FILES, ENVIRONMENT, EXAMPLES, SEE ALSO.
pub fn man_page(cmd: Command) -> Vec<u8> {
    // `help` is a subcommand clap adds; the page documents `--help` already. NAME has no room for
    // markup: an about written with `code` would show its backticks.
    let about = cmd.get_about().map(|a| a.to_string().replace('`', ""));
    let mut cmd = cmd.disable_help_subcommand(true);
    if let Some(about) = about {
        cmd = cmd.about(about);
    }
    cmd.build();
    let name = cmd.get_name().to_owned();
    let man = Man::new(cmd.clone());
    let mut out = title(&name).into_bytes();
    // Writing to a Vec cannot fail; the results are the writer's.
    let _ = man.render_name_section(&mut out);
    if name == "plumbctl" {
        let _ = plumbctl_synopsis().to_writer(&mut out);
    } else {
        let _ = man.render_synopsis_section(&mut out);
    }
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
    extra_sections(&mut roff, &name);
    see_also(&mut roff, &name);
    let _ = roff.to_writer(&mut out);
    let _ = man.render_version_section(&mut out);
    out
}

/// The `.TH` line of page `name`: title, section, no date (the same page from the same sources),
/// the source with plumb's version, and the manual. Written out here because clap_mangen and the
/// roff crate drop the empty date, which moves the source and the manual one place left.
fn title(name: &str) -> String {
    let section = section(name);
    format!(
        ".TH {} {section} \"\" \"plumb {}\" \"{}\"\n",
        name.to_uppercase(),
        env!("CARGO_PKG_VERSION"),
        manual(section)
    )
}

/// The manual a section belongs to, as man-pages(7) names them.
fn manual(section: &str) -> &'static str {
    match section {
        "1" => "User Commands",
        "5" => "File Formats Manual",
        _ => "System Manager's Manual",
    }
}

/// plumbctl's SYNOPSIS: its options, a command, and the hosts that may stand anywhere.
fn plumbctl_synopsis() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["SYNOPSIS"]);
    roff.text([
        bold("plumbctl"),
        roman(" ["),
        bold("--json"),
        roman("] ["),
        bold("-v"),
        roman("|"),
        bold("--verbose"),
        roman("] ["),
        bold("--socket"),
        roman(" "),
        italic("PATH"),
        roman("] "),
        italic("command"),
        roman(" ["),
        italic("argument"),
        roman("...] [@"),
        italic("host"),
        roman("...]"),
    ]);
    roff
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
            "The bind mounts, the drop-ins that order each service after its mounts, and the \
             path units that start plumb-apply@SERVICE.service are written by plumb-generator(8) \
             from the same configuration, at boot and at every daemon-reload.",
        ]),
        "plumbctl" => Some(&[
            "plumbctl asks the local daemon's control API, on its unix socket; the caller's unix \
             groups decide what it may do: members of plumb-ro read, members of plumb (who are in \
             plumb-ro too) also freeze, roll back, pull and wipe.",
            "With @host arguments, anywhere on the line, it runs plumbctl --json on each host \
             through ssh instead, all at once, with the user's own ssh configuration, agent and \
             known_hosts, and merges the answers into one table with a MACHINE column; a host \
             that cannot be reached is a row with ssh's first meaningful line (all of it with \
             --verbose). Without a terminal on standard input ssh may not prompt (BatchMode=yes).",
            "Times are shown in the local time zone, as RFC 3339 with how far they are from now. \
             --json prints one JSON array, one element per machine asked, also for one machine.",
            "Exit status: 0 when every machine answered and every change worked, 1 when one was \
             refused, failed or could not be reached, 2 for a usage error.",
        ]),
        _ => None,
    }
}

/// A section of the hand-written part of a page.
enum Extra {
    /// Tagged paragraphs: a path or a variable, in italics or bold, and what it is.
    Terms(&'static str, &'static [(&'static str, &'static str)]),
    /// Examples: what it does, then the command line as typed.
    Examples(&'static [(&'static str, &'static str)]),
}

/// FILES, ENVIRONMENT and EXAMPLES of each page.
fn extras(name: &str) -> &'static [Extra] {
    match name {
        "plumb" => &[
            Extra::Terms(
                "FILES",
                &[
                    (
                        "/etc/plumb/plumb.toml",
                        "The configuration (plumb.toml(5)); -c names another.",
                    ),
                    (
                        "/etc/plumb/plumb.toml.accepted",
                        "A copy of the last configuration the daemon accepted; plumb-generator(8) \
                         generates from it when the configuration is refused.",
                    ),
                    (
                        "/etc/default/plumb",
                        "Environment of plumb.service: PLUMB_BOOTSTRAP and its companions.",
                    ),
                    (
                        "/var/lib/plumb",
                        "The state directory (state_dir, or --state-dir): stores/ (one bare \
                         repository per upstream), state/ (each service's state, deployed revision \
                         and last apply), checkouts/ (the checkouts of services that set no \
                         mount), audit.log.",
                    ),
                    (
                        "/run/plumb/plumb.sock",
                        "The control API's socket, owned by the read-only group, mode 0660.",
                    ),
                ],
            ),
            Extra::Terms(
                "ENVIRONMENT",
                &[
                    (
                        "PLUMB_LOG",
                        "The log filter: a level (info by default, debug for more), or target=level pairs with an \
                         optional default level (plumb::git=trace,info).",
                    ),
                    (
                        "PLUMB_BOOTSTRAP, PLUMB_BOOTSTRAP_DIR, PLUMB_BOOTSTRAP_BRANCH",
                        "The defaults of --bootstrap, --bootstrap-dir and --branch.",
                    ),
                    (
                        "SSL_CERT_FILE, SSL_CERT_DIR",
                        "The CA certificates https upstreams are checked against, instead of the \
                         system's bundle.",
                    ),
                    (
                        "https_proxy, http_proxy, ALL_PROXY",
                        "The proxy of http and https upstreams.",
                    ),
                ],
            ),
            Extra::Examples(&[
                (
                    "Check a configuration before merging it, as machine web1 reads it:",
                    "plumb check-config plumb.toml --hosts web1",
                ),
                (
                    "One cycle in a directory of one's own, touching no unit, for a test:",
                    "plumb -c plumb.toml --state-dir /tmp/plumb --once --no-apply",
                ),
                (
                    "Take the configuration from git and keep it in step:",
                    "plumb --bootstrap https://git.example.org/ops/config.git",
                ),
                (
                    "Re-read the configuration of the running daemon:",
                    "systemctl reload plumb",
                ),
            ]),
        ],
        "plumbctl" => &[
            Extra::Terms(
                "FILES",
                &[
                    (
                        "/run/plumb/plumb.sock",
                        "The local daemon's socket: readable and writable by root and the \
                         read-only group (plumb-ro) only.",
                    ),
                    (
                        "~/.ssh/config, ~/.ssh/known_hosts",
                        "How @host is reached, and the host names the shell completions offer \
                         after @ (with /etc/ssh/ssh_config and /etc/ssh/ssh_known_hosts).",
                    ),
                ],
            ),
            Extra::Terms(
                "ENVIRONMENT",
                &[
                    (
                        "PLUMB_SOCKET",
                        "The local socket, when --socket is not given.",
                    ),
                    (
                        "PLUMBCTL_SSH",
                        "The ssh command and its options, split on whitespace (default ssh).",
                    ),
                    (
                        "PLUMBCTL_REMOTE",
                        "plumbctl on the remote machines, split on whitespace (default plumbctl).",
                    ),
                    ("TZ", "The time zone times are shown in."),
                ],
            ),
            Extra::Examples(&[
                (
                    "The services of two machines, in one table:",
                    "plumbctl list services @web1 @web2",
                ),
                (
                    "Hold nginx where it is for two hours, on every web machine:",
                    "plumbctl freeze nginx 2h @web1 @web2 @web3",
                ),
                (
                    "Go back to an earlier revision, and later follow the branch again:",
                    "plumbctl rollback nginx 3f2a1c9\nplumbctl unfreeze nginx",
                ),
                (
                    "Deploy now, dropping local edits:",
                    "plumbctl pull nginx --force",
                ),
                (
                    "The state of nginx, for a script (an array, one element per machine):",
                    "plumbctl --json status nginx | jq -r '.[0].result.state'",
                ),
                (
                    "The last twenty changes made through the API:",
                    "plumbctl log --limit 20",
                ),
            ]),
        ],
        _ => &[],
    }
}

fn extra_sections(roff: &mut Roff, name: &str) {
    for extra in extras(name) {
        match extra {
            Extra::Terms(title, terms) => {
                roff.control("SH", [*title]);
                for (term, text) in *terms {
                    roff.control("TP", []);
                    // Paths in italics, variables in bold (man-pages(7)).
                    if term.starts_with(['/', '~']) {
                        roff.text([italic(*term)]);
                    } else {
                        roff.text([bold(*term)]);
                    }
                    roff.text([roman(*text)]);
                }
            }
            Extra::Examples(examples) => {
                roff.control("SH", ["EXAMPLES"]);
                for (what, command) in *examples {
                    roff.control("PP", []).text([roman(*what)]);
                    roff.control("RS", []).control("nf", []);
                    for line in command.lines() {
                        roff.text([roman(line)]);
                    }
                    roff.control("fi", []).control("RE", []);
                }
            }
        }
    }
}

/// SEE ALSO: the other pages of the set, then systemd's pages a page relies on.
fn see_also(roff: &mut Roff, name: &str) {
    roff.control("SH", ["SEE ALSO"]);
    let mut pages: Vec<(&str, &str)> = PAGES
        .iter()
        .copied()
        .filter(|(page, _)| *page != name)
        .collect();
    match name {
        "plumb-generator" => pages.extend([("systemd.generator", "7"), ("systemd.mount", "5")]),
        "plumbctl" => pages.push(("ssh", "1")),
        _ => pages.push(("systemctl", "1")),
    }
    let mut line = Vec::new();
    for (i, (page, section)) in pages.iter().enumerate() {
        line.push(bold(*page));
        let sep = if i + 1 < pages.len() { ", " } else { "" };
        line.push(roman(format!("({section}){sep}")));
    }
    roff.text(line);
}

/// plumb-generator(8): what systemd runs at boot and at every daemon-reload.
pub fn generator_page_text() -> Vec<u8> {
    let mut roff = Roff::new();
    roff.control("SH", ["NAME"]);
    roff.text([roman(
        "plumb-generator - write the bind mounts, drop-ins and path units of plumb's services",
    )]);
    roff.control("SH", ["SYNOPSIS"]);
    roff.text([
        bold("/usr/lib/systemd/system-generators/plumb-generator"),
        roman(" "),
        italic("normal-dir"),
        roman(" ["),
        italic("early-dir"),
        roman(" "),
        italic("late-dir"),
        roman("]"),
    ]);
    roff.control("SH", ["DESCRIPTION"]);
    for paragraph in [
        "plumb-generator is a systemd.generator(7). systemd runs it at boot, before any unit \
         starts, and at every daemon-reload. It reads /etc/plumb/plumb.toml and writes, into \
         normal-dir, the units of the services the configuration gives this machine (its \
         hostname, and the names in [plumb] hosts): a bind mount unit per dirs entry, named \
         after the local path (/etc/nginx/conf.d gives etc-nginx-conf.d.mount), from the \
         service's checkout, with ConditionPathExists= on the checkout so that nothing is \
         mounted before plumb(8) has checked the service out; a drop-in \
         (SERVICE.service.d/50-plumb.conf) that makes the service's unit want and follow its \
         mounts; and plumb-apply@SERVICE.path, which starts plumb-apply@SERVICE.service when \
         the service's deployed revision changes. The path units, the mounts and the services' \
         units are enabled through .wants links.",
        "It reads nothing but the configuration, starts no process and talks to no other \
         service, as generators must. A missing configuration writes nothing. A configuration \
         that does not load is reported on standard error and in the kernel log, and the last \
         one the daemon accepted is generated from instead, with a drop-in that puts the refusal \
         in plumb.service's description (systemctl status plumb); the boot goes on either way, \
         and the exit status is always 0. Everything is generated in memory first: a failed \
         write removes what the run wrote.",
        "Run by hand with one directory, it writes there, which shows what it would generate.",
    ] {
        roff.control("PP", []).text([roman(paragraph)]);
    }
    let terms = |roff: &mut Roff, title: &str, terms: &[(&str, &str)]| {
        roff.control("SH", [title]);
        for (term, text) in terms {
            roff.control("TP", []);
            if term.starts_with('/') {
                roff.text([italic(*term)]);
            } else {
                roff.text([bold(*term)]);
            }
            roff.text([roman(*text)]);
        }
    };
    terms(
        &mut roff,
        "FILES",
        &[
            (
                "/etc/plumb/plumb.toml",
                "The configuration read (plumb.toml(5)).",
            ),
            (
                "/etc/plumb/plumb.toml.accepted",
                "The last configuration plumb(8) accepted, generated from when the configuration \
                 does not load.",
            ),
            (
                "/run/systemd/generator",
                "Where systemd has it write (normal-dir): the mount units, SERVICE.service.d/, \
                 plumb-apply@SERVICE.path and the .wants directories.",
            ),
            (
                "/dev/kmsg",
                "The kernel log, where a refused configuration is reported.",
            ),
        ],
    );
    terms(
        &mut roff,
        "ENVIRONMENT",
        &[
            (
                "PLUMB_CONFIG",
                "Read this configuration instead of /etc/plumb/plumb.toml (for tests).",
            ),
            (
                "PLUMB_KMSG",
                "Report to this file instead of /dev/kmsg (for tests).",
            ),
        ],
    );
    roff.control("SH", ["EXAMPLES"]);
    for (what, command) in [
        (
            "Run it again after editing the configuration (plumb does this itself when it \
             reloads):",
            "systemctl daemon-reload",
        ),
        (
            "See what it would write, without touching systemd:",
            "/usr/lib/systemd/system-generators/plumb-generator /tmp/units\nls -R /tmp/units",
        ),
        (
            "Show a generated mount unit and a service's drop-in:",
            "systemctl cat etc-nginx-conf.d.mount nginx.service",
        ),
    ] {
        roff.control("PP", []).text([roman(what)]);
        roff.control("RS", []).control("nf", []);
        for line in command.lines() {
            roff.text([roman(line)]);
        }
        roff.control("fi", []).control("RE", []);
    }
    see_also(&mut roff, "plumb-generator");
    let mut out = title("plumb-generator").into_bytes();
    out.extend(roff.render().into_bytes());
    out
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

//! Shell completion for `plumbctl`, answered by the binary itself: the bash, zsh and fish scripts
//! ([`crate::docs`]) run `plumbctl __complete INDEX WORDS...` for the word being completed and
//! offer what it prints, one candidate a line. It knows what no static script can: the services
//! of the local daemon (asked on its socket, briefly) and the hosts of the user's ssh_config and
//! known_hosts for `@host`; subcommands and options come from the same clap definitions as
//! `--help`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::CommandFactory;

use super::{Action, Body, Cli, ListWhat, Settings};

/// The hidden first argument that asks for completions.
pub const COMMAND: &str = "__complete";

/// How long the daemon may take to list its services before completion goes on without them.
const SERVICES_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the names offered come from: the daemon and the user's ssh files in the binary, fixed
/// lists in tests.
pub trait Sources {
    /// The local daemon's services, reached on `socket`; none when it cannot be asked.
    fn services(&self, socket: &Path) -> Vec<String>;
    /// Host names ssh knows.
    fn hosts(&self) -> Vec<String>;
}

/// The daemon on its socket, and the ssh files of the user (`~/.ssh/config`, `~/.ssh/known_hosts`)
/// and of the system (`/etc/ssh/ssh_config`, `/etc/ssh/ssh_known_hosts`).
pub struct System;

impl Sources for System {
    fn services(&self, socket: &Path) -> Vec<String> {
        let action = Action::List(ListWhat::Services);
        let answer = super::http(socket, &action.request(), SERVICES_TIMEOUT)
            .and_then(|response| super::read_answer(socket, &action, &response));
        match answer {
            Ok(Body::Services(s)) => s.services.into_iter().map(|s| s.service).collect(),
            _ => Vec::new(),
        }
    }

    fn hosts(&self) -> Vec<String> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();
        let mut hosts = Vec::new();
        for config in home
            .iter()
            .map(|h| h.join(".ssh/config"))
            .chain([PathBuf::from("/etc/ssh/ssh_config")])
        {
            hosts.extend(ssh_config_hosts(&read(config)));
        }
        for known in home
            .iter()
            .map(|h| h.join(".ssh/known_hosts"))
            .chain([PathBuf::from("/etc/ssh/ssh_known_hosts")])
        {
            hosts.extend(known_hosts(&read(known)));
        }
        hosts
    }
}

/// The candidates for `plumbctl __complete INDEX WORDS...`: `words` is the command line as the
/// shell split it, program name first, and `INDEX` the position in it of the word being completed
/// (which may be one past the end: a new, empty word).
pub fn candidates(args: &[String]) -> Vec<String> {
    let Some((index, words)) = args.split_first() else {
        return Vec::new();
    };
    let Ok(index) = index.parse::<usize>() else {
        return Vec::new();
    };
    // Without the program name.
    let words = words.get(1..).unwrap_or_default();
    let index = index.saturating_sub(1).min(words.len());
    let current = words.get(index).map_or("", String::as_str);
    complete(&words[..index], current, &System)
}

/// What `current` may become, given the words before it (program name excluded).
pub fn complete(before: &[String], current: &str, sources: &dyn Sources) -> Vec<String> {
    let mut found: Vec<String> = if let Some(prefix) = current.strip_prefix('@') {
        sources
            .hosts()
            .into_iter()
            .filter(|h| h.starts_with(prefix))
            .map(|h| format!("@{h}"))
            .collect()
    } else {
        let mut root = Cli::command();
        root.build();
        let line = walk(&root, before);
        words_for(&line, current, sources)
            .into_iter()
            .filter(|c| c.starts_with(current))
            .collect()
    };
    found.sort();
    found.dedup();
    found
}

/// Where the words before the one completed left the command line.
struct Line<'a> {
    /// The deepest subcommand named.
    command: &'a clap::Command,
    /// Positional arguments given to it so far.
    positionals: usize,
    /// The option whose value is being completed.
    value_of: Option<&'a clap::Arg>,
    /// `--socket`, when given.
    socket: Option<PathBuf>,
}

fn walk<'a>(root: &'a clap::Command, before: &[String]) -> Line<'a> {
    let mut line = Line {
        command: root,
        positionals: 0,
        value_of: None,
        socket: None,
    };
    for word in before
        .iter()
        .filter(|w| !w.starts_with('@') || w.len() == 1)
    {
        if let Some(arg) = line.value_of.take() {
            if word == "=" {
                // bash splits `--socket=PATH` at the `=` (COMP_WORDBREAKS): the value follows.
                line.value_of = Some(arg);
                continue;
            }
            if arg.get_id() == "socket" {
                line.socket = Some(PathBuf::from(word));
            }
            continue;
        }
        if let Some(long) = word.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (long, None),
            };
            let arg = line
                .command
                .get_arguments()
                .find(|a| a.get_long() == Some(name));
            match (arg, value) {
                (Some(a), Some(v)) if a.get_id() == "socket" => line.socket = Some(v.into()),
                (Some(a), None) if a.get_action().takes_values() => line.value_of = Some(a),
                _ => {}
            }
        } else if word.starts_with('-') && word.len() > 1 {
            // Short flags (-v, -h) take no values.
        } else if let Some(sub) = line.command.find_subcommand(word) {
            line.command = sub;
            line.positionals = 0;
        } else {
            line.positionals += 1;
        }
    }
    line
}

/// Every word that may stand where `current` does, before filtering by its prefix.
fn words_for(line: &Line, current: &str, sources: &dyn Sources) -> Vec<String> {
    if line.value_of.is_some() {
        // A path (--socket) or a number: the shell's own completion, or none.
        return Vec::new();
    }
    let visible = |a: &&clap::Arg| !a.is_hide_set();
    if current.starts_with('-') {
        return line
            .command
            .get_arguments()
            .filter(visible)
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
    }
    if line.command.has_subcommands() {
        return line
            .command
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(|s| s.get_name().to_owned())
            .collect();
    }
    let positional = line
        .command
        .get_arguments()
        .filter(|a| a.is_positional())
        .nth(line.positionals);
    match positional {
        Some(arg) if arg.get_id() == "service" => {
            let socket = Settings::from_env(line.socket.as_deref()).socket;
            sources.services(&socket)
        }
        _ => Vec::new(),
    }
}

/// The host names of an ssh_config's `Host` lines, without patterns (`*`, `?`, `!`).
pub fn ssh_config_hosts(text: &str) -> Vec<String> {
    let mut hosts = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((keyword, rest)) = line.split_once(|c: char| c.is_whitespace() || c == '=') else {
            continue;
        };
        if !keyword.eq_ignore_ascii_case("host") {
            continue;
        }
        hosts.extend(
            rest.split(|c: char| c.is_whitespace() || c == '=')
                .map(|h| h.trim_matches('"'))
                .filter(|h| !h.is_empty() && !h.contains(['*', '?', '!'])),
        );
    }
    hosts.into_iter().map(str::to_owned).collect()
}

/// The host names of a known_hosts file: the first field's names (a marker such as
/// `@cert-authority` comes before it), `[host]:port` as its host, hashed names (`|1|...`) and
/// patterns left out.
pub fn known_hosts(text: &str) -> Vec<String> {
    let mut hosts = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(mut names) = fields.next() else {
            continue;
        };
        if names.starts_with('#') {
            continue;
        }
        if names.starts_with('@') {
            match fields.next() {
                Some(n) => names = n,
                None => continue,
            }
        }
        for name in names.split(',') {
            let name = match name.strip_prefix('[') {
                Some(rest) => rest.split_once(']').map_or(rest, |(host, _)| host),
                None => name,
            };
            if !name.is_empty() && !name.starts_with('|') && !name.contains(['*', '?', '!']) {
                hosts.push(name.to_owned());
            }
        }
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Sources for Fixed {
        fn services(&self, socket: &Path) -> Vec<String> {
            if socket == Path::new("/elsewhere.sock") {
                return vec!["other".into()];
            }
            vec![
                "nginx".into(),
                "grafana-server".into(),
                "docker-compose@caddy".into(),
            ]
        }

        fn hosts(&self) -> Vec<String> {
            vec!["web1".into(), "web2".into(), "db1".into()]
        }
    }

    fn complete_line(line: &str) -> Vec<String> {
        let mut words: Vec<String> = line.split(' ').map(str::to_owned).collect();
        let current = words.pop().unwrap_or_default();
        complete(&words, &current, &Fixed)
    }

    #[test]
    fn subcommands_options_services_and_hosts() {
        assert_eq!(complete_line("fr"), ["freeze"]);
        assert_eq!(complete_line("list "), ["machines", "services"]);
        assert_eq!(
            complete_line("freeze "),
            ["docker-compose@caddy", "grafana-server", "nginx"]
        );
        assert_eq!(complete_line("status ng"), ["nginx"]);
        assert_eq!(complete_line("@web1 rollback g"), ["grafana-server"]);
        assert_eq!(complete_line("freeze nginx "), Vec::<String>::new());
        assert_eq!(complete_line("status nginx @w"), ["@web1", "@web2"]);
        assert_eq!(complete_line("@"), ["@db1", "@web1", "@web2"]);
        assert_eq!(complete_line("pull --f"), ["--force"]);
        assert_eq!(complete_line("log --l"), ["--limit"]);
        assert!(complete_line("--").contains(&"--json".to_owned()));
        // The value of --socket is the shell's to complete, and names the daemon to ask.
        assert_eq!(complete_line("--socket "), Vec::<String>::new());
        assert_eq!(complete_line("--socket /elsewhere.sock wipe "), ["other"]);
        assert_eq!(complete_line("--socket=/elsewhere.sock wipe "), ["other"]);
        assert_eq!(complete_line("--socket = /elsewhere.sock wipe "), ["other"]);
        assert_eq!(complete_line("--json --verbose diff n"), ["nginx"]);
    }

    #[test]
    fn the_hidden_command_reads_the_shells_words() {
        let args = |s: &str| -> Vec<String> { s.split(' ').map(str::to_owned).collect() };
        // "plumbctl li" with the cursor on word 1; and a word past the end is a new, empty one.
        assert_eq!(candidates(&args("1 plumbctl li")), ["list"]);
        assert_eq!(
            candidates(&args("2 plumbctl list")),
            ["machines", "services"]
        );
        assert!(candidates(&args("x plumbctl")).is_empty());
        assert!(candidates(&[]).is_empty());
    }

    #[test]
    fn hosts_from_ssh_config() {
        let text = "Host web1 web2\n  HostName 10.0.0.1\nHost *.example.org !bad\nhost=db1\nMatch host x\n  Host \"quoted\"\n# Host commented\n";
        assert_eq!(ssh_config_hosts(text), ["web1", "web2", "db1", "quoted"]);
    }

    #[test]
    fn hosts_from_known_hosts() {
        let text = "web1,192.0.2.1 ssh-ed25519 AAAA\n[git.example.org]:2222 ssh-ed25519 AAAA\n\
                    |1|abc=|def= ssh-ed25519 AAAA\n@cert-authority *.example.org ssh-ed25519 AAAA\n\
                    @revoked db1 ssh-rsa AAAA\n# web9 comment\n\n";
        assert_eq!(
            known_hosts(text),
            ["web1", "192.0.2.1", "git.example.org", "db1"]
        );
    }
}

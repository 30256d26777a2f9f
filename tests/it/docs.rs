//! The generated man pages and completions work with the real tools: `man` renders every page
//! without a warning and shows every subcommand, its FILES, ENVIRONMENT and EXAMPLES; bash and fish
//! complete with the scripts (plumbctl's asking the built plumbctl); and the hand-written
//! plumb.toml(5) names every key of the README's configuration reference.
//!
//! Needs `man` and `groff` (`scripts/install-deps.sh` installs them, and zsh and fish); zsh and fish
//! are checked when they are installed, and their scripts' content always.

use std::path::{Path, PathBuf};
use std::process::Command;

use plumb::docs;

/// Generates everything into a fresh directory, kept alive by the returned guard.
fn generate() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("docs");
    docs::write_docs(&out).expect("write_docs");
    (dir, out)
}

/// Runs `program args`, failing the test with its output unless it exits 0; returns stdout and
/// stderr.
fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e} (scripts/install-deps.sh installs it)"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    (stdout, stderr)
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The page as `man` shows it at 80 columns, after checking that neither man nor groff warn.
fn render(page: &Path) -> String {
    let page = page.to_str().expect("UTF-8 temp path");
    let env = [
        ("MANWIDTH", "80"),
        ("LC_ALL", "C.UTF-8"),
        ("MANPAGER", "cat"),
    ];
    let (text, warnings) = run("man", &["--warnings", "-l", page], &env);
    assert_eq!(warnings, "", "man warns about {page}");
    let (_, warnings) = run("groff", &["-man", "-Tutf8", "-ww", "-z", page], &[]);
    assert_eq!(warnings, "", "groff warns about {page}");
    // groff may set a hyphen or minus as a Unicode dash; compare words as typed.
    text.replace(['\u{2010}', '\u{2212}'], "-")
}

/// `text` with its words one space apart, as man justifies lines by widening the spaces.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every runnable subcommand as typed (`plumbctl list machines`), from the clap definitions.
fn subcommand_paths(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let path = format!("{path} {}", sub.get_name());
        if sub.has_subcommands() {
            subcommand_paths(sub, &path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn writes_every_file() {
    let (_guard, out) = generate();
    for file in [
        "man/plumb.8",
        "man/plumbctl.1",
        "man/plumb-generator.8",
        "man/plumb.toml.5",
        "completions/plumb.bash",
        "completions/_plumb",
        "completions/plumb.fish",
        "completions/plumbctl.bash",
        "completions/_plumbctl",
        "completions/plumbctl.fish",
    ] {
        let len = std::fs::metadata(out.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .len();
        assert!(len > 100, "{file} is {len} bytes");
    }
}

#[test]
fn man_pages_render_cleanly_and_show_every_command_and_option() {
    let (_guard, out) = generate();
    for cmd in docs::commands() {
        let name = cmd.get_name().to_owned();
        let section = docs::section(&name);
        let text = render(&out.join(format!("man/{name}.{section}")));
        assert!(
            text.contains(&format!("{}({section})", name.to_uppercase())),
            "{text}"
        );
        let mut paths = Vec::new();
        subcommand_paths(&cmd, &name, &mut paths);
        assert!(paths.len() >= 2, "{name} has subcommands: {paths:?}");
        for path in paths {
            assert!(text.contains(&path), "man {name} lacks {path:?}:\n{text}");
        }
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(long) = arg.get_long() {
                assert!(
                    text.contains(&format!("--{long}")),
                    "man {name} lacks --{long}"
                );
            }
        }
        page_has_its_sections(&name, &text);
    }
}

/// What every page of the set has: a NAME line as whatis(1) shows it, without markup; FILES,
/// ENVIRONMENT and EXAMPLES (a config file's page has no environment); the other pages in SEE ALSO.
fn page_has_its_sections(name: &str, text: &str) {
    let name_line = text
        .lines()
        .skip_while(|l| l.trim() != "NAME")
        .nth(1)
        .unwrap_or_default();
    let name_line = words(name_line);
    assert!(
        name_line.starts_with(&format!("{name} - ")),
        "{name}: NAME is {name_line:?}"
    );
    assert!(
        !name_line.contains('`'),
        "{name}: NAME has markup: {name_line:?}"
    );
    let sections: &[&str] = if name == "plumb.toml" {
        &["FILES", "EXAMPLES", "SEE ALSO"]
    } else {
        &["FILES", "ENVIRONMENT", "EXAMPLES", "SEE ALSO"]
    };
    for heading in sections {
        assert!(
            text.lines().any(|l| l == *heading),
            "man {name} has no {heading} section:\n{text}"
        );
    }
    for (other, section) in docs::PAGES {
        if *other != name {
            let reference = format!("{other}({section})");
            assert!(
                text.contains(&reference),
                "man {name}: SEE ALSO lacks {reference}"
            );
        }
    }
}

/// plumbctl is for every member of the read-only group: section 1, a synopsis with its hosts.
#[test]
fn plumbctl_is_a_user_command_whose_synopsis_has_hosts() {
    let (_guard, out) = generate();
    assert!(!out.join("man/plumbctl.8").exists());
    let text = render(&out.join("man/plumbctl.1"));
    assert!(text.starts_with("PLUMBCTL(1)"), "{text}");
    assert!(text.contains("User Commands"), "{text}");
    let synopsis: String = text
        .lines()
        .skip_while(|l| l.trim() != "SYNOPSIS")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let synopsis = words(&synopsis);
    assert_eq!(
        synopsis,
        "plumbctl [--json] [-v|--verbose] [--socket PATH] command [argument...] [@host...]"
    );
}

/// plumb.service points at plumb-generator(8): the page is shipped and renders.
#[test]
fn the_generator_has_its_page() {
    let (_guard, out) = generate();
    let text = render(&out.join("man/plumb-generator.8"));
    assert!(text.starts_with("PLUMB-GENERATOR(8)"), "{text}");
    let flowing = words(&text);
    for needle in [
        "/usr/lib/systemd/system-generators/plumb-generator normal-dir [early-dir late-dir]",
        "/etc/plumb/plumb.toml.accepted",
        "PLUMB_CONFIG",
        "systemd.generator(7)",
    ] {
        assert!(
            flowing.contains(needle),
            "plumb-generator(8) lacks {needle:?}:\n{text}"
        );
    }
    page_has_its_sections("plumb-generator", &text);
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("units/plumb.service"))
            .expect("plumb.service");
    assert!(unit.contains("man:plumb-generator(8)"), "{unit}");
}

/// plumb.toml(5) is written by hand: it must at least name every key the README's reference
/// tables list, so a key added to the config and the README cannot be left out of the page.
#[test]
fn config_page_renders_cleanly_and_names_every_key() {
    let (_guard, out) = generate();
    let page = out.join("man/plumb.toml.5");
    let text = render(&page);
    let source = std::fs::read_to_string(&page).expect("plumb.toml.5");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let start = readme
        .find("## Configuration")
        .expect("README configuration section");
    let end = start + readme[start..].find("\n## ").expect("next section");
    let keys: Vec<&str> = readme[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split_once('`').map(|(k, _)| k))
        .collect();
    assert!(keys.len() >= 15, "README keys: {keys:?}");
    for key in keys {
        assert!(
            source.contains(&format!("\n.B {key}\n")),
            "plumb.toml.5 has no entry for {key}"
        );
    }
    for table in ["[GLOBAL] AND [[SERVICES]]", "[PLUMB]"] {
        assert!(text.contains(table), "plumb.toml(5) lacks {table}");
    }
    page_has_its_sections("plumb.toml", &text);
}

/// The directory of the built plumbctl first on PATH, so the completion scripts ask this build.
fn path_with_plumbctl() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_plumbctl"))
        .parent()
        .expect("plumbctl's directory");
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Completes `words` (the last one being completed) with the bash script, as bash calls it:
/// the function gets the command, the current word and the previous word. `env` adds to
/// plumbctl's environment (its socket, HOME).
fn bash_complete(script: &Path, words: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let function = format!("_{}", words[0]);
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cword = words.len() - 1;
    let program = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={cword}; {function} '{}' '{}' '{}'; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words[0],
        words[cword],
        words[cword - 1],
    );
    let path = path_with_plumbctl();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("PATH", &path));
    let (stdout, _) = run("bash", &["-c", &program], &env);
    stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// What fish offers for `line` (`complete -C`) with plumbctl's script loaded.
fn fish_complete(script: &Path, line: &str, env: &[(&str, &str)]) -> Vec<String> {
    let path = path_with_plumbctl();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("PATH", &path));
    let program = format!("source '{}'; complete -C '{line}'", script.display());
    let (stdout, _) = run("fish", &["--no-config", "-c", &program], &env);
    stdout
        .lines()
        .map(|l| l.split('\t').next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn bash_completion_parses_and_completes() {
    let (_guard, out) = generate();
    let dir = out.join("completions");
    for file in ["plumb.bash", "plumbctl.bash"] {
        let path = dir.join(file);
        run("bash", &["-n", path.to_str().expect("UTF-8")], &[]);
    }
    let ctl = dir.join("plumbctl.bash");
    // No daemon here: subcommands and options still complete.
    let none = [("PLUMB_SOCKET", "/nonexistent/plumb.sock")];
    assert_eq!(bash_complete(&ctl, &["plumbctl", "fr"], &none), ["freeze"]);
    assert_eq!(
        bash_complete(&ctl, &["plumbctl", "pull", "--f"], &none),
        ["--force"]
    );
    assert_eq!(
        bash_complete(&ctl, &["plumbctl", "@web1", "list", ""], &none),
        ["machines", "services"]
    );
    assert_eq!(
        bash_complete(&dir.join("plumb.bash"), &["plumb", "check"], &[]),
        ["check-config"]
    );
}

/// What an interactive zsh, whose completions are `completions` (and this build's plumbctl on
/// its PATH, no daemon), shows after `typed` and a tab, until "plumbctl freeze" shows or ten
/// seconds passed: its screen output, escapes and all.
fn zsh_complete(completions: &Path, typed: &str) -> String {
    const SCRIPT: &str = r#"
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z "PS1='> '; fpath=($1 \$fpath); path=($2 \$path); autoload -Uz compinit; compinit -u -D; export PLUMB_SOCKET=/nonexistent"
zpty -w -n z "$3"$'\t'
out=''
# Polls the screen until the completion shows, for at most ten seconds.
for i in {1..100}; do
  if zpty -r -t z chunk; then out+=$chunk; fi
  [[ $out == *"$4"* ]] && break
  sleep 0.1
done
zpty -d z
print -r -- "$out"
"#;
    let bin = Path::new(env!("CARGO_BIN_EXE_plumbctl"))
        .parent()
        .expect("a directory");
    let (stdout, _) = run(
        "zsh",
        &[
            "-f",
            "-c",
            SCRIPT,
            "zsh",
            completions.to_str().expect("UTF-8"),
            bin.to_str().expect("UTF-8"),
            typed,
            "plumbctl freeze",
        ],
        &[],
    );
    stdout
}

#[test]
fn zsh_and_fish_completions() {
    let (_guard, out) = generate();
    let dir = out.join("completions");
    for name in ["plumb", "plumbctl"] {
        let zsh = dir.join(format!("_{name}"));
        let text = std::fs::read_to_string(&zsh).expect("zsh script");
        assert!(text.starts_with(&format!("#compdef {name}\n")), "{text}");
        let fish = dir.join(format!("{name}.fish"));
        let text = std::fs::read_to_string(&fish).expect("fish script");
        assert!(text.contains(&format!("complete -c {name} ")), "{text}");
        if installed("zsh") {
            run("zsh", &["-n", zsh.to_str().expect("UTF-8")], &[]);
        }
        if installed("fish") {
            run(
                "fish",
                &["--no-execute", fish.to_str().expect("UTF-8")],
                &[],
            );
        }
    }
    let ctl = std::fs::read_to_string(dir.join("_plumbctl")).expect("zsh script");
    assert!(
        ctl.contains("plumbctl __complete"),
        "zsh does not ask plumbctl:\n{ctl}"
    );
    if installed("zsh") {
        // A real interactive zsh in a pty, with compinit and the script on its fpath: `fre`
        // and a tab become `freeze`.
        let line = zsh_complete(&dir, "plumbctl fre");
        assert!(line.contains("plumbctl freeze"), "{line:?}");
    }
    let plumb = std::fs::read_to_string(dir.join("plumb.fish")).expect("fish script");
    assert!(
        plumb.contains("-a \"check-config\""),
        "fish lacks check-config:\n{plumb}"
    );
    if installed("fish") {
        let none = [("PLUMB_SOCKET", "/nonexistent/plumb.sock")];
        let fish = dir.join("plumbctl.fish");
        assert_eq!(fish_complete(&fish, "plumbctl fr", &none), ["freeze"]);
        assert_eq!(fish_complete(&fish, "plumbctl log --l", &none), ["--limit"]);
    }
}

//! The generated man pages and completions work with the real tools: `man` renders every page
//! without a warning and shows every subcommand, bash completes from the script, and the
//! hand-written plumb.toml(5) names every key of the README's configuration reference.
//!
//! Needs `man` and `groff` (`scripts/install-deps.sh` installs them); zsh and fish are checked when
//! they are installed, and their scripts' content always.

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
        "man/plumbctl.8",
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
        let text = render(&out.join(format!("man/{name}.8")));
        assert!(
            text.contains(&format!("{}(8)", name.to_uppercase())),
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
        for other in ["plumb(8)", "plumbctl(8)", "plumb.toml(5)"] {
            if other != format!("{name}(8)") {
                assert!(text.contains(other), "man {name}: SEE ALSO lacks {other}");
            }
        }
    }
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
    for table in [
        "[GLOBAL] AND [[SERVICES]]",
        "[PLUMB]",
        "EXAMPLE",
        "SEE ALSO",
    ] {
        assert!(text.contains(table), "plumb.toml(5) lacks {table}");
    }
}

/// Completes `words` (the last one being completed) with the bash script, as bash calls it:
/// the function gets the command, the current word and the previous word.
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
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
    let (stdout, _) = run("bash", &["-c", &program], &[]);
    stdout.lines().map(str::to_owned).collect()
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
    assert_eq!(bash_complete(&ctl, &["plumbctl", "fr"]), ["freeze"]);
    assert_eq!(
        bash_complete(&ctl, &["plumbctl", "pull", "--f"]),
        ["--force"]
    );
    assert_eq!(
        bash_complete(&dir.join("plumb.bash"), &["plumb", "check"]),
        ["check-config"]
    );
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
    assert!(ctl.contains("'freeze:"), "zsh lacks freeze:\n{ctl}");
    let ctl = std::fs::read_to_string(dir.join("plumbctl.fish")).expect("fish script");
    assert!(ctl.contains("-a \"freeze\""), "fish lacks freeze:\n{ctl}");
}

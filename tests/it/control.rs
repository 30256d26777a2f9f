//! Operator commands through the daemon's own handle (what the control API calls), against a real
//! daemon on a real upstream: freeze holds a service back, unfreeze catches up, rollback pins an old
//! revision, pull answers when done, and a freeze survives a restart.

use crate::support;

use std::path::{Path, PathBuf};

use plumb::daemon::{Command, CommandError};
use plumb::proto::ActionResult;
use support::{DEADLINE, InProcess, Upstream, temp_root, wait_until};

/// What these tests ask of the one service they run, through the daemon's handle.
trait Ops {
    fn pull(&self, force: bool) -> ActionResult;
    fn freeze(&self, until: Option<u64>) -> ActionResult;
    fn act(&self, c: Command) -> ActionResult;
}

impl Ops for InProcess {
    /// `pull` of the one service these tests run.
    fn pull(&self, force: bool) -> ActionResult {
        self.act(Command::Pull {
            service: "app".into(),
            force,
        })
    }

    fn freeze(&self, until: Option<u64>) -> ActionResult {
        self.act(Command::Freeze {
            service: "app".into(),
            until,
        })
    }

    fn act(&self, c: Command) -> ActionResult {
        self.call(c).unwrap()
    }
}

fn setup(root: &Path) -> (Upstream, PathBuf, PathBuf, String) {
    let up = Upstream::new(root, "ctl");
    let v1 = up.write("app/conf", "1").commit("v1");
    let state = root.join("state");
    let config = root.join("plumb.toml");
    std::fs::write(
        &config,
        format!(
            "[plumb]\nstate_dir = {state:?}\n\n[[services]]\nmachine = \"testbox\"\nservice = \"app\"\nupstream = \"{}\"\ndirs = [{{ local = \"/srv/app\", link = \"app\" }}]\n",
            up.file_url()
        ),
    )
    .unwrap();
    (up, config, state, v1)
}

fn conf(state: &Path) -> String {
    std::fs::read_to_string(state.join("checkouts/app/app/conf")).unwrap_or_default()
}

#[test]
fn freeze_holds_back_unfreeze_catches_up_and_pull_answers_when_done() {
    let root = temp_root();
    let (up, config, state, v1) = setup(root.path());
    let d = InProcess::start(&config);
    wait_until("first deploy", DEADLINE, || {
        d.status("app").deployed.as_deref() == Some(v1.as_str())
    });
    assert_eq!(conf(&state), "1");

    let a = d.freeze(None);
    assert!(a.ok);
    assert_eq!(a.status.state, "FREEZE");

    let v2 = up.write("app/conf", "2").commit("v2");
    let a = d.pull(false);
    // Pull answers after the fetch: the new head is known, and not deployed.
    assert_eq!(a.status.upstream_head.as_deref(), Some(v2.as_str()));
    assert_eq!(a.status.state, "FREEZE");
    assert_eq!(a.status.behind, Some(1));
    assert_eq!(conf(&state), "1");
    // A commit to other files does not put the service further behind.
    up.write("elsewhere/x", "1").commit("elsewhere");
    let a = d.pull(false);
    assert_eq!(a.status.behind, Some(1));

    let a = d.act(Command::Unfreeze("app".into()));
    assert_eq!(a.status.state, "OK");
    wait_until("catch up after unfreeze", DEADLINE, || {
        d.status("app").deployed.as_deref() == Some(v2.as_str())
    });
    assert_eq!(conf(&state), "2");
    assert_eq!(d.status("app").behind, Some(0));

    let answer = d.try_status("nope");
    assert!(
        matches!(&answer, Err(CommandError::UnknownService(s)) if s == "nope"),
        "{answer:?}"
    );
}

#[test]
fn rollback_pins_an_old_revision_until_unfrozen() {
    let root = temp_root();
    let (up, config, state, v1) = setup(root.path());
    let d = InProcess::start(&config);
    wait_until("first deploy", DEADLINE, || {
        d.status("app").deployed.as_deref() == Some(v1.as_str())
    });
    up.write("app/conf", "2").commit("v2");
    let a = d.pull(false);
    assert_eq!(a.status.state, "OK");
    assert_eq!(conf(&state), "2");

    // An abbreviated hash is enough; the answer comes once the old files are in place.
    let a = d.act(Command::Rollback {
        service: "app".into(),
        revision: v1[..8].to_owned(),
    });
    assert!(a.ok, "{a:?}");
    assert_eq!(a.status.state, "FREEZE");
    assert_eq!(a.status.pinned.as_deref(), Some(v1.as_str()));
    assert_eq!(conf(&state), "1");

    // Unknown revisions are refused with a clear message.
    match d.call(Command::Rollback {
        service: "app".into(),
        revision: "no-such-rev".into(),
    }) {
        Err(e @ CommandError::Rollback(_)) => {
            let m = plumb::error::chain(&e);
            assert!(m.contains("unknown revision \"no-such-rev\""), "{m}")
        }
        other => panic!("{other:?}"),
    }

    d.act(Command::Unfreeze("app".into()));
    wait_until("back to the head", DEADLINE, || conf(&state) == "2");
    assert_eq!(d.status("app").pinned, None);
}

/// `rollback` to a commit that changed other services' files only: the service's files there are
/// an older revision's, and the answer names both; how far the pin trails the head is known at
/// once; a timed freeze does not end the pin.
#[test]
fn a_rollback_names_the_revision_of_the_services_files_and_outlives_a_timed_freeze() {
    let root = temp_root();
    let (up, config, state, v1) = setup(root.path());
    let elsewhere = up.write("elsewhere/x", "1").commit("elsewhere");
    let v3 = up.write("app/conf", "3").commit("v3");
    let d = InProcess::start(&config);
    wait_until("first deploy", DEADLINE, || {
        d.status("app").deployed.as_deref() == Some(v3.as_str())
    });

    let a = d.act(Command::Rollback {
        service: "app".into(),
        revision: elsewhere[..10].to_owned(),
    });
    assert!(a.ok, "{a:?}");
    assert_eq!(conf(&state), "1");
    assert_eq!(a.status.pinned.as_deref(), Some(elsewhere.as_str()));
    assert_eq!(a.status.deployed.as_deref(), Some(v1.as_str()));
    assert_eq!(
        a.status.info,
        format!(
            "rolled back to {}: the service's files there are those of {}; pinned there until \
             unfrozen",
            &elsewhere[..12],
            &v1[..12]
        )
    );
    assert!(a.message.contains(&a.status.info), "{}", a.message);
    // v3 changed the service's files after the pin: one change behind, in the answer already.
    assert_eq!(a.status.behind, Some(1));
    assert_eq!(d.status("app").behind, Some(1));
    assert!(a.status.frozen && a.status.frozen_until.is_none(), "{a:?}");

    // A freeze for a second on the pinned service: it says the pin stays, and it does.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let a = d.freeze(Some(now + 1));
    assert!(a.ok);
    assert_eq!(
        a.message,
        format!(
            "freeze: app stays pinned to {} by its rollback until unfrozen; a pin has no end \
             time, so the duration does not apply",
            &elsewhere[..12]
        )
    );
    assert_eq!(a.status.frozen_until, None);
    // Past the second asked for, a fetch (a pull) still leaves it pinned on the old files.
    wait_until("the second to pass", DEADLINE, || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            > now + 1
    });
    let a = d.pull(false);
    assert_eq!(
        (a.status.state.as_str(), a.status.pinned.as_deref()),
        ("FREEZE", Some(elsewhere.as_str()))
    );
    assert_eq!(conf(&state), "1");
    assert_eq!(a.status.behind, Some(1));
}

/// A hash too short or shared by several objects is refused with what to type instead.
#[test]
fn a_short_or_ambiguous_hash_gets_a_hint() {
    let root = temp_root();
    let (up, config, _state, v1) = setup(root.path());
    // Enough objects that two of their hashes share their first four characters.
    for i in 0..1500 {
        up.write(&format!("bulk/{i}"), &format!("{i}\n"));
    }
    up.commit("bulk");
    let d = InProcess::start(&config);
    wait_until("first deploy", DEADLINE, || {
        d.status("app").deployed.is_some()
    });
    let objects = support::git(
        &up.bare,
        &[
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objectname)",
        ],
    );
    let mut prefixes: Vec<&str> = objects.lines().map(|o| &o[..4]).collect();
    prefixes.sort();
    let shared = prefixes
        .windows(2)
        .find(|w| w[0] == w[1])
        .map(|w| w[0])
        .expect("two objects sharing four characters among 1500");
    let refusal = |revision: &str| match d.call(Command::Rollback {
        service: "app".into(),
        revision: revision.into(),
    }) {
        Err(e @ CommandError::Rollback(_)) => e.to_string(),
        other => panic!("{revision}: {other:?}"),
    };
    let m = refusal(shared);
    assert!(
        m.starts_with(&format!("unknown revision {shared:?} in "))
            && m.ends_with(
                "; more than one object's hash starts with it: give more characters \
                 (plumbctl status shows whole hashes)"
            ),
        "{m}"
    );
    let m = refusal(&v1[..3]);
    assert!(
        m.ends_with(
            "; an abbreviated hash needs at least 4 characters (7 or more are rarely ambiguous)"
        ),
        "{m}"
    );
}

#[test]
fn a_freeze_survives_a_restart_and_a_timed_one_ends_by_itself() {
    let root = temp_root();
    let (up, config, state, v1) = setup(root.path());
    {
        let d = InProcess::start(&config);
        wait_until("first deploy", DEADLINE, || {
            d.status("app").deployed.as_deref() == Some(v1.as_str())
        });
        d.freeze(None);
    }
    up.write("app/conf", "2").commit("v2");
    {
        let d = InProcess::start(&config);
        let a = d.pull(false);
        assert_eq!(a.status.state, "FREEZE", "{a:?}");
        assert_eq!(conf(&state), "1");
        // A freeze that ends two seconds from now: the daemon unfreezes and catches up alone.
        let until = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 2;
        d.freeze(Some(until));
        wait_until("the timed freeze to end", DEADLINE, || {
            d.status("app").state == "OK" && conf(&state) == "2"
        });
    }
}

#[test]
fn local_edits_are_diff_never_overwritten_until_pull_force() {
    let root = temp_root();
    let (up, config, state, v1) = setup(root.path());
    let d = InProcess::start(&config);
    wait_until("first deploy", DEADLINE, || {
        d.status("app").deployed.as_deref() == Some(v1.as_str())
    });
    let file = state.join("checkouts/app/app/conf");
    std::fs::write(&file, "edited by hand").unwrap();
    let v2 = up.write("app/conf", "2").commit("v2");
    let a = d.pull(false);
    assert_eq!(a.status.state, "DIFF", "{a:?}");
    assert!(
        a.status.info.contains("local edits to app/conf"),
        "{}",
        a.status.info
    );
    // The edit is kept, and v2 waits.
    assert_eq!(conf(&state), "edited by hand");

    let a = d.pull(true);
    assert_eq!(a.status.state, "OK", "{a:?}");
    assert_eq!(a.status.deployed.as_deref(), Some(v2.as_str()));
    assert_eq!(conf(&state), "2");

    // Undoing an edit by hand clears the DIFF by itself.
    std::fs::write(state.join("checkouts/app/app/extra"), "stray").unwrap();
    let a = d.pull(false);
    assert_eq!(a.status.state, "DIFF");
    std::fs::remove_file(state.join("checkouts/app/app/extra")).unwrap();
    let a = d.pull(false);
    assert_eq!(a.status.state, "OK", "{a:?}");
}

/// A service's own files beside the checkout that its `.gitignore` covers (a log it writes) are
/// not local edits, pull after pull and as they grow; a stray beside them still is.
#[test]
fn ignored_files_in_a_checkout_are_not_local_edits() {
    let root = temp_root();
    let (up, config, state, _) = setup(root.path());
    let v2 = up.write("app/.gitignore", "*.log\n").commit("v2");
    let d = InProcess::start(&config);
    wait_until("deploy of v2", DEADLINE, || {
        d.status("app").deployed.as_deref() == Some(v2.as_str())
    });
    let log = state.join("checkouts/app/app/app.log");
    for line in [
        "started\n",
        "started\nserving\n",
        "started\nserving\nstill\n",
    ] {
        std::fs::write(&log, line).unwrap();
        let a = d.pull(false);
        assert_eq!(a.status.state, "OK", "{a:?}");
    }
    let stray = state.join("checkouts/app/app/notes.txt");
    std::fs::write(&stray, "n").unwrap();
    let a = d.pull(false);
    assert_eq!(a.status.state, "DIFF", "{a:?}");
    assert!(a.status.info.contains("app/notes.txt"), "{}", a.status.info);
    assert!(!a.status.info.contains("app.log"), "{}", a.status.info);
    std::fs::remove_file(&stray).unwrap();
    let a = d.pull(false);
    assert_eq!(a.status.state, "OK", "{a:?}");
    assert!(log.exists(), "the service's own file is left alone");
    // A deploy makes the checkout exactly git's: the ignored file goes, as every stray does.
    let v3 = up.write("app/conf", "3").commit("v3");
    let a = d.pull(false);
    assert_eq!(a.status.deployed.as_deref(), Some(v3.as_str()), "{a:?}");
    assert!(!log.exists());
}

#[test]
fn diff_shows_what_the_next_pull_would_change() {
    let root = temp_root();
    let (up, config, state, v1) = setup(root.path());
    let d = InProcess::start(&config);
    wait_until("first deploy", DEADLINE, || {
        d.status("app").deployed.as_deref() == Some(v1.as_str())
    });
    d.freeze(None);
    let v2 = up
        .write("app/conf", "2")
        .write("app/new", "n")
        .write("other/x", "x")
        .commit("v2");
    d.pull(false);
    let diff = d.diff("app").unwrap();
    assert_eq!(diff.from.as_deref(), Some(v1.as_str()));
    assert_eq!(diff.to.as_deref(), Some(v2.as_str()));
    assert_eq!(diff.commits, Some(1));
    let files: Vec<(&str, &str)> = diff
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.change.as_str()))
        .collect();
    assert_eq!(files, vec![("app/conf", "modified"), ("app/new", "added")]);
    // Nothing was deployed by asking.
    assert_eq!(conf(&state), "1");
}

#[test]
fn wipe_rebuilds_a_deleted_or_edited_checkout_at_the_same_revision() {
    let root = temp_root();
    let (up, config, state, _) = setup(root.path());
    let deeper = up.write("app/sub/deep", "d").commit("deeper");
    let d = InProcess::start(&config);
    wait_until("first deploy", DEADLINE, || {
        d.status("app").deployed.as_deref() == Some(deeper.as_str())
    });
    let checkout = state.join("checkouts/app");
    std::fs::remove_dir_all(&checkout).unwrap();
    let a = d.pull(false);
    assert_eq!(a.status.state, "DIFF", "{a:?}");
    assert!(a.status.info.contains("app/conf"), "{}", a.status.info);

    let a = d.act(Command::Wipe("app".into()));
    assert!(a.ok, "{a:?}");
    assert_eq!(a.status.state, "OK", "{a:?}");
    assert_eq!(conf(&state), "1");
    assert_eq!(
        std::fs::read_to_string(checkout.join("app/sub/deep")).unwrap(),
        "d"
    );

    // Local edits go too, and the revision stays where it was.
    std::fs::write(checkout.join("app/conf"), "edited").unwrap();
    let a = d.act(Command::Wipe("app".into()));
    assert_eq!(a.status.state, "OK", "{a:?}");
    assert_eq!(conf(&state), "1");
    assert_eq!(a.status.deployed.as_deref(), Some(deeper.as_str()));
    let answer = d.call(Command::Wipe("nope".into()));
    assert!(
        matches!(&answer, Err(CommandError::UnknownService(s)) if s == "nope"),
        "{answer:?}"
    );
}

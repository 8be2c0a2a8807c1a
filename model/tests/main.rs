//! Exhaustive checks of the room's election and commit rules, and proof that the check can fail.
//!
//! `cargo test -p hashvote-model -- --nocapture` runs the small instances (well under a minute in
//! the workspace's debug profile on 2 cores) and prints the states explored and the time of each;
//! `cargo test -p hashvote-model --release -- --ignored --nocapture` runs the larger, documented
//! ones (4 min 20 s here for both together: terms <= 3 with a restart, 4.1 M states; two ballots,
//! 0.86 M; lossy, 2.2 M; figure 8 found after 5.2 M). `cargo run -p hashvote-model --release --bin room-model -- --help` runs any bounds.

use hashvote_model::{Faults, Report, RoomModel, Settings, Variant, check};
use stateright::{Expectation, Model};

/// The machine has 2 cores.
const THREADS: usize = 2;

fn settings(max_term: u8, max_log: u8, ballots: u8, variant: Variant) -> Settings {
    Settings { max_term, max_log, ballots, variant, any_prefix: false, wait_for_all_ballots: false, changes: false }
}

fn faults(max_restarts: u8) -> Faults {
    Faults { max_restarts, lossy: false }
}

fn print(label: &str, model: &RoomModel, r: &Report) {
    println!("{label}: {}", r.summary(model));
    for (name, path) in &r.discoveries {
        println!("  `{name}` found by:\n{path}");
    }
}

/// Runs the whole check and asserts: no counterexample, an example for every `sometimes`.
fn assert_holds(label: &str, model: RoomModel) -> Report {
    let r = check(model.clone(), THREADS, false);
    print(label, &model, &r);
    assert!(r.complete, "{label}: the check did not finish");
    for p in model.properties() {
        let found = r.discovery(p.name);
        match p.expectation {
            Expectation::Sometimes => assert!(found.is_some(), "{label}: no example of `{}`", p.name),
            _ => assert!(found.is_none(), "{label}: counterexample to `{}`:\n{}", p.name, found.unwrap_or("")),
        }
    }
    assert!(r.failures(&model).is_empty());
    r
}

/// Runs the check until the first counterexample and asserts that it refutes `property`.
fn assert_caught(label: &str, model: RoomModel, property: &str) {
    let r = check(model.clone(), THREADS, true);
    print(label, &model, &r);
    assert!(r.discovery(property).is_some(), "{label}: the broken rules were not caught by `{property}`");
}

/// The design's rules up to term 3: 3 peers, one entry per log, reordering and duplication.
#[test]
fn rules_are_safe_up_to_term_3() {
    assert_holds("terms <= 3", RoomModel::new(settings(3, 1, 1, Variant::Correct), faults(0)));
}

/// A crash-restart at any moment of any peer: only term, vote and log survive.
#[test]
fn rules_are_safe_with_a_restart() {
    assert_holds("one restart", RoomModel::new(settings(2, 1, 1, Variant::Correct), faults(1)));
}

/// Appends after every prefix length: the follower's link check and truncation are exercised.
#[test]
fn rules_are_safe_with_appends_after_any_prefix() {
    let s = Settings { any_prefix: true, ..settings(2, 1, 1, Variant::Correct) };
    assert_holds("any prefix", RoomModel::new(s, faults(0)));
}

/// A lossy network changes nothing (a never-delivered message is already a lost one).
#[test]
fn rules_are_safe_on_a_lossy_network() {
    let f = Faults { max_restarts: 1, lossy: true };
    assert_holds("lossy", RoomModel::new(settings(1, 1, 1, Variant::Correct), f));
}

/// Liveness, where it can hold: reliable network, no restart, equal (empty) logs, and voters
/// that wait for every member's ballot. Then every maximal run elects a controller, even when a
/// peer times out into the next term before the vote ends. (stateright checks `eventually` only
/// on paths that end in a terminal state; this model is acyclic — terms, votes and the set of
/// messages only grow — so every path ends in one and the check is complete.)
#[test]
fn a_controller_is_eventually_elected() {
    let s = Settings { wait_for_all_ballots: true, ..settings(3, 0, 2, Variant::Correct) };
    let r = assert_holds("liveness", RoomModel::new(s, faults(0)));
    assert!(r.discovery("eventually a controller is elected").is_none());
}

/// Broken: the vote is not persisted. A voter grants one candidate, restarts, grants another.
#[test]
fn a_vote_lost_in_a_restart_is_caught() {
    let model = RoomModel::new(settings(1, 1, 1, Variant::VoteNotDurable), faults(1));
    assert_caught("vote not durable", model, "one controller per term");
}

/// Broken: voters skip the up-to-date check, so a peer without a committed entry is elected.
#[test]
fn a_grant_without_the_up_to_date_check_is_caught() {
    let model = RoomModel::new(settings(2, 1, 1, Variant::NoUpToDateCheck), faults(0));
    assert_caught("no up-to-date check", model, "controller holds committed entries");
}

/// Changes of members (docs/PROTOCOL.md, "Changes of members"): a controller may toggle one
/// peer's membership per entry, only once every entry of its log is committed and the last is of
/// its own term; every peer counts votes and copies against the configuration of its whole log,
/// uncommitted changes included. Terms <= 2 and logs of 2 entries (an entry, then a change; 1.3 M
/// states, about 20 s).
#[test]
fn changes_of_members_are_safe() {
    let s = Settings { changes: true, ..settings(2, 2, 1, Variant::Correct) };
    assert_holds("changes of members", RoomModel::new(s, faults(0)));
}

/// Broken: a controller changes the members again before its last change is committed, so two
/// configurations two changes apart are in use at once: {0} alone elects 0 while {0, 1, 2}
/// elects another controller of the same term.
#[test]
fn a_change_while_the_last_is_uncommitted_is_caught() {
    let s = Settings { changes: true, ..settings(2, 2, 1, Variant::ChangeUncommitted) };
    assert_caught("change while one is uncommitted", RoomModel::new(s, faults(0)), "one controller per term");
}

/// Broken: the controller commits a quorum-stored entry of an earlier term (Raft's figure 8).
/// Needs four terms with three peers, so about a minute in a release build.
#[test]
#[ignore = "about a minute in release; run with --release -- --ignored"]
fn committing_an_earlier_terms_entry_is_caught() {
    let model = RoomModel::new(settings(4, 1, 1, Variant::CommitOldTerm), faults(0));
    assert_caught("figure 8", model, "controller holds committed entries");
}

/// The larger documented run: terms <= 3 with a restart, two ballot values (any candidate can be
/// preferred), and terms <= 2 on a lossy network.
#[test]
#[ignore = "minutes; run with --release -- --ignored"]
fn rules_are_safe_larger_instances() {
    assert_holds("terms <= 3, one restart", RoomModel::new(settings(3, 1, 1, Variant::Correct), faults(1)));
    assert_holds("two ballots", RoomModel::new(settings(2, 1, 2, Variant::Correct), faults(0)));
    let f = Faults { max_restarts: 0, lossy: true };
    assert_holds("terms <= 2, lossy", RoomModel::new(settings(2, 1, 1, Variant::Correct), f));
}

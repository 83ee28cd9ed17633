//! Simulation tests (build with `--cfg madsim`, see README): whole runs of the cluster.
//! - a few seeds pass every invariant, and every checker actually checked something;
//! - every named scenario passes at a small size;
//! - property: random (seed, cluster size, fault mode) pass every invariant;
//! - one seed gives the same history twice (also under swarm faults), another seed a
//!   different one;
//! - pinned regression seeds (default run and swarm) keep passing;
//! - with `--features canaries`, every canary bug is caught by its checker within a few
//!   seeds of its scenario, and within a few swarm seeds.

#![cfg(madsim)]

use nodes::canary::Canaries;
use sim::cli::Opts;
use sim::run::run_opts as run_on_fresh_thread;

fn small(seed: u64) -> Opts {
    Opts {
        seed,
        users: 40,
        duration: 90,
        liveness_budget: 60,
        ..Opts::defaults()
    }
}

fn assert_passes(what: &str, o: &sim::outcome::Outcome) {
    for r in &o.reports {
        assert_eq!(
            r.violation_count, 0,
            "{what}: {} violated: {:?}",
            r.name, r.violations
        );
    }
}

// Proves every named scenario keeps every invariant at a small size (40 users, 150 s of
// faults), with its faults applied; quorum-loss, data loss by definition, has its own test.
#[test]
fn every_scenario_passes_small() {
    for (name, _) in scenarios::SCENARIOS
        .iter()
        .filter(|(n, _)| *n != "quorum-loss")
    {
        let opts = Opts {
            scenario: name.to_string(),
            duration: 150,
            ..small(1)
        };
        let o = run_on_fresh_thread(&opts, &Canaries::none());
        assert_passes(&format!("scenario {name}"), &o);
        if *name != "none" {
            assert!(o.stats.faults > 0, "scenario {name} applied no fault");
        }
    }
}

// Proves admission control refuses rather than queues, and loses nothing: with each chat
// server allowed one send in flight and 30 sends per user per minute, sends beyond it are
// refused `overloaded` (devices see
// the code, servers count it), the devices resend them, and every invariant holds (no_loss
// covers every acknowledged send).
#[test]
fn overload_is_refused_and_retried() {
    let opts = Opts {
        sends_in_flight: 1,
        rate: 30.0,
        ..small(3)
    };
    let o = run_on_fresh_thread(&opts, &Canaries::none());
    assert_passes("overload", &o);
    let shown = o.stats.errors.get("overloaded").copied().unwrap_or(0);
    let counted = o
        .stats
        .server_errors
        .get("overloaded")
        .copied()
        .unwrap_or(0);
    assert!(
        shown > 0 && counted > 0,
        "no send was refused: {:?}",
        o.stats.errors
    );
    assert!(o.stats.acks > 0);
}

// Proves a quorum loss is reported as what it is: the run says which shards lost a quorum of
// their disks and that a forced recovery followed, every shard serves again afterwards, and
// nothing is garbled (what fails, if anything, is loss: no_loss or order, never duplicates,
// ids, integrity or limits).
#[test]
fn quorum_loss_is_reported() {
    for seed in [1, 2] {
        let opts = Opts {
            scenario: "quorum-loss".into(),
            ..Opts {
                seed,
                ..Opts::defaults()
            }
        };
        let o = run_on_fresh_thread(&opts, &Canaries::none());
        let notes = o.stats.notes.join("\n");
        assert!(notes.contains("quorum lost"), "seed {seed}: {notes}");
        assert!(notes.contains("forced recovery"), "seed {seed}: {notes}");
        assert!(!notes.contains("FAILED"), "seed {seed}: {notes}");
        for r in o.reports.iter().filter(|r| r.violation_count > 0) {
            assert!(
                ["no_loss", "order"].contains(&r.name),
                "seed {seed}: {} after a quorum loss: {:?}",
                r.name,
                r.violations
            );
        }
        assert!(
            o.stats.acks > 0 && o.convergence.all_connected_after_us.is_some(),
            "seed {seed}: the system serves again after the recovery"
        );
    }
}

// Property: any seed, with any cluster size and fault mode drawn below, keeps every
// invariant. The case count fits CI (each case is a small run); the proptest seed is fixed so
// CI is reproducible, and a failure prints the exact case.
#[test]
fn random_clusters_and_faults_pass() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let config = Config {
        cases: 16,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let knobs = (
        any::<u64>(),
        20u32..60,
        1u32..=3,
        1u32..=3,
        1u32..=2,
        prop::sample::select(vec!["swarm", "light", "everything", "tunnel-commute"]),
    );
    runner
        .run(&knobs, |(seed, users, chat, kv, idgen, faults)| {
            let opts = Opts {
                seed,
                users,
                chat,
                kv,
                replicas: kv.min(3),
                idgen,
                duration: 120,
                scenario: faults.to_string(),
                ..small(seed)
            };
            let o = run_on_fresh_thread(&opts, &Canaries::none());
            let failed = o.failed();
            prop_assert!(
                failed.is_empty(),
                "failed {failed:?}; replay: cargo run --release -p sim -- {}",
                opts.repro_args()
            );
            Ok(())
        })
        .unwrap();
}

// Proves small runs with light faults keep every invariant on several seeds, and that no
// checker was vacuous (each made checks).
#[test]
fn seeds_pass_all_invariants() {
    for seed in [1, 2, 3] {
        let o = run_on_fresh_thread(&small(seed), &Canaries::none());
        for r in &o.reports {
            assert!(
                r.checks > 0,
                "seed {seed}: checker {} checked nothing",
                r.name
            );
            assert_eq!(
                r.violation_count, 0,
                "seed {seed}: {} violated: {:?}",
                r.name, r.violations
            );
        }
        assert!(o.stats.acks > 0 && o.stats.delivers > 0);
    }
}

// Proves determinism: the same seed twice (fresh thread and runtime each) gives a
// byte-identical history; another seed gives a different one.
#[test]
fn same_seed_same_history() {
    let a = run_on_fresh_thread(&small(7), &Canaries::none());
    let b = run_on_fresh_thread(&small(7), &Canaries::none());
    assert_eq!(a.stats.history_hash, b.stats.history_hash);
    assert_eq!(a.history, b.history);
    let c = run_on_fresh_thread(&small(8), &Canaries::none());
    assert_ne!(a.stats.history_hash, c.stats.history_hash);
}

// Proves determinism under swarm faults: partitions, pauses, crashes and clock steps replay
// to a byte-identical history.
#[test]
fn same_swarm_seed_same_history() {
    let opts = Opts {
        faults: Some("swarm".into()),
        duration: 150,
        ..small(11)
    };
    let a = run_on_fresh_thread(&opts, &Canaries::none());
    let b = run_on_fresh_thread(&opts, &Canaries::none());
    assert!(a.stats.faults > 0);
    assert_eq!(a.stats.history_hash, b.stats.history_hash);
}

/// Each canary, the checkers meant to catch it, the named scenario that gives it a chance
/// (the default `light` for issue 2's canaries), and the kv copies it runs with
/// (kv-ack-before-sync is the single-copy bug: with three copies a crash of one loses
/// nothing acknowledged).
#[cfg(feature = "canaries")]
const CANARIES: [(&str, &[&str], &str, u32); 16] = [
    ("ack-before-persist", &["no_loss", "order"], "light", 3),
    ("cursor-by-message-id", &["no_loss", "order"], "light", 3),
    ("no-dedup", &["no_duplicates"], "light", 3),
    ("presence-no-timeout", &["presence"], "light", 3),
    ("push-to-online", &["push"], "light", 3),
    ("push-ignores-claim", &["push"], "light", 3),
    ("stale-chat-server", &["no_loss"], "partition-halves", 3),
    ("idgen-ignores-clock", &["ids"], "idgen-clock-back", 3),
    ("idgen-shared-worker", &["ids"], "light", 3),
    ("kv-ack-before-sync", &["no_loss", "order"], "kv-crash", 1),
    (
        "ack-before-quorum",
        &["no_loss", "order"],
        "kv-leader-partition",
        3,
    ),
    ("stale-read", &["no_loss"], "kv-leader-partition", 3),
    ("skip-checksum", &["integrity"], "kv-storage-faults", 3),
    ("unauthenticated-rpc", &["security"], "light", 3),
    ("skip-membership-check", &["security"], "light", 3),
    ("presence-to-strangers", &["security"], "light", 3),
];

/// The first seed in `seeds` on which `canary` is caught by one of `checkers`.
#[cfg(feature = "canaries")]
fn caught_on(
    canary: &str,
    checkers: &[&str],
    seeds: std::ops::RangeInclusive<u64>,
    opts: impl Fn(u64) -> Opts,
) -> Option<u64> {
    let canaries = Canaries::parse([canary]).expect("canary known and compiled in");
    seeds.into_iter().find(|&seed| {
        let o = run_on_fresh_thread(
            &Opts {
                canary: vec![canary.to_string()],
                ..opts(seed)
            },
            &canaries,
        );
        o.reports
            .iter()
            .any(|r| checkers.contains(&r.name) && r.violation_count > 0)
    })
}

// Proves each canary bug is caught by the checker meant for it within seeds 1-16 of its
// scenario at the default size (200 users, 5 minutes). All but one are caught on seed 1.
// skip-checksum is caught only when a rotten sector is read back, which needs the node whose
// files rotted to lead a shard after its restart and a sync to reach that page: 1 seed in 16
// of kv-storage-faults today (seed 10); see docs/ARCHITECTURE.md "Not yet".
#[cfg(feature = "canaries")]
#[test]
fn canaries_are_caught() {
    for (name, checkers, scenario, replicas) in CANARIES {
        let caught = caught_on(name, checkers, 1..=16, |seed| Opts {
            seed,
            scenario: scenario.to_string(),
            replicas,
            ..Opts::defaults()
        });
        assert!(
            caught.is_some(),
            "canary {name} was not caught by {checkers:?} on seeds 1-16 of {scenario}"
        );
        eprintln!(
            "canary {name}: caught on seed {} of {scenario}",
            caught.unwrap_or(0)
        );
    }
}

// Proves each canary is also caught under swarm faults (kinds, rates and targets drawn from
// the seed), within swarm seeds 1-32.
#[cfg(feature = "canaries")]
#[test]
fn canaries_are_caught_in_swarm_mode() {
    // 32 seeds: `skip-checksum` is caught only where bit rot is read back from disk by a
    // leader, and where that happens moves with every change of timing (seed 16 after the
    // presence fix of 2026-12-05, seed 18 after the cheaper push and cursor paths; 16 of
    // swarm seeds 17-64 catch it, none of 1-16); the others are caught on the first seed or
    // two.
    for (name, checkers, _, replicas) in CANARIES {
        let caught = caught_on(name, checkers, 1..=32, |seed| Opts {
            seed,
            faults: Some("swarm".into()),
            replicas,
            ..Opts::defaults()
        });
        assert!(
            caught.is_some(),
            "canary {name} was not caught by {checkers:?} on swarm seeds 1-32"
        );
        eprintln!(
            "canary {name}: caught on swarm seed {}",
            caught.unwrap_or(0)
        );
    }
}

// Regressions, each proving its seed keeps every invariant at the default size:
// - seeds 1 and 42 once lost a message and left a presence view stale: a device connected
//   while its kv shard was restarting, its session was never written to the session registry,
//   and it silently got no live messages (sessions are now refused until registered);
// - seed 84 once left a device showing a friend online forever: the offline change went out
//   1.9 s after its chat server restarted, before presence knew that server again (chat
//   servers now subscribe to presence before accepting devices);
// - seed 99 once lost live messages to a device: an abandoned connection's late registry
//   write replaced the live connection's entry, and its close then removed it (hello now
//   numbers connections; an older one never replaces a newer one).
#[test]
fn regression_seeds() {
    for seed in [1, 42, 84, 99] {
        let o = run_on_fresh_thread(
            &Opts {
                seed,
                ..Opts::defaults()
            },
            &Canaries::none(),
        );
        assert_passes(&format!("seed {seed}"), &o);
    }
}

// Regressions under swarm faults (default size), each proving its seed keeps every invariant:
// - seed 39 lost messages three ways: a reconnect sync refused while a kv shard restarted was
//   never asked again (devices now retry unanswered syncs); a chat server cut off from
//   discovery kept its devices while peers stopped delivering to it (servers now fence
//   themselves when their lease lapses); a fanout whose delivery failed was marked done
//   (it now stays pending for the sweep);
// - seed 5 showed a silent user online too long: the offline change waited for the user's
//   kv shard (presence now keeps friend lists of online users);
// - seed 38 showed a stale presence after a disconnect the device never noticed;
// - seed 26 failed the push rule while the push node and the recipients' kv shard were down
//   (a delivery now stands in for a push a crash made impossible in time);
// - seed 112 went dark while discovery was down: every chat server fenced itself (servers now
//   fence only when a peer still renews or none answers);
// - seed 117 lost a message to a live server briefly missing from discovery's list (such
//   fanouts now stay pending);
// - seed 110 judged presence on heartbeats a healed partition delivered late (fault windows
//   now extend 10 s past the heal).
#[test]
fn swarm_regression_seeds() {
    for seed in [5, 26, 38, 39, 110, 112, 117] {
        let o = run_on_fresh_thread(
            &Opts {
                seed,
                faults: Some("swarm".into()),
                ..Opts::defaults()
            },
            &Canaries::none(),
        );
        assert_passes(&format!("swarm seed {seed}"), &o);
    }
}

//! Command-line options of the simulator.

use std::path::PathBuf;

use workloads::model::Scale;

/// chatsim: a Messenger-style chat system in a deterministic simulator.
///
/// Runs the whole cluster (api, discovery, chat, idgen, replicated kv, presence, push) and
/// every device as nodes of a seeded madsim simulation, drives a workload under a fault
/// schedule (the safety phase: partitions, tunnels, crashes, clock steps, pauses, latency,
/// loss, and kv disk loss, leader partitions, torn writes, corruption, slow disks), heals
/// everything and brings every device online (the liveness phase), and checks from what the
/// clients observed that no acknowledged message was lost, reordered or duplicated, that ids
/// are unique, that presence and push behaved, that no corrupt data was served, and that
/// every kv shard is whole again. Same seed, same run. Exit 0 when every invariant holds.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "sim", version)]
pub struct Opts {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The seed: everything in the run derives from it.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Users in the workload (each has 1-3 devices).
    #[arg(long, default_value_t = 200)]
    pub users: u32,
    /// The workload (see --list-workloads): `stress` (default) or a scaled model hour such as
    /// `peak-hour`.
    #[arg(long, default_value = "stress", value_name = "NAME")]
    pub workload: String,
    /// List the workloads and exit.
    #[arg(long)]
    pub list_workloads: bool,
    /// Population as a fraction of --dau, e.g. `1/1000` (50,000 users of 50M); sets --users.
    #[arg(long, value_name = "FRACTION", value_parser = parse_scale)]
    pub scale: Option<Scale>,
    /// Daily active users the model stands for (with --scale).
    #[arg(long, default_value_t = 50_000_000)]
    pub dau: u64,
    /// Write a run report here: report.md, report.json and SVG plots.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Never draw the progress bar (it is drawn on stderr only when stderr is a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Simulated seconds of the safety phase (traffic and faults).
    #[arg(long, default_value_t = 300)]
    pub duration: u64,
    /// Simulated seconds of the liveness phase: every device online; liveness invariants must
    /// hold by its end.
    #[arg(long, default_value_t = 60)]
    pub liveness_budget: u64,
    /// Messages per user per minute while a device is online.
    #[arg(long, default_value_t = 2.5)]
    pub rate: f64,
    /// Run without injected faults (same as `--scenario none`). Scripted connection drops stay.
    #[arg(long)]
    pub no_faults: bool,
    /// The fault scenario (see --list-scenarios).
    #[arg(long, default_value = "light", value_name = "NAME")]
    pub scenario: String,
    /// `swarm`: fault kinds, rates and targets drawn from the seed (same as `--scenario
    /// swarm`); `scenario`: use --scenario; `none`: no faults.
    #[arg(long, value_name = "MODE", value_parser = ["swarm", "scenario", "none"])]
    pub faults: Option<String>,
    /// List the named scenarios and exit.
    #[arg(long)]
    pub list_scenarios: bool,
    /// Replay the fault schedule in this JSON file (as written by --shrink) instead of a
    /// scenario.
    #[arg(long, value_name = "FILE")]
    pub schedule: Option<PathBuf>,
    /// Print every fault of the schedule before the run.
    #[arg(long)]
    pub print_schedule: bool,
    /// Run a range of seeds, `A..B` (B excluded) or `A..=B`, each on a fresh thread, and print
    /// a summary of failures with the command that replays each.
    #[arg(long, value_name = "A..B")]
    pub seeds: Option<String>,
    /// Seeds run at once with --seeds (each on its own thread).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// If the run fails, replay the seed with subsets of its fault schedule (delta debugging),
    /// write the smallest schedule that still fails, and print the command that replays it.
    #[arg(long)]
    pub shrink: bool,
    /// At most this many replays while shrinking.
    #[arg(long, default_value_t = 150)]
    pub shrink_runs: usize,
    /// Where --shrink writes the smallest failing schedule (default: shrunk-seed-SEED.json).
    #[arg(long, value_name = "FILE")]
    pub shrink_out: Option<PathBuf>,
    /// Write the history (JSON lines, see docs/ARCHITECTURE.md) to this file.
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
    /// Run the seed twice (fresh thread and runtime each), compare history hashes, exit 1 on
    /// a mismatch.
    #[arg(long)]
    pub check_determinism: bool,
    /// Switch on a canary bug (needs `--features canaries`; `--canary list` names them).
    #[arg(long, value_name = "NAME")]
    pub canary: Vec<String>,
    /// api nodes.
    #[arg(long, default_value_t = 2)]
    pub api: u32,
    /// chat server nodes.
    #[arg(long, default_value_t = 3)]
    pub chat: u32,
    /// idgen nodes (their clocks are skewed apart by up to 200 ms, drawn from the seed).
    #[arg(long, default_value_t = 2)]
    pub idgen: u32,
    /// presence nodes (user u's presence on node u % n).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=250))]
    pub presence: u32,
    /// push nodes (any serves any request; claims in kv keep one push per device).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=250))]
    pub push: u32,
    /// kv nodes (`--kv` works too).
    #[arg(long = "kv-nodes", alias = "kv", default_value_t = 3)]
    pub kv: u32,
    /// Copies of each kv shard, on distinct kv nodes (at most --kv-nodes).
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// kv shards (Raft groups); 0: one per kv node, so each node prefers to lead one.
    #[arg(long, default_value_t = 0)]
    pub kv_shards: u32,
    /// Sends each chat server commits at once at most; past it a send is refused `overloaded`
    /// and the device backs off (admission control; default `limits::SENDS_IN_FLIGHT_MAX`,
    /// the ceiling of the adaptive limit). A small value makes a run an overload run.
    #[arg(long, default_value_t = nodes::limits::SENDS_IN_FLIGHT_MAX as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub sends_in_flight: u32,
    /// The commit latency each chat server's adaptive admission limit aims at, in ms (0: the
    /// limit is fixed at --sends-in-flight; see `nodes::chat::admission`).
    #[arg(long, default_value_t = nodes::limits::ADMISSION_TARGET_MS)]
    pub admission_target_ms: u64,
    /// Devices speak plain http and ws:// (default: https and wss://, as `chatd` serves them,
    /// with a self-signed certificate drawn from the seed).
    #[arg(long)]
    pub client_plaintext: bool,
    /// Print at most this many violations per invariant.
    #[arg(long, default_value_t = 5)]
    pub show_violations: usize,
}

fn parse_scale(s: &str) -> Result<Scale, String> {
    Scale::parse(s)
}

/// Subcommands besides the default (run a seed).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Plan capacity for a number of daily active users: simulate the model's peak hour at a
    /// small scale (no faults), measure per-operation costs, and write capacity.md and
    /// capacity.json.
    Capacity(CapacityOpts),
}

#[derive(Debug, Clone, clap::Args)]
pub struct CapacityOpts {
    /// Daily active users to plan for.
    #[arg(long, default_value_t = 50_000_000)]
    pub dau: u64,
    /// Where to write capacity.md and capacity.json (and the measurement run's report).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The workload measured.
    #[arg(long, default_value = "peak-hour")]
    pub workload: String,
    /// Users simulated for the measurement (per-user rates are kept at any scale).
    #[arg(long, default_value_t = 2_000)]
    pub users: u32,
    /// Simulated seconds of measured traffic.
    #[arg(long, default_value_t = 600)]
    pub duration: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl Opts {
    /// Applies options that imply others (--scale sets --users).
    pub fn resolve(mut self) -> Self {
        if let Some(s) = self.scale {
            self.users = s.users(self.dau);
        }
        self
    }

    /// The flags that reproduce this run.
    pub fn repro_args(&self) -> String {
        let d = Opts {
            seed: 0,
            ..Self::defaults()
        };
        let mut a = vec![format!("--seed {}", self.seed)];
        if self.workload != d.workload {
            a.push(format!("--workload {}", self.workload));
        }
        if self.users != d.users {
            a.push(format!("--users {}", self.users));
        }
        if self.duration != d.duration {
            a.push(format!("--duration {}", self.duration));
        }
        if self.liveness_budget != d.liveness_budget {
            a.push(format!("--liveness-budget {}", self.liveness_budget));
        }
        if self.rate != d.rate {
            a.push(format!("--rate {}", self.rate));
        }
        match self.fault_source() {
            FaultSource::None => a.push("--faults none".into()),
            FaultSource::Scenario(name) if name != d.scenario => {
                a.push(format!("--scenario {name}"))
            }
            FaultSource::Scenario(_) => {}
            FaultSource::Swarm => a.push("--faults swarm".into()),
            FaultSource::File(p) => a.push(format!("--schedule {}", p.display())),
        }
        for c in &self.canary {
            a.push(format!("--canary {c}"));
        }
        for (name, v, dv) in [
            ("api", self.api, d.api),
            ("chat", self.chat, d.chat),
            ("idgen", self.idgen, d.idgen),
            ("presence", self.presence, d.presence),
            ("push", self.push, d.push),
            ("kv-nodes", self.kv, d.kv),
            ("replicas", self.replicas, d.replicas),
            ("kv-shards", self.kv_shards, d.kv_shards),
            ("sends-in-flight", self.sends_in_flight, d.sends_in_flight),
        ] {
            if v != dv {
                a.push(format!("--{name} {v}"));
            }
        }
        if self.admission_target_ms != d.admission_target_ms {
            a.push(format!(
                "--admission-target-ms {}",
                self.admission_target_ms
            ));
        }
        if self.client_plaintext {
            a.push("--client-plaintext".into());
        }
        a.join(" ")
    }

    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["sim"])
    }

    /// Where this run's faults come from.
    pub fn fault_source(&self) -> FaultSource {
        if let Some(p) = &self.schedule {
            return FaultSource::File(p.clone());
        }
        match (
            self.no_faults,
            self.faults.as_deref(),
            self.scenario.as_str(),
        ) {
            (true, _, _) | (_, Some("none"), _) | (_, _, "none") => FaultSource::None,
            (_, Some("swarm"), _) | (_, _, "swarm") => FaultSource::Swarm,
            (_, _, name) => FaultSource::Scenario(name.to_string()),
        }
    }

    /// The seeds of `--seeds`, or just `--seed`.
    pub fn seed_range(&self) -> Result<std::ops::Range<u64>, String> {
        let Some(spec) = &self.seeds else {
            return Ok(self.seed..self.seed + 1);
        };
        let bad = || format!("--seeds {spec}: expected A..B or A..=B, e.g. 1..100");
        let (a, b, inclusive) = match spec.split_once("..=") {
            Some((a, b)) => (a, b, true),
            None => {
                let (a, b) = spec.split_once("..").ok_or_else(bad)?;
                (a, b, false)
            }
        };
        let a: u64 = a.trim().parse().map_err(|_| bad())?;
        let b: u64 = b.trim().parse().map_err(|_| bad())?;
        let b = if inclusive { b + 1 } else { b };
        if b <= a {
            return Err(format!("--seeds {spec}: the range is empty"));
        }
        Ok(a..b)
    }
}

/// Where a run's faults come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultSource {
    None,
    Scenario(String),
    Swarm,
    File(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    // Proves seed ranges parse both forms and refuse empty or malformed ones.
    #[test]
    fn seed_ranges() {
        let o = |s: &str| Opts::parse_from(["sim", "--seeds", s]).seed_range();
        assert_eq!(o("1..4").unwrap(), 1..4);
        assert_eq!(o("1..=4").unwrap(), 1..5);
        assert!(o("4..4").unwrap_err().contains("empty"));
        assert!(o("x..4").unwrap_err().contains("expected A..B"));
        assert_eq!(
            Opts::parse_from(["sim", "--seed", "9"])
                .seed_range()
                .unwrap(),
            9..10
        );
    }

    // Proves every way of choosing faults maps to one source, and repro args replay it.
    #[test]
    fn fault_sources_and_repro_args() {
        let p = |args: &[&str]| {
            let mut v = vec!["sim"];
            v.extend_from_slice(args);
            Opts::parse_from(v)
        };
        assert_eq!(p(&[]).fault_source(), FaultSource::Scenario("light".into()));
        assert_eq!(p(&["--no-faults"]).fault_source(), FaultSource::None);
        assert_eq!(p(&["--faults", "swarm"]).fault_source(), FaultSource::Swarm);
        assert_eq!(
            p(&["--scenario", "swarm"]).fault_source(),
            FaultSource::Swarm
        );
        let o = p(&["--seed", "7", "--scenario", "kv-crash"]);
        assert_eq!(o.repro_args(), "--seed 7 --scenario kv-crash");
        let o = p(&["--seed", "7", "--faults", "swarm", "--users", "50"]);
        assert_eq!(o.repro_args(), "--seed 7 --users 50 --faults swarm");
        let o = p(&["--schedule", "s.json", "--scenario", "kv-crash"]);
        assert!(o.repro_args().contains("--schedule s.json"));
    }
}

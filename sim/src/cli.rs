//! Command-line options of the simulator.

use std::path::PathBuf;

/// chatsim: a Messenger-style chat system in a deterministic simulator.
///
/// Runs the whole cluster (api, discovery, chat, idgen, kv, presence, push) and every device
/// as nodes of a seeded madsim simulation, drives a workload with light faults (a safety
/// phase), then brings every device online (a liveness phase), and checks from what the
/// clients observed that no acknowledged message was lost, reordered or duplicated, and that
/// presence and push behaved. Same seed, same run. Exit 0 when every invariant holds.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "sim", version)]
pub struct Opts {
    /// The seed: everything in the run derives from it.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Users in the workload (each has 1-3 devices).
    #[arg(long, default_value_t = 200)]
    pub users: u32,
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
    /// Run without the light faults (chat and kv crash). Scripted connection drops stay.
    #[arg(long)]
    pub no_faults: bool,
    /// Write the history (JSON lines, see docs/ARCHITECTURE.md) to this file.
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
    /// Run the seed twice (fresh thread and runtime each), compare history hashes, exit 1 on
    /// a mismatch.
    #[arg(long)]
    pub check_determinism: bool,
    /// Switch on a canary bug (needs `--features canaries`): ack-before-persist,
    /// cursor-by-message-id, no-dedup, presence-no-timeout, push-to-online.
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
    /// kv nodes (one shard each).
    #[arg(long, default_value_t = 3)]
    pub kv: u32,
    /// Print at most this many violations per invariant.
    #[arg(long, default_value_t = 5)]
    pub show_violations: usize,
}

impl Opts {
    /// The flags that reproduce this run.
    pub fn repro_args(&self) -> String {
        let d = Opts {
            seed: 0,
            ..Self::defaults()
        };
        let mut a = vec![format!("--seed {}", self.seed)];
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
        if self.no_faults {
            a.push("--no-faults".into());
        }
        for c in &self.canary {
            a.push(format!("--canary {c}"));
        }
        for (name, v, dv) in [
            ("api", self.api, d.api),
            ("chat", self.chat, d.chat),
            ("idgen", self.idgen, d.idgen),
            ("kv", self.kv, d.kv),
        ] {
            if v != dv {
                a.push(format!("--{name} {v}"));
            }
        }
        a.join(" ")
    }

    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["sim"])
    }
}

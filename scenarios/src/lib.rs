//! Fault schedules: what goes wrong, when. Issue 2's default run has light faults — one chat
//! server and one kv node are killed during traffic and restarted; connection drops are in the
//! device scripts (workloads). Named scenarios, swarm schedules, partitions, tunnels and clock
//! steps are issue 3.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The roles a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    Api,
    Discovery,
    Chat,
    Idgen,
    Kv,
    Presence,
    Push,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Discovery => "discovery",
            Role::Chat => "chat",
            Role::Idgen => "idgen",
            Role::Kv => "kv",
            Role::Presence => "presence",
            Role::Push => "push",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// Kill the node (in-memory state lost) and restart it `down_ms` later.
    Crash {
        role: Role,
        index: u32,
        down_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledFault {
    pub at_ms: u64,
    pub fault: Fault,
}

/// The default run's light faults: a chat server crash (down 10 s) around 40 % of the run and
/// a kv crash (down 5 s) around 65 %, targets drawn from the seed.
pub fn light(seed: u64, duration_ms: u64, chat_nodes: u32, kv_nodes: u32) -> Vec<ScheduledFault> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4641_554c_5453);
    let mut out = Vec::new();
    if chat_nodes > 0 {
        out.push(ScheduledFault {
            at_ms: duration_ms * rng.gen_range(35..45) / 100,
            fault: Fault::Crash {
                role: Role::Chat,
                index: rng.gen_range(0..chat_nodes),
                down_ms: 10_000,
            },
        });
    }
    if kv_nodes > 0 {
        out.push(ScheduledFault {
            at_ms: duration_ms * rng.gen_range(60..70) / 100,
            fault: Fault::Crash {
                role: Role::Kv,
                index: rng.gen_range(0..kv_nodes),
                down_ms: 5_000,
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the light schedule kills one chat and one kv node inside the run, seeded.
    #[test]
    fn light_schedule_is_seeded_and_inside_the_run() {
        let a = light(1, 300_000, 3, 3);
        assert_eq!(a, light(1, 300_000, 3, 3));
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|f| f.at_ms > 0 && f.at_ms < 300_000));
    }
}

//! Canary bugs: known bugs compiled in only with the `canaries` cargo feature, switched on at
//! run time (`--canary NAME`). They prove the simulator's checkers can fail: a test runs each
//! over fixed seeds and fails if no checker notices.
//!
//! Without the feature [`Canaries::is_on`] is a constant `false`, so release code carries no
//! trace of them.

use std::collections::BTreeSet;

/// Every canary the nodes know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Canary {
    /// The chat server acknowledges a send before kv has persisted it, and persists later.
    AckBeforePersist,
    /// The seed's sync: one `cur_max_message_id` cursor per device over ids from several idgen
    /// workers, instead of per-channel sequences assigned at commit.
    CursorByMessageId,
    /// kv does not deduplicate a retried send.
    NoDedup,
    /// Presence never times a silent user out (only logout takes them offline).
    PresenceNoTimeout,
    /// Push notifies every recipient, online or not.
    PushToOnline,
    /// A chat server cut off by a partition keeps acting for sessions that moved: it does not
    /// fence itself when its discovery lease lapses (its devices stay on a server nobody
    /// delivers to), and when a session ends it clears the device's registry entry whatever
    /// it now says (wiping the entry of the session that moved).
    StaleChatServer,
    /// idgen takes its clock's reading even when it stepped back below the last id issued.
    IdgenIgnoresClock,
    /// kv commits without fsync and acknowledges at once; a background task fsyncs every
    /// second (a crash loses what was acknowledged since).
    KvAckBeforeSync,
}

impl Canary {
    pub const ALL: [Canary; 8] = [
        Canary::AckBeforePersist,
        Canary::CursorByMessageId,
        Canary::NoDedup,
        Canary::PresenceNoTimeout,
        Canary::PushToOnline,
        Canary::StaleChatServer,
        Canary::IdgenIgnoresClock,
        Canary::KvAckBeforeSync,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Canary::AckBeforePersist => "ack-before-persist",
            Canary::CursorByMessageId => "cursor-by-message-id",
            Canary::NoDedup => "no-dedup",
            Canary::PresenceNoTimeout => "presence-no-timeout",
            Canary::PushToOnline => "push-to-online",
            Canary::StaleChatServer => "stale-chat-server",
            Canary::IdgenIgnoresClock => "idgen-ignores-clock",
            Canary::KvAckBeforeSync => "kv-ack-before-sync",
        }
    }

    pub fn from_name(name: &str) -> Option<Canary> {
        Canary::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// The canaries switched on for a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Canaries {
    on: BTreeSet<Canary>,
}

#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error("unknown canary {0:?}; known: ack-before-persist, cursor-by-message-id, no-dedup, presence-no-timeout, push-to-online, stale-chat-server, idgen-ignores-clock, kv-ack-before-sync")]
    Unknown(String),
    #[error("canary {0:?} needs a build with `--features canaries`")]
    NotCompiled(String),
}

impl Canaries {
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses canary names; fails if one is unknown or the feature is off.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, CanaryError> {
        let mut on = BTreeSet::new();
        for n in names {
            let c = Canary::from_name(n).ok_or_else(|| CanaryError::Unknown(n.to_string()))?;
            if !cfg!(feature = "canaries") {
                return Err(CanaryError::NotCompiled(n.to_string()));
            }
            on.insert(c);
        }
        Ok(Self { on })
    }

    #[inline]
    pub fn is_on(&self, c: Canary) -> bool {
        cfg!(feature = "canaries") && self.on.contains(&c)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.on.iter().map(|c| c.name()).collect()
    }
}

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
    /// A push node notifies even when kv says another claimer holds (or has confirmed) the
    /// (message, device) claim: every retried `Notify` notifies the device again.
    PushIgnoresClaim,
    /// A chat server cut off by a partition keeps acting for sessions that moved: it does not
    /// fence itself when its discovery lease lapses (its devices stay on a server nobody
    /// delivers to), and when a session ends it clears the device's registry entry whatever
    /// it now says (wiping the entry of the session that moved).
    StaleChatServer,
    /// idgen takes its clock's reading even when it stepped back below the last id issued.
    IdgenIgnoresClock,
    /// Every idgen process takes the same worker id from etcd by a blind put, whoever holds
    /// it: two generators share one worker id.
    IdgenSharedWorker,
    /// kv commits without fsync and acknowledges at once; a background task fsyncs every
    /// second (a crash loses what was acknowledged since).
    KvAckBeforeSync,
    /// A kv shard's leader answers a write once its own disk has it, before a quorum does (a
    /// leader crash loses acknowledged writes; its dry-run answers can clash with later ones).
    AckBeforeQuorum,
    /// Any kv replica serves reads from what it has applied, without a read index (a
    /// lagging or cut-off replica serves stale state: a sync misses messages).
    StaleRead,
    /// The simulated disk serves sectors that fail their checksums (corrupt data is served).
    SkipChecksum,
    /// A kv replica never makes its Raft vote durable: restarted inside a term, it can vote a
    /// second time in it, and two leaders of one term can commit different entries at one
    /// index.
    VolatileVote,
    /// Nodes accept internal RPC callers that present no certificate (and answer them): a
    /// rogue on the network reads and writes as a node.
    UnauthenticatedRpc,
    /// The read paths forget the membership check: a sync reads every channel its cursors
    /// name (not only the user's), and the api's history route serves any channel.
    SkipMembershipCheck,
    /// A presence query is answered for anyone asked, friend or not.
    PresenceToStrangers,
}

impl Canary {
    pub const ALL: [Canary; 17] = [
        Canary::AckBeforePersist,
        Canary::CursorByMessageId,
        Canary::NoDedup,
        Canary::PresenceNoTimeout,
        Canary::PushToOnline,
        Canary::PushIgnoresClaim,
        Canary::StaleChatServer,
        Canary::IdgenIgnoresClock,
        Canary::IdgenSharedWorker,
        Canary::KvAckBeforeSync,
        Canary::AckBeforeQuorum,
        Canary::StaleRead,
        Canary::SkipChecksum,
        Canary::VolatileVote,
        Canary::UnauthenticatedRpc,
        Canary::SkipMembershipCheck,
        Canary::PresenceToStrangers,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Canary::AckBeforePersist => "ack-before-persist",
            Canary::CursorByMessageId => "cursor-by-message-id",
            Canary::NoDedup => "no-dedup",
            Canary::PresenceNoTimeout => "presence-no-timeout",
            Canary::PushToOnline => "push-to-online",
            Canary::PushIgnoresClaim => "push-ignores-claim",
            Canary::StaleChatServer => "stale-chat-server",
            Canary::IdgenIgnoresClock => "idgen-ignores-clock",
            Canary::IdgenSharedWorker => "idgen-shared-worker",
            Canary::KvAckBeforeSync => "kv-ack-before-sync",
            Canary::AckBeforeQuorum => "ack-before-quorum",
            Canary::StaleRead => "stale-read",
            Canary::SkipChecksum => "skip-checksum",
            Canary::VolatileVote => "volatile-vote",
            Canary::UnauthenticatedRpc => "unauthenticated-rpc",
            Canary::SkipMembershipCheck => "skip-membership-check",
            Canary::PresenceToStrangers => "presence-to-strangers",
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
    #[error("unknown canary {name:?}; known: {known}", name = .0, known = Canary::ALL.map(Canary::name).join(", "))]
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

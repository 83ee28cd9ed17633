//! A simulated device: one madsim node running a user's app, driven by its workload script.
//!
//! The app is the shared device runtime (`nodes::client::runtime`), speaking only the real
//! client protocol (HTTP to api nodes, WebSocket to chat servers). This file adds what is
//! the simulation's own: the script that turns workload steps into commands, and the
//! observer that records what the user saw into the history and the run's counters. The
//! app's local state (cursors, outbox) lives as long as the node, as a phone's local database
//! does across app closes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nodes::client::device::{DeviceState, Observation};
use nodes::client::runtime::{
    BadFrame, Command, DeviceEvent, DeviceRuntime, Flow, Login, Observer, SendCmd, Settings, Text,
};
use nodes::proto::client::LoginResponse;
use nodes::proto::Id;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use workloads::{Action, BadInput, Step, Target};

use crate::history::Event;
use crate::recorder::{Counters, Recorder};

/// What a device knows before it starts: its login and its user's channels.
pub struct DeviceCtx {
    pub index: u32,
    pub login: LoginResponse,
    pub api: Vec<SocketAddr>,
    /// https and wss://, trusting the cluster's certificate; `None`: plain.
    pub tls: Option<nodes::client_tls::ClientTls>,
    pub steps: Vec<Step>,
    /// Friend user index -> (friend user id, 1:1 channel).
    pub friends: BTreeMap<u32, (Id, Id)>,
    /// Group index -> channel, of this user's groups.
    pub groups: BTreeMap<u32, Id>,
    /// Group index -> channel, of every group (to probe one the user is not in).
    pub all_groups: Arc<BTreeMap<u32, Id>>,
    pub recorder: Recorder,
    pub counters: Arc<Counters>,
    pub liveness_at: Duration,
    /// This device opens its app this long after the liveness phase starts (see
    /// `plan::liveness_spread`).
    pub liveness_delay: Duration,
    pub seed: u64,
    pub by_message_id: bool,
    /// Bumped by a `disconnect` fault: a connection opened before the bump is torn down, and
    /// both ends see it (a reset, a Wi-Fi switch). A silent death is a short `tunnel` instead.
    pub kick: tokio::sync::watch::Receiver<u64>,
}

/// Runs the device until the simulation ends.
pub async fn run(ctx: DeviceCtx, start: Instant) {
    let rng =
        StdRng::seed_from_u64(ctx.seed ^ (ctx.index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let state = DeviceState::new(ctx.login.user, ctx.login.device, ctx.by_message_id);
    let login = Login {
        user: ctx.login.user,
        device: ctx.login.device,
        token: ctx.login.token.clone(),
    };
    let observer = Recording {
        user: ctx.login.user,
        device: ctx.login.device,
        recorder: ctx.recorder.clone(),
        counters: ctx.counters.clone(),
    };
    let friends = ctx.friends.values().map(|(u, _)| *u).collect();
    let commands = drive_script(
        Script::new(&ctx),
        start,
        start + ctx.liveness_at,
        ctx.liveness_delay,
    );
    let settings = Settings {
        tls: ctx.tls.clone(),
        ..Settings::new(ctx.api.clone())
    };
    DeviceRuntime::new(login, settings, state, rng, observer)
        .with_friends(friends)
        .with_disconnects(ctx.kick.clone())
        .run(commands, start)
        .await;
}

/// Turns workload steps into device commands: it knows the user's channels.
struct Script {
    steps: Vec<Step>,
    friends: BTreeMap<u32, (Id, Id)>,
    groups: BTreeMap<u32, Id>,
    all_groups: Arc<BTreeMap<u32, Id>>,
}

impl Script {
    fn new(ctx: &DeviceCtx) -> Self {
        Self {
            steps: ctx.steps.clone(),
            friends: ctx.friends.clone(),
            groups: ctx.groups.clone(),
            all_groups: ctx.all_groups.clone(),
        }
    }

    fn channel_of(&self, to: Target) -> Option<Id> {
        match to {
            Target::Direct(f) => self.friends.get(&f).map(|(_, c)| *c),
            Target::Group(g) => self.groups.get(&g).copied(),
        }
    }

    /// The command for a step; `None` for a send to a channel the user does not have.
    fn command(&self, action: Action) -> Option<Command> {
        let send = |to, chars| {
            Some(SendCmd {
                channel: self.channel_of(to)?,
                text: Text::Random { chars },
                due: None,
            })
        };
        Some(match action {
            Action::Online => Command::Open,
            Action::Offline { logout } => Command::Close { logout },
            Action::Send { to, chars } => Command::Send(send(to, chars)?),
            Action::SendAndClose { to, chars } => match send(to, chars) {
                Some(s) => Command::SendAndClose(s),
                None => Command::Close { logout: false },
            },
            Action::DropConnection => Command::DropConnection,
            Action::Bad(b) => Command::Bad(self.bad_frame(b)?),
        })
    }

    fn bad_frame(&self, b: BadInput) -> Option<BadFrame> {
        let send = |channel, text: &str| BadFrame::Send {
            channel,
            text: text.to_string(),
        };
        Some(match b {
            BadInput::TooLong => {
                let channel = self.friends.values().next().map(|(_, c)| *c)?;
                send(channel, &"x".repeat(nodes::limits::MESSAGE_CHARS_MAX + 1))
            }
            BadInput::NotMember(g) => send(*self.all_groups.get(&g)?, "not my group"),
            BadInput::UnknownChannel => send(u64::MAX / 2, "nowhere"),
            BadInput::MalformedJson => BadFrame::Raw(Message::text("{\"type\":\"send\",")),
            BadInput::BinaryFrame => BadFrame::Raw(Message::binary(vec![0u8, 1, 2, 3])),
        })
    }
}

/// Hands the device each scripted step's command at its time (steps at or after the liveness
/// phase are dropped), then `Open` `delay` after the phase starts, from a task of its own;
/// then the channel closes and the device goes on as it is.
///
/// madsim's timers cannot be cancelled: every poll of a pending `sleep` adds a heap entry that
/// lives until its deadline. A far-off step sleep polled on every wakeup of the device loop
/// (frames, heartbeats) left a dead entry each time; the timer heap was the largest cost of
/// the 1/1000 `peak-hour` traffic phase (17 % in `Timer::expire`). Here each step's sleep is
/// polled once; the loop waits on a channel, which needs no timer (5,000 users: 8 % less
/// memory, 3 % less time).
fn drive_script(
    script: Script,
    start: Instant,
    liveness_at: Instant,
    delay: Duration,
) -> mpsc::Receiver<Command> {
    // One command in flight: the driver sleeps toward the next step only once the device took
    // this one.
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        for step in &script.steps {
            let at = start + Duration::from_millis(step.at_ms);
            if at >= liveness_at {
                break;
            }
            tokio::time::sleep_until(at).await;
            let Some(command) = script.command(step.action.clone()) else {
                continue;
            };
            if tx.send(command).await.is_err() {
                return;
            }
        }
        // The liveness phase: every app opens. A device already connected does nothing more:
        // a forced resync here would deliver whatever the servers failed to fan out and hide
        // it from no_loss (it hid fanouts stuck behind a slow push node for ~90 s).
        tokio::time::sleep_until(liveness_at + delay).await;
        let _ = tx.send(Command::Open).await;
    });
    rx
}

/// Records a device's events into the history and the run's counters.
struct Recording {
    user: Id,
    device: Id,
    recorder: Recorder,
    counters: Arc<Counters>,
}

impl Observer for Recording {
    async fn observe(&mut self, ev: DeviceEvent) -> Flow {
        let c = &self.counters;
        match &ev {
            DeviceEvent::Connected { .. } => c.add_connect(),
            DeviceEvent::HeartbeatSent => c.add_heartbeat(),
            DeviceEvent::BadInput => c.add_bad_input(),
            DeviceEvent::Sending { bytes, chars, .. } => {
                c.add_send();
                c.add_text(*chars, *bytes);
            }
            DeviceEvent::Observed(o) => match o {
                Observation::Ack { .. } => c.add_ack(),
                Observation::Deliver(_) => c.add_deliver(),
                Observation::Presence { .. } => c.add_presence(),
                Observation::Error { code, .. } => c.add_error(code.as_str()),
                Observation::SendFailed { .. }
                | Observation::PresenceRefresh
                | Observation::Synced => {}
            },
            DeviceEvent::AppOpened
            | DeviceEvent::AppClosed { .. }
            | DeviceEvent::ConnectFailed(_)
            | DeviceEvent::SyncAsked
            | DeviceEvent::Held { .. }
            | DeviceEvent::Released { .. }
            | DeviceEvent::Disconnected { .. } => {}
        }
        if let Some(ev) = Event::of_device(self.user, self.device, ev) {
            self.recorder.record(ev);
        }
        Flow::Continue
    }
}

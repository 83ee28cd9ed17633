//! The device state machine: everything a client must remember to see each channel in order,
//! once, with nothing missing, across reconnects. No I/O: feed it server frames, it returns
//! what the user would observe and what to send.
//!
//! - Per channel a cursor (the last `seq` processed). A message at `cursor + 1` is handed to
//!   the user; an older one is a duplicate and dropped; a newer one waits in a bounded reorder
//!   buffer while the device asks to sync the gap.
//! - An outbox of sends not yet acknowledged, resent with the same `client_msg_id` after a
//!   reconnect (the server deduplicates). The device's own message arriving by sync counts as
//!   its acknowledgement.
//! - The presence of friends as last shown.
//! - A backoff: a send refused with a retry-after hint (`overloaded`) holds every send until
//!   the runtime says the backoff is over (each such refusal in a row doubles it); then the
//!   held sends go out one at a time, each after the answer to the one before, so a device
//!   does not meet a busy server with a burst.
//!
//! With the `cursor-by-message-id` canary it behaves like the seed's client instead: one
//! `cur_max_message_id` for all channels, dropping anything not above it.

use std::collections::{BTreeMap, BTreeSet};

use crate::limits::{DEVICE_BACKOFF_MAX_MS, DEVICE_REORDER_BUFFER_MAX};
use crate::proto::client::{
    ChatMessage, ClientFrame, Cursor, ErrorCode, PresenceStatus, ServerFrame,
};
use crate::proto::Id;

/// A short fingerprint of a text: the CRC-32 (IEEE, as zlib's `crc32`) of its UTF-8 bytes, 8
/// hex digits. The history records it on sends, acks and deliveries so that any tool can
/// check a delivered text is the text that was sent.
pub fn text_digest(text: &str) -> String {
    format!("{:08x}", crc32fast::hash(text.as_bytes()))
}

/// The `client_msg_id`s of the sends among `frames`.
pub fn sent_ids(frames: &[ClientFrame]) -> Vec<Id> {
    frames
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Send { client_msg_id, .. } => Some(*client_msg_id),
            _ => None,
        })
        .collect()
}

/// Heartbeat ticks (5 s each) a sync may go unanswered before it is asked again.
pub const SYNC_RETRY_TICKS: u8 = 2;

/// What the user of the device observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Ack {
        channel: Id,
        client_msg_id: Id,
        message_id: Id,
        seq: u64,
        /// [`text_digest`] of the acknowledged text: the device's own copy for an `ack`, the
        /// stored text when sync found the message.
        digest: String,
    },
    SendFailed {
        channel: Id,
        client_msg_id: Id,
        code: ErrorCode,
    },
    Deliver(ChatMessage),
    Presence {
        user: Id,
        status: PresenceStatus,
    },
    /// A server error: not tied to a send, or a send refused with a retryable code
    /// (`client_msg_id`: the device resends it at its next tick, or after its backoff when
    /// the refusal carries a retry-after hint).
    Error {
        code: ErrorCode,
        detail: String,
        client_msg_id: Option<Id>,
    },
    /// The server asks the app to query its friends' presence again (the app owns the list).
    PresenceRefresh,
    /// A sync was answered: every message after the device's cursors, as of when the server
    /// read them, has been handed over.
    Synced,
}

/// A send waiting for its acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSend {
    pub channel: Id,
    pub text: String,
}

#[derive(Debug, Default)]
struct ChannelView {
    /// Last seq processed.
    cursor: u64,
    /// Messages above `cursor + 1`, and own acked seqs (as `None`), waiting for the gap.
    waiting: BTreeMap<u64, Option<ChatMessage>>,
    /// A sync for this channel was asked and not yet answered.
    sync_asked: bool,
    /// Ticks (`on_tick`, one per heartbeat) the sync has been waiting for its answer.
    sync_ticks: u8,
    /// The cursor moved since the last `read` sent to the server.
    unreported: bool,
}

/// Where a device is in its backoff from a busy server.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Backoff {
    /// Sends go out when made.
    #[default]
    Off,
    /// Waiting out a retry-after hint: every send is held.
    Waiting,
    /// The wait is over: one held send is out (this one); the next goes when it is answered.
    Draining(Id),
}

#[derive(Debug, Default)]
pub struct DeviceState {
    pub user: Id,
    pub device: Id,
    channels: BTreeMap<Id, ChannelView>,
    outbox: BTreeMap<Id, PendingSend>,
    /// Sends refused with a retryable code (idgen or kv briefly unavailable): resent at the
    /// next tick with the same `client_msg_id` (kv deduplicates).
    retry_sends: BTreeSet<Id>,
    /// Sends held back by a backoff (refused with a retry-after hint, or made during it or
    /// while the device drains what it held): they go out one at a time after it.
    held_sends: BTreeSet<Id>,
    backoff: Backoff,
    /// Backoffs in a row (reset by an ack): each doubles the wait.
    backoffs: u32,
    /// The wait the last backoff asks for, not yet taken by the runtime (`take_backoff`).
    backoff_ms: Option<u64>,
    /// Friend -> (status shown, version of the answer it came from).
    presence: BTreeMap<Id, (PresenceStatus, u64)>,
    /// Canary mode: the seed's single max-id cursor.
    by_message_id: bool,
    max_message_id: Id,
    /// Ticks the full sync sent at connect has waited for its `synced` (None once answered).
    /// The server answers every sync for all of the user's channels, so any `synced` answers
    /// it. Without this a device that knew no channel yet (a first connect) and whose sync
    /// was refused (a kv shard restarting) never learned of its channels' messages; found by
    /// the `peak-hour` workload once the liveness phase stopped resyncing connected devices.
    full_sync_ticks: Option<u8>,
}

impl DeviceState {
    pub fn new(user: Id, device: Id, by_message_id: bool) -> Self {
        Self {
            user,
            device,
            by_message_id,
            ..Self::default()
        }
    }

    /// Queues a send; the frame goes out now (None while a backoff runs: it goes out when the
    /// backoff ends) and again after each reconnect until answered.
    pub fn send(&mut self, client_msg_id: Id, channel: Id, text: String) -> Option<ClientFrame> {
        self.outbox.insert(
            client_msg_id,
            PendingSend {
                channel,
                text: text.clone(),
            },
        );
        if self.backoff != Backoff::Off {
            self.held_sends.insert(client_msg_id);
            return None;
        }
        Some(ClientFrame::Send {
            client_msg_id,
            channel,
            text,
        })
    }

    /// The backoff a refusal just asked for, in ms (once): the runtime waits it out, with
    /// jitter, and then calls `release_held`.
    pub fn take_backoff(&mut self) -> Option<u64> {
        self.backoff_ms.take()
    }

    /// The backoff's wait is over: the first held send goes out (same `client_msg_id`), the
    /// others one by one as each is answered (`on_frame`).
    pub fn release_held(&mut self) -> Vec<ClientFrame> {
        let mut out = Vec::new();
        if self.backoff == Backoff::Waiting {
            self.send_next_held(&mut out);
        }
        out
    }

    /// While draining: once the send out is answered (acked, or refused for good), the next
    /// held one goes out; when none is left the backoff is over.
    fn drain_held(&mut self, out: &mut Vec<ClientFrame>) {
        if let Backoff::Draining(id) = self.backoff {
            if !self.outbox.contains_key(&id) {
                self.send_next_held(out);
            }
        }
    }

    fn send_next_held(&mut self, out: &mut Vec<ClientFrame>) {
        while let Some(id) = self.held_sends.pop_first() {
            if let Some(p) = self.outbox.get(&id) {
                out.push(ClientFrame::Send {
                    client_msg_id: id,
                    channel: p.channel,
                    text: p.text.clone(),
                });
                self.backoff = Backoff::Draining(id);
                return;
            }
        }
        self.backoff = Backoff::Off;
    }

    fn frames_for(&self, ids: BTreeSet<Id>) -> Vec<ClientFrame> {
        ids.into_iter()
            .filter_map(|id| {
                self.outbox.get(&id).map(|p| ClientFrame::Send {
                    client_msg_id: id,
                    channel: p.channel,
                    text: p.text.clone(),
                })
            })
            .collect()
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Frames to send on a fresh connection: sync from the cursors, then unanswered sends.
    pub fn on_connected(&mut self) -> Vec<ClientFrame> {
        for v in self.channels.values_mut() {
            v.waiting.retain(|_, m| m.is_none());
            v.sync_asked = true;
            v.sync_ticks = 0;
        }
        self.retry_sends.clear(); // Everything unanswered is resent now.
                                  // A new connection (perhaps to another chat server) ends the backoff; another refusal
                                  // starts a longer one.
        self.held_sends.clear();
        self.backoff = Backoff::Off;
        self.backoff_ms = None;
        self.full_sync_ticks = Some(0);
        let mut out = vec![self.sync_all()];
        out.extend(self.resends());
        out
    }

    /// Unanswered sends, to resend with the same `client_msg_id`.
    pub fn resends(&self) -> Vec<ClientFrame> {
        self.outbox
            .iter()
            .map(|(id, p)| ClientFrame::Send {
                client_msg_id: *id,
                channel: p.channel,
                text: p.text.clone(),
            })
            .collect()
    }

    pub fn sync_all(&self) -> ClientFrame {
        if self.by_message_id {
            return ClientFrame::Sync {
                cursors: Vec::new(),
                max_message_id: Some(self.max_message_id),
            };
        }
        ClientFrame::Sync {
            cursors: self
                .channels
                .iter()
                .map(|(c, v)| Cursor {
                    channel: *c,
                    seq: v.cursor,
                })
                .collect(),
            max_message_id: None,
        }
    }

    /// Called once per heartbeat interval: sends refused with a retryable code are sent again,
    /// and a sync unanswered for `SYNC_RETRY_TICKS` ticks (its
    /// answer lost with a connection, or refused while a kv shard was down) is asked again.
    /// Without this a device whose sync failed would never learn of messages it missed.
    pub fn on_tick(&mut self) -> Vec<ClientFrame> {
        let retry = std::mem::take(&mut self.retry_sends);
        let mut out = self.frames_for(retry);
        if self.by_message_id {
            return out;
        }
        if let Some(t) = &mut self.full_sync_ticks {
            *t += 1;
            if *t >= SYNC_RETRY_TICKS {
                *t = 0;
                // The full sync covers every channel, known or not.
                for v in self.channels.values_mut().filter(|v| v.sync_asked) {
                    v.sync_ticks = 0;
                }
                out.push(self.sync_all());
                return out;
            }
        }
        let mut cursors = Vec::new();
        for (c, v) in self.channels.iter_mut().filter(|(_, v)| v.sync_asked) {
            v.sync_ticks += 1;
            if v.sync_ticks >= SYNC_RETRY_TICKS {
                v.sync_ticks = 0;
                cursors.push(Cursor {
                    channel: *c,
                    seq: v.cursor,
                });
            }
        }
        if !cursors.is_empty() {
            out.push(ClientFrame::Sync {
                cursors,
                max_message_id: None,
            });
        }
        out
    }

    /// `read` frames for channels whose cursor moved since the last call.
    pub fn take_reads(&mut self) -> Vec<ClientFrame> {
        let mut out = Vec::new();
        for (c, v) in self.channels.iter_mut() {
            if v.unreported {
                v.unreported = false;
                out.push(ClientFrame::Read {
                    channel: *c,
                    seq: v.cursor,
                });
            }
        }
        out
    }

    pub fn presence_of(&self, user: Id) -> Option<PresenceStatus> {
        self.presence.get(&user).map(|(s, _)| *s)
    }

    pub fn cursor(&self, channel: Id) -> u64 {
        self.channels.get(&channel).map_or(0, |v| v.cursor)
    }

    /// Feeds one frame; returns observations and frames to send back.
    pub fn on_frame(&mut self, frame: ServerFrame) -> (Vec<Observation>, Vec<ClientFrame>) {
        let mut obs = Vec::new();
        let mut out = Vec::new();
        match frame {
            ServerFrame::Welcome { .. } | ServerFrame::HeartbeatAck => {}
            ServerFrame::PresenceRefresh => obs.push(Observation::PresenceRefresh),
            ServerFrame::Ack {
                client_msg_id,
                channel,
                message_id,
                seq,
            } => {
                self.on_ack(client_msg_id, channel, message_id, seq, &mut obs);
                if !self.by_message_id {
                    self.ask_gap(channel, &mut out);
                }
            }
            ServerFrame::Message(m) => self.on_message(m, &mut obs, &mut out),
            ServerFrame::Synced { cursors } => {
                self.full_sync_ticks = None;
                for c in cursors {
                    self.channels.entry(c.channel).or_default().sync_asked = false;
                }
                obs.push(Observation::Synced);
            }
            ServerFrame::Presence {
                user,
                status,
                version,
            } => {
                let old = self.presence.get(&user).copied();
                // An older answer than the one shown (a query overtaken by a change) is stale.
                if old.is_some_and(|(_, v)| v > version) {
                    return (obs, out);
                }
                self.presence.insert(user, (status, version));
                if old.map(|(s, _)| s) != Some(status) {
                    obs.push(Observation::Presence { user, status });
                }
            }
            ServerFrame::Error {
                code,
                detail,
                client_msg_id,
                channel,
                retry_after_ms,
            } => match (client_msg_id, channel) {
                (Some(id), Some(ch)) if !code.retryable() => {
                    if self.outbox.remove(&id).is_some() {
                        obs.push(Observation::SendFailed {
                            channel: ch,
                            client_msg_id: id,
                            code,
                        });
                    }
                }
                (Some(id), Some(_)) if self.outbox.contains_key(&id) => {
                    match retry_after_ms {
                        Some(hint) => self.back_off(id, hint),
                        // A backoff holds every send, this one too.
                        None if self.backoff == Backoff::Waiting => {
                            self.held_sends.insert(id);
                        }
                        None => {
                            self.retry_sends.insert(id);
                        }
                    }
                    obs.push(Observation::Error {
                        code,
                        detail,
                        client_msg_id: Some(id),
                    });
                }
                _ => obs.push(Observation::Error {
                    code,
                    detail,
                    client_msg_id: None,
                }),
            },
        }
        self.drain_held(&mut out);
        (obs, out)
    }

    /// A send refused with a retry-after hint: it is held, and so is every send until the
    /// backoff ends. The first refusal of a backoff sets its length: the hint doubled for each
    /// backoff in a row before it (an ack ends the row), at most `DEVICE_BACKOFF_MAX_MS`;
    /// refusals of sends already in flight when it began join it.
    fn back_off(&mut self, id: Id, hint_ms: u64) {
        self.held_sends.insert(id);
        if self.backoff == Backoff::Waiting {
            return;
        }
        self.backoff = Backoff::Waiting;
        // Sends waiting for the next tick wait for the backoff instead.
        self.held_sends.append(&mut self.retry_sends);
        let doubled = hint_ms.max(1).saturating_mul(1 << self.backoffs.min(16));
        self.backoffs = self.backoffs.saturating_add(1);
        self.backoff_ms = Some(doubled.min(DEVICE_BACKOFF_MAX_MS));
    }

    fn on_ack(
        &mut self,
        id: Id,
        channel: Id,
        message_id: Id,
        seq: u64,
        obs: &mut Vec<Observation>,
    ) {
        let Some(sent) = self.outbox.remove(&id) else {
            return; // Already acknowledged (by sync, or an earlier ack of a retry).
        };
        self.backoffs = 0;
        obs.push(Observation::Ack {
            channel,
            client_msg_id: id,
            message_id,
            seq,
            digest: text_digest(&sent.text),
        });
        if self.by_message_id {
            self.max_message_id = self.max_message_id.max(message_id);
            return;
        }
        let v = self.channels.entry(channel).or_default();
        if seq > v.cursor {
            v.waiting.insert(seq, None);
        }
        self.drain(channel, obs);
    }

    /// Asks for a sync of `channel` if something waits behind a gap and none is pending.
    fn ask_gap(&mut self, channel: Id, out: &mut Vec<ClientFrame>) {
        let v = self.channels.entry(channel).or_default();
        if !v.waiting.is_empty() && !v.sync_asked {
            v.sync_asked = true;
            v.sync_ticks = 0;
            out.push(ClientFrame::Sync {
                cursors: vec![Cursor {
                    channel,
                    seq: v.cursor,
                }],
                max_message_id: None,
            });
        }
    }

    fn on_message(
        &mut self,
        m: ChatMessage,
        obs: &mut Vec<Observation>,
        out: &mut Vec<ClientFrame>,
    ) {
        if self.by_message_id {
            self.on_message_by_id(m, obs);
            return;
        }
        let channel = m.channel;
        let v = self.channels.entry(channel).or_default();
        if m.seq <= v.cursor || v.waiting.contains_key(&m.seq) {
            return; // A duplicate: already handed over or waiting.
        }
        if v.waiting.len() >= DEVICE_REORDER_BUFFER_MAX {
            // Bounded: forget what waits and fetch it again by sync.
            v.waiting.clear();
            v.sync_asked = false;
        }
        v.waiting.insert(m.seq, Some(m));
        self.drain(channel, obs);
        self.ask_gap(channel, out);
    }

    /// Hands over everything contiguous after the cursor.
    fn drain(&mut self, channel: Id, obs: &mut Vec<Observation>) {
        loop {
            let v = self.channels.entry(channel).or_default();
            let next = v.cursor + 1;
            let Some(entry) = v.waiting.remove(&next) else {
                return;
            };
            v.cursor = next;
            v.unreported = true;
            if let Some(m) = entry {
                self.hand_over(m, obs);
            }
        }
    }

    /// One message, in order, for the first time.
    fn hand_over(&mut self, m: ChatMessage, obs: &mut Vec<Observation>) {
        if m.sender_device != self.device {
            obs.push(Observation::Deliver(m));
            return;
        }
        // Our own message found by sync: it was committed, so it is acknowledged.
        if self.outbox.remove(&m.client_msg_id).is_some() {
            self.backoffs = 0;
            obs.push(Observation::Ack {
                channel: m.channel,
                client_msg_id: m.client_msg_id,
                message_id: m.message_id,
                seq: m.seq,
                digest: text_digest(&m.text),
            });
        }
    }

    fn on_message_by_id(&mut self, m: ChatMessage, obs: &mut Vec<Observation>) {
        if m.message_id <= self.max_message_id {
            return; // The seed's rule: anything not above the max id is "already seen".
        }
        self.max_message_id = m.message_id;
        self.hand_over(m, obs);
    }

    /// Channels the device has seen.
    pub fn channels(&self) -> BTreeSet<Id> {
        self.channels.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(channel: Id, seq: u64, sender_device: Id, cmid: Id) -> ChatMessage {
        ChatMessage {
            channel,
            seq,
            message_id: 1000 + seq,
            sender: 1,
            sender_device,
            client_msg_id: cmid,
            text: "hi".into(),
            sent_at_ms: 0,
        }
    }

    fn delivered(obs: &[Observation]) -> Vec<u64> {
        obs.iter()
            .filter_map(|o| match o {
                Observation::Deliver(m) => Some(m.seq),
                _ => None,
            })
            .collect()
    }

    // Proves out-of-order arrival is handed over in seq order, duplicates are dropped, and a
    // gap asks for a sync of that channel once.
    #[test]
    fn reorders_dedups_and_asks_for_the_gap() {
        let mut d = DeviceState::new(2, 20, false);
        let (o, out) = d.on_frame(ServerFrame::Message(msg(5, 2, 9, 1)));
        assert!(delivered(&o).is_empty());
        assert_eq!(out.len(), 1, "a gap asks for a sync");
        let (o, out) = d.on_frame(ServerFrame::Message(msg(5, 3, 9, 2)));
        assert!(
            delivered(&o).is_empty() && out.is_empty(),
            "one sync per gap"
        );
        let (o, _) = d.on_frame(ServerFrame::Message(msg(5, 1, 9, 3)));
        assert_eq!(delivered(&o), vec![1, 2, 3]);
        let (o, _) = d.on_frame(ServerFrame::Message(msg(5, 2, 9, 1)));
        assert!(delivered(&o).is_empty(), "duplicate dropped");
        assert_eq!(d.cursor(5), 3);
        assert_eq!(
            d.take_reads(),
            vec![ClientFrame::Read { channel: 5, seq: 3 }]
        );
        assert!(d.take_reads().is_empty());
    }

    // Proves an own send is acknowledged once, by ack or by sync, and never delivered to itself.
    #[test]
    fn own_message_acknowledged_once() {
        let mut d = DeviceState::new(1, 10, false);
        d.send(77, 5, "x".into());
        let (o, _) = d.on_frame(ServerFrame::Message(msg(5, 1, 10, 77)));
        assert!(matches!(o.as_slice(), [Observation::Ack { seq: 1, .. }]));
        let (o, _) = d.on_frame(ServerFrame::Ack {
            client_msg_id: 77,
            channel: 5,
            message_id: 1001,
            seq: 1,
        });
        assert!(
            o.is_empty(),
            "the late ack of a retried send is not a second ack"
        );
        assert_eq!(d.outbox_len(), 0);
    }

    // Proves the cursor passes over an own acked message so later messages flow.
    #[test]
    fn own_ack_advances_cursor() {
        let mut d = DeviceState::new(1, 10, false);
        d.send(1, 5, "x".into());
        d.on_frame(ServerFrame::Ack {
            client_msg_id: 1,
            channel: 5,
            message_id: 1001,
            seq: 1,
        });
        let (o, _) = d.on_frame(ServerFrame::Message(msg(5, 2, 9, 4)));
        assert_eq!(delivered(&o), vec![2]);
    }

    // Proves unanswered sends are resent after a reconnect and refused ones are not.
    #[test]
    fn outbox_resends_until_answered() {
        let mut d = DeviceState::new(1, 10, false);
        d.send(1, 5, "a".into());
        d.send(2, 6, "b".into());
        let (o, _) = d.on_frame(ServerFrame::Error {
            code: ErrorCode::NotAMember,
            detail: String::new(),
            client_msg_id: Some(2),
            channel: Some(6),
            retry_after_ms: None,
        });
        assert!(matches!(
            o.as_slice(),
            [Observation::SendFailed {
                client_msg_id: 2,
                ..
            }]
        ));
        let frames = d.on_connected();
        assert_eq!(frames.len(), 2, "sync + one resend");
    }

    // Proves the seed's max-id cursor loses a message whose id is below one already seen in
    // another channel (the canary this module can switch on).
    #[test]
    fn max_id_cursor_loses_messages() {
        let mut d = DeviceState::new(2, 20, true);
        let mut a = msg(5, 1, 9, 1);
        a.message_id = 2000;
        let mut b = msg(6, 1, 9, 2);
        b.message_id = 1500;
        let (o1, _) = d.on_frame(ServerFrame::Message(a));
        let (o2, _) = d.on_frame(ServerFrame::Message(b));
        assert_eq!(delivered(&o1).len() + delivered(&o2).len(), 1);
    }

    // Proves a sync whose answer never came is asked again after SYNC_RETRY_TICKS ticks, from
    // the cursor, and that an answered one is not.
    #[test]
    fn unanswered_sync_is_retried() {
        let mut d = DeviceState::new(1, 10, false);
        d.on_frame(ServerFrame::Message(msg(5, 1, 9, 1)));
        let first = d.on_connected();
        assert!(matches!(first[0], ClientFrame::Sync { .. }));
        assert!(d.on_tick().is_empty());
        let again = d.on_tick();
        assert_eq!(
            again,
            vec![ClientFrame::Sync {
                cursors: vec![Cursor { channel: 5, seq: 1 }],
                max_message_id: None
            }]
        );
        d.on_frame(ServerFrame::Synced {
            cursors: vec![Cursor { channel: 5, seq: 1 }],
        });
        assert!(d.on_tick().is_empty() && d.on_tick().is_empty());
    }

    // Proves a device that knows no channel yet asks its full sync again when the first one
    // was not answered (refused while a kv shard restarted), and stops once it is.
    #[test]
    fn unanswered_first_sync_is_retried() {
        let mut d = DeviceState::new(1, 10, false);
        let first = d.on_connected();
        let empty = ClientFrame::Sync {
            cursors: vec![],
            max_message_id: None,
        };
        assert_eq!(first, vec![empty.clone()]);
        d.on_frame(ServerFrame::error(ErrorCode::Unavailable, "sync: kv down"));
        assert!(d.on_tick().is_empty());
        assert_eq!(d.on_tick(), vec![empty]);
        d.on_frame(ServerFrame::Synced {
            cursors: vec![Cursor { channel: 5, seq: 0 }],
        });
        assert!(d.on_tick().is_empty() && d.on_tick().is_empty());
    }

    // Proves a send refused with a retryable code is resent once at the next tick, with the
    // same client_msg_id, and a refused-for-good one is not.
    #[test]
    fn retryable_refusal_is_resent_at_the_next_tick() {
        let mut d = DeviceState::new(1, 10, false);
        d.send(7, 5, "hi".into());
        d.on_frame(ServerFrame::Error {
            code: ErrorCode::Unavailable,
            detail: "idgen".into(),
            client_msg_id: Some(7),
            channel: Some(5),
            retry_after_ms: None,
        });
        let out = d.on_tick();
        assert_eq!(
            out,
            vec![ClientFrame::Send {
                client_msg_id: 7,
                channel: 5,
                text: "hi".into()
            }]
        );
        assert!(d.on_tick().is_empty(), "once per refusal");
        d.on_frame(ServerFrame::Error {
            code: ErrorCode::NotAMember,
            detail: "no".into(),
            client_msg_id: Some(7),
            channel: Some(5),
            retry_after_ms: None,
        });
        assert_eq!(d.outbox_len(), 0);
    }

    fn overloaded(id: Id, hint: u64) -> ServerFrame {
        ServerFrame::Error {
            code: ErrorCode::Overloaded,
            detail: "busy".into(),
            client_msg_id: Some(id),
            channel: Some(5),
            retry_after_ms: Some(hint),
        }
    }

    fn ack(id: Id, seq: u64) -> ServerFrame {
        ServerFrame::Ack {
            client_msg_id: id,
            channel: 5,
            message_id: 100 + seq,
            seq,
        }
    }

    // Proves a refusal with a retry-after hint holds that send and every later one until the
    // backoff's wait is over (not at the next tick); that they then go out one at a time,
    // each after the answer to the one before; that the wait doubles for each backoff in a
    // row up to the cap; and that an ack starts over at the hint.
    #[test]
    fn retry_after_hint_holds_sends_then_drains_them_one_by_one() {
        let mut d = DeviceState::new(1, 10, false);
        assert!(d.send(1, 5, "a".into()).is_some());
        assert!(d.send(2, 5, "b".into()).is_some());
        d.on_frame(overloaded(1, 1_000));
        d.on_frame(overloaded(2, 1_000)); // In flight when the backoff began: joins it.
        assert_eq!(d.take_backoff(), Some(1_000));
        assert_eq!(d.take_backoff(), None, "taken once");
        assert!(
            d.send(3, 5, "c".into()).is_none(),
            "held during the backoff"
        );
        assert!(sent_ids(&d.on_tick()).is_empty(), "not resent at the tick");
        assert_eq!(sent_ids(&d.release_held()), vec![1]);
        assert!(d.send(4, 5, "d".into()).is_none(), "held while draining");
        assert_eq!(sent_ids(&d.on_frame(ack(1, 1)).1), vec![2]);
        // A refusal for good answers it too.
        let (_, out) = d.on_frame(ServerFrame::Error {
            code: ErrorCode::MessageTooLong,
            detail: "no".into(),
            client_msg_id: Some(2),
            channel: Some(5),
            retry_after_ms: None,
        });
        assert_eq!(sent_ids(&out), vec![3]);
        assert_eq!(sent_ids(&d.on_frame(ack(3, 2)).1), vec![4]);
        assert!(sent_ids(&d.on_frame(ack(4, 3)).1).is_empty());
        assert!(d.send(5, 5, "e".into()).is_some(), "the backoff is over");
        let mut waits = Vec::new();
        for _ in 0..7 {
            d.on_frame(overloaded(5, 1_000));
            waits.push(d.take_backoff().unwrap());
            assert_eq!(sent_ids(&d.release_held()), vec![5]);
        }
        assert_eq!(
            waits,
            [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000],
            "doubles for each backoff in a row, capped"
        );
        d.on_frame(ack(5, 4));
        assert!(d.send(6, 5, "f".into()).is_some());
        d.on_frame(overloaded(6, 1_000));
        assert_eq!(d.take_backoff(), Some(1_000), "an ack ends the row");
        assert!(d.send(7, 5, "g".into()).is_none());
        // A new connection sends everything unanswered and ends the backoff.
        assert_eq!(sent_ids(&d.on_connected()), vec![6, 7]);
        assert!(d.send(8, 5, "h".into()).is_some());
    }
}

//! Push notifications for recipients with no online device.
//!
//! The chat server decides who is offline (asking presence) and sends `Notify`; the push node
//! looks up each user's devices, marks (message, device) in kv so that no device is notified
//! twice for one message, even across retries and restarts, and hands the notification to a
//! [`PushProvider`]: a logging provider (the real default), a recording one (tests), and in the
//! real build the platform adapters [`apns`], [`fcm`] and [`webpush`], chosen by
//! [`settings::PushSettings`] and [`settings::build`]. The simulation plugs in its own recorder.
//!
//! Devices register where their notifications go with `PUT /v1/devices/{device}/push` (a
//! [`PushTarget`], kept on the user record); the push server hands each device's target to the
//! provider on [`Notification::target`]. A platform provider skips (answers `Ok`) a device
//! without a target of its own kind: the device gets no notification from it, by design.
//!
//! Not done here: retries (the push server's caller retries the whole `Notify`), removing
//! targets that a platform refused as gone (`PushError::Refused` says which), collapsing
//! several notifications of one channel.

pub mod server;

// The platform adapters exist only in the real build: they speak HTTPS to Apple, Google and
// browsers' push services (rustls, hyper's pooled client on real tokio), which the simulation
// replaces with its recorder. Their dependencies are likewise `cfg(not(madsim))`.
#[cfg(not(madsim))]
pub mod apns;
#[cfg(not(madsim))]
pub mod fcm;
#[cfg(not(madsim))]
mod http;
#[cfg(not(madsim))]
mod jwt;
#[cfg(not(madsim))]
pub mod settings;
#[cfg(not(madsim))]
pub mod webpush;

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

pub use crate::proto::client::PushTarget;
use crate::proto::Id;

/// One notification to one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub user: Id,
    pub device: Id,
    pub channel: Id,
    pub message_id: Id,
    pub sender: Id,
    /// The first characters of the text (providers cap payloads at a few KB).
    pub preview: String,
    /// Where the device registered to get notifications; `None` if it never did (always in
    /// the simulation). A platform provider skips a device without a target of its kind.
    pub target: Option<PushTarget>,
}

impl Notification {
    /// The platform's idempotency key for this notification: the message id. Every adapter
    /// sends it (APNs `apns-collapse-id`, FCM `collapse_key` and the Android and web
    /// notification `tag`, Web Push `Topic` and the payload's `tag`), so a notification sent
    /// again for the same message (after a lapsed claim: the first sender died between
    /// notifying and confirming) replaces the first on the device instead of alerting
    /// twice. Digits only: fits APNs' 64 bytes and Web Push's 32 URL-safe characters.
    pub fn collapse_id(&self) -> String {
        self.message_id.to_string()
    }
}

/// Characters of message text carried in a notification.
pub const PREVIEW_CHARS_MAX: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The platform answered and said no (HTTP 4xx other than 429): a bad or expired device
    /// token or subscription, a malformed request. Retrying the same request will not help;
    /// the message names the platform's reason (e.g. `apns 410 Unregistered`).
    #[error("provider refused: {0}")]
    Refused(String),
    /// The platform could not be asked or could not answer: connect errors, timeouts, HTTP
    /// 5xx and 429. A retry later may succeed.
    #[error("provider unreachable: {0}")]
    Unreachable(String),
}

/// Delivers notifications to a platform (APNs, FCM, Web Push, or a recorder).
pub trait PushProvider: Send + Sync {
    fn notify(&self, n: Notification) -> BoxFuture<'static, Result<(), PushError>>;
}

/// Logs each notification (the real build's default).
#[derive(Debug, Default)]
pub struct LogProvider;

impl PushProvider for LogProvider {
    fn notify(&self, n: Notification) -> BoxFuture<'static, Result<(), PushError>> {
        tracing::info!(
            user = n.user,
            device = n.device,
            message = n.message_id,
            "push"
        );
        Box::pin(async { Ok(()) })
    }
}

/// Keeps the last [`RecordingProvider::KEEP_MAX`] notifications in memory.
#[derive(Debug, Default)]
pub struct RecordingProvider {
    /// A std mutex: pushed to synchronously.
    pub sent: Arc<Mutex<Vec<Notification>>>,
}

impl RecordingProvider {
    /// Older notifications are discarded beyond this many.
    pub const KEEP_MAX: usize = 100_000;
}

impl PushProvider for RecordingProvider {
    fn notify(&self, n: Notification) -> BoxFuture<'static, Result<(), PushError>> {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        if sent.len() >= Self::KEEP_MAX {
            sent.remove(0);
        }
        sent.push(n);
        Box::pin(async { Ok(()) })
    }
}

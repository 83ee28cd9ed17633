//! Push notifications for recipients with no online device.
//!
//! The chat server decides who is offline (asking presence) and sends `Notify`; the push node
//! looks up each user's devices, marks (message, device) in kv so that no device is notified
//! twice for one message, even across retries and restarts, and hands the notification to a
//! [`PushProvider`]. Providers for APNs, FCM and Web Push are issue 5; here: a logging provider
//! (real default) and a recording one (tests); the simulation plugs in its own recorder.

pub mod server;

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

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
}

/// Characters of message text carried in a notification.
pub const PREVIEW_CHARS_MAX: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("provider refused: {0}")]
    Refused(String),
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

//! The client protocol: HTTP bodies of the api node and WebSocket frames of chat servers.
//!
//! WebSocket frames are JSON text frames tagged by `type`. Binary frames are refused
//! (`binary_frame`). Every refusal names an [`ErrorCode`]; the connection stays open unless the
//! code says otherwise ([`ErrorCode::closes_connection`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Id;

/// Error codes a client can act on, on HTTP (`{"error": code}`) and WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    MessageTooLong,
    UnknownChannel,
    NotAMember,
    GroupFull,
    BadToken,
    TokenExpired,
    MalformedJson,
    BinaryFrame,
    FrameTooLarge,
    NotAuthenticated,
    RateLimited,
    SlowConsumer,
    /// The same device connected again; the older connection is closed.
    SessionReplaced,
    NameTaken,
    BadCredentials,
    UnknownUser,
    BadRequest,
    /// A dependency (kv, idgen) did not answer in time: retry with the same `client_msg_id`.
    Unavailable,
    NoChatServer,
    /// An HTTP request body over `API_BODY_BYTES_MAX` (HTTP 413).
    BodyTooLarge,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MessageTooLong => "message_too_long",
            ErrorCode::UnknownChannel => "unknown_channel",
            ErrorCode::NotAMember => "not_a_member",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::BinaryFrame => "binary_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::SessionReplaced => "session_replaced",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::BadCredentials => "bad_credentials",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NoChatServer => "no_chat_server",
            ErrorCode::BodyTooLarge => "body_too_large",
        }
    }

    /// Whether the server closes the WebSocket after sending this error.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorCode::BadToken
                | ErrorCode::TokenExpired
                | ErrorCode::FrameTooLarge
                | ErrorCode::SlowConsumer
                | ErrorCode::SessionReplaced
        )
    }

    /// Whether a send refused with this code may succeed if retried unchanged.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::RateLimited)
    }
}

// ---------------------------------------------------------------- HTTP (api node)

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignupRequest {
    pub name: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignupResponse {
    pub user: Id,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginRequest {
    pub name: String,
    pub password: String,
    /// The device id from an earlier login on this device; `None` registers a new device.
    #[serde(default)]
    pub device: Option<Id>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginResponse {
    pub user: Id,
    pub device: Id,
    pub token: String,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub user: Id,
    pub name: String,
    pub devices: Vec<Id>,
    /// Friend user id -> the 1:1 channel shared with them.
    pub friends: BTreeMap<Id, Id>,
    pub channels: Vec<Id>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddFriendRequest {
    pub user: Id,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddFriendResponse {
    pub channel: Id,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateGroupRequest {
    pub name: String,
    /// Members besides the creator.
    pub members: Vec<Id>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupResponse {
    pub channel: Id,
    pub members: Vec<Id>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddMemberRequest {
    pub user: Id,
}

/// `GET /v1/chat-server?avoid=N`: `avoid` names a server the device just failed to reach, so
/// a reconnect storm after a crash does not keep landing on the dead server until its
/// discovery lease lapses.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatServerQuery {
    #[serde(default)]
    pub avoid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatServerResponse {
    /// `ws://host:port/ws`
    pub url: String,
    pub server: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub channel: Id,
    pub messages: Vec<ChatMessage>,
    pub last_seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorCode,
    pub detail: String,
}

// ---------------------------------------------------------------- WebSocket (chat node)

/// A committed message as devices see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub channel: Id,
    pub seq: u64,
    pub message_id: Id,
    pub sender: Id,
    pub sender_device: Id,
    pub client_msg_id: Id,
    pub text: String,
    pub sent_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    Online,
    Offline,
}

/// A device's position in one channel: it has processed everything up to `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub channel: Id,
    pub seq: u64,
}

/// Frames from device to chat server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame on a connection.
    Hello {
        token: String,
        /// This device's connection number, increasing with each new connection. It orders a
        /// device's sessions: an older connection never replaces a newer one (0 if unknown).
        #[serde(default)]
        connection: u64,
    },
    Send {
        client_msg_id: Id,
        channel: Id,
        text: String,
    },
    /// Ask for everything after the given per-channel cursors (missing channels: from the
    /// cursor stored on the server for this device, else from the start).
    Sync {
        // A list, not a map: JSON object keys are strings, and integer keys inside an
        // internally tagged enum do not round-trip through serde.
        #[serde(default)]
        cursors: Vec<Cursor>,
        /// Only with the `cursor-by-message-id` canary: the seed's single max-id cursor.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_message_id: Option<Id>,
    },
    /// The device has processed the channel up to `seq`: the server stores the cursor.
    Read {
        channel: Id,
        seq: u64,
    },
    /// The app is open; answered with `heartbeat_ack`. Every 5 s.
    Heartbeat,
    /// Ask for the current presence of these users (friends only are answered).
    PresenceQuery {
        users: Vec<Id>,
    },
    Logout,
}

/// Frames from chat server to device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        user: Id,
        device: Id,
        server: u32,
    },
    Ack {
        client_msg_id: Id,
        channel: Id,
        message_id: Id,
        seq: u64,
    },
    Message(ChatMessage),
    /// The end of a sync answer: every channel is now sent up to `cursors`.
    Synced {
        cursors: Vec<Cursor>,
    },
    /// The answer to a `heartbeat`: a device that hears nothing for three heartbeat
    /// intervals treats the connection as dead (a partition or tunnel raises no TCP error).
    HeartbeatAck,
    /// Presence restarted: ask for your friends' presence again (`presence_query`).
    PresenceRefresh,
    /// `version` orders answers about one user: keep the highest seen.
    Presence {
        user: Id,
        status: PresenceStatus,
        version: u64,
    },
    Error {
        code: ErrorCode,
        detail: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<Id>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<Id>,
    },
}

impl ServerFrame {
    pub fn error(code: ErrorCode, detail: impl Into<String>) -> Self {
        ServerFrame::Error {
            code,
            detail: detail.into(),
            client_msg_id: None,
            channel: None,
        }
    }
}

//! The client protocol: HTTP bodies of the api node and WebSocket frames of chat servers.
//!
//! WebSocket frames are JSON text frames tagged by `type`. Binary frames are refused
//! (`binary_frame`). Every refusal names an [`ErrorCode`]; the connection stays open unless the
//! code says otherwise ([`ErrorCode::closes_connection`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use super::internal::ChannelKind;
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
    /// The device is not one of the caller's devices.
    UnknownDevice,
    /// An HTTP request body over `API_BODY_BYTES_MAX` (HTTP 413).
    BodyTooLarge,
    /// An HTTP request body that did not arrive within `API_BODY_READ_TIMEOUT_MS` (HTTP 408).
    BodyTimeout,
    /// A per-user cap is reached: devices (`DEVICES_PER_USER_MAX`), friends
    /// (`FRIENDS_PER_USER_MAX`) or channels (`CHANNELS_PER_USER_MAX`) (HTTP 409).
    LimitReached,
    /// Only a group's admin (its creator: the first member) may remove another member
    /// (HTTP 403). Anyone may remove themselves (leave).
    NotAdmin,
    /// The token was revoked (a logout of its device, "log out everywhere", or the device
    /// was removed): log in again. Closes the connection (HTTP 401).
    TokenRevoked,
    /// Internal RPC only: the calling node may not make this request (`tls::authorize`).
    /// Shown to clients as `unavailable`.
    Forbidden,
    /// The chat server is at its limit of sends in flight (`SENDS_IN_FLIGHT_MAX`): the send
    /// was refused at once, nothing was written. Retryable; the frame's `retry_after_ms` says
    /// when (HTTP 503).
    Overloaded,
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
            ErrorCode::UnknownDevice => "unknown_device",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::BodyTimeout => "body_timeout",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::NotAdmin => "not_admin",
            ErrorCode::Overloaded => "overloaded",
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

    /// Whether this refusal ends the device's login: the token is bad, expired or missing,
    /// and no retry can fix it (the app must log in again).
    pub fn ends_login(self) -> bool {
        matches!(
            self,
            ErrorCode::BadToken
                | ErrorCode::TokenExpired
                | ErrorCode::TokenRevoked
                | ErrorCode::NotAuthenticated
        )
    }

    /// Whether a send refused with this code may succeed if retried unchanged.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Overloaded
        )
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
    /// Users who asked to be your friend and wait for your answer (`POST /v1/friends` with
    /// their id accepts; `DELETE /v1/friend-requests/{user}` declines).
    #[serde(default)]
    pub friend_requests: Vec<Id>,
    /// Groups (channels) you are invited to: `POST /v1/groups/{channel}/join` joins,
    /// `DELETE /v1/groups/{channel}/invitation` declines.
    #[serde(default)]
    pub group_invites: Vec<Id>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddFriendRequest {
    pub user: Id,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddFriendResponse {
    /// `friends`: you are friends, `channel` is your 1:1 channel; `requested`: they were
    /// asked, and become your friend when they add you too.
    pub status: FriendStatus,
    /// The 1:1 channel, once friends.
    pub channel: Option<Id>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FriendStatus {
    Friends,
    Requested,
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
    /// Who this call invited (they join with `POST /v1/groups/{channel}/join`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invited: Vec<Id>,
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

/// `POST /v1/logout[?everywhere=true]`: what was signed out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogoutResponse {
    pub user: Id,
    /// The device signed out; `None`: every device of the user.
    pub device: Option<Id>,
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

/// `GET /v1/users?name=NAME` and `GET /v1/users/{user}`: the public face of a user, so a
/// client can find a friend by name and show names instead of ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserSummary {
    pub user: Id,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserQuery {
    pub name: String,
}

/// `GET /v1/channels/{channel}`: what a member needs to show a conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub channel: Id,
    pub kind: ChannelKind,
    /// Empty for direct channels.
    pub name: String,
    pub members: Vec<Id>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorCode,
    pub detail: String,
}

/// Where a device's push notifications go: the body of `PUT /v1/devices/{device}/push`,
/// tagged by `kind`. Stored on the user record; one target per device (a new one replaces it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PushTarget {
    /// An iOS/macOS device token from APNs, hex.
    Apns { device_token: String },
    /// An FCM registration token.
    Fcm { registration_token: String },
    /// A browser's `PushSubscription` (RFC 8030 endpoint, RFC 8291 keys, base64url).
    #[serde(rename = "webpush")]
    WebPush {
        endpoint: String,
        /// The subscription's P-256 public key: 65 bytes, uncompressed point.
        p256dh: String,
        /// The subscription's 16-byte authentication secret.
        auth: String,
    },
}

/// The answer to `PUT`/`DELETE /v1/devices/{device}/push`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushTargetResponse {
    pub device: Id,
    /// The target's kind (`apns`, `fcm`, `webpush`); `None` after a `DELETE`.
    pub kind: Option<String>,
}

impl PushTarget {
    /// Checks sizes and formats (the api refuses a target that fails with `bad_request` and
    /// this message). Enforces the `PUSH_*` limits of [`crate::limits`].
    pub fn validate(&self) -> Result<(), String> {
        use crate::limits::{APNS_DEVICE_TOKEN_CHARS_MAX, FCM_TOKEN_CHARS_MAX};
        match self {
            PushTarget::Apns { device_token: t } => {
                if t.is_empty() || t.len() > APNS_DEVICE_TOKEN_CHARS_MAX || t.len() % 2 != 0 {
                    return Err(format!(
                        "device_token: an even number of hex digits, 2 to {APNS_DEVICE_TOKEN_CHARS_MAX}"
                    ));
                }
                if !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err("device_token: hex digits only".into());
                }
            }
            PushTarget::Fcm {
                registration_token: t,
            } => {
                let ok = |b: u8| b.is_ascii_alphanumeric() || b"-_:.".contains(&b);
                if t.is_empty() || t.len() > FCM_TOKEN_CHARS_MAX || !t.bytes().all(ok) {
                    return Err(format!(
                        "registration_token: 1 to {FCM_TOKEN_CHARS_MAX} of [A-Za-z0-9-_:.]"
                    ));
                }
            }
            PushTarget::WebPush {
                endpoint,
                p256dh,
                auth,
            } => {
                validate_endpoint(endpoint)?;
                if base64url_len(p256dh) != Some(65) || !p256dh.starts_with('B') {
                    return Err(
                        "p256dh: base64url of a 65-byte uncompressed P-256 point (starts with B)"
                            .into(),
                    );
                }
                if base64url_len(auth) != Some(16) {
                    return Err("auth: base64url of 16 bytes".into());
                }
            }
        }
        Ok(())
    }

    /// The provider kind, for logs and messages.
    pub fn kind(&self) -> &'static str {
        match self {
            PushTarget::Apns { .. } => "apns",
            PushTarget::Fcm { .. } => "fcm",
            PushTarget::WebPush { .. } => "webpush",
        }
    }
}

/// An endpoint is an absolute http(s) URL with a host and no whitespace, and the host is not
/// one of our own network's: no `localhost`, no single-label name, no loopback, private,
/// link-local, unspecified, shared (CGNAT), multicast or broadcast address, in IPv4 or IPv6
/// (IPv4-mapped included). Push services are on the public internet; an endpoint inside
/// ours would let any user make the push node send requests to internal services. (A public
/// name that resolves to a private address is caught at connect time: the Web Push
/// provider's resolver keeps only public addresses, `push::http::PublicResolver`.) Plain
/// http passes here; the Web Push provider refuses it unless configured to allow
/// it (tests against a local push service reach the provider directly).
fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    use crate::limits::WEBPUSH_ENDPOINT_BYTES_MAX;
    if endpoint.len() > WEBPUSH_ENDPOINT_BYTES_MAX {
        return Err(format!(
            "endpoint: at most {WEBPUSH_ENDPOINT_BYTES_MAX} bytes"
        ));
    }
    let rest = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"))
        .ok_or("endpoint: an https:// URL")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || !endpoint.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("endpoint: an https:// URL with a host, printable ASCII only".into());
    }
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    if internal_host(host) {
        return Err(format!(
            "endpoint: {host} is not a public push service (a local, private or internal address)"
        ));
    }
    Ok(())
}

/// Whether `host` (a name, an IPv4 address, or an IPv6 address without brackets) names our
/// own network rather than the public internet (see `validate_endpoint`).
fn internal_host(host: &str) -> bool {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => internal_ip(ip),
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost") || !name.contains('.')
        }
    }
}

/// Whether `ip` is one of our own network's addresses rather than the public internet's:
/// loopback, private, link-local, unspecified, shared (CGNAT), multicast or broadcast, in
/// IPv4 or IPv6 (IPv4-mapped included). The Web Push provider refuses to connect to a name
/// that resolves only to such addresses.
pub fn internal_ip(ip: std::net::IpAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr};
    let v4_internal = |a: Ipv4Addr| {
        let [o1, o2, ..] = a.octets();
        a.is_loopback()
            || a.is_private()
            || a.is_link_local()
            || a.is_unspecified()
            || a.is_broadcast()
            || a.is_multicast()
            || o1 == 0
            || (o1 == 100 && (64..128).contains(&o2))
    };
    match ip {
        IpAddr::V4(a) => v4_internal(a),
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_unique_local()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some_and(v4_internal)
        }
    }
}

/// Decoded length of unpadded base64url text, if it is valid base64url.
fn base64url_len(s: &str) -> Option<usize> {
    let alphabet = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let s = s.trim_end_matches('=');
    if !s.bytes().all(alphabet) || s.len() % 4 == 1 {
        return None;
    }
    Some(s.len() * 3 / 4)
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
        /// With `overloaded`: how long to wait before sending again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl ServerFrame {
    pub fn error(code: ErrorCode, detail: impl Into<String>) -> Self {
        ServerFrame::Error {
            code,
            detail: detail.into(),
            client_msg_id: None,
            channel: None,
            retry_after_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the `PUT /v1/devices/{device}/push` body format (tag `kind`) and that
    // validation accepts well-formed targets of each kind and names the field of a bad one.
    #[test]
    fn push_target_format_and_validation() {
        let web: PushTarget = serde_json::from_value(serde_json::json!({
            "kind": "webpush",
            "endpoint": "https://push.example.net/send/abc",
            "p256dh": "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
            "auth": "BTBZMqHH6r4Tts7J_aSIgg",
        }))
        .expect("webpush target");
        assert_eq!(web.validate(), Ok(()));
        let apns = PushTarget::Apns {
            device_token: "ab".repeat(32),
        };
        assert_eq!(apns.validate(), Ok(()));
        assert_eq!(
            serde_json::to_value(&apns).expect("json")["kind"],
            serde_json::json!("apns")
        );
        let fcm = PushTarget::Fcm {
            registration_token: "cX1:APA91b-x_y".into(),
        };
        assert_eq!(fcm.validate(), Ok(()));
        let bad = |t: PushTarget, field: &str| {
            let e = t.validate().expect_err("refused");
            assert!(e.starts_with(field), "{e} names {field}");
        };
        // Endpoints inside our own network are refused (server-side request forgery).
        let with_endpoint = |endpoint: &str| match &web {
            PushTarget::WebPush { p256dh, auth, .. } => PushTarget::WebPush {
                endpoint: endpoint.into(),
                p256dh: p256dh.clone(),
                auth: auth.clone(),
            },
            _ => unreachable!(),
        };
        for internal in [
            "https://127.0.0.1/x",
            "http://127.0.0.1:8080/x",
            "https://[::1]/x",
            "https://[::ffff:10.0.0.1]:443/x",
            "https://[fd00::1]/x",
            "https://[fe80::1]/x",
            "https://localhost/x",
            "https://LOCALHOST./x",
            "https://api.localhost/x",
            "https://kv-0:7000/x",
            "https://10.0.0.1/x",
            "https://172.16.3.4/x",
            "https://192.168.1.1/x",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/x",
            "https://0.0.0.0/x",
            "https://user@127.0.0.1/x",
        ] {
            bad(with_endpoint(internal), "endpoint");
        }
        for public in [
            "https://fcm.googleapis.com/fcm/send/abc",
            "https://8.8.8.8/x",
            "https://[2001:4860::8888]/x",
            "https://push.example.net:8443/x",
        ] {
            assert_eq!(with_endpoint(public).validate(), Ok(()), "{public}");
        }
        bad(
            PushTarget::Apns {
                device_token: "xyz0".into(),
            },
            "device_token",
        );
        bad(
            PushTarget::Apns {
                device_token: "a".repeat(202),
            },
            "device_token",
        );
        bad(
            PushTarget::Fcm {
                registration_token: String::new(),
            },
            "registration_token",
        );
        let PushTarget::WebPush {
            endpoint,
            p256dh,
            auth,
        } = web
        else {
            unreachable!("parsed as webpush above")
        };
        let with = |endpoint: &str, p256dh: &str, auth: &str| PushTarget::WebPush {
            endpoint: endpoint.into(),
            p256dh: p256dh.into(),
            auth: auth.into(),
        };
        bad(with("ftp://x/y", &p256dh, &auth), "endpoint");
        bad(with("https:///nohost", &p256dh, &auth), "endpoint");
        bad(
            with(&format!("https://x/{}", "a".repeat(3000)), &p256dh, &auth),
            "endpoint",
        );
        bad(with(&endpoint, "BAAA", &auth), "p256dh");
        bad(with(&endpoint, &p256dh, "not base64!"), "auth");
    }
}

//! Every product limit in one table. Each constant is enforced in exactly one place, named in
//! its comment; docs/ARCHITECTURE.md repeats this table.

/// Most members a group channel may have (the product's requirement). Enforced by the kv
/// `AddMember`/`CreateChannel` operations; the api maps the refusal to `group_full`.
pub const GROUP_MEMBERS_MAX: usize = 100;

/// Longest message text, in characters (Unicode scalar values). Enforced by the chat server
/// before anything is stored (`message_too_long`), and again by kv `Append`.
pub const MESSAGE_CHARS_MAX: usize = 100_000;

/// Largest WebSocket frame a chat server accepts (and the device library reads): 100,000
/// characters of up to 12 bytes each as JSON may write them (a character outside the Basic
/// Multilingual Plane escaped as a UTF-16 surrogate pair, `\uD83D\uDE00`, as JSON libraries
/// that escape non-ASCII do; a control character is 6, `\u0001`) plus the frame's other
/// fields. Every legal message therefore fits, both in the device's `send` and in the
/// server's `message` frame. Larger frames close the connection (`frame_too_large`).
pub const WS_FRAME_BYTES_MAX: usize = 12 * MESSAGE_CHARS_MAX + 4096;

/// Longest a chat server waits for the kernel to take one WebSocket frame (the device's
/// socket is full: it has not read for that long). When it fires the device is treated as a
/// `slow_consumer`: the session ends and the connection is dropped without the close
/// handshake (the reason cannot get through a full socket; it is still counted), and the
/// device resyncs from its cursors when it reconnects. Enforced by the session writer.
pub const WS_WRITE_TIMEOUT_MS: u64 = 10_000;

/// Largest internal RPC frame (a sync page of 100 maximal messages fits).
pub const RPC_FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Outbound frames queued for one device connection. When full the device is too slow to
/// keep up: the connection is closed with `slow_consumer` and the device resyncs from its
/// cursor when it reconnects (nothing is lost, it is all in kv).
pub const SESSION_OUTBOX_MAX: usize = 1024;

/// Open WebSocket connections (authenticated or not) one source address may hold on one chat
/// server. Past it the chat server closes a new connection at once, before reading anything
/// (counted in `chatsim_connections_refused_total`). Generous for a NAT of many users; it
/// bounds what one host can hold open. (Per user, connections are bounded by the 20 devices
/// of an account: a device's newer connection replaces its older one.)
pub const WS_CONNECTIONS_PER_ADDR_MAX: u32 = 1_000;

/// Largest HTTP request body the api reads (its largest legal body, a group of 100 members,
/// is a few KB). Larger bodies are refused with 413 `body_too_large`. Enforced by the api's
/// body extractor.
pub const API_BODY_BYTES_MAX: usize = 64 * 1024;

/// Longest the api waits for a request body once the headers are in (a client that sends
/// headers and then nothing would hold a connection forever): after it the request is
/// answered 408 `body_timeout` and the connection closed. A body announced larger than
/// [`API_BODY_BYTES_MAX`] (`Content-Length`) is refused 413 at once, before any is read.
/// Enforced by the api's body extractor.
pub const API_BODY_READ_TIMEOUT_MS: u64 = 10_000;

/// Longest group name, in characters; control characters are refused. Enforced by the api
/// (`POST /v1/groups`, `bad_request`).
pub const GROUP_NAME_CHARS_MAX: usize = 100;

/// Messages per sync page read from kv and sent to a device.
pub const SYNC_PAGE_MAX: usize = 100;

/// Requests one internal RPC connection may have in flight; further calls wait. Enforced on
/// both ends: the caller's queue of frames to write, and the server, which handles at most
/// this many requests of one connection at once and stops reading it until one finishes.
pub const RPC_IN_FLIGHT_MAX: usize = 4096;

/// Presence: a device heartbeats this often.
pub const HEARTBEAT_INTERVAL_MS: u64 = 5_000;

/// Presence: a user with no heartbeat for this long is offline.
pub const PRESENCE_TIMEOUT_MS: u64 = 30_000;

/// Discovery: a chat server's lease lasts this long without renewal.
pub const DISCOVERY_LEASE_MS: u64 = 6_000;

/// Discovery: a chat server renews its lease this often.
pub const DISCOVERY_RENEW_MS: u64 = 2_000;

/// Bearer tokens are valid this long after login.
pub const TOKEN_TTL_MS: u64 = 24 * 3600 * 1000;

/// Attempts to commit a message when its id is not above the channel's last one (the id
/// generator's clock lags); each retry asks for an id above the channel's last one.
pub const COMMIT_ID_RETRIES_MAX: usize = 8;

/// Per-connection send rate limit: sends per second (a token bucket of this depth).
pub const SENDS_PER_SECOND_MAX: u32 = 50;

/// Frames other than sends, reads and logout (heartbeats, presence queries, syncs) one device
/// may send per second, bursts of twice as many: a client sends one heartbeat every 5 s and a
/// presence query or sync now and then. Past it a frame is refused `rate_limited` and
/// dropped; the connection stays. Reads only update a bounded map and are not counted.
pub const CONTROL_FRAMES_PER_SECOND_MAX: u32 = 20;

/// Syncs one device may ask for per second, bursts of `SYNC_BURST_MAX` (each reads and sends
/// up to a page per channel). Past it a sync is refused `rate_limited`; the client asks
/// again at its next heartbeat tick.
pub const SYNCS_PER_SECOND_MAX: u32 = 1;
pub const SYNC_BURST_MAX: u32 = 5;

/// How long a chat server keeps a device's rate buckets after its connection closed, so that
/// reconnecting does not refill them; and how many devices' buckets it keeps at most (past
/// that the oldest closed ones go).
pub const BUCKETS_KEPT_MS: u64 = 60_000;
pub const BUCKETS_KEPT_MAX: usize = 100_000;

/// Users one device may ask the presence of in one `presence_query` (its friends list is
/// far smaller); a longer list is refused with `bad_request`. Enforced by the chat session.
pub const PRESENCE_QUERY_USERS_MAX: usize = 1000;

/// Device-side reorder buffer per channel; past it the device drops the buffer and resyncs.
pub const DEVICE_REORDER_BUFFER_MAX: usize = 1000;

/// Longest APNs device token accepted, in hex digits (tokens are 64 today; Apple says they
/// may grow). Enforced by `PushTarget::validate` (api `PUT /v1/devices/{device}/push`).
pub const APNS_DEVICE_TOKEN_CHARS_MAX: usize = 200;

/// Longest FCM registration token accepted (they are ~160 characters). Enforced by
/// `PushTarget::validate`.
pub const FCM_TOKEN_CHARS_MAX: usize = 1024;

/// Longest Web Push subscription endpoint URL accepted. Enforced by `PushTarget::validate`.
pub const WEBPUSH_ENDPOINT_BYTES_MAX: usize = 2048;

/// Devices one account may have. A login past it (without one of them) is refused
/// `limit_reached`; `DELETE /v1/devices/{device}` frees a place.
pub const DEVICES_PER_USER_MAX: usize = 20;

/// Devices one kv `ClaimPushes` or `ConfirmPushes` may name: every device of a group
/// message's recipients (99 users of 20 devices). Enforced by kv (`bad_request` beyond it).
pub const PUSH_CLAIM_DEVICES_MAX: usize = (GROUP_MEMBERS_MAX - 1) * DEVICES_PER_USER_MAX;

/// Devices in one kv `SetCursorsBatch`. A chat server gathers its sessions' cursors per kv
/// shard and writes them every `CURSOR_FLUSH_MS`; a shard's batch that reaches this many
/// devices is written at once. Enforced by kv (`bad_request` beyond it) and by the batcher.
pub const CURSOR_BATCH_DEVICES_MAX: usize = 10_000;

/// (channel, seq) pairs in one kv `SetCursorsBatch` (about 4 MB of JSON), and channels one
/// device's pending cursors may name (the rest wait for the device's next report). A shard's
/// batch that reaches it is written at once. Enforced by kv (`bad_request` beyond it) and by
/// the batcher.
pub const CURSOR_BATCH_PAIRS_MAX: usize = 100_000;

/// Sends one chat server commits at once (idgen, then kv) at most (`ChatConfig`,
/// `[[chat]] sends_in_flight_max`). A send past the limit is refused at once with
/// `overloaded` and `retry_after_ms` = `OVERLOAD_RETRY_AFTER_MS`, nothing written
/// (`chat::admission`). With a latency target (`ADMISSION_TARGET_MS`) the limit adapts below
/// this ceiling; without one it is this number, fixed.
pub const SENDS_IN_FLIGHT_MAX: usize = 100_000;

/// The commit latency (idgen, then kv: mean over a window) an adaptive admission limit aims
/// at by default (`[[chat]] admission_target_ms`; 0 turns adaptation off). Measured with
/// `scripts/bench-real.sh overload` (8,000 1:1 sends/s offered on this 2-core machine, about
/// twice what it acks, TLS; benches/results/real/overload.txt), as acked/s and attempt->ack
/// p99 (from the transmission the server accepted to its ack): no limit, 4,261/s and 21 s;
/// target 50 ms, 2,990/s and 242 ms; 100 ms, 3,407/s and 553 ms, and with the baseline rule
/// of `chat::admission` 2,680-3,130/s and 536-537 ms (4,259/s and 20.8 s without admission in
/// the same hour); 200 ms, 3,900/s and 2.4 s. Fixed limits of 32 / 128 / 256:
/// 2,352 / 3,316-3,417 / 3,841 per s, p99 167 ms / 617-645 ms / 3.5 s. 100 ms keeps accepted
/// sends under 1 s at p99; what the system cannot take waits on the devices.
pub const ADMISSION_TARGET_MS: u64 = 100;

/// The floor of an adaptive admission limit: a server never admits fewer sends at once.
pub const ADMISSION_LIMIT_MIN: usize = 8;

/// The retry hint an `overloaded` refusal carries. A device holds its sends for the hint
/// times 2^k (k: backoffs in a row before this one, reset by an ack), with jitter (a uniform
/// draw between half and all of it), at most `DEVICE_BACKOFF_MAX_MS`.
pub const OVERLOAD_RETRY_AFTER_MS: u64 = 1_000;

/// The longest a device holds its sends after refusals with a retry-after hint.
pub const DEVICE_BACKOFF_MAX_MS: u64 = 30_000;

/// Friends one user may have (each friendship is a 1:1 channel); past it `limit_reached`.
pub const FRIENDS_PER_USER_MAX: usize = 5_000;

/// Friend requests one user may have waiting for an answer (from distinct users). Past it a
/// new request is refused `limit_reached` (the user declines or accepts some first).
pub const FRIEND_REQUESTS_MAX: usize = 1_000;

/// Group invitations one user may have waiting (for distinct groups). Past it a new one is
/// refused `limit_reached`.
pub const GROUP_INVITES_MAX: usize = 1_000;

/// Channels (1:1 and groups) one user may be in; past it `limit_reached`.
pub const CHANNELS_PER_USER_MAX: usize = 6_000;

//! The api's routes. Every refusal is `{"error": code, "detail": ...}` with a fitting status.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use futures::{stream, StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::throttle::LoginThrottle;
use crate::auth::{Claims, Passwords, TokenKey};
use crate::clock::unix_ms;
use crate::cluster::Peers;
use crate::limits::{
    API_BODY_BYTES_MAX, API_BODY_READ_TIMEOUT_MS, CHANNELS_PER_USER_MAX, FRIENDS_PER_USER_MAX,
    GROUP_MEMBERS_MAX, GROUP_NAME_CHARS_MAX, SYNC_PAGE_MAX, TOKEN_TTL_MS,
};
use crate::metrics::Metrics;
use crate::proto::client::*;
use crate::proto::internal::{ChannelKind, ChannelRecord, Request, Response, UserRecord};
use crate::proto::Id;
use crate::rpc::RpcError;

pub struct ApiState {
    pub peers: Arc<Peers>,
    pub token_key: TokenKey,
    pub passwords: Arc<Passwords>,
    pub login_throttle: LoginThrottle,
    pub metrics: Arc<Metrics>,
}

type S = State<Arc<ApiState>>;

/// A refusal: HTTP status, code, words.
#[derive(Debug)]
pub struct ApiError(StatusCode, ErrorCode, String, Option<u64>);

impl ApiError {
    /// Adds `Retry-After: secs` to the answer (a 429 or 503 the client should wait out).
    fn retry_after(mut self, secs: u64) -> Self {
        self.3 = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        let body = ErrorBody {
            error: self.1,
            detail: self.2,
        };
        let mut resp = (self.0, Json(body)).into_response();
        if let Some(secs) = self.3 {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        // Read back by the error-counting layer of `router`.
        resp.extensions_mut().insert(self.1);
        resp
    }
}

impl From<RpcError> for ApiError {
    fn from(e: RpcError) -> Self {
        let code = e.code();
        tracing::debug!(error = %e, "refused for an internal failure");
        ApiError(status_of(code), code, e.public_detail(), None)
    }
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadToken
        | ErrorCode::TokenExpired
        | ErrorCode::TokenRevoked
        | ErrorCode::NotAuthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::BadCredentials => StatusCode::UNAUTHORIZED,
        ErrorCode::NotAMember | ErrorCode::NotAdmin => StatusCode::FORBIDDEN,
        ErrorCode::UnknownChannel | ErrorCode::UnknownUser | ErrorCode::UnknownDevice => {
            StatusCode::NOT_FOUND
        }
        ErrorCode::NameTaken | ErrorCode::GroupFull | ErrorCode::LimitReached => {
            StatusCode::CONFLICT
        }
        ErrorCode::Unavailable | ErrorCode::NoChatServer | ErrorCode::Overloaded => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn refuse(code: ErrorCode, detail: impl Into<String>) -> ApiError {
    ApiError(status_of(code), code, detail.into(), None)
}

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn router(state: Arc<ApiState>) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route("/", get(super::web::index))
        .route("/app.js", get(super::web::app_js))
        .route("/app.css", get(super::web::app_css))
        .route("/v1/signup", post(signup))
        .route("/v1/login", post(login))
        .route("/v1/me", get(me))
        .route("/v1/users", get(find_user))
        .route("/v1/users/{user}", get(user_summary))
        .route("/v1/friends", post(add_friend))
        .route("/v1/friend-requests/{user}", delete(decline_friend))
        .route("/v1/groups/{channel}/join", post(join_group))
        .route("/v1/groups/{channel}/invitation", delete(decline_group))
        .route("/v1/groups", post(create_group))
        .route("/v1/groups/{channel}/members", post(add_member))
        .route("/v1/groups/{channel}/members/{user}", delete(remove_member))
        .route("/v1/channels/{channel}", get(channel_info))
        .route("/v1/channels/{channel}/messages", get(history))
        .route("/v1/chat-server", get(chat_server))
        .route(
            "/v1/devices/{device}/push",
            put(set_push_target).delete(clear_push_target),
        )
        .route("/v1/devices/{device}", delete(remove_device))
        .route("/v1/logout", post(logout))
        .with_state(state)
        .layer(axum::middleware::map_response(move |resp: HttpResponse| {
            let metrics = metrics.clone();
            async move {
                if let Some(code) = resp.extensions().get::<ErrorCode>() {
                    metrics.count_error(*code);
                }
                resp
            }
        }))
}

/// A request body of at most [`API_BODY_BYTES_MAX`] bytes, read within
/// [`API_BODY_READ_TIMEOUT_MS`]. axum's own `Bytes` extractor would refuse a larger one with a
/// plain-text 413; this one answers `body_too_large` in our JSON error body, at once when
/// `Content-Length` announces it, `body_timeout` (408) when the body does not arrive in time,
/// and any other failure to read the body as `bad_request`.
struct Body(Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(mut req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let announced = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|n| n > API_BODY_BYTES_MAX as u64) {
            return Err(refuse(
                ErrorCode::BodyTooLarge,
                format!("request body over {API_BODY_BYTES_MAX} bytes"),
            ));
        }
        DefaultBodyLimit::max(API_BODY_BYTES_MAX).apply(&mut req);
        let read = Bytes::from_request(req, state);
        let wait = std::time::Duration::from_millis(API_BODY_READ_TIMEOUT_MS);
        let Ok(read) = tokio::time::timeout(wait, read).await else {
            return Err(refuse(
                ErrorCode::BodyTimeout,
                format!("request body not received within {API_BODY_READ_TIMEOUT_MS} ms"),
            ));
        };
        read.map(Body).map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                refuse(
                    ErrorCode::BodyTooLarge,
                    format!("request body over {API_BODY_BYTES_MAX} bytes"),
                )
            } else {
                refuse(ErrorCode::BadRequest, e.body_text())
            }
        })
    }
}

/// Parses a JSON body with our own error code (axum's rejection is plain text).
fn parse<T: DeserializeOwned>(body: &Body) -> Result<T, ApiError> {
    decode_body(&body.0).map_err(|e| refuse(ErrorCode::MalformedJson, e.to_string()))
}

/// Decodes a request body as every route does.
pub fn decode_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// The caller's claims: a Bearer token signed by one of the ring's keys, not expired, and not
/// revoked (its user's record, read from kv, still accepts it).
async fn auth(st: &ApiState, headers: &HeaderMap) -> Result<Claims, ApiError> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or_else(|| refuse(ErrorCode::NotAuthenticated, "missing Bearer token"))?;
    let claims = st
        .token_key
        .verify(token, unix_ms())
        .map_err(|code| refuse(code, "token refused"))?;
    get_user(st, claims.user)
        .await?
        .accepts(&claims)
        .map_err(|code| refuse(code, "this token was revoked: log in again"))?;
    Ok(claims)
}

/// The token of an `Authorization` value: the scheme `Bearer` in any case (RFC 9110 11.1:
/// schemes are case-insensitive), then one or more spaces.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

async fn call(kv: &crate::kv::client::ShardClient, req: Request) -> Result<Response, ApiError> {
    Ok(kv.call(req).await?)
}

async fn alloc(st: &ApiState, kind: &str) -> Result<Id, ApiError> {
    let req = Request::AllocId { kind: kind.into() };
    match call(st.peers.kv_counters(), req).await? {
        Response::Id(id) => Ok(id),
        other => Err(refuse(ErrorCode::Unavailable, format!("{other:?}"))),
    }
}

async fn get_user(st: &ApiState, user: Id) -> Result<UserRecord, ApiError> {
    match call(st.peers.kv_for_user(user), Request::GetUser { user }).await? {
        Response::User(Some(u)) => Ok(u),
        _ => Err(refuse(ErrorCode::UnknownUser, format!("user {user}"))),
    }
}

async fn get_channel(st: &ApiState, channel: Id) -> Result<ChannelRecord, ApiError> {
    match call(
        st.peers.kv_for_channel(channel),
        Request::GetChannel { channel },
    )
    .await?
    {
        Response::Channel(Some(c)) => Ok(c),
        _ => Err(refuse(
            ErrorCode::UnknownChannel,
            format!("channel {channel}"),
        )),
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

async fn signup(State(st): S, body: Body) -> ApiResult<SignupResponse> {
    let req: SignupRequest = parse(&body)?;
    if !valid_name(&req.name) || req.password.is_empty() || req.password.len() > 256 {
        return Err(refuse(
            ErrorCode::BadRequest,
            "name: 1-64 of [A-Za-z0-9-_.]; password: 1-256 bytes",
        ));
    }
    let user = alloc(&st, "user").await?;
    let reserve = Request::ReserveName {
        name: req.name.clone(),
        user,
    };
    match call(st.peers.kv_for_name(&req.name), reserve).await? {
        // Ours, or ours already: a retried reservation whose first answer was lost.
        Response::Reserved {
            fresh,
            user: holder,
        } if fresh || holder == user => {}
        _ => return Err(refuse(ErrorCode::NameTaken, req.name)),
    }
    let passwords = st.passwords.clone();
    let password = req.password.clone();
    let password_hash = crate::net::run_blocking(move || passwords.hash(&password)).await;
    let record = UserRecord {
        user,
        name: req.name.clone(),
        password_hash,
        ..UserRecord::default()
    };
    call(st.peers.kv_for_user(user), Request::PutUser { record }).await?;
    Ok(Json(SignupResponse { user }))
}

async fn login(
    State(st): S,
    addr: Option<axum::Extension<super::http::ClientAddr>>,
    body: Body,
) -> ApiResult<LoginResponse> {
    let req: LoginRequest = parse(&body)?;
    let lookup = Request::LookupName {
        name: req.name.clone(),
    };
    let bad = || refuse(ErrorCode::BadCredentials, "unknown name or wrong password");
    let addr_key = addr.map(|a| super::throttle::addr_key(a.0 .0));
    let now = unix_ms();
    for (key, what) in [
        (Some(req.name.as_str()), "this name"),
        (addr_key.as_deref(), "this address"),
    ] {
        if let Some(Err(ms)) = key.map(|k| st.login_throttle.check(k, now)) {
            let secs = ms.div_ceil(1000);
            return Err(refuse(
                ErrorCode::RateLimited,
                format!("too many failed logins for {what}; retry after {secs} s"),
            )
            .retry_after(secs));
        }
    }
    let failed = |st: &ApiState| {
        let now = unix_ms();
        if valid_name(&req.name) {
            st.login_throttle.failed(&req.name, now);
        }
        if let Some(k) = &addr_key {
            st.login_throttle.failed(k, now);
        }
    };
    if !valid_name(&req.name) {
        // No such name can exist (and it must not reach the table: `addr:` keys live there).
        failed(&st);
        return Err(bad());
    }
    let passwords = st.passwords.clone();
    let Response::MaybeId(Some(user)) = call(st.peers.kv_for_name(&req.name), lookup).await? else {
        // As long as a wrong password takes: the answer's time does not tell names apart.
        let password = req.password.clone();
        crate::net::run_blocking(move || passwords.waste(&password)).await;
        failed(&st);
        return Err(bad());
    };
    let rec = get_user(&st, user).await?;
    let (name, password) = (req.name.clone(), req.password.clone());
    let stored = rec.password_hash.clone();
    let good = crate::net::run_blocking(move || passwords.verify(&name, &password, &stored)).await;
    if !good {
        failed(&st);
        return Err(bad());
    }
    st.login_throttle.succeeded(&req.name);
    let device = match req.device {
        Some(d) if rec.devices.contains(&d) => d,
        _ => {
            let d = alloc(&st, "device").await?;
            let add = Request::AddDevice { user, device: d };
            call(st.peers.kv_for_user(user), add).await?;
            d
        }
    };
    let expires_at_ms = unix_ms() + TOKEN_TTL_MS;
    Ok(Json(LoginResponse {
        user,
        device,
        token: st.token_key.sign(user, device, expires_at_ms),
        expires_at_ms,
    }))
}

/// What `GET /v1/me` shows of a user record.
fn profile(u: UserRecord) -> Profile {
    Profile {
        user: u.user,
        name: u.name,
        devices: u.devices,
        friends: u.friends,
        channels: u.channels,
        friend_requests: u.friend_requests.into_keys().collect(),
        group_invites: u.group_invites.into_keys().collect(),
    }
}

async fn me(State(st): S, headers: HeaderMap) -> ApiResult<Profile> {
    let c = auth(&st, &headers).await?;
    let u = get_user(&st, c.user).await?;
    Ok(Json(profile(u)))
}

/// Finds a user by name (to befriend them or add them to a group). Signed-in users only.
async fn find_user(
    State(st): S,
    headers: HeaderMap,
    Query(q): Query<UserQuery>,
) -> ApiResult<UserSummary> {
    auth(&st, &headers).await?;
    let lookup = Request::LookupName {
        name: q.name.clone(),
    };
    let Response::MaybeId(Some(user)) = call(st.peers.kv_for_name(&q.name), lookup).await? else {
        return Err(refuse(
            ErrorCode::UnknownUser,
            format!("no user named {:?}", q.name),
        ));
    };
    Ok(Json(UserSummary { user, name: q.name }))
}

/// A user's name, for clients that show names instead of ids. Signed-in users only.
async fn user_summary(
    State(st): S,
    headers: HeaderMap,
    Path(user): Path<Id>,
) -> ApiResult<UserSummary> {
    auth(&st, &headers).await?;
    let u = get_user(&st, user).await?;
    Ok(Json(UserSummary {
        user: u.user,
        name: u.name,
    }))
}

/// A channel's kind, name and members; members only, and users invited to it (to decide).
async fn channel_info(
    State(st): S,
    headers: HeaderMap,
    Path(channel): Path<Id>,
) -> ApiResult<ChannelInfo> {
    let c = auth(&st, &headers).await?;
    let ch = get_channel(&st, channel).await?;
    if !ch.members.contains(&c.user)
        && !get_user(&st, c.user)
            .await?
            .group_invites
            .contains_key(&channel)
    {
        return Err(refuse(ErrorCode::NotAMember, format!("channel {channel}")));
    }
    Ok(Json(ChannelInfo {
        channel,
        kind: ch.kind,
        name: ch.name,
        members: ch.members,
    }))
}

async fn add_friend(State(st): S, headers: HeaderMap, body: Body) -> ApiResult<AddFriendResponse> {
    let c = auth(&st, &headers).await?;
    let req: AddFriendRequest = parse(&body)?;
    if req.user == c.user {
        return Err(refuse(ErrorCode::BadRequest, "cannot befriend yourself"));
    }
    let me = get_user(&st, c.user).await?;
    let them = get_user(&st, req.user).await?;
    if let Some(ch) = me.friends.get(&req.user) {
        return Ok(Json(AddFriendResponse {
            status: FriendStatus::Friends,
            channel: Some(*ch),
        }));
    }
    // Consent: without their request waiting on your record, this is your request to them.
    if !me.friend_requests.contains_key(&req.user) {
        let ask = Request::RequestFriend {
            user: req.user,
            from: c.user,
            at_ms: unix_ms(),
        };
        call(st.peers.kv_for_user(req.user), ask).await?;
        return Ok(Json(AddFriendResponse {
            status: FriendStatus::Requested,
            channel: None,
        }));
    }
    // Checked on both sides before anything is written, so that a cap does not leave a
    // friendship on one side only (kv enforces the caps too, for a race between two adds).
    for (who, u) in [("you", &me), ("they", &them)] {
        if u.friends.len() >= FRIENDS_PER_USER_MAX || u.channels.len() >= CHANNELS_PER_USER_MAX {
            return Err(refuse(
                ErrorCode::LimitReached,
                format!(
                    "{who} already have {} friends and {} channels: at most \
                     {FRIENDS_PER_USER_MAX} and {CHANNELS_PER_USER_MAX}",
                    u.friends.len(),
                    u.channels.len()
                ),
            ));
        }
    }
    let channel = alloc(&st, "channel").await?;
    let record = ChannelRecord {
        channel,
        kind: ChannelKind::Direct,
        name: String::new(),
        members: vec![c.user, req.user],
        last_seq: 0,
        last_message_id: 0,
    };
    call(
        st.peers.kv_for_channel(channel),
        Request::CreateChannel { record },
    )
    .await?;
    for (a, b) in [(c.user, req.user), (req.user, c.user)] {
        let link = Request::LinkFriend {
            user: a,
            friend: b,
            channel,
        };
        call(st.peers.kv_for_user(a), link).await?;
    }
    Ok(Json(AddFriendResponse {
        status: FriendStatus::Friends,
        channel: Some(channel),
    }))
}

/// Declines `user`'s friend request (nothing if there is none).
async fn decline_friend(
    State(st): S,
    headers: HeaderMap,
    Path(user): Path<Id>,
) -> ApiResult<Profile> {
    let c = auth(&st, &headers).await?;
    let req = Request::DropFriendRequest {
        user: c.user,
        from: user,
    };
    call(st.peers.kv_for_user(c.user), req).await?;
    Ok(Json(profile(get_user(&st, c.user).await?)))
}

/// kv calls one group creation keeps in flight at once (lookups, then member writes).
const MEMBER_CALLS_IN_FLIGHT: usize = 16;

async fn create_group(State(st): S, headers: HeaderMap, body: Body) -> ApiResult<GroupResponse> {
    let c = auth(&st, &headers).await?;
    let req: CreateGroupRequest = parse(&body)?;
    let chars = req.name.chars().count();
    if chars == 0 || chars > GROUP_NAME_CHARS_MAX || req.name.chars().any(char::is_control) {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("name: 1 to {GROUP_NAME_CHARS_MAX} characters, no control characters"),
        ));
    }
    let mut members: Vec<Id> = vec![c.user];
    let mut seen = BTreeSet::from([c.user]);
    for m in req.members {
        if seen.insert(m) {
            members.push(m);
        }
    }
    if members.len() > GROUP_MEMBERS_MAX {
        return Err(refuse(
            ErrorCode::GroupFull,
            format!("{} members, at most {GROUP_MEMBERS_MAX}", members.len()),
        ));
    }
    // Up to 100 members: look them up, and later add the channel to each, a few at a time
    // rather than one after another (a replicated write costs a quorum round trip).
    let st_ref = &st;
    let records = stream::iter(members.clone())
        .map(|m| get_user(st_ref, m))
        .buffered(MEMBER_CALLS_IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    if let Some(full) = records
        .iter()
        .find(|u| u.channels.len() >= CHANNELS_PER_USER_MAX)
    {
        return Err(refuse(
            ErrorCode::LimitReached,
            format!(
                "user {} is in {CHANNELS_PER_USER_MAX} channels already, the most one may be",
                full.user
            ),
        ));
    }
    let channel = alloc(&st, "channel").await?;
    // Consent: the creator is the only member; the others are invited and join themselves.
    let invited: Vec<Id> = members[1..].to_vec();
    let record = ChannelRecord {
        channel,
        kind: ChannelKind::Group,
        name: req.name,
        members: vec![c.user],
        last_seq: 0,
        last_message_id: 0,
    };
    call(
        st.peers.kv_for_channel(channel),
        Request::CreateChannel { record },
    )
    .await?;
    set_user_channel(st_ref, c.user, channel, true).await?;
    stream::iter(invited.clone())
        .map(|m| invite(st_ref, m, channel, c.user))
        .buffered(MEMBER_CALLS_IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(Json(GroupResponse {
        channel,
        members: vec![c.user],
        invited,
    }))
}

async fn invite(st: &ApiState, user: Id, channel: Id, by: Id) -> Result<(), ApiError> {
    let req = Request::InviteToGroup { user, channel, by };
    call(st.peers.kv_for_user(user), req).await?;
    Ok(())
}

/// Joins a group the caller is invited to.
async fn join_group(
    State(st): S,
    headers: HeaderMap,
    Path(channel): Path<Id>,
) -> ApiResult<GroupResponse> {
    let c = auth(&st, &headers).await?;
    let me = get_user(&st, c.user).await?;
    if !me.group_invites.contains_key(&channel) && !me.channels.contains(&channel) {
        return Err(refuse(
            ErrorCode::NotAMember,
            format!("no invitation to channel {channel}"),
        ));
    }
    if !me.channels.contains(&channel) && me.channels.len() >= CHANNELS_PER_USER_MAX {
        return Err(refuse(
            ErrorCode::LimitReached,
            format!("you are in {CHANNELS_PER_USER_MAX} channels already, the most one may be"),
        ));
    }
    let add = Request::AddMember {
        channel,
        user: c.user,
    };
    let Response::Members(members) = call(st.peers.kv_for_channel(channel), add).await? else {
        return Err(refuse(ErrorCode::Unavailable, "unexpected kv answer"));
    };
    set_user_channel(&st, c.user, channel, true).await?;
    Ok(Json(GroupResponse {
        channel,
        members,
        invited: Vec::new(),
    }))
}

/// Declines an invitation to a group.
async fn decline_group(
    State(st): S,
    headers: HeaderMap,
    Path(channel): Path<Id>,
) -> ApiResult<Profile> {
    let c = auth(&st, &headers).await?;
    let req = Request::DropGroupInvite {
        user: c.user,
        channel,
    };
    call(st.peers.kv_for_user(c.user), req).await?;
    Ok(Json(profile(get_user(&st, c.user).await?)))
}

async fn set_user_channel(
    st: &ApiState,
    user: Id,
    channel: Id,
    member: bool,
) -> Result<(), ApiError> {
    let req = Request::SetUserChannel {
        user,
        channel,
        member,
    };
    call(st.peers.kv_for_user(user), req).await?;
    Ok(())
}

async fn add_member(
    State(st): S,
    headers: HeaderMap,
    Path(channel): Path<Id>,
    body: Body,
) -> ApiResult<GroupResponse> {
    let c = auth(&st, &headers).await?;
    let req: AddMemberRequest = parse(&body)?;
    let ch = get_channel(&st, channel).await?;
    if !ch.members.contains(&c.user) {
        return Err(refuse(ErrorCode::NotAMember, format!("channel {channel}")));
    }
    get_user(&st, req.user).await?;
    if ch.members.contains(&req.user) {
        return Ok(Json(GroupResponse {
            channel,
            members: ch.members,
            invited: Vec::new(),
        }));
    }
    if ch.kind != ChannelKind::Group {
        return Err(refuse(
            ErrorCode::BadRequest,
            "a 1:1 channel's members are fixed",
        ));
    }
    if ch.members.len() >= GROUP_MEMBERS_MAX {
        return Err(refuse(
            ErrorCode::GroupFull,
            format!("{} members, at most {GROUP_MEMBERS_MAX}", ch.members.len()),
        ));
    }
    // Consent: an invitation; they join themselves (`join_group`).
    invite(&st, req.user, channel, c.user).await?;
    Ok(Json(GroupResponse {
        channel,
        members: ch.members,
        invited: vec![req.user],
    }))
}

async fn remove_member(
    State(st): S,
    headers: HeaderMap,
    Path((channel, user)): Path<(Id, Id)>,
) -> ApiResult<GroupResponse> {
    let c = auth(&st, &headers).await?;
    let ch = get_channel(&st, channel).await?;
    if !ch.members.contains(&c.user) {
        return Err(refuse(ErrorCode::NotAMember, format!("channel {channel}")));
    }
    if ch.kind != ChannelKind::Group {
        return Err(refuse(
            ErrorCode::BadRequest,
            "a 1:1 channel's members are fixed",
        ));
    }
    // The admin is the creator, the first member (the next oldest once it leaves).
    if user != c.user && ch.members.first() != Some(&c.user) {
        return Err(refuse(
            ErrorCode::NotAdmin,
            format!("only the group's admin removes others from channel {channel}"),
        ));
    }
    // The removal is this one write: reads check membership against the channel's record
    // (kv `read_log` with the reader), so the user's own channel list below is only an index
    // (its update is retried by the next change; a stale entry reads nothing).
    let rm = Request::RemoveMember { channel, user };
    let Response::Members(members) = call(st.peers.kv_for_channel(channel), rm).await? else {
        return Err(refuse(ErrorCode::Unavailable, "unexpected kv answer"));
    };
    if let Err(e) = set_user_channel(&st, user, channel, false).await {
        tracing::debug!(user, channel, error = ?e.1, "the removed user's channel list is stale");
    }
    Ok(Json(GroupResponse {
        channel,
        members,
        invited: Vec::new(),
    }))
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    after_seq: u64,
    #[serde(default)]
    limit: Option<u32>,
}

async fn history(
    State(st): S,
    headers: HeaderMap,
    Path(channel): Path<Id>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<HistoryResponse> {
    let c = auth(&st, &headers).await?;
    let ch = get_channel(&st, channel).await?;
    let unchecked = st
        .peers
        .canaries
        .is_on(crate::canary::Canary::SkipMembershipCheck);
    if !ch.members.contains(&c.user) && !unchecked {
        return Err(refuse(ErrorCode::NotAMember, format!("channel {channel}")));
    }
    let limit = q
        .limit
        .unwrap_or(SYNC_PAGE_MAX as u32)
        .min(SYNC_PAGE_MAX as u32);
    let read = Request::ReadLog {
        reader: (!unchecked).then_some(c.user),
        channel,
        after_seq: q.after_seq,
        limit,
    };
    match call(st.peers.kv_for_channel(channel), read).await? {
        Response::Log { messages, last_seq } => Ok(Json(HistoryResponse {
            channel,
            messages,
            last_seq,
        })),
        other => Err(refuse(ErrorCode::Unavailable, format!("{other:?}"))),
    }
}

async fn chat_server(
    State(st): S,
    headers: HeaderMap,
    Query(q): Query<ChatServerQuery>,
) -> ApiResult<ChatServerResponse> {
    let c = auth(&st, &headers).await?;
    match st.peers.discovery.pick(c.device, q.avoid).await? {
        Some(info) => Ok(Json(ChatServerResponse {
            // The scheme the server registered: it knows whether it serves TLS.
            url: format!(
                "{}://{}/ws",
                if info.tls { "wss" } else { "ws" },
                info.ws_addr
            ),
            server: info.server,
        })),
        None => Err(refuse(ErrorCode::NoChatServer, "no live chat server")),
    }
}

/// `PUT /v1/devices/{device}/push` with a [`PushTarget`] body: where the device's push
/// notifications go from now on (replacing any earlier target). The device must be one of
/// the caller's (`unknown_device`, 404); a malformed target is `bad_request` naming the field.
async fn set_push_target(
    State(st): S,
    headers: HeaderMap,
    Path(device): Path<Id>,
    body: Body,
) -> ApiResult<PushTargetResponse> {
    let c = auth(&st, &headers).await?;
    let target: PushTarget = parse(&body)?;
    target
        .validate()
        .map_err(|detail| refuse(ErrorCode::BadRequest, detail))?;
    store_push_target(&st, c.user, device, Some(target)).await
}

/// `DELETE /v1/devices/{device}/push`: the device gets no more push notifications.
#[derive(Debug, Deserialize)]
struct LogoutQuery {
    /// Every device of the caller, not only this one.
    #[serde(default)]
    everywhere: bool,
}

/// Signs the caller's device out (`?everywhere=true`: every device of the caller): revokes
/// its tokens issued until now, then ends its sessions on the chat servers (they are told
/// `token_revoked`). Answers once the revocation is durable; a session whose chat server did
/// not answer ends at its next reconnect, which the revocation refuses.
async fn logout(
    State(st): S,
    headers: HeaderMap,
    Query(q): Query<LogoutQuery>,
) -> ApiResult<LogoutResponse> {
    let c = auth(&st, &headers).await?;
    let device = (!q.everywhere).then_some(c.device);
    let req = Request::RevokeTokens {
        user: c.user,
        device,
        at_ms: unix_ms(),
    };
    call(st.peers.kv_for_user(c.user), req).await?;
    end_sessions(&st, c.user, device).await?;
    Ok(Json(LogoutResponse {
        user: c.user,
        device,
    }))
}

/// Asks the chat servers holding sessions of `device` of `user` (all devices: `None`) to end
/// them: their tokens no longer stand.
async fn end_sessions(st: &ApiState, user: Id, device: Option<Id>) -> Result<(), ApiError> {
    let sessions = match call(
        st.peers.kv_for_user(user),
        Request::GetSessions { users: vec![user] },
    )
    .await?
    {
        Response::Sessions(list) => list,
        _ => Vec::new(),
    };
    let servers: std::collections::BTreeSet<u32> = sessions
        .iter()
        .filter(|s| device.is_none_or(|d| s.device == d))
        .map(|s| s.server)
        .collect();
    if servers.iter().any(|s| st.peers.chat_server(*s).is_none()) {
        let _ = st.peers.refresh_chat_servers().await;
    }
    let calls = servers
        .into_iter()
        .filter_map(|s| st.peers.chat_server(s))
        .map(|c| async move {
            let _ = c.call(Request::EndSessions { user, device }).await;
        });
    futures::future::join_all(calls).await;
    Ok(())
}

/// Removes one of the caller's devices (freeing a place under `DEVICES_PER_USER_MAX`); its
/// tokens stop working at once (the device is no longer the user's) and its sessions end.
async fn remove_device(
    State(st): S,
    headers: HeaderMap,
    Path(device): Path<Id>,
) -> ApiResult<Profile> {
    let c = auth(&st, &headers).await?;
    let u = get_user(&st, c.user).await?;
    if !u.devices.contains(&device) {
        return Err(refuse(
            ErrorCode::UnknownDevice,
            format!("device {device} is not one of yours"),
        ));
    }
    let req = Request::RemoveDevice {
        user: c.user,
        device,
    };
    call(st.peers.kv_for_user(c.user), req).await?;
    end_sessions(&st, c.user, Some(device)).await?;
    let u = get_user(&st, c.user).await?;
    Ok(Json(profile(u)))
}

async fn clear_push_target(
    State(st): S,
    headers: HeaderMap,
    Path(device): Path<Id>,
) -> ApiResult<PushTargetResponse> {
    let c = auth(&st, &headers).await?;
    store_push_target(&st, c.user, device, None).await
}

/// The kv op checks that the device is the user's in the same transaction as the write (its
/// refusals arrive as `RpcError::Remote` and keep their code).
async fn store_push_target(
    st: &ApiState,
    user: Id,
    device: Id,
    target: Option<PushTarget>,
) -> ApiResult<PushTargetResponse> {
    let kind = target.as_ref().map(|t| t.kind().to_string());
    let req = Request::SetPushTarget {
        user,
        device,
        target,
    };
    match call(st.peers.kv_for_user(user), req).await? {
        Response::Ok => Ok(Json(PushTargetResponse { device, kind })),
        other => Err(refuse(ErrorCode::Unavailable, format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    // Proves the Bearer scheme is matched in any case and takes the rest as the token, and
    // other schemes or an empty token are not a bearer token.
    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer abc.def", "bearer abc.def", "BEARER  abc.def"] {
            assert_eq!(bearer_token(v), Some("abc.def"), "{v:?}");
        }
        for v in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", "abc.def"] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }
}

//! `chat`: a chatsim device on the command line, built on the device client library
//! (`nodes::client`). `chat login` saves the token and device id in a small state file (mode
//! 0600: the token is a credential); every other command is that device.
//!
//! ```text
//! chat signup alice pw && chat login alice pw
//! chat friend bob                 # prints the 1:1 channel
//! chat send --to bob "hi"         # or: chat send CHANNEL "hi"
//! chat follow                     # prints deliveries until Ctrl-C
//! ```
//!
//! One state file is one device. `follow` and a one-shot command (`send`, `presence`) on the
//! same state file share that device: the newer connection replaces the older (the
//! protocol's rule), and `follow` reconnects and resyncs from its cursors, losing nothing.
//!
//! Real world only: under `--cfg madsim` this binary is a stub that says so.

#[cfg(madsim)]
fn main() {
    eprintln!("chat is a real-world client; build it without --cfg madsim");
    std::process::exit(2);
}

#[cfg(not(madsim))]
fn main() -> std::process::ExitCode {
    real::main()
}

#[cfg(not(madsim))]
mod real {
    use std::collections::BTreeMap;
    use std::net::{SocketAddr, ToSocketAddrs};
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;
    use std::time::Duration;

    use anyhow::{anyhow, bail, Context};
    use clap::{Parser, Subcommand};
    use nodes::client::device::{DeviceState, Observation};
    use nodes::client::http::HttpClient;
    use nodes::client::runtime::{
        open_session, Command, DeviceEvent, DeviceRuntime, Exit, Flow, Login, Observer, Settings,
    };
    use nodes::client::ws::{Incoming, WsConn};
    use nodes::client::ClientError;
    use nodes::client_tls::ClientTls;
    use nodes::clock::unix_ms;
    use nodes::limits::{HEARTBEAT_INTERVAL_MS, SYNC_PAGE_MAX};
    use nodes::proto::client::*;
    use nodes::proto::Id;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use serde::{Deserialize, Serialize};
    use tokio::sync::mpsc;
    use tokio::time::MissedTickBehavior;
    /// Attempts of a one-shot command (send, presence) through dropped connections and
    /// retryable refusals, `RETRY_PAUSE` apart.
    const ATTEMPTS_MAX: u32 = 20;
    const RETRY_PAUSE: Duration = Duration::from_millis(500);
    /// `follow`'s reconnect backoff: doubles from the first to the last, with jitter.
    const BACKOFF_MIN: Duration = Duration::from_millis(500);
    const BACKOFF_MAX: Duration = Duration::from_secs(15);
    /// `follow` asks for the friend list this often (whose presence to show).
    const FRIENDS_REFRESH: Duration = Duration::from_secs(60);
    /// A connection that answers nothing for three heartbeats is dead (the protocol's rule).
    const SILENCE_MAX: Duration = Duration::from_millis(3 * HEARTBEAT_INTERVAL_MS);
    /// How long `presence` waits for its answers: a presence node that just started answers
    /// only after its warm-up (the session keeps asking meanwhile), then some slack.
    const PRESENCE_WAIT: Duration = Duration::from_millis(nodes::presence::WARMUP_MS + 10_000);

    #[derive(Debug, Parser)]
    #[command(name = "chat", version, about = "A chatsim device on the command line")]
    struct Cli {
        /// The api node: http://HOST:PORT, or https://HOST:PORT (chat servers are then
        /// wss://).
        #[arg(long, global = true, default_value = "https://127.0.0.1:8080")]
        server: String,
        /// A PEM certificate to trust besides the public web's roots: a self-signed server's
        /// (`chatd all-in-one` writes `<data>/tls/client.crt`) or a private CA's. `login`
        /// remembers it for the later commands.
        #[arg(long, global = true)]
        ca_cert: Option<PathBuf>,
        /// The state file (token, device id). Default: $XDG_CONFIG_HOME/chatsim/chat.json,
        /// else ~/.config/chatsim/chat.json.
        #[arg(long, global = true)]
        state: Option<PathBuf>,
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Debug, Subcommand)]
    enum Cmd {
        /// Create an account (then `login`).
        Signup { name: String, password: String },
        /// Log in and save the token; logging in again as the same name keeps the device.
        Login { name: String, password: String },
        /// Who this device is, its friends (with their 1:1 channels) and its channels.
        Me,
        /// Ask a user (by name) to be friends, or accept their request; prints the 1:1
        /// channel once you are friends (both added each other).
        Friend { name: String },
        /// Decline a user's friend request.
        Decline { name: String },
        /// Groups: create, add a member.
        #[command(subcommand)]
        Group(GroupCmd),
        /// Send a message: `send CHANNEL TEXT` or `send --to NAME TEXT` (a friend's 1:1 channel).
        Send {
            /// The friend whose 1:1 channel to use, instead of CHANNEL.
            #[arg(long)]
            to: Option<String>,
            /// [CHANNEL] TEXT
            #[arg(num_args = 1..=2, value_names = ["CHANNEL", "TEXT"], required = true)]
            args: Vec<String>,
        },
        /// Stay connected and print messages (of one channel, or all) and friends' presence
        /// as they arrive, until Ctrl-C. Starts with what this device has not seen yet.
        Follow { channel: Option<Id> },
        /// Online or offline, for friends by name.
        Presence {
            #[arg(required = true)]
            names: Vec<String>,
        },
        /// Sign this device out: its token is revoked and its sessions end (`--everywhere`:
        /// every device of the account).
        Logout {
            #[arg(long)]
            everywhere: bool,
        },
        /// The last messages of a channel.
        History {
            channel: Id,
            #[arg(long, default_value_t = 20)]
            limit: u64,
        },
    }

    #[derive(Debug, Subcommand)]
    enum GroupCmd {
        /// Create a group and invite these users (names); prints its channel.
        Create { name: String, members: Vec<String> },
        /// Invite a user (by name) to a group you are in.
        Add { channel: Id, name: String },
        /// Join a group you are invited to.
        Join { channel: Id },
        /// Decline an invitation to a group.
        Decline { channel: Id },
    }

    /// What `login` leaves for the other commands.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct SavedLogin {
        server: String,
        name: String,
        user: Id,
        device: Id,
        token: String,
        expires_at_ms: u64,
        /// `--ca-cert` at login (absolute), used by later commands that do not give one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_cert: Option<PathBuf>,
    }

    pub fn main() -> ExitCode {
        let cli = Cli::parse();
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match rt.block_on(run(cli)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }

    async fn run(cli: Cli) -> anyhow::Result<()> {
        let anon = api_client(&cli.server, cli.ca_cert.as_deref())?;
        let state_path = match cli.state.clone() {
            Some(p) => p,
            None => default_state_path()?,
        };
        match cli.cmd {
            Cmd::Signup { name, password } => {
                let r: SignupResponse = anon
                    .post("/v1/signup", &SignupRequest { name, password })
                    .await
                    .map_err(explain)?;
                println!("signed up: user {}", r.user);
                Ok(())
            }
            Cmd::Login { name, password } => {
                let ca = cli.ca_cert.as_deref();
                login(&anon, &cli.server, &state_path, name, password, ca).await
            }
            cmd => {
                let saved = load(&state_path)?;
                let mut http = match (&cli.ca_cert, &saved.ca_cert) {
                    (None, Some(ca)) => api_client(&cli.server, Some(ca))?,
                    _ => anon.clone(),
                };
                http.token = Some(saved.token.clone());
                let me = Me { http, saved };
                signed_in(&me, cmd).await
            }
        }
    }

    /// A logged-in device.
    struct Me {
        http: HttpClient,
        saved: SavedLogin,
    }

    async fn signed_in(me: &Me, cmd: Cmd) -> anyhow::Result<()> {
        match cmd {
            Cmd::Me => show_me(me).await,
            Cmd::Friend { name } => {
                let user = find_user(&me.http, &name).await?;
                let r: AddFriendResponse = me
                    .http
                    .post("/v1/friends", &AddFriendRequest { user })
                    .await
                    .map_err(explain)?;
                match (r.status, r.channel) {
                    (FriendStatus::Friends, Some(channel)) => {
                        println!("friends with {name}: channel {channel}")
                    }
                    _ => println!(
                        "asked {name} to be friends: you are friends once {name} adds you too"
                    ),
                }
                Ok(())
            }
            Cmd::Decline { name } => {
                let user = find_user(&me.http, &name).await?;
                let _: Profile = me
                    .http
                    .delete(&format!("/v1/friend-requests/{user}"))
                    .await
                    .map_err(explain)?;
                println!("declined {name}'s friend request");
                Ok(())
            }
            Cmd::Group(GroupCmd::Create { name, members }) => {
                let mut ids = Vec::new();
                for m in &members {
                    ids.push(find_user(&me.http, m).await?);
                }
                let req = CreateGroupRequest {
                    name: name.clone(),
                    members: ids,
                };
                let r: GroupResponse = me.http.post("/v1/groups", &req).await.map_err(explain)?;
                println!(
                    "group {name}: channel {} ({} members, {} invited)",
                    r.channel,
                    r.members.len(),
                    r.invited.len()
                );
                Ok(())
            }
            Cmd::Group(GroupCmd::Add { channel, name }) => {
                let user = find_user(&me.http, &name).await?;
                let path = format!("/v1/groups/{channel}/members");
                let r: GroupResponse = me
                    .http
                    .post(&path, &AddMemberRequest { user })
                    .await
                    .map_err(explain)?;
                println!(
                    "channel {channel}: {} members, {name} invited (they join with `chat group join {channel}`)",
                    r.members.len()
                );
                Ok(())
            }
            Cmd::Group(GroupCmd::Join { channel }) => {
                let path = format!("/v1/groups/{channel}/join");
                let r: GroupResponse = me.http.post(&path, &()).await.map_err(explain)?;
                println!("joined channel {channel}: {} members", r.members.len());
                Ok(())
            }
            Cmd::Group(GroupCmd::Decline { channel }) => {
                let path = format!("/v1/groups/{channel}/invitation");
                let _: Profile = me.http.delete(&path).await.map_err(explain)?;
                println!("declined the invitation to channel {channel}");
                Ok(())
            }
            Cmd::Send { to, args } => {
                let (channel, text) = send_target(me, to, args).await?;
                let (channel, seq) = send(me, channel, text).await?;
                println!("sent: channel {channel} #{seq}");
                Ok(())
            }
            Cmd::Follow { channel } => follow(me, channel).await,
            Cmd::Presence { names } => presence(me, names).await,
            Cmd::History { channel, limit } => history(me, channel, limit).await,
            Cmd::Logout { everywhere } => {
                let path = if everywhere {
                    "/v1/logout?everywhere=true"
                } else {
                    "/v1/logout"
                };
                let _: LogoutResponse = me.http.post(path, &()).await.map_err(explain)?;
                println!(
                    "logged out {}; `login` again to use this device",
                    if everywhere {
                        "every device"
                    } else {
                        "this device"
                    }
                );
                Ok(())
            }
            Cmd::Signup { .. } | Cmd::Login { .. } => unreachable!("handled before loading state"),
        }
    }

    // ------------------------------------------------------------ state file, addresses

    /// The api's address, whether it is https, and its host name when it is not an IP.
    fn api_addr(server: &str) -> anyhow::Result<(SocketAddr, bool, Option<String>)> {
        let (tls, rest) = if let Some(rest) = server.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = server.strip_prefix("http://") {
            (false, rest)
        } else {
            bail!("--server must be http://HOST:PORT or https://HOST:PORT (got {server:?})");
        };
        let hostport = rest.trim_end_matches('/');
        let addr = hostport
            .to_socket_addrs()
            .with_context(|| format!("resolve {hostport}"))?
            .next()
            .ok_or_else(|| anyhow!("{hostport} has no address"))?;
        let (host, is_ip) = nodes::client_tls::host_of(hostport);
        Ok((addr, tls, (!is_ip).then(|| host.to_string())))
    }

    /// A client of `server`; https trusts `ca_cert` besides the public web's roots.
    fn api_client(server: &str, ca_cert: Option<&Path>) -> anyhow::Result<HttpClient> {
        let (addr, https, host) = api_addr(server)?;
        let tls = match (https, ca_cert) {
            (false, _) => None,
            (true, None) => Some(ClientTls::public_roots()),
            (true, Some(path)) => {
                let pem =
                    std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
                Some(
                    ClientTls::trusting_pem(&pem)
                        .with_context(|| format!("trust {}", path.display()))?,
                )
            }
        };
        Ok(HttpClient::new(addr).with_tls(tls, host))
    }

    fn default_state_path() -> anyhow::Result<PathBuf> {
        let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                Some(h) => PathBuf::from(h).join(".config"),
                None => bail!("no HOME or XDG_CONFIG_HOME: pass --state FILE"),
            },
        };
        Ok(base.join("chatsim").join("chat.json"))
    }

    fn load(path: &Path) -> anyhow::Result<SavedLogin> {
        let bytes = std::fs::read(path).map_err(|e| {
            anyhow!(
                "not logged in (no state file {}: {e}); run `chat login NAME PASSWORD`",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("read {}", path.display()))
    }

    fn save(path: &Path, s: &SavedLogin) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("write {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(s).expect("the state serializes"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
    }

    async fn login(
        anon: &HttpClient,
        server: &str,
        path: &Path,
        name: String,
        password: String,
        ca_cert: Option<&Path>,
    ) -> anyhow::Result<()> {
        // Same name as the saved login: the same device (its cursors are kept by the server).
        let device = load(path)
            .ok()
            .filter(|s| s.name == name && s.server == server)
            .map(|s| s.device);
        let req = LoginRequest {
            name: name.clone(),
            password,
            device,
        };
        let r: LoginResponse = anon.post("/v1/login", &req).await.map_err(explain)?;
        let saved = SavedLogin {
            server: server.to_string(),
            name,
            user: r.user,
            device: r.device,
            token: r.token,
            expires_at_ms: r.expires_at_ms,
            ca_cert: ca_cert.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
        };
        save(path, &saved)?;
        println!(
            "logged in: user {} device {} (state in {})",
            r.user,
            r.device,
            path.display()
        );
        Ok(())
    }

    // ------------------------------------------------------------ HTTP helpers

    /// A refusal as the user should read it: the error code first.
    fn explain(e: ClientError) -> anyhow::Error {
        match e {
            ClientError::Refused {
                status,
                code,
                detail,
            } => anyhow!("{} (HTTP {status}): {detail}", code.as_str()),
            ClientError::Connect(e) => anyhow!("cannot reach the api: {e}"),
            other => anyhow!(other),
        }
    }

    /// Percent-encodes a query value (names are plain, but the user may type anything).
    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    async fn find_user(http: &HttpClient, name: &str) -> anyhow::Result<Id> {
        let r: UserSummary = http
            .get(&format!("/v1/users?name={}", encode(name)))
            .await
            .map_err(explain)?;
        Ok(r.user)
    }

    async fn channel_info(http: &HttpClient, channel: Id) -> anyhow::Result<ChannelInfo> {
        http.get(&format!("/v1/channels/{channel}"))
            .await
            .map_err(explain)
    }

    async fn profile(http: &HttpClient) -> anyhow::Result<Profile> {
        http.get("/v1/me").await.map_err(explain)
    }

    /// User names by id, asked of the api once each.
    #[derive(Default)]
    struct Names(BTreeMap<Id, String>);

    impl Names {
        async fn of(&mut self, http: &HttpClient, user: Id) -> String {
            if let Some(n) = self.0.get(&user) {
                return n.clone();
            }
            match http.get::<UserSummary>(&format!("/v1/users/{user}")).await {
                Ok(u) => {
                    self.0.insert(user, u.name.clone());
                    u.name
                }
                Err(_) => format!("user {user}"),
            }
        }
    }

    async fn show_me(me: &Me) -> anyhow::Result<()> {
        let p = profile(&me.http).await?;
        let mut names = Names::default();
        println!("{} (user {}, device {})", p.name, p.user, me.saved.device);
        for (friend, channel) in &p.friends {
            println!(
                "friend {}: channel {channel}",
                names.of(&me.http, *friend).await
            );
        }
        for from in &p.friend_requests {
            println!(
                "friend request from {} (`chat friend NAME` accepts, `chat decline NAME` declines)",
                names.of(&me.http, *from).await
            );
        }
        for ch in &p.group_invites {
            let info = channel_info(&me.http, *ch).await?;
            println!(
                "invited to group {}: channel {ch} (`chat group join {ch}` joins)",
                info.name
            );
        }
        for ch in p
            .channels
            .iter()
            .filter(|c| !p.friends.values().any(|d| d == *c))
        {
            let info = channel_info(&me.http, *ch).await?;
            println!(
                "group {}: channel {ch} ({} members)",
                info.name,
                info.members.len()
            );
        }
        Ok(())
    }

    async fn history(me: &Me, channel: Id, limit: u64) -> anyhow::Result<()> {
        let path = |after: u64, n: usize| {
            format!("/v1/channels/{channel}/messages?after_seq={after}&limit={n}")
        };
        let first: HistoryResponse = me.http.get(&path(0, 1)).await.map_err(explain)?;
        let mut after = first.last_seq.saturating_sub(limit);
        let mut names = Names::default();
        while after < first.last_seq {
            let page: HistoryResponse = me
                .http
                .get(&path(after, SYNC_PAGE_MAX))
                .await
                .map_err(explain)?;
            let Some(last) = page.messages.last() else {
                break;
            };
            after = last.seq;
            for m in page.messages.iter().filter(|m| m.seq <= first.last_seq) {
                print_message(&me.http, &mut names, m).await;
            }
        }
        Ok(())
    }

    async fn print_message(http: &HttpClient, names: &mut Names, m: &ChatMessage) {
        let who = names.of(http, m.sender).await;
        println!("[{} #{}] {who}: {}", m.channel, m.seq, m.text);
    }

    // ------------------------------------------------------------ WebSocket sessions

    /// Opens a connection through the device runtime's connect step, retrying through
    /// transient failures (a one-shot command's way); a refused token ends it at once.
    async fn open_retrying(me: &Me) -> anyhow::Result<WsConn> {
        let mut avoid = None;
        let mut last = None;
        for _ in 0..ATTEMPTS_MAX {
            // The connection number orders this device's connections across processes that
            // share the state file: the newest wins.
            match open_session(&me.http, &me.saved.token, avoid, unix_ms(), None).await {
                Ok((ws, _server)) => return Ok(ws),
                Err(e) if e.ends_login() => return Err(anyhow!(e.error)),
                Err(e) => {
                    avoid = e.server;
                    last = Some(anyhow!(e.error));
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context("cannot connect"))
    }

    async fn send_target(
        me: &Me,
        to: Option<String>,
        mut args: Vec<String>,
    ) -> anyhow::Result<(Id, String)> {
        match (to, args.len()) {
            (Some(name), 1) => {
                let user = find_user(&me.http, &name).await?;
                let p = profile(&me.http).await?;
                let channel = p.friends.get(&user).ok_or_else(|| {
                    anyhow!("{name} is not your friend: run `chat friend {name}` first")
                })?;
                Ok((*channel, args.remove(0)))
            }
            (None, 2) => {
                let channel = args[0]
                    .parse()
                    .map_err(|_| anyhow!("CHANNEL must be a number, got {:?}", args[0]))?;
                Ok((channel, args.remove(1)))
            }
            (Some(_), _) => bail!("with --to NAME give only TEXT"),
            (None, _) => bail!("give CHANNEL TEXT, or --to NAME TEXT"),
        }
    }

    /// Sends until acknowledged: one `client_msg_id` through every retry, so the server
    /// stores one message however many times it arrives. Answers (channel, seq).
    async fn send(me: &Me, channel: Id, text: String) -> anyhow::Result<(Id, u64)> {
        let client_msg_id = unix_ms() * 1000 + u64::from(rand::random::<u16>() % 1000);
        let frame = ClientFrame::Send {
            client_msg_id,
            channel,
            text,
        };
        let mut last = anyhow!("no attempt made");
        for _ in 0..ATTEMPTS_MAX {
            let mut conn = open_retrying(me).await?;
            conn.send(&frame).await.map_err(|e| anyhow!(e))?;
            loop {
                let answer = tokio::time::timeout(SILENCE_MAX, conn.recv()).await;
                match answer {
                    Ok(Incoming::Frame(ServerFrame::Ack {
                        client_msg_id: id,
                        channel,
                        seq,
                        ..
                    })) if id == client_msg_id => {
                        conn.close().await;
                        return Ok((channel, seq));
                    }
                    Ok(Incoming::Frame(ServerFrame::Error { code, detail, .. })) => {
                        last = anyhow!("{}: {detail}", code.as_str());
                        if !code.retryable() && !code.closes_connection() || code.ends_login() {
                            return Err(last);
                        }
                        break; // Retry, on a new connection, with the same client_msg_id.
                    }
                    Ok(Incoming::Frame(_)) | Ok(Incoming::Unparsed(_)) => continue,
                    Ok(Incoming::Closed) => {
                        last = anyhow!("the connection closed before the ack");
                        break;
                    }
                    Err(_) => {
                        last = anyhow!("no ack within {SILENCE_MAX:?}");
                        break;
                    }
                }
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Err(last.context("send not acknowledged"))
    }

    async fn presence(me: &Me, names: Vec<String>) -> anyhow::Result<()> {
        let p = profile(&me.http).await?;
        let mut asked = BTreeMap::new();
        for name in names {
            let user = find_user(&me.http, &name).await?;
            if !p.friends.contains_key(&user) {
                bail!("{name} is not your friend (presence is shown to friends only)");
            }
            asked.insert(user, name);
        }
        let mut conn = open_retrying(me).await?;
        let query = ClientFrame::PresenceQuery {
            users: asked.keys().copied().collect(),
        };
        conn.send(&query).await.map_err(|e| anyhow!(e))?;
        let mut seen: BTreeMap<Id, (PresenceStatus, u64)> = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + PRESENCE_WAIT;
        while seen.len() < asked.len() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, conn.recv()).await {
                Ok(Incoming::Frame(ServerFrame::Presence {
                    user,
                    status,
                    version,
                })) => {
                    if seen.get(&user).is_none_or(|(_, v)| *v <= version) {
                        seen.insert(user, (status, version));
                    }
                }
                Ok(Incoming::Frame(ServerFrame::Error { code, detail, .. })) => {
                    bail!("{}: {detail}", code.as_str())
                }
                Ok(Incoming::Frame(_)) | Ok(Incoming::Unparsed(_)) => {}
                Ok(Incoming::Closed) => bail!("the connection closed before the answer"),
                Err(_) => break,
            }
        }
        conn.close().await;
        let mut missing = 0;
        for (user, name) in &asked {
            match seen.get(user) {
                Some((PresenceStatus::Online, _)) => println!("{name}: online"),
                Some((PresenceStatus::Offline, _)) => println!("{name}: offline"),
                None => {
                    println!("{name}: unknown (no answer within {PRESENCE_WAIT:?})");
                    missing += 1;
                }
            }
        }
        if missing > 0 {
            bail!("{missing} presence answer(s) missing");
        }
        Ok(())
    }

    // ------------------------------------------------------------ follow

    /// Stays connected through the device runtime (reconnects, resyncs from its cursors,
    /// heartbeats) and prints what arrives, until Ctrl-C or a refused login.
    async fn follow(me: &Me, only: Option<Id>) -> anyhow::Result<()> {
        let friends = profile(&me.http).await?.friends.keys().copied().collect();
        let settings = Settings {
            backoff_min_ms: BACKOFF_MIN.as_millis() as u64,
            backoff_max_ms: BACKOFF_MAX.as_millis() as u64,
            missed_heartbeats: MissedTickBehavior::Delay,
            // Newer than any connection of this device so far, from any process.
            first_connection: unix_ms(),
            tls: me.http.tls.clone(),
            api_name: me.http.host.clone(),
            ..Settings::new(vec![me.http.addr])
        };
        let login = Login {
            user: me.saved.user,
            device: me.saved.device,
            token: me.saved.token.clone(),
        };
        let printer = Printer {
            http: me.http.clone(),
            names: Names::default(),
            only,
        };
        let state = DeviceState::new(me.saved.user, me.saved.device, false);
        let runtime = DeviceRuntime::new(login, settings, state, StdRng::from_entropy(), printer)
            .with_friends(friends);
        let (tx, rx) = mpsc::channel(4);
        tx.send(Command::Open).await?;
        let http = me.http.clone();
        // The terminal's side: Ctrl-C stops; friends made meanwhile are picked up.
        let driver = tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            tokio::pin!(ctrl_c);
            let mut refresh = tokio::time::interval(FRIENDS_REFRESH);
            refresh.tick().await;
            loop {
                tokio::select! {
                    biased;
                    _ = &mut ctrl_c => {
                        let _ = tx.send(Command::Stop).await;
                        return;
                    }
                    _ = refresh.tick() => {
                        if let Ok(p) = profile(&http).await {
                            let friends = p.friends.keys().copied().collect();
                            if tx.send(Command::SetFriends(friends)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let exit = runtime.run(rx, tokio::time::Instant::now()).await;
        driver.abort();
        match exit {
            Exit::Stopped { .. } => Ok(()),
            Exit::LoggedOut { code, detail } => {
                bail!("{}: {detail}; run `chat login` again", code.as_str())
            }
        }
    }

    /// Prints what a following device observes: messages (of one channel, or all) once each
    /// and in order, friends' presence, and the connection's ups and downs on stderr.
    struct Printer {
        http: HttpClient,
        names: Names,
        only: Option<Id>,
    }

    impl Observer for Printer {
        async fn observe(&mut self, ev: DeviceEvent) -> Flow {
            match ev {
                DeviceEvent::Connected { server } => eprintln!("connected to chat server {server}"),
                DeviceEvent::Disconnected { reason } => {
                    eprintln!("disconnected ({reason}); reconnecting")
                }
                DeviceEvent::ConnectFailed(e) => eprintln!("cannot connect: {}", e.error),
                DeviceEvent::Observed(Observation::Deliver(m))
                    if self.only.is_none_or(|c| c == m.channel) =>
                {
                    print_message(&self.http, &mut self.names, &m).await;
                }
                DeviceEvent::Observed(Observation::Presence { user, status }) => {
                    let name = self.names.of(&self.http, user).await;
                    let word = match status {
                        PresenceStatus::Online => "online",
                        PresenceStatus::Offline => "offline",
                    };
                    println!("* {name} is {word}");
                }
                DeviceEvent::Observed(Observation::Error { code, detail, .. }) => {
                    eprintln!("{}: {detail}", code.as_str())
                }
                _ => {}
            }
            Flow::Continue
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        // Proves --server accepts http://HOST:PORT (with or without a trailing slash) and
        // refuses anything else with words that say what is expected.
        #[test]
        fn server_addresses() {
            let want: SocketAddr = "127.0.0.1:8080".parse().unwrap();
            assert_eq!(
                api_addr("http://127.0.0.1:8080").unwrap(),
                (want, false, None)
            );
            assert_eq!(
                api_addr("http://127.0.0.1:8080/").unwrap(),
                (want, false, None)
            );
            assert_eq!(
                api_addr("https://127.0.0.1:8080").unwrap(),
                (want, true, None)
            );
            let (_, tls, host) = api_addr("https://localhost:8080").unwrap();
            assert!(tls);
            assert_eq!(host.as_deref(), Some("localhost"));
            let e = api_addr("ftp://127.0.0.1:8080").unwrap_err().to_string();
            assert!(e.contains("http://HOST:PORT or https://HOST:PORT"), "{e}");
            assert!(api_addr("127.0.0.1:8080").is_err());
        }

        // Proves query values are percent-encoded except the unreserved characters.
        #[test]
        fn query_encoding() {
            assert_eq!(encode("alice-1_b.c~"), "alice-1_b.c~");
            assert_eq!(encode("a b&c=é"), "a%20b%26c%3D%C3%A9");
        }
    }
}

//! Proves the `chat` CLI works against a real server: `chatd all-in-one` is started as a
//! process on free ports with a temp data dir, and the `chat` binary is run as a user would:
//! two users sign up and log in (one state file each), befriend, send, read the message back
//! with `history`; `presence` shows a friend offline, then online while the friend runs
//! `follow`, which prints a message sent meanwhile; groups show in `me`; refusals exit
//! non-zero naming their code. A second test fetches the web page and checks its types.

#![cfg(not(madsim))]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

fn free_base() -> u16 {
    common::free_base(21)
}

/// A child process killed when dropped (also when the test panics).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `chatd all-in-one` on `data`: https and wss:// with its self-signed certificate when `tls`.
fn start_chatd(data: &Path, base: u16, tls: bool) -> (Killed, SocketAddr) {
    let args: &[&str] = if tls { &[] } else { &["--plaintext"] };
    let (child, http) = common::spawn_all_in_one_with(data, base, "warn", args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(http).is_err() {
        assert!(Instant::now() < deadline, "chatd did not listen on {http}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Killed(child), http)
}

/// One user of the CLI: a state file of their own.
struct User {
    server: String,
    state: PathBuf,
    /// `--ca-cert`: the server's self-signed certificate.
    ca_cert: Option<PathBuf>,
}

impl User {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_chat"));
        c.arg("--server").arg(&self.server);
        c.arg("--state").arg(&self.state);
        if let Some(ca) = &self.ca_cert {
            c.arg("--ca-cert").arg(ca);
        }
        c.args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run chat")
    }

    /// Runs and expects success; answers stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "chat {args:?} failed ({}):\n{stdout}{stderr}",
            out.status
        );
        stdout
    }

    /// Runs and expects failure; answers stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "chat {args:?} should fail:\n{}",
            text(&out.stdout)
        );
        text(&out.stderr)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls `f` until it answers true or the deadline passes.
fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn cli_signup_friend_send_history_presence_follow() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Over TLS, as `chatd all-in-one` serves by default: the CLI trusts its certificate.
    let data = dir.path().join("data");
    let (_chatd, http) = start_chatd(&data, free_base(), true);
    let cert = common::self_signed_cert(&data);
    eventually(
        "the self-signed certificate",
        Duration::from_secs(20),
        || cert.exists(),
    );
    let user = |name: &str| User {
        server: format!("https://{http}"),
        state: dir.path().join(format!("{name}.json")),
        ca_cert: Some(cert.clone()),
    };
    let (alice, bob) = (user("alice"), user("bob"));
    // Without the certificate the CLI refuses the server, and says why.
    let stranger = User {
        ca_cert: None,
        ..user("stranger")
    };
    let e = stranger.fails(&["signup", "stranger", "s-pw"]);
    assert!(e.contains("certificate"), "{e}");
    // Plain http to a TLS server gets nowhere.
    let plain = User {
        server: format!("http://{http}"),
        ..user("plain")
    };
    plain.fails(&["signup", "plain", "p-pw"]);
    assert!(alice
        .ok(&["signup", "alice", "a-pw"])
        .starts_with("signed up"));
    bob.ok(&["signup", "bob", "b-pw"]);
    assert!(alice
        .fails(&["signup", "alice", "again"])
        .contains("name_taken"));
    assert!(alice.fails(&["friend", "bob"]).contains("not logged in"));
    assert!(alice
        .fails(&["login", "alice", "wrong"])
        .contains("bad_credentials"));
    alice.ok(&["login", "alice", "a-pw"]);
    bob.ok(&["login", "bob", "b-pw"]);
    // Login remembers the certificate: later commands need not repeat --ca-cert.
    let remembering = User {
        ca_cert: None,
        ..user("alice")
    };
    remembering.ok(&["me"]);

    // Consent: alice asks, bob sees the request and accepts by adding her back.
    assert!(alice
        .ok(&["friend", "bob"])
        .contains("asked bob to be friends"));
    assert!(bob.ok(&["me"]).contains("friend request from alice"));
    let befriended = bob.ok(&["friend", "alice"]);
    assert!(befriended.contains("friends with alice"), "{befriended}");
    let channel = befriended
        .trim()
        .rsplit(' ')
        .next()
        .expect("friend prints the channel")
        .to_string();
    assert!(alice.fails(&["friend", "nobody"]).contains("unknown_user"));

    let sent = alice.ok(&["send", "--to", "bob", "hello bob"]);
    assert_eq!(sent.trim(), format!("sent: channel {channel} #1"));
    assert!(alice
        .fails(&["send", "999999", "x"])
        .contains("unknown_channel"));
    let history = bob.ok(&["history", &channel]);
    assert_eq!(history.trim(), format!("[{channel} #1] alice: hello bob"));

    let group = alice.ok(&["group", "create", "team", "bob"]);
    let group_channel = group
        .split_whitespace()
        .nth(3)
        .expect("group prints the channel");
    // Consent: bob is invited, sees it, and joins.
    let invited = bob.ok(&["me"]);
    assert!(
        invited.contains(&format!("invited to group team: channel {group_channel}")),
        "{invited}"
    );
    assert!(bob
        .ok(&["group", "join", group_channel])
        .contains("2 members"));
    let me = bob.ok(&["me"]);
    assert!(
        me.contains(&format!("group team: channel {group_channel} (2 members)")),
        "{me}"
    );
    let carol = user("carol");
    carol.ok(&["signup", "carol", "c-pw"]);
    carol.ok(&["login", "carol", "c-pw"]);
    assert!(carol.fails(&["history", &channel]).contains("not_a_member"));
    assert!(carol
        .fails(&["presence", "bob"])
        .contains("not your friend"));
    // Logout revokes the saved token; logging in again works.
    assert!(carol.ok(&["logout"]).contains("logged out this device"));
    assert!(carol.fails(&["me"]).contains("token_revoked"));
    carol.ok(&["login", "carol", "c-pw"]);
    carol.ok(&["me"]);

    assert_eq!(alice.ok(&["presence", "bob"]).trim(), "bob: offline");
    // bob follows: heartbeats make him online, and a message sent meanwhile is printed.
    let mut follow = bob
        .command(&["follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start follow");
    let stdout = follow.stdout.take().expect("piped stdout");
    let _follow = Killed(follow);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    eventually("bob online", Duration::from_secs(15), || {
        alice.ok(&["presence", "bob"]).trim() == "bob: online"
    });
    alice.ok(&["send", &channel, "while you follow"]);
    let mut printed = Vec::new();
    let want = format!("[{channel} #2] alice: while you follow");
    eventually("follow prints the message", Duration::from_secs(15), || {
        printed.extend(lines.try_iter());
        printed.contains(&want)
    });
    let first = format!("[{channel} #1] alice: hello bob");
    assert_eq!(
        printed
            .iter()
            .filter(|l| l.starts_with('['))
            .collect::<Vec<_>>(),
        vec![&first, &want],
        "follow prints what this device had not seen, in order, once each"
    );
}

/// Answers the status line and Content-Type of `GET path` (HTTP/1.0: the server closes).
fn get(http: SocketAddr, path: &str) -> (String, String, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(http).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n").expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    let status = head.lines().next().unwrap_or_default().to_string();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

// Proves the api node serves the browser page with the right content types (the browser
// test in tests/browser drives it; this runs with every `cargo test`).
#[test]
fn web_page_is_served() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_chatd, http) = start_chatd(&dir.path().join("data"), free_base(), false);
    for (path, want_type, marker) in [
        ("/", "text/html; charset=utf-8", "<script src=\"/app.js\""),
        (
            "/app.js",
            "text/javascript; charset=utf-8",
            "new WebSocket(url)",
        ),
        ("/app.css", "text/css; charset=utf-8", ".dot"),
    ] {
        let (status, ctype, body) = get(http, path);
        assert!(status.contains(" 200 "), "{path}: {status}");
        assert_eq!(ctype, want_type, "{path}");
        assert!(body.contains(marker), "{path} lacks {marker:?}");
    }
}

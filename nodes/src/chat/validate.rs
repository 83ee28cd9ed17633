//! Pure checks on client frames: parsing with specific error codes, size limits, rate limits.

use crate::limits::{
    CONTROL_FRAMES_PER_SECOND_MAX, MESSAGE_CHARS_MAX, SENDS_PER_SECOND_MAX, SYNCS_PER_SECOND_MAX,
    SYNC_BURST_MAX,
};
use crate::proto::client::{ClientFrame, ErrorCode};

/// Parses a text frame; `malformed_json` with the parser's words on failure.
pub fn parse_frame(text: &str) -> Result<ClientFrame, (ErrorCode, String)> {
    serde_json::from_str(text).map_err(|e| (ErrorCode::MalformedJson, e.to_string()))
}

/// Refuses text over the character limit (characters, not bytes).
pub fn check_text(text: &str) -> Result<(), (ErrorCode, String)> {
    // Fast path: fewer bytes than the limit means fewer characters too.
    if text.len() <= MESSAGE_CHARS_MAX {
        return Ok(());
    }
    let chars = text.chars().count();
    if chars > MESSAGE_CHARS_MAX {
        return Err((
            ErrorCode::MessageTooLong,
            format!("{chars} characters, at most {MESSAGE_CHARS_MAX}"),
        ));
    }
    Ok(())
}

/// A token bucket: `per_second` tokens a second, bursts of `burst`.
#[derive(Debug, Clone)]
pub struct RateLimit {
    tokens: f64,
    last_ms: u64,
    per_second: u32,
    burst: u32,
    /// What is counted, for the refusal ("sends", "sync frames").
    what: &'static str,
}

impl RateLimit {
    /// Sends: `SENDS_PER_SECOND_MAX` a second, bursts of the same size.
    pub fn new(now_ms: u64) -> Self {
        Self::with(now_ms, SENDS_PER_SECOND_MAX, SENDS_PER_SECOND_MAX, "sends")
    }

    pub fn with(now_ms: u64, per_second: u32, burst: u32, what: &'static str) -> Self {
        Self {
            tokens: f64::from(burst),
            last_ms: now_ms,
            per_second,
            burst,
            what,
        }
    }

    /// Takes a token, or says `rate_limited`.
    pub fn take(&mut self, now_ms: u64) -> Result<(), (ErrorCode, String)> {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens =
            (self.tokens + elapsed * f64::from(self.per_second)).min(f64::from(self.burst));
        if self.tokens < 1.0 {
            return Err((
                ErrorCode::RateLimited,
                format!("more than {} {} per second", self.per_second, self.what),
            ));
        }
        self.tokens -= 1.0;
        Ok(())
    }
}

/// One device's buckets on a chat server. They outlive its connection (kept by the server
/// for `BUCKETS_KEPT_MS` after it closes), so reconnecting does not refill them.
#[derive(Debug, Clone)]
pub struct Buckets {
    pub sends: RateLimit,
    /// Heartbeats, presence queries and syncs (not sends, reads or logout).
    pub control: RateLimit,
    /// Syncs, on top of `control`: each reads and sends up to a page per channel.
    pub syncs: RateLimit,
}

impl Buckets {
    pub fn new(now_ms: u64) -> Self {
        Self {
            sends: RateLimit::new(now_ms),
            control: RateLimit::with(
                now_ms,
                CONTROL_FRAMES_PER_SECOND_MAX,
                2 * CONTROL_FRAMES_PER_SECOND_MAX,
                "frames other than sends, reads and logout",
            ),
            syncs: RateLimit::with(now_ms, SYNCS_PER_SECOND_MAX, SYNC_BURST_MAX, "syncs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves malformed JSON and unknown frame types get `malformed_json`, good frames parse.
    #[test]
    fn parse_errors_are_specific() {
        assert_eq!(
            parse_frame("{nope").unwrap_err().0,
            ErrorCode::MalformedJson
        );
        assert_eq!(
            parse_frame(r#"{"type":"teleport"}"#).unwrap_err().0,
            ErrorCode::MalformedJson
        );
        assert_eq!(
            parse_frame(r#"{"type":"send","client_msg_id":1,"channel":2}"#)
                .unwrap_err()
                .0,
            ErrorCode::MalformedJson,
            "missing text"
        );
        assert_eq!(
            parse_frame(r#"{"type":"heartbeat"}"#).unwrap(),
            ClientFrame::Heartbeat
        );
    }

    // Proves the limit counts characters: 100,000 four-byte characters pass, one more fails.
    #[test]
    fn text_limit_counts_characters() {
        let ok: String = "😀".repeat(MESSAGE_CHARS_MAX);
        assert!(check_text(&ok).is_ok());
        let too_long: String = "a".repeat(MESSAGE_CHARS_MAX + 1);
        assert_eq!(
            check_text(&too_long).unwrap_err().0,
            ErrorCode::MessageTooLong
        );
    }

    // Proves a device's other frames and its syncs have their own buckets: a flood of
    // heartbeats or syncs is refused past its burst, sends still pass, and time refills them.
    #[test]
    fn control_and_sync_buckets() {
        let mut b = Buckets::new(0);
        for _ in 0..2 * CONTROL_FRAMES_PER_SECOND_MAX {
            b.control.take(0).unwrap();
        }
        let (code, detail) = b.control.take(0).unwrap_err();
        assert_eq!(code, ErrorCode::RateLimited);
        assert!(detail.contains("frames other than sends"), "{detail}");
        assert!(b.sends.take(0).is_ok());
        for _ in 0..SYNC_BURST_MAX {
            b.syncs.take(0).unwrap();
        }
        assert!(b.syncs.take(0).is_err());
        assert!(b.syncs.take(1000).is_ok());
        assert!(b.control.take(1000).is_ok());
    }

    // Proves the bucket refuses the burst beyond its depth and refills with time.
    #[test]
    fn rate_limit_refills() {
        let mut r = RateLimit::new(0);
        for _ in 0..SENDS_PER_SECOND_MAX {
            r.take(0).unwrap();
        }
        assert_eq!(r.take(0).unwrap_err().0, ErrorCode::RateLimited);
        assert!(r.take(1000).is_ok());
    }
}

//! Pure checks on client frames: parsing with specific error codes, size limits, rate limits.

use crate::limits::{MESSAGE_CHARS_MAX, SENDS_PER_SECOND_MAX};
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

/// A token bucket: `SENDS_PER_SECOND_MAX` sends per second, bursts of the same size.
#[derive(Debug, Clone)]
pub struct RateLimit {
    tokens: f64,
    last_ms: u64,
}

impl RateLimit {
    pub fn new(now_ms: u64) -> Self {
        Self {
            tokens: SENDS_PER_SECOND_MAX as f64,
            last_ms: now_ms,
        }
    }

    /// Takes a token, or says `rate_limited`.
    pub fn take(&mut self, now_ms: u64) -> Result<(), (ErrorCode, String)> {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = now_ms;
        let cap = SENDS_PER_SECOND_MAX as f64;
        self.tokens = (self.tokens + elapsed * cap).min(cap);
        if self.tokens < 1.0 {
            return Err((
                ErrorCode::RateLimited,
                format!("more than {SENDS_PER_SECOND_MAX} sends per second"),
            ));
        }
        self.tokens -= 1.0;
        Ok(())
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

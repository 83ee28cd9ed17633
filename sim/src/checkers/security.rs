//! security: no attacker's attempt is answered.
//!
//! From the `intrusion` events of the two attackers:
//! - the rogue (`rogue.rs`): a host on the cluster's network that speaks the internal RPC
//!   protocol without a certificate of the cluster's CA, in three ways (plain JSON frames, TLS
//!   without a certificate, a certificate of another CA naming a node). The node must not
//!   answer, not even with an error (an answer means it read and acted on the request);
//! - the hostile user (`hostile.rs`): a device with an account of its own and no friends or
//!   channels, with forged and expired tokens, sends, syncs and history reads in other users'
//!   channel, and presence queries about strangers. It must be refused, or get nothing.
//!
//! One check per attempt.
//!
//! It does NOT check what nodes of the cluster ask each other (`nodes::tls::authorize` and its
//! tests do), or the client-facing surface (tokens, membership: the other checkers and the
//! real tests).

use super::{CheckReport, Params};
use crate::history::{Event, Record};

pub fn check(history: &[Record], _params: &Params) -> CheckReport {
    let mut report = CheckReport::new("security");
    for r in history {
        if let Event::Intrusion {
            target,
            how,
            request,
            answered,
        } = &r.ev
        {
            report.assert(answered.is_none(), || {
                let who = match how.as_str() {
                    "plain" | "anonymous" | "foreign_ca" => "the rogue",
                    _ => "the hostile user",
                };
                format!(
                    "{target} answered {who}'s {request} ({how}) at t_us {}: {}",
                    r.t_us,
                    answered.as_deref().unwrap_or_default()
                )
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkers::testutil::*;

    #[test]
    fn an_answered_intrusion_is_a_violation() {
        let ok = healthy();
        assert!(check(&ok, &Params::default()).violations.is_empty());
        assert!(check(&ok, &Params::default()).checks > 0);
        let bad = healthy_builder()
            .ev(
                7 * S,
                Event::Intrusion {
                    target: "kv-0".into(),
                    how: "anonymous".into(),
                    request: "GetUser".into(),
                    answered: Some("User(..)".into()),
                },
            )
            .build();
        let r = check(&bad, &Params::default());
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(
            r.violations[0].contains("kv-0 answered"),
            "{:?}",
            r.violations
        );
    }
}

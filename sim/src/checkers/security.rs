//! security: no request of a host outside the cluster is answered.
//!
//! From the `intrusion` events of the rogue (`rogue.rs`): a host on the cluster's network
//! that speaks the internal RPC protocol without a certificate of the cluster's CA, in three
//! ways (plain JSON frames, TLS without a certificate, a certificate of another CA naming a
//! node). One check per attempt: the node must not answer it, not even with an error (an
//! answer means it read and acted on the request).
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
                format!(
                    "{target} answered the rogue's {request} ({how}) at t_us {}: {}",
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

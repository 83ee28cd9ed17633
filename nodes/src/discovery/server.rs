//! The discovery node shell.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::FutureExt;

use super::Registry;
use crate::clock::unix_ms;
use crate::proto::client::ErrorCode;
use crate::proto::internal::{Request, Response};
use crate::rpc;

/// Serves discovery on `listen`; callers authenticate with `tls`.
pub async fn run(listen: SocketAddr, tls: crate::tls::NodeTls) -> anyhow::Result<()> {
    // A std mutex: every operation is synchronous.
    let reg = Arc::new(Mutex::new(Registry::default()));
    tracing::info!(%listen, "discovery node up");
    let handler: rpc::Handler = Arc::new(move |req| {
        let now = unix_ms();
        let mut r = reg.lock().unwrap_or_else(|p| p.into_inner());
        r.on_tick(now);
        let resp = match req {
            Request::RegisterChat { info } => {
                r.on_register(info, now);
                Response::Ok
            }
            Request::PickChat { hint, avoid } => Response::Chat(r.pick(hint, avoid, now)),
            Request::ListChat => Response::ChatList(r.live(now)),
            other => Response::Error {
                code: ErrorCode::BadRequest,
                detail: format!("discovery does not serve {other:?}"),
            },
        };
        async move { resp }.boxed()
    });
    rpc::serve(listen, handler, tls).await?;
    Ok(())
}

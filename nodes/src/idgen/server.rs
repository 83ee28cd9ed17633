//! The idgen node shell: one [`Snowflake`] behind a std mutex, answering `NextId`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::FutureExt;

use super::Snowflake;
use crate::clock::Clock;
use crate::proto::client::ErrorCode;
use crate::proto::internal::{Request, Response};
use crate::rpc;

pub struct IdgenConfig {
    pub listen: SocketAddr,
    pub worker: u16,
    pub clock: Arc<dyn Clock>,
}

pub async fn run(cfg: IdgenConfig) -> anyhow::Result<()> {
    // A std mutex: `next` is synchronous and never held across an await.
    let gen = Arc::new(Mutex::new(Snowflake::with_floor(
        cfg.worker,
        cfg.clock.now_ms(),
    )));
    let clock = cfg.clock.clone();
    tracing::info!(listen = %cfg.listen, worker = cfg.worker, "idgen node up");
    let handler: rpc::Handler = Arc::new(move |req| {
        let resp = match req {
            Request::NextId { after } => {
                let now = clock.now_ms();
                let mut g = gen.lock().unwrap_or_else(|p| p.into_inner());
                Response::Id(g.next(now, after))
            }
            other => Response::Error {
                code: ErrorCode::BadRequest,
                detail: format!("idgen does not serve {other:?}"),
            },
        };
        async move { resp }.boxed()
    });
    rpc::serve(cfg.listen, handler).await?;
    Ok(())
}

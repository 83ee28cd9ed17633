//! The browser client: one HTML page, one script, one stylesheet, compiled into the binary
//! (`include_str!`) and served by every api node at `/`, `/app.js` and `/app.css`.
//!
//! The page is a device like any other: it speaks the HTTP API of this node and the WebSocket
//! protocol of the chat server `/v1/chat-server` names. No build step and no external
//! resources; the Content-Security-Policy header holds the page to that (scripts, styles and
//! fetches from this origin only, WebSockets to any chat server).
//!
//! It does not template, compress or cache-bust anything: the files are small and change only
//! with the binary.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const APP_CSS: &str = include_str!("../../web/app.css");

/// Own origin only, but WebSockets anywhere: chat servers listen on other ports and hosts.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub async fn index() -> impl IntoResponse {
    file("text/html; charset=utf-8", INDEX_HTML)
}

pub async fn app_js() -> impl IntoResponse {
    file("text/javascript; charset=utf-8", APP_JS)
}

pub async fn app_css() -> impl IntoResponse {
    file("text/css; charset=utf-8", APP_CSS)
}

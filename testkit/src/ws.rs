//! The client side of the WebSocket protocol, as far as both the tests and
//! the benchmark speak it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;

/// The upgrade request for `ws://{addr}/ws`, with `Authorization: Bearer`
/// when there is a token.
pub fn upgrade_request(addr: SocketAddr, token: Option<&str>) -> Result<Request> {
    let mut request = format!("ws://{addr}/ws").into_client_request()?;
    if let Some(token) = token {
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(request)
}

/// The next text frame as JSON, within `within`; pings and pongs are
/// skipped, anything else (a close, a binary frame, the end) is an error.
pub async fn next_json<S>(ws: &mut WebSocketStream<S>, within: Duration) -> Result<Value>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let frame = tokio::time::timeout(within, ws.next())
            .await
            .map_err(|_| anyhow!("no message within {within:?}"))?
            .ok_or_else(|| anyhow!("the connection ended"))?
            .context("read a frame")?;
        match frame {
            Message::Text(text) => {
                return serde_json::from_str(text.as_str()).with_context(|| format!("not JSON: {text}"));
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => bail!("expected a text message, got {other:?}"),
        }
    }
}

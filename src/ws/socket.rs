//! The WebSocket transport: frames in and out, pings, and closes that are
//! closing handshakes.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper_tungstenite::HyperWebsocketStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tracing::{debug, warn};

use super::fragments::{FRAGMENT_SIZE, Fragments, fragments};
use crate::event::Event;
use crate::session::core::Out;
use crate::session::{Close, Flow, Incoming, Transport, TransportError};

pub struct WebSocket {
    ws: HyperWebsocketStream,
    /// For log lines.
    conn: u64,
}

impl WebSocket {
    pub fn new(ws: HyperWebsocketStream, conn: u64) -> WebSocket {
        WebSocket { ws, conn }
    }

    async fn feed(&mut self, messages: impl Iterator<Item = Message>) -> Result<Flow, TransportError> {
        for message in messages {
            self.ws.feed(message).await.map_err(broken)?;
        }
        self.ws.flush().await.map_err(broken)?;
        Ok(Flow::Continue)
    }

    /// Send the close frame, then read (and drop) what the client still
    /// sends until it closes its side, so that the connection ends with a
    /// closing handshake rather than a reset, even when the client is still
    /// sending (it may be in the middle of the message that is refused).
    /// The bytes are read below the WebSocket layer: after a frame it could
    /// not take (too large, not UTF-8), it reads nothing more.
    async fn close_handshake(&mut self, close: Close, within: Duration) -> String {
        let until = Instant::now() + within;
        let frame = CloseFrame { code: CloseCode::from(close.code), reason: close.reason.into() };
        let sent = tokio::time::timeout_at(until.into(), self.ws.close(Some(frame))).await;
        if sent.is_err() {
            return format!("close {} not written within {within:?}; dropped", close.code);
        }
        let socket = self.ws.get_mut();
        // Our side is done: the client sees the end of the stream after the
        // close frame, answers, and closes its side.
        let _ = tokio::time::timeout_at(until.into(), socket.shutdown()).await;
        let mut buffer = [0u8; 4096];
        let mut dropped = 0usize;
        loop {
            match tokio::time::timeout_at(until.into(), socket.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => dropped += n,
                Err(_) => {
                    debug!(conn = self.conn, "the client did not close its side within {within:?}");
                    break;
                }
            }
        }
        if dropped > 0 {
            debug!(conn = self.conn, bytes = dropped, "read and dropped what the client sent after the close");
        }
        format!("closed with {}: {}", close.code, close.reason)
    }
}

fn broken(e: tungstenite::Error) -> TransportError {
    TransportError(e.to_string())
}

/// Fn items, not closures: a closure here trips the compiler's `Send`
/// inference for the session future.
fn frame(out: &Out) -> Message {
    match out {
        Out::Event(event) => Message::Text(event.frame.clone()),
        Out::Reply(reply) => Message::Text(Utf8Bytes::from(reply.to_text())),
    }
}

fn frames(out: &Out) -> Fragments {
    match out {
        Out::Event(event) => fragments(&event.frame),
        Out::Reply(reply) => fragments(&Utf8Bytes::from(reply.to_text())),
    }
}

fn is_large(event: &Event) -> bool {
    event.frame.len() > FRAGMENT_SIZE
}

impl Transport for WebSocket {
    const NAME: &'static str = "websocket";
    const TWO_WAY: bool = true;

    async fn recv(&mut self) -> Incoming {
        match self.ws.next().await {
            None => Incoming::Gone("client went away".into()),
            Some(Ok(Message::Text(text))) => Incoming::Text(text.as_str().to_string()),
            Some(Ok(Message::Binary(_))) => Incoming::Binary,
            Some(Ok(Message::Pong(payload))) => {
                Incoming::Pong(<[u8; 8]>::try_from(payload.as_ref()).ok().map(u64::from_be_bytes))
            }
            // tungstenite answers pings and close frames itself.
            Some(Ok(Message::Ping(_) | Message::Close(_) | Message::Frame(_))) => Incoming::Alive,
            Some(Err(tungstenite::Error::Capacity(e))) => {
                warn!(conn = self.conn, error = %e, "message too big; closing with 1009");
                Incoming::Refused(Close::TOO_BIG)
            }
            Some(Err(tungstenite::Error::Utf8(e))) => {
                warn!(conn = self.conn, error = %e, "text frame is not UTF-8; closing with 1007");
                Incoming::Refused(Close::NOT_UTF8)
            }
            Some(Err(tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
                Incoming::Gone("client went away without a close".into())
            }
            Some(Err(tungstenite::Error::Protocol(e))) => {
                warn!(conn = self.conn, error = %e, "protocol error; closing with 1002");
                Incoming::Refused(Close::PROTOCOL)
            }
            Some(Err(e)) => Incoming::Gone(format!("connection failed: {e}")),
        }
    }

    async fn send(&mut self, items: &[Out]) -> Result<Flow, TransportError> {
        // Fed straight from the shared frames: no allocation per recipient.
        if items.iter().any(|out| matches!(out, Out::Event(event) if is_large(event))) {
            Box::pin(self.feed(items.iter().flat_map(frames))).await
        } else {
            self.feed(items.iter().map(frame)).await
        }
    }

    async fn ping(&mut self, payload: Option<u64>) -> Result<(), TransportError> {
        let payload = payload.map(|p| bytes::Bytes::copy_from_slice(&p.to_be_bytes())).unwrap_or_default();
        self.feed(std::iter::once(Message::Ping(payload))).await.map(|_| ())
    }

    async fn close(&mut self, close: Close, within: Duration) -> String {
        Box::pin(self.close_handshake(close, within)).await
    }
}

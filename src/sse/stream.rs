//! The SSE transport: a session's messages as `text/event-stream` lines,
//! written into the body of an HTTP response that hyper sends.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Topic;
use crate::protocol::{ErrorCode, ServerMessage};
use crate::session::core::Out;
use crate::session::{Close, Flow, Incoming, Transport, TransportError};

/// Chunks between the session and hyper. One: a client that stops reading
/// holds up the session's writes after what hyper and the kernel buffer,
/// as a WebSocket's do, and the slow consumer rule takes over.
const BODY_CHUNKS: usize = 1;

/// The body of an SSE response: what the session writes, as hyper pulls it.
pub struct EventBody {
    chunks: mpsc::Receiver<Bytes>,
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.chunks.poll_recv(cx).map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

pub struct EventStream {
    /// `None` once the stream has ended.
    chunks: Option<mpsc::Sender<Bytes>>,
    /// The topics the stream opened with, for `ready`.
    topics: Vec<Topic>,
    /// The `since` it resumes from: the cursor `ready` carries.
    since: Option<i64>,
    ready: bool,
    /// Cancelled when the stream ends: the HTTP connection then has a few
    /// seconds to send the rest, and is dropped if it cannot.
    ended: CancellationToken,
}

impl EventStream {
    /// A stream and the body it fills.
    pub fn new(topics: Vec<Topic>, since: Option<i64>, ended: CancellationToken) -> (EventStream, EventBody) {
        let (sender, chunks) = mpsc::channel(BODY_CHUNKS);
        (EventStream { chunks: Some(sender), topics, since, ready: false, ended }, EventBody { chunks })
    }

    async fn write(&mut self, bytes: BytesMut) -> Result<(), TransportError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let chunks = self.chunks.as_ref().ok_or_else(gone)?;
        chunks.send(bytes.freeze()).await.map_err(|_| gone())
    }

    /// `ready`: the stream's resume cursor, and its topics.
    fn ready(&mut self, cursor: i64, buffer: &mut BytesMut) {
        self.ready = true;
        let topics: Vec<String> = self.topics.iter().map(Topic::to_string).collect();
        let data = serde_json::json!({"event_id": cursor, "topics": topics});
        event(buffer, Some(cursor), "ready", data.to_string().as_bytes());
    }

    /// One item in SSE lines; `End` when the stream must end after it.
    fn encode(&mut self, out: &Out, buffer: &mut BytesMut) -> Flow {
        let reply = match out {
            Out::Event(e) => {
                event(buffer, Some(e.id), e.kind.as_str(), e.frame.as_bytes());
                return Flow::Continue;
            }
            Out::Reply(reply) => reply,
        };
        match reply.as_ref() {
            ServerMessage::Authenticated { .. } => {
                if let Some(since) = self.since.filter(|_| !self.ready) {
                    self.ready(since, buffer);
                }
            }
            ServerMessage::Subscribed { event_id: Some(cursor), .. } if !self.ready => self.ready(*cursor, buffer),
            ServerMessage::Resync { .. } => event(buffer, None, "resync", reply.to_text().as_bytes()),
            ServerMessage::Error { code: ErrorCode::TokenExpired, .. } => {
                event(buffer, None, "token_expired", reply.to_text().as_bytes())
            }
            // A stream cannot be asked again: it ends, and the client
            // reconnects with Last-Event-ID, as EventSource does by itself.
            ServerMessage::Error { code: ErrorCode::Unavailable, message, .. } => {
                comment(buffer, message);
                return Flow::End("replay from the event log failed; reconnect with Last-Event-ID");
            }
            // Replies to requests a stream cannot make.
            _ => {}
        }
        Flow::Continue
    }
}

/// `id:`, `event:` and `data:` lines, then a blank line. The data is one
/// line of JSON (JSON escapes newlines in strings).
fn event(buffer: &mut BytesMut, id: Option<i64>, name: &str, data: &[u8]) {
    if let Some(id) = id {
        let _ = writeln!(buffer, "id: {id}");
    }
    let _ = writeln!(buffer, "event: {name}");
    buffer.put_slice(b"data: ");
    buffer.put_slice(data);
    buffer.put_slice(b"\n\n");
}

/// A comment line, which clients ignore; text from elsewhere stays on it.
fn comment(buffer: &mut BytesMut, text: &str) {
    let _ = write!(buffer, ": {}\n\n", text.replace(['\r', '\n'], " "));
}

fn gone() -> TransportError {
    TransportError("client went away".into())
}

impl Transport for EventStream {
    const NAME: &'static str = "sse";
    const TWO_WAY: bool = false;

    async fn recv(&mut self) -> Incoming {
        match &self.chunks {
            // hyper drops the body when the client is gone.
            Some(chunks) => chunks.closed().await,
            None => std::future::pending().await,
        }
        Incoming::Gone("client went away".into())
    }

    async fn send(&mut self, items: &[Out]) -> Result<Flow, TransportError> {
        let mut buffer = BytesMut::new();
        let mut flow = Flow::Continue;
        for out in items {
            flow = self.encode(out, &mut buffer);
            if flow != Flow::Continue {
                break;
            }
        }
        self.write(buffer).await?;
        Ok(flow)
    }

    async fn ping(&mut self, _payload: Option<u64>) -> Result<(), TransportError> {
        self.write(BytesMut::from(&b": ping\n\n"[..])).await
    }

    async fn close(&mut self, close: Close, within: Duration) -> String {
        let mut buffer = BytesMut::new();
        comment(&mut buffer, &format!("closed: {}", close.reason));
        let written = tokio::time::timeout(within, self.write(buffer)).await;
        self.chunks = None;
        self.ended.cancel();
        match written {
            Ok(Ok(())) => format!("stream ended: {}", close.reason),
            _ => format!("stream ended without its last line: {}", close.reason),
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.ended.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use uuid::Uuid;

    use super::*;
    use crate::event::{Event, EventKind};

    fn stream(since: Option<i64>) -> EventStream {
        EventStream::new(vec![Topic::DeploymentEvents], since, CancellationToken::new()).0
    }

    fn encoded(stream: &mut EventStream, items: &[Out]) -> (String, Flow) {
        let mut buffer = BytesMut::new();
        let mut flow = Flow::Continue;
        for out in items {
            flow = stream.encode(out, &mut buffer);
        }
        (String::from_utf8(buffer.to_vec()).unwrap(), flow)
    }

    fn reply(message: ServerMessage) -> Out {
        Out::Reply(Box::new(message))
    }

    #[test]
    fn ready_comes_first_with_the_cursor_then_events_as_id_event_data() {
        let mut stream = stream(None);
        let event = Event::new(7, EventKind::LogsUpdate, Uuid::nil(), Uuid::nil(), None, r#"{"logs":"a\nb"}"#);
        let items = [
            reply(ServerMessage::authenticated(Uuid::nil(), std::time::SystemTime::UNIX_EPOCH)),
            reply(ServerMessage::Subscribed { topic: Topic::DeploymentEvents, event_id: Some(5) }),
            reply(ServerMessage::Subscribed { topic: Topic::DeploymentEvents, event_id: Some(6) }),
            Out::Event(Arc::new(event)),
        ];
        let (text, flow) = encoded(&mut stream, &items);
        assert_eq!(flow, Flow::Continue);
        let expected = format!(
            "id: 5\nevent: ready\ndata: {{\"event_id\":5,\"topics\":[\"deployment_events\"]}}\n\n\
             id: 7\nevent: DEPLOYMENT_LOGS_UPDATE\ndata: {}\n\n",
            items_frame(&items[3])
        );
        assert_eq!(text, expected);
    }

    fn items_frame(out: &Out) -> String {
        match out {
            Out::Event(e) => e.frame.as_str().to_string(),
            Out::Reply(r) => r.to_text(),
        }
    }

    #[test]
    fn a_resume_is_ready_at_its_since_and_unavailable_ends_the_stream() {
        let mut stream = stream(Some(40));
        let items = [
            reply(ServerMessage::authenticated(Uuid::nil(), std::time::SystemTime::UNIX_EPOCH)),
            reply(ServerMessage::Subscribed { topic: Topic::DeploymentEvents, event_id: Some(40) }),
            reply(ServerMessage::Resync { topic: Topic::DeploymentEvents }),
        ];
        let (text, _) = encoded(&mut stream, &items);
        assert!(text.starts_with("id: 40\nevent: ready\n"), "{text}");
        assert_eq!(text.matches("event: ready").count(), 1);
        assert!(
            text.ends_with("event: resync\ndata: {\"type\":\"resync\",\"data\":{\"topic\":\"deployment_events\"}}\n\n")
        );
        let unavailable = ServerMessage::error(ErrorCode::Unavailable, "failed\nhere", Some("deployment_events"));
        let (text, flow) = encoded(&mut stream, &[reply(unavailable)]);
        assert_eq!(text, ": failed here\n\n", "one comment line");
        assert!(matches!(flow, Flow::End(_)));
    }
}

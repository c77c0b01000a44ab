//! `windflow-notify tail`: a terminal client. It authenticates, subscribes,
//! and prints every server message as one JSON line on stdout, so it can be
//! piped into `jq` or `grep`. When the connection drops it reconnects with
//! backoff and resumes each topic with `since` = the last `event_id` it
//! printed, so nothing is lost or printed twice across a server restart.
//! Its own diagnostics go to stderr.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Write};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Reconnect delays grow from the first to the last, doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How many recent event ids are remembered to drop duplicates.
const SEEN_CAPACITY: usize = 10_000;

#[derive(clap::Args, Debug, Clone)]
pub struct TailArgs {
    /// Topic to subscribe to (`deployment_events`, `deployment_logs_{id}`,
    /// `deployment_progress_{id}`); repeat for several.
    #[arg(long = "topic", value_name = "TOPIC", required = true)]
    pub topics: Vec<String>,
    /// Replay every event committed after this event id first (0: all the
    /// event log holds).
    #[arg(long)]
    pub since: Option<i64>,
    /// WebSocket URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws")]
    pub url: String,
    /// The JWT to authenticate with (see the `token` command).
    #[arg(long, env = "WINDFLOW_TOKEN", value_name = "WINDFLOW_TOKEN", hide_env_values = true)]
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("--url: {0}")]
    Url(String),
    #[error("--token: the server refused the token (HTTP {0})")]
    Refused(u16),
    #[error("the server closed the connection: {0}")]
    Closed(String),
    #[error("the server refused the request: {0}")]
    Refusal(String),
    #[error("cannot write to stdout: {0}")]
    Output(#[from] io::Error),
}

/// How one connection ended.
enum Ended {
    /// Shutdown was requested or stdout is gone: stop quietly.
    Stop,
    /// The connection was lost; try again.
    Lost(String),
}

/// What survives reconnections: the resume point and the recent ids.
struct Resume {
    since: Option<i64>,
    seen: HashSet<i64>,
    order: VecDeque<i64>,
}

impl Resume {
    /// Record `id`; false when it was already printed.
    fn first_sight(&mut self, id: i64) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > SEEN_CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.since = Some(id);
        true
    }
}

/// Run until `shutdown` is cancelled or the server refuses us for good
/// (bad token, bad topic); transient failures are retried forever.
pub async fn run(args: TailArgs, shutdown: CancellationToken) -> Result<(), TailError> {
    let mut request = args.url.as_str().into_client_request().map_err(|e| TailError::Url(e.to_string()))?;
    let bearer = format!("Bearer {}", args.token.trim())
        .parse()
        .map_err(|_| TailError::Refusal("--token: not a valid header value".into()))?;
    request.headers_mut().insert("authorization", bearer);
    let mut resume = Resume { since: args.since, seen: HashSet::new(), order: VecDeque::new() };
    let mut backoff = FIRST_BACKOFF;
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            connected = tokio_tungstenite::connect_async(request.clone()) => connected,
        };
        let reason = match connected {
            Ok((socket, _)) => match session(socket, &args.topics, &mut resume, &mut backoff, &shutdown).await? {
                Ended::Stop => return Ok(()),
                Ended::Lost(reason) => reason,
            },
            Err(tungstenite::Error::Http(response)) if response.status().as_u16() == 401 => {
                return Err(TailError::Refused(401));
            }
            Err(tungstenite::Error::Url(e)) => return Err(TailError::Url(e.to_string())),
            Err(e) => e.to_string(),
        };
        let delay = jittered(backoff);
        warn!(%reason, retry_in = ?delay, since = ?resume.since, "disconnected; will reconnect and resume");
        backoff = (backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn session(
    mut socket: Socket,
    topics: &[String],
    resume: &mut Resume,
    backoff: &mut Duration,
    shutdown: &CancellationToken,
) -> Result<Ended, TailError> {
    for topic in topics {
        let mut subscribe = json!({"type": "subscribe", "topic": topic});
        if let Some(since) = resume.since {
            subscribe["since"] = json!(since);
        }
        if let Err(e) = socket.send(Message::Text(subscribe.to_string().into())).await {
            return Ok(Ended::Lost(e.to_string()));
        }
    }
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = socket.close(None).await;
                return Ok(Ended::Stop);
            }
            frame = socket.next() => frame,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let Some(frame) = frame else { return Ok(Ended::Lost("closed without a code".into())) };
                // 1008: the token is invalid or expired; retrying cannot help.
                if frame.code == CloseCode::Policy {
                    return Err(TailError::Closed(format!("{} {}", u16::from(frame.code), frame.reason)));
                }
                return Ok(Ended::Lost(format!("closed with {} {}", u16::from(frame.code), frame.reason)));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Ok(Ended::Lost(e.to_string())),
            None => return Ok(Ended::Lost("connection ended".into())),
        };
        let message: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
        if let Some(id) = message.get("event_id").and_then(Value::as_i64)
            && !resume.first_sight(id)
        {
            continue;
        }
        if !print_line(text.as_str())? {
            return Ok(Ended::Stop);
        }
        match message["type"].as_str() {
            Some("authenticated") => {
                *backoff = FIRST_BACKOFF;
                debug!("authenticated");
            }
            Some("error") => {
                let code = message["data"]["code"].as_str().unwrap_or_default();
                if matches!(code, "invalid_topic" | "forbidden" | "too_many_subscriptions" | "unauthorized") {
                    return Err(TailError::Refusal(format!("{code}: {}", message["data"]["message"])));
                }
            }
            _ => {}
        }
    }
}

/// Print one line and flush it; false when stdout is closed (`| head`).
fn print_line(line: &str) -> Result<bool, TailError> {
    let mut out = io::stdout().lock();
    match writeln!(out, "{}", line.trim_end()).and_then(|_| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Between half and all of `delay`, so clients dropped together by a
/// restart do not all come back in the same instant.
fn jittered(delay: Duration) -> Duration {
    let fraction = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 2000.0 + 0.5;
    delay.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_dropped_and_the_resume_point_follows() {
        let mut resume = Resume { since: Some(3), seen: HashSet::new(), order: VecDeque::new() };
        assert!(resume.first_sight(7));
        assert!(!resume.first_sight(7));
        assert!(resume.first_sight(5));
        assert_eq!(resume.since, Some(5), "commit order, not the largest id");
    }

    #[test]
    fn jitter_stays_within_half_and_all() {
        for _ in 0..100 {
            let delay = jittered(Duration::from_secs(2));
            assert!(delay >= Duration::from_secs(1) && delay <= Duration::from_secs(2), "{delay:?}");
        }
    }
}

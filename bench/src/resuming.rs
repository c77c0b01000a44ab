//! Clients that keep the documented client contract (docs/client.md,
//! "Resume"): whenever a connection ends, they connect again with backoff
//! and subscribe to each topic with `since` = the last `event_id` they saw
//! on it, or the cursor of the topic's first `subscribed`. Unlike
//! `/client.js` they drop no duplicates: every event is recorded as it
//! arrives, so a run can count what the server sent twice.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use windflow_notify::backoff::Backoff;

use crate::clients::{ClientSpec, Transport, next_json, open_with};
use crate::harness::now_ns;

/// How the log lines of a run's fences start (`windflow-bench-fence 3`):
/// a client that received fence n has received everything committed
/// before it (its topics' events arrive in commit order), duplicates
/// included.
pub const FENCE: &str = "windflow-bench-fence ";

/// Reconnect delays: a server that is down is retried every 2 s at most.
const RECONNECT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
/// How long the next client may take to get its first subscriptions.
const SETUP_WITHIN: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Spec {
    pub target: SocketAddr,
    pub source: IpAddr,
    pub token: String,
    /// Lowercase topic names, as the server names them in replies.
    pub topics: Vec<String>,
}

/// One event as it arrived.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub event_id: i64,
    pub at_ns: u64,
    /// Which of the client's connections it came on (1: the first).
    pub connection: u64,
}

/// What one client saw, over all its connections.
#[derive(Debug, Default)]
pub struct Log {
    pub events: Vec<Received>,
    /// Connections that reached `authenticated`.
    pub connections: u64,
    /// `unavailable` replies (the database could not answer a subscribe):
    /// each ends the connection, and the next one resumes.
    pub unavailable: u64,
    pub resyncs: u64,
    /// Any other `error` reply, as received.
    pub errors: Vec<String>,
    /// The highest fence received.
    pub fence: u64,
}

/// Does `topic` carry an event of `kind` on `deployment`? The topic table
/// of docs/protocol.md, as `/client.js`'s `topicCarries`.
fn carries(topic: &str, kind: &str, deployment: &str) -> bool {
    if topic == "deployment_events" {
        return true;
    }
    match (topic.strip_prefix("deployment_logs_"), topic.strip_prefix("deployment_progress_")) {
        (Some(id), _) => kind == "DEPLOYMENT_LOGS_UPDATE" && id == deployment,
        (_, Some(id)) => kind == "DEPLOYMENT_PROGRESS" && id == deployment,
        _ => false,
    }
}

/// One client's state across its connections.
struct Client {
    spec: Spec,
    /// Per topic, where the next connection resumes; None until the first
    /// `subscribed` (subscribe without `since`, live from then on).
    cursors: Vec<Option<i64>>,
    log: Log,
    /// Told once, when the first connection's subscriptions are all in.
    ready: Option<mpsc::UnboundedSender<Result<()>>>,
    /// (this client's index, fence number) for each fence passed.
    fences: mpsc::UnboundedSender<(usize, u64)>,
    index: usize,
}

/// How a connection ended.
enum Ended {
    Stopped,
    /// The server closed it, the socket failed, or a subscribe got
    /// `unavailable`: connect again and resume.
    Lost,
}

impl Client {
    async fn run(mut self, stop: CancellationToken) -> Log {
        let mut backoff = RECONNECT_BACKOFF;
        loop {
            let session = tokio::select! {
                _ = stop.cancelled() => break,
                session = self.session(&stop) => session,
            };
            match session {
                Ok(Ended::Stopped) => break,
                Ok(Ended::Lost) => backoff.reset(),
                Err(e) => {
                    // The first connection must work: the run waits on it.
                    if let Some(ready) = self.ready.take() {
                        let _ = ready.send(Err(e));
                        break;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        self.log
    }

    /// One connection: authenticate, subscribe every topic from its
    /// cursor, then record events until it ends. Err: it never got as far
    /// as `authenticated`.
    async fn session(&mut self, stop: &CancellationToken) -> Result<Ended> {
        let spec = ClientSpec {
            target: self.spec.target,
            source: self.spec.source,
            token: Some(self.spec.token.clone()),
            subscribe: Vec::new(),
            min_len: 0,
            transport: Transport::WebSocket,
        };
        let mut ws = open_with(&spec, None).await?;
        let first = next_json(&mut ws).await?;
        if first["type"] != "authenticated" {
            bail!("expected authenticated, got {first}");
        }
        self.log.connections += 1;
        let mut pending = self.spec.topics.len();
        for (topic, cursor) in self.spec.topics.iter().zip(&self.cursors) {
            let request = match cursor {
                Some(since) => json!({"type": "subscribe", "topic": topic, "since": since}),
                None => json!({"type": "subscribe", "topic": topic}),
            };
            if ws.send(Message::Text(request.to_string().into())).await.is_err() {
                return Ok(Ended::Lost);
            }
        }
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
                    return Ok(Ended::Stopped);
                }
                frame = ws.next() => frame,
            };
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_)) | Err(_)) | None => return Ok(Ended::Lost),
                Some(Ok(_)) => continue,
            };
            let at_ns = now_ns();
            let message: Value = serde_json::from_str(text.as_str()).with_context(|| format!("not JSON: {text}"))?;
            match message["type"].as_str() {
                Some("subscribed") => {
                    self.subscribed(&message["data"]);
                    pending = pending.saturating_sub(1);
                    if pending == 0
                        && let Some(ready) = self.ready.take()
                    {
                        let _ = ready.send(Ok(()));
                    }
                }
                Some("resync") => self.log.resyncs += 1,
                Some("error") if message["data"]["code"] == "unavailable" => {
                    self.log.unavailable += 1;
                    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
                    return Ok(Ended::Lost);
                }
                Some("error") => self.log.errors.push(message.to_string()),
                Some(kind) if message["event_id"].is_i64() => self.event(kind, &message, at_ns),
                _ => {}
            }
        }
    }

    /// The resume cursor of a topic subscribed without `since`. With
    /// `since` the reply's `event_id` is `since` itself, and events of the
    /// topic may already have arrived through another topic's replay, so
    /// a cursor once set moves only with events.
    fn subscribed(&mut self, data: &Value) {
        let (Some(topic), Some(event_id)) = (data["topic"].as_str(), data["event_id"].as_i64()) else { return };
        for (mine, cursor) in self.spec.topics.iter().zip(self.cursors.iter_mut()) {
            if mine == topic && cursor.is_none() {
                *cursor = Some(event_id);
            }
        }
    }

    fn event(&mut self, kind: &str, message: &Value, at_ns: u64) {
        let Some(event_id) = message["event_id"].as_i64() else { return };
        let data = &message["data"];
        let deployment = data["deployment_id"].as_str().unwrap_or_default();
        self.log.events.push(Received { event_id, at_ns, connection: self.log.connections });
        for (topic, cursor) in self.spec.topics.iter().zip(self.cursors.iter_mut()) {
            if carries(topic, kind, deployment) {
                *cursor = Some(event_id);
            }
        }
        if let Some(fence) = data["logs"].as_str().and_then(|l| l.strip_prefix(FENCE)).and_then(|n| n.parse().ok())
            && fence > self.log.fence
        {
            self.log.fence = fence;
            let _ = self.fences.send((self.index, fence));
        }
    }
}

/// Resuming clients, each on a task of its own.
pub struct Fleet {
    handles: Vec<JoinHandle<Log>>,
    fences: mpsc::UnboundedReceiver<(usize, u64)>,
    /// The highest fence each client passed.
    fenced: Vec<u64>,
    stop: CancellationToken,
}

impl Fleet {
    /// Start every client; returns once each has its subscriptions (fails
    /// on the first that cannot get them).
    pub async fn connect(specs: Vec<Spec>) -> Result<Fleet> {
        let stop = CancellationToken::new();
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        let (fences_tx, fences) = mpsc::unbounded_channel();
        let total = specs.len();
        let handles = specs
            .into_iter()
            .enumerate()
            .map(|(index, spec)| {
                let cursors = vec![None; spec.topics.len()];
                let client = Client {
                    spec,
                    cursors,
                    log: Log::default(),
                    ready: Some(ready_tx.clone()),
                    fences: fences_tx.clone(),
                    index,
                };
                tokio::spawn(client.run(stop.clone()))
            })
            .collect();
        drop(ready_tx);
        let fleet = Fleet { handles, fences, fenced: vec![0; total], stop };
        for done in 0..total {
            let outcome = match tokio::time::timeout(SETUP_WITHIN, ready.recv()).await {
                Ok(Some(outcome)) => outcome,
                Ok(None) => Err(anyhow!("clients vanished during setup")),
                Err(_) => Err(anyhow!("no subscriptions within {SETUP_WITHIN:?}")),
            };
            if let Err(e) = outcome {
                fleet.finish().await;
                return Err(e.context(format!("client {done} of {total} failed to set up")));
            }
        }
        Ok(fleet)
    }

    /// Wait until every client received fence `n`, or `within` passes;
    /// returns how many had not.
    pub async fn behind_fence(&mut self, n: u64, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        let behind = |fenced: &[u64]| fenced.iter().filter(|f| **f < n).count();
        while behind(&self.fenced) > 0 {
            match tokio::time::timeout_at(deadline, self.fences.recv()).await {
                Ok(Some((client, fence))) => self.fenced[client] = self.fenced[client].max(fence),
                Ok(None) | Err(_) => break,
            }
        }
        behind(&self.fenced)
    }

    pub async fn finish(mut self) -> Vec<Log> {
        self.stop.cancel();
        let mut logs = Vec::with_capacity(self.handles.len());
        for handle in std::mem::take(&mut self.handles) {
            logs.push(handle.await.unwrap_or_default());
        }
        logs
    }
}

/// A run that fails midway stops its clients too, rather than leaving
/// them reconnecting to a server that is gone.
impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_carry_what_the_protocol_says() {
        let d = "6f1c2a3e-0d4b-4c9a-9e8f-2b7a1d5c3e90";
        assert!(carries("deployment_events", "DEPLOYMENT_STATUS_CHANGED", d));
        assert!(carries(&format!("deployment_logs_{d}"), "DEPLOYMENT_LOGS_UPDATE", d));
        assert!(!carries(&format!("deployment_logs_{d}"), "DEPLOYMENT_PROGRESS", d));
        assert!(carries(&format!("deployment_progress_{d}"), "DEPLOYMENT_PROGRESS", d));
        assert!(!carries("deployment_logs_other", "DEPLOYMENT_LOGS_UPDATE", d));
    }
}

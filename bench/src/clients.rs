//! WebSocket clients: connect (from a chosen source IP, to spread loopback
//! ports), authenticate, subscribe, then record every event's marker with
//! its receive time until told to stop.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::harness::now_ns;

/// The marker a writer puts in each row: `bm<seq>|`, optionally followed by
/// `<sent_ns>|` (the bare broadcaster's send time).
pub fn marker(seq: u32) -> String {
    format!("bm{seq}|")
}

/// (seq, embedded send time or 0) of the first marker in `bytes`.
pub fn find_marker(bytes: &[u8]) -> Option<(u32, u64)> {
    let mut from = 0;
    while let Some(pos) = bytes[from..].windows(2).position(|w| w == b"bm") {
        let start = from + pos + 2;
        let digits = |at: usize| -> Option<(u64, usize)> {
            let len = bytes[at..].iter().take_while(|b| b.is_ascii_digit()).count();
            if len == 0 || bytes.get(at + len) != Some(&b'|') {
                return None;
            }
            let value = std::str::from_utf8(&bytes[at..at + len]).ok()?.parse().ok()?;
            Some((value, at + len + 1))
        };
        if let Some((seq, next)) = digits(start) {
            let sent = digits(next).map(|(ns, _)| ns).unwrap_or(0);
            return u32::try_from(seq).ok().map(|seq| (seq, sent));
        }
        from = start;
    }
    None
}

/// How a client reaches the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// `/ws`: authenticate, then one `subscribe` a topic.
    #[default]
    #[value(name = "ws")]
    WebSocket,
    /// `GET /events?topic=…` with the token as a header.
    Sse,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "ws",
            Transport::Sse => "sse",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub target: SocketAddr,
    pub source: IpAddr,
    /// None: the bare broadcaster (no protocol, no token).
    pub token: Option<String>,
    pub subscribe: Vec<String>,
    /// Frames carrying a marker must be at least this long (S5: intact 1 MiB lines).
    pub min_len: usize,
    pub transport: Transport,
}

/// What one client saw.
#[derive(Debug, Default)]
pub struct ClientLog {
    /// (seq, receive time, embedded send time or 0).
    pub samples: Vec<(u32, u64, u64)>,
    pub short_frames: u64,
    pub unmarked: u64,
    pub ended: Option<String>,
}

#[derive(Default)]
pub struct Counters {
    pub received: AtomicU64,
}

pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn open(spec: &ClientSpec) -> Result<Ws> {
    open_with(spec, None).await
}

/// Connect and do the WebSocket handshake; `recv_buffer` sets SO_RCVBUF
/// before connecting (a client that reads slowly, or never).
pub async fn open_with(spec: &ClientSpec, recv_buffer: Option<u32>) -> Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).context("SO_RCVBUF")?;
    }
    socket.bind(SocketAddr::new(spec.source, 0)).with_context(|| format!("bind {}", spec.source))?;
    let stream = socket.connect(spec.target).await.with_context(|| format!("connect {}", spec.target))?;
    stream.set_nodelay(true)?;
    let request = windflow_testkit::upgrade_request(spec.target, spec.token.as_deref())?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(client_config()))
        .await
        .context("websocket handshake")?;
    Ok(ws)
}

/// The next text frame as JSON (pings and pongs skipped), within 30 s:
/// the replies a client waits for while it sets up.
pub async fn next_json(ws: &mut Ws) -> Result<Value> {
    windflow_testkit::next_json(ws, Duration::from_secs(30)).await.context("during setup")
}

async fn setup(spec: &ClientSpec) -> Result<Ws> {
    let mut ws = open(spec).await?;
    if spec.token.is_none() {
        return Ok(ws);
    }
    let first = next_json(&mut ws).await?;
    if first["type"] != "authenticated" {
        bail!("expected authenticated, got {first}");
    }
    for topic in &spec.subscribe {
        ws.send(Message::Text(json!({"type": "subscribe", "topic": topic}).to_string().into())).await?;
        // `subscribed` comes through the hub, so once it is here the hub
        // routes this connection's events.
        let reply = next_json(&mut ws).await?;
        if reply["type"] != "subscribed" {
            bail!("expected subscribed to {topic}, got {reply}");
        }
    }
    Ok(ws)
}

async fn record(mut ws: Ws, spec: ClientSpec, counters: Arc<Counters>, stop: CancellationToken) -> ClientLog {
    let mut log = ClientLog::default();
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => break,
            frame = ws.next() => frame,
        };
        match frame {
            Some(Ok(Message::Text(text))) => {
                let received = now_ns();
                match find_marker(text.as_bytes()) {
                    Some((seq, sent)) => {
                        if text.len() < spec.min_len {
                            log.short_frames += 1;
                        }
                        log.samples.push((seq, received, sent));
                        counters.received.fetch_add(1, Relaxed);
                    }
                    None => log.unmarked += 1,
                }
            }
            Some(Ok(Message::Close(frame))) => {
                log.ended = Some(format!("server closed: {frame:?}"));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                log.ended = Some(format!("socket error: {e}"));
                break;
            }
            None => {
                log.ended = Some("socket closed".into());
                break;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    log
}

/// A client set up on either transport.
enum Opened {
    WebSocket(Box<Ws>),
    Sse(crate::sse::Stream),
}

pub struct Fleet {
    pub handles: Vec<JoinHandle<ClientLog>>,
    pub counters: Arc<Counters>,
    pub stop: CancellationToken,
}

impl Fleet {
    /// Connect every client (at most `parallel` handshakes at once) and
    /// return once all are set up; fails on the first client that cannot.
    pub async fn connect(specs: Vec<ClientSpec>, parallel: usize) -> Result<Fleet> {
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let gate = Arc::new(Semaphore::new(parallel));
        let (ready_tx, mut ready) = mpsc::unbounded_channel::<Result<()>>();
        let total = specs.len();
        let mut handles = Vec::with_capacity(total);
        for spec in specs {
            let (gate, ready_tx, counters, stop) = (gate.clone(), ready_tx.clone(), counters.clone(), stop.clone());
            handles.push(tokio::spawn(async move {
                let permit = gate.acquire_owned().await;
                let opened = match spec.transport {
                    Transport::WebSocket => setup(&spec).await.map(|ws| Opened::WebSocket(Box::new(ws))),
                    Transport::Sse => crate::sse::setup(&spec).await.map(Opened::Sse),
                };
                drop(permit);
                match opened {
                    Ok(opened) => {
                        let _ = ready_tx.send(Ok(()));
                        match opened {
                            Opened::WebSocket(ws) => record(*ws, spec, counters, stop).await,
                            Opened::Sse(stream) => crate::sse::record(stream, spec, counters, stop).await,
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        ClientLog { ended: Some("setup failed".into()), ..Default::default() }
                    }
                }
            }));
        }
        drop(ready_tx);
        let mut done = 0;
        while done < total {
            match ready.recv().await {
                Some(Ok(())) => done += 1,
                Some(Err(e)) => {
                    stop.cancel();
                    return Err(e.context(format!("client {done} of {total} failed to set up")));
                }
                None => bail!("clients vanished during setup"),
            }
        }
        Ok(Fleet { handles, counters, stop })
    }

    pub async fn finish(self) -> Vec<ClientLog> {
        self.stop.cancel();
        let mut logs = Vec::with_capacity(self.handles.len());
        for handle in self.handles {
            logs.push(handle.await.unwrap_or_default());
        }
        logs
    }
}

/// Loopback source addresses 127.0.0.1 … 127.0.0.32, round robin: each has
/// its own range of ephemeral ports, so tens of thousands of connections
/// (and the TIME_WAIT sockets of the previous run) fit on one host.
pub fn source_ip(i: usize) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(0x7f00_0001u32 + (i % 32) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found() {
        assert_eq!(find_marker(br#"{"logs":"bm42|xxxx"}"#), Some((42, 0)));
        assert_eq!(find_marker(br#"{"a":"bmx","logs":"bm7|123|"}"#), Some((7, 123)));
        assert_eq!(find_marker(br#"{"logs":"bm|"}"#), None);
    }
}

//! Server-Sent Events clients, for `bench s2 --transport sse`: `GET
//! /events` on a raw TCP connection (HTTP/1.1, the body chunked), set up
//! once the `ready` event came, then each event's marker recorded with its
//! receive time, as the WebSocket clients do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::clients::{ClientLog, ClientSpec, Counters, find_marker};
use crate::harness::now_ns;

/// How long setup waits for the headers and the `ready` event.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read at once.
const READ_SIZE: usize = 64 * 1024;

/// A stream that answered 200 and sent `ready`, and what it sent after it.
pub struct Stream {
    tcp: TcpStream,
    pending: Vec<u8>,
}

/// Open the stream of `spec`'s topics (the owner feed comes with it) and
/// wait for its `ready` event.
pub async fn setup(spec: &ClientSpec) -> Result<Stream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(spec.source, 0)).with_context(|| format!("bind {}", spec.source))?;
    let mut tcp = socket.connect(spec.target).await.with_context(|| format!("connect {}", spec.target))?;
    tcp.set_nodelay(true)?;
    let query: Vec<String> = spec.subscribe.iter().map(|topic| format!("topic={topic}")).collect();
    let mut request =
        format!("GET /events?{} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n", query.join("&"), spec.target);
    if let Some(token) = &spec.token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.context("send the request")?;
    let mut pending = Vec::with_capacity(READ_SIZE);
    tokio::time::timeout(SETUP_TIMEOUT, async {
        let head_end = read_until(&mut tcp, &mut pending, b"\r\n\r\n").await?;
        let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
        if !head.starts_with("HTTP/1.1 200") {
            bail!("expected 200, got {}", head.lines().next().unwrap_or_default());
        }
        pending.drain(..head_end + 4);
        let at = read_until(&mut tcp, &mut pending, b"event: ready").await?;
        let end = at + read_until_from(&mut tcp, &mut pending, b"\n\n", at).await?;
        pending.drain(..end + 2);
        Ok(())
    })
    .await
    .context("no ready event within 30 s")??;
    Ok(Stream { tcp, pending })
}

/// Record every event until `stop`, as [`crate::clients`] does for WebSocket.
pub async fn record(
    mut stream: Stream,
    spec: ClientSpec,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> ClientLog {
    let mut log = ClientLog::default();
    let mut buffer = std::mem::take(&mut stream.pending);
    let mut chunk = vec![0u8; READ_SIZE];
    loop {
        // Every complete event in the buffer (an event ends with a blank
        // line; the chunked encoding's size lines fall between events).
        let mut consumed = 0;
        while let Some(end) = find(&buffer[consumed..], b"\n\n") {
            let block = &buffer[consumed..consumed + end];
            consumed += end + 2;
            if find(block, b"\nevent: ").is_none() && !block.starts_with(b"event: ") {
                continue; // a `: ping` comment
            }
            match find_marker(block) {
                Some((seq, sent)) => {
                    if block.len() < spec.min_len {
                        log.short_frames += 1;
                    }
                    log.samples.push((seq, now_ns(), sent));
                    counters.received.fetch_add(1, Relaxed);
                }
                None => log.unmarked += 1,
            }
        }
        buffer.drain(..consumed);
        let read = tokio::select! {
            _ = stop.cancelled() => break,
            read = stream.tcp.read(&mut chunk) => read,
        };
        match read {
            Ok(0) => {
                log.ended = Some("stream ended".into());
                break;
            }
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) => {
                log.ended = Some(format!("socket error: {e}"));
                break;
            }
        }
    }
    log
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Read until `buffer` holds `needle`; its position.
async fn read_until(tcp: &mut TcpStream, buffer: &mut Vec<u8>, needle: &[u8]) -> Result<usize> {
    read_until_from(tcp, buffer, needle, 0).await
}

/// Read until `buffer[from..]` holds `needle`; its position from `from`.
async fn read_until_from(tcp: &mut TcpStream, buffer: &mut Vec<u8>, needle: &[u8], from: usize) -> Result<usize> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(at) = find(&buffer[from..], needle) {
            return Ok(at);
        }
        let n = tcp.read(&mut chunk).await.context("read the stream")?;
        if n == 0 {
            bail!("the stream ended during setup");
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

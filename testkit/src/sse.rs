//! The client side of `GET /events` (Server-Sent Events) over a plain TCP
//! connection: the response head, then the chunked body read as SSE
//! lines, one event at a time.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One event: its `id:`, `event:` and `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<i64>,
    pub event: String,
    pub data: String,
}

/// What `GET /events` answered.
pub enum SseAnswer {
    /// 200: the stream.
    Stream(SseStream),
    /// Anything else: the status and the body.
    Refused(u16, String),
}

/// An open stream of events.
pub struct SseStream {
    socket: TcpStream,
    /// Head of the response, lowercase names.
    pub headers: Vec<(String, String)>,
    /// Body bytes read but not yet decoded from their chunks.
    raw: Vec<u8>,
    /// Decoded body not yet parsed into events.
    text: String,
    /// Comment lines seen (`: ping`), in order.
    pub comments: Vec<String>,
    ended: bool,
}

/// Open `path` (e.g. `/events?topic=…`) with these extra headers; the
/// socket's receive buffer is `recv_buffer` when given (a small one makes a
/// client that stops reading felt at once).
pub async fn open(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    recv_buffer: Option<u32>,
) -> Result<SseAnswer> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let mut socket = socket.connect(addr).await.with_context(|| format!("connect to {addr}"))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    socket.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    let head_end = loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut buffer = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(15), socket.read(&mut buffer))
            .await
            .map_err(|_| anyhow!("no response head within 15 s"))??;
        if n == 0 {
            bail!("the connection ended before the response head");
        }
        raw.extend_from_slice(&buffer[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let rest = raw[head_end + 4..].to_vec();
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let mut stream = SseStream { socket, headers, raw: rest, text: String::new(), comments: Vec::new(), ended: false };
    if status == 200 {
        return Ok(SseAnswer::Stream(stream));
    }
    let length: usize = stream.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    while stream.raw.len() < length {
        let mut buffer = [0u8; 4096];
        let n = stream.socket.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        stream.raw.extend_from_slice(&buffer[..n]);
    }
    Ok(SseAnswer::Refused(status, String::from_utf8_lossy(&stream.raw).to_string()))
}

impl SseStream {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The next event within `within`, comments kept aside; `None` when
    /// the stream ended.
    pub async fn next_event(&mut self, within: Duration) -> Result<Option<SseEvent>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.next_block(deadline).await? {
                Some(Block::Event(event)) => return Ok(Some(event)),
                Some(Block::Comment) => continue,
                None => return Ok(None),
            }
        }
    }

    /// Read until a comment equal to `text` comes, within `within`; events
    /// meanwhile are an error.
    pub async fn comment(&mut self, text: &str, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        while !self.comments.iter().any(|c| c == text) {
            match self.next_block(deadline).await? {
                Some(Block::Event(event)) => bail!("an event while waiting for a comment: {event:?}"),
                Some(Block::Comment) => {}
                None => bail!("the stream ended while waiting for a comment {text:?}"),
            }
        }
        Ok(())
    }

    async fn next_block(&mut self, deadline: tokio::time::Instant) -> Result<Option<Block>> {
        loop {
            if let Some(block) = self.parse_one() {
                return Ok(Some(block));
            }
            if self.ended {
                return Ok(None);
            }
            self.decode_chunks()?;
            if self.text.contains("\n\n") || self.ended {
                continue;
            }
            let mut buffer = [0u8; 16 * 1024];
            let read = tokio::time::timeout_at(deadline, self.socket.read(&mut buffer))
                .await
                .map_err(|_| anyhow!("nothing from the stream in time"))?;
            match read {
                Ok(0) | Err(_) => self.ended = true,
                Ok(n) => self.raw.extend_from_slice(&buffer[..n]),
            }
        }
    }

    /// Move whole chunks of the chunked body from `raw` into `text`.
    fn decode_chunks(&mut self) -> Result<()> {
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else { return Ok(()) };
            let size_line = String::from_utf8_lossy(&self.raw[..line_end]).to_string();
            let size =
                usize::from_str_radix(size_line.trim(), 16).with_context(|| format!("chunk size {size_line:?}"))?;
            if size == 0 {
                self.ended = true;
                return Ok(());
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return Ok(());
            }
            self.text.push_str(std::str::from_utf8(&self.raw[start..start + size]).context("a chunk is not UTF-8")?);
            self.raw.drain(..start + size + 2);
        }
    }

    /// One event or comment block from `text`.
    fn parse_one(&mut self) -> Option<Block> {
        let end = self.text.find("\n\n")?;
        let block: String = self.text.drain(..end + 2).collect();
        let mut event = SseEvent { id: None, event: "message".into(), data: String::new() };
        let mut fields = false;
        for line in block.lines() {
            if let Some(comment) = line.strip_prefix(':') {
                self.comments.push(comment.trim().to_string());
            } else if let Some((field, value)) = line.split_once(':') {
                fields = true;
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => event.id = value.parse().ok(),
                    "event" => event.event = value.to_string(),
                    "data" => event.data.push_str(value),
                    _ => {}
                }
            }
        }
        Some(if fields { Block::Event(event) } else { Block::Comment })
    }
}

enum Block {
    Event(SseEvent),
    Comment,
}

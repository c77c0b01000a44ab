//! Plain HTTP/1.1 reads of a server's `/healthz` and `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a response may take.
const RESPONSE_WITHIN: Duration = Duration::from_secs(15);

/// A port free at the time of asking (for a child process to bind).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind port 0")?;
    Ok(listener.local_addr()?.port())
}

/// A plain HTTP/1.1 GET with these extra headers: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connect to {addr}"))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(RESPONSE_WITHIN, stream.read_to_end(&mut response))
        .await
        .with_context(|| format!("GET {path}: no response within {RESPONSE_WITHIN:?}"))??;
    let response = String::from_utf8_lossy(&response);
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no HTTP status line")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// One value from the server's `/metrics`.
pub async fn metric(addr: SocketAddr, name: &str) -> Result<f64> {
    let (_, body) = http_get(addr, "/metrics", &[]).await?;
    let value = body
        .lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .with_context(|| format!("metric {name} missing"))?;
    value.parse().with_context(|| format!("metric {name}: {value:?} is not a number"))
}

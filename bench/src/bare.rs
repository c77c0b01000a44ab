//! The fan-out floor: a bare WebSocket broadcaster, run as a child process
//! (`bench bare-broadcaster`) so its CPU is its own, like the server's.
//! Each frame is built once and shared (`Utf8Bytes`) by every connection
//! task, which writes whatever is queued and flushes once: the least work
//! any WebSocket fan-out on tokio-tungstenite can do.
//!
//! Protocol with the parent on stdin/stdout: prints `LISTENING <addr>`,
//! then `READY` once `conns` clients are connected; on the line `GO` it
//! sends `events` frames at `rate` per second, prints `DONE`, and exits
//! when stdin closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::harness::now_ns;

/// Same batch size as the server's session.
const BATCH: usize = 64;

pub async fn run(conns: usize, events: u32, rate: f64, size: usize) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("LISTENING {}", listener.local_addr()?);
    let (tx, _) = broadcast::channel::<Utf8Bytes>(4096);
    let lagged = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let mut rx = tx.subscribe();
        let lagged = lagged.clone();
        tasks.push(tokio::spawn(async move {
            let config = windflow_notify::ws::websocket_config();
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else { return };
            loop {
                tokio::select! {
                    frame = ws.next() => match frame {
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                        Some(Ok(_)) => {}
                    },
                    message = rx.recv() => {
                        let mut next = Some(message);
                        let mut taken = 0;
                        while let Some(message) = next.take() {
                            match message {
                                Ok(frame) => {
                                    if ws.feed(Message::Text(frame)).await.is_err() {
                                        return;
                                    }
                                }
                                Err(broadcast::error::RecvError::Lagged(n)) => {
                                    lagged.fetch_add(n, Relaxed);
                                }
                                Err(broadcast::error::RecvError::Closed) => {
                                    let _ = ws.close(None).await;
                                    return;
                                }
                            }
                            taken += 1;
                            if taken < BATCH {
                                next = match rx.try_recv() {
                                    Ok(frame) => Some(Ok(frame)),
                                    Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(broadcast::error::RecvError::Lagged(n))),
                                    Err(_) => None,
                                };
                            }
                        }
                        if ws.flush().await.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    println!("READY");
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        if line.trim() == "GO" {
            break;
        }
    }
    let start = now_ns();
    let interval = (1e9 / rate) as u64;
    for seq in 0..events {
        let due = start + interval * u64::from(seq);
        let now = now_ns();
        if due > now {
            tokio::time::sleep(Duration::from_nanos(due - now)).await;
        }
        let head = format!(
            r#"{{"type":"DEPLOYMENT_STATUS_CHANGED","event_id":{seq},"data":{{"status":"running","error_message":"bm{seq}|{}|","pad":""#,
            now_ns()
        );
        let pad = size.saturating_sub(head.len() + 3);
        let frame = format!("{head}{}\"}}}}", "x".repeat(pad));
        let _ = tx.send(Utf8Bytes::from(frame));
    }
    println!("DONE lagged={}", lagged.load(Relaxed));
    // Wait for the parent to close stdin, then close every client.
    while stdin.next_line().await?.is_some() {}
    drop(tx);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    Ok(())
}

//! Large event messages go out as WebSocket fragments.
//!
//! tungstenite formats each frame whole into its write buffer and keeps the
//! buffer's capacity afterwards, so one 1 MiB log line would leave 1 MiB
//! resident in every connection that received it. Sent as fragments of at
//! most [`FRAGMENT_SIZE`], sliced from the shared frame without copying,
//! the buffer never grows past a fragment plus a batch. Every WebSocket
//! client (browsers, tungstenite, wscat) reassembles fragments into the one
//! message.
//!
//! Measured with `scripts/bench.sh s5` (1 MiB lines, 10 connections, two
//! runs each): server RSS 41.5 MiB whole, 32.2 MiB with 64 KiB fragments,
//! 31.6 MiB with 16 KiB ones; p50 commit-to-client 7.4–7.8 ms whole,
//! 9.8–11.2 ms at 64 KiB, 11.4–11.6 ms at 16 KiB (more, smaller writes).
//! 64 KiB keeps nearly all of the memory saving for less of the latency.

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

pub const FRAGMENT_SIZE: usize = 64 * 1024;

/// The messages that carry one text frame: itself when small, else its
/// fragments. A named iterator, not a closure chain, so the session
/// future's `Send` bound stays simple to infer.
pub struct Fragments {
    whole: Option<Utf8Bytes>,
    bytes: Bytes,
    offset: usize,
}

pub fn fragments(frame: &Utf8Bytes) -> Fragments {
    if frame.len() <= FRAGMENT_SIZE {
        Fragments { whole: Some(frame.clone()), bytes: Bytes::new(), offset: 0 }
    } else {
        Fragments { whole: None, bytes: Bytes::from(frame.clone()), offset: 0 }
    }
}

impl Iterator for Fragments {
    type Item = Message;

    fn next(&mut self) -> Option<Message> {
        if let Some(whole) = self.whole.take() {
            return Some(Message::Text(whole));
        }
        let len = self.bytes.len();
        if self.offset >= len {
            return None;
        }
        let mut end = (self.offset + FRAGMENT_SIZE).min(len);
        // Cut between characters, so each fragment is valid UTF-8 on its
        // own too (clients that check per fragment exist).
        while end < len && self.bytes[end] & 0xC0 == 0x80 {
            end -= 1;
        }
        let opcode = if self.offset == 0 { Data::Text } else { Data::Continue };
        let frame = Frame::message(self.bytes.slice(self.offset..end), OpCode::Data(opcode), end == len);
        self.offset = end;
        Some(Message::Frame(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reassemble(messages: Fragments) -> (usize, String) {
        let mut count = 0;
        let mut text = Vec::new();
        for message in messages {
            count += 1;
            match message {
                Message::Text(t) => text.extend_from_slice(t.as_bytes()),
                Message::Frame(frame) => {
                    let payload = frame.payload().to_vec();
                    assert!(std::str::from_utf8(&payload).is_ok(), "fragment {count} splits a character");
                    text.extend(payload);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (count, String::from_utf8(text).unwrap())
    }

    #[test]
    fn small_frames_go_whole() {
        let frame = Utf8Bytes::from("{\"type\":\"pong\"}");
        let mut messages = fragments(&frame);
        assert!(matches!(messages.next(), Some(Message::Text(t)) if t == frame));
        assert!(messages.next().is_none());
    }

    #[test]
    fn large_frames_are_cut_between_characters_and_reassemble() {
        let text: String = (0..100_000).map(|i| if i % 3 == 0 { 'é' } else { 'x' }).collect();
        let frame = Utf8Bytes::from(text.clone());
        let (count, back) = reassemble(fragments(&frame));
        assert_eq!(back, text);
        assert!(count >= text.len() / FRAGMENT_SIZE, "{count} fragments");
        let mut messages = fragments(&frame);
        let first = messages.next().unwrap();
        let Message::Frame(first) = first else { panic!("a fragment") };
        assert!(!first.header().is_final);
        assert_eq!(first.header().opcode, OpCode::Data(Data::Text));
        let last = messages.last().unwrap();
        let Message::Frame(last) = last else { panic!("a fragment") };
        assert!(last.header().is_final);
        assert_eq!(last.header().opcode, OpCode::Data(Data::Continue));
    }
}

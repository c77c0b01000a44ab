//! The events and their wire JSON.
//!
//! An event is built once, where it enters (the listener or a replay from
//! the event log), with its message already serialized: every recipient
//! shares the same bytes.

use std::time::Instant;

use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

/// The event types (docs/protocol.md). A new type starts here and in the trigger
/// that emits it (`sql/`); routing keys on [`crate::ws::protocol::Topic::of_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    StatusChanged,
    LogsUpdate,
    Progress,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::StatusChanged => "DEPLOYMENT_STATUS_CHANGED",
            EventKind::LogsUpdate => "DEPLOYMENT_LOGS_UPDATE",
            EventKind::Progress => "DEPLOYMENT_PROGRESS",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "DEPLOYMENT_STATUS_CHANGED" => Some(EventKind::StatusChanged),
            "DEPLOYMENT_LOGS_UPDATE" => Some(EventKind::LogsUpdate),
            "DEPLOYMENT_PROGRESS" => Some(EventKind::Progress),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct Event {
    /// The event log id; clients resume with it (`since`).
    pub id: i64,
    pub kind: EventKind,
    pub deployment_id: Uuid,
    /// The deployment's owner and organization when the event happened.
    pub owner: Uuid,
    pub organization_id: Option<Uuid>,
    /// `{"type":…,"event_id":…,"data":…}`, serialized once.
    pub frame: Utf8Bytes,
    /// When this process first had the event, for the delivery latency metric.
    pub received_at: Instant,
    /// Its place in this process's commit order (set by the hub; 0 for an
    /// event read back from the log for a replay).
    pub seq: u64,
}

impl Event {
    /// `data` is the JSON object exactly as the trigger stored it.
    pub fn new(
        id: i64,
        kind: EventKind,
        deployment_id: Uuid,
        owner: Uuid,
        organization_id: Option<Uuid>,
        data: &str,
    ) -> Event {
        let kind_name = kind.as_str();
        let mut frame = String::with_capacity(data.len() + kind_name.len() + 48);
        frame.push_str(r#"{"type":""#);
        frame.push_str(kind_name);
        frame.push_str(r#"","event_id":"#);
        frame.push_str(&id.to_string());
        frame.push_str(r#","data":"#);
        push_compact(&mut frame, data);
        frame.push('}');
        Event {
            id,
            kind,
            deployment_id,
            owner,
            organization_id,
            frame: Utf8Bytes::from(frame),
            received_at: Instant::now(),
            seq: 0,
        }
    }
}

/// Append JSON text without the whitespace between tokens: PostgreSQL's
/// `json_build_object` writes `{"a" : 1, "b" : 2}`. Strings are copied
/// untouched; this runs once per event, not per recipient.
fn push_compact(out: &mut String, json: &str) {
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0;
    for (i, byte) in json.bytes().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if byte == b'"' {
            in_string = true;
        } else if matches!(byte, b' ' | b'\n' | b'\r' | b'\t') {
            out.push_str(&json[start..i]);
            start = i + 1;
        }
    }
    out.push_str(&json[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_wraps_data_with_type_and_id() {
        let event = Event::new(42, EventKind::Progress, Uuid::nil(), Uuid::nil(), None, r#"{"progress" : 75}"#);
        let value: serde_json::Value = serde_json::from_str(event.frame.as_str()).unwrap();
        assert_eq!(value["type"], "DEPLOYMENT_PROGRESS");
        assert_eq!(value["event_id"], 42);
        assert_eq!(value["data"]["progress"], 75);
    }

    #[test]
    fn whitespace_between_tokens_is_dropped_but_strings_are_kept() {
        let mut out = String::new();
        push_compact(&mut out, "{\"logs\" : \"a b \\\" c\\\\\", \"n\" : [1, 2],\n \"x\" : null}");
        assert_eq!(out, r#"{"logs":"a b \" c\\","n":[1,2],"x":null}"#);
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["logs"], "a b \" c\\");
    }
}

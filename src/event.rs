//! The events, their topics and their wire JSON.
//!
//! Everything the code knows about an event type is one row of
//! `EventKind::row`: its wire name, and the per-deployment topic that
//! carries it alone (if any). An event is built once, where it enters (the
//! listener or a replay from the event log), with its message already
//! serialized: every recipient shares the same bytes.

use std::fmt;
use std::time::Instant;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

/// The event types (docs/events.md). Adding one: a migration whose trigger
/// emits it, a variant here, its row in `EventKind::row` and its place in
/// [`EventKind::ALL`] (see lib.rs, "Adding an event type").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    StatusChanged,
    LogsUpdate,
    Progress,
}

impl EventKind {
    /// Every type, in declaration order (checked at compile time below; a
    /// test checks it against the types the triggers emit).
    pub const ALL: [EventKind; 3] = [EventKind::StatusChanged, EventKind::LogsUpdate, EventKind::Progress];

    /// The table: (wire name, prefix of the per-deployment topic that
    /// carries this type alone). Every type is on `deployment_events`.
    const fn row(self) -> (&'static str, Option<&'static str>) {
        match self {
            EventKind::StatusChanged => ("DEPLOYMENT_STATUS_CHANGED", Some("deployment_status_")),
            EventKind::LogsUpdate => ("DEPLOYMENT_LOGS_UPDATE", Some("deployment_logs_")),
            EventKind::Progress => ("DEPLOYMENT_PROGRESS", Some("deployment_progress_")),
        }
    }

    /// The wire name: the message's `type`, and the event log's `type` column.
    pub const fn as_str(self) -> &'static str {
        self.row().0
    }

    const fn topic_prefix(self) -> Option<&'static str> {
        self.row().1
    }

    pub fn parse(name: &str) -> Option<Self> {
        EventKind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

const _: () = {
    let mut i = 0;
    while i < EventKind::ALL.len() {
        assert!(EventKind::ALL[i] as usize == i, "EventKind::ALL lists every type once, in declaration order");
        i += 1;
    }
};

/// A topic a connection may subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Every event, of every deployment the viewer may see.
    DeploymentEvents,
    /// The events of one type for one deployment (`deployment_status_{id}`,
    /// `deployment_logs_{id}`, `deployment_progress_{id}`): only types with
    /// a topic prefix.
    Deployment { kind: EventKind, deployment: Uuid },
}

impl Topic {
    /// Parses a topic name. The deployment id must be a hyphenated UUID, in
    /// any case; anything else is not a topic.
    pub fn parse(name: &str) -> Option<Topic> {
        if name == "deployment_events" {
            return Some(Topic::DeploymentEvents);
        }
        EventKind::ALL.into_iter().find_map(|kind| {
            let id = name.strip_prefix(kind.topic_prefix()?)?;
            let bytes = id.as_bytes();
            let hyphenated = id.len() == 36 && [8, 13, 18, 23].iter().all(|&i| bytes[i] == b'-');
            let deployment = Uuid::parse_str(id).ok().filter(|_| hyphenated)?;
            Some(Topic::Deployment { kind, deployment })
        })
    }

    /// Every form of a topic name, for the errors that refuse one:
    /// `deployment_events, deployment_logs_<deployment UUID> or …`.
    pub fn forms() -> String {
        let mut forms = vec!["deployment_events".to_string()];
        forms.extend(
            EventKind::ALL
                .into_iter()
                .filter_map(EventKind::topic_prefix)
                .map(|prefix| format!("{prefix}<deployment UUID>")),
        );
        let last = forms.pop().unwrap_or_default();
        if forms.is_empty() { last } else { format!("{} or {last}", forms.join(", ")) }
    }

    /// The per-deployment topic an event of `kind` belongs to, if its type has one.
    pub fn of_event(kind: EventKind, deployment: Uuid) -> Option<Topic> {
        kind.topic_prefix().map(|_| Topic::Deployment { kind, deployment })
    }

    /// The one deployment a per-deployment topic names.
    pub fn deployment(self) -> Option<Uuid> {
        match self {
            Topic::DeploymentEvents => None,
            Topic::Deployment { deployment, .. } => Some(deployment),
        }
    }

    /// The one event type a per-deployment topic carries.
    pub fn kind(self) -> Option<EventKind> {
        match self {
            Topic::DeploymentEvents => None,
            Topic::Deployment { kind, .. } => Some(kind),
        }
    }

    /// Whether an event of `kind` for `deployment` belongs to this topic
    /// (who may see it is [`crate::auth::Viewer::can_see`]'s business).
    pub fn carries(self, kind: EventKind, deployment: Uuid) -> bool {
        match self {
            Topic::DeploymentEvents => true,
            Topic::Deployment { kind: k, deployment: d } => k == kind && d == deployment,
        }
    }
}

impl fmt::Display for Topic {
    /// Replies name the topic in lowercase.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::DeploymentEvents => f.write_str("deployment_events"),
            Topic::Deployment { kind, deployment } => {
                write!(f, "{}{}", kind.topic_prefix().unwrap_or_default(), deployment.hyphenated())
            }
        }
    }
}

impl Serialize for Topic {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Topic {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Topic::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown topic `{name}`")))
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

    /// Every `windflow_record('NAME', …)` of today's schema (the function
    /// the triggers write events with), in order of appearance.
    fn emitted_by_triggers() -> Vec<String> {
        let schema = include_str!("../sql/schema.sql");
        let mut names = Vec::new();
        for call in schema.split("windflow_record('").skip(1) {
            let name = &call[..call.find('\'').unwrap()];
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        names
    }

    #[test]
    fn every_kind_has_one_row_and_the_triggers_emit_exactly_these() {
        let mut emitted = emitted_by_triggers();
        let mut known: Vec<String> = EventKind::ALL.iter().map(|k| k.as_str().to_string()).collect();
        emitted.sort();
        known.sort();
        assert_eq!(known, emitted, "EventKind::ALL and the types the triggers emit");
        let clients = include_str!("../clients/src/messages.ts");
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
            assert!(clients.contains(&format!("'{}'", kind.as_str())), "clients/src/messages.ts lacks {kind:?}");
            let deployment = Uuid::new_v4();
            assert!(Topic::DeploymentEvents.carries(kind, deployment));
            if let Some(topic) = Topic::of_event(kind, deployment) {
                assert_eq!(Topic::parse(&topic.to_string()), Some(topic), "{kind:?}'s topic round-trips");
                assert_eq!((topic.kind(), topic.deployment()), (Some(kind), Some(deployment)));
                assert!(topic.carries(kind, deployment));
                assert!(!topic.carries(kind, Uuid::new_v4()));
                for other in EventKind::ALL.into_iter().filter(|&other| other != kind) {
                    assert!(!topic.carries(other, deployment), "{topic} carries {kind:?} alone");
                }
            }
        }
    }

    #[test]
    fn topics_parse_in_any_uuid_case_and_print_lowercase() {
        let id = Uuid::new_v4();
        let upper = format!("deployment_logs_{}", id.hyphenated().to_string().to_uppercase());
        let topic = Topic::parse(&upper).unwrap();
        assert_eq!(topic, Topic::Deployment { kind: EventKind::LogsUpdate, deployment: id });
        assert_eq!(topic.to_string(), format!("deployment_logs_{id}"));
        assert_eq!(
            Topic::parse(&format!("deployment_progress_{id}")),
            Some(Topic::Deployment { kind: EventKind::Progress, deployment: id })
        );
        assert_eq!(
            Topic::parse(&format!("deployment_status_{id}")),
            Some(Topic::Deployment { kind: EventKind::StatusChanged, deployment: id })
        );
        assert_eq!(Topic::parse("deployment_events"), Some(Topic::DeploymentEvents));
    }

    #[test]
    fn malformed_topics_are_refused() {
        let id = Uuid::new_v4();
        for name in [
            String::new(),
            "deployment_events_".into(),
            "DEPLOYMENT_EVENTS".into(),
            format!("deployment_logs_{}", id.simple()),
            format!("deployment_logs_{{{id}}}"),
            format!("deployment_status_{}", id.simple()),
            format!("deployment_statuses_{id}"),
            format!("deployment_logs_{id}x"),
            "deployment_logs_".into(),
            "deployment_logs_zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz".into(),
            "deployment_progress_ü".into(),
        ] {
            assert_eq!(Topic::parse(&name), None, "{name:?}");
        }
    }

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

//! Client and server messages (docs/protocol.md), and topic names.

use std::fmt;
use std::time::SystemTime;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::AuthError;
use crate::event::EventKind;

/// A topic a connection may subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// All three event types, for every deployment the user may see.
    DeploymentEvents,
    /// `DEPLOYMENT_LOGS_UPDATE` of one deployment.
    Logs(Uuid),
    /// `DEPLOYMENT_PROGRESS` of one deployment.
    Progress(Uuid),
}

const LOGS_PREFIX: &str = "deployment_logs_";
const PROGRESS_PREFIX: &str = "deployment_progress_";

impl Topic {
    /// Parses a topic name. The deployment id must be a hyphenated UUID, in
    /// any case; anything else is not a topic.
    pub fn parse(name: &str) -> Option<Topic> {
        if name == "deployment_events" {
            return Some(Topic::DeploymentEvents);
        }
        let hyphenated = |id: &str| {
            let bytes = id.as_bytes();
            id.len() == 36 && [8, 13, 18, 23].iter().all(|&i| bytes[i] == b'-')
        };
        let id = |rest: &str| hyphenated(rest).then(|| Uuid::parse_str(rest).ok()).flatten();
        if let Some(rest) = name.strip_prefix(LOGS_PREFIX) {
            return id(rest).map(Topic::Logs);
        }
        if let Some(rest) = name.strip_prefix(PROGRESS_PREFIX) {
            return id(rest).map(Topic::Progress);
        }
        None
    }

    /// The one deployment a per-deployment topic names.
    pub fn deployment(self) -> Option<Uuid> {
        match self {
            Topic::DeploymentEvents => None,
            Topic::Logs(id) | Topic::Progress(id) => Some(id),
        }
    }

    /// The one event type a per-deployment topic carries.
    pub fn kind(self) -> Option<EventKind> {
        match self {
            Topic::DeploymentEvents => None,
            Topic::Logs(_) => Some(EventKind::LogsUpdate),
            Topic::Progress(_) => Some(EventKind::Progress),
        }
    }

    /// The per-deployment topic an event belongs to, if any.
    pub fn of_event(kind: EventKind, deployment_id: Uuid) -> Option<Topic> {
        match kind {
            EventKind::LogsUpdate => Some(Topic::Logs(deployment_id)),
            EventKind::Progress => Some(Topic::Progress(deployment_id)),
            EventKind::StatusChanged => None,
        }
    }

    /// Whether an event of `kind` for `deployment_id` belongs to this topic
    /// (visibility is checked separately).
    pub fn carries(self, kind: EventKind, deployment_id: Uuid) -> bool {
        match self {
            Topic::DeploymentEvents => true,
            Topic::Logs(id) => kind == EventKind::LogsUpdate && id == deployment_id,
            Topic::Progress(id) => kind == EventKind::Progress && id == deployment_id,
        }
    }
}

impl fmt::Display for Topic {
    /// Replies name the topic in lowercase.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::DeploymentEvents => f.write_str("deployment_events"),
            Topic::Logs(id) => write!(f, "{LOGS_PREFIX}{}", id.hyphenated()),
            Topic::Progress(id) => write!(f, "{PROGRESS_PREFIX}{}", id.hyphenated()),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage {
    Auth {
        token: String,
    },
    /// `topic` is the name as sent; it is parsed by the session so that an
    /// invalid topic gets `invalid_topic` rather than `bad_request`.
    Subscribe {
        topic: String,
        since: Option<i64>,
    },
    Unsubscribe {
        topic: String,
    },
    Ping,
}

/// Why a text frame is not a client message; answered with `bad_request`.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl ClientMessage {
    pub fn parse(text: &str) -> Result<ClientMessage, BadRequest> {
        if text.trim() == "ping" {
            return Ok(ClientMessage::Ping);
        }
        let value: Value = serde_json::from_str(text).map_err(|e| BadRequest(format!("not JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| BadRequest("a message is a JSON object".into()))?;
        let string_field = |name: &str| -> Result<String, BadRequest> {
            match object.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(BadRequest(format!("field `{name}` must be a string"))),
                None => Err(BadRequest(format!("missing field `{name}`"))),
            }
        };
        match object.get("type") {
            Some(Value::String(kind)) => match kind.as_str() {
                "auth" => Ok(ClientMessage::Auth { token: string_field("token")? }),
                "subscribe" => {
                    let since = match object.get("since") {
                        None | Some(Value::Null) => None,
                        Some(v) => match v.as_i64() {
                            Some(n) if n >= 0 => Some(n),
                            _ => {
                                return Err(BadRequest("field `since` must be a non-negative integer event id".into()));
                            }
                        },
                    };
                    Ok(ClientMessage::Subscribe { topic: string_field("topic")?, since })
                }
                "unsubscribe" => Ok(ClientMessage::Unsubscribe { topic: string_field("topic")? }),
                "ping" => Ok(ClientMessage::Ping),
                other => Err(BadRequest(format!("unknown message type `{}`", truncate(other, 64)))),
            },
            Some(_) => Err(BadRequest("field `type` must be a string".into())),
            None => Err(BadRequest("missing field `type`".into())),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The error codes of docs/protocol.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    InvalidTopic,
    Forbidden,
    TooManySubscriptions,
    TokenExpired,
    /// The database could not answer a permission check; try again.
    Unavailable,
}

impl ErrorCode {
    /// The code a refused token gets, in-band or on the upgrade.
    pub fn for_auth(error: &AuthError) -> ErrorCode {
        match error {
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::Invalid(_) => ErrorCode::Unauthorized,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// RFC 3339 in UTC, ending in `Z`.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

pub fn error(code: ErrorCode, message: &str, topic: Option<&str>) -> String {
    let mut data = json!({"code": code.as_str(), "message": message});
    if let Some(topic) = topic {
        data["topic"] = json!(topic);
    }
    json!({"type": "error", "data": data}).to_string()
}

pub fn authenticated(user_id: Uuid, expires_at: SystemTime) -> String {
    json!({"type": "authenticated", "data": {"user_id": user_id, "expires_at": humantime::format_rfc3339(expires_at).to_string()}})
        .to_string()
}

/// `subscribed`, with the subscription's resume cursor.
pub fn subscribed(topic: Topic, cursor: i64) -> String {
    json!({"type": "subscribed", "data": {"topic": topic.to_string(), "event_id": cursor}}).to_string()
}

pub fn topic_reply(kind: &str, topic: Topic) -> String {
    json!({"type": kind, "data": {"topic": topic.to_string()}}).to_string()
}

pub fn pong() -> String {
    json!({"type": "pong", "data": {"timestamp": rfc3339(SystemTime::now())}}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse_in_any_uuid_case_and_print_lowercase() {
        let id = Uuid::new_v4();
        let upper = format!("deployment_logs_{}", id.hyphenated().to_string().to_uppercase());
        let topic = Topic::parse(&upper).unwrap();
        assert_eq!(topic, Topic::Logs(id));
        assert_eq!(topic.to_string(), format!("deployment_logs_{id}"));
        assert_eq!(Topic::parse(&format!("deployment_progress_{id}")), Some(Topic::Progress(id)));
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
            format!("deployment_status_{id}"),
            format!("deployment_logs_{id}x"),
            "deployment_logs_".into(),
            "deployment_logs_zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz".into(),
            "deployment_progress_ü".into(),
        ] {
            assert_eq!(Topic::parse(&name), None, "{name:?}");
        }
    }

    #[test]
    fn topic_carries_only_its_kind_and_deployment() {
        let id = Uuid::new_v4();
        assert!(Topic::Logs(id).carries(EventKind::LogsUpdate, id));
        assert!(!Topic::Logs(id).carries(EventKind::Progress, id));
        assert!(!Topic::Logs(id).carries(EventKind::LogsUpdate, Uuid::new_v4()));
        assert!(Topic::Progress(id).carries(EventKind::Progress, id));
        assert!(Topic::DeploymentEvents.carries(EventKind::StatusChanged, id));
        for kind in [EventKind::StatusChanged, EventKind::LogsUpdate, EventKind::Progress] {
            let topic = Topic::of_event(kind, id);
            assert_eq!(topic.and_then(Topic::kind), if kind == EventKind::StatusChanged { None } else { Some(kind) });
            assert!(topic.is_none_or(|t| t.carries(kind, id)));
        }
    }

    #[test]
    fn client_messages_parse() {
        assert_eq!(ClientMessage::parse("ping"), Ok(ClientMessage::Ping));
        assert_eq!(ClientMessage::parse(r#"{"type":"ping"}"#), Ok(ClientMessage::Ping));
        assert_eq!(
            ClientMessage::parse(r#"{"type":"subscribe","topic":"t","since":5}"#),
            Ok(ClientMessage::Subscribe { topic: "t".into(), since: Some(5) })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"auth","token":"x"}"#),
            Ok(ClientMessage::Auth { token: "x".into() })
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases = [
            ("not json", "not JSON"),
            ("[1]", "JSON object"),
            (r#"{"topic":"t"}"#, "missing field `type`"),
            (r#"{"type":7}"#, "`type` must be a string"),
            (r#"{"type":"dance"}"#, "unknown message type `dance`"),
            (r#"{"type":"subscribe"}"#, "missing field `topic`"),
            (r#"{"type":"subscribe","topic":1}"#, "`topic` must be a string"),
            (r#"{"type":"subscribe","topic":"t","since":-1}"#, "`since`"),
            (r#"{"type":"subscribe","topic":"t","since":"5"}"#, "`since`"),
            (r#"{"type":"auth"}"#, "missing field `token`"),
        ];
        for (input, expected) in cases {
            let BadRequest(message) = ClientMessage::parse(input).unwrap_err();
            assert!(message.contains(expected), "{input}: {message}");
        }
    }

    #[test]
    fn times_end_in_z() {
        assert!(rfc3339(SystemTime::now()).ends_with('Z'));
        let reply: Value = serde_json::from_str(&authenticated(Uuid::nil(), SystemTime::UNIX_EPOCH)).unwrap();
        assert_eq!(reply["data"]["expires_at"], "1970-01-01T00:00:00Z");
    }
}

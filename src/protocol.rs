//! The messages of docs/protocol.md, as serde enums: the server parses
//! [`ClientMessage`] and writes [`ServerMessage`] (over WebSocket, or as
//! Server-Sent Events); `tail` does the reverse.
//! Events are not here: their frames are written once, by [`crate::event`].

use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use crate::auth::AuthError;
use crate::event::Topic;

/// What a client sends. A bare `ping` text is a [`ClientMessage::Ping`] too.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// `topics` and `since`: a resume at connect (the first `auth` only).
    Auth {
        #[serde(deserialize_with = "token")]
        token: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "topics")]
        topics: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "event_id")]
        since: Option<i64>,
    },
    /// `topic` is the name as sent; the session parses it, so that an
    /// invalid topic gets `invalid_topic` rather than `bad_request`.
    Subscribe {
        #[serde(deserialize_with = "topic")]
        topic: String,
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "event_id")]
        since: Option<i64>,
    },
    Unsubscribe {
        #[serde(deserialize_with = "topic")]
        topic: String,
    },
    Ping,
}

/// Why a text frame is not a client message; answered with `bad_request`.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest(pub String);

/// Bad requests echo at most this much of what they quote.
const MAX_REASON: usize = 200;

impl ClientMessage {
    pub fn parse(text: &str) -> Result<ClientMessage, BadRequest> {
        if text.trim() == "ping" {
            return Ok(ClientMessage::Ping);
        }
        serde_json::from_str(text).map_err(|e| {
            let reason = if e.is_syntax() || e.is_eof() {
                format!("not JSON: {e}")
            } else if !text.trim_start().starts_with('{') {
                "a message is a JSON object".to_string()
            } else {
                e.to_string()
            };
            BadRequest(truncate(&reason, MAX_REASON).to_string())
        })
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a client message always serializes")
    }
}

/// A string field; anything else is refused naming the field.
fn string_field<'de, D: Deserializer<'de>>(deserializer: D, name: &str) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::String(value) => Ok(value),
        _ => Err(serde::de::Error::custom(format!("field `{name}` must be a string"))),
    }
}

fn topic<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    string_field(deserializer, "topic")
}

/// `topics`: absent, null, or an array of strings.
fn topics<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let refused = || serde::de::Error::custom("field `topics` must be an array of topic names");
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(names)) => names
            .into_iter()
            .map(|name| match name {
                serde_json::Value::String(name) => Ok(name),
                _ => Err(refused()),
            })
            .collect(),
        Some(_) => Err(refused()),
    }
}

fn token<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    string_field(deserializer, "token")
}

/// `since`: absent, null, or a non-negative event id.
fn event_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => match value.as_i64() {
            Some(id) if id >= 0 => Ok(Some(id)),
            _ => Err(serde::de::Error::custom("field `since` must be a non-negative integer event id")),
        },
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// What the server sends besides events: `{"type": …, "data": {…}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum ServerMessage {
    Authenticated {
        user_id: Uuid,
        /// RFC 3339, UTC.
        expires_at: String,
    },
    Subscribed {
        topic: Topic,
        /// The subscription's resume cursor.
        #[serde(default)]
        event_id: Option<i64>,
    },
    Unsubscribed {
        topic: Topic,
    },
    /// Events after the `since` of this topic's subscribe may be gone.
    Resync {
        topic: Topic,
    },
    Pong {
        timestamp: String,
    },
    Error {
        code: ErrorCode,
        message: String,
        /// The topic as the request named it, when the error is about one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
    },
}

impl ServerMessage {
    pub fn error(code: ErrorCode, message: impl Into<String>, topic: Option<&str>) -> ServerMessage {
        ServerMessage::Error { code, message: message.into(), topic: topic.map(str::to_string) }
    }

    pub fn authenticated(user_id: Uuid, expires_at: SystemTime) -> ServerMessage {
        ServerMessage::Authenticated { user_id, expires_at: humantime::format_rfc3339(expires_at).to_string() }
    }

    pub fn pong() -> ServerMessage {
        ServerMessage::Pong { timestamp: rfc3339(SystemTime::now()) }
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a server message always serializes")
    }
}

/// The error codes of docs/protocol.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    InvalidTopic,
    Forbidden,
    TooManySubscriptions,
    TokenExpired,
    /// The database could not answer a permission check or a replay; try again.
    Unavailable,
    /// The user holds `WINDFLOW_MAX_CONNECTIONS_PER_USER` connections already.
    TooManyConnections,
    /// A code this build does not know (a newer server's), for `tail`.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code a refused token gets, in-band or on the upgrade.
    pub fn for_auth(error: &AuthError) -> ErrorCode {
        match error {
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::Invalid(_) => ErrorCode::Unauthorized,
        }
    }
}

/// RFC 3339 in UTC, ending in `Z`.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::event::EventKind;

    #[test]
    fn client_messages_parse() {
        assert_eq!(ClientMessage::parse("ping"), Ok(ClientMessage::Ping));
        assert_eq!(ClientMessage::parse(r#"{"type":"ping"}"#), Ok(ClientMessage::Ping));
        assert_eq!(
            ClientMessage::parse(r#"{"type":"subscribe","topic":"t","since":5}"#),
            Ok(ClientMessage::Subscribe { topic: "t".into(), since: Some(5) })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"subscribe","topic":"t","since":null}"#),
            Ok(ClientMessage::Subscribe { topic: "t".into(), since: None })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"auth","token":"x"}"#),
            Ok(ClientMessage::Auth { token: "x".into(), topics: Vec::new(), since: None })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"auth","token":"x","topics":["a","b"],"since":9}"#),
            Ok(ClientMessage::Auth { token: "x".into(), topics: vec!["a".into(), "b".into()], since: Some(9) })
        );
        let subscribe = ClientMessage::Subscribe { topic: "deployment_events".into(), since: Some(3) };
        assert_eq!(ClientMessage::parse(&subscribe.to_text()), Ok(subscribe));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let long = "x".repeat(10_000);
        let cases = [
            ("not json", "not JSON"),
            ("[1]", "JSON object"),
            (r#"{"topic":"t"}"#, "missing field `type`"),
            (r#"{"type":7}"#, "invalid type"),
            (r#"{"type":"dance"}"#, "unknown variant `dance`"),
            (r#"{"type":"subscribe"}"#, "missing field `topic`"),
            (r#"{"type":"subscribe","topic":1}"#, "field `topic` must be a string"),
            (r#"{"type":"unsubscribe","topic":null}"#, "field `topic` must be a string"),
            (r#"{"type":"auth","token":["x"]}"#, "field `token` must be a string"),
            (r#"{"type":"subscribe","topic":"t","since":-1}"#, "`since`"),
            (r#"{"type":"subscribe","topic":"t","since":"5"}"#, "`since`"),
            (r#"{"type":"auth"}"#, "missing field `token`"),
            (r#"{"type":"auth","token":"x","topics":"a"}"#, "`topics`"),
            (r#"{"type":"auth","token":"x","topics":[1]}"#, "`topics`"),
            (r#"{"type":"auth","token":"x","since":-3}"#, "`since`"),
            (r#"{"type":"auth","token":"x","since":"abc"}"#, "`since`"),
        ];
        for (input, expected) in cases {
            let BadRequest(message) = ClientMessage::parse(input).unwrap_err();
            assert!(message.contains(expected), "{input}: {message}");
        }
        let BadRequest(message) = ClientMessage::parse(&format!(r#"{{"type":"{long}"}}"#)).unwrap_err();
        assert!(message.len() <= MAX_REASON * 4, "a long type is not echoed whole");
    }

    #[test]
    fn server_messages_have_type_and_data() {
        let topic = Topic::Deployment { kind: EventKind::Progress, deployment: Uuid::nil() };
        let subscribed = ServerMessage::Subscribed { topic, event_id: Some(7) };
        let value: Value = serde_json::from_str(&subscribed.to_text()).unwrap();
        assert_eq!(
            value,
            json!({"type": "subscribed", "data": {"topic": format!("deployment_progress_{}", Uuid::nil()), "event_id": 7}})
        );
        assert_eq!(serde_json::from_value::<ServerMessage>(value).unwrap(), subscribed);
        let error = ServerMessage::error(ErrorCode::TooManySubscriptions, "at most 256", None).to_text();
        assert_eq!(error, r#"{"type":"error","data":{"code":"too_many_subscriptions","message":"at most 256"}}"#);
        let unknown: ServerMessage =
            serde_json::from_str(r#"{"type":"error","data":{"code":"brand_new","message":"m"}}"#).unwrap();
        assert!(matches!(unknown, ServerMessage::Error { code: ErrorCode::Unknown, .. }));
    }

    #[test]
    fn times_end_in_z() {
        assert!(rfc3339(SystemTime::now()).ends_with('Z'));
        let reply = ServerMessage::authenticated(Uuid::nil(), SystemTime::UNIX_EPOCH).to_text();
        let reply: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["data"]["expires_at"], "1970-01-01T00:00:00Z");
    }
}

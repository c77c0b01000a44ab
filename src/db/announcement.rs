//! The NOTIFY payloads the triggers send on `windflow_events`, and how the
//! listener tells them from forgeries.
//!
//! Any database login may `NOTIFY windflow_events`. Each payload the
//! triggers send is signed with HMAC-SHA256 under a key in
//! `windflow_notify_key`, which only the owner of the event log can read
//! (`sql/V3__signed_events_and_deployment_locks.sql`): the payload is
//! `{"sig":"<64 hex>",` followed by the signed JSON object without its
//! opening brace. A payload whose signature does not match is not an
//! event: it can neither inject one nor, by claiming a real event's id,
//! make the hub drop the real one as a duplicate.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use tokio_postgres::Client;
use uuid::Uuid;

use super::DbError;

/// A verified payload, as `windflow_emit` writes it. `data` is absent when
/// the event did not fit in NOTIFY's 8000 bytes.
#[derive(Debug, Deserialize)]
pub struct Announcement<'a> {
    pub event_id: i64,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub deployment_id: Uuid,
    pub user_id: Uuid,
    pub organization_id: Option<Uuid>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// Why a payload on `windflow_events` is not an event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Forged {
    #[error("no signature")]
    Unsigned,
    #[error("the signature does not match")]
    BadSignature,
    #[error("signed, but not an event: {0}")]
    Malformed(String),
}

const PREFIX: &str = r#"{"sig":""#;
const SIG_HEX: usize = 64;

/// The key the triggers sign with.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    pub fn new(secret: Vec<u8>) -> Self {
        SigningKey(secret)
    }

    /// Read the key; the server's role must own the event log (it ran the
    /// migrations) or have been granted SELECT on `windflow_notify_key`.
    pub async fn load(client: &Client) -> Result<SigningKey, DbError> {
        let row = client.query_one("SELECT secret FROM windflow_notify_key", &[]).await.map_err(DbError::SigningKey)?;
        Ok(SigningKey(row.get(0)))
    }

    /// The announcement in `payload`, if the triggers signed it.
    pub fn verify<'a>(&self, payload: &'a str) -> Result<Announcement<'a>, Forged> {
        let rest = payload.strip_prefix(PREFIX).ok_or(Forged::Unsigned)?;
        let (sig, body) = match (rest.get(..SIG_HEX), rest.get(SIG_HEX..)) {
            (Some(sig), Some(body)) => (sig, body.strip_prefix("\",").ok_or(Forged::Unsigned)?),
            _ => return Err(Forged::Unsigned),
        };
        let mut expected = [0u8; 32];
        decode_hex(sig, &mut expected).ok_or(Forged::BadSignature)?;
        let mut mac = self.mac();
        mac.update(b"{");
        mac.update(body.as_bytes());
        mac.verify_slice(&expected).map_err(|_| Forged::BadSignature)?;
        // The signed object is `{` + body; the payload around it only adds
        // the `sig` field, which the announcement ignores.
        serde_json::from_str(payload).map_err(|e| Forged::Malformed(e.to_string()))
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|e| unreachable!("HMAC key: {e}"))
    }

    /// Sign `body` as `windflow_emit` does (for tests).
    pub fn sign(&self, body: &str) -> String {
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let sig: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        format!("{PREFIX}{sig}\",{}", body.strip_prefix('{').unwrap_or(body))
    }
}

fn decode_hex(hex: &str, out: &mut [u8; 32]) -> Option<()> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
        *out.get_mut(i)? = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> String {
        format!(
            r#"{{"event_id" : 7, "type" : "DEPLOYMENT_LOGS_UPDATE", "deployment_id" : "{}", "user_id" : "{}", "organization_id" : null}}"#,
            Uuid::new_v4(),
            Uuid::new_v4()
        )
    }

    #[test]
    fn a_signed_announcement_without_data_verifies() {
        let key = SigningKey::new(b"k".repeat(32));
        let payload = key.sign(&body());
        let announcement = key.verify(&payload).unwrap();
        assert_eq!(announcement.event_id, 7);
        assert_eq!(announcement.kind, "DEPLOYMENT_LOGS_UPDATE");
        assert!(announcement.data.is_none());
    }

    #[test]
    fn unsigned_tampered_or_foreign_payloads_are_refused() {
        let key = SigningKey::new(b"k".repeat(32));
        let body = body();
        assert_eq!(key.verify(&body).unwrap_err(), Forged::Unsigned);
        assert_eq!(key.verify("hello").unwrap_err(), Forged::Unsigned);
        assert_eq!(key.verify(r#"{"sig":"ab","#).unwrap_err(), Forged::Unsigned);
        let tampered = key.sign(&body).replace("\"event_id\" : 7", "\"event_id\" : 8");
        assert_eq!(key.verify(&tampered).unwrap_err(), Forged::BadSignature);
        let other = SigningKey::new(b"x".repeat(32)).sign(&body);
        assert_eq!(key.verify(&other).unwrap_err(), Forged::BadSignature);
        let not_hex = format!("{PREFIX}{}\",{}", "z".repeat(64), &body[1..]);
        assert_eq!(key.verify(&not_hex).unwrap_err(), Forged::BadSignature);
        assert!(matches!(key.verify(&key.sign("{\"a\":1}")), Err(Forged::Malformed(_))));
    }
}

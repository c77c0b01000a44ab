//! What a request must pass before a session starts, on either transport:
//! a valid token when it carries one, the server's connection limit and
//! the user's. Refusals are answered in HTTP with a JSON body.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use hyper::{Request, StatusCode, header};
use tracing::warn;
use uuid::Uuid;

use super::Endpoint;
use crate::auth::Claims;
use crate::hub::ConnId;
use crate::metrics::Metrics;
use crate::protocol::ErrorCode;

/// A request refused before a session starts: answered in HTTP, as
/// `{"code": …, "message": …}`.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal { status, code, message: message.into() }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code, "message": self.message})
    }
}

/// A request let through: its connection is counted until this is dropped.
#[derive(Debug)]
pub struct Admitted {
    pub conn: ConnId,
    /// Its token, when it came with one.
    pub claims: Option<Claims>,
    pub slot: ConnectionSlot,
    /// Counted against its user (with a token).
    pub user: Option<UserSlot>,
}

impl Endpoint {
    /// Check the token the request carries (if any) and the connection
    /// limits. `token_required`: a request without a token is refused too
    /// (a stream cannot authenticate later).
    pub fn admit<B>(
        &self,
        request: &Request<B>,
        remote: SocketAddr,
        token_required: bool,
    ) -> Result<Admitted, Refusal> {
        let unauthorized = |why: String| {
            warn!(%remote, reason = %why, path = request.uri().path(), "refused: 401");
            Refusal::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, why)
        };
        let claims = match token_of(request) {
            None if token_required => {
                return Err(unauthorized("no token: send Authorization: Bearer <token> or ?token=<token>".into()));
            }
            None => None,
            Some(Err(why)) => return Err(unauthorized(why.into())),
            Some(Ok(token)) => match self.verifier.verify(&token) {
                Ok(claims) => Some(claims),
                Err(e) => {
                    warn!(%remote, reason = %e, path = request.uri().path(), "refused: 401");
                    return Err(Refusal::new(StatusCode::UNAUTHORIZED, ErrorCode::for_auth(&e), e.to_string()));
                }
            },
        };
        let Some(slot) = ConnectionSlot::acquire(&self.metrics, self.max_connections) else {
            warn!(%remote, max = self.max_connections, "refused: 503, connection limit reached");
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "too many connections; try again later",
            ));
        };
        let user = match claims {
            None => None,
            Some(claims) => match UserConnections::acquire(&self.users, claims.viewer.user_id) {
                Some(user) => Some(user),
                None => {
                    let max = self.users.max;
                    warn!(%remote, user_id = %claims.viewer.user_id, max, "refused: 429, the user's connection limit reached");
                    return Err(Refusal::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        ErrorCode::TooManyConnections,
                        format!("this user already holds {max} connections (WINDFLOW_MAX_CONNECTIONS_PER_USER)"),
                    ));
                }
            },
        };
        Ok(Admitted { conn: self.next_conn.fetch_add(1, Relaxed), claims, slot, user })
    }
}

/// A token from `Authorization: Bearer T` or `?token=T`; `Err` when the
/// header is there but is not a bearer token. The header wins.
fn token_of<B>(request: &Request<B>) -> Option<Result<String, &'static str>> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().unwrap_or("");
        return Some(match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
                Ok(token.trim().to_string())
            }
            _ => Err("the Authorization header must be `Bearer <token>`"),
        });
    }
    query_values(request, "token").next().map(Ok)
}

/// Every value of `key` in the request's query string, in order.
pub fn query_values<'a, B>(request: &'a Request<B>, key: &'a str) -> impl Iterator<Item = String> + 'a {
    let query = request.uri().query().unwrap_or("");
    form_urlencoded::parse(query.as_bytes()).filter(move |(k, _)| k == key).map(|(_, v)| v.into_owned())
}

/// One open connection, counted in `windflow_connections` for as long as
/// this lives.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<Metrics>);

impl ConnectionSlot {
    fn acquire(metrics: &Arc<Metrics>, max: usize) -> Option<Self> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        metrics
            .connections
            .fetch_update(Relaxed, Relaxed, |open| (open < max).then_some(open + 1))
            .ok()
            .map(|_| ConnectionSlot(Arc::clone(metrics)))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

/// Open connections per user (`sub`), at most `max` each.
#[derive(Debug)]
pub struct UserConnections {
    max: usize,
    open: Mutex<HashMap<Uuid, usize>>,
}

impl UserConnections {
    pub fn new(max: usize) -> UserConnections {
        UserConnections { max, open: Mutex::new(HashMap::new()) }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Count one more connection of `user`, unless it holds `max`.
    pub fn acquire(users: &Arc<UserConnections>, user: Uuid) -> Option<UserSlot> {
        // The lock is held for a map update only; poisoning cannot leave
        // the map half-updated, so a poisoned lock is taken as it is.
        let mut open = users.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(user).or_insert(0);
        if *count >= users.max {
            if *count == 0 {
                open.remove(&user);
            }
            return None;
        }
        *count += 1;
        Some(UserSlot { users: Arc::clone(users), user })
    }
}

/// One connection of a user, counted for as long as this lives.
#[derive(Debug)]
pub struct UserSlot {
    users: Arc<UserConnections>,
    user: Uuid,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut open = self.users.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_holds_at_most_max_connections_and_frees_them() {
        let users = Arc::new(UserConnections::new(2));
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let first = UserConnections::acquire(&users, alice).expect("first");
        let second = UserConnections::acquire(&users, alice).expect("second");
        assert!(UserConnections::acquire(&users, alice).is_none(), "a third is refused");
        assert!(UserConnections::acquire(&users, bob).is_some(), "another user is not affected");
        drop(first);
        let third = UserConnections::acquire(&users, alice).expect("a freed slot is taken again");
        drop((second, third));
        assert!(users.open.lock().unwrap().is_empty(), "no entry is kept for a user without connections");
    }
}

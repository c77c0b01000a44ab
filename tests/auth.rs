//! The three ways to authenticate, each way of being refused, and
//! every supported algorithm family.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use windflow_notify::auth::{self, TokenRequest};

fn status_of(error: tungstenite::Error) -> u16 {
    match error {
        tungstenite::Error::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test]
async fn token_in_authorization_header_is_authenticated_first() {
    let app = spawn_app().await;
    let viewer = user();
    let mut request = app.server.ws_url().into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", token(viewer)).parse().unwrap());
    let mut client = Client::connect(request).await.unwrap();
    let first = client.recv().await;
    assert_eq!(first["type"], "authenticated");
    assert_eq!(first["data"]["user_id"], viewer.user_id.to_string());
    let expires_at = first["data"]["expires_at"].as_str().unwrap();
    assert!(expires_at.ends_with('Z'));
    humantime::parse_rfc3339(expires_at).unwrap();
}

#[tokio::test]
async fn token_in_url_is_authenticated_first() {
    let app = spawn_app().await;
    let viewer = user();
    let url = format!("{}?token={}", app.server.ws_url(), token(viewer));
    let mut client = Client::connect(url.into_client_request().unwrap()).await.unwrap();
    assert_eq!(client.recv_type("authenticated").await["data"]["user_id"], viewer.user_id.to_string());
    let deployment = app.writer.create_deployment(viewer.user_id, None).await;
    assert_eq!(client.recv().await["data"]["deployment_id"], deployment.to_string());
}

/// With both, the header is the token and `?token=` is ignored, as
/// docs/protocol.md says: a bad header is refused even beside a good URL token.
#[tokio::test]
async fn the_header_wins_over_a_token_in_the_url() {
    let app = spawn_app().await;
    let (by_header, by_url) = (user(), user());
    let both = |header: String| {
        let url = format!("{}?token={}", app.server.ws_url(), token(by_url));
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert("authorization", format!("Bearer {header}").parse().unwrap());
        request
    };
    let mut client = Client::connect(both(token(by_header))).await.unwrap();
    assert_eq!(client.recv_type("authenticated").await["data"]["user_id"], by_header.user_id.to_string());
    let error = Client::connect(both("not-a-jwt".into())).await.err().expect("refused");
    assert_eq!(status_of(error), 401);
}

#[tokio::test]
async fn auth_message_authenticates_and_starts_the_owner_feed() {
    let app = spawn_app().await;
    let viewer = user();
    let mut client = app.server.connect_anonymous().await;
    client.send(json!({"type": "auth", "token": token(viewer)})).await;
    assert_eq!(client.recv_type("authenticated").await["data"]["user_id"], viewer.user_id.to_string());
    let deployment = app.writer.create_deployment(viewer.user_id, None).await;
    assert_eq!(client.recv().await["data"]["deployment_id"], deployment.to_string());
}

#[tokio::test]
async fn invalid_token_in_header_gets_401_and_no_upgrade() {
    let app = spawn_app().await;
    for header in ["Bearer not-a-jwt", "Basic dXNlcjpwYXNz", &format!("Bearer {}", token(user()) + "x")] {
        let mut request = app.server.ws_url().into_client_request().unwrap();
        request.headers_mut().insert("authorization", header.parse().unwrap());
        let error = Client::connect(request).await.err().expect("refused");
        assert_eq!(status_of(error), 401, "{header}");
    }
}

#[tokio::test]
async fn invalid_or_expired_token_in_url_gets_401() {
    let app = spawn_app().await;
    let expired = auth::sign(
        &TokenRequest { viewer: user(), ttl: Duration::ZERO, audience: None, issuer: None },
        Algorithm::HS256,
        Some(SECRET),
        None,
    )
    .unwrap();
    for bad in ["garbage".to_string(), expired] {
        app.server.assert_refused_in_url(&bad).await;
    }
}

#[tokio::test]
async fn token_signed_with_another_secret_or_algorithm_is_refused() {
    let app = spawn_app().await;
    let request = TokenRequest { viewer: user(), ttl: Duration::from_secs(60), audience: None, issuer: None };
    let other_secret = auth::sign(&request, Algorithm::HS256, Some("not-the-secret"), None).unwrap();
    let other_algorithm = auth::sign(&request, Algorithm::HS512, Some(SECRET), None).unwrap();
    for bad in [other_secret, other_algorithm] {
        app.server.assert_refused_in_url(&bad).await;
    }
}

#[tokio::test]
async fn unsigned_alg_none_token_is_refused() {
    let app = spawn_app().await;
    let real = token(user());
    let claims = real.split('.').nth(1).unwrap();
    // {"alg":"none","typ":"JWT"}
    let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    app.server.assert_refused_in_url(&unsigned).await;
}

#[tokio::test]
async fn bad_token_in_auth_message_gets_error_then_1008() {
    let app = spawn_app().await;
    let mut client = app.server.connect_anonymous().await;
    client.send(json!({"type": "auth", "token": "nope"})).await;
    assert_eq!(client.recv_type("error").await["data"]["code"], "unauthorized");
    assert_eq!(client.close_code().await, 1008);
}

#[tokio::test]
async fn request_before_authentication_is_unauthorized_but_ping_works() {
    let app = spawn_app().await;
    let mut client = app.server.connect_anonymous().await;
    client.send(json!({"type": "subscribe", "topic": "deployment_events"})).await;
    let error = client.recv_type("error").await;
    assert_eq!(error["data"]["code"], "unauthorized");
    assert_eq!(error["data"]["topic"], "deployment_events");
    client.send(json!({"type": "unsubscribe", "topic": "deployment_events"})).await;
    assert_eq!(client.recv_type("error").await["data"]["code"], "unauthorized");
    client.send_text("ping").await;
    client.recv_type("pong").await;
    // Still open: authenticate now.
    client.send(json!({"type": "auth", "token": token(user())})).await;
    client.recv_type("authenticated").await;
}

#[tokio::test]
async fn silence_without_a_token_closes_with_1008_after_10_seconds() {
    let app = spawn_app().await;
    let mut client = app.server.connect_anonymous().await;
    let started = std::time::Instant::now();
    assert_eq!(client.close_code().await, 1008);
    assert!(started.elapsed() >= Duration::from_secs(9), "closed after {:?}", started.elapsed());
}

#[tokio::test]
async fn reauthentication_for_another_user_is_forbidden_and_keeps_the_first() {
    let app = spawn_app().await;
    let first = user();
    let mut client = app.server.connect_as(first).await;
    client.send(json!({"type": "auth", "token": token(user())})).await;
    assert_eq!(client.recv_type("error").await["data"]["code"], "forbidden");
    let deployment = app.writer.create_deployment(first.user_id, None).await;
    assert_eq!(client.recv().await["data"]["deployment_id"], deployment.to_string());
}

#[tokio::test]
async fn audience_and_issuer_are_enforced_when_configured() {
    let database = TestDatabase::create().await;
    let mut jwt = jwt_args();
    jwt.jwt_audience = Some("windflow".into());
    jwt.jwt_issuer = Some("windflow-api".into());
    let server = TestServer::start_with_jwt(&database, jwt, |_| {}).await;
    let viewer = user();
    let with = |audience: Option<&str>, issuer: Option<&str>| {
        let request = TokenRequest {
            viewer,
            ttl: Duration::from_secs(60),
            audience: audience.map(Into::into),
            issuer: issuer.map(Into::into),
        };
        auth::sign(&request, Algorithm::HS256, Some(SECRET), None).unwrap()
    };
    server.connect(&with(Some("windflow"), Some("windflow-api"))).await;
    for bad in
        [with(None, Some("windflow-api")), with(Some("windflow"), None), with(Some("other"), Some("windflow-api"))]
    {
        server.assert_refused_in_url(&bad).await;
    }
}

/// A token with hand-written claims, signed with the test secret.
fn raw_token(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn in_an_hour() -> u64 {
    auth::unix_now() + 3600
}

#[tokio::test]
async fn an_audience_array_is_accepted_and_checked() {
    let database = TestDatabase::create().await;
    let open = TestServer::start(&database, |_| {}).await;
    let sub = user().user_id;
    let aud = |aud: serde_json::Value| raw_token(json!({"sub": sub, "exp": in_an_hour(), "aud": aud}));
    open.connect(&aud(json!(["windflow", "billing"]))).await;
    open.connect(&aud(json!("anything"))).await;
    let mut jwt = jwt_args();
    jwt.jwt_audience = Some("windflow".into());
    let strict = TestServer::start_with_jwt(&database, jwt, |_| {}).await;
    strict.connect(&aud(json!(["billing", "windflow"]))).await;
    strict.assert_refused_in_url(&aud(json!(["billing", "other"]))).await;
    strict.assert_refused_in_url(&aud(json!([]))).await;
}

#[tokio::test]
async fn a_token_is_refused_before_its_nbf() {
    let server = spawn_app().await.server;
    let sub = user().user_id;
    let future = raw_token(json!({"sub": sub, "exp": in_an_hour(), "nbf": auth::unix_now() + 600}));
    server.assert_refused_in_url(&future).await;
    let mut client = server.connect_anonymous().await;
    client.send(json!({"type": "auth", "token": future})).await;
    assert_eq!(client.recv_type("error").await["data"]["code"], "unauthorized");
    assert_eq!(client.close_code().await, 1008);
    server.connect(&raw_token(json!({"sub": sub, "exp": in_an_hour(), "nbf": auth::unix_now() - 5}))).await;
}

fn key(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keys").join(name)
}

async fn asymmetric_round_trip(algorithm: Algorithm, private: &str, public: &str) {
    let database = TestDatabase::create().await;
    let mut jwt = jwt_args();
    jwt.jwt_algorithm = algorithm;
    jwt.jwt_secret_key = None;
    jwt.jwt_public_key_file = Some(key(public));
    let server = TestServer::start_with_jwt(&database, jwt, |_| {}).await;
    let request = TokenRequest { viewer: user(), ttl: Duration::from_secs(60), audience: None, issuer: None };
    let pem = std::fs::read(key(private)).unwrap();
    let good = auth::sign(&request, algorithm, None, Some(&pem)).unwrap();
    server.connect(&good).await;
    // An HS256 token made with the public key as the secret: the classic
    // algorithm-confusion attack.
    let public_pem = std::fs::read_to_string(key(public)).unwrap();
    let confused = auth::sign(&request, Algorithm::HS256, Some(&public_pem), None).unwrap();
    server.assert_refused_in_url(&confused).await;
}

#[tokio::test]
async fn rs256_with_public_key_file() {
    asymmetric_round_trip(Algorithm::RS256, "rsa_private.pem", "rsa_public.pem").await;
}

#[tokio::test]
async fn ps256_with_public_key_file() {
    asymmetric_round_trip(Algorithm::PS256, "rsa_private.pem", "rsa_public.pem").await;
}

#[tokio::test]
async fn es256_with_public_key_file() {
    asymmetric_round_trip(Algorithm::ES256, "ec_private.pem", "ec_public.pem").await;
}

#[tokio::test]
async fn eddsa_with_public_key_file() {
    asymmetric_round_trip(Algorithm::EdDSA, "ed_private.pem", "ed_public.pem").await;
}

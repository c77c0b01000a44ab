//! Settings: every one is an environment variable and a flag named after it
//! (`WINDFLOW_BIND` ↔ `--bind`); clap makes the flag win over the variable.
//! A wrong value fails at start with one line that names the setting.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use jsonwebtoken::Algorithm;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@localhost:5432/windflow";

#[derive(Args, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        hide_env_values = true
    )]
    pub database_url: String,
}

#[derive(Args, Clone)]
pub struct JwtArgs {
    /// Signing algorithm tokens must use (HS256, HS384, HS512, RS*, PS*, ES256, ES384, EdDSA).
    #[arg(
        long,
        env = "JWT_ALGORITHM",
        value_name = "JWT_ALGORITHM",
        default_value = "HS256",
        value_parser = parse_algorithm
    )]
    pub jwt_algorithm: Algorithm,
    /// Shared secret for HS* algorithms, used as its raw UTF-8 bytes.
    #[arg(long, env = "JWT_SECRET_KEY", value_name = "JWT_SECRET_KEY", hide_env_values = true)]
    pub jwt_secret_key: Option<String>,
    /// PEM public key for RS*, PS*, ES* and EdDSA.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE", value_name = "JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// When set, tokens must carry this `aud`.
    #[arg(long, env = "JWT_AUDIENCE", value_name = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// When set, tokens must carry this `iss`.
    #[arg(long, env = "JWT_ISSUER", value_name = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
}

impl fmt::Debug for JwtArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtArgs")
            .field("jwt_algorithm", &self.jwt_algorithm)
            .field("jwt_secret_key", &self.jwt_secret_key.as_ref().map(|_| "<redacted>"))
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_issuer", &self.jwt_issuer)
            .finish()
    }
}

/// Everything `serve` needs besides the database and the JWT keys.
#[derive(Args, Clone, Debug)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "WINDFLOW_BIND", value_name = "WINDFLOW_BIND", default_value = "127.0.0.1:8000")]
    pub bind: SocketAddr,
    /// How long events stay in the event log (humantime: `24h`, `90m`).
    #[arg(
        long,
        env = "WINDFLOW_EVENT_RETENTION",
        value_name = "WINDFLOW_EVENT_RETENTION",
        default_value = "24h",
        value_parser = parse_duration
    )]
    pub event_retention: Duration,
    /// Interval between server pings; a client silent for two intervals is dropped.
    #[arg(
        long,
        env = "WINDFLOW_PING_INTERVAL",
        value_name = "WINDFLOW_PING_INTERVAL",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub ping_interval: Duration,
    /// Upgrades beyond this many open WebSocket connections get HTTP 503.
    #[arg(
        long,
        env = "WINDFLOW_MAX_CONNECTIONS",
        value_name = "WINDFLOW_MAX_CONNECTIONS",
        default_value = "100000",
        value_parser = parse_positive
    )]
    pub max_connections: usize,
    /// Messages queued for one client before it counts as a slow consumer.
    #[arg(
        long,
        env = "WINDFLOW_CLIENT_QUEUE",
        value_name = "WINDFLOW_CLIENT_QUEUE",
        default_value = "4096",
        value_parser = parse_positive
    )]
    pub client_queue: usize,
    /// Recent events kept in commit order for `since` resumes.
    #[arg(
        long,
        env = "WINDFLOW_HISTORY_SIZE",
        value_name = "WINDFLOW_HISTORY_SIZE",
        default_value = "100000",
        value_parser = parse_positive
    )]
    pub history_size: usize,
    /// Bytes of event messages the history may hold (`64MiB`, `512KiB`,
    /// or plain bytes); the oldest events leave it first.
    #[arg(
        long,
        env = "WINDFLOW_HISTORY_BYTES",
        value_name = "WINDFLOW_HISTORY_BYTES",
        default_value = "64MiB",
        value_parser = parse_bytes
    )]
    pub history_bytes: usize,
    /// Kernel send buffer of each client connection (`128KiB`): how much a
    /// client that stops reading absorbs before its queue fills and it is
    /// closed, and how much can be in flight to a distant one.
    #[arg(
        long,
        env = "WINDFLOW_SEND_BUFFER",
        value_name = "WINDFLOW_SEND_BUFFER",
        default_value = "128KiB",
        value_parser = parse_bytes
    )]
    pub send_buffer: usize,
}

impl ServerArgs {
    /// The documented defaults (README's settings table), for tests and embedding.
    pub fn with_bind(bind: SocketAddr) -> Self {
        ServerArgs {
            bind,
            event_retention: Duration::from_secs(24 * 3600),
            ping_interval: Duration::from_secs(30),
            max_connections: 100_000,
            client_queue: 4096,
            history_size: 100_000,
            history_bytes: 64 << 20,
            send_buffer: 128 << 10,
        }
    }
}

fn parse_algorithm(value: &str) -> Result<Algorithm, String> {
    value.parse::<Algorithm>().map_err(|_| {
        "expected one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA".to_string()
    })
}

pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(value).map_err(|e| format!("{e} (expected a duration like 500ms, 30s or 24h)"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

fn parse_positive(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

/// A size in bytes: a whole number, optionally followed by KiB, MiB or GiB.
pub fn parse_bytes(value: &str) -> Result<usize, String> {
    let value = value.trim();
    let (number, shift) = [("GiB", 30), ("MiB", 20), ("KiB", 10), ("B", 0)]
        .iter()
        .find_map(|(suffix, shift)| value.strip_suffix(suffix).map(|n| (n.trim(), *shift)))
        .unwrap_or((value, 0));
    let n =
        number.parse::<usize>().map_err(|_| format!("expected a size like 64MiB, 512KiB or 1048576, not {value:?}"))?;
    match n.checked_shl(shift).filter(|bytes| bytes >> shift == n) {
        Some(0) => Err("must be at least 1 byte".into()),
        Some(bytes) => Ok(bytes),
        None => Err("too large".into()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }

    use super::*;

    #[test]
    fn durations_are_humantime_and_positive() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn counts_must_be_positive_integers() {
        assert_eq!(parse_positive("4096"), Ok(4096));
        assert!(parse_positive("0").is_err());
        assert!(parse_positive("-1").is_err());
        assert!(parse_positive("many").is_err());
    }

    #[test]
    fn algorithm_names_are_exact() {
        assert_eq!(parse_algorithm("HS256"), Ok(Algorithm::HS256));
        assert_eq!(parse_algorithm("EdDSA"), Ok(Algorithm::EdDSA));
        assert!(parse_algorithm("none").is_err());
    }
}

//! Settings: every one is an environment variable and a flag named after it
//! (`WINDFLOW_BIND` ↔ `--bind`); clap makes the flag win over the variable.
//! A wrong value fails at start with one line that names the setting.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use jsonwebtoken::Algorithm;
use tokio::net::TcpListener;
use uuid::Uuid;

/// Every setting's default, written once: clap shows and applies these,
/// [`ServerArgs::with_bind`] builds from them, and `tail` takes its
/// default URL from [`defaults::BIND`]. docs/settings.md states the same
/// values (a test holds it to them).
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::num::NonZeroUsize;

    pub const DATABASE_URL: &str = "postgres://postgres@localhost:5432/windflow";
    pub const JWT_ALGORITHM: &str = "HS256";
    pub const BIND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8000);
    // Durations and sizes are written as an operator writes them (clap
    // shows them so in --help), and parsed by the setting's own parser.
    pub const EVENT_RETENTION: &str = "24h";
    pub const PING_INTERVAL: &str = "30s";
    pub const MAX_CONNECTIONS: NonZeroUsize = NonZeroUsize::new(100_000).unwrap();
    pub const MAX_CONNECTIONS_PER_USER: NonZeroUsize = NonZeroUsize::new(100).unwrap();
    pub const CLIENT_QUEUE: NonZeroUsize = NonZeroUsize::new(4096).unwrap();
    pub const HISTORY_SIZE: NonZeroUsize = NonZeroUsize::new(100_000).unwrap();
    pub const HISTORY_BYTES: &str = "64MiB";
    pub const SEND_BUFFER: &str = "128KiB";
    /// Leaves out the NOTICEs PostgreSQL sends at every start and
    /// refinery's own account of each migration (we log each one applied).
    pub const RUST_LOG: &str = "info,tokio_postgres=warn,refinery_core=warn";
    pub const LOG_FORMAT: &str = "text";
}

#[derive(Args, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        default_value = defaults::DATABASE_URL,
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
        default_value = defaults::JWT_ALGORITHM,
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
    /// Address to listen on: HOST:PORT, with an IP address or a host name (`localhost:8000`).
    #[arg(
        long,
        env = "WINDFLOW_BIND",
        value_name = "WINDFLOW_BIND",
        default_value_t = defaults::BIND,
        value_parser = parse_bind
    )]
    pub bind: SocketAddr,
    /// How long events stay in the event log (humantime: `24h`, `90m`).
    #[arg(
        long,
        env = "WINDFLOW_EVENT_RETENTION",
        value_name = "WINDFLOW_EVENT_RETENTION",
        default_value = defaults::EVENT_RETENTION,
        value_parser = parse_duration
    )]
    pub event_retention: Duration,
    /// Interval between server pings; a client silent for two intervals is dropped.
    #[arg(
        long,
        env = "WINDFLOW_PING_INTERVAL",
        value_name = "WINDFLOW_PING_INTERVAL",
        default_value = defaults::PING_INTERVAL,
        value_parser = parse_duration
    )]
    pub ping_interval: Duration,
    /// Connections (WebSocket and SSE) beyond this many open at once get HTTP 503.
    #[arg(
        long,
        env = "WINDFLOW_MAX_CONNECTIONS",
        value_name = "WINDFLOW_MAX_CONNECTIONS",
        default_value_t = defaults::MAX_CONNECTIONS,
        value_parser = parse_count
    )]
    pub max_connections: NonZeroUsize,
    /// Connections of one user (`sub`) beyond this many get HTTP 429 (or, authenticating with `auth`, an error and close 1013).
    #[arg(
        long,
        env = "WINDFLOW_MAX_CONNECTIONS_PER_USER",
        value_name = "WINDFLOW_MAX_CONNECTIONS_PER_USER",
        default_value_t = defaults::MAX_CONNECTIONS_PER_USER
    )]
    pub max_connections_per_user: NonZeroUsize,
    /// Messages queued for one client before it counts as a slow consumer.
    #[arg(
        long,
        env = "WINDFLOW_CLIENT_QUEUE",
        value_name = "WINDFLOW_CLIENT_QUEUE",
        default_value_t = defaults::CLIENT_QUEUE,
        value_parser = parse_count
    )]
    pub client_queue: NonZeroUsize,
    /// Recent events kept in commit order for `since` resumes.
    #[arg(
        long,
        env = "WINDFLOW_HISTORY_SIZE",
        value_name = "WINDFLOW_HISTORY_SIZE",
        default_value_t = defaults::HISTORY_SIZE,
        value_parser = parse_count
    )]
    pub history_size: NonZeroUsize,
    /// Bytes of event messages the history may hold (`64MiB`, `512KiB`,
    /// or plain bytes); the oldest events leave it first.
    #[arg(
        long,
        env = "WINDFLOW_HISTORY_BYTES",
        value_name = "WINDFLOW_HISTORY_BYTES",
        default_value = defaults::HISTORY_BYTES,
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
        default_value = defaults::SEND_BUFFER,
        value_parser = parse_bytes
    )]
    pub send_buffer: usize,
}

impl ServerArgs {
    /// The [`defaults`] but for `bind`, for tests and embedding.
    pub fn with_bind(bind: SocketAddr) -> Self {
        // The defaults are constants that a unit test parses; a bad one
        // fails that test, not a server at run time.
        let duration = |value| parse_duration(value).unwrap_or_else(|e| panic!("default {value:?}: {e}"));
        let bytes = |value| parse_bytes(value).unwrap_or_else(|e| panic!("default {value:?}: {e}"));
        ServerArgs {
            bind,
            event_retention: duration(defaults::EVENT_RETENTION),
            ping_interval: duration(defaults::PING_INTERVAL),
            max_connections: defaults::MAX_CONNECTIONS,
            max_connections_per_user: defaults::MAX_CONNECTIONS_PER_USER,
            client_queue: defaults::CLIENT_QUEUE,
            history_size: defaults::HISTORY_SIZE,
            history_bytes: bytes(defaults::HISTORY_BYTES),
            send_buffer: bytes(defaults::SEND_BUFFER),
        }
    }
}

fn parse_algorithm(value: &str) -> Result<Algorithm, String> {
    value.parse::<Algorithm>().map_err(|_| {
        "expected one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA".to_string()
    })
}

/// `HOST:PORT`. A host name is resolved once, here: to its first IPv4
/// address when it has one (`localhost` is then 127.0.0.1, as a browser's
/// `http://localhost:8000` tries first), else to its first address.
pub fn parse_bind(value: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = value.parse() {
        return Ok(address);
    }
    const EXPECTED: &str = "expected HOST:PORT, like 127.0.0.1:8000, 0.0.0.0:8000 or localhost:8000";
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!("{EXPECTED}, not {value:?}"));
    };
    let port: u16 = port.parse().map_err(|_| format!("{port:?} is not a port number (0 to 65535); {EXPECTED}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the host name {host:?} ({e}); {EXPECTED}"))?
        .collect();
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or(addresses.first())
        .copied()
        .ok_or_else(|| format!("the host name {host:?} has no address; {EXPECTED}"))
}

/// A count: a whole number, at least 1.
pub fn parse_count(value: &str) -> Result<NonZeroUsize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) => NonZeroUsize::new(n).ok_or_else(|| "must be at least 1".to_string()),
        Err(_) => Err(format!("expected a whole number of at least 1, not {value:?}")),
    }
}

/// A user's or an organization's id.
pub fn parse_uuid(value: &str) -> Result<Uuid, String> {
    Uuid::parse_str(value.trim())
        .map_err(|_| format!("expected a UUID, like 6f1c2a3e-0d4b-4c9a-9e8f-2b7a1d5c3e90, not {value:?}"))
}

/// Why the server could not listen on `WINDFLOW_BIND`, with what to do
/// about the usual cause.
#[derive(Debug, thiserror::Error)]
#[error("WINDFLOW_BIND: cannot listen on {address}: {cause}{}", bind_hint(cause))]
pub struct BindError {
    pub address: SocketAddr,
    // Not a `source`: the line already says it, and an error chain printed
    // after it would say it twice.
    pub cause: io::Error,
}

fn bind_hint(cause: &io::Error) -> &'static str {
    match cause.kind() {
        io::ErrorKind::AddrInUse => {
            "; another program listens there (a windflow-notify serve or demo still running?): stop it, or set WINDFLOW_BIND to a free address such as 127.0.0.1:8001"
        }
        io::ErrorKind::PermissionDenied => "; ports below 1024 need privileges: choose a port above 1023",
        io::ErrorKind::AddrNotAvailable => "; no interface of this machine has that address",
        _ => "",
    }
}

/// Listen on `address` (`WINDFLOW_BIND`).
pub async fn listen(address: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(address).await.map_err(|cause| BindError { address, cause })
}

pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(value).map_err(|e| format!("{e} (expected a duration like 500ms, 30s or 24h)"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
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

    /// `ServerArgs` as clap builds it from `args` alone (no environment).
    fn parse(args: &[&str]) -> Result<ServerArgs, clap::Error> {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            server: ServerArgs,
        }
        let command = <Cli as clap::CommandFactory>::command().mut_args(|arg| arg.env(None));
        let matches = command.try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))?;
        Ok(Cli::from_arg_matches(&matches)?.server)
    }

    #[test]
    fn with_bind_is_what_clap_gives_without_settings() {
        let parsed = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(format!("{parsed:?}"), format!("{:?}", ServerArgs::with_bind(defaults::BIND)));
        assert_eq!(parsed.history_bytes, 64 << 20);
        assert_eq!(parsed.event_retention, Duration::from_secs(86_400));
    }

    #[test]
    fn docs_settings_states_each_default() {
        let docs = include_str!("../docs/settings.md");
        let documented = [
            ("DATABASE_URL", defaults::DATABASE_URL.to_string()),
            ("WINDFLOW_BIND", defaults::BIND.to_string()),
            ("JWT_ALGORITHM", defaults::JWT_ALGORITHM.to_string()),
            ("WINDFLOW_EVENT_RETENTION", defaults::EVENT_RETENTION.to_string()),
            ("WINDFLOW_PING_INTERVAL", defaults::PING_INTERVAL.to_string()),
            ("WINDFLOW_MAX_CONNECTIONS", defaults::MAX_CONNECTIONS.to_string()),
            ("WINDFLOW_MAX_CONNECTIONS_PER_USER", defaults::MAX_CONNECTIONS_PER_USER.to_string()),
            ("WINDFLOW_CLIENT_QUEUE", defaults::CLIENT_QUEUE.to_string()),
            ("WINDFLOW_HISTORY_SIZE", defaults::HISTORY_SIZE.to_string()),
            ("WINDFLOW_HISTORY_BYTES", defaults::HISTORY_BYTES.to_string()),
            ("WINDFLOW_SEND_BUFFER", defaults::SEND_BUFFER.to_string()),
            ("RUST_LOG", defaults::RUST_LOG.to_string()),
            ("WINDFLOW_LOG_FORMAT", defaults::LOG_FORMAT.to_string()),
        ];
        for (variable, default) in documented {
            let row = docs.lines().find(|line| line.starts_with(&format!("| `{variable}` |")));
            let row = row.unwrap_or_else(|| panic!("docs/settings.md has no row for {variable}"));
            let cells: Vec<&str> = row.split(" | ").collect();
            assert_eq!(cells.get(2), Some(&format!("`{default}`").as_str()), "{variable}'s default in: {row}");
        }
    }

    #[test]
    fn counts_must_be_positive_integers() {
        let count = |value: &str| parse(&["--client-queue", value]).map(|args| args.client_queue.get());
        assert_eq!(count("4096").ok(), Some(4096));
        for bad in ["0", "-1", "many"] {
            assert!(count(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn bind_takes_an_address_or_a_host_name_with_a_port() {
        assert_eq!(parse_bind("0.0.0.0:9000"), Ok("0.0.0.0:9000".parse().unwrap()));
        assert_eq!(parse_bind("[::1]:9000"), Ok("[::1]:9000".parse().unwrap()));
        assert_eq!(parse_bind("localhost:8000"), Ok("127.0.0.1:8000".parse().unwrap()), "IPv4 first");
        for bad in ["localhost", "127.0.0.1", "localhost:http", "localhost:70000"] {
            let error = parse_bind(bad).unwrap_err();
            assert!(error.contains("HOST:PORT"), "{bad}: {error}");
        }
    }

    #[test]
    fn zero_and_words_are_no_counts() {
        assert_eq!(parse_count("12").map(NonZeroUsize::get), Ok(12));
        assert_eq!(parse_count("0"), Err("must be at least 1".into()));
        assert!(parse_count("many").unwrap_err().contains("whole number"));
    }

    #[test]
    fn algorithm_names_are_exact() {
        assert_eq!(parse_algorithm("HS256"), Ok(Algorithm::HS256));
        assert_eq!(parse_algorithm("EdDSA"), Ok(Algorithm::EdDSA));
        assert!(parse_algorithm("none").is_err());
    }
}

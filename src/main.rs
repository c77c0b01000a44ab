use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use windflow_notify::auth::{self, TokenRequest, Verifier, Viewer};
use windflow_notify::config::{self, DatabaseArgs, JwtArgs, ServerArgs, defaults, parse_uuid};
use windflow_notify::db;

#[derive(Parser)]
#[command(
    name = "windflow-notify",
    version,
    about = "Real-time WindFlow deployment events: PostgreSQL in, WebSocket out",
    // Our own `help`, which takes `--help` like every other command.
    disable_help_subcommand = true
)]
struct Cli {
    // The default leaves out the NOTICEs tokio-postgres relays at info
    // ("relation already exists, skipping" at every start) and refinery's
    // own account of each migration run: we log each migration applied.
    // One line: every command's --help repeats a global option's help.
    /// Log filter (tracing's EnvFilter syntax: `debug`, `info,windflow_notify=debug`).
    #[arg(
        long,
        env = "RUST_LOG",
        value_name = "RUST_LOG",
        default_value = defaults::RUST_LOG,
        global = true
    )]
    rust_log: String,
    /// Log lines as text (coloured only on a terminal) or as JSON objects, one a line, for log collectors.
    #[arg(
        long,
        env = "WINDFLOW_LOG_FORMAT",
        value_name = "WINDFLOW_LOG_FORMAT",
        default_value = defaults::LOG_FORMAT,
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations, then serve.
    Serve(ServeArgs),
    /// Apply pending migrations and exit.
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Print a signed token, for testing.
    Token(TokenArgs),
    /// Print each message of a topic as one JSON line; reconnects and resumes by itself.
    Tail(windflow_notify::tail::TailArgs),
    /// Create the database if missing, serve, and simulate deployments: a first look.
    Demo(ServeArgs),
    /// Check that this database and this machine are ready for `serve`: one line per check, exit 1 on a problem.
    Check(windflow_notify::check::CheckArgs),
    /// Print this list of commands, or one command's help (`help serve`).
    Help {
        /// The command to explain.
        command: Option<String>,
    },
}

/// What `serve` and `demo` both take.
#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    jwt: JwtArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The user's UUID (the `sub` claim).
    #[arg(long, value_parser = parse_uuid)]
    sub: Uuid,
    /// Sets `is_superuser: true`.
    #[arg(long)]
    superuser: bool,
    /// The `organization_id` claim (a UUID).
    #[arg(long, value_parser = parse_uuid)]
    org: Option<Uuid>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// PEM private key, for RS*, PS*, ES* and EdDSA.
    #[arg(long)]
    private_key_file: Option<PathBuf>,
    #[command(flatten)]
    jwt: JwtArgs,
}

/// Make glibc serve every allocation of 128 KiB or more with its own
/// mmap, so that memory freed by large events (a 1 MiB log line leaving
/// the history) goes back to the system. By default glibc raises this
/// threshold each time such a block is freed, after which large blocks
/// come from its heaps and stay resident when freed.
fn return_large_frees_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called once, before
    // any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() -> ExitCode {
    return_large_frees_to_the_system();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                    | clap::error::ErrorKind::MissingSubcommand
            ) =>
        {
            // `windflow-notify` alone (or with only RUST_LOG or a global
            // flag): the list of commands.
            use clap::CommandFactory;
            eprint!("{}", Cli::command().render_help());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("{}", one_line(&e));
            return ExitCode::from(2);
        }
    };

    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.rust_log) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("error: RUST_LOG: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(filter, cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A command-line error as one line that names the setting: clap's first
/// paragraph (which may span lines: the missing arguments are listed below
/// its heading) and where to read more, not a page of usage.
fn one_line(error: &clap::Error) -> String {
    let rendered = error.to_string();
    let paragraph: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .skip_while(|line| line.is_empty())
        .take_while(|line| !line.is_empty() && !line.starts_with("Usage:"))
        .collect();
    // "Usage: windflow-notify token --sub <SUB> [OPTIONS]": the command is
    // the words before the first argument.
    let command = rendered
        .lines()
        .find_map(|line| line.trim().strip_prefix("Usage: "))
        .map(|usage| {
            usage.split_whitespace().take_while(|word| !word.starts_with(['-', '[', '<'])).collect::<Vec<_>>().join(" ")
        })
        .filter(|command| !command.is_empty())
        .unwrap_or_else(|| "windflow-notify".into());
    let said = if paragraph.is_empty() { "error: invalid arguments".into() } else { paragraph.join(" ") };
    format!("{said}; see `{command} --help`")
}

/// `windflow-notify help [COMMAND]`: the help of the program or of one command.
fn help(command: Option<&str>) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cli = Cli::command();
    // Built, so that a command's usage line starts with the program's name.
    cli.build();
    match command {
        None => cli.print_help()?,
        Some(name) => match cli.find_subcommand_mut(name) {
            Some(subcommand) => subcommand.print_help()?,
            None => {
                let names: Vec<&str> = cli.get_subcommands().map(|c| c.get_name()).collect();
                anyhow::bail!("there is no command '{name}'; the commands are {}", names.join(", "))
            }
        },
    }
    Ok(())
}

/// Logs go to stderr. Colour only when a person reads them: escape codes
/// in a file or a pipe are noise (and `NO_COLOR` turns them off anyway).
fn init_logging(filter: tracing_subscriber::EnvFilter, format: LogFormat) {
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            logs.with_ansi(colour).fmt_fields(windflow_notify::logging::escaped_fields()).init()
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(ServeArgs { database, jwt, server }) => {
            let database = db::parse_url(&database.database_url)?;
            let verifier = Verifier::from_args(&jwt)?;
            let listener = config::listen(server.bind).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            windflow_notify::serve(listener, &database, server, verifier, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { database } => {
            db::migrate(&db::parse_url(&database.database_url)?).await?;
            tracing::info!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(args) => {
            let private_key = match &args.private_key_file {
                Some(path) => Some(
                    std::fs::read(path)
                        .with_context(|| format!("--private-key-file: cannot read {}", path.display()))?,
                ),
                None => None,
            };
            let request = TokenRequest {
                viewer: Viewer { user_id: args.sub, organization_id: args.org, is_superuser: args.superuser },
                ttl: Duration::from_secs(args.ttl),
                audience: args.jwt.jwt_audience.clone(),
                issuer: args.jwt.jwt_issuer.clone(),
            };
            let token = auth::sign(
                &request,
                args.jwt.jwt_algorithm,
                args.jwt.jwt_secret_key.as_deref(),
                private_key.as_deref(),
            )?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Tail(args) => {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            windflow_notify::tail::run(args, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(ServeArgs { database, jwt, server }) => {
            let database = db::parse_url(&database.database_url)?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            windflow_notify::demo::run(database, jwt, server, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        // The findings are the output; a problem is exit status 1, not an error line.
        Command::Check(args) => {
            Ok(if windflow_notify::check::run(&args).await { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Help { command } => help(command.as_deref()).map(|()| ExitCode::SUCCESS),
    }
}

/// SIGTERM or SIGINT: cancel `shutdown`.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("SIGINT received"),
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = shutdown.cancelled() => {}
    }
    shutdown.cancel();
}

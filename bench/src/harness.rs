//! What every scenario needs: a clock shared with child processes, a
//! fresh database, the real server as a child process, and /proc readings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const SECRET: &str = "bench-secret";

/// CLOCK_MONOTONIC in nanoseconds: one clock for writers, clients and the
/// bare broadcaster (a child process), so their times can be subtracted.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raise RLIMIT_NOFILE to the hard limit (children inherit it); returns it.
pub fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

pub fn admin_url() -> String {
    std::env::var("BENCH_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.context("connect to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("bench: database connection error: {e}");
        }
    });
    Ok(client)
}

/// A database of our own, dropped by [`BenchDatabase::drop_now`].
pub struct BenchDatabase {
    pub name: String,
    pub url: String,
    pub config: tokio_postgres::Config,
    admin_url: String,
}

impl BenchDatabase {
    /// A fresh database on the server `admin_url` points to.
    pub async fn create_at(admin_url: &str) -> Result<BenchDatabase> {
        let name = format!("wf_bench_{}", Uuid::new_v4().simple());
        let admin: tokio_postgres::Config = admin_url.parse().context("BENCH_DATABASE_URL")?;
        connect(&admin).await?.batch_execute(&format!("CREATE DATABASE {name}")).await.context("create database")?;
        let mut config = admin.clone();
        config.dbname(&name);
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => bail!("BENCH_DATABASE_URL must end in /<database>"),
        };
        Ok(BenchDatabase { name, url, config, admin_url: admin_url.to_string() })
    }

    pub async fn drop_now(&self) {
        if let Ok(admin) = self.admin_url.parse::<tokio_postgres::Config>()
            && let Ok(client) = connect(&admin).await
            && let Err(e) = client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await
        {
            eprintln!("bench: could not drop {}: {e}", self.name);
        }
    }
}

/// The `windflow-notify` binary next to this one (same profile), unless
/// `BENCH_SERVER_BIN` says otherwise.
pub fn server_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("BENCH_SERVER_BIN") {
        return Ok(path.into());
    }
    let me = std::env::current_exe().context("current_exe")?;
    let path = me.with_file_name("windflow-notify");
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release --workspace --bins) or set BENCH_SERVER_BIN",
            path.display()
        );
    }
    Ok(path)
}

pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind port 0")?;
    Ok(listener.local_addr()?.port())
}

/// A child process whose CPU time and RSS we read from /proc.
pub struct Process {
    pub child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    link: PathBuf,
}

impl Process {
    /// `windflow-notify serve` on a free port, logging at warn to `log`.
    pub async fn server(database: &BenchDatabase, log: &str) -> Result<Process> {
        Process::server_with(database, log, &[]).await
    }

    /// The same, with extra environment variables (`WINDFLOW_CLIENT_QUEUE`...).
    pub async fn server_with(database: &BenchDatabase, log: &str, env: &[(&str, String)]) -> Result<Process> {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let logfile = std::fs::File::create(log).with_context(|| format!("create {log}"))?;
        // Run the binary through a private symlink: other people's
        // `pkill windflow-notify` on a shared machine must not stop our run.
        let link = std::env::temp_dir().join(format!("{}-{port}-server", database.name));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(server_bin()?, &link).with_context(|| format!("symlink {}", link.display()))?;
        let child = Command::new(&link)
            .arg("serve")
            .env("DATABASE_URL", &database.url)
            .env("JWT_SECRET_KEY", SECRET)
            .env("WINDFLOW_BIND", addr.to_string())
            .env("RUST_LOG", std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logfile)
            .kill_on_drop(true)
            .spawn()
            .context("spawn windflow-notify serve")?;
        let pid = child.id().context("server pid")?;
        let mut process = Process { child, pid, addr, link };
        process.wait_healthy(log).await?;
        Ok(process)
    }

    async fn wait_healthy(&mut self, log: &str) -> Result<()> {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait()? {
                bail!("server exited with {status} before it was healthy; see {log}");
            }
            if let Ok((200, _)) = http_get(self.addr, "/healthz").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("server not healthy within 30 s; see {log}")
    }

    /// SIGTERM, then wait (it must exit within 5 s); killed after 10 s.
    pub async fn stop(mut self) -> Result<Stopped> {
        let started = now_ns();
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let status = match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    eprintln!("bench: process {} exited with {status}", self.pid);
                }
                Some(status)
            }
            Err(_) => {
                eprintln!("bench: process {} did not exit within 10 s of SIGTERM; killing it", self.pid);
                self.child.kill().await?;
                None
            }
        };
        let _ = std::fs::remove_file(&self.link);
        Ok(Stopped { status, seconds: (now_ns() - started) as f64 / 1e9 })
    }
}

/// How a process took its SIGTERM.
#[derive(Clone, Copy, Debug)]
pub struct Stopped {
    /// None: still running after 10 s, so killed.
    pub status: Option<std::process::ExitStatus>,
    pub seconds: f64,
}

/// CPU seconds (user + system) and resident set of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss_kib: u64,
}

pub fn sample(pid: u32) -> ProcSample {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu_s = (field(14) + field(15)) / ticks.max(1.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ProcSample { cpu_s, rss_kib }
}

/// Samples a process every 100 ms in the background: peak RSS.
pub struct Sampler {
    pub pid: u32,
    start: ProcSample,
    start_ns: u64,
    peak_rss: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let peak_rss = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let (peak, token) = (peak_rss.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(sample(pid).rss_kib, std::sync::atomic::Ordering::Relaxed);
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        Sampler { pid, start: sample(pid), start_ns: now_ns(), peak_rss, stop }
    }

    /// (CPU % of one core over the window, peak RSS KiB, end RSS KiB).
    pub fn finish(self) -> (f64, u64, u64) {
        self.stop.cancel();
        let end = sample(self.pid);
        let wall = (now_ns() - self.start_ns) as f64 / 1e9;
        let cpu = 100.0 * (end.cpu_s - self.start.cpu_s) / wall.max(1e-9);
        let peak = self.peak_rss.load(std::sync::atomic::Ordering::Relaxed).max(end.rss_kib);
        (cpu, peak, end.rss_kib)
    }
}

/// A plain HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await??;
    let response = String::from_utf8_lossy(&response).to_string();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// One value from the server's /metrics.
pub async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await.ok()?;
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' '))).and_then(|v| v.parse().ok())
}

/// A current-thread runtime on its own OS thread. Writers and the bare
/// LISTEN client run on these, so their timestamps are not delayed behind
/// thousands of busy client tasks (and writers keep their pace).
pub struct SideRuntime {
    pub handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SideRuntime {
    pub fn new(name: &str) -> Result<SideRuntime> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
        })?;
        Ok(SideRuntime { handle, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A PostgreSQL cluster of the bench's own, with `wal_level = logical`, for
/// `--source logical` when the given server runs with `replica`. Stock
/// settings otherwise (fsync and synchronous_commit on), so that its figures
/// compare with the machine's cluster. Stopped and removed on drop.
pub struct LogicalCluster {
    root: PathBuf,
    bin: PathBuf,
    pub admin_url: String,
}

fn as_postgres(program: &std::path::Path) -> std::process::Command {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root {
        let mut command = std::process::Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        std::process::Command::new(program)
    }
}

fn run_tool(command: &mut std::process::Command, what: &str) -> Result<()> {
    let output = command.output().with_context(|| format!("run {what}"))?;
    if !output.status.success() {
        bail!("{what} failed: {}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

impl LogicalCluster {
    pub fn start() -> Result<LogicalCluster> {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL server binaries under /usr/lib/postgresql")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .collect();
        versions.sort();
        let bin = versions.pop().context("no initdb under /usr/lib/postgresql")?;
        let root = std::env::temp_dir().join(format!("wf_bench_cluster_{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root)?;
        let _ = std::process::Command::new("chown").args(["-R", "postgres:postgres"]).arg(&root).status();
        let data = root.join("data");
        let port = free_port()?;
        let cluster = LogicalCluster {
            root: root.clone(),
            bin,
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        run_tool(
            as_postgres(&cluster.bin.join("initdb")).arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ]),
            "initdb",
        )?;
        // As the machine's cluster is configured (autovacuum off), but logical.
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical -c autovacuum=off",
            root.display()
        );
        run_tool(
            as_postgres(&cluster.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-o", &options, "-l"])
                .arg(root.join("log"))
                .args(["-w", "start"]),
            "pg_ctl start",
        )?;
        Ok(cluster)
    }
}

impl Drop for LogicalCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.root.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

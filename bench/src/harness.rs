//! What every scenario needs besides `windflow-testkit` (fresh databases,
//! private clusters, tokens, HTTP reads): a clock shared with child
//! processes, the real server as a child process, and /proc readings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};
pub use windflow_testkit::{Database, connect, metric};
use windflow_testkit::{SECRET, free_port, http_get};

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

/// The PostgreSQL server the scenarios create their databases on.
pub fn admin_url() -> String {
    windflow_testkit::admin_url("BENCH_DATABASE_URL")
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

/// A child process whose CPU time and RSS we read from /proc.
pub struct Process {
    pub child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    link: PathBuf,
}

impl Process {
    /// `windflow-notify serve` on a free port, logging at warn to `log`.
    pub async fn server(database: &Database, log: &str) -> Result<Process> {
        Process::server_with(database, log, &[]).await
    }

    /// The same, with extra environment variables (`WINDFLOW_CLIENT_QUEUE`...).
    pub async fn server_with(database: &Database, log: &str, env: &[(&str, String)]) -> Result<Process> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        Process::server_at(database, log, addr, env).await
    }

    /// `windflow-notify serve` on `addr`: a server started again where its
    /// clients will reconnect.
    pub async fn server_at(
        database: &Database,
        log: &str,
        addr: SocketAddr,
        env: &[(&str, String)],
    ) -> Result<Process> {
        let port = addr.port();
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
            if let Ok((200, _)) = http_get(self.addr, "/healthz", &[]).await {
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

    /// SIGKILL, as a crash: no close frame for anyone.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await.with_context(|| format!("kill process {}", self.pid))?;
        let _ = std::fs::remove_file(&self.link);
        Ok(())
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

/// A PostgreSQL cluster of the bench's own, for runs that restart it or
/// change its flush (`--flush-delay`). As the machine's cluster is
/// configured (autovacuum off), fsync and synchronous_commit on, so that its
/// figures compare with it. Stopped and removed on drop.
pub fn own_cluster() -> Result<windflow_testkit::Cluster> {
    windflow_testkit::Cluster::start_new_with(&["autovacuum=off"])
}

//! A private PostgreSQL cluster (initdb + pg_ctl of the newest server
//! installed under /usr/lib/postgresql), for runs that stop, restart or
//! replicate the database, or need settings the shared one lacks
//! (`wal_level = logical`): they must not touch the shared one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::http::free_port;

pub struct Cluster {
    pub root: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// Extra `-c name=value` server settings.
    settings: String,
}

fn postgres_bin() -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL server binaries under /usr/lib/postgresql")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().context("no initdb under /usr/lib/postgresql")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A PostgreSQL tool, run as the `postgres` user when we are root (the
/// server refuses to run as root).
fn tool(bin: &Path, name: &str) -> Command {
    let program = bin.join(name);
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(bin: &Path, name: &str, args: &[&str]) -> Result<()> {
    let output = tool(bin, name).args(args).output().with_context(|| format!("run {name}"))?;
    if !output.status.success() {
        bail!(
            "{name} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn make_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("mkdir {}", path.display()))?;
    if is_root() {
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status()?;
        if !status.success() {
            bail!("chown postgres {}: {status}", path.display());
        }
    }
    Ok(())
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

impl Cluster {
    /// initdb and start a new cluster on a free port (trust auth), with
    /// these `name=value` settings.
    pub fn start_new_with(settings: &[&str]) -> Result<Cluster> {
        let bin = postgres_bin()?;
        let root = std::env::temp_dir().join(format!("wf_cluster_{}", uuid::Uuid::new_v4().simple()));
        make_dir(&root)?;
        let data = root.join("data");
        run(&bin, "initdb", &["-D", utf8(&data)?, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])?;
        let settings = settings.iter().map(|s| format!(" -c {s}")).collect();
        let cluster = Cluster { root, data, port: free_port()?, bin, settings };
        cluster.start()?;
        Ok(cluster)
    }

    /// A hot standby of this cluster, started, with the same settings.
    pub fn start_standby(&self) -> Result<Cluster> {
        let root = self.root.join("standby");
        make_dir(&root)?;
        let data = root.join("data");
        let port = self.port.to_string();
        run(
            &self.bin,
            "pg_basebackup",
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-D", utf8(&data)?, "-R", "-X", "stream"],
        )?;
        let standby =
            Cluster { root, data, port: free_port()?, bin: self.bin.clone(), settings: self.settings.clone() };
        standby.start()?;
        Ok(standby)
    }

    pub fn start(&self) -> Result<()> {
        let options =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1{}", self.port, self.root.display(), self.settings);
        let log = self.root.join("log");
        run(&self.bin, "pg_ctl", &["-D", utf8(&self.data)?, "-o", &options, "-l", utf8(&log)?, "-w", "start"])
    }

    pub fn stop(&self) -> Result<()> {
        run(&self.bin, "pg_ctl", &["-D", utf8(&self.data)?, "-m", "fast", "-w", "stop"])
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = tool(&self.bin, "pg_ctl").arg("-D").arg(&self.data).args(["-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

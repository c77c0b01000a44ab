//! A private PostgreSQL cluster for tests that stop, restart or replicate
//! the database: they must not touch the shared one other tests use.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Cluster {
    pub root: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// Extra `-c name=value` server settings.
    settings: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("initdb")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// Run a PostgreSQL tool as the `postgres` user when we are root (the
/// server refuses to run as root).
fn run(bin: &Path, tool: &str, args: &[&str]) {
    let program = bin.join(tool);
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&program);
        c
    } else {
        Command::new(&program)
    };
    let output = command.args(args).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn make_dir(path: &Path) {
    std::fs::create_dir_all(path).expect("mkdir");
    if is_root() {
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().expect("chown");
        assert!(status.success());
    }
}

impl Cluster {
    /// initdb and start a new cluster on a free port (trust auth).
    pub fn start_new() -> Cluster {
        Self::start_new_with(&[])
    }

    /// A new cluster that can serve logical replication: the machine's own
    /// cluster may run with `wal_level = replica`.
    pub fn start_logical() -> Cluster {
        Self::start_new_with(&["wal_level=logical"])
    }

    /// A new cluster with these `name=value` settings.
    pub fn start_new_with(settings: &[&str]) -> Cluster {
        let bin = postgres_bin();
        let root = std::env::temp_dir().join(format!("wf_cluster_{}", uuid::Uuid::new_v4().simple()));
        make_dir(&root);
        let data = root.join("data");
        let data_arg = data.to_str().expect("utf-8 path");
        run(&bin, "initdb", &["-D", data_arg, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]);
        let settings = settings.iter().map(|s| format!(" -c {s}")).collect();
        let cluster = Cluster { root, data, port: free_port(), bin, settings };
        cluster.start();
        cluster
    }

    /// A hot standby of this cluster, started.
    pub fn start_standby(&self) -> Cluster {
        let root = self.root.join("standby");
        make_dir(&root);
        let data = root.join("data");
        let port = self.port.to_string();
        run(
            &self.bin,
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                data.to_str().expect("path"),
                "-R",
                "-X",
                "stream",
            ],
        );
        let standby = Cluster { root, data, port: free_port(), bin: self.bin.clone(), settings: String::new() };
        standby.start();
        standby
    }

    pub fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.root.display(),
            self.settings
        );
        let log = self.root.join("log");
        run(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().expect("path"),
                "-o",
                &options,
                "-l",
                log.to_str().expect("path"),
                "-w",
                "start",
            ],
        );
    }

    pub fn stop(&self) {
        run(&self.bin, "pg_ctl", &["-D", self.data.to_str().expect("path"), "-m", "fast", "-w", "stop"]);
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let program = self.bin.join("pg_ctl");
        let data = self.data.clone();
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        let _ = command.arg("-D").arg(&data).args(["-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

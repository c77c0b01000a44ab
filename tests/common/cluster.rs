//! A private PostgreSQL cluster for tests that stop, restart or replicate
//! the database: they must not touch the shared one other tests use.
//! `windflow_testkit::Cluster`, with fsync off and a panic on failure.

use std::ops::Deref;

pub struct Cluster(windflow_testkit::Cluster);

fn started(cluster: anyhow::Result<windflow_testkit::Cluster>) -> Cluster {
    Cluster(cluster.unwrap_or_else(|e| panic!("a private PostgreSQL cluster: {e:#}")))
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

    /// A new cluster with these `name=value` settings; fsync is off, as a
    /// test needs no durability across a machine crash.
    pub fn start_new_with(settings: &[&str]) -> Cluster {
        started(windflow_testkit::Cluster::start_new_with(&[&["fsync=off"], settings].concat()))
    }

    /// A hot standby of this cluster, started.
    pub fn start_standby(&self) -> Cluster {
        started(self.0.start_standby())
    }

    pub fn start(&self) {
        self.0.start().unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn stop(&self) {
        self.0.stop().unwrap_or_else(|e| panic!("{e:#}"))
    }
}

impl Deref for Cluster {
    type Target = windflow_testkit::Cluster;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

//! From samples to figures: latency percentiles, delivered rate, lost and
//! duplicated events; printed as a table and collected as JSON.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::clients::ClientLog;
use crate::writers::Written;

/// Which writes a client is owed.
#[derive(Clone, Copy, Debug)]
pub enum Owed {
    All,
    Deployment(u32),
}

#[derive(Clone, Debug, Default)]
pub struct Delivery {
    pub name: String,
    pub messages: u64,
    pub msgs_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub lost: u64,
    /// Of `lost`, those owed to clients whose connection ended early
    /// (kicked, closed): a real client would resume them with `since`.
    pub lost_ended: u64,
    pub duplicated: u64,
    pub unexpected: u64,
    pub short_frames: u64,
    /// Clients whose connection ended before the run did (closed, kicked, reset).
    pub ended_early: u64,
    pub cpu_pct: Option<f64>,
    pub rss_peak_kib: Option<u64>,
}

impl Delivery {
    pub fn json(&self) -> Value {
        json!({
            "name": self.name, "messages": self.messages, "msgs_per_s": round(self.msgs_per_s),
            "latency_ms": {"p50": round(self.p50_ms), "p99": round(self.p99_ms), "p99_9": round(self.p999_ms), "max": round(self.max_ms)},
            "lost": self.lost, "lost_on_ended_connections": self.lost_ended, "duplicated": self.duplicated, "unexpected": self.unexpected,
            "short_frames": self.short_frames, "ended_early": self.ended_early,
            "cpu_pct": self.cpu_pct.map(round), "rss_peak_kib": self.rss_peak_kib,
        })
    }

    pub fn failed(&self) -> bool {
        self.lost > 0 || self.duplicated > 0 || self.unexpected > 0 || self.short_frames > 0
    }
}

pub fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6
}

/// Latency and loss over clients that each record (seq, receive, sent).
/// `commit` maps a seq to its commit time; None uses the embedded send time.
pub fn analyse(name: &str, written: &[Written], logs: &[(Owed, &ClientLog)], embedded: bool) -> Delivery {
    let commit: HashMap<u32, &Written> = written.iter().map(|w| (w.seq, w)).collect();
    let mut by_deployment: HashMap<u32, u64> = HashMap::new();
    for w in written {
        *by_deployment.entry(w.deployment).or_default() += 1;
    }
    let mut latencies: Vec<i64> = Vec::new();
    let mut d = Delivery { name: name.into(), ..Default::default() };
    let (mut first, mut last) = (u64::MAX, 0u64);
    if !embedded {
        for w in written {
            first = first.min(w.commit_ns);
        }
    }
    for (owed, log) in logs {
        d.short_frames += log.short_frames;
        let mut seqs: Vec<u32> = log.samples.iter().map(|s| s.0).collect();
        seqs.sort_unstable();
        let total = seqs.len() as u64;
        seqs.dedup();
        d.duplicated += total - seqs.len() as u64;
        let mut got = 0u64;
        for seq in &seqs {
            let expected = match (owed, commit.get(seq)) {
                (Owed::All, _) => embedded || commit.contains_key(seq),
                (Owed::Deployment(dep), Some(w)) => w.deployment == *dep,
                (Owed::Deployment(_), None) => false,
            };
            if expected {
                got += 1;
            } else {
                d.unexpected += 1;
            }
        }
        let owed_count = match owed {
            Owed::All => written.len() as u64,
            Owed::Deployment(dep) => by_deployment.get(dep).copied().unwrap_or(0),
        };
        d.lost += owed_count.saturating_sub(got);
        if log.ended.is_some() {
            d.lost_ended += owed_count.saturating_sub(got);
        }
        for &(seq, received, sent) in &log.samples {
            let start = if embedded { Some(sent) } else { commit.get(&seq).map(|w| w.commit_ns) };
            if let Some(start) = start {
                latencies.push(received as i64 - start as i64);
                first = first.min(start);
                last = last.max(received);
            }
        }
    }
    d.messages = latencies.len() as u64;
    if last > first {
        d.msgs_per_s = d.messages as f64 / ((last - first) as f64 / 1e9);
    }
    latencies.sort_unstable();
    d.p50_ms = percentile(&latencies, 50.0);
    d.p99_ms = percentile(&latencies, 99.0);
    d.p999_ms = percentile(&latencies, 99.9);
    d.max_ms = latencies.last().map(|l| *l as f64 / 1e6).unwrap_or(f64::NAN);
    d
}

pub fn print_table(title: &str, rows: &[Delivery]) {
    println!("\n{title}");
    println!(
        "| {:<26} | {:>9} | {:>10} | {:>8} | {:>8} | {:>8} | {:>8} | {:>4} | {:>4} | {:>6} | {:>9} |",
        "path", "messages", "msgs/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "lost", "dup", "CPU %", "RSS MiB"
    );
    println!("|{}|", ["-"; 11].map(|_| "---").join("|"));
    for r in rows {
        println!(
            "| {:<26} | {:>9} | {:>10.0} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} | {:>4} | {:>4} | {:>6} | {:>9} |",
            r.name,
            r.messages,
            r.msgs_per_s,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.max_ms,
            r.lost,
            r.duplicated,
            r.cpu_pct.map(|c| format!("{c:.0}")).unwrap_or_else(|| "-".into()),
            r.rss_peak_kib.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "-".into()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(n: u32) -> Vec<Written> {
        (0..n).map(|seq| Written { seq, deployment: seq % 2, commit_ns: 1_000 }).collect()
    }

    #[test]
    fn lost_duplicated_and_misrouted_events_are_counted() {
        let all = ClientLog { samples: vec![(0, 2_000, 0), (1, 2_000, 0), (1, 2_500, 0)], ..Default::default() };
        let owner = ClientLog { samples: vec![(1, 3_000, 0)], ..Default::default() };
        let d = analyse("x", &written(4), &[(Owed::All, &all), (Owed::Deployment(0), &owner)], false);
        assert_eq!(d.duplicated, 1);
        assert_eq!(d.lost, 2 + 2, "seqs 2 and 3 for the first client, 0 and 2 for the owner of deployment 0");
        assert_eq!(d.unexpected, 1, "seq 1 belongs to deployment 1");
        assert_eq!(d.lost_ended, 0, "both connections lasted the run");
        assert!(d.failed());
    }

    #[test]
    fn losses_on_connections_that_ended_are_told_apart() {
        let kicked = ClientLog { samples: vec![(0, 2_000, 0)], ended: Some("kicked".into()), ..Default::default() };
        let fine = ClientLog { samples: vec![(0, 2_000, 0), (1, 2_000, 0)], ..Default::default() };
        let d = analyse("x", &written(4), &[(Owed::All, &kicked), (Owed::All, &fine)], false);
        assert_eq!((d.lost, d.lost_ended), (3 + 2, 3));
    }

    #[test]
    fn a_complete_delivery_passes() {
        let all = ClientLog { samples: (0..4).map(|s| (s, 2_000, 0)).collect(), ..Default::default() };
        let d = analyse("x", &written(4), &[(Owed::All, &all)], false);
        assert!(!d.failed());
        assert_eq!(d.p50_ms, 0.001);
    }
}

//! Prometheus metrics, kept in atomics and rendered as text on `/metrics`.
//! Every metric exists from start, at zero until it happens.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the delivery latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicI64,
    pub subscriptions: AtomicI64,
    pub events_total: AtomicU64,
    pub listener_up: AtomicI64,
    pub listener_reconnects_total: AtomicU64,
    pub late_events_total: AtomicU64,
    pub log_reads_total: AtomicU64,
    pub slow_consumer_disconnects_total: AtomicU64,
    pub notification_queue_usage: AtomicU64, // f64 bits
    pub forged_notifications_total: AtomicU64,
    pub history_bytes: AtomicI64,
    pub replays_waiting: AtomicI64,
    /// What sessions wrote, one shard per worker thread: every session
    /// adds to these after each write, and one set of counters shared by
    /// all of them made every write bounce their cache lines between the
    /// cores. Summed when rendered.
    deliveries: [Deliveries; SHARDS],
}

/// Shards of the delivery counters: more than the worker threads of any
/// machine this runs on is not needed (threads beyond share a shard,
/// which is only slower).
const SHARDS: usize = 16;

/// One thread's delivery counters, on cache lines of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Deliveries {
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    /// Messages written: the histogram's count and `messages_sent_total`.
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// This thread's shard of the delivery counters.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

impl Metrics {
    /// Messages written to a client in one flush, with the time each took
    /// from the notification reaching this process to the socket. One
    /// atomic add per bucket touched, not three per message: every session
    /// does this on the hot path.
    pub fn observe_deliveries(&self, latencies: impl IntoIterator<Item = Duration>) {
        let mut buckets = [0u64; LATENCY_BUCKETS.len()];
        let (mut count, mut sum_nanos) = (0u64, 0u64);
        for latency in latencies {
            let seconds = latency.as_secs_f64();
            if let Some(i) = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound) {
                buckets[i] += 1;
            }
            count += 1;
            sum_nanos += latency.as_nanos() as u64;
        }
        if count == 0 {
            return;
        }
        let shard = &self.deliveries[shard()];
        for (total, n) in shard.latency_buckets.iter().zip(buckets) {
            if n > 0 {
                total.fetch_add(n, Relaxed);
            }
        }
        shard.count.fetch_add(count, Relaxed);
        shard.sum_nanos.fetch_add(sum_nanos, Relaxed);
    }

    /// Messages written to clients, all threads together.
    fn messages_sent(&self) -> u64 {
        self.deliveries.iter().map(|shard| shard.count.load(Relaxed)).sum()
    }

    pub fn set_notification_queue_usage(&self, usage: f64) {
        self.notification_queue_usage.store(usage.to_bits(), Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        metric(
            "windflow_connections",
            "gauge",
            "Open connections, WebSocket and SSE.",
            self.connections.load(Relaxed).to_string(),
        );
        metric(
            "windflow_subscriptions",
            "gauge",
            "Topic subscriptions over all connections.",
            self.subscriptions.load(Relaxed).to_string(),
        );
        metric(
            "windflow_events_total",
            "counter",
            "Events received from PostgreSQL.",
            self.events_total.load(Relaxed).to_string(),
        );
        metric(
            "windflow_messages_sent_total",
            "counter",
            "Event messages written to clients.",
            self.messages_sent().to_string(),
        );
        metric(
            "windflow_listener_up",
            "gauge",
            "1 while the event feed's connection (the one that LISTENs) is up.",
            self.listener_up.load(Relaxed).to_string(),
        );
        metric(
            "windflow_listener_reconnects_total",
            "counter",
            "Times the event feed's connection (the one that LISTENs) was re-established.",
            self.listener_reconnects_total.load(Relaxed).to_string(),
        );
        metric(
            "windflow_log_reads_total",
            "counter",
            "Reads of the event log by the feed (on wake-ups, shortly after finding events, and every 100 ms): its heartbeat.",
            self.log_reads_total.load(Relaxed).to_string(),
        );
        metric(
            "windflow_late_events_total",
            "counter",
            "Events delivered after later ones: their transaction took its ids before committing and held them past 10 s.",
            self.late_events_total.load(Relaxed).to_string(),
        );
        metric(
            "windflow_slow_consumer_disconnects_total",
            "counter",
            "Clients closed with 1013 because their queue filled.",
            self.slow_consumer_disconnects_total.load(Relaxed).to_string(),
        );
        metric(
            "windflow_notification_queue_usage",
            "gauge",
            "pg_notification_queue_usage() as last sampled (0 to 1).",
            f64::from_bits(self.notification_queue_usage.load(Relaxed)).to_string(),
        );
        metric(
            "windflow_forged_notifications_total",
            "counter",
            "Notifications on windflow_events announcing an event the log does not have (or no event at all), ignored.",
            self.forged_notifications_total.load(Relaxed).to_string(),
        );
        metric(
            "windflow_history_bytes",
            "gauge",
            "Bytes of event messages the resume history holds (WINDFLOW_HISTORY_BYTES bounds it).",
            self.history_bytes.load(Relaxed).to_string(),
        );
        metric(
            "windflow_replays_waiting",
            "gauge",
            "Replay queries (resumes older than the history) waiting for one of the 4 query slots.",
            self.replays_waiting.load(Relaxed).to_string(),
        );
        let name = "windflow_delivery_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} From notification received to message written to the client.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.deliveries.iter().map(|shard| shard.latency_buckets[i].load(Relaxed)).sum::<u64>();
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.messages_sent();
        let sum_nanos: u64 = self.deliveries.iter().map(|shard| shard.sum_nanos.load(Relaxed)).sum();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", sum_nanos as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let metrics = Metrics::default();
        metrics.observe_deliveries([Duration::from_micros(50)]);
        metrics.observe_deliveries([Duration::from_millis(3), Duration::from_secs(9)]);
        let text = metrics.render();
        assert!(text.contains("windflow_delivery_latency_seconds_bucket{le=\"0.0001\"} 1\n"));
        assert!(text.contains("windflow_delivery_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("windflow_delivery_latency_seconds_bucket{le=\"5\"} 2\n"));
        assert!(text.contains("windflow_delivery_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("windflow_delivery_latency_seconds_count 3\n"));
        assert!(text.contains("windflow_messages_sent_total 3\n"));
    }

    #[test]
    fn every_metric_is_exposed_at_zero() {
        let text = Metrics::default().render();
        for name in [
            "windflow_connections 0",
            "windflow_subscriptions 0",
            "windflow_events_total 0",
            "windflow_messages_sent_total 0",
            "windflow_listener_up 0",
            "windflow_listener_reconnects_total 0",
            "windflow_slow_consumer_disconnects_total 0",
            "windflow_forged_notifications_total 0",
            "windflow_delivery_latency_seconds_count 0",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}

//! The one LISTEN connection: where every event enters the process.
//!
//! It is a plain tokio-postgres connection (`application_name`
//! `windflow-notify-listener`) driven by `poll_message`, because the
//! ordinary `Connection` future drops notifications. Each notification on
//! `windflow_events` becomes an [`Event`] handed to the hub, in the order
//! PostgreSQL delivers them, which is commit order.
//!
//! # What is lost when the connection dies: nothing
//!
//! Notifications sent while the connection is down are gone, so the
//! listener reads them back from the event log after it reconnects. Ids
//! cannot say which events those are (an id is allocated before commit, so
//! a transaction can commit late with a small id). Instead, once a second
//! the listener NOTIFYs itself, on a channel of its own, a *marker*: the
//! current `pg_current_snapshot()` (after an id bound and the marker's own
//! xid, which say where in the log a catch-up starts: [`CatchUp`]).
//! Notifications are queued in commit order, so when a marker comes back
//! every transaction it shows as finished has already been delivered.
//! After a reconnect (LISTEN first), the listener reads every event whose
//! transaction the last marker did not show as finished, in id order; the
//! hub drops the ones it already had. Events that commit after the LISTEN
//! arrive as notifications and are deduplicated the same way. Reconnects
//! back off exponentially ([`Backoff`]), so a database that is down is not
//! stormed.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::db::announcement::SigningKey;
use crate::db::catchup::{CatchUp, MARKER_TEXT};
use crate::db::{DbError, events, quote_identifier, refuse_standby};
use crate::event::{Event, EventKind};
use crate::hub::Arrival;
use crate::metrics::Metrics;

pub const EVENTS_CHANNEL: &str = "windflow_events";
pub const APPLICATION_NAME: &str = "windflow-notify-listener";

/// How often a marker is sent (and the notification queue usage sampled).
const MARKER_EVERY: Duration = Duration::from_secs(1);
/// A marker not echoed within this long means the connection is dead even
/// if TCP has not noticed yet.
const MARKER_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect delays: up to 100 ms first, doubling to 5 s.
const RECONNECT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{}", crate::db::source_failure(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// PostgreSQL answered the `LISTEN` statement with an error (the
    /// connection itself still worked).
    #[error("LISTEN refused: {}", crate::db::describe(.0))]
    ListenRefused(tokio_postgres::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error("no marker came back within {MARKER_TIMEOUT:?}; connection presumed dead")]
    Stalled,
    #[error(transparent)]
    HubGone(#[from] HubGone),
}

/// What either event source needs besides its connection: the hub to hand
/// events to, the up/down report, shutdown, and this process's own marker
/// name (a LISTEN channel, or a logical message prefix).
pub struct SourceLink {
    arrivals: mpsc::Sender<Arrival>,
    up: watch::Sender<bool>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) marker_name: String,
}

/// The hub stopped: nothing to reconnect for.
#[derive(Debug, thiserror::Error)]
#[error("hub stopped")]
pub struct HubGone;

impl SourceLink {
    /// `up` turns true once the source delivered a marker, and false
    /// whenever its connection is lost.
    pub fn new(
        arrivals: mpsc::Sender<Arrival>,
        metrics: Arc<Metrics>,
        up: watch::Sender<bool>,
        shutdown: CancellationToken,
    ) -> SourceLink {
        let marker_name = format!("windflow_marker_{}", uuid::Uuid::new_v4().simple());
        SourceLink { arrivals, up, metrics, shutdown, marker_name }
    }

    /// Report the source up or down (`/healthz`, `windflow_listener_up`).
    pub(crate) fn set_up(&self, up: bool) {
        self.up.send_replace(up);
        self.metrics.listener_up.store(i64::from(up), Relaxed);
    }

    pub(crate) async fn hand_over(&self, arrival: Arrival) -> Result<(), HubGone> {
        if let Arrival::Marker(_) = arrival {
            self.metrics.markers_total.fetch_add(1, Relaxed);
        }
        self.arrivals.send(arrival).await.map_err(|_| HubGone)
    }

    /// Once a source's connection is back: before any marker, hand over the
    /// origin (the newest event committed now, the resume cursor of a
    /// subscription made before anything is fed); after one, every event
    /// the last marker did not show as finished (`what` names the moment).
    pub(crate) async fn catch_up<E>(&self, client: &Client, catch_up: &CatchUp, what: &str) -> Result<(), E>
    where
        E: From<DbError> + From<tokio_postgres::Error> + From<HubGone>,
    {
        if !catch_up.started() {
            let origin: i64 = client.query_one("SELECT coalesce(max(id), 0) FROM windflow_events", &[]).await?.get(0);
            return Ok(self.hand_over(Arrival::Origin(origin)).await?);
        }
        let missed = catch_up.missed(client).await?;
        info!(
            candidates = missed.len(),
            after_id = catch_up.read_after(),
            snapshot = catch_up.snapshot().unwrap_or_default(),
            "{what}; delivering what committed while it was away"
        );
        for event in missed {
            self.hand_over(Arrival::Event(event)).await?;
        }
        self.metrics.listener_reconnects_total.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// `config` with this process's `application_name` for a source connection.
pub(crate) fn named(config: &tokio_postgres::Config, application_name: &str) -> tokio_postgres::Config {
    let mut config = config.clone();
    config.application_name(application_name);
    config
}

pub struct Listener {
    config: tokio_postgres::Config,
    link: SourceLink,
}

impl Listener {
    pub fn new(config: &tokio_postgres::Config, link: SourceLink) -> Self {
        Listener { config: named(config, APPLICATION_NAME), link }
    }

    pub async fn run(self) {
        keep_connected(&self, &self.link, "listener connection").await
    }

    /// One connection's life; returns Ok only on shutdown.
    async fn connection(&self, catch_up: &mut CatchUp, became_up: &mut bool) -> Result<(), ListenerError> {
        let (client, mut connection) = self.config.connect(NoTls).await?;
        // Notifications go through an unbounded channel so that reading the
        // socket never waits on the hub; PostgreSQL's own queue and this
        // channel hold them while the hub is busy.
        let (tx, mut notifications) = mpsc::unbounded_channel();
        let driver = async move {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n).is_err() {
                            return Ok(());
                        }
                    }
                    Some(Ok(AsyncMessage::Notice(notice))) => debug!(notice = %notice, "listener notice"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(ListenerError::Postgres(e)),
                    None => return Err(ListenerError::Closed),
                }
            }
        };
        tokio::select! {
            outcome = driver => outcome,
            outcome = self.listen(&client, &mut notifications, catch_up, became_up) => outcome,
        }
    }

    async fn listen(
        &self,
        client: &Client,
        notifications: &mut mpsc::UnboundedReceiver<Notification>,
        catch_up: &mut CatchUp,
        became_up: &mut bool,
    ) -> Result<(), ListenerError> {
        refuse_standby(client).await?;
        let key = SigningKey::load(client).await?;
        client
            .batch_execute(&format!("LISTEN {EVENTS_CHANNEL}; LISTEN {}", quote_identifier(&self.link.marker_name)))
            .await
            .map_err(|e| match e.as_db_error() {
                Some(_) => ListenerError::ListenRefused(e),
                None => ListenerError::Postgres(e),
            })?;
        self.link.catch_up::<ListenerError>(client, catch_up, "listener reconnected").await?;
        let mut tick = tokio::time::interval(MARKER_EVERY);
        // The nonce and send time of the marker awaited.
        let mut marker_sent: Option<(String, Instant)> = None;
        loop {
            tokio::select! {
                _ = self.link.shutdown.cancelled() => return Ok(()),
                notification = notifications.recv() => {
                    let Some(notification) = notification else { return Err(ListenerError::Closed) };
                    if notification.channel() == EVENTS_CHANNEL {
                        self.on_announcement(client, &key, notification.payload()).await?;
                    } else if notification.channel() == self.link.marker_name {
                        // Only the marker this connection sent counts: its
                        // payload starts with the nonce it was sent with.
                        let Some(snapshot) = marker_sent
                            .as_ref()
                            .and_then(|(nonce, _)| notification.payload().strip_prefix(nonce.as_str()))
                            .and_then(|marker| catch_up.on_marker(marker))
                        else {
                            warn!(payload = %truncated(notification.payload()), "ignoring a marker this listener did not send");
                            continue;
                        };
                        marker_sent = None;
                        self.hand_over(Arrival::Marker(snapshot)).await?;
                        if !*became_up {
                            *became_up = true;
                            self.link.set_up(true);
                            info!(application_name = APPLICATION_NAME, "listener up");
                        }
                    }
                }
                _ = tick.tick() => {
                    if let Some((_, sent)) = &marker_sent {
                        if sent.elapsed() > MARKER_TIMEOUT {
                            return Err(ListenerError::Stalled);
                        }
                        continue;
                    }
                    let nonce = format!("{} ", uuid::Uuid::new_v4().simple());
                    let text = nonce.clone() + &CatchUp::marker_prefix(client).await?;
                    match client
                        .query_one(
                            &format!("SELECT pg_notification_queue_usage(), pg_notify($1, $2 || {MARKER_TEXT})"),
                            &[&self.link.marker_name, &text],
                        )
                        .await
                    {
                        Ok(row) => {
                            self.link.metrics.set_notification_queue_usage(row.get(0));
                            marker_sent = Some((nonce, Instant::now()));
                        }
                        // A snapshot too long for a NOTIFY payload (thousands of
                        // open transactions): keep the previous marker.
                        Err(e) if e.as_db_error().is_some() => {
                            warn!(error = %crate::db::describe(&e), "marker not sent")
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }

    async fn on_announcement(&self, client: &Client, key: &SigningKey, payload: &str) -> Result<(), ListenerError> {
        let announcement = match key.verify(payload) {
            Ok(a) => a,
            Err(why) => {
                self.link.metrics.forged_notifications_total.fetch_add(1, Relaxed);
                warn!(reason = %why, payload = %truncated(payload),
                    "ignoring a notification on windflow_events that no trigger signed");
                return Ok(());
            }
        };
        let Some(kind) = EventKind::parse(announcement.kind) else {
            warn!(event_id = announcement.event_id, kind = announcement.kind, "ignoring an event of unknown type");
            return Ok(());
        };
        let event = match announcement.data {
            Some(data) => Event::new(
                announcement.event_id,
                kind,
                announcement.deployment_id,
                announcement.user_id,
                announcement.organization_id,
                data.get(),
            ),
            // Too large for a NOTIFY payload: read it from the event log.
            None => match events::fetch(client, announcement.event_id).await? {
                Some(event) => event,
                None => {
                    warn!(
                        event_id = announcement.event_id,
                        "announced event is not in the event log (pruned already?)"
                    );
                    return Ok(());
                }
            },
        };
        self.hand_over(Arrival::Event(event)).await
    }

    async fn hand_over(&self, arrival: Arrival) -> Result<(), ListenerError> {
        Ok(self.link.hand_over(arrival).await?)
    }
}

impl EventStream for Listener {
    type Error = ListenerError;

    fn hub_gone(error: &ListenerError) -> bool {
        matches!(error, ListenerError::HubGone(_))
    }

    fn connection(
        &self,
        catch_up: &mut CatchUp,
        became_up: &mut bool,
    ) -> impl Future<Output = Result<(), ListenerError>> + Send {
        Listener::connection(self, catch_up, became_up)
    }
}

/// An event source's connection, which [`keep_connected`] runs again after
/// each loss: the LISTEN connection, or the logical replication stream.
pub(crate) trait EventStream: Sync {
    type Error: std::fmt::Display;
    /// The error says the hub stopped: nothing to reconnect for.
    fn hub_gone(error: &Self::Error) -> bool;
    /// One connection's life, until it fails. `catch_up` holds the markers
    /// seen, kept across connections; set `became_up` once the connection
    /// delivered a marker.
    fn connection(
        &self,
        catch_up: &mut CatchUp,
        became_up: &mut bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Run `stream`'s connection until shutdown, reconnecting with [`Backoff`]
/// after each loss (reset once a connection came up).
pub(crate) async fn keep_connected<S: EventStream>(stream: &S, link: &SourceLink, what: &'static str) {
    let mut catch_up = CatchUp::default();
    let mut backoff = RECONNECT_BACKOFF;
    loop {
        let mut became_up = false;
        let outcome = tokio::select! {
            _ = link.shutdown.cancelled() => Ok(()),
            outcome = stream.connection(&mut catch_up, &mut became_up) => outcome,
        };
        link.set_up(false);
        let error = match outcome {
            Ok(()) => return,
            Err(e) if S::hub_gone(&e) => return,
            Err(e) => e,
        };
        if became_up {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        warn!(error = %error, retry_in = ?delay, "{what} lost; reconnecting");
        tokio::select! {
            _ = link.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The start of an untrusted payload, for a log line.
fn truncated(payload: &str) -> String {
    payload.chars().take(200).collect()
}

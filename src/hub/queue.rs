//! A connection's queue: what the hub has for one session, in order,
//! bounded. The hub's side of fan-out is one push per recipient, so this
//! is made to cost what a broadcaster pays per connection and no more:
//!
//! - one uncontended lock, one slot write, no allocation once the ring
//!   has grown to the connection's usual backlog (a tokio `mpsc` pays a
//!   semaphore, a block list and an atomic waker per message);
//! - one wake-up per batch: the session says it waits only when it found
//!   the queue empty, and only the first push after that wakes it (by
//!   reference: the waker is kept from one wait to the next);
//! - the session takes up to [`TAKE`] messages per lock, into a batch of
//!   its own, the next ones from there without touching the hub's cache
//!   lines.
//!
//! A full queue refuses the message (the hub then kicks the slow
//! consumer); what was queued before stays queued, for the session to
//! write before its 1013. Messages taken into the session's batch no
//! longer count against the capacity, like those a session has taken from
//! a channel: at most one batch more than the capacity is ever in flight.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use super::Outbound;

/// Messages taken from the shared ring per lock. The batch keeps its room
/// (24 bytes a message) for the connection's life: a few locks more, under
/// a backlog, weigh less than that room in every connection.
pub const TAKE: usize = 16;
/// A ring emptied with more room than this (a backlog that came and went)
/// gives the memory back: 10,000 connections each keeping the room of
/// their longest backlog was peak memory never returned.
const KEEP_SLOTS: usize = 32;

struct Shared {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    items: VecDeque<Outbound>,
    /// The session's, kept from one wait to the next (a clone and a drop
    /// per wake-up are two atomic operations on the task's count).
    waker: Option<Waker>,
    /// The session found the queue empty and waits: the next push wakes it.
    waiting: bool,
    /// The hub dropped its side: nothing more will come.
    sender_gone: bool,
    /// The session is gone: nothing more is taken.
    receiver_gone: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing here panics while holding the lock; if something did,
        // the ring is still consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue holds its capacity: a slow consumer.
    Full,
    /// The session has ended.
    Closed,
}

/// A queue of `capacity` messages: the hub's end and the session's.
pub fn queue(capacity: usize) -> (QueueSender, QueueReceiver) {
    let shared = Arc::new(Shared { capacity, inner: Mutex::new(Inner::default()) });
    (QueueSender { shared: Arc::clone(&shared) }, QueueReceiver { shared, batch: VecDeque::new() })
}

/// The hub's end. Dropping it ends the queue: the session takes what is
/// left, then sees the end.
pub struct QueueSender {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QueueSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSender").field("capacity", &self.shared.capacity).finish_non_exhaustive()
    }
}

impl QueueSender {
    /// Queue `message` without waiting; wakes the session if it waits.
    pub fn try_send(&self, message: Outbound) -> Result<(), Refusal> {
        let mut inner = self.shared.lock();
        if inner.receiver_gone {
            return Err(Refusal::Closed);
        }
        if inner.items.len() >= self.shared.capacity {
            return Err(Refusal::Full);
        }
        inner.items.push_back(message);
        if std::mem::take(&mut inner.waiting)
            && let Some(waker) = &inner.waker
        {
            // Under the lock, which only this session's queue takes: waking
            // a tokio task schedules it and returns.
            waker.wake_by_ref();
        }
        Ok(())
    }
}

impl Drop for QueueSender {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.sender_gone = true;
        inner.waiting = false;
        let waker = inner.waker.take();
        drop(inner);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The session's end.
pub struct QueueReceiver {
    shared: Arc<Shared>,
    /// Taken from the ring, not yet handed out.
    batch: VecDeque<Outbound>,
}

impl QueueReceiver {
    /// The next message, waiting for one; `None` once the hub dropped its
    /// end and everything queued was taken. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Outbound> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outbound>> {
        if let Some(message) = self.batch.pop_front() {
            return Poll::Ready(Some(message));
        }
        let mut inner = self.shared.lock();
        if let Some(message) = take(&mut inner, &mut self.batch) {
            return Poll::Ready(Some(message));
        }
        if inner.sender_gone {
            return Poll::Ready(None);
        }
        if !inner.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            inner.waker = Some(cx.waker().clone());
        }
        inner.waiting = true;
        Poll::Pending
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        if let Some(message) = self.batch.pop_front() {
            return Some(message);
        }
        let mut inner = self.shared.lock();
        take(&mut inner, &mut self.batch)
    }
}

/// Take up to [`TAKE`] messages from the ring: the first, and the rest
/// into `batch`.
fn take(inner: &mut Inner, batch: &mut VecDeque<Outbound>) -> Option<Outbound> {
    let first = inner.items.pop_front()?;
    let more = inner.items.len().min(TAKE - 1);
    batch.extend(inner.items.drain(..more));
    if inner.items.is_empty() && inner.items.capacity() > KEEP_SLOTS {
        inner.items = VecDeque::new();
    }
    Some(first)
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        let items = {
            let mut inner = self.shared.lock();
            inner.receiver_gone = true;
            // The session's task holds this queue: its waker here would
            // keep the task alive.
            inner.waker = None;
            std::mem::take(&mut inner.items)
        };
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;
    use crate::event::Topic;

    fn reply() -> Outbound {
        Outbound::Unsubscribed { topic: Topic::DeploymentEvents }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn full_refuses_and_keeps_what_was_queued() {
        let (tx, mut rx) = queue(2);
        assert_eq!(tx.try_send(reply()), Ok(()));
        assert_eq!(tx.try_send(reply()), Ok(()));
        assert_eq!(tx.try_send(reply()), Err(Refusal::Full));
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_none());
        assert_eq!(tx.try_send(reply()), Ok(()), "room again once taken");
    }

    #[test]
    fn one_wake_per_batch() {
        let (tx, mut rx) = queue(1000);
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_recv(&mut cx).is_pending());
        for _ in 0..100 {
            tx.try_send(reply()).unwrap();
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "the first push wakes; the rest find no waker");
        let mut taken = 0;
        while let Poll::Ready(Some(_)) = rx.poll_recv(&mut cx) {
            taken += 1;
        }
        assert_eq!(taken, 100);
        tx.try_send(reply()).unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2, "empty again: the next push wakes");
    }

    #[test]
    fn order_is_kept_across_batches() {
        let (tx, mut rx) = queue(1000);
        let topics: Vec<Topic> =
            (0..200).map(|_| Topic::parse(&format!("deployment_logs_{}", uuid::Uuid::new_v4())).unwrap()).collect();
        for (i, topic) in topics.iter().enumerate() {
            tx.try_send(Outbound::Unsubscribed { topic: *topic }).unwrap();
            if i == 100 {
                // Taken part-way: the rest follows what was taken.
                for expected in &topics[..10] {
                    assert!(matches!(rx.try_recv(), Some(Outbound::Unsubscribed { topic }) if topic == *expected));
                }
            }
        }
        for expected in &topics[10..] {
            assert!(matches!(rx.try_recv(), Some(Outbound::Unsubscribed { topic }) if topic == *expected));
        }
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn the_end_comes_after_what_was_queued() {
        let (tx, mut rx) = queue(4);
        tx.try_send(reply()).unwrap();
        drop(tx);
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_session_wakes_for_a_message_and_for_the_end() {
        let (tx, mut rx) = queue(4);
        let waiting = tokio::spawn(async move { (rx.recv().await.is_some(), rx.recv().await.is_none()) });
        tokio::task::yield_now().await;
        tx.try_send(reply()).unwrap();
        drop(tx);
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert!(matches!(outcome, Ok(Ok((true, true)))), "{outcome:?}");
    }

    #[test]
    fn a_gone_session_refuses_and_frees_what_was_queued() {
        let (tx, rx) = queue(4);
        tx.try_send(reply()).unwrap();
        drop(rx);
        assert_eq!(tx.try_send(reply()), Err(Refusal::Closed));
        assert!(tx.shared.lock().items.is_empty());
    }
}

//! A replay from the event log in progress: the pages of one `since`
//! resume, read one at a time under the server-wide limits of
//! [`EventLog`] (a query slot while each page is read, a share of the
//! replay memory while it is held), so that however many replays run and
//! however large the log, they share bounded database connections and
//! bounded memory. The driver writes each page before asking for the next,
//! and reads the client while it waits.

use crate::db::DbError;
use crate::db::events::{EventLog, Page, Pages, Replayed};
use crate::event::Topic;

pub struct Replaying {
    topic: Topic,
    pages: Box<Pages>,
}

impl Replaying {
    pub fn new(topic: Topic, pages: Box<Pages>) -> Replaying {
        Replaying { topic, pages }
    }

    pub fn topic(&self) -> Topic {
        self.topic
    }

    /// The next page, `None` once the log part is read to the end. Waits
    /// for its share of memory, then for a query slot.
    pub async fn next_page(&mut self, log: &EventLog) -> Result<Option<Page>, DbError> {
        log.next_page(&mut self.pages).await
    }

    /// What the pages read so far sent, assuming each was written.
    pub fn sent(&self) -> Replayed {
        self.pages.replayed()
    }
}

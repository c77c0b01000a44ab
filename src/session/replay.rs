//! A replay from the event log in progress: the pages of one `since`
//! resume, read one at a time under the server-wide limits of
//! [`crate::db::events::EventLog`] (a query slot while each page is read,
//! a share of the replay memory while it is held), so that however many
//! replays run and however large the log, they share bounded database
//! connections and bounded memory. The driver writes each page before asking for the next,
//! and reads the client while it waits.

use crate::db::events::{Pages, Replayed};

pub struct Replaying {
    pages: Box<Pages>,
}

impl Replaying {
    pub fn new(pages: Box<Pages>) -> Replaying {
        Replaying { pages }
    }

    /// Its pages, to read one at a time with [`crate::db::events::EventLog::next_page`]
    /// (which waits for a page's share of memory, then for a query slot).
    pub fn pages(&mut self) -> &mut Pages {
        &mut self.pages
    }

    /// What the pages read so far sent, assuming each was written.
    pub fn sent(&self) -> Replayed {
        self.pages.replayed()
    }
}

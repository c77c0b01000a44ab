//! The subscriber core: what one client asked for and what it is owed,
//! with no socket and no database. It takes the client's requests and the
//! hub's queue, and puts what to write, in order, in [`Subscriber::out`];
//! what needs the hub or the database it hands back as a [`Step`] or a
//! [`Work`] for the driver ([`super::driver`]) to do, and is told the answer.
//!
//! Its promises:
//!
//! - Replies come in request order. `subscribed` travels through the hub
//!   (so that it keeps its place among events); a reply produced while a
//!   hub answer is owed waits behind it.
//! - Events of one deployment arrive in commit order around a resume:
//!   while a `subscribe` with `since` is unanswered, events are held, then
//!   merged with its replay by commit order.
//! - A replay whose log part fails is followed by nothing of its topic:
//!   `unavailable`, and the subscription is undone, so the client's cursor
//!   for the topic stays where the replay left it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use tracing::{debug, info, warn};

use super::ResumeAsk;
use crate::auth::{Claims, Verifier, Viewer};
use crate::db::DbError;
use crate::db::events::{Pages, Replayed};
use crate::event::{Event, Topic};
use crate::hub::{ConnId, LogReplay, LookUp, Outbound, Replay, Resumed, Since, Subscribed};
use crate::protocol::{BadRequest, ClientMessage, ErrorCode, ServerMessage};

pub const MAX_SUBSCRIPTIONS: usize = 256;

/// Something to write, in order.
#[derive(Debug)]
pub enum Out {
    Event(Arc<Event>),
    /// Boxed: most of what is written is events, and this keeps an item
    /// two words.
    Reply(Box<ServerMessage>),
}

/// What a request needs besides the core.
#[derive(Debug)]
pub enum Step {
    /// Answered in `out`, or queued behind the hub's answers.
    Done,
    /// The first token was refused: the error is in `out`, then the
    /// connection closes (1008).
    AuthenticationFailed,
    /// A first token: register the viewer with the hub (and count the
    /// connection against the user's), then [`Subscriber::authenticated`].
    Register(Claims),
    /// A fresh token for the same user: if it changes the viewer (its
    /// organization or role), tell the hub; then [`Subscriber::authenticated`].
    Reauthenticate(Claims),
    /// Ask the database whether the viewer may watch `topic`, then
    /// [`Subscriber::permitted`].
    CheckPermission {
        topic: Topic,
        since: Option<i64>,
    },
    Hub(HubCall),
}

/// A request for the hub.
#[derive(Debug, PartialEq, Eq)]
pub enum HubCall {
    Subscribe(Topic, Option<Since>),
    Unsubscribe(Topic),
    /// A resume at connect: the owner feed and these topics, after `since`.
    Resume(Vec<Topic>, Option<Since>),
}

/// Database work an answer of the hub needs before the next message.
pub enum Work {
    /// Write the pages of the replay of `topic` as they come, then
    /// [`Subscriber::replayed`] with `recent`.
    Replay { topic: Topic, pages: Box<Pages>, recent: Vec<Arc<Event>> },
    /// Look `since` up in the event log, then [`Subscriber::looked_up`].
    LookUp { topic: Topic, since: i64 },
    /// The replay of a resume at connect from the event log: write its
    /// pages ([`Subscriber::resume_page`]), then [`Subscriber::resume_replayed`].
    ResumeReplay { topics: Vec<Topic>, pages: Box<Pages>, recent: Vec<Arc<Event>> },
    /// Look the `since` of a resume at connect up, then
    /// [`Subscriber::resume_looked_up`].
    LookUpResume { since: i64 },
}

/// A resume at connect being prepared: each named topic's answer, in the
/// order named, and its `since`.
#[derive(Debug)]
pub struct Resuming {
    answers: Vec<Answer>,
    since: Option<i64>,
    /// The topics were checked already.
    pub checked: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// `subscribed`, with the resume's cursor.
    Topic(Topic),
    /// This error, in the topic's place.
    Refused(Box<ServerMessage>),
}

impl Resuming {
    /// The topics still to check, once each.
    pub fn to_check(&self) -> Vec<Topic> {
        if self.checked {
            return Vec::new();
        }
        let mut topics = Vec::new();
        for answer in &self.answers {
            if let Answer::Topic(topic) = answer
                && topic.deployment().is_some()
                && !topics.contains(topic)
            {
                topics.push(*topic);
            }
        }
        topics
    }

    /// The database's answer to whether the viewer may watch `topic`.
    pub fn permit(&mut self, conn: ConnId, topic: Topic, answer: Result<bool, DbError>) {
        let refusal = match answer {
            Ok(true) => return,
            Ok(false) => {
                info!(conn, topic = %topic, "resume: topic refused");
                ServerMessage::error(
                    ErrorCode::Forbidden,
                    "no such deployment, or not yours to see",
                    Some(&topic.to_string()),
                )
            }
            Err(e) => {
                warn!(conn, topic = %topic, error = %e, "resume: permission check failed");
                let message = "cannot check permission now; subscribe again with since";
                ServerMessage::error(ErrorCode::Unavailable, message, Some(&topic.to_string()))
            }
        };
        for answer in &mut self.answers {
            if *answer == Answer::Topic(topic) {
                *answer = Answer::Refused(Box::new(refusal.clone()));
            }
        }
    }

    /// The topics the hub subscribes, once each, in the order named.
    fn topics(&self) -> Vec<Topic> {
        let mut topics = Vec::new();
        for answer in &self.answers {
            if let Answer::Topic(topic) = answer
                && !topics.contains(topic)
            {
                topics.push(*topic);
            }
        }
        topics
    }
}

/// A reply in request order.
#[derive(Debug)]
enum Reply {
    /// The hub owes an answer.
    Hub(Owed),
    /// Written once every answer before it is.
    Ready(Box<ServerMessage>),
}

#[derive(Debug, PartialEq, Eq)]
enum Owed {
    /// A subscribe; `held` when events wait for its answer (a resume).
    Subscribe {
        topic: Topic,
        held: bool,
    },
    Unsubscribe,
    /// A resume at connect ([`Resuming`]); it holds events.
    Resume {
        answers: Vec<Answer>,
        topics: Vec<Topic>,
    },
    /// The undoing of a subscription whose replay failed: the client asked
    /// nothing, so its answer is not written.
    Undo,
}

pub struct Subscriber {
    conn: ConnId,
    claims: Option<Claims>,
    topics: HashSet<Topic>,
    /// Replies in request order, from the first answer the hub owes.
    replies: VecDeque<Reply>,
    /// Subscribes the hub has not answered that hold events...
    holding: usize,
    /// ...and the events held meanwhile (with replays' recent events), to
    /// be written in commit order when the last one is answered.
    held: Vec<Arc<Event>>,
    /// How many of `held` came live from the queue.
    held_live: usize,
    /// What this connection's replays from the event log sent, so that a
    /// later one does not send it again (two resumes whose topics overlap).
    replayed: Vec<Replayed>,
    /// Topics being undone: their events still in the queue are dropped.
    undoing: Vec<Topic>,
    /// The resume at connect the request named, until the first token.
    resume_ask: Option<ResumeAsk>,
    /// What to write next, in order; the driver writes and empties it.
    pub out: Vec<Out>,
}

impl Subscriber {
    pub fn new(conn: ConnId) -> Subscriber {
        Subscriber {
            conn,
            claims: None,
            topics: HashSet::new(),
            replies: VecDeque::new(),
            holding: 0,
            held: Vec::new(),
            held_live: 0,
            replayed: Vec::new(),
            undoing: Vec::new(),
            resume_ask: None,
            out: Vec::new(),
        }
    }

    pub fn claims(&self) -> Option<Claims> {
        self.claims
    }

    /// Live events held behind resumes: they count against the queue.
    pub fn held_live(&self) -> usize {
        self.held_live
    }

    /// Whether the queue follows on from what was written: not while
    /// events are held behind a resume.
    pub fn holds_events(&self) -> bool {
        self.holding > 0
    }

    /// A text frame from the client.
    pub fn request(&mut self, text: &str, verifier: &Verifier) -> Step {
        let message = match ClientMessage::parse(text) {
            Ok(message) => message,
            Err(BadRequest(why)) => {
                debug!(conn = self.conn, reason = %why, "bad request");
                self.error(ErrorCode::BadRequest, &why, None);
                return Step::Done;
            }
        };
        match message {
            ClientMessage::Ping => {
                self.reply(ServerMessage::pong());
                Step::Done
            }
            ClientMessage::Auth { token, topics, since } => {
                if self.claims.is_none() && (!topics.is_empty() || since.is_some()) {
                    self.resume_ask.get_or_insert_with(ResumeAsk::default).join(topics, since);
                }
                self.auth(&token, verifier)
            }
            ClientMessage::Subscribe { topic, since } => self.subscribe(&topic, since),
            ClientMessage::Unsubscribe { topic } => self.unsubscribe(&topic),
        }
    }

    pub fn binary_frame(&mut self) {
        self.error(ErrorCode::BadRequest, "binary frames are not supported; send JSON text", None);
    }

    fn auth(&mut self, token: &str, verifier: &Verifier) -> Step {
        match verifier.verify(token) {
            Ok(claims) => match self.claims {
                None => Step::Register(claims),
                Some(current) if current.viewer.user_id != claims.viewer.user_id => {
                    self.error(ErrorCode::Forbidden, "a fresh token must be for the same user (sub)", None);
                    Step::Done
                }
                Some(_) => Step::Reauthenticate(claims),
            },
            Err(e) => {
                warn!(conn = self.conn, reason = %e, authenticated = self.claims.is_some(), "auth refused");
                self.error(ErrorCode::for_auth(&e), &e.to_string(), None);
                match self.claims {
                    None => Step::AuthenticationFailed,
                    // A failed refresh leaves the current token in force until its exp.
                    Some(_) => Step::Done,
                }
            }
        }
    }

    /// The resume at connect the request named (its URL), if any.
    pub fn ask_resume(&mut self, ask: ResumeAsk) {
        if !ask.is_empty() {
            self.resume_ask = Some(ask);
        }
    }

    /// The resume at connect to make once registered, if one was asked for.
    pub fn take_resume(&mut self) -> Option<ResumeAsk> {
        self.resume_ask.take()
    }

    /// Whether a resume at connect waits for the hub: requests wait for it
    /// (the hub answers them in order, and it comes first).
    pub fn resuming(&self) -> bool {
        matches!(self.replies.front(), Some(Reply::Hub(Owed::Resume { .. })))
    }

    /// Read the topics a resume at connect names, in order: an unknown one
    /// gets `invalid_topic`, those past the limit `too_many_subscriptions`,
    /// each in its place. A `since` that could not be read gets
    /// `bad_request` now, and nothing is resumed.
    pub fn start_resume(&mut self, ask: ResumeAsk) -> Option<Resuming> {
        if let Some(why) = ask.bad_since {
            debug!(conn = self.conn, reason = %why, "resume refused");
            self.error(ErrorCode::BadRequest, &format!("{why}; nothing was resumed"), None);
            return None;
        }
        let mut answers = Vec::with_capacity(ask.topics.len());
        let mut distinct: HashSet<Topic> = HashSet::new();
        for name in &ask.topics {
            let answer = match Topic::parse(name) {
                None => {
                    let message = format!("unknown topic; expected {}", Topic::forms());
                    Answer::Refused(Box::new(ServerMessage::error(ErrorCode::InvalidTopic, message, Some(name))))
                }
                Some(topic) if !distinct.contains(&topic) && distinct.len() >= MAX_SUBSCRIPTIONS => {
                    let message = format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection");
                    let error =
                        ServerMessage::error(ErrorCode::TooManySubscriptions, message, Some(&topic.to_string()));
                    Answer::Refused(Box::new(error))
                }
                Some(topic) => {
                    distinct.insert(topic);
                    Answer::Topic(topic)
                }
            };
            answers.push(answer);
        }
        Some(Resuming { answers, since: ask.since, checked: ask.checked })
    }

    /// The resume at connect, its topics checked: ask the hub to place it.
    pub fn resume(&mut self, resuming: Resuming) -> HubCall {
        let topics = resuming.topics();
        self.topics.extend(topics.iter().copied());
        let since = resuming.since;
        let user_id = self.claims.map(|c| c.viewer.user_id.to_string()).unwrap_or_default();
        info!(conn = self.conn, user_id, topics = topics.len(), ?since, "resuming at connect");
        self.replies.push_back(Reply::Hub(Owed::Resume { answers: resuming.answers, topics: topics.clone() }));
        self.holding += 1;
        HubCall::Resume(topics, since.map(Since::Unchecked))
    }

    /// The hub placed the resume at connect: each named topic's answer in
    /// order, then what the union owes (the log part is work).
    fn resumed(&mut self, resumed: Resumed) -> Option<Work> {
        let Resumed { topics, cursor, replay } = resumed;
        if let Some(Reply::Hub(Owed::Resume { answers, .. })) = self.replies.front_mut() {
            for answer in std::mem::take(answers) {
                let reply = match answer {
                    Answer::Topic(topic) => Box::new(ServerMessage::Subscribed { topic, event_id: Some(cursor) }),
                    Answer::Refused(error) => error,
                };
                self.out.push(Out::Reply(reply));
            }
        }
        let Some(Replay { resync, from_log, recent }) = replay else {
            self.answered_subscribe();
            return None;
        };
        if resync {
            self.resync_all(&topics);
        }
        match (from_log, self.claims) {
            (Some(log), Some(claims)) => {
                let pages = Box::new(Pages::resume(topics.clone(), claims.viewer, log, resync));
                Some(Work::ResumeReplay { topics, pages, recent })
            }
            _ => {
                self.held.extend(recent);
                self.answered_subscribe();
                None
            }
        }
    }

    /// `resync` for a resume: one per topic, or for `deployment_events`
    /// when it names none (the owner feed is a part of it).
    fn resync_all(&mut self, topics: &[Topic]) {
        let all = [Topic::DeploymentEvents];
        let named = if topics.is_empty() { &all[..] } else { topics };
        for &topic in named {
            self.out.push(Out::Reply(Box::new(ServerMessage::Resync { topic })));
        }
    }

    /// A page of a resume's replay from the event log.
    pub fn resume_page(&mut self, topics: &[Topic], pruned: bool, events: &mut Vec<Arc<Event>>) {
        if pruned {
            self.resync_all(topics);
        }
        self.out.extend(events.drain(..).map(Out::Event));
    }

    /// The log part of the resume at connect is written (`Ok`, with what
    /// it sent per topic), or it failed part-way: then the client gets
    /// `unavailable` and the connection closes (what it has is a gap-free
    /// prefix; it reconnects with the cursor it holds). False: close.
    pub fn resume_replayed(&mut self, recent: Vec<Arc<Event>>, outcome: Result<Vec<Replayed>, ()>) -> bool {
        match outcome {
            Ok(sent) => {
                for replayed in sent {
                    Replayed::remember(&mut self.replayed, replayed);
                }
                self.held.extend(recent);
                self.answered_subscribe();
                true
            }
            Err(()) => {
                let message = "replay from the event log failed; reconnect with since";
                self.out.push(Out::Reply(Box::new(ServerMessage::error(ErrorCode::Unavailable, message, None))));
                false
            }
        }
    }

    /// What the event log said of a resume's `since` newer than anything
    /// the hub had: the hub is asked again. Without an answer the client
    /// gets `unavailable` and the connection closes (false).
    pub fn resume_looked_up(&mut self, since: i64, answer: Result<Since, DbError>) -> Option<HubCall> {
        let topics = match self.replies.front() {
            Some(Reply::Hub(Owed::Resume { topics, .. })) => topics.clone(),
            _ => return None,
        };
        match answer {
            Ok(since) => Some(HubCall::Resume(topics, Some(since))),
            Err(e) => {
                warn!(conn = self.conn, since, error = %e, "cannot look up a resume's since in the event log");
                let message = "cannot look up since in the event log now; reconnect with since";
                self.out.push(Out::Reply(Box::new(ServerMessage::error(ErrorCode::Unavailable, message, None))));
                None
            }
        }
    }

    /// The hub knows the viewer of `claims`: answer `authenticated`.
    pub fn authenticated(&mut self, claims: Claims) {
        let viewer = claims.viewer;
        if self.claims.is_some_and(|current| current.viewer != viewer) {
            // What earlier log replays sent was what the old viewer could
            // see: it says nothing of what this one is owed.
            self.replayed.clear();
        }
        self.claims = Some(claims);
        info!(conn = self.conn, user_id = %viewer.user_id, superuser = viewer.is_superuser, "authenticated");
        self.reply(ServerMessage::authenticated(viewer.user_id, claims.expires_at_time()));
    }

    /// A first token the server cannot take: the user holds `max`
    /// connections. The connection is then closed.
    pub fn too_many_connections(&mut self, max: usize) {
        let message = format!("this user already holds {max} connections (WINDFLOW_MAX_CONNECTIONS_PER_USER)");
        self.error(ErrorCode::TooManyConnections, &message, None);
    }

    /// The token expired: the error before the close.
    pub fn token_expired(&mut self) {
        let message =
            ServerMessage::error(ErrorCode::TokenExpired, "token expired; send a fresh auth before exp", None);
        self.out.push(Out::Reply(Box::new(message)));
    }

    /// The topic a request names, once authenticated; otherwise the
    /// request is answered with the error.
    fn topic_of(&mut self, name: &str) -> Option<Topic> {
        if self.claims.is_none() {
            self.error(ErrorCode::Unauthorized, "authenticate first", Some(name));
            return None;
        }
        let topic = Topic::parse(name);
        if topic.is_none() {
            let message = format!("unknown topic; expected {}", Topic::forms());
            self.error(ErrorCode::InvalidTopic, &message, Some(name));
        }
        topic
    }

    fn subscribe(&mut self, name: &str, since: Option<i64>) -> Step {
        let Some(topic) = self.topic_of(name) else { return Step::Done };
        if !self.topics.contains(&topic) && self.topics.len() >= MAX_SUBSCRIPTIONS {
            let message = format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection");
            self.error(ErrorCode::TooManySubscriptions, &message, Some(&topic.to_string()));
            return Step::Done;
        }
        Step::CheckPermission { topic, since }
    }

    /// The database's answer to [`Step::CheckPermission`].
    pub fn permitted(&mut self, topic: Topic, since: Option<i64>, answer: Result<bool, DbError>) -> Option<HubCall> {
        let topic_name = topic.to_string();
        match answer {
            Ok(true) => {}
            Ok(false) => {
                let user_id = self.claims.map(|c| c.viewer.user_id.to_string()).unwrap_or_default();
                info!(conn = self.conn, user_id, topic = %topic_name, "subscription refused");
                self.error(ErrorCode::Forbidden, "no such deployment, or not yours to see", Some(&topic_name));
                return None;
            }
            Err(e) => {
                warn!(conn = self.conn, topic = %topic_name, error = %e, "permission check failed");
                self.error(ErrorCode::Unavailable, "cannot check permission now; try again", Some(&topic_name));
                return None;
            }
        }
        self.topics.insert(topic);
        let held = since.is_some();
        self.replies.push_back(Reply::Hub(Owed::Subscribe { topic, held }));
        if held {
            self.holding += 1;
        }
        debug!(conn = self.conn, topic = %topic_name, ?since, "subscribing");
        Some(HubCall::Subscribe(topic, since.map(Since::Unchecked)))
    }

    fn unsubscribe(&mut self, name: &str) -> Step {
        let Some(topic) = self.topic_of(name) else { return Step::Done };
        self.topics.remove(&topic);
        self.replayed.retain(|r| r.topic != topic);
        self.replies.push_back(Reply::Hub(Owed::Unsubscribe));
        Step::Hub(HubCall::Unsubscribe(topic))
    }

    /// A message from the hub's queue: an event joins `out` (or waits
    /// behind a resume, or is dropped for a topic being undone); a reply
    /// takes its place in `out`. Work comes back when the answer needs the
    /// database before anything after it may be written.
    pub fn outbound(&mut self, message: Outbound) -> Option<Work> {
        match message {
            Outbound::Event(event) => {
                self.take_event(event);
                None
            }
            // Boxed by the hub: rare next to events.
            Outbound::Subscribed(reply) => self.subscribed(*reply),
            Outbound::LookUp(look_up) => {
                let LookUp { topic, since } = *look_up;
                Some(Work::LookUp { topic, since })
            }
            Outbound::Resumed(resumed) => self.resumed(*resumed),
            Outbound::ResumeLookUp(since) => Some(Work::LookUpResume { since }),
            Outbound::Unsubscribed { topic } => {
                if matches!(self.replies.front(), Some(Reply::Hub(Owed::Undo))) {
                    self.undoing.retain(|t| *t != topic);
                } else {
                    self.out.push(Out::Reply(Box::new(ServerMessage::Unsubscribed { topic })));
                }
                self.hub_answered();
                None
            }
        }
    }

    fn take_event(&mut self, event: Arc<Event>) {
        if !self.undoing.is_empty() && !self.owed_without(&event, None) {
            return;
        }
        if self.holding > 0 {
            self.held.push(event);
            self.held_live += 1;
        } else {
            self.out.push(Out::Event(event));
        }
    }

    /// Whether the connection is owed `event` by its owner feed or by a
    /// subscription other than `except` and those being undone. Errs
    /// towards yes: a subscription still waiting for the hub counts.
    fn owed_without(&self, event: &Event, except: Option<Topic>) -> bool {
        let own = self.claims.is_some_and(|c| c.viewer.user_id == event.owner);
        own || self
            .topics
            .iter()
            .any(|&t| Some(t) != except && !self.undoing.contains(&t) && t.carries(event.kind, event.deployment_id))
    }

    fn subscribed(&mut self, reply: Subscribed) -> Option<Work> {
        let Subscribed { topic, cursor, replay } = reply;
        self.out.push(Out::Reply(Box::new(ServerMessage::Subscribed { topic, event_id: Some(cursor) })));
        let Some(Replay { resync, from_log, recent }) = replay else {
            self.answered_subscribe();
            return None;
        };
        if resync {
            self.out.push(Out::Reply(Box::new(ServerMessage::Resync { topic })));
        }
        match (from_log, self.claims) {
            (Some(log), Some(claims)) => Some(self.replay(topic, claims.viewer, log, resync, recent)),
            _ => {
                self.held.extend(recent);
                self.answered_subscribe();
                None
            }
        }
    }

    fn replay(&self, topic: Topic, viewer: Viewer, log: LogReplay, resynced: bool, recent: Vec<Arc<Event>>) -> Work {
        let pages = Box::new(Pages::new(topic, viewer, log, resynced, self.replayed.clone()));
        Work::Replay { topic, pages, recent }
    }

    /// A page of the replay of `topic` from the event log: `resync` first
    /// when retention pruned what it should have held.
    pub fn replay_page(&mut self, topic: Topic, pruned: bool, events: &mut Vec<Arc<Event>>) {
        if pruned {
            self.out.push(Out::Reply(Box::new(ServerMessage::Resync { topic })));
        }
        self.out.extend(events.drain(..).map(Out::Event));
    }

    /// The log part of the replay of `topic` is written (`Ok`, with what it
    /// sent), or it failed part-way (`Err`): then the client gets
    /// `unavailable` and nothing more of that replay or that topic; the
    /// subscription is undone unless the client already asked for the topic
    /// again. The hub's answer to an undoing is not written.
    pub fn replayed(
        &mut self,
        topic: Topic,
        recent: Vec<Arc<Event>>,
        outcome: Result<Replayed, Replayed>,
    ) -> Option<HubCall> {
        let mut undo = None;
        match outcome {
            Ok(sent) => {
                Replayed::remember(&mut self.replayed, sent);
                self.held.extend(recent);
            }
            Err(sent) => {
                let message = "replay from the event log failed; subscribe again with since";
                self.error_now(ErrorCode::Unavailable, message, &topic.to_string());
                let asked_again = self
                    .replies
                    .iter()
                    .skip(1)
                    .any(|r| matches!(r, Reply::Hub(Owed::Subscribe { topic: t, .. }) if *t == topic));
                if asked_again {
                    // Its answer follows, planned on this subscription: it
                    // counts what this one delivered as sent.
                    Replayed::remember(&mut self.replayed, sent);
                    self.held.extend(recent);
                } else {
                    // Without the subscription the hub no longer counts its
                    // events as sent, so a later resume replays them; what
                    // this replay sent may then come twice, never not at all.
                    self.topics.remove(&topic);
                    self.replayed.retain(|r| r.topic != topic);
                    let before = self.held.len();
                    let kept: Vec<Arc<Event>> = std::mem::take(&mut self.held)
                        .into_iter()
                        .filter(|e| self.owed_without(e, Some(topic)))
                        .collect();
                    self.held_live = self.held_live.saturating_sub(before - kept.len());
                    self.held = kept;
                    self.undoing.push(topic);
                    self.replies.push_back(Reply::Hub(Owed::Undo));
                    undo = Some(HubCall::Unsubscribe(topic));
                }
            }
        }
        self.answered_subscribe();
        undo
    }

    /// What the event log said of a `since` the history did not hold. The
    /// hub did not subscribe: with the answer it is asked again; without,
    /// the subscribe fails as a whole and the client tries it again.
    pub fn looked_up(&mut self, topic: Topic, since: i64, answer: Result<Since, DbError>) -> Option<HubCall> {
        match answer {
            Ok(since) => Some(HubCall::Subscribe(topic, Some(since))),
            Err(e) => {
                warn!(conn = self.conn, topic = %topic, since, error = %e, "cannot look up since in the event log");
                self.topics.remove(&topic);
                let message = "cannot look up since in the event log now; subscribe again with since";
                self.error_now(ErrorCode::Unavailable, message, &topic.to_string());
                self.answered_subscribe();
                None
            }
        }
    }

    /// A subscribe waiting for the database was given up: the client
    /// unsubscribed from its topic meanwhile. `subscribed` with `since` as
    /// cursor answers it (nothing of the topic was sent, so a resume from
    /// there loses nothing), and the unsubscribe follows.
    pub fn look_up_abandoned(&mut self, topic: Topic, since: i64) {
        self.out.push(Out::Reply(Box::new(ServerMessage::Subscribed { topic, event_id: Some(since) })));
        self.answered_subscribe();
    }

    /// The oldest owed subscribe is answered: when no resume holds events
    /// any more, the held ones follow, merged by commit order; then the
    /// replies that waited behind it.
    fn answered_subscribe(&mut self) {
        if let Some(Reply::Hub(Owed::Subscribe { held: true, .. } | Owed::Resume { .. })) = self.replies.front() {
            self.holding = self.holding.saturating_sub(1);
        }
        if self.holding == 0 && !self.held.is_empty() {
            // Live events held while the resume was answered, and the
            // replay's recent events: one stream in commit order.
            let mut held = std::mem::take(&mut self.held);
            self.held_live = 0;
            held.sort_by_key(|event| event.seq);
            self.out.extend(held.into_iter().map(Out::Event));
        }
        self.hub_answered();
    }

    /// The hub answered the oldest owed request: the replies that waited
    /// behind it follow, up to the next answer owed.
    fn hub_answered(&mut self) {
        if matches!(self.replies.front(), Some(Reply::Hub(_))) {
            self.replies.pop_front();
        }
        while let Some(Reply::Ready(_)) = self.replies.front() {
            if let Some(Reply::Ready(message)) = self.replies.pop_front() {
                self.out.push(Out::Reply(message));
            }
        }
        if self.replies.is_empty() {
            // Most connections subscribe once or twice: keep no buffer.
            self.replies = VecDeque::new();
        }
    }

    /// Whether a reply now would have to wait behind an answer of the hub.
    pub fn replies_owed(&self) -> usize {
        self.replies.len()
    }

    /// A reply to a request: now, or after the hub's answers it must not
    /// overtake.
    fn reply(&mut self, message: ServerMessage) {
        if self.replies.is_empty() {
            self.out.push(Out::Reply(Box::new(message)));
        } else {
            self.replies.push_back(Reply::Ready(Box::new(message)));
        }
    }

    fn error(&mut self, code: ErrorCode, message: &str, topic: Option<&str>) {
        self.reply(ServerMessage::error(code, message, topic));
    }

    /// An error that answers the owed request being answered now.
    fn error_now(&mut self, code: ErrorCode, message: &str, topic: &str) {
        self.out.push(Out::Reply(Box::new(ServerMessage::error(code, message, Some(topic)))));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use super::*;
    use crate::auth::{TokenRequest, sign};
    use crate::config::JwtArgs;
    use crate::event::EventKind;
    use crate::session::ResumeAsk;

    const SECRET: &str = "core-tests";

    fn verifier() -> Verifier {
        let args = JwtArgs {
            jwt_algorithm: jsonwebtoken::Algorithm::HS256,
            jwt_secret_key: Some(SECRET.into()),
            jwt_public_key_file: None,
            jwt_audience: None,
            jwt_issuer: None,
        };
        Verifier::from_args(&args).unwrap()
    }

    fn viewer() -> Viewer {
        Viewer { user_id: Uuid::new_v4(), organization_id: None, is_superuser: true }
    }

    fn token(viewer: Viewer) -> String {
        let request = TokenRequest { viewer, ttl: Duration::from_secs(60), audience: None, issuer: None };
        sign(&request, jsonwebtoken::Algorithm::HS256, Some(SECRET), None).unwrap()
    }

    fn logs(deployment: Uuid) -> Topic {
        Topic::Deployment { kind: EventKind::LogsUpdate, deployment }
    }

    fn event(id: i64, seq: u64, deployment: Uuid, owner: Uuid) -> Arc<Event> {
        let mut event = Event::new(id, EventKind::LogsUpdate, deployment, owner, None, "{}");
        event.seq = seq;
        Arc::new(event)
    }

    /// A subscriber authenticated as `viewer`, its `authenticated` taken.
    fn authenticated(viewer: Viewer) -> Subscriber {
        let mut core = Subscriber::new(1);
        let Step::Register(claims) = core.request(&auth(viewer), &verifier()) else { panic!("register") };
        core.authenticated(claims);
        assert_eq!(written(&mut core), ["authenticated"]);
        core
    }

    fn auth(viewer: Viewer) -> String {
        serde_json::json!({"type": "auth", "token": token(viewer)}).to_string()
    }

    /// Subscribe through the core as the driver does: the permission is
    /// granted and the hub call comes back.
    fn subscribe(core: &mut Subscriber, topic: Topic, since: Option<i64>) {
        let text = serde_json::json!({"type": "subscribe", "topic": topic.to_string(), "since": since}).to_string();
        let Step::CheckPermission { topic: asked, since: sent } = core.request(&text, &verifier()) else {
            panic!("a permission check")
        };
        assert_eq!((asked, sent), (topic, since));
        let call = core.permitted(topic, since, Ok(true));
        assert_eq!(call, Some(HubCall::Subscribe(topic, since.map(Since::Unchecked))));
    }

    /// What `out` holds, as message types or event ids, emptied.
    fn written(core: &mut Subscriber) -> Vec<String> {
        core.out
            .drain(..)
            .map(|out| match out {
                Out::Event(e) => e.id.to_string(),
                Out::Reply(reply) => match *reply {
                    ServerMessage::Error { code, .. } => serde_json::to_value(code).unwrap().as_str().unwrap().into(),
                    other => serde_json::to_value(&other).unwrap()["type"].as_str().unwrap().into(),
                },
            })
            .collect()
    }

    fn subscribed(topic: Topic, cursor: i64, replay: Option<Replay>) -> Outbound {
        Outbound::Subscribed(Box::new(Subscribed { topic, cursor, replay }))
    }

    fn from_log(since: i64) -> Option<LogReplay> {
        Some(LogReplay { since, before: i64::MAX, skip: Vec::new() })
    }

    #[test]
    fn replies_keep_request_order_behind_the_hubs_answer() {
        let mut core = authenticated(viewer());
        let topic = logs(Uuid::new_v4());
        subscribe(&mut core, topic, None);
        assert!(matches!(core.request("ping", &verifier()), Step::Done));
        assert!(matches!(core.request("not json", &verifier()), Step::Done));
        assert!(written(&mut core).is_empty(), "the pong and the error wait for subscribed");
        assert!(core.outbound(subscribed(topic, 5, None)).is_none());
        assert_eq!(written(&mut core), ["subscribed", "pong", "bad_request"]);
        assert!(matches!(core.request("ping", &verifier()), Step::Done));
        assert_eq!(written(&mut core), ["pong"], "nothing owed: at once");
    }

    #[test]
    fn events_held_behind_a_resume_are_merged_with_its_replay_in_commit_order() {
        let me = viewer();
        let mut core = authenticated(me);
        let deployment = Uuid::new_v4();
        let topic = logs(deployment);
        subscribe(&mut core, topic, Some(3));
        for (id, seq) in [(9, 9), (8, 8)] {
            core.outbound(Outbound::Event(event(id, seq, deployment, me.user_id)));
        }
        assert!(written(&mut core).is_empty(), "live events wait for the resume");
        assert_eq!(core.held_live(), 2);
        let recent = vec![event(4, 4, deployment, me.user_id), event(7, 7, deployment, me.user_id)];
        let replay = Replay { resync: false, from_log: None, recent };
        assert!(core.outbound(subscribed(topic, 3, Some(replay))).is_none());
        assert_eq!(written(&mut core), ["subscribed", "4", "7", "8", "9"]);
        assert_eq!(core.held_live(), 0);
    }

    #[test]
    fn after_a_failed_replay_nothing_of_its_topic_follows_until_the_hub_has_undone_it() {
        let me = Viewer { is_superuser: true, ..viewer() };
        let mut core = authenticated(me);
        let (watched, own) = (Uuid::new_v4(), Uuid::new_v4());
        let stranger = Uuid::new_v4();
        let topic = logs(watched);
        subscribe(&mut core, topic, Some(3));
        // Held while the resume is answered: one of the topic, one of the
        // viewer's own deployments (its owner feed).
        core.outbound(Outbound::Event(event(10, 10, watched, stranger)));
        core.outbound(Outbound::Event(event(11, 11, own, me.user_id)));
        let replay = Replay { resync: false, from_log: from_log(3), recent: vec![event(5, 5, watched, stranger)] };
        let Some(Work::Replay { topic: replayed_topic, recent, .. }) =
            core.outbound(subscribed(topic, 3, Some(replay)))
        else {
            panic!("a replay from the log")
        };
        assert_eq!(replayed_topic, topic);
        assert_eq!(written(&mut core), ["subscribed"]);
        assert!(matches!(core.request("ping", &verifier()), Step::Done), "a request behind the resume");
        let sent = Replayed { topic, since: 3, upto: 3 };
        let undo = core.replayed(topic, recent, Err(sent));
        assert_eq!(undo, Some(HubCall::Unsubscribe(topic)), "the subscription is undone");
        assert_eq!(
            written(&mut core),
            ["unavailable", "11", "pong"],
            "the owner's event stays, the topic's are dropped; then the reply that waited"
        );
        // The hub still delivers the topic until it has the undoing...
        core.outbound(Outbound::Event(event(12, 12, watched, stranger)));
        core.outbound(Outbound::Event(event(13, 13, own, me.user_id)));
        assert_eq!(written(&mut core), ["13"]);
        assert!(matches!(core.request("ping", &verifier()), Step::Done));
        assert!(written(&mut core).is_empty(), "a reply now waits for the undoing");
        // ...whose answer is not written, and then the reply that waited.
        core.outbound(Outbound::Unsubscribed { topic });
        assert_eq!(written(&mut core), ["pong"]);
        // A subscribe again is a subscription like any other.
        subscribe(&mut core, topic, Some(3));
        core.outbound(subscribed(topic, 3, None));
        core.outbound(Outbound::Event(event(14, 14, watched, stranger)));
        assert_eq!(written(&mut core), ["subscribed", "14"]);
    }

    #[test]
    fn a_failed_replay_of_a_topic_asked_for_again_is_not_undone() {
        let me = viewer();
        let mut core = authenticated(me);
        let deployment = Uuid::new_v4();
        let topic = logs(deployment);
        subscribe(&mut core, topic, Some(3));
        subscribe(&mut core, topic, Some(3));
        let replay = Replay { resync: false, from_log: from_log(3), recent: Vec::new() };
        let Some(Work::Replay { recent, .. }) = core.outbound(subscribed(topic, 3, Some(replay))) else {
            panic!("a replay")
        };
        let undo = core.replayed(topic, recent, Err(Replayed { topic, since: 3, upto: 3 }));
        assert_eq!(undo, None, "the second subscribe's answer follows, made on this subscription");
        assert_eq!(written(&mut core), ["subscribed", "unavailable"]);
    }

    #[test]
    fn a_look_up_that_fails_answers_the_subscribe_with_unavailable() {
        let mut core = authenticated(viewer());
        let topic = logs(Uuid::new_v4());
        subscribe(&mut core, topic, Some(3));
        let look_up = Outbound::LookUp(Box::new(LookUp { topic, since: 3 }));
        assert!(matches!(core.outbound(look_up), Some(Work::LookUp { since: 3, .. })));
        assert_eq!(core.looked_up(topic, 3, Err(DbError::Closed)), None);
        assert_eq!(written(&mut core), ["unavailable"]);
        assert!(!core.holds_events());
    }

    #[test]
    fn a_resume_at_connect_answers_each_named_topic_in_order_then_its_replay_then_what_waited() {
        let me = viewer();
        let mut core = authenticated(me);
        let (d, refused) = (Uuid::new_v4(), Uuid::new_v4());
        let names = vec![logs(d).to_string(), "nope".into(), logs(refused).to_string(), logs(d).to_string()];
        let ask = ResumeAsk { topics: names, since: Some(3), ..ResumeAsk::default() };
        let mut resuming = core.start_resume(ask).expect("a good since");
        assert_eq!(resuming.to_check(), [logs(d), logs(refused)], "each topic checked once");
        resuming.permit(1, logs(refused), Ok(false));
        assert_eq!(core.resume(resuming), HubCall::Resume(vec![logs(d)], Some(Since::Unchecked(3))));
        assert!(core.resuming());
        assert!(matches!(core.request("ping", &verifier()), Step::Done));
        core.outbound(Outbound::Event(event(9, 9, d, me.user_id)));
        assert!(written(&mut core).is_empty(), "everything waits for the resume's answer");
        let replay = Replay { resync: false, from_log: None, recent: vec![event(4, 4, d, me.user_id)] };
        let resumed = Resumed { topics: vec![logs(d)], cursor: 3, replay: Some(replay) };
        assert!(core.outbound(Outbound::Resumed(Box::new(resumed))).is_none());
        assert_eq!(
            written(&mut core),
            ["subscribed", "invalid_topic", "forbidden", "subscribed", "4", "9", "pong"],
            "the named topics in order, the replay merged with what was held, then the reply that waited"
        );
        assert!(!core.resuming());
    }

    #[test]
    fn a_resume_with_a_bad_since_is_a_bad_request_and_resumes_nothing() {
        let mut core = authenticated(viewer());
        let mut ask = ResumeAsk { topics: vec!["deployment_events".into()], ..ResumeAsk::default() };
        ask.since_from(Some("-1"));
        assert!(core.start_resume(ask).is_none());
        assert_eq!(written(&mut core), ["bad_request"]);
    }

    #[test]
    fn tokens_first_bad_closes_other_user_forbidden_same_user_refreshes() {
        let mut core = Subscriber::new(1);
        assert!(matches!(core.request(r#"{"type":"subscribe","topic":"deployment_events"}"#, &verifier()), Step::Done));
        assert_eq!(written(&mut core), ["unauthorized"]);
        assert!(matches!(core.request(r#"{"type":"auth","token":"x"}"#, &verifier()), Step::AuthenticationFailed));
        assert_eq!(written(&mut core), ["unauthorized"]);
        let me = viewer();
        let mut core = authenticated(me);
        assert!(matches!(core.request(&auth(viewer()), &verifier()), Step::Done));
        assert_eq!(written(&mut core), ["forbidden"]);
        let moved = Viewer { organization_id: Some(Uuid::new_v4()), ..me };
        assert!(matches!(core.request(&auth(moved), &verifier()), Step::Reauthenticate(c) if c.viewer == moved));
        assert!(matches!(core.request(r#"{"type":"auth","token":"x"}"#, &verifier()), Step::Done), "kept");
        assert_eq!(written(&mut core), ["unauthorized"]);
    }
}

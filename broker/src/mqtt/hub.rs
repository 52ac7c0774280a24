//! The MQTT broker's shared state: sessions, the subscription trie, shared
//! subscription groups and retained messages, and routing between them.
//!
//! Everything here is synchronous and in memory behind one lock, with
//! short critical sections; connections call in and are woken through a
//! [`Notify`] when their session has something to send. No I/O happens
//! here, so the protocol machine and its tests drive it directly.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use super::forward::{Forward, Forwarder};
use super::message::Message;
use super::routes::Routes;
use super::store::{Loaded, LoadedSession, Op, SessionRecord, SubRecord};
use super::trie::Trie;
use shoal_placement::BrokerId;

pub(crate) type ClientId = Arc<str>;

/// A shared subscription: its group and filter.
pub(crate) type GroupKey = (Arc<str>, String);

/// A subscription's options (MQTT 5 §3.8.3.1; v3.1.1 has only the QoS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubOpts {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub id: Option<u32>,
}

/// What the trie indexes: one client's own subscription, or a shared
/// subscription group (whose members are kept in [`SharedGroup`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SubKey {
    Client(ClientId),
    Group(Arc<str>),
}

#[derive(Debug, Default)]
struct SharedGroup {
    members: Vec<(ClientId, SubOpts)>,
    next: usize,
}

/// A message waiting in a session for its connection (or its next one).
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub msg: Arc<Message>,
    pub qos: u8,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Its record in the durable state (persistent sessions, QoS > 0); 0
    /// when it is in memory only.
    pub seq: u64,
}

/// Where an outgoing QoS 1/2 message is in its exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutState {
    /// PUBLISH sent; PUBACK (QoS 1) or PUBREC (QoS 2) expected.
    Published,
    /// PUBREC received and PUBREL sent; PUBCOMP expected.
    Released,
}

#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub item: Queued,
    pub state: OutState,
}

/// What a connection sends next: a PUBLISH (new or, after a reconnect, a
/// retransmission with DUP) or a PUBREL to resume a QoS 2 exchange.
#[derive(Debug, Clone)]
pub(crate) enum Send {
    Publish {
        packet_id: Option<u16>,
        item: Queued,
        dup: bool,
    },
    PubRel(u16),
}

/// A will and when it is due.
#[derive(Debug, Clone)]
pub(crate) struct Will {
    pub msg: Message,
    pub delay_secs: u32,
}

/// The connection a session is attached to.
#[derive(Debug)]
struct Link {
    id: u64,
    wake: Arc<Notify>,
    /// The client's Receive Maximum: outgoing QoS 1/2 messages in flight.
    window: usize,
}

#[derive(Debug)]
struct Session {
    client_id: ClientId,
    subs: BTreeMap<String, SubOpts>,
    /// Seconds the session outlives its connection; `u32::MAX` = forever.
    expiry_secs: u32,
    queue: VecDeque<Queued>,
    inflight: BTreeMap<u16, Outgoing>,
    /// Incoming QoS 2 packet ids received and not yet released.
    incoming_qos2: BTreeSet<u16>,
    next_packet_id: u16,
    link: Option<Link>,
    disconnected_ms: Option<i64>,
    /// The will of the current (or last) connection (boxed: most sessions
    /// have none, and every session would pay for its size).
    will: Option<Box<Will>>,
    /// A will waiting for its delay after the connection dropped.
    will_due_ms: Option<i64>,
    /// Inflight messages go out again, with DUP, on the next connection.
    resend: bool,
    username: Option<String>,
    connected_ms: i64,
    /// The next queued message's sequence number in the durable state.
    next_seq: u64,
    /// The sequence number this session started at (see
    /// [`SessionRecord::first_seq`]).
    first_seq: u64,
}

impl Session {
    /// A session with nothing in it yet (boxed: the session map then holds
    /// a pointer per entry, not a whole session per slot of its capacity).
    fn empty(client_id: ClientId) -> Box<Self> {
        Box::new(Session {
            client_id,
            subs: BTreeMap::new(),
            expiry_secs: 0,
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            incoming_qos2: BTreeSet::new(),
            next_packet_id: 0,
            link: None,
            disconnected_ms: None,
            will: None,
            will_due_ms: None,
            resend: false,
            username: None,
            connected_ms: 0,
            next_seq: 1,
            first_seq: 1,
        })
    }

    /// A new connection takes the session (MQTT 5 §3.1.4): one still
    /// attached is woken to find itself detached. Returns the will due now:
    /// the old connection's, unless a delay is still running and the session
    /// lives on (`ending` false), in which case the new connection cancels
    /// it; or a delayed will whose session ends now.
    fn taken_over(&mut self, ending: bool) -> Option<Message> {
        let due = match self.link.take() {
            Some(old) => {
                old.wake.notify_one();
                self.will.take().filter(|w| w.delay_secs == 0 || ending)
            }
            None => {
                let running = self.will_due_ms.is_some();
                self.will.take().filter(|_| running && ending)
            }
        };
        self.will_due_ms = None;
        due.map(|w| w.msg)
    }

    /// Kept in the durable state: it outlives its connection.
    fn persistent(&self) -> bool {
        self.expiry_secs > 0
    }

    fn record(&self) -> SessionRecord {
        SessionRecord {
            subs: self
                .subs
                .iter()
                .map(|(f, o)| SubRecord::new(f, o))
                .collect(),
            expiry_secs: self.expiry_secs,
            disconnected_ms: self.disconnected_ms,
            username: self.username.clone(),
            holder: None,
            first_seq: self.first_seq,
        }
    }
}

/// Limits that keep one client from growing the broker's memory.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Messages queued per session beyond those in flight.
    pub max_queued: usize,
    pub drop_policy: DropPolicy,
    /// Queue QoS 0 messages for offline sessions (Mosquitto's
    /// `queue_qos0_messages`, off by default there too).
    pub queue_qos0_offline: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queued: 1000,
            drop_policy: DropPolicy::DropNew,
            queue_qos0_offline: false,
        }
    }
}

/// Which message goes when a session's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropPolicy {
    /// The arriving message is dropped (Mosquitto's behaviour).
    DropNew,
    /// The oldest queued message is dropped to make room.
    DropOldest,
}

impl DropPolicy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "drop-new" => Some(DropPolicy::DropNew),
            "drop-oldest" => Some(DropPolicy::DropOldest),
            _ => None,
        }
    }
}

/// Why a message was not delivered, for the dropped-messages metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Dropped {
    QueueFull,
    Expired,
    PacketTooLarge,
    /// Another broker's subscribers could not be reached.
    ForwardFailed,
}

/// Where a routed message came from.
enum Origin {
    /// A client of this broker, a will, or a Kafka record: forwarded to
    /// the other brokers with subscribers too.
    Here,
    /// Forwarded by another broker, for these subscribers here.
    Peer { plain: bool, groups: Vec<GroupKey> },
}

impl Dropped {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::Expired => "expired",
            Dropped::PacketTooLarge => "packet_too_large",
            Dropped::ForwardFailed => "forward_failed",
        }
    }
}

/// How long a session read from the state stream for a broker is its own.
const RELEASE_MS: i64 = 10_000;

/// Appends a will to the stream its topic is mapped to.
pub(crate) type WillSink = Box<dyn Fn(&str, &Message) + std::marker::Send + Sync>;

/// A session on its way from one broker to another.
#[derive(Debug)]
pub(crate) struct Handover {
    pub record: SessionRecord,
    /// The sequence number after those of its stored messages, which keep
    /// theirs.
    pub next_seq: u64,
    pub next_packet_id: u16,
    pub incoming_qos2: Vec<u16>,
    pub inflight: Vec<(u16, Outgoing)>,
    pub queue: Vec<Queued>,
}

/// The session asked for belongs to another user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OtherUser;

/// The outcome of attaching a connection to a session.
#[derive(Debug)]
pub(crate) struct Attached {
    pub link: u64,
    pub session_present: bool,
}

/// What the caller of [`Hub::connect`] asks for.
#[derive(Debug)]
pub(crate) struct ConnectRequest {
    pub client_id: ClientId,
    pub clean_start: bool,
    pub expiry_secs: u32,
    pub will: Option<Will>,
    pub wake: Arc<Notify>,
    pub window: usize,
    pub username: Option<String>,
}

#[derive(Default)]
struct State {
    /// Queued messages read back without a session, deleted once the
    /// store is on.
    orphans: Vec<(ClientId, u64)>,
    /// Told which filters have subscribers here.
    routes: Arc<Routes>,
    /// Record changes for the durable state.
    store: bool,
    /// Changes not yet taken by the store writer, and how many were ever
    /// recorded (the mark acknowledgements wait for).
    ops: Vec<Op>,
    op_count: u64,
    sessions: HashMap<ClientId, Box<Session>>,
    trie: Trie<SubKey, SubOpts>,
    groups: HashMap<GroupKey, SharedGroup>,
    retained: BTreeMap<String, Arc<Message>>,
    /// Sessions read from the state stream for another broker lately: to
    /// whom, and when. Not given to a third broker, nor taken over here,
    /// for a while (the record naming the new holder may not be written
    /// yet).
    released: HashMap<ClientId, (u64, i64)>,
    next_link: u64,
    /// Messages dropped, by reason, since start.
    dropped: HashMap<Dropped, u64>,
}

/// A snapshot of one session for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientView {
    pub client_id: String,
    pub connected: bool,
    pub username: Option<String>,
    pub session_expiry_secs: u32,
    pub subscriptions: usize,
    pub queued: usize,
    pub inflight: usize,
    pub connected_ms: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriptionView {
    pub client_id: String,
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

/// Counts for the metrics gauges.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub connections: usize,
    pub sessions: usize,
    pub subscriptions: usize,
    pub retained: usize,
    pub queued: usize,
}

pub(crate) struct Hub {
    state: Mutex<State>,
    pub(crate) limits: Limits,
    received: [AtomicU64; 3],
    sent: [AtomicU64; 3],
    /// (filter, stream): where matching publishes are persisted.
    rules: RwLock<Vec<(String, Arc<str>)>>,
    /// This broker's and its peers' subscription routes.
    routes: Arc<Routes>,
    forwarder: std::sync::OnceLock<Forwarder>,
    will_sink: std::sync::OnceLock<WillSink>,
    ops_ready: Notify,
    /// How many recorded changes are durable.
    durable: tokio::sync::watch::Sender<u64>,
}

/// A shared subscription's group and filter, if `filter` is one
/// (`$share/{group}/{filter}`).
pub(crate) fn shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    rest.split_once('/')
}

impl Hub {
    #[cfg(test)]
    pub(crate) fn new(limits: Limits) -> Self {
        Self::with_routes(limits, Arc::new(Routes::default()))
    }

    pub(crate) fn with_routes(limits: Limits, routes: Arc<Routes>) -> Self {
        routes.serve();
        Hub {
            routes: routes.clone(),
            forwarder: std::sync::OnceLock::new(),
            will_sink: std::sync::OnceLock::new(),
            state: Mutex::new(State {
                routes,
                ..State::default()
            }),
            limits,
            received: Default::default(),
            sent: Default::default(),
            rules: RwLock::new(Vec::new()),
            ops_ready: Notify::new(),
            durable: tokio::sync::watch::channel(0).0,
        }
    }

    /// Record changes for the durable state from now on, starting with
    /// deleting the queued messages [`Hub::restore`] found no session for.
    pub(crate) fn enable_store(&self) {
        let mut st = self.state.lock();
        st.store = true;
        for (client, seq) in std::mem::take(&mut st.orphans) {
            unqueue(&mut st, &client, seq);
        }
        drop(st);
        self.ops_ready.notify_one();
    }

    /// Is this broker part of a cluster, where a session may be held by
    /// another broker or only by the state stream?
    pub(crate) fn clustered(&self) -> bool {
        self.routes.clustered()
    }

    /// The user name a session was left by, if the session exists.
    pub(crate) fn session_user(&self, client: &str) -> Option<Option<String>> {
        self.state
            .lock()
            .sessions
            .get(client)
            .map(|s| s.username.clone())
    }

    /// Wait until changes are recorded.
    pub(crate) async fn ops_ready(&self) {
        self.ops_ready.notified().await;
    }

    /// The recorded changes, and the mark they reach.
    pub(crate) fn take_ops(&self) -> (Vec<Op>, u64) {
        let mut st = self.state.lock();
        (std::mem::take(&mut st.ops), st.op_count)
    }

    /// Changes up to `mark` are durable.
    pub(crate) fn set_durable(&self, mark: u64) {
        self.durable.send_if_modified(|d| {
            let moved = mark > *d;
            *d = (*d).max(mark);
            moved
        });
    }

    /// The mark of every change recorded so far; an acknowledgement that
    /// depends on them waits for [`Hub::wait_durable`] of it.
    pub(crate) fn op_mark(&self) -> u64 {
        self.state.lock().op_count
    }

    pub(crate) fn is_durable(&self, mark: u64) -> bool {
        *self.durable.borrow() >= mark
    }

    pub(crate) async fn wait_durable(&self, mark: u64) {
        let mut rx = self.durable.subscribe();
        let _ = rx.wait_for(|d| *d >= mark).await;
    }

    /// Sessions and retained messages read back from the durable state.
    pub(crate) fn restore(&self, loaded: Loaded, now_ms: i64) {
        let mut st = self.state.lock();
        st.orphans = loaded.orphans;
        for m in loaded.retained {
            st.retained.insert(m.topic.to_string(), m);
        }
        insert_loaded(&mut st, loaded.sessions, now_ms);
    }

    /// Sessions a broker that is gone held, read back from the state
    /// stream: held here from now on (and recorded so), unless a session
    /// of that id is here already. Returns how many were taken.
    pub(crate) fn take_over(&self, sessions: Vec<LoadedSession>, now_ms: i64) -> usize {
        let mut st = self.state.lock();
        let sessions: Vec<LoadedSession> = sessions
            .into_iter()
            .filter(|(c, ..)| {
                !st.sessions.contains_key(c)
                    && st
                        .released
                        .get(c)
                        .is_none_or(|(_, t)| *t <= now_ms - RELEASE_MS)
            })
            .collect();
        let clients: Vec<ClientId> = sessions.iter().map(|(c, ..)| c.clone()).collect();
        insert_loaded(&mut st, sessions, now_ms);
        for c in &clients {
            save_session(&mut st, c);
        }
        drop(st);
        self.ops_ready.notify_one();
        clients.len()
    }
}

/// Put sessions read back from the durable state in the hub, detached.
fn insert_loaded(st: &mut State, sessions: Vec<LoadedSession>, now_ms: i64) {
    for (client, rec, queue) in sessions {
        let next_seq = (queue.iter().map(|(s, _)| *s).max().unwrap_or(0) + 1).max(rec.first_seq);
        let subs: BTreeMap<String, SubOpts> = rec
            .subs
            .iter()
            .map(|r| (r.filter.clone(), r.opts()))
            .collect();
        for (f, o) in &subs {
            add_subscription(st, &client, f, o);
        }
        let mut s = Session::empty(client.clone());
        s.subs = subs;
        s.expiry_secs = rec.expiry_secs;
        s.queue = queue
            .into_iter()
            .map(|(seq, mut q)| {
                q.seq = seq;
                q
            })
            .collect();
        // Connected when its broker stopped: it ended then.
        s.disconnected_ms = Some(rec.disconnected_ms.unwrap_or(now_ms));
        s.username = rec.username;
        s.next_seq = next_seq;
        s.first_seq = rec.first_seq;
        st.sessions.insert(client, s);
    }
}

impl Hub {
    /// Attach a new connection to `req.client_id`'s session, creating or
    /// replacing it as Clean Start says. A connection already attached is
    /// taken over: it is woken and finds itself detached.
    pub(crate) fn connect(&self, req: ConnectRequest, now_ms: i64) -> Attached {
        let mut wills = Vec::new();
        let mut st = self.state.lock();
        st.next_link += 1;
        let link = st.next_link;
        let mut present = false;
        // A session is resumed only by the user who left it; anyone else
        // with the same client id starts afresh (its subscriptions were
        // authorised for the other user).
        let clean_start = req.clean_start
            || st
                .sessions
                .get(&req.client_id)
                .is_some_and(|s| s.username != req.username);
        if let Some(s) = st.sessions.get_mut(&req.client_id) {
            wills.extend(s.taken_over(clean_start));
            if clean_start {
                let gone = st.sessions.remove(&req.client_id);
                if let Some(gone) = gone {
                    remove_subscriptions(&mut st, &gone);
                    forget(&mut st, &gone);
                }
            } else {
                present = true;
            }
        }
        let clean_elsewhere = req.clean_start && st.routes.clustered();
        let s = st.sessions.entry(req.client_id.clone()).or_insert_with(|| {
            let mut s = Session::empty(req.client_id.clone());
            // Above the records a session of this id replaced may have
            // left (another broker's, not deleted yet).
            s.first_seq = u64::try_from(now_ms)
                .unwrap_or(0)
                .saturating_mul(1000)
                .max(1);
            s.next_seq = s.first_seq;
            s
        });
        let was_persistent = s.persistent();
        s.expiry_secs = req.expiry_secs;
        s.will = req.will.map(Box::new);
        s.disconnected_ms = None;
        s.resend = present && !s.inflight.is_empty();
        s.username = req.username;
        s.connected_ms = now_ms;
        s.link = Some(Link {
            id: link,
            wake: req.wake.clone(),
            window: req.window.max(1),
        });
        // Its record follows it; a session no longer kept loses it (else a
        // crash would bring back what the client gave up). In a cluster the
        // state stream may hold one from another broker, which a clean
        // start ends too.
        let op = (s.persistent() || was_persistent || clean_elsewhere).then(|| Op::Session {
            client: s.client_id.clone(),
            record: s.persistent().then(|| s.record()),
        });
        if let Some(op) = op {
            record(&mut st, op);
        }
        drop(st);
        self.ops_ready.notify_one();
        for w in wills {
            self.publish_will(w, now_ms);
        }
        // Queued messages wait for the connection to ask for them.
        req.wake.notify_one();
        Attached {
            link,
            session_present: present,
        }
    }

    /// Give up `client`'s session to another broker, where its client just
    /// connected: a connection attached here is taken over (MQTT 5
    /// §3.1.4, its will as a takeover here would send it), and the session
    /// leaves this broker with its durable records. `Err` if the session
    /// belongs to another user, who alone may resume it.
    /// `ending`: the client started clean there, so the session ends
    /// instead (its will is due whatever its delay).
    /// `new_holder`: the broker taking it, which its record names from now
    /// on (the caller waits for that record before answering, so that this
    /// broker's writes for the session come before the new one's).
    pub(crate) fn hand_over(
        &self,
        client: &str,
        username: Option<&str>,
        ending: bool,
        new_holder: Option<u64>,
        now_ms: i64,
    ) -> Result<Option<Handover>, OtherUser> {
        let mut wills = Vec::new();
        let mut st = self.state.lock();
        let Some(s) = st.sessions.get_mut(client) else {
            return Ok(None);
        };
        if s.username.as_deref() != username {
            return Err(OtherUser);
        }
        wills.extend(s.taken_over(ending));
        let Some(gone) = st.sessions.remove(client) else {
            return Ok(None);
        };
        // Its records stay: the new broker goes on with them (its queued
        // messages keep their sequence numbers) and overwrites the session's.
        // A session that ends loses its queued messages' records; its own
        // record is the new broker's to overwrite (deleting it here could
        // land after that).
        remove_subscriptions(&mut st, &gone);
        if ending {
            forget_queue(&mut st, &gone);
        } else if gone.persistent() && new_holder.is_some() {
            let op = Op::Session {
                client: gone.client_id.clone(),
                record: Some(SessionRecord {
                    holder: new_holder,
                    ..gone.record()
                }),
            };
            record(&mut st, op);
        }
        drop(st);
        self.ops_ready.notify_one();
        for w in wills {
            self.publish_will(w, now_ms);
        }
        let mut record = gone.record();
        record.disconnected_ms = Some(record.disconnected_ms.unwrap_or(now_ms));
        Ok(Some(Handover {
            record,
            next_seq: gone.next_seq,
            next_packet_id: gone.next_packet_id,
            incoming_qos2: gone.incoming_qos2.into_iter().collect(),
            inflight: gone.inflight.into_iter().collect(),
            queue: gone.queue.into_iter().collect(),
        }))
    }

    /// Take in a session another broker handed over (see
    /// [`Hub::hand_over`]), detached, for the connection about to resume
    /// it. A session already here wins.
    pub(crate) fn adopt(&self, client: ClientId, h: Handover, now_ms: i64) {
        let mut st = self.state.lock();
        if st.sessions.contains_key(&client) {
            return;
        }
        let mut s = Session::empty(client.clone());
        for r in &h.record.subs {
            s.subs.insert(r.filter.clone(), r.opts());
        }
        for (f, o) in &s.subs {
            add_subscription(&mut st, &client, f, o);
        }
        s.expiry_secs = h.record.expiry_secs;
        s.first_seq = h.record.first_seq;
        s.disconnected_ms = Some(h.record.disconnected_ms.unwrap_or(now_ms));
        s.username = h.record.username;
        s.next_packet_id = h.next_packet_id;
        s.incoming_qos2 = h.incoming_qos2.into_iter().collect();
        // Messages stored already keep their records; the others get
        // records after them.
        let keep = st.store && s.persistent();
        s.next_seq = h
            .inflight
            .iter()
            .map(|(_, o)| &o.item)
            .chain(&h.queue)
            .map(|q| q.seq + 1)
            .max()
            .unwrap_or(1)
            .max(h.next_seq)
            .max(h.record.first_seq)
            .max(1);
        let mut ops = Vec::new();
        if keep {
            ops.push(Op::Session {
                client: client.clone(),
                record: Some(s.record()),
            });
        }
        let mut renumber = |item: &mut Queued| {
            if item.seq == 0 && keep && item.qos > 0 {
                item.seq = s.next_seq;
                s.next_seq += 1;
                ops.push(Op::Queue {
                    client: client.clone(),
                    seq: item.seq,
                    item: Some(item.clone()),
                });
            }
        };
        let mut inflight = BTreeMap::new();
        for (pid, mut o) in h.inflight {
            renumber(&mut o.item);
            inflight.insert(pid, o);
        }
        let mut queue = VecDeque::new();
        for mut item in h.queue {
            renumber(&mut item);
            queue.push_back(item);
        }
        s.inflight = inflight;
        s.queue = queue;
        st.sessions.insert(client, s);
        for op in ops {
            record(&mut st, op);
        }
        drop(st);
        self.ops_ready.notify_one();
    }

    /// Reserve `client`'s session, about to be read from the state stream,
    /// for broker `to`; false if it went to another broker (one of `live`)
    /// lately.
    pub(crate) fn reserve_stored(&self, client: &str, to: u64, live: &[u64], now_ms: i64) -> bool {
        let mut st = self.state.lock();
        match st.released.get(client) {
            Some((other, t))
                if *other != to && *t > now_ms - RELEASE_MS && live.contains(other) =>
            {
                false
            }
            _ => {
                st.released.insert(Arc::from(client), (to, now_ms));
                true
            }
        }
    }

    /// The session reserved by [`Hub::reserve_stored`] was not given out
    /// after all.
    pub(crate) fn unreserve_stored(&self, client: &str, to: u64) {
        let mut st = self.state.lock();
        if st.released.get(client).is_some_and(|(b, _)| *b == to) {
            st.released.remove(client);
        }
    }

    /// Take back a session handed over whose new broker could not be told
    /// in time (see [`Hub::hand_over`]).
    pub(crate) fn take_back(&self, client: &str, h: Handover, now_ms: i64) {
        self.adopt(Arc::from(client), h, now_ms);
    }

    /// Every retained message (for a broker that starts beside this one).
    pub(crate) fn retained_all(&self) -> Vec<Arc<Message>> {
        self.state.lock().retained.values().cloned().collect()
    }

    /// Retained messages another broker has: each one is kept unless this
    /// broker has a newer one for its topic.
    pub(crate) fn merge_retained(&self, msgs: Vec<Message>) -> usize {
        let mut st = self.state.lock();
        let mut taken = 0;
        for m in msgs {
            if m.payload.is_empty()
                || st
                    .retained
                    .get(&*m.topic)
                    .is_some_and(|have| have.received_ms >= m.received_ms)
            {
                continue;
            }
            let m = Arc::new(Message { retain: true, ..m });
            st.retained.insert(m.topic.to_string(), m.clone());
            let op = Op::Retained {
                topic: m.topic.clone(),
                msg: Some(m),
            };
            record(&mut st, op);
            taken += 1;
        }
        drop(st);
        self.ops_ready.notify_one();
        taken
    }

    /// Forward messages to other brokers through `forwarder` from now on.
    pub(crate) fn set_forwarder(&self, forwarder: Forwarder) {
        let _ = self.forwarder.set(forwarder);
    }

    /// The other brokers `msg` must reach. Each shared group that has
    /// members here and/or on other brokers takes the message once, on a
    /// broker chosen in turn; `local_groups` keeps only those chosen here.
    fn plan_forwards(
        &self,
        st: &State,
        msg: &Arc<Message>,
        local_groups: &mut Vec<GroupKey>,
    ) -> Vec<Forward> {
        let remote = self.routes.matches(&msg.topic);
        let mut plan: BTreeMap<BrokerId, (bool, Vec<GroupKey>)> = BTreeMap::new();
        if msg.retain {
            // Every broker keeps the retained messages, for its subscribers
            // to come.
            for b in self.routes.peers() {
                plan.entry(b).or_default();
            }
        }
        for b in remote.plain {
            plan.entry(b).or_default().0 = true;
        }
        let mut keep_here = Vec::new();
        let mut keys: Vec<GroupKey> = local_groups.clone();
        for (k, _) in &remote.groups {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        for key in keys {
            // Here only with a connected member, or the turn would go to
            // an absent one while others wait on other brokers.
            let here = local_groups.contains(&key)
                && st.groups.get(&key).is_some_and(|g| {
                    g.members
                        .iter()
                        .any(|(c, _)| st.sessions.get(c).is_some_and(|s| s.link.is_some()))
                });
            let brokers: &[BrokerId] = remote
                .groups
                .iter()
                .find(|(k, _)| *k == key)
                .map_or(&[], |(_, b)| b.as_slice());
            if local_groups.contains(&key) && !here && brokers.is_empty() {
                // No member connected anywhere: queued here, as before.
                keep_here.push(key);
                continue;
            }
            let n = brokers.len() + usize::from(here);
            let turn = self.routes.next_turn(n);
            if here && turn == brokers.len() {
                keep_here.push(key);
            } else if let Some(&b) = brokers.get(turn) {
                plan.entry(b).or_default().1.push(key);
            }
        }
        *local_groups = keep_here;
        plan.into_iter()
            .map(|(broker, (plain, groups))| Forward {
                broker,
                msg: msg.clone(),
                plain,
                groups,
            })
            .collect()
    }

    /// Is `link` still the connection of `client`'s session?
    pub(crate) fn is_attached(&self, client: &str, link: u64) -> bool {
        let st = self.state.lock();
        st.sessions
            .get(client)
            .and_then(|s| s.link.as_ref())
            .is_some_and(|l| l.id == link)
    }

    /// The connection `link` ended. `send_will`: it ended without a normal
    /// DISCONNECT (or with "disconnect with will message"). `expiry`: a new
    /// Session Expiry Interval from the client's DISCONNECT.
    pub(crate) fn disconnect(
        &self,
        client: &str,
        link: u64,
        send_will: bool,
        expiry: Option<u32>,
        now_ms: i64,
    ) {
        let mut due = None;
        let mut st = self.state.lock();
        let Some(s) = st.sessions.get_mut(client) else {
            return;
        };
        if s.link.as_ref().is_none_or(|l| l.id != link) {
            return;
        }
        s.link = None;
        s.disconnected_ms = Some(now_ms);
        if let Some(e) = expiry {
            s.expiry_secs = e;
        }
        let will = s.will.take();
        if send_will && let Some(w) = will {
            if w.delay_secs == 0 || s.expiry_secs == 0 {
                due = Some(w.msg);
            } else {
                let delay = w.delay_secs.min(s.expiry_secs);
                s.will_due_ms = Some(now_ms + i64::from(delay) * 1000);
                s.will = Some(w);
            }
        }
        if s.expiry_secs == 0 {
            let gone = st.sessions.remove(client);
            if let Some(gone) = gone {
                remove_subscriptions(&mut st, &gone);
                forget(&mut st, &gone);
            }
        } else {
            let op = Op::Session {
                client: s.client_id.clone(),
                record: Some(s.record()),
            };
            record(&mut st, op);
        }
        drop(st);
        self.ops_ready.notify_one();
        if let Some(m) = due {
            self.publish_will(m, now_ms);
        }
    }

    /// Expire sessions and publish wills whose time has come.
    pub(crate) fn tick(&self, now_ms: i64) {
        let mut due = Vec::new();
        let mut st = self.state.lock();
        st.released.retain(|_, (_, t)| *t > now_ms - RELEASE_MS);
        let mut expired = Vec::new();
        for s in st.sessions.values_mut() {
            if s.link.is_some() {
                continue;
            }
            if let Some(t) = s.will_due_ms
                && t <= now_ms
            {
                s.will_due_ms = None;
                if let Some(w) = s.will.take() {
                    due.push(w.msg);
                }
            }
            if let Some(d) = s.disconnected_ms
                && s.expiry_secs != u32::MAX
                && d + i64::from(s.expiry_secs) * 1000 <= now_ms
            {
                if let Some(w) = s.will.take() {
                    due.push(w.msg);
                }
                expired.push(s.client_id.clone());
            }
        }
        for c in expired {
            if let Some(gone) = st.sessions.remove(&c) {
                remove_subscriptions(&mut st, &gone);
                forget(&mut st, &gone);
            }
        }
        drop(st);
        self.ops_ready.notify_one();
        for m in due {
            self.publish_will(m, now_ms);
        }
    }

    /// Publish a will: into the stream a persistence rule maps its topic
    /// to (through the sink [`Hub::set_will_sink`] gave), then to
    /// subscribers, as a client's publish would go.
    fn publish_will(&self, mut w: Message, now_ms: i64) {
        // A will's expiry runs from when it is published (MQTT 5
        // §3.1.3.2.4), not from its CONNECT.
        w.received_ms = now_ms;
        if let Some(stream) = self.persist_target(&w.topic)
            && let Some(sink) = self.will_sink.get()
        {
            sink(&stream, &w);
        }
        self.publish(w, now_ms);
    }

    /// Where wills for mapped topics are appended from now on.
    pub(crate) fn set_will_sink(&self, sink: WillSink) {
        let _ = self.will_sink.set(sink);
    }

    /// Route `msg` to every matching subscription (and store it if it is
    /// retained). Returns how many sessions it was queued for.
    pub(crate) fn publish(&self, msg: Message, now_ms: i64) -> usize {
        self.publish_marked(msg, now_ms).0
    }

    /// [`Hub::publish`], also returning the durable mark to wait for when
    /// the message was queued for a persistent session or retained.
    pub(crate) fn publish_marked(&self, msg: Message, _now_ms: i64) -> (usize, Option<u64>) {
        self.route(Arc::new(msg), Origin::Here)
    }

    /// A message another broker forwarded: delivered to this broker's
    /// ordinary subscribers (`plain`) and to one member of each of `groups`,
    /// never forwarded again; kept if it is retained.
    pub(crate) fn deliver_forwarded(
        &self,
        msg: Message,
        plain: bool,
        groups: Vec<GroupKey>,
    ) -> usize {
        self.route(Arc::new(msg), Origin::Peer { plain, groups }).0
    }

    /// Route `msg`; returns how many deliveries it made, and the durable
    /// mark its acknowledgement must wait for if it recorded state to keep.
    fn route(&self, msg: Arc<Message>, origin: Origin) -> (usize, Option<u64>) {
        let mut st = self.state.lock();
        let ops_before = st.op_count;
        // A retained message goes to every broker (see plan_forwards), so
        // each one keeps the cluster's whole set.
        // From a peer, an older message than the one kept (two brokers set
        // the topic at once) changes nothing, so every broker keeps the
        // newest.
        let stale = matches!(origin, Origin::Peer { .. })
            && st
                .retained
                .get(&*msg.topic)
                .is_some_and(|have| have.received_ms > msg.received_ms);
        if msg.retain && !stale {
            if msg.payload.is_empty() {
                if st.retained.remove(&*msg.topic).is_some() {
                    let op = Op::Retained {
                        topic: msg.topic.clone(),
                        msg: None,
                    };
                    record(&mut st, op);
                }
            } else {
                st.retained.insert(msg.topic.to_string(), msg.clone());
                let op = Op::Retained {
                    topic: msg.topic.clone(),
                    msg: Some(msg.clone()),
                };
                record(&mut st, op);
            }
        }
        // One delivery per session, at the highest QoS of its matching
        // subscriptions, with all their identifiers (MQTT 5 §3.3.4).
        let mut direct: HashMap<ClientId, (u8, bool, Vec<u32>)> = HashMap::new();
        let mut groups: Vec<GroupKey> = Vec::new();
        st.trie.matches(&msg.topic, |filter, key, opts| match key {
            SubKey::Client(c) => {
                if opts.no_local && msg.origin.as_deref() == Some(&**c) {
                    return;
                }
                let e = direct.entry(c.clone()).or_insert((0, false, Vec::new()));
                e.0 = e.0.max(opts.qos);
                e.1 |= opts.retain_as_published;
                if let Some(id) = opts.id {
                    e.2.push(id);
                }
            }
            SubKey::Group(g) => groups.push((g.clone(), filter.to_string())),
        });
        let mut forwards = Vec::new();
        match &origin {
            Origin::Here => {
                if self.forwarder.get().is_some() && self.routes.has_peers() {
                    forwards = self.plan_forwards(&st, &msg, &mut groups);
                }
            }
            Origin::Peer {
                plain,
                groups: chosen,
            } => {
                if !plain {
                    direct.clear();
                }
                groups.retain(|g| chosen.contains(g));
            }
        }
        let mut wake = Vec::new();
        let mut delivered = 0;
        for (client, (qos, rap, ids)) in direct {
            let item = Queued {
                msg: msg.clone(),
                qos: qos.min(msg.qos),
                retain: rap && msg.retain,
                sub_ids: ids,
                seq: 0,
            };
            if let Some(w) = enqueue(&mut st, &self.limits, &client, item) {
                wake.push(w);
            }
            delivered += 1;
        }
        for key in groups {
            let Some(choice) = pick_member(&mut st, &key, msg.origin.as_deref()) else {
                continue;
            };
            let (client, opts) = choice;
            let item = Queued {
                msg: msg.clone(),
                qos: opts.qos.min(msg.qos),
                retain: false,
                sub_ids: opts.id.into_iter().collect(),
                seq: 0,
            };
            if let Some(w) = enqueue(&mut st, &self.limits, &client, item) {
                wake.push(w);
            }
            delivered += 1;
        }
        let mark = (st.op_count > ops_before).then_some(st.op_count);
        drop(st);
        if mark.is_some() {
            self.ops_ready.notify_one();
        }
        for w in wake {
            w.notify_one();
        }
        if let Some(fw) = self.forwarder.get() {
            for f in forwards {
                delivered += 1;
                if !fw.send(f) {
                    self.note_dropped(Dropped::ForwardFailed);
                }
            }
        }
        (delivered, mark)
    }

    /// Add subscriptions; returns per filter whether it existed before.
    /// Retained messages are queued as each one's Retain Handling says.
    pub(crate) fn subscribe(
        &self,
        client: &str,
        subs: Vec<(String, SubOpts)>,
        now_ms: i64,
    ) -> Vec<bool> {
        let mut st = self.state.lock();
        let Some((key, _)) = st.sessions.get_key_value(client) else {
            return vec![false; subs.len()];
        };
        let client: ClientId = key.clone();
        let mut existed = Vec::with_capacity(subs.len());
        let mut retained = Vec::new();
        for (filter, opts) in subs {
            let old = add_subscription(&mut st, &client, &filter, &opts);
            // Shared subscriptions get no retained messages (§4.8.2).
            let send_retained = shared(&filter).is_none()
                && match opts.retain_handling {
                    0 => true,
                    1 => old.is_none(),
                    _ => false,
                };
            if send_retained {
                for m in retained_matching(&st.retained, &filter) {
                    if m.expired(now_ms) {
                        continue;
                    }
                    retained.push(Queued {
                        qos: opts.qos.min(m.qos),
                        msg: m,
                        retain: true,
                        sub_ids: opts.id.into_iter().collect(),
                        seq: 0,
                    });
                }
            }
            existed.push(old.is_some());
            if let Some(s) = st.sessions.get_mut(&client) {
                s.subs.insert(filter, opts);
            }
        }
        let mut wake = None;
        for item in retained {
            if let Some(w) = enqueue(&mut st, &self.limits, &client, item) {
                wake = Some(w);
            }
        }
        save_session(&mut st, &client);
        drop(st);
        self.ops_ready.notify_one();
        if let Some(w) = wake {
            w.notify_one();
        }
        existed
    }

    /// Remove subscriptions; returns per filter whether it existed.
    pub(crate) fn unsubscribe(&self, client: &str, filters: &[String]) -> Vec<bool> {
        let mut st = self.state.lock();
        let Some((key, _)) = st.sessions.get_key_value(client) else {
            return vec![false; filters.len()];
        };
        let client: ClientId = key.clone();
        let existed = filters
            .iter()
            .map(|f| {
                let existed = st
                    .sessions
                    .get_mut(&client)
                    .and_then(|s| s.subs.remove(f))
                    .is_some();
                if existed {
                    remove_subscription(&mut st, &client, f);
                }
                existed
            })
            .collect();
        save_session(&mut st, &client);
        drop(st);
        self.ops_ready.notify_one();
        existed
    }

    /// The next packets for `link` to send, within its in-flight window:
    /// first the retransmissions owed after a reconnect, then queued
    /// messages. `None` if `link` was detached (taken over).
    pub(crate) fn next_sends(&self, client: &str, link: u64, now_ms: i64) -> Option<Vec<Send>> {
        let mut st = self.state.lock();
        let State {
            sessions, dropped, ..
        } = &mut *st;
        let s = sessions.get_mut(client)?;
        let window = match &s.link {
            Some(l) if l.id == link => l.window,
            _ => return None,
        };
        let mut out = Vec::new();
        let mut expired = Vec::new();
        if s.resend {
            s.resend = false;
            for (&pid, o) in &s.inflight {
                out.push(match o.state {
                    OutState::Published => Send::Publish {
                        packet_id: Some(pid),
                        item: o.item.clone(),
                        dup: true,
                    },
                    OutState::Released => Send::PubRel(pid),
                });
            }
        }
        while let Some(front) = s.queue.front() {
            if front.qos > 0 && s.inflight.len() >= window {
                break;
            }
            let Some(item) = s.queue.pop_front() else {
                break;
            };
            if item.msg.expired(now_ms) {
                *dropped.entry(Dropped::Expired).or_default() += 1;
                expired.push(item.seq);
                continue;
            }
            let packet_id = if item.qos > 0 {
                let pid = free_packet_id(s);
                s.inflight.insert(
                    pid,
                    Outgoing {
                        item: item.clone(),
                        state: OutState::Published,
                    },
                );
                Some(pid)
            } else {
                None
            };
            out.push(Send::Publish {
                packet_id,
                item,
                dup: false,
            });
        }
        let client = s.client_id.clone();
        let any = !expired.is_empty();
        for seq in expired {
            unqueue(&mut st, &client, seq);
        }
        drop(st);
        if any {
            self.ops_ready.notify_one();
        }
        Some(out)
    }

    /// An outgoing QoS 1 message was acknowledged (PUBACK), or a QoS 2 one
    /// completed (PUBCOMP). Returns whether the packet id was in flight.
    pub(crate) fn acked(&self, client: &str, packet_id: u16) -> bool {
        let mut st = self.state.lock();
        let Some(s) = st.sessions.get_mut(client) else {
            return false;
        };
        let gone = s.inflight.remove(&packet_id);
        if gone.is_some()
            && let Some(l) = &s.link
        {
            // The window opened: more may go out.
            l.wake.notify_one();
        }
        let client = s.client_id.clone();
        match gone {
            Some(o) => {
                unqueue(&mut st, &client, o.item.seq);
                drop(st);
                self.ops_ready.notify_one();
                true
            }
            None => false,
        }
    }

    /// PUBREC for an outgoing QoS 2 message: it moves to Released (the
    /// caller sends PUBREL). With a failure code the exchange ends.
    pub(crate) fn received(&self, client: &str, packet_id: u16, failed: bool) -> bool {
        if failed {
            // A refused PUBREC ends the exchange as a PUBACK would.
            return self.acked(client, packet_id);
        }
        let mut st = self.state.lock();
        let Some(s) = st.sessions.get_mut(client) else {
            return false;
        };
        match s.inflight.get_mut(&packet_id) {
            Some(o) => {
                o.state = OutState::Released;
                true
            }
            None => false,
        }
    }

    /// An incoming QoS 2 PUBLISH with `packet_id`: true if it is new (to be
    /// routed), false if it is a retransmission of one not yet released.
    pub(crate) fn incoming_qos2(&self, client: &str, packet_id: u16) -> bool {
        let mut st = self.state.lock();
        st.sessions
            .get_mut(client)
            .is_some_and(|s| s.incoming_qos2.insert(packet_id))
    }

    /// PUBREL for an incoming QoS 2 message; true if it was pending.
    pub(crate) fn release(&self, client: &str, packet_id: u16) -> bool {
        let mut st = self.state.lock();
        st.sessions
            .get_mut(client)
            .is_some_and(|s| s.incoming_qos2.remove(&packet_id))
    }

    /// Incoming QoS 2 messages waiting for PUBREL.
    pub(crate) fn pending_releases(&self, client: &str) -> usize {
        let st = self.state.lock();
        st.sessions.get(client).map_or(0, |s| s.incoming_qos2.len())
    }

    pub(crate) fn note_dropped(&self, why: Dropped) {
        self.note_dropped_n(why, 1);
    }

    pub(crate) fn note_dropped_n(&self, why: Dropped, n: u64) {
        *self.state.lock().dropped.entry(why).or_default() += n;
    }

    /// Dropped messages by reason, since start.
    pub(crate) fn dropped(&self) -> Vec<(Dropped, u64)> {
        let mut v: Vec<_> = self
            .state
            .lock()
            .dropped
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort_by_key(|(k, _)| k.label());
        v
    }

    pub(crate) fn count_in(&self, qos: u8) {
        if let Some(c) = self.received.get(usize::from(qos)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_out(&self, qos: u8) {
        if let Some(c) = self.sent.get(usize::from(qos)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Messages received and sent, per QoS.
    pub(crate) fn message_counts(&self) -> ([u64; 3], [u64; 3]) {
        let load = |a: &[AtomicU64; 3]| [0, 1, 2].map(|i| a[i].load(Ordering::Relaxed));
        (load(&self.received), load(&self.sent))
    }

    /// Replace the persistence rules.
    pub(crate) fn set_rules(&self, rules: Vec<(String, Arc<str>)>) {
        *self.rules.write() = rules;
    }

    /// The streams rules persist to.
    pub(crate) fn rule_streams(&self) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> = self.rules.read().iter().map(|(_, s)| s.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The stream a message on `topic` is persisted to: the first rule
    /// whose filter matches, in the rules' order.
    pub(crate) fn persist_target(&self, topic: &str) -> Option<Arc<str>> {
        let rules = self.rules.read();
        rules
            .iter()
            .find(|(f, _)| super::topic::matches(topic, f))
            .map(|(_, s)| s.clone())
    }

    pub(crate) fn counts(&self) -> Counts {
        let st = self.state.lock();
        let mut c = Counts {
            sessions: st.sessions.len(),
            subscriptions: st.trie.len(),
            retained: st.retained.len(),
            ..Counts::default()
        };
        for s in st.sessions.values() {
            c.connections += usize::from(s.link.is_some());
            c.queued += s.queue.len();
        }
        c
    }

    pub(crate) fn clients(&self) -> Vec<ClientView> {
        let st = self.state.lock();
        let mut v: Vec<ClientView> = st
            .sessions
            .values()
            .map(|s| ClientView {
                client_id: s.client_id.to_string(),
                connected: s.link.is_some(),
                username: s.username.clone(),
                session_expiry_secs: s.expiry_secs,
                subscriptions: s.subs.len(),
                queued: s.queue.len(),
                inflight: s.inflight.len(),
                connected_ms: s.connected_ms,
            })
            .collect();
        v.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        v
    }

    pub(crate) fn subscriptions(&self) -> Vec<SubscriptionView> {
        let st = self.state.lock();
        let mut v = Vec::new();
        for s in st.sessions.values() {
            for (f, o) in &s.subs {
                v.push(SubscriptionView {
                    client_id: s.client_id.to_string(),
                    filter: f.clone(),
                    qos: o.qos,
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    retain_handling: o.retain_handling,
                    subscription_id: o.id,
                });
            }
        }
        v.sort_by(|a, b| (&a.client_id, &a.filter).cmp(&(&b.client_id, &b.filter)));
        v
    }
}

/// Put `item` on `client`'s queue, within the limits; returns the
/// connection to wake, if one is attached.
fn enqueue(
    st: &mut State,
    limits: &Limits,
    client: &ClientId,
    mut item: Queued,
) -> Option<Arc<Notify>> {
    let State {
        sessions,
        dropped,
        store,
        ..
    } = st;
    let s = sessions.get_mut(client)?;
    if s.link.is_none() && item.qos == 0 && !limits.queue_qos0_offline {
        return None;
    }
    let mut evicted = 0;
    if s.queue.len() >= limits.max_queued {
        *dropped.entry(Dropped::QueueFull).or_default() += 1;
        match limits.drop_policy {
            DropPolicy::DropNew => return None,
            DropPolicy::DropOldest => {
                evicted = s.queue.pop_front().map_or(0, |q| q.seq);
            }
        }
    }
    let keep = *store && s.persistent() && item.qos > 0;
    if keep {
        item.seq = s.next_seq;
        s.next_seq += 1;
    }
    let stored = keep.then(|| Op::Queue {
        client: client.clone(),
        seq: item.seq,
        item: Some(item.clone()),
    });
    s.queue.push_back(item);
    let wake = s.link.as_ref().map(|l| l.wake.clone());
    unqueue(st, client, evicted);
    if let Some(op) = stored {
        record(st, op);
    }
    wake
}

/// A shared group's next member, round robin, preferring connected ones.
fn pick_member(
    st: &mut State,
    key: &GroupKey,
    origin: Option<&str>,
) -> Option<(ClientId, SubOpts)> {
    let State {
        groups, sessions, ..
    } = st;
    let g = groups.get_mut(key)?;
    let n = g.members.len();
    let eligible = |(c, o): &(ClientId, SubOpts)| !(o.no_local && origin == Some(&**c));
    let connected = |c: &ClientId| sessions.get(c).is_some_and(|s| s.link.is_some());
    for pass in 0..2 {
        for i in 0..n {
            let idx = (g.next + i) % n;
            let m = &g.members[idx];
            if eligible(m) && (pass == 1 || connected(&m.0)) {
                g.next = (idx + 1) % n;
                return Some(m.clone());
            }
        }
    }
    None
}

/// Index `client`'s subscription; returns the options it replaced.
fn add_subscription(
    st: &mut State,
    client: &ClientId,
    filter: &str,
    opts: &SubOpts,
) -> Option<SubOpts> {
    let old = index_subscription(st, client, filter, opts);
    if old.is_none() {
        st.routes.add_local(filter);
    }
    old
}

fn index_subscription(
    st: &mut State,
    client: &ClientId,
    filter: &str,
    opts: &SubOpts,
) -> Option<SubOpts> {
    match shared(filter) {
        Some((group, inner)) => {
            let gkey: GroupKey = (Arc::from(group), inner.to_string());
            st.trie.insert(
                inner,
                SubKey::Group(gkey.0.clone()),
                SubOpts {
                    qos: 2,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 2,
                    id: None,
                },
            );
            let g = st.groups.entry(gkey).or_default();
            match g.members.iter_mut().find(|(c, _)| c == client) {
                Some(m) => Some(std::mem::replace(&mut m.1, opts.clone())),
                None => {
                    g.members.push((client.clone(), opts.clone()));
                    None
                }
            }
        }
        None => st
            .trie
            .insert(filter, SubKey::Client(client.clone()), opts.clone()),
    }
}

/// Record a change for the durable state (when it is kept).
fn record(st: &mut State, op: Op) {
    if st.store {
        st.ops.push(op);
        st.op_count += 1;
    }
}

/// A persistent session's current record.
fn save_session(st: &mut State, client: &ClientId) {
    let op = match st.sessions.get(client) {
        Some(s) if s.persistent() => Op::Session {
            client: s.client_id.clone(),
            record: Some(s.record()),
        },
        _ => return,
    };
    record(st, op);
}

/// A session ended: its records go from the durable state.
fn forget(st: &mut State, gone: &Session) {
    forget_queue(st, gone);
    record(
        st,
        Op::Session {
            client: gone.client_id.clone(),
            record: None,
        },
    );
}

/// The records of a session's queued and in-flight messages go.
fn forget_queue(st: &mut State, gone: &Session) {
    let seqs: Vec<u64> = gone
        .queue
        .iter()
        .chain(gone.inflight.values().map(|o| &o.item))
        .map(|q| q.seq)
        .filter(|&s| s != 0)
        .collect();
    for seq in seqs {
        record(
            st,
            Op::Queue {
                client: gone.client_id.clone(),
                seq,
                item: None,
            },
        );
    }
}

/// A queued message left its session (delivered, dropped, expired).
fn unqueue(st: &mut State, client: &ClientId, seq: u64) {
    if seq != 0 {
        record(
            st,
            Op::Queue {
                client: client.clone(),
                seq,
                item: None,
            },
        );
    }
}

fn remove_subscription(st: &mut State, client: &ClientId, filter: &str) {
    st.routes.remove_local(filter);
    match shared(filter) {
        Some((group, inner)) => {
            let key: GroupKey = (Arc::from(group), inner.to_string());
            if let Some(g) = st.groups.get_mut(&key) {
                g.members.retain(|(c, _)| c != client);
                if g.members.is_empty() {
                    st.groups.remove(&key);
                    st.trie.remove(inner, &SubKey::Group(key.0.clone()));
                }
            }
        }
        None => {
            st.trie.remove(filter, &SubKey::Client(client.clone()));
        }
    }
}

fn remove_subscriptions(st: &mut State, gone: &Session) {
    for f in gone.subs.keys() {
        remove_subscription(st, &gone.client_id, f);
    }
}

/// A packet id not in flight. Ids wrap and skip those still in use (a
/// sender must not reuse an id until its exchange is complete).
fn free_packet_id(s: &mut Session) -> u16 {
    loop {
        s.next_packet_id = s.next_packet_id.wrapping_add(1);
        if s.next_packet_id != 0 && !s.inflight.contains_key(&s.next_packet_id) {
            return s.next_packet_id;
        }
    }
}

/// Retained messages whose topics match `filter`. Topics share a prefix
/// with the filter's part before its first wildcard, so only that range of
/// the ordered map is scanned.
fn retained_matching(retained: &BTreeMap<String, Arc<Message>>, filter: &str) -> Vec<Arc<Message>> {
    let literal_end = filter.find(['+', '#']).unwrap_or(filter.len());
    let prefix = &filter[..literal_end];
    if literal_end == filter.len() {
        return retained.get(filter).cloned().into_iter().collect();
    }
    let mut found: Vec<Arc<Message>> = retained
        .range::<str, _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(t, _)| t.starts_with(prefix))
        .filter(|(t, _)| super::topic::matches(t, filter))
        .map(|(_, m)| m.clone())
        .collect();
    // `a/#` also matches `a` itself, which sorts outside the `a/` range.
    if let Some(parent) = filter.strip_suffix("/#")
        && !parent.contains('+')
        && let Some(m) = retained.get(parent)
    {
        found.push(m.clone());
    }
    found
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use shoal_placement::MqttRoute;

    use super::*;

    fn member(hub: &Hub, client: &str, filter: &str) {
        hub.connect(
            ConnectRequest {
                client_id: Arc::from(client),
                clean_start: true,
                expiry_secs: 0,
                will: None,
                wake: Arc::new(Notify::new()),
                window: 10,
                username: None,
            },
            0,
        );
        let opts = SubOpts {
            qos: 1,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            id: None,
        };
        hub.subscribe(client, vec![(filter.to_string(), opts)], 0);
    }

    fn msg(topic: &str) -> Message {
        Message {
            topic: Arc::from(topic),
            payload: Bytes::from_static(b"x"),
            qos: 1,
            retain: false,
            props: Default::default(),
            received_ms: 0,
            origin: None,
        }
    }

    fn queued(hub: &Hub, client: &str) -> usize {
        hub.clients()
            .iter()
            .find(|c| c.client_id == client)
            .map_or(0, |c| c.queued)
    }

    #[test]
    fn shared_groups_take_turns_across_brokers_and_plain_routes_get_every_message() {
        let routes = Arc::new(Routes::default());
        let hub = Hub::with_routes(Limits::default(), routes.clone());
        let (fw, mut rx) = Forwarder::new();
        hub.set_forwarder(fw);
        member(&hub, "here", "$share/g/t/#");
        assert_eq!(
            routes.local_filters(),
            Some(vec!["$share/g/t/#".to_string()])
        );
        routes.set_remote(
            &[
                MqttRoute {
                    broker: 2,
                    http_addr: "b2".into(),
                    filters: vec!["$share/g/t/#".into()],
                },
                MqttRoute {
                    broker: 3,
                    http_addr: "b3".into(),
                    filters: vec!["t/+".into()],
                },
            ],
            1,
        );
        for _ in 0..10 {
            hub.publish(msg("t/x"), 0);
        }
        let mut to2 = 0;
        let mut to3 = 0;
        while let Ok(f) = rx.try_recv() {
            match f.broker {
                2 => {
                    assert!(!f.plain);
                    assert_eq!(f.groups.len(), 1);
                    to2 += 1;
                }
                3 => {
                    assert!(f.plain && f.groups.is_empty());
                    to3 += 1;
                }
                b => panic!("forwarded to {b}"),
            }
        }
        // Broker 3 subscribes plainly: every message. The group takes each
        // message once, here or on broker 2, in turn.
        assert_eq!(to3, 10);
        assert_eq!(to2 + queued(&hub, "here"), 10);
        assert!(to2 > 0 && queued(&hub, "here") > 0);
    }

    #[test]
    fn only_publishes_that_queue_durable_state_wait_for_it() {
        let hub = Hub::new(Limits::default());
        hub.enable_store();
        let connect = |expiry| {
            hub.connect(
                ConnectRequest {
                    client_id: Arc::from("p"),
                    clean_start: false,
                    expiry_secs: expiry,
                    will: None,
                    wake: Arc::new(Notify::new()),
                    window: 10,
                    username: None,
                },
                0,
            )
        };
        let first = connect(3600);
        let opts = SubOpts {
            qos: 1,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            id: None,
        };
        hub.subscribe("p", vec![("t".to_string(), opts)], 0);
        hub.disconnect("p", first.link, false, None, 0);
        let _ = hub.take_ops();
        // Queued for the offline persistent session: a mark to wait for.
        let (_, mark) = hub.publish_marked(msg("t"), 0);
        assert_eq!(mark, Some(hub.op_mark()));
        let (ops, _) = hub.take_ops();
        assert!(matches!(
            &ops[..],
            [Op::Queue {
                seq: 1,
                item: Some(_),
                ..
            }]
        ));
        // Nobody keeps this one: nothing to wait for.
        assert_eq!(hub.publish_marked(msg("u"), 0).1, None);
        // Back with no expiry: the session is no longer kept, and its
        // durable record goes.
        connect(0);
        let (ops, _) = hub.take_ops();
        assert!(
            ops.iter()
                .any(|o| matches!(o, Op::Session { record: None, .. })),
            "{ops:?}"
        );
    }

    #[test]
    fn forwarded_messages_reach_only_the_chosen_subscribers_and_go_no_further() {
        let routes = Arc::new(Routes::default());
        let hub = Hub::with_routes(Limits::default(), routes.clone());
        let (fw, mut rx) = Forwarder::new();
        hub.set_forwarder(fw);
        member(&hub, "plain", "t/#");
        member(&hub, "shared", "$share/g/t/#");
        routes.set_remote(
            &[MqttRoute {
                broker: 2,
                http_addr: "b2".into(),
                filters: vec!["t/#".into()],
            }],
            1,
        );
        // For the group only: the plain subscriber does not get it.
        hub.deliver_forwarded(msg("t/x"), false, vec![(Arc::from("g"), "t/#".into())]);
        assert_eq!(queued(&hub, "plain"), 0);
        assert_eq!(queued(&hub, "shared"), 1);
        hub.deliver_forwarded(msg("t/x"), true, vec![]);
        assert_eq!(queued(&hub, "plain"), 1);
        assert_eq!(queued(&hub, "shared"), 1);
        // Never forwarded again, though broker 2 subscribes too.
        assert!(rx.try_recv().is_err());
    }

    fn persistent(hub: &Hub, client: &str, user: Option<&str>, wake: Arc<Notify>) -> Attached {
        hub.connect(
            ConnectRequest {
                client_id: Arc::from(client),
                clean_start: false,
                expiry_secs: 600,
                will: None,
                wake,
                window: 1,
                username: user.map(str::to_string),
            },
            0,
        )
    }

    #[test]
    fn a_session_handed_over_resumes_on_the_other_broker_with_its_messages() {
        let (routes_a, routes_b) = (Arc::new(Routes::default()), Arc::new(Routes::default()));
        let a = Hub::with_routes(Limits::default(), routes_a.clone());
        let b = Hub::with_routes(Limits::default(), routes_b.clone());
        let old = Arc::new(Notify::new());
        let first = persistent(&a, "c", Some("u"), old.clone());
        let opts = SubOpts {
            qos: 1,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            id: Some(4),
        };
        a.subscribe("c", vec![("t/#".to_string(), opts)], 0);
        // Window 1: one message goes out and stays in flight, two wait.
        for _ in 0..3 {
            a.publish(msg("t/x"), 0);
        }
        let sent = a.next_sends("c", first.link, 0).unwrap();
        assert_eq!(sent.len(), 1);
        // Only the user who left it may take it.
        assert_eq!(
            a.hand_over("c", Some("v"), false, None, 0).unwrap_err(),
            OtherUser
        );
        assert!(
            a.hand_over("nobody", None, false, None, 0)
                .unwrap()
                .is_none()
        );
        let h = a
            .hand_over("c", Some("u"), false, Some(2), 5)
            .unwrap()
            .unwrap();
        // Gone from the first broker, its connection detached, its route too.
        assert!(a.session_user("c").is_none());
        assert!(!a.is_attached("c", first.link));
        assert_eq!(routes_a.local_filters(), Some(vec![]));
        b.adopt(Arc::from("c"), h, 5);
        assert_eq!(routes_b.local_filters(), Some(vec!["t/#".to_string()]));
        let resumed = persistent(&b, "c", Some("u"), Arc::new(Notify::new()));
        assert!(resumed.session_present);
        // The message in flight goes again with DUP and its packet id.
        let again = b.next_sends("c", resumed.link, 0).unwrap();
        assert!(matches!(
            again.as_slice(),
            [Send::Publish { packet_id: Some(p), dup: true, item }]
                if Some(*p) == match &sent[0] { Send::Publish { packet_id, .. } => *packet_id, _ => None }
                    && item.sub_ids == vec![4]
        ));
        assert!(b.acked(
            "c",
            match &again[0] {
                Send::Publish {
                    packet_id: Some(p), ..
                } => *p,
                _ => 0,
            }
        ));
        let rest = b.next_sends("c", resumed.link, 0).unwrap();
        assert!(matches!(
            rest.as_slice(),
            [Send::Publish { dup: false, .. }]
        ));
    }

    #[test]
    fn retained_messages_reach_every_broker_and_are_kept_there() {
        let routes = Arc::new(Routes::default());
        let hub = Hub::with_routes(Limits::default(), routes.clone());
        let (fw, mut rx) = Forwarder::new();
        hub.set_forwarder(fw);
        routes.set_remote(
            &[
                MqttRoute {
                    broker: 2,
                    http_addr: "b2".into(),
                    filters: vec![],
                },
                MqttRoute {
                    broker: 3,
                    http_addr: "b3".into(),
                    filters: vec!["r/#".into()],
                },
            ],
            1,
        );
        let mut m = msg("r/1");
        m.retain = true;
        hub.publish(m.clone(), 0);
        let mut to = Vec::new();
        while let Ok(f) = rx.try_recv() {
            to.push((f.broker, f.plain));
        }
        // Broker 2 has no subscriber: it keeps the message, delivers none.
        assert_eq!(to, vec![(2, false), (3, true)]);
        // The receiving side keeps what a peer forwards, and what a peer
        // has when it starts, unless it has something newer.
        let other = Hub::new(Limits::default());
        other.deliver_forwarded(m.clone(), false, vec![]);
        assert_eq!(other.retained_all().len(), 1);
        let mut older = msg("r/1");
        older.payload = Bytes::from_static(b"old");
        older.received_ms = -1;
        let mut newer = msg("r/2");
        newer.retain = true;
        assert_eq!(other.merge_retained(vec![older, newer]), 1);
        let topics: Vec<(String, Bytes)> = other
            .retained_all()
            .iter()
            .map(|m| (m.topic.to_string(), m.payload.clone()))
            .collect();
        assert_eq!(
            topics,
            vec![
                ("r/1".to_string(), Bytes::from_static(b"x")),
                ("r/2".to_string(), Bytes::from_static(b"x"))
            ]
        );
    }
}

//! The peer's driver of the room protocol (`--wire room`, the default): connects to the broker,
//! turns packets into [`Input`]s for the [`RoomNode`], makes every [`Action::Persist`] durable in
//! the peer's data directory ([`Store`]) before anything that follows it, and carries out the rest.
//!
//! It uses [`crate::transport`]'s network task, client ids, options, drop log and mining clock.
//! Each peer subscribes to the room topics (the solutions topic only while it is controller) and
//! to its own topic `<prefix>/peer/<id>`, not to the other peers' statuses: it learns of departures from their `Leave`, which is the Last Will
//! of their protocol connection. A second connection, the status beacon, publishes this peer's
//! retained status (see [`crate::status`]), with the offline status as its will, for whoever
//! watches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::PeerConfig;
use crate::driver::{self, Dropped, Reporter, Wire};
use crate::events::{Event, EventSink};
use crate::miner::{Found, Miner, Pool};
use crate::protocol::{DropReason, PeerId, Topics};
use crate::status::{Role, STATUS_MIN_GAP, Schedule, Status};
use crate::store::{Identity, Store};
use crate::transport::{FirstConnect, Link, Net, PeerError, Traffic, beacon_client_id, mqtt_client_id, mqtt_options};
use hashvote_core::room::{self, Action, Channel, Input, Msg, Restored, RoomNode, RoomNodeConfig, Timing, Write};

/// Runs a peer until `shutdown` is cancelled (clean exit: announces its departure) or a fatal
/// error. Its durable state lives in `store`; every event goes to `events`.
pub async fn run(
    cfg: PeerConfig,
    store: Store,
    identity: Identity,
    restored: Restored,
    pool: &Arc<Pool>,
    mut events: EventSink,
    shutdown: CancellationToken,
) -> Result<(), PeerError> {
    let (room, link) = RoomDriver::start(cfg, store, identity, restored, pool, &mut events);
    driver::run(room, link, Reporter::new(events), shutdown).await
}

/// The room protocol's driver: a [`RoomNode`], its data directory, its miner and the status
/// beacon, fed by [`driver::run`].
pub(crate) struct RoomDriver {
    id: PeerId,
    topics: Topics,
    /// `<prefix>/peer/<id>`, where requests to this peer alone come.
    direct: String,
    max_payload: usize,
    node: RoomNode,
    store: Store,
    clock: Clock,
    /// The protocol connection's client (its [`Link`] is the driver loop's).
    client: AsyncClient,
    /// The status beacon's connection, and whether it is up: statuses are not queued while it is
    /// down (rumqttc's request channel would fill, and block us, during a long outage); the next
    /// CONNACK sends one.
    beacon: Link,
    online: bool,
    status: StatusPublisher,
    status_tick: tokio::time::Interval,
    miner: Miner,
    found: mpsc::UnboundedReceiver<Found>,
    /// Whether the protocol connection ever came up, and whether it is up: the node's timers run
    /// only meanwhile.
    connected_once: bool,
    main_up: bool,
    /// Whether we subscribe to the solutions: only as controller. Every miner's solution to every
    /// peer was 300 deliveries per solution in a room of 300, where dozens of miners solve an
    /// easy challenge before its result reaches them; only the controller reads them.
    solutions: bool,
    /// A gap between status ticks this long means the process stood still (SIGSTOP, a frozen
    /// machine).
    stall_after: Duration,
    last_tick: Instant,
}

impl RoomDriver {
    /// Builds the node from `restored`, opens both connections and starts the miner's threads.
    fn start(
        cfg: PeerConfig,
        store: Store,
        identity: Identity,
        restored: Restored,
        pool: &Arc<Pool>,
        events: &mut EventSink,
    ) -> (Self, Link) {
        let id = identity.id;
        let topics = Topics::new(&cfg.prefix);
        // The process's mining threads, shared by the peers it runs.
        let threads = pool.threads();
        events.emit(Event::Started { pid: std::process::id(), client_id: id, room_size: cfg.room_size, threads });
        info!(
            id,
            room_size = cfg.room_size,
            threads,
            height = restored.blocks.len(),
            term = restored.term,
            "peer starting"
        );
        let incarnation: u64 = rand::random();
        let clock = Clock::new();
        let node = new_node(&cfg, &identity, incarnation, clock.now_ms(), restored);
        // A restart says what it resumed from, even nothing: what it had only staged (blocks synced
        // but never acknowledged) may be gone, and its events must not pretend otherwise.
        if store.existed() {
            events.emit(Event::Resumed {
                term: node.term(),
                height: node.chain().height(),
                commit: node.commit(),
                tip: node.chain().blocks().last().map(|b| b.hash.to_hex()),
            });
        }
        let status_topic = topics.status_topic(id);
        let status_threads = u16::try_from(threads).unwrap_or(u16::MAX);
        let (link, beacon) = connections(&cfg, &topics, id, incarnation, &node, &status_topic, status_threads);
        let status = StatusPublisher {
            topic: status_topic,
            threads: status_threads,
            traffic: [link.traffic(), beacon.traffic()],
            schedule: Schedule::default(),
        };
        let (found_tx, found) = mpsc::unbounded_channel::<Found>();
        let miner = pool.seat(move |f| {
            let _ = found_tx.send(f);
        });
        let mut status_tick = tokio::time::interval(STATUS_MIN_GAP);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let room = Self {
            id,
            direct: topics.direct_topic(id),
            topics,
            max_payload: cfg.max_payload,
            node,
            store,
            clock,
            client: link.client().clone(),
            beacon,
            online: false,
            status,
            status_tick,
            miner,
            found,
            connected_once: false,
            main_up: false,
            solutions: false,
            stall_after: Duration::from_millis(cfg.keepalive_s * 1500),
            last_tick: Instant::now(),
        };
        (room, link)
    }

    /// Publishes the status if due; after a stall, tells the node.
    async fn on_status_tick(&mut self, mining_ms: u64) -> Option<Input> {
        let stalled = self.last_tick.elapsed() > self.stall_after;
        self.last_tick = Instant::now();
        if self.online {
            self.status.send(&self.beacon, self.node.status(self.clock.now_ms()), &self.miner, mining_ms, false).await;
        }
        if stalled && self.connected_once {
            let ms = self.stall_after.as_millis() as u64;
            warn!(ms, "this process stood still for longer than the room waits");
            return Some(Input::Stalled);
        }
        None
    }

    /// Follows the beacon's connection. Retained statuses are lost when a broker without
    /// persistence restarts (rumqttd keeps them in memory only): every connection sends ours again.
    async fn on_beacon(&mut self, net: Net, mining_ms: u64) {
        match net {
            Net::Connected(_) => {
                self.online = true;
                self.status
                    .send(&self.beacon, self.node.status(self.clock.now_ms()), &self.miner, mining_ms, true)
                    .await;
            }
            Net::Lost(_) => self.online = false,
            Net::Publish { .. } | Net::Fatal(_) => {}
        }
    }

    /// Makes the batch's `writes` so far as durable as `action` needs, before it is carried out.
    ///
    /// What a message promises (a vote, a block held) is on disk before it goes out: the writes of
    /// a batch are committed together before the first action after them, and made durable (with
    /// all staged before) before the first message that is not a sync request. A sync request
    /// promises nothing, so a peer catching up writes its blocks without waiting for the disk at
    /// each reply; a non-voter, which promises nothing, hardly ever waits.
    ///
    /// An event depends on nothing written, and goes out before what it describes: a peer killed
    /// between the two must not resume from blocks its events never said (a failover bench's
    /// invariant check once caught a controller's last block on disk without its
    /// `block_accepted`, staged before the event was written).
    fn write_before(&mut self, action: &Action, writes: &mut Vec<Write>, events: &mut EventSink) -> Result<(), String> {
        let event = matches!(action, Action::Emit(_));
        if !event && !writes.is_empty() {
            events.flush();
        }
        let promise = matches!(action, Action::Publish(msg) if !matches!(msg, Msg::SyncRequest { .. }));
        let written = match (writes.is_empty() || event, promise) {
            (true, false) => Ok(()),
            (false, false) => self.store.stage(&std::mem::take(writes)),
            (_, true) => self.store.apply(&std::mem::take(writes)),
        };
        written.map_err(|e| format!("cannot write the data directory: {e}"))
    }

    /// Carries out one action other than a write; returns the reason of a fatal one.
    async fn apply(&mut self, action: Action, report: &mut Reporter) -> Option<String> {
        match action {
            Action::Persist(_) => unreachable!("writes are batched by on_input"),
            Action::Publish(msg) => {
                report.events.flush();
                publish(&self.client, &self.topics, self.id, msg).await;
            }
            Action::Mine(job) => {
                self.miner.start(job);
                report.mining(Some(job.tx), self.miner.hashes());
            }
            Action::StopMining => {
                self.miner.stop();
                report.mining(None, self.miner.hashes());
            }
            Action::Emit(event) => report.emit(event),
            Action::Fatal(reason) => return Some(reason),
        }
        None
    }

    /// Subscribes to the solutions on becoming controller, and unsubscribes on ceasing to be.
    /// Before a batch's messages: a new controller's first challenge goes out after its
    /// subscription, on the same connection, so no solution to it is missed.
    async fn follow_solutions(&mut self) {
        if !self.main_up || self.solutions == self.node.is_controller() {
            return;
        }
        self.solutions = self.node.is_controller();
        let topic = self.topics.topic(crate::protocol::Channel::Solution).to_string();
        let done = if self.solutions {
            self.client.subscribe(topic, self.subscription_qos()).await
        } else {
            self.client.unsubscribe(topic).await
        };
        if let Err(e) = done {
            warn!(error = %e, "cannot change the subscription to the solutions");
        }
    }
}

impl Wire for RoomDriver {
    type Input = Input;

    /// The room topics and our own; the solutions only as controller (see `solutions`).
    fn subscriptions(&self) -> Vec<String> {
        let solution = self.topics.topic(crate::protocol::Channel::Solution);
        self.topics
            .all()
            .into_iter()
            .filter(|t| *t != solution || self.node.is_controller())
            .chain(std::iter::once(self.direct.as_str()))
            .map(str::to_string)
            .collect()
    }

    /// All at QoS 0. The sessions are clean, so QoS 1 redelivers nothing after a reconnect;
    /// on a live connection TCP already delivers in order, and the protocol repeats what
    /// matters (pre-ballots after an election timeout, grants and ballots on reconnecting,
    /// syncs and solutions until answered). What QoS 1 adds is cost: an acknowledgement and a
    /// round trip per delivery, within a window of 100 unacknowledged on rumqttd, and on
    /// RabbitMQ a durable queue per subscriber, to which each QoS 1 publish is written as a
    /// persistent message. 300 peer processes on a 3-node RabbitMQ cluster took 26 s to hear
    /// each other's hellos at QoS 1, missed their keepalives, reconnected by hundreds, and
    /// made no 25 blocks in 5 minutes; at QoS 0, with the timers of a room of 300
    /// (`Timing::for_room`), they elected 13 to 20 s after the last connected and made them in
    /// one term (four runs). On rumqttd, a room of 1,000 elects as fast either
    /// way (three runs each); the voting topic alone was measured faster at QoS 0 (3.7 to 3.9
    /// s against 4.8 to 5.8 s, a room of 1,000, before its hellos were cut). Publishes stay at
    /// QoS 1, acknowledged by the broker.
    fn subscription_qos(&self) -> QoS {
        QoS::AtMostOnce
    }

    async fn own_input(&mut self, report: &mut Reporter) -> Option<Input> {
        let timer = self.clock.instant(self.node.next_timer());
        tokio::select! {
            // The status tick first: after the process stood still, it tells the node so.
            biased;
            _ = self.status_tick.tick() => self.on_status_tick(report.mining_ms()).await,
            () = tokio::time::sleep_until(timer), if self.main_up => Some(Input::Tick),
            Some(found) = self.found.recv() => Some(Input::Mined(found)),
            Some(net) = self.beacon.recv() => {
                self.on_beacon(net, report.mining_ms()).await;
                None
            }
        }
    }

    fn on_connected(&mut self) -> Input {
        self.solutions = self.node.is_controller();
        self.connected_once = true;
        self.main_up = true;
        Input::Connected
    }

    fn on_lost(&mut self) {
        self.main_up = false;
    }

    fn on_packet(&mut self, topic: &str, payload: &[u8]) -> Result<Input, Dropped> {
        let channel = if topic == self.direct {
            Some(Channel::Direct(self.id))
        } else {
            self.topics.channel(topic).map(Channel::from)
        };
        let Some(channel) = channel else {
            return Err(Dropped { reason: DropReason::UnexpectedTopic, detail: format!("message on {topic}") });
        };
        room::decode(payload, channel, self.max_payload)
            .map(Input::Message)
            .map_err(|e| Dropped { reason: e.drop_reason(), detail: format!("on {topic}: {e}") })
    }

    async fn on_input(&mut self, input: Input, report: &mut Reporter) -> Result<(), PeerError> {
        let mut force_status = matches!(input, Input::Connected);
        let mut fatal = None;
        let mut writes = Vec::new();
        report.events.hold();
        let actions = self.node.handle(self.clock.now_ms(), input);
        self.follow_solutions().await;
        for action in actions {
            if let Action::Persist(w) = action {
                writes.push(w);
                continue;
            }
            if let Err(e) = self.write_before(&action, &mut writes, &mut report.events) {
                fatal = Some(e);
                break;
            }
            force_status |=
                matches!(&action, Action::Emit(Event::QuorumWaiting { .. } | Event::ControllerElected { .. }));
            if let Some(reason) = self.apply(action, report).await {
                fatal = Some(reason);
            }
        }
        report.events.release();
        if fatal.is_none()
            && let Err(e) = self.store.stage(&writes)
        {
            fatal = Some(format!("cannot write the data directory: {e}"));
        }
        if let Some(reason) = fatal {
            return Err(PeerError::Protocol(reason));
        }
        if self.online {
            let status = self.node.status(self.clock.now_ms());
            self.status.send(&self.beacon, status, &self.miner, report.mining_ms(), force_status).await;
        }
        Ok(())
    }

    async fn shutdown(&mut self, mut link: Link, clean: bool, report: &mut Reporter) {
        self.miner.stop();
        // What we staged becomes durable, so a restart resumes from where we stopped.
        if let Err(e) = self.store.sync() {
            warn!(error = %e, "cannot write the data directory");
        }
        if clean && link.connected_once() {
            // A clean goodbye, so the room does not wait for a timeout, and our status marked
            // offline (the DISCONNECTs below discard the wills that would say so).
            publish(&self.client, &self.topics, self.id, self.node.farewell()).await;
            // Never an empty publish to clear a retained status: rumqttd deletes a retained
            // message on an empty publish *without* RETAIN, which MQTT says must not touch it.
            let now = Instant::now();
            let offline = offline_status(self.node.status(self.clock.now_ms()));
            let offline = self.status.fill(offline, &self.miner, report.mining_ms(), now);
            self.beacon.publish(self.status.topic.clone(), true, offline.encode()).await;
        }
        // A DISCONNECT also discards our Last Will: a duplicate giving way must not announce
        // the departure of the peer whose id it shares.
        tokio::join!(link.close(), self.beacon.close());
        info!(height = self.node.chain().height(), commit = self.node.commit(), "peer stopped");
    }
}

/// The room protocol's node of this process, on what its data directory `restored`.
fn new_node(cfg: &PeerConfig, identity: &Identity, incarnation: u64, now_ms: u64, restored: Restored) -> RoomNode {
    RoomNode::new(
        RoomNodeConfig {
            id: identity.id,
            key: identity.key,
            incarnation,
            since_ms: now_ms,
            room_size: cfg.room_size,
            pace: cfg.pace(),
            alg: cfg.hash,
            seed: rand::random(),
            timing: Timing {
                replace_after_ms: cfg.replace_after_s.saturating_mul(1_000),
                ..Timing::for_room(cfg.room_size)
            },
        },
        restored,
    )
}

/// Opens the peer's two connections, each with a Last Will: the protocol connection's and the
/// status beacon's.
///
/// The protocol connection's will is our `Leave`, on the room's init topic: the peers learn of our
/// death from it. The status beacon subscribes to nothing and its will is our status marked
/// offline, retained, for whoever watches; rumqttd restarts a connection's keepalive countdown
/// whenever it *sends* to it, so a beacon that receives nothing has its will sent 1.5 x keepalive
/// after we fall silent on any broker.
fn connections(
    cfg: &PeerConfig,
    topics: &Topics,
    id: PeerId,
    incarnation: u64,
    node: &RoomNode,
    status_topic: &str,
    threads: u16,
) -> (Link, Link) {
    let leave = LastWill::new(
        topics.topic(crate::protocol::Channel::Init),
        room::encode(&room::Envelope::new(id, node.farewell())),
        QoS::AtLeastOnce,
        false,
    );
    let offline = Status { threads, ..offline_status(node.status(crate::events::now_ms())) };
    let beacon_will = LastWill::new(status_topic, offline.encode(), QoS::AtLeastOnce, true);
    let first = FirstConnect::of(cfg);
    // Both connections go to the same broker of a list first: the peer's id spreads the room.
    let link = Link::open(mqtt_options(cfg, &mqtt_client_id(id, incarnation), Some(leave), id), 1024, first.clone());
    // The beacon's own failures to connect are the protocol connection's too, which reports them.
    let beacon = Link::open(mqtt_options(cfg, &beacon_client_id(id, incarnation), Some(beacon_will), id), 64, first);
    (link, beacon)
}

/// The protocol's clock: monotonic milliseconds, starting at the Unix time the process started
/// (so block times read like wall-clock times, yet a clock step never moves a timer).
struct Clock {
    start: Instant,
    base_ms: u64,
}

impl Clock {
    fn new() -> Self {
        Self { start: Instant::now(), base_ms: crate::events::now_ms() }
    }

    fn now_ms(&self) -> u64 {
        self.base_ms + self.start.elapsed().as_millis() as u64
    }

    /// The instant at protocol time `ms` (capped a second ahead: nothing waits longer unseen).
    fn instant(&self, ms: u64) -> tokio::time::Instant {
        let ahead = ms.saturating_sub(self.now_ms()).min(1000);
        tokio::time::Instant::now() + Duration::from_millis(ahead)
    }
}

/// Publishes this peer's retained status when its [`Schedule`] says so.
struct StatusPublisher {
    /// `<prefix>/status/<id>`.
    topic: String,
    threads: u16,
    /// The counts of both connections, the protocol's and the beacon's.
    traffic: [Arc<Traffic>; 2],
    schedule: Schedule,
}

impl StatusPublisher {
    /// Publishes `status` (the node's, built after every input: no field costs more than a map
    /// lookup) if it is due, or at once if `force`.
    async fn send(&mut self, beacon: &Link, status: Status, miner: &Miner, mining_ms: u64, force: bool) {
        let now = Instant::now();
        if !force && !self.schedule.due(&status, now) {
            return;
        }
        let status = self.fill(status, miner, mining_ms, now);
        // Retained, so a watcher that subscribes later gets it; QoS 1 like everything else.
        beacon.publish(self.topic.clone(), true, status.encode()).await;
        self.schedule.published(&status, now);
    }

    /// Adds the mining figures the node does not know.
    fn fill(&mut self, mut status: Status, miner: &Miner, mining_ms: u64, now: Instant) -> Status {
        let hashes = miner.hashes();
        status.mining_ms = mining_ms;
        status.hash_rate = self.schedule.hash_rate(hashes, now);
        status.hashes = hashes;
        status.threads = self.threads;
        status.published = self.traffic.iter().map(|t| t.published()).sum();
        status.delivered = self.traffic.iter().map(|t| t.delivered()).sum();
        status
    }
}

/// `status` marked offline: the beacon's Last Will, and our last word on a clean exit.
fn offline_status(status: Status) -> Status {
    Status { role: Role::Offline, tx: None, difficulty: None, ..status }
}

/// Publishes `msg` from `id` on its channel's topic.
async fn publish(client: &AsyncClient, topics: &Topics, id: PeerId, msg: Msg) {
    let topic = match msg.channel() {
        Channel::Direct(to) => topics.direct_topic(to),
        other => topics.topic(other.broadcast().expect("a broadcast channel")).to_string(),
    };
    crate::transport::publish(client, topic, false, room::encode(&room::Envelope::new(id, msg))).await;
}

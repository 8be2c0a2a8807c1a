//! The loop every peer runs, whatever its wire format. It waits for the next input (a change of
//! connection or a packet from the broker, through the [`Link`], or one of the wire's own: a
//! solution found, a timer) and hands it to the wire's driver, a [`Wire`], which feeds its node
//! and carries out the node's actions. The room protocol's driver is [`crate::room::RoomDriver`],
//! the lab's [`crate::lab::driver::LabDriver`]; what both report goes through a [`Reporter`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::events::{Event, EventSink};
use crate::protocol::DropReason;
use crate::transport::{Link, Net, PeerError};

/// A payload the driver drops before its node sees it: why, and what it was.
pub(crate) struct Dropped {
    pub(crate) reason: DropReason,
    pub(crate) detail: String,
}

/// One wire format's driver: its node, its connections other than the [`Link`], and what it
/// does with the node's actions.
pub(crate) trait Wire {
    /// An input of the wire's node.
    type Input;

    /// The topics to subscribe to, on every CONNACK (clean sessions keep none).
    fn subscriptions(&self) -> Vec<String>;

    /// The QoS of those subscriptions (see the room's): QoS 1 unless the wire says otherwise.
    fn subscription_qos(&self) -> QoS {
        QoS::AtLeastOnce
    }

    /// Waits for the next input of the wire's own; `None` when it dealt with what came itself.
    async fn own_input(&mut self, report: &mut Reporter) -> Option<Self::Input>;

    /// The link is up again and subscribed.
    fn on_connected(&mut self) -> Self::Input;

    /// The link is down; it reconnects by itself.
    fn on_lost(&mut self) {}

    /// A packet from the broker, decoded into an input or dropped.
    fn on_packet(&mut self, topic: &str, payload: &[u8]) -> Result<Self::Input, Dropped>;

    /// Hands `input` to the node and carries out its actions; an error stops the peer.
    async fn on_input(&mut self, input: Self::Input, report: &mut Reporter) -> Result<(), PeerError>;

    /// The peer stops (`clean`: on request, not on an error); closes `link` and the wire's own.
    async fn shutdown(&mut self, link: Link, clean: bool, report: &mut Reporter);
}

/// Runs `wire` over `link` until `stop` is cancelled (a clean exit) or an error.
pub(crate) async fn run<W: Wire>(
    mut wire: W,
    mut link: Link,
    mut report: Reporter,
    stop: CancellationToken,
) -> Result<(), PeerError> {
    let result = drive(&mut wire, &mut link, &mut report, &stop).await;
    wire.shutdown(link, result.is_ok(), &mut report).await;
    report.events.emit(Event::Stopped);
    result
}

async fn drive<W: Wire>(
    wire: &mut W,
    link: &mut Link,
    report: &mut Reporter,
    stop: &CancellationToken,
) -> Result<(), PeerError> {
    let mut connected_once = false;
    loop {
        let input = tokio::select! {
            // In this order: after the process stood still, the wire's overdue timers come first
            // and tell the node so before it reads the backlog of what happened meanwhile.
            biased;
            () = stop.cancelled() => return Ok(()),
            own = wire.own_input(report) => match own {
                Some(input) => input,
                None => continue,
            },
            net = link.recv() => match net {
                None => return Ok(()),
                Some(Net::Fatal(e)) => return Err(e),
                Some(Net::Lost(reason)) => {
                    wire.on_lost();
                    report.events.emit(Event::Disconnected { reason });
                    continue;
                }
                Some(Net::Connected(_)) => {
                    if !link.subscribe(wire.subscriptions(), wire.subscription_qos()).await {
                        continue;
                    }
                    if !connected_once {
                        info!(broker = %link.addr(), "connected");
                        connected_once = true;
                    }
                    report.events.emit(Event::Connected { broker: link.addr().to_string() });
                    wire.on_connected()
                }
                Some(Net::Publish { topic, payload }) => match wire.on_packet(&topic, &payload) {
                    Ok(input) => input,
                    Err(Dropped { reason, detail }) => {
                        report.drops.count(reason.as_str(), || detail);
                        continue;
                    }
                },
            },
        };
        wire.on_input(input, report).await?;
    }
}

/// What a driver reports: its events, its dropped messages (logged at most once a second per
/// reason), and its time spent mining.
pub(crate) struct Reporter {
    pub(crate) events: EventSink,
    drops: DropLog,
    mining: MiningClock,
}

impl Reporter {
    pub(crate) fn new(events: EventSink) -> Self {
        Self { events, drops: DropLog::default(), mining: MiningClock::default() }
    }

    /// Writes one of the node's events (and logs it). A dropped message is counted, and only
    /// written when it is logged: forgeries can come by the thousand, so each reason goes out at
    /// most once a second, with the running count.
    pub(crate) fn emit(&mut self, event: Event) {
        if let Event::MessageDropped { reason, detail } = event {
            if let Some(total) = self.drops.count(&reason, || detail.clone()) {
                self.events.emit(Event::MessageDropped { reason, detail: format!("{detail} ({total} so far)") });
            }
            return;
        }
        log_event(&event);
        self.events.emit(event);
    }

    /// Milliseconds spent mining so far, the job under way included.
    pub(crate) fn mining_ms(&self) -> u64 {
        self.mining.total_ms()
    }

    /// Records that the miner now works on `tx` (or nothing), with `hashes` done so far; the job
    /// that ended gets its [`Event::MiningStopped`].
    pub(crate) fn mining(&mut self, tx: Option<u64>, hashes: u64) {
        if let Some(e) = self.mining.switch(tx, hashes) {
            self.events.emit(e);
        }
    }
}

/// Time spent mining, for the hash-rate totals of [`Event::MiningStopped`].
#[derive(Default)]
struct MiningClock {
    current: Option<(u64, Instant)>,
    total: Duration,
}

impl MiningClock {
    /// Records that mining now works on `tx` (or nothing); returns the event for the job that ended.
    fn switch(&mut self, tx: Option<u64>, total_hashes: u64) -> Option<Event> {
        let ended = self.current.take().map(|(done, since)| {
            self.total += since.elapsed();
            Event::MiningStopped { tx: done, total_hashes, total_mining_ms: self.total.as_millis() as u64 }
        });
        self.current = tx.map(|t| (t, Instant::now()));
        ended
    }

    /// Time spent mining, the job under way included.
    fn total_ms(&self) -> u64 {
        let current = self.current.map_or(Duration::ZERO, |(_, since)| since.elapsed());
        (self.total + current).as_millis() as u64
    }
}

/// Counts dropped payloads per reason and logs each reason at most once a second, so a flood of
/// garbage does not become a flood of log lines.
#[derive(Default)]
struct DropLog {
    counts: BTreeMap<String, (u64, u64, Option<Instant>)>,
}

impl DropLog {
    /// Counts one drop; returns the running total when this one is logged.
    fn count(&mut self, reason: &str, detail: impl FnOnce() -> String) -> Option<u64> {
        let entry = self.counts.entry(reason.to_string()).or_insert((0, 0, None));
        entry.0 += 1;
        entry.1 += 1;
        if entry.2.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            warn!(reason, total = entry.0, since_last_log = entry.1, "dropped message: {}", detail());
            entry.1 = 0;
            entry.2 = Some(Instant::now());
            return Some(entry.0);
        }
        None
    }
}

/// Logs an event: the room's milestones at info, the rest at debug.
fn log_event(event: &Event) {
    match event {
        Event::SolutionRejected { .. }
        | Event::ChainTruncated { .. }
        | Event::BlockAccepted { .. }
        | Event::ControllerElected { .. }
        | Event::ChallengeIssued { .. } => info!("{}", crate::events::describe(event)),
        _ => debug!("{}", crate::events::describe(event)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_one_reason_is_logged_once_with_its_count() {
        let mut drops = DropLog::default();
        assert_eq!(drops.count("malformed", String::new), Some(1));
        for _ in 0..1000 {
            assert_eq!(drops.count("malformed", || unreachable!("not logged within the second")), None);
        }
        // Another reason has a clock of its own.
        assert_eq!(drops.count("bad_version", String::new), Some(1));
    }
}

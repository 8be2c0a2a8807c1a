//! The lab wire format's driver: the peer's driver loop ([`crate::driver`]) feeding a [`LabNode`]
//! and publishing its JSON messages. No status topic, Last Will or goodbye: the lab's clients
//! know none of them.

use std::time::Duration;

use rumqttc::AsyncClient;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::miner::{LabFound, LabMiner};
use super::wire::{self, Id, LabMsg};
use super::{LabAction, LabConfig, LabInput, LabNode};
use crate::config::PeerConfig;
use crate::driver::{self, Dropped, Reporter, Wire};
use crate::events::{Event, EventSink};
use crate::protocol::{DropReason, PeerId, Topics};
use crate::transport::{FirstConnect, Link, PeerError, mqtt_client_id, mqtt_options};

/// Runs a lab-speaking peer until `shutdown` is cancelled or a fatal error. Its ClientID is its
/// peer id, a JSON integer.
pub async fn run(
    cfg: PeerConfig,
    id: PeerId,
    mut events: EventSink,
    shutdown: CancellationToken,
) -> Result<(), PeerError> {
    let threads = cfg.mining_threads();
    events.emit(Event::Started { pid: std::process::id(), client_id: id, room_size: cfg.room_size, threads });
    info!(id, room_size = cfg.room_size, threads, wire = "lab", "peer starting");
    // The same connection settings as the room protocol's connection, without a will.
    let incarnation: u64 = rand::random();
    let link = Link::open(mqtt_options(&cfg, &mqtt_client_id(id, incarnation), None, id), 1024, FirstConnect::of(&cfg));
    let (found_tx, found) = mpsc::unbounded_channel::<LabFound>();
    let (wake_tx, wake) = mpsc::unbounded_channel::<()>();
    let lab = LabDriver {
        topics: Topics::new(&cfg.prefix),
        node: LabNode::new(LabConfig {
            me: Id::Int(i64::from(id)),
            room_size: cfg.room_size,
            difficulty: cfg.lab_difficulty(),
            seed: None,
        }),
        client: link.client().clone(),
        miner: LabMiner::new(threads, &id.to_string(), move |f| {
            let _ = found_tx.send(f);
        }),
        found,
        later: JoinSet::new(),
        wake_tx,
        wake,
    };
    driver::run(lab, link, Reporter::new(events), shutdown).await
}

/// The lab wire format's driver: a [`LabNode`], its miner and the wakes it asked for.
pub(crate) struct LabDriver {
    topics: Topics,
    node: LabNode,
    client: AsyncClient,
    miner: LabMiner,
    found: mpsc::UnboundedReceiver<LabFound>,
    /// The wakes the node asked for (see [`LabAction::WakeAfter`]), dropped at shutdown.
    later: JoinSet<()>,
    wake_tx: mpsc::UnboundedSender<()>,
    wake: mpsc::UnboundedReceiver<()>,
}

impl LabDriver {
    /// Carries out one of the node's actions.
    async fn apply(&mut self, action: LabAction, report: &mut Reporter) {
        match action {
            LabAction::Publish(msg) => publish(&self.client, &self.topics, &msg).await,
            LabAction::WakeAfter(ms) => {
                let wake = self.wake_tx.clone();
                self.later.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let _ = wake.send(());
                });
            }
            LabAction::Mine(job) => {
                self.miner.start(job);
                report.mining(Some(job.tx), self.miner.hashes());
            }
            LabAction::StopMining => {
                self.miner.stop();
                report.mining(None, self.miner.hashes());
            }
            LabAction::Emit(event) => report.emit(event),
        }
    }
}

impl Wire for LabDriver {
    type Input = LabInput;

    fn subscriptions(&self) -> Vec<String> {
        self.topics.all().into_iter().map(str::to_string).collect()
    }

    async fn own_input(&mut self, _report: &mut Reporter) -> Option<LabInput> {
        tokio::select! {
            Some(found) = self.found.recv() => Some(LabInput::Mined(found)),
            Some(()) = self.wake.recv() => Some(LabInput::Wake),
        }
    }

    fn on_connected(&mut self) -> LabInput {
        LabInput::Connected
    }

    fn on_packet(&mut self, topic: &str, payload: &[u8]) -> Result<LabInput, Dropped> {
        let Some(channel) = self.topics.channel(topic) else {
            return Err(Dropped { reason: DropReason::UnexpectedTopic, detail: format!("message on {topic}") });
        };
        wire::decode(payload, channel)
            .map(LabInput::Message)
            .map_err(|e| Dropped { reason: e.drop_reason(), detail: format!("on {topic}: {e}") })
    }

    async fn on_input(&mut self, input: LabInput, report: &mut Reporter) -> Result<(), PeerError> {
        for action in self.node.handle(input) {
            self.apply(action, report).await;
        }
        Ok(())
    }

    async fn shutdown(&mut self, mut link: Link, _clean: bool, _report: &mut Reporter) {
        self.later.abort_all();
        self.miner.stop();
        link.close().await;
        info!(transactions = self.node.table().len(), "peer stopped");
    }
}

async fn publish(client: &AsyncClient, topics: &Topics, msg: &LabMsg) {
    crate::transport::publish(client, topics.topic(msg.channel()).to_string(), false, wire::encode(msg)).await;
}

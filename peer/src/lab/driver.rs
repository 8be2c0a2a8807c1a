//! The MQTT glue of the lab wire format: the same connection handling as [`crate::transport`]
//! (its network task, drop counting and mining clock), feeding a [`LabNode`] and publishing its
//! JSON messages. No status topic, Last Will or goodbye: the lab's clients know none of them.

use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::miner::{LabFound, LabMiner};
use super::wire::{self, Id, LabMsg};
use super::{LabAction, LabConfig, LabInput, LabNode};
use crate::config::PeerConfig;
use crate::events::{Event, EventSink};
use crate::protocol::{PeerId, Topics};
use crate::transport::{
    DropLog, FirstConnect, MiningClock, Net, PeerError, connect, log_event, mqtt_client_id, mqtt_options, poll_network,
};

/// Runs a lab-speaking peer until `shutdown` is cancelled or a fatal error. Its ClientID is its
/// peer id, a JSON integer.
pub async fn run(
    cfg: PeerConfig,
    id: PeerId,
    mut events: EventSink,
    shutdown: CancellationToken,
) -> Result<(), PeerError> {
    let topics = Topics::new(&cfg.prefix);
    let threads = cfg.mining_threads();
    events.emit(Event::Started { pid: std::process::id(), client_id: id, room_size: cfg.room_size, threads });
    info!(id, room_size = cfg.room_size, threads, wire = "lab", "peer starting");
    let mut node = LabNode::new(LabConfig {
        me: Id::Int(i64::from(id)),
        room_size: cfg.room_size,
        difficulty: cfg.lab_difficulty(),
        seed: None,
    });

    // The same connection settings as the postcard wire's protocol connection, without a will.
    let incarnation: u64 = rand::random();
    let (client, eventloop) = connect(mqtt_options(&cfg, mqtt_client_id(id, incarnation), None), 1024);

    let (net_tx, mut net_rx) = mpsc::channel(4096);
    let stop_net = CancellationToken::new();
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let first =
        FirstConnect { addr: addr.clone(), timeout_s: cfg.connect_timeout_s, credentials: cfg.username.is_some() };
    let net = tokio::spawn(poll_network(eventloop, net_tx, stop_net.clone(), first));

    let (found_tx, mut found_rx) = mpsc::unbounded_channel::<LabFound>();
    let miner = LabMiner::new(threads, &id.to_string(), move |f| {
        let _ = found_tx.send(f);
    });
    let mut drops = DropLog::default();
    let mut mining = MiningClock::default();
    let mut connected_once = false;
    // The wakes the node asked for (see `LabAction::WakeAfter`), dropped at shutdown.
    let mut later = tokio::task::JoinSet::new();
    let (wake_tx, mut wake_rx) = mpsc::unbounded_channel::<()>();

    let result = loop {
        let input = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            Some(found) = found_rx.recv() => LabInput::Mined(found),
            Some(()) = wake_rx.recv() => LabInput::Wake,
            net = net_rx.recv() => match net {
                None => break Ok(()),
                Some(Net::Fatal(e)) => break Err(e),
                Some(Net::Lost(reason)) => {
                    events.emit(Event::Disconnected { reason });
                    continue;
                }
                Some(Net::Connected) => {
                    let subs = topics.all().map(|t| rumqttc::SubscribeFilter::new(t.to_string(), QoS::AtLeastOnce));
                    if let Err(e) = client.subscribe_many(subs).await {
                        warn!(error = %e, "subscribe failed");
                        continue;
                    }
                    if !connected_once {
                        info!(broker = %addr, "connected");
                    }
                    connected_once = true;
                    events.emit(Event::Connected { broker: addr.clone() });
                    LabInput::Connected
                }
                Some(Net::Publish { topic, payload }) => {
                    let Some(channel) = topics.channel(&topic) else {
                        drops.count("unexpected_topic", || format!("message on {topic}"));
                        continue;
                    };
                    match wire::decode(&payload, channel) {
                        Ok(msg) => LabInput::Message(msg),
                        Err(e) => {
                            drops.count(e.reason(), || format!("on {topic}: {e}"));
                            continue;
                        }
                    }
                }
            },
        };
        for action in node.handle(input) {
            match action {
                LabAction::Publish(msg) => publish(&client, &topics, &msg).await,
                LabAction::WakeAfter(ms) => {
                    let wake = wake_tx.clone();
                    later.spawn(async move {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        let _ = wake.send(());
                    });
                }
                LabAction::Mine(job) => {
                    miner.start(job);
                    if let Some(e) = mining.switch(Some(job.tx), miner.hashes()) {
                        events.emit(e);
                    }
                }
                LabAction::StopMining => {
                    miner.stop();
                    if let Some(e) = mining.switch(None, miner.hashes()) {
                        events.emit(e);
                    }
                }
                LabAction::Emit(Event::MessageDropped { reason, detail }) => {
                    if let Some(total) = drops.count(&reason, || detail.clone()) {
                        events.emit(Event::MessageDropped { reason, detail: format!("{detail} ({total} so far)") });
                    }
                }
                LabAction::Emit(event) => {
                    log_event(&event);
                    events.emit(event);
                }
            }
        }
    };

    later.abort_all();
    miner.stop();
    if connected_once {
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), net).await;
    }
    stop_net.cancel();
    events.emit(Event::Stopped);
    info!(transactions = node.table().len(), "peer stopped");
    result
}

async fn publish(client: &AsyncClient, topics: &Topics, msg: &LabMsg) {
    let topic = topics.topic(msg.channel()).to_string();
    if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, wire::encode(msg)).await {
        warn!(error = %e, "publish failed");
    }
}

//! [`BrokerError`]: everything that can stop the broker from starting or keep it from running.
//!
//! Every message is one line and names what to change, because the CLI prints it as-is
//! (`broker: error: {err:#}`) and the launcher relays it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Why the broker could not be configured, started, or kept running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The config file could not be read from disk.
    #[error("cannot read config {}", path.display())]
    ReadConfig {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// The config is not valid TOML or does not have rumqttd's `Config` shape.
    #[error("cannot read config {origin}: {reason}")]
    ParseConfig {
        /// The file path, or `embedded config/broker.toml`.
        origin: String,
        /// The parser's message, flattened to one line, with line and column.
        reason: String,
    },

    /// The config has a key rumqttd does not know (rumqttd would silently ignore it).
    #[error("cannot read config {origin}: unknown key `{key}`")]
    UnknownKey {
        /// The file path, or `embedded config/broker.toml`.
        origin: String,
        /// The dotted path of the key, e.g. `v4.1.connections.auht`.
        key: String,
    },

    /// The config parses but asks for something the broker cannot or will not run.
    #[error("invalid config {origin}: {reason}")]
    InvalidConfig {
        /// The file path, or `embedded config/broker.toml`.
        origin: String,
        /// What is wrong and what to do instead.
        reason: String,
    },

    /// Port 0 was requested; rumqttd would pick a port and never say which.
    #[error("port 0 is not supported: rumqttd never reports the port it picks (choose a free port with --port)")]
    PortZero,

    /// Something else is already listening on the address.
    #[error(
        "port {} on {} is already in use (another broker running? pick another with --port)",
        addr.port(),
        addr.ip()
    )]
    PortInUse {
        /// The address the broker was asked to listen on.
        addr: SocketAddr,
    },

    /// The bind address does not belong to this machine.
    #[error("address {ip} is not available on this machine (pick another with --bind)")]
    AddrNotAvailable {
        /// The address that was asked for.
        ip: IpAddr,
    },

    /// The OS refused to let this process listen on the port (e.g. below 1024 without privileges).
    #[error("permission denied to listen on {addr} (pick a port above 1023 with --port)")]
    PermissionDenied {
        /// The address the broker was asked to listen on.
        addr: SocketAddr,
    },

    /// Any other failure to listen on the address.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address the broker was asked to listen on.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// The `max_payload` override is outside what MQTT can carry.
    #[error("invalid max payload {0} bytes: must be between 1 and 268435455 (MQTT's limit)")]
    InvalidMaxPayload(usize),

    /// An auth map was given but it is empty, so no client could ever log in.
    #[error("the auth map is empty: no client could connect (leave auth unset to allow anyone)")]
    EmptyAuth,

    /// The thread that runs rumqttd could not be spawned.
    #[error("cannot spawn the broker thread")]
    Spawn(#[source] io::Error),

    /// rumqttd started but never accepted a connection within the deadline.
    #[error("broker did not accept connections on {addr} within {waited:?}")]
    NotListening {
        /// The address that was probed.
        addr: SocketAddr,
        /// How long the probe waited.
        waited: Duration,
    },

    /// rumqttd's thread ended; it is meant to run until the process exits.
    #[error("rumqttd stopped unexpectedly: {reason}")]
    Stopped {
        /// The error rumqttd returned, its panic message, or what is known.
        reason: String,
    },
}

//! The hashvote MQTT broker: rumqttd embedded, configured from `config/broker.toml`, and checked
//! to really listen.
//!
//! - [`config`]: [`BrokerConfig`] and how it becomes a validated [`rumqttd::Config`].
//! - [`server`]: [`Broker`] / [`start`], which refuse a busy port and wait until rumqttd accepts.
//! - [`cli`]: the `broker` command (also run as `launcher broker ...`).
//! - [`port`]: free ports for the brokers the launcher and the tests start.
//!
//! ```no_run
//! let running = broker::start(&broker::BrokerConfig::default())?;
//! println!("{}", running.ready_line());
//! # Ok::<(), broker::BrokerError>(())
//! ```

pub mod cli;
pub mod config;
mod error;
pub mod port;
pub mod server;

pub use config::BrokerConfig;
pub use error::BrokerError;
pub use server::{Broker, READY_PREFIX, RunningBroker, TCP_USER_TIMEOUT, parse_ready_line, start};

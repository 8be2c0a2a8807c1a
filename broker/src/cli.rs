//! The `broker` command: flags ([`Args`]), logging, the ready line, and exit on SIGTERM/SIGINT.
//!
//! Lives in the library so the launcher can run it as `launcher broker ARGS...`. Protocol for
//! whoever spawns it: exactly one line on stdout, `broker listening on ADDR`, once the broker
//! accepts connections; on failure one line on stderr, `broker: error: ...`, and a non-zero exit.
//! SIGTERM or SIGINT exits 0: process exit is the only way to stop rumqttd.
//!
//! Logins (username → password) come from `--auth-file FILE` or the environment variable
//! [`AUTH_ENV`], never from a flag's value: the command line of every process is readable by
//! every local user.

use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;

use anyhow::{Context, bail};
use tracing_subscriber::EnvFilter;

use crate::config::{AUTH_ENV, DEFAULT_BIND, DEFAULT_PORT};
use crate::{BrokerConfig, BrokerError};

/// The log filter used when neither `--log` nor `RUST_LOG` is given.
///
/// rumqttd logs ordinary events at ERROR under `rumqttd::server::broker`: `router-drop` on every
/// clean DISCONNECT, `disconnected` when a client process dies, a failed CONNECT for the
/// startup probe and for each rejected login. That target is silenced; the failures it would
/// report that matter (a busy port) are detected and reported by the broker itself. The rest
/// of rumqttd stays at ERROR, except its commit log's WARN that a slow subscriber skipped
/// messages ("jumping to head"), which means messages were lost.
pub const DEFAULT_LOG_FILTER: &str = "warn,rumqttd=error,rumqttd::server::broker=off,rumqttd::segments=warn";

/// Command-line flags of the broker.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "broker",
    version,
    about = "Runs the hashvote MQTT broker (rumqttd, MQTT 3.1.1) until killed",
    long_about = "Runs the hashvote MQTT broker (rumqttd, MQTT 3.1.1) until killed.\n\n\
                  Prints `broker listening on ADDR` on stdout once it accepts connections. \
                  SIGTERM or SIGINT exits 0."
)]
pub struct Args {
    /// rumqttd config (TOML, rumqttd's Config format) replacing the embedded config/broker.toml;
    /// --bind and --port still replace its listen address.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on (0.0.0.0 for all interfaces).
    #[arg(long, value_name = "ADDR", default_value_t = DEFAULT_BIND)]
    pub bind: IpAddr,

    /// Port to listen on.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// Largest accepted MQTT packet in bytes (default from the config: 65536). Clients must
    /// accept packets this large too.
    #[arg(long, value_name = "BYTES")]
    pub max_payload: Option<usize>,

    /// Require a login: users and passwords, as TOML (`[users]` then `name = "password"`) or one
    /// `user:password` per line. Keep it private (mode 0600). Replaces the config's `auth`.
    /// Alternatively set HASHVOTE_BROKER_AUTH="user:password[,user2:password2]" (not both).
    #[arg(long, value_name = "FILE")]
    pub auth_file: Option<PathBuf>,

    /// tracing filter, e.g. `info` or `warn,rumqttd=info` [default: RUST_LOG, else a filter
    /// that keeps rumqttd's disconnect noise out].
    #[arg(long, value_name = "LEVEL_FILTER")]
    pub log: Option<String>,
}

impl Args {
    /// The library config these flags describe.
    pub fn broker_config(&self) -> BrokerConfig {
        BrokerConfig {
            config_file: self.config.clone(),
            bind: self.bind,
            port: self.port,
            max_payload: self.max_payload,
            ..BrokerConfig::default()
        }
    }
}

impl Args {
    /// The logins these flags and the environment ask for: from `--auth-file`, else from
    /// [`AUTH_ENV`] (set but empty is an error: it would otherwise leave the broker open), else
    /// `None` (the config file's `auth`, if any, applies).
    pub fn auth(&self) -> Result<Option<HashMap<String, String>>, BrokerError> {
        let env = std::env::var_os(AUTH_ENV).map(|value| value.to_string_lossy().into_owned());
        match (&self.auth_file, env) {
            (Some(_), Some(_)) => Err(BrokerError::InvalidConfig {
                origin: AUTH_ENV.to_owned(),
                reason: "give the logins either with --auth-file or in the environment, not both".to_owned(),
            }),
            (Some(path), None) => {
                warn_if_others_can_read(path);
                crate::config::read_auth_file(path).map(Some)
            }
            (None, Some(list)) => crate::config::parse_auth_list(&list, AUTH_ENV).map(Some),
            (None, None) => Ok(None),
        }
    }
}

/// Logs a warning if the auth file is readable by its group or by others.
fn warn_if_others_can_read(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(file = %path.display(), mode = format!("{:o}", mode & 0o777), "the auth file is readable by other users; chmod 600 it");
        }
    }
}

/// Runs the broker command: returns only on failure (non-zero) or on SIGTERM/SIGINT (zero).
///
/// Installs a global tracing subscriber writing to stderr unless one is already installed.
pub fn main(args: Args) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, whatever the causes' messages contain: the launcher relays it verbatim.
            let message = format!("{error:#}");
            let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("broker: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Why the command stops.
enum Stop {
    /// A termination signal arrived (its name).
    Signal(&'static str),
    /// rumqttd stopped by itself.
    Broker(BrokerError),
}

fn run(args: &Args) -> anyhow::Result<()> {
    init_tracing(args.log.as_deref())?;

    let (stop_tx, stop_rx) = mpsc::channel();
    // Before the ready line: whoever reads it may signal at once, and without a handler
    // SIGTERM would kill the process instead of exiting 0.
    watch_signals(stop_tx.clone()).context("cannot install signal handlers")?;

    let mut config = args.broker_config();
    // Each client is a file descriptor: a room of 1,000 peers holds 2,000 connections, beyond the
    // usual soft limit of 1,024. The hard limit is ours to take.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(open_files = limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit; connections beyond it are refused"),
    }
    if let Some(auth) = args.auth()? {
        tracing::info!(users = auth.len(), "clients must log in");
        config.auth = Some(auth);
    }
    let running = crate::start(&config)?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{}", running.ready_line())
        .and_then(|()| stdout.flush())
        .context("cannot write the ready line to stdout")?;
    drop(stdout);

    thread::Builder::new()
        .name("broker-watch".to_owned())
        .spawn(move || {
            let _ = stop_tx.send(Stop::Broker(running.wait()));
        })
        .context("cannot spawn the broker watch thread")?;

    match stop_rx.recv() {
        Ok(Stop::Signal(signal)) => {
            tracing::info!(signal, "exiting on signal");
            Ok(())
        }
        Ok(Stop::Broker(error)) => Err(error.into()),
        Err(mpsc::RecvError) => bail!("lost track of the broker and of signals"),
    }
}

/// Installs the stderr subscriber with `--log`, else `RUST_LOG`, else [`DEFAULT_LOG_FILTER`].
fn init_tracing(flag: Option<&str>) -> anyhow::Result<()> {
    let env = std::env::var("RUST_LOG").ok().filter(|value| !value.trim().is_empty());
    let (source, filter) = match (flag, env.as_deref()) {
        (Some(flag), _) => ("--log", flag),
        (None, Some(env)) => ("RUST_LOG", env),
        (None, None) => ("default", DEFAULT_LOG_FILTER),
    };
    // Its parse error repeats its own message as its source; keep the message only.
    let filter = EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("invalid {source} filter `{filter}`: {e}"))?;
    // Fails only if a subscriber is already installed (an embedding process chose its own
    // logging); keep that one.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .try_init();
    Ok(())
}

/// Registers SIGTERM and SIGINT handlers and sends [`Stop::Signal`] when one arrives.
///
/// The wait runs on its own thread with its own small runtime, so this works whether or not the
/// caller is inside an async runtime. Returns once the handlers are installed.
fn watch_signals(stop: mpsc::Sender<Stop>) -> io::Result<()> {
    let (installed_tx, installed_rx) = mpsc::sync_channel::<io::Result<()>>(1);
    thread::Builder::new().name("broker-signals".to_owned()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = installed_tx.send(Err(e));
                return;
            }
        };
        runtime.block_on(async move {
            match wait_for_signal(&installed_tx).await {
                Ok(name) => {
                    let _ = stop.send(Stop::Signal(name));
                }
                Err(e) => {
                    let _ = installed_tx.send(Err(e));
                }
            }
        });
    })?;
    installed_rx.recv().unwrap_or_else(|_| Err(io::Error::other("the signal thread ended before installing handlers")))
}

#[cfg(unix)]
async fn wait_for_signal(installed: &mpsc::SyncSender<io::Result<()>>) -> io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let _ = installed.send(Ok(()));
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        _ = interrupt.recv() => Ok("SIGINT"),
    }
}

#[cfg(not(unix))]
async fn wait_for_signal(installed: &mpsc::SyncSender<io::Result<()>>) -> io::Result<&'static str> {
    let ctrl_c = tokio::signal::ctrl_c();
    let _ = installed.send(Ok(()));
    ctrl_c.await.map(|()| "Ctrl-C")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn defaults_match_the_library() {
        let args = Args::try_parse_from(["broker"]).expect("parse");
        let config = args.broker_config();
        assert_eq!(config.listen_addr(), "127.0.0.1:1883".parse().expect("addr"));
        assert_eq!(config.max_payload, None);
        assert_eq!(config.config_file, None);
    }

    #[test]
    fn flags_reach_the_config() {
        let args = Args::try_parse_from([
            "broker",
            "--bind",
            "0.0.0.0",
            "--port",
            "2000",
            "--max-payload",
            "1234",
            "--config",
            "x.toml",
            "--log",
            "debug",
        ])
        .expect("parse");
        let config = args.broker_config();
        assert_eq!(config.listen_addr(), "0.0.0.0:2000".parse().expect("addr"));
        assert_eq!(config.max_payload, Some(1234));
        assert_eq!(config.config_file, Some(PathBuf::from("x.toml")));
        assert_eq!(args.log.as_deref(), Some("debug"));
    }

    #[test]
    fn auth_file_flag_is_read() {
        let dir = std::env::temp_dir().join(format!("broker-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("auth");
        std::fs::write(&path, "alice:pw\n").expect("write");
        let args = Args::try_parse_from(["broker", "--auth-file"]).err();
        assert!(args.is_some(), "--auth-file needs a value");
        let args = Args::try_parse_from(["broker".as_ref(), "--auth-file".as_ref(), path.as_os_str()]).expect("parse");
        // The environment variable is not set in unit tests (the system tests cover it).
        if std::env::var_os(AUTH_ENV).is_none() {
            let auth = args.auth().expect("auth");
            assert_eq!(auth, Some(HashMap::from([("alice".to_owned(), "pw".to_owned())])));
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn default_filter_hides_disconnect_noise_but_not_lost_messages() {
        let filter = EnvFilter::try_new(DEFAULT_LOG_FILTER).expect("valid filter");
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || {
            // `router-drop` and friends: ERROR under this target.
            assert!(!tracing::event_enabled!(target: "rumqttd::server::broker", Level::ERROR));
            assert!(tracing::event_enabled!(target: "rumqttd::router::routing", Level::ERROR));
            assert!(!tracing::event_enabled!(target: "rumqttd::router::routing", Level::WARN));
            assert!(tracing::event_enabled!(target: "rumqttd::segments", Level::WARN));
            assert!(tracing::event_enabled!(target: "broker::server", Level::WARN));
            assert!(!tracing::event_enabled!(target: "broker::server", Level::INFO));
        });
    }
}

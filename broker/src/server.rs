//! Starting rumqttd and proving it listens: [`Broker`], [`RunningBroker`], [`start`].
//!
//! rumqttd logs a failed bind and carries on without a listener, never reports the port it got,
//! and has no shutdown API. So the port is checked before starting, rumqttd runs on a thread of
//! its own, and startup only succeeds once a TCP connection to the address is accepted. The
//! broker then runs until the process exits.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::{BrokerConfig, BrokerError};

/// The start of the line the CLI prints on stdout once the broker accepts connections; the rest
/// of the line is the address (`broker listening on 127.0.0.1:1883`).
pub const READY_PREFIX: &str = "broker listening on ";

/// Pause between connection attempts while waiting for rumqttd to listen.
const PROBE_RETRY: Duration = Duration::from_millis(10);

/// Longest single connection attempt; loopback answers at once, so this only matters for
/// unreachable bind addresses.
const PROBE_ATTEMPT: Duration = Duration::from_millis(250);

/// Extracts the address from the broker's ready line, if `line` is one.
pub fn parse_ready_line(line: &str) -> Option<SocketAddr> {
    line.trim_end().strip_prefix(READY_PREFIX)?.parse().ok()
}

/// A validated broker, ready to start: the rumqttd config with all overrides applied.
pub struct Broker {
    config: rumqttd::Config,
    addr: SocketAddr,
    ready_timeout: Duration,
}

// By hand: rumqttd's own Debug prints the auth map's passwords.
impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("addr", &self.addr)
            .field("ready_timeout", &self.ready_timeout)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Builds and validates the rumqttd config described by `config`; starts nothing.
    pub fn new(config: &BrokerConfig) -> Result<Self, BrokerError> {
        Ok(Self { config: config.rumqttd_config()?, addr: config.listen_addr(), ready_timeout: config.ready_timeout })
    }

    /// The address the broker will listen on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The rumqttd config that [`Broker::start`] will run.
    pub fn rumqttd_config(&self) -> &rumqttd::Config {
        &self.config
    }

    /// Checks the port is free, starts rumqttd on its own thread, and returns once it accepts a
    /// connection (or fails after the ready timeout).
    pub fn start(self) -> Result<RunningBroker, BrokerError> {
        let addr = self.addr;
        ensure_can_listen(addr)?;

        let config = self.config;
        let thread = thread::Builder::new()
            .name("rumqttd".to_owned())
            .spawn(move || {
                // `Broker::new` spawns the router thread, `start` one thread per listener and
                // then blocks joining them: it returns only if every listener ended.
                let mut broker = rumqttd::Broker::new(config);
                broker.start().map_err(|e| e.to_string())
            })
            .map_err(BrokerError::Spawn)?;
        let running = RunningBroker { addr, thread };

        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if !running.is_running() {
                return Err(running.wait());
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(BrokerError::NotListening { addr, waited: self.ready_timeout });
            }
            // The probe connects and closes at once; rumqttd logs that as a failed CONNECT under
            // the `rumqttd::server::broker` target, which the CLI's default filter silences.
            if TcpStream::connect_timeout(&probe_addr(addr), remaining.min(PROBE_ATTEMPT)).is_ok() {
                break;
            }
            thread::sleep(PROBE_RETRY.min(remaining));
        }
        // Had someone else grabbed the port between the check and rumqttd's bind, rumqttd's
        // listener would have failed and ended the thread by now, or very nearly.
        if !running.is_running() {
            return Err(running.wait());
        }
        // Before the ready line, so before any client but the probe connects.
        match tune_accepted_sockets(addr.port()) {
            Ok(0) => tracing::warn!(%addr, "no listening socket found to set TCP_NODELAY and TCP_USER_TIMEOUT on"),
            Ok(_) => {}
            Err(e) => tracing::warn!(%addr, error = %e, "cannot set TCP_NODELAY and TCP_USER_TIMEOUT"),
        }
        tracing::info!(%addr, "broker accepting connections");
        Ok(running)
    }
}

/// Starts a broker as described by `config`; shorthand for [`Broker::new`] then [`Broker::start`].
pub fn start(config: &BrokerConfig) -> Result<RunningBroker, BrokerError> {
    Broker::new(config)?.start()
}

/// A broker that accepted a connection on its address. Dropping this handle does not stop it:
/// rumqttd has no shutdown API, so it runs until the process exits.
#[derive(Debug)]
pub struct RunningBroker {
    addr: SocketAddr,
    thread: JoinHandle<Result<(), String>>,
}

impl RunningBroker {
    /// The address the broker listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The line announcing readiness: [`READY_PREFIX`] followed by the address.
    pub fn ready_line(&self) -> String {
        format!("{READY_PREFIX}{}", self.addr)
    }

    /// Whether rumqttd's thread is still running (it is meant to run until the process exits).
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Blocks until rumqttd stops, which only happens on failure, and says why it stopped.
    pub fn wait(self) -> BrokerError {
        let reason = match self.thread.join() {
            Ok(Err(error)) => error,
            // rumqttd ignores its listener threads' fate; a listener ends when it cannot bind.
            Ok(Ok(())) => {
                format!("its listener on {} ended (was the port taken? rerun with --log rumqttd=info)", self.addr)
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                format!("it panicked: {message}")
            }
        };
        BrokerError::Stopped { reason }
    }
}

/// Binds the address once, so a busy port is reported instead of swallowed by rumqttd.
fn ensure_can_listen(addr: SocketAddr) -> Result<(), BrokerError> {
    match TcpListener::bind(addr) {
        // Dropped at once, so rumqttd can bind it. std and tokio both set SO_REUSEADDR on Unix,
        // so this check and rumqttd's bind agree about what counts as busy.
        Ok(_listener) => Ok(()),
        Err(e) => Err(match e.kind() {
            io::ErrorKind::AddrInUse => BrokerError::PortInUse { addr },
            io::ErrorKind::AddrNotAvailable => BrokerError::AddrNotAvailable { ip: addr.ip() },
            io::ErrorKind::PermissionDenied => BrokerError::PermissionDenied { addr },
            _ => BrokerError::Bind { addr, source: e },
        }),
    }
}

/// How long data the broker sent may go unacknowledged at the TCP level before the kernel closes
/// the connection (`TCP_USER_TIMEOUT`; see [`tune_accepted_sockets`]).
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Turns Nagle's algorithm off and sets [`TCP_USER_TIMEOUT`] for every connection rumqttd
/// accepts on `port`, and returns how many listening sockets it changed.
///
/// The user timeout stands in for the keepalive rumqttd does not enforce: it restarts a
/// connection's keepalive countdown whenever it *sends* to it, so a client whose network was
/// cut (no FIN, no RST) is never timed out while the room keeps sending to it, and its will
/// never comes. The peers subscribe at QoS 0, so no window of unacknowledged messages fills
/// either (at QoS 1 it did, after ~34 s in a room of six). With the user timeout, the kernel
/// closes such a connection once what the broker sent has gone unacknowledged for 10 s, and
/// rumqttd publishes the will. A live client's kernel acknowledges what it receives however
/// busy the client is, and one whose receive buffer is full still answers the window probes,
/// which Linux does not time out.
///
/// rumqttd sets no `TCP_NODELAY` on the sockets it accepts, and offers no hook to. With Nagle on,
/// a small message to a subscriber waits while the previous one is unacknowledged, and the
/// subscriber's kernel delays that acknowledgement by up to 40 ms: a controller's result and next
/// challenge, or a will followed by ballots, arrived 40 ms apart (measured: commit overhead p50
/// 29 ms and failover p50 ~50 ms with Nagle on, 3 ms and 15 ms with it off). Linux copies a
/// listening socket's `TCP_NODELAY` and `TCP_USER_TIMEOUT` into each connection it accepts, so
/// both are set on rumqttd's listener, found among this process's descriptors by its local port.
#[cfg(target_os = "linux")]
fn tune_accepted_sockets(port: u16) -> std::io::Result<usize> {
    use std::os::fd::BorrowedFd;
    let mut changed = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // SAFETY: the descriptor is open (listed just now) and only borrowed for the calls below;
        // nothing in this process closes rumqttd's listener, and a descriptor that closed meanwhile
        // only makes the calls fail (EBADF), which skips it.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let ours = socket.is_listener().unwrap_or(false)
            && socket.local_addr().ok().and_then(|a| a.as_socket()).is_some_and(|a| a.port() == port);
        if ours {
            socket.set_tcp_nodelay(true)?;
            socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))?;
            changed += 1;
        }
    }
    Ok(changed)
}

#[cfg(not(target_os = "linux"))]
fn tune_accepted_sockets(_port: u16) -> std::io::Result<usize> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "only done on Linux"))
}

/// Where to connect to reach a listener on `addr`: a wildcard address is reached via loopback.
fn probe_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips() {
        for addr in ["127.0.0.1:1883", "[::1]:4000", "0.0.0.0:9"] {
            let addr: SocketAddr = addr.parse().expect("addr");
            let line = format!("{READY_PREFIX}{addr}\n");
            assert_eq!(parse_ready_line(&line), Some(addr));
        }
        assert_eq!(parse_ready_line("broker: error: nope"), None);
        assert_eq!(parse_ready_line("broker listening on nowhere"), None);
    }

    #[test]
    fn wildcard_is_probed_on_loopback() {
        let any: SocketAddr = "0.0.0.0:7".parse().expect("addr");
        assert_eq!(probe_addr(any), "127.0.0.1:7".parse().expect("addr"));
        let any6: SocketAddr = "[::]:7".parse().expect("addr");
        assert_eq!(probe_addr(any6), "[::1]:7".parse().expect("addr"));
        let specific: SocketAddr = "10.1.2.3:7".parse().expect("addr");
        assert_eq!(probe_addr(specific), specific);
    }

    #[test]
    fn busy_port_is_reported_before_starting() {
        let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = busy.local_addr().expect("addr");
        let config = BrokerConfig { port: addr.port(), ..BrokerConfig::default() };
        let error = start(&config).expect_err("port is busy");
        assert!(matches!(error, BrokerError::PortInUse { .. }), "{error}");
        assert_eq!(
            error.to_string(),
            format!(
                "port {} on 127.0.0.1 is already in use (another broker running? pick another with --port)",
                addr.port()
            )
        );
    }

    #[test]
    fn foreign_address_is_reported() {
        // TEST-NET-1 (RFC 5737) is never assigned to a local interface.
        let config = BrokerConfig { bind: "192.0.2.1".parse().expect("ip"), port: 1883, ..BrokerConfig::default() };
        let error = start(&config).expect_err("address is foreign");
        assert!(matches!(error, BrokerError::AddrNotAvailable { .. }), "{error}");
    }
}

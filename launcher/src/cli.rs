//! The launcher's command line. Besides running a room, the launcher can act as the broker or as
//! a peer (`launcher broker ...`, `launcher peer ...`): it starts its children by re-executing
//! itself that way, so `cargo run -p launcher` needs nothing else built or installed. It can also
//! put a room under faults (`launcher chaos`) and time controller failover
//! (`launcher failover-bench`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Starts an MQTT broker and a room of hashvote peers as separate processes, and shows the join,
/// the election, and every challenge and winner. Runs until Ctrl-C (or `--rounds` blocks).
#[derive(Debug, Parser)]
#[command(name = "launcher", version, args_conflicts_with_subcommands = true)]
pub struct Args {
    /// Act as the broker or a peer, or run a fault test, instead of launching a room.
    #[command(subcommand)]
    pub role: Option<Role>,
    /// Options of the room.
    #[command(flatten)]
    pub room: RoomArgs,
}

/// The processes the launcher binary can be.
#[derive(Debug, Subcommand)]
pub enum Role {
    /// Run the embedded MQTT broker (same flags as the `broker` binary).
    #[command(hide = true)]
    Broker(broker::cli::Args),
    /// Run one peer (same flags as the `peer` binary).
    #[command(hide = true)]
    Peer(peer::cli::Args),
    /// Put a room under random faults (kill -9, SIGSTOP, broker restarts, clean leaves) and check
    /// that it keeps its invariants and keeps mining; prints PASS or FAIL.
    Chaos(ChaosArgs),
    /// Kill the controller again and again and time each failover (kill to the next term's first
    /// challenge); prints p50, p95, max and every sample.
    FailoverBench(FailoverBenchArgs),
    /// Show the dashboard of a room started elsewhere (any broker, peers on any machines), built
    /// only from the room's MQTT traffic.
    Watch(WatchArgs),
    /// Decode a room's raw traffic: reads `TOPIC HEX` lines (`mosquitto_sub -t 'sd/#' -F '%t %x'`)
    /// and prints each message or status as a JSON line.
    Decode(DecodeArgs),
}

/// How to run a room.
#[derive(Debug, Clone, clap::Args)]
pub struct RoomArgs {
    /// Number of peers.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub peers: u16,
    /// Peers per process, for scale tests (--wire room): each peer still has its own MQTT
    /// clients, id, data directory and events; a process's peers share its mining threads
    /// (--threads). The dashboard's kill and pause keys then act on a whole process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub peers_per_process: u16,
    /// Stop after this many accepted blocks (every peer has them) and print a summary; 0 runs
    /// until Ctrl-C.
    #[arg(long, default_value_t = 0)]
    pub rounds: u64,
    /// Leading zero bits of each challenge (of the first, when retargeting).
    #[arg(long, default_value_t = 22)]
    pub difficulty: u8,
    /// Retarget the difficulty towards a block every MS milliseconds; 0 keeps it fixed (or random
    /// within --difficulty-range).
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub target_block_ms: u64,
    /// Difficulty bounds LO-HI (e.g. the lab's 10-20).
    #[arg(long, value_name = "LO-HI", value_parser = peer::cli::parse_range)]
    pub difficulty_range: Option<[u8; 2]>,
    /// Mining threads per peer (0: one per core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Proof-of-work hash: sha1 or sha256.
    #[arg(long, default_value = "sha1")]
    pub hash: peer::pow::HashAlg,
    /// Broker port. If not given, 1883, or a free port when 1883 is busy.
    #[arg(long, conflicts_with = "broker")]
    pub port: Option<u16>,
    /// Run the peers against this MQTT broker (any MQTT 3.1.1 broker) instead of starting one;
    /// or against the nodes of a broker cluster, comma-separated (`n1:1883,n2:1883,[::1]:1885`;
    /// a node without a port takes 1883). The peers get every node and spread over them.
    /// A login is taken from HASHVOTE_USERNAME and HASHVOTE_PASSWORD if set.
    #[arg(long, value_name = "HOST:PORT,...")]
    pub broker: Option<String>,
    /// Topic prefix of the room.
    #[arg(long, default_value = "sd", value_parser = parse_prefix)]
    pub prefix: String,
    /// Wire format of the peers: room (the quorum protocol, its state on disk: see --run-dir) or
    /// lab (the course lab's JSON messages).
    #[arg(long, default_value_t = peer::config::Wire::Room)]
    pub wire: peer::config::Wire,
    /// With --wire room: the run directory, one data directory per peer (`peer-0`, `peer-1`, ...).
    /// An existing one resumes its room; without it, a new one under the temporary directory,
    /// printed at start and kept at exit so the room can be resumed.
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Print plain, timestamped lines even on a terminal (the default when the output is not a
    /// terminal).
    #[arg(long)]
    pub plain: bool,
    /// At exit, write a report (HTML page and SVG plots: solve times, hash rates, elections, the
    /// chain) to DIR.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// MQTT keepalive of the peers, in seconds [default: 2, and more in a room of more than 50
    /// peers: one more per 25 beyond 50, or N² / 10,000, whichever is more].
    #[arg(long)]
    pub keepalive: Option<u64>,
    /// Write every peer's events, merged, as JSON lines to FILE.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Also show each peer's warnings and errors (their stderr).
    #[arg(long)]
    pub verbose: bool,
    /// Let anyone who reaches the broker connect. By default the broker requires a login: user
    /// `hashvote` with a random password, passed to the children in their environment and
    /// written to a file only you can read (its path is printed).
    #[arg(long, conflicts_with = "broker")]
    pub no_auth: bool,
}

impl RoomArgs {
    /// The peers' keepalive (s): `--keepalive`, or 2 s and one more per 25 peers beyond 50, or
    /// 2 s and N² / 10,000, whichever is more. A client gives its connection up when the
    /// broker's answer to a ping comes later than that, and the answer waits behind what the
    /// broker has queued for the connection. In a room of hundreds on a few cores the queue is
    /// seconds long: with 2 s, 300 peers on Mosquitto reconnected 10,000 times in three minutes
    /// and never elected. A founding room queues N hellos and N ballots for each of its N
    /// peers, N² deliveries each, so a broker that gets through 10,000 deliveries a second
    /// keeps a connection's answer waiting N² / 10,000 s: 100 s in a room of 1,000. On a 3-node
    /// RabbitMQ cluster that got through about 12,000 a second on two cores, 1,000 peers at 40 s
    /// (the linear rule) began to lose connections to unanswered pings 86 s after starting (262
    /// in the run), and each came back with a hello to all; at 102 s none was lost. A longer keepalive delays only the will of a peer that hangs or is
    /// cut off (1.5 times it); the room itself notices by the heartbeats.
    pub fn keepalive_s(&self) -> u64 {
        let n = u64::from(self.peers);
        self.keepalive.unwrap_or(2 + (n.saturating_sub(50) / 25).max(n * n / 10_000))
    }

    /// The nodes of `--broker`, if given. Parsed here rather than by clap so that a bad entry is
    /// the launcher's one-line error (exit 1), like every other mistake found before the room
    /// starts.
    pub fn brokers(&self) -> anyhow::Result<Option<Brokers>> {
        let Some(list) = &self.broker else { return Ok(None) };
        Brokers::parse(list, MQTT_PORT).map(Some).map_err(|e| anyhow::anyhow!("--broker: {e}"))
    }
}

/// MQTT's standard port: that of a `--broker` node given without one.
const MQTT_PORT: u16 = 1883;

/// The nodes of a broker cluster in the order given; a single broker is a cluster of one. Never
/// empty. Parsed by the peer's own parser, so the launcher, `watch` and the peers read a list
/// the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brokers(Vec<(String, u16)>);

impl Brokers {
    /// One broker.
    pub fn one(host: impl Into<String>, port: u16) -> Self {
        Self(vec![(host.into(), port)])
    }

    /// Parses a comma-separated list of `host`, `host:port` or `[ipv6]:port`, `port` for an
    /// entry without one (see [`peer::config::parse_brokers`]); the error is one line.
    pub fn parse(list: &str, port: u16) -> Result<Self, String> {
        peer::config::parse_brokers(list, port).map(Self)
    }

    /// The nodes, each (host, port).
    pub fn nodes(&self) -> &[(String, u16)] {
        &self.0
    }

    /// The first node's port.
    pub fn first_port(&self) -> u16 {
        self.0.first().map_or(MQTT_PORT, |(_, port)| *port)
    }

    /// The list as a peer's `--host` takes it: `n1:1883,[::1]:1885`.
    pub fn to_host_arg(&self) -> String {
        self.0.iter().map(|(h, p)| address(h, *p)).collect::<Vec<_>>().join(",")
    }
}

/// For people: `n1:1883, [::1]:1885`.
impl std::fmt::Display for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.iter().map(|(h, p)| address(h, *p)).collect::<Vec<_>>().join(", "))
    }
}

/// `host:port`, an IPv6 address bracketed (as the peer's parser wants it back).
fn address(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// `launcher watch`: where the room is.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Broker host; or the nodes of a broker cluster, comma-separated, each `host` or `host:port`
    /// (as a peer's --host): the watcher connects to the first and moves on when it is lost.
    #[arg(long, visible_alias = "broker", env = "HASHVOTE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port (of each node given without one).
    #[arg(long, env = "HASHVOTE_PORT", default_value_t = MQTT_PORT)]
    pub port: u16,
    /// Topic prefix of the room.
    #[arg(long, env = "HASHVOTE_PREFIX", default_value = "sd", value_parser = parse_prefix)]
    pub prefix: String,
    /// Broker user name; the password comes from HASHVOTE_PASSWORD or --password-file.
    #[arg(long, env = "HASHVOTE_USERNAME")]
    pub username: Option<String>,
    /// Read the password from FILE (e.g. the one a launcher prints).
    #[arg(long, value_name = "FILE", requires = "username")]
    pub password_file: Option<PathBuf>,
    /// Print plain, timestamped lines even on a terminal.
    #[arg(long)]
    pub plain: bool,
    /// Stop after this many blocks have been accepted (0: until q or Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub rounds: u64,
    /// At exit, write a report (HTML page and SVG plots) to DIR.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

impl WatchArgs {
    /// The nodes of `--host` (`--broker`), each without a port taking `--port`.
    pub fn brokers(&self) -> anyhow::Result<Brokers> {
        Brokers::parse(&self.host, self.port).map_err(|e| anyhow::anyhow!("--host/--broker: {e}"))
    }
}

/// A topic prefix: one or more topic levels without wildcards.
fn parse_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains(['#', '+']) || s.ends_with('/') || s.starts_with('/') {
        return Err(format!("'{s}' must be non-empty topic levels without wildcards"));
    }
    Ok(s.to_string())
}

/// `launcher chaos`: how many peers and fault cycles.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Peers in the room (replacements keep it this size).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(3..=100))]
    pub peers: u16,
    /// Faults to inject, one per cycle.
    #[arg(long, default_value_t = 20)]
    pub cycles: u32,
    /// Kinds of fault to choose from at random, comma-separated (default: all of them: kill, pause,
    /// broker, leave, outage, newcomer, duplicate, restart).
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<Fault>,
    /// The room.
    #[command(flatten)]
    pub room: FaultRoomArgs,
}

/// `launcher failover-bench`: how many peers and trials.
#[derive(Debug, Clone, clap::Args)]
pub struct FailoverBenchArgs {
    /// Peers in the room (a replacement follows each killed controller).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(3..=100))]
    pub peers: u16,
    /// Controllers to kill.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub trials: u32,
    /// The room.
    #[command(flatten)]
    pub room: FaultRoomArgs,
}

/// The room a fault test starts.
#[derive(Debug, Clone, clap::Args)]
pub struct FaultRoomArgs {
    /// The peers' protocol: room (the room protocol; every peer has a data directory and comes
    /// back on it), the only one fault runs support.
    #[arg(long, value_enum, default_value_t = Wire::Room)]
    pub wire: Wire,
    /// Leading zero bits of each challenge (low: many blocks, so progress shows fast).
    #[arg(long, default_value_t = 16)]
    pub difficulty: u8,
    /// Mining threads per peer.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Proof-of-work hash: sha1 or sha256.
    #[arg(long, default_value = "sha1")]
    pub hash: peer::pow::HashAlg,
    /// MQTT keepalive of the peers, in seconds (a hung peer is noticed after 1.5 times this).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub keepalive: u64,
    /// Longest wait, in seconds, for the room to recover after a fault (a controller everyone
    /// follows, a new block everyone holds); a longer wait fails the run.
    #[arg(long, default_value_t = 30, value_name = "S", value_parser = clap::value_parser!(u64).range(1..))]
    pub deadline: u64,
    /// Seed of the random choices (default: random, printed so the fault sequence can be replayed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write every peer's events, merged, as JSON lines to FILE.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Also show the peers' and the broker's warnings (their stderr).
    #[arg(long)]
    pub verbose: bool,
}

/// The peers' protocol in a fault run: the room protocol, the only one with failover (the lab's
/// has none). A value of its own so that `--wire room` says what is run, and any other name is
/// refused with the choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Wire {
    /// The room protocol: every peer has a data directory and comes back on it.
    Room,
}

/// One kind of fault of `launcher chaos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL a peer, start it again.
    Kill,
    /// SIGSTOP a peer until the room notices, then SIGCONT.
    Pause,
    /// SIGKILL the broker, start a new one on the same port.
    #[value(name = "broker")]
    BrokerRestart,
    /// SIGTERM a peer (it leaves cleanly), start it again.
    #[value(name = "leave")]
    LeaveJoin,
    /// Kill the broker; while it is down, SIGKILL a peer; start the broker again, then the peer.
    #[value(name = "outage")]
    KillInOutage,
    /// SIGKILL the controller and start a peer with a new data directory during the election (a
    /// non-voting newcomer; the previous newcomer leaves).
    Newcomer,
    /// Start a second process under a member's id with its own data directory.
    Duplicate,
    /// SIGKILL every peer at once and start them all again from their data directories.
    #[value(name = "restart")]
    RoomRestart,
}

impl Fault {
    /// Every kind, in report order.
    pub const ALL: [Fault; 8] = [
        Fault::Kill,
        Fault::Pause,
        Fault::BrokerRestart,
        Fault::LeaveJoin,
        Fault::KillInOutage,
        Fault::Newcomer,
        Fault::Duplicate,
        Fault::RoomRestart,
    ];

    /// Short name for the report.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9 + restart",
            Fault::Pause => "SIGSTOP/SIGCONT",
            Fault::BrokerRestart => "broker restart",
            Fault::LeaveJoin => "clean leave + return",
            Fault::KillInOutage => "kill -9 during a broker outage",
            Fault::Newcomer => "kill -9 controller + newcomer",
            Fault::Duplicate => "duplicate id",
            Fault::RoomRestart => "whole room kill -9 + restart",
        }
    }
}

/// `launcher decode`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DecodeArgs {
    /// Topic prefix of the room.
    #[arg(long, env = "HASHVOTE_PREFIX", default_value = "sd")]
    pub prefix: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_lists_parse_or_say_why() {
        let room = |broker: &str| Args::try_parse_from(["launcher", "--broker", broker]).unwrap().room.brokers();
        let one = room("10.0.0.1:1883").unwrap().unwrap();
        assert_eq!(one, Brokers::one("10.0.0.1", 1883));
        let cluster = room("n1:1884, mqtt.example.org,[::1]:1885").unwrap().unwrap();
        let want = [("n1", 1884), ("mqtt.example.org", 1883), ("::1", 1885)];
        assert_eq!(cluster.nodes(), want.map(|(h, p)| (h.to_string(), p)));
        assert_eq!(cluster.first_port(), 1884);
        // Given back to a peer's --host, the list reads the same.
        assert_eq!(cluster.to_host_arg(), "n1:1884,mqtt.example.org:1883,[::1]:1885");
        assert_eq!(Brokers::parse(&cluster.to_host_arg(), 1).unwrap(), cluster);
        assert_eq!(cluster.to_string(), "n1:1884, mqtt.example.org:1883, [::1]:1885");
        for bad in [":1883", "h:0", "h:99999", "h:x", "a,,b", ""] {
            let e = room(bad).unwrap_err().to_string();
            assert!(e.starts_with("--broker: ") && !e.contains('\n'), "{bad}: {e}");
        }
        assert!(Args::try_parse_from(["launcher"]).unwrap().room.brokers().unwrap().is_none());

        let watch = |args: &[&str]| match Args::try_parse_from(["launcher", "watch"].iter().chain(args)).unwrap().role {
            Some(Role::Watch(w)) => w.brokers().map_err(|e| e.to_string()),
            other => panic!("{other:?}"),
        };
        // Backwards compatible: --host and --port; a list, under --host or --broker.
        assert_eq!(watch(&["--host", "h", "--port", "1999"]), Ok(Brokers::one("h", 1999)));
        assert_eq!(watch(&["--broker", "a:1,b", "--port", "2"]).unwrap().to_string(), "a:1, b:2");
        assert!(watch(&["--host", "a:x"]).unwrap_err().starts_with("--host/--broker: "));
        assert!(parse_prefix("sd").is_ok() && parse_prefix("a/b").is_ok());
        assert!(parse_prefix("sd/#").is_err() && parse_prefix("").is_err());
    }

    #[test]
    fn the_keepalive_grows_with_the_room_unless_given() {
        let keepalive =
            |args: &[&str]| Args::try_parse_from(["launcher"].iter().chain(args)).unwrap().room.keepalive_s();
        assert_eq!(keepalive(&[]), 2, "ten peers");
        assert_eq!(keepalive(&["--peers", "100"]), 4, "one more per 25 beyond 50");
        assert_eq!(keepalive(&["--peers", "300"]), 12);
        // Beyond about 400 a founding room's N² deliveries per round rule it.
        assert_eq!(keepalive(&["--peers", "500"]), 27);
        assert_eq!(keepalive(&["--peers", "1000"]), 102);
        assert_eq!(keepalive(&["--peers", "1000", "--keepalive", "5"]), 5, "as given");
    }
}

//! The peer's command line: flags (and `HASHVOTE_*` environment variables) over the config file
//! over the embedded defaults. Shared by the `peer` binary and the launcher, which re-executes
//! itself as `launcher peer ...`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{PeerConfig, Wire};
use crate::events::EventSink;
use crate::pow::HashAlg;
use crate::protocol::PeerId;

/// A hashvote peer: joins a room through an MQTT broker, takes part in the election, then mines
/// (or, if elected, issues challenges and validates solutions).
#[derive(Debug, Clone, Parser)]
#[command(name = "peer", version)]
pub struct Args {
    /// Configuration file (TOML, keys as in config/peer.toml).
    #[arg(long, env = "HASHVOTE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Broker host; or the nodes of a broker cluster, comma-separated, each `host` or
    /// `host:port` (the peer connects to the node its id picks, and moves on when it is lost).
    #[arg(long, env = "HASHVOTE_HOST")]
    pub host: Option<String>,
    /// Broker port.
    #[arg(long, env = "HASHVOTE_PORT")]
    pub port: Option<u16>,
    /// Peers that must know each other before the first election.
    #[arg(long, env = "HASHVOTE_ROOM_SIZE")]
    pub room_size: Option<usize>,
    /// As controller, replace a voting member not heard from for SECS seconds by a live peer
    /// beyond the room's size (0: never).
    #[arg(long, env = "HASHVOTE_REPLACE_AFTER", value_name = "SECS")]
    pub replace_after: Option<u64>,
    /// Mining threads (0: one per core).
    #[arg(long, env = "HASHVOTE_THREADS")]
    pub threads: Option<usize>,
    /// Leading zero bits of challenges issued as controller.
    #[arg(long, env = "HASHVOTE_DIFFICULTY")]
    pub difficulty: Option<u8>,
    /// Retarget the difficulty towards a block every MS milliseconds (0: off).
    #[arg(long, env = "HASHVOTE_TARGET_BLOCK_MS", value_name = "MS")]
    pub target_block_ms: Option<u64>,
    /// Difficulty bounds LO-HI: a random difficulty per challenge (the lab's 10-20), or the
    /// retarget bounds with --target-block-ms.
    #[arg(long, env = "HASHVOTE_DIFFICULTY_RANGE", value_name = "LO-HI", value_parser = parse_range)]
    pub difficulty_range: Option<[u8; 2]>,
    /// Proof-of-work hash: sha1 or sha256.
    #[arg(long, env = "HASHVOTE_HASH")]
    pub hash: Option<HashAlg>,
    /// Topic prefix.
    #[arg(long, env = "HASHVOTE_PREFIX")]
    pub prefix: Option<String>,
    /// Wire format: room (the default: the quorum protocol, with state on disk) or lab (the course
    /// lab's JSON messages).
    #[arg(long, env = "HASHVOTE_WIRE")]
    pub wire: Option<Wire>,
    /// Data directory (--wire room): identity, term and vote, chain. Created if missing; a
    /// restarted peer continues from it. Without it, a directory for this run only.
    #[arg(long, env = "HASHVOTE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client id (nonzero u32; random if omitted).
    #[arg(long, env = "HASHVOTE_ID")]
    pub id: Option<PeerId>,
    /// MQTT keepalive in seconds.
    #[arg(long, env = "HASHVOTE_KEEPALIVE")]
    pub keepalive: Option<u64>,
    /// Seconds to keep trying the first connection.
    #[arg(long, env = "HASHVOTE_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<u64>,
    /// Broker user name.
    #[arg(long, env = "HASHVOTE_USERNAME")]
    pub username: Option<String>,
    /// Peers this process runs, for scale tests (--wire room): each its own MQTT client, id, state,
    /// data directory (DIR/peer-<n> under --data-dir) and events; the mining threads (--threads)
    /// are shared. With --id, the ids are ID, ID+1, ...
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub instances: u32,
    /// Write events as JSON lines to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub events: Option<String>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `peer=debug`. Logs go to stderr.
    #[arg(long, env = "HASHVOTE_LOG", default_value = "info")]
    pub log: String,
}

impl Args {
    /// The configuration these arguments describe. The password is read only from the
    /// environment (`HASHVOTE_PASSWORD`) or the config file, never from the command line, where
    /// every local user could read it.
    pub fn to_config(&self) -> anyhow::Result<PeerConfig> {
        let mut c = PeerConfig::load(self.config.as_deref())?;
        macro_rules! set {
            ($($field:ident => $key:ident),*) => { $( if let Some(v) = self.$field.clone() { c.$key = v; } )* };
        }
        set!(host => host, port => port, room_size => room_size, replace_after => replace_after_s, threads => threads,
             difficulty => difficulty, hash => hash, target_block_ms => target_block_ms, prefix => prefix, keepalive => keepalive_s,
             connect_timeout => connect_timeout_s, wire => wire);
        if let Some(range) = self.difficulty_range {
            c.difficulty_range = Some(range);
        }
        if let Some(id) = self.id {
            c.id = Some(id);
        }
        if let Some(dir) = &self.data_dir {
            c.data_dir = Some(dir.clone());
        }
        if let Some(user) = &self.username {
            c.username = Some(user.clone());
        }
        if let Ok(password) = std::env::var("HASHVOTE_PASSWORD") {
            c.password = Some(password);
        }
        c.validate()?;
        Ok(c)
    }
}

/// Parses `LO-HI` (e.g. `10-20`): the difficulty bounds of `--difficulty-range`.
pub fn parse_range(s: &str) -> Result<[u8; 2], String> {
    let (lo, hi) = s.split_once('-').ok_or_else(|| format!("'{s}' is not LO-HI, e.g. 10-20"))?;
    let num = |x: &str| x.trim().parse::<u8>().map_err(|e| format!("'{x}': {e}"));
    Ok([num(lo)?, num(hi)?])
}

/// Runs a peer from parsed arguments; the whole of `main`.
pub fn main(args: Args) -> ExitCode {
    let filter = EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "peer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    use anyhow::Context;
    let cfg = args.to_config()?;
    let out: Option<Box<dyn Write + Send>> = match args.events.as_deref() {
        None => None,
        // Buffered, so that the lines of a held batch go out in one write (stdout alone is
        // line-buffered: one write per line).
        Some("-") => Some(Box::new(std::io::BufWriter::new(std::io::stdout()))),
        Some(path) => Some(Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create events file {path}"))?,
        ))),
    };
    match cfg.wire {
        Wire::Room => run_room(cfg, out, args.instances),
        Wire::Lab if args.instances > 1 => anyhow::bail!("--instances runs peers of --wire room only"),
        Wire::Lab => run_lab(cfg, out),
    }
}

/// Runs a peer of the lab's wire format: no data directory, an id drawn at random if none is set.
fn run_lab(cfg: PeerConfig, out: Option<Box<dyn Write + Send>>) -> anyhow::Result<()> {
    use tracing::Instrument;
    let id = cfg.id.unwrap_or_else(|| rand::random_range(1..=u32::MAX));
    let events = EventSink::new(id, out);
    block_on(|shutdown| crate::lab::driver::run(cfg, id, events, shutdown).instrument(tracing::info_span!("peer", id)))
}

/// Runs `instances` peers of the room protocol, sharing one pool of mining threads: their data
/// directories first (a bad one is a one-line error before anything connects), then the room.
fn run_room(cfg: PeerConfig, out: Option<Box<dyn Write + Send>>, instances: u32) -> anyhow::Result<()> {
    use anyhow::Context;
    use tracing::Instrument;
    // Without --data-dir: a directory for this run only, removed when the peer stops.
    let (dir, _ephemeral) = match &cfg.data_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("hashvote-peer-")
                .tempdir()
                .context("cannot create a data directory for this run")?;
            (tmp.path().to_path_buf(), Some(tmp))
        }
    };
    if let Some(id) = cfg.id {
        anyhow::ensure!(
            id.checked_add(instances - 1).is_some(),
            "--id {id} with --instances {instances} runs past the largest id, {}",
            u32::MAX
        );
    }
    // One writer for every peer's events, a whole line at a time.
    let out = out.map(|w| Arc::new(Mutex::new(w)));
    let pool = crate::miner::Pool::new(cfg.mining_threads());
    let mut peers = Vec::new();
    for n in 0..instances {
        let dir = if instances == 1 { dir.clone() } else { dir.join(format!("peer-{n}")) };
        let cfg = PeerConfig { id: cfg.id.map(|id| id + n), ..cfg.clone() };
        let wanted = crate::store::NewIdentity { id: cfg.id, room: cfg.prefix.clone() };
        let (store, identity, durable) = crate::store::Store::open(&dir, wanted)?;
        let id = identity.id;
        tracing::info!(id, dir = %dir.display(), height = durable.blocks.len(), term = durable.term, "data directory");
        let out = out.clone().map(|w| Box::new(Lines(w)) as Box<dyn Write + Send>);
        peers.push((cfg, store, identity, durable, EventSink::new(id, out)));
    }
    block_on(|shutdown| async move {
        let mut tasks = tokio::task::JoinSet::new();
        for (cfg, store, identity, durable, events) in peers {
            let (pool, shutdown) = (Arc::clone(&pool), shutdown.clone());
            let id = identity.id;
            let named = instances > 1;
            let peer = async move {
                let outcome = crate::room::run(cfg, store, identity, durable.into(), &pool, events, shutdown).await;
                // One process, many peers: the error says whose it is.
                outcome.map_err(|e| if named { anyhow::anyhow!("peer {id}: {e}") } else { e.into() })
            };
            tasks.spawn(peer.instrument(tracing::info_span!("peer", id)));
        }
        // The first peer to fail stops the others: the process's exit says why.
        let mut failed = None;
        while let Some(done) = tasks.join_next().await {
            let outcome = done.map_err(|e| anyhow::anyhow!("a peer's task failed: {e}")).and_then(|r| r);
            if let Err(e) = outcome {
                shutdown.cancel();
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    })
}

/// One process's event stream shared by the peers it runs: each write goes out whole, so the
/// lines of different peers never mix.
struct Lines(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).flush()
    }
}

/// Runs `peers` (given the token cancelled on SIGINT or SIGTERM) on the process's runtime: two
/// worker threads, for the network tasks and the driver loops.
fn block_on<F, E>(peers: impl FnOnce(CancellationToken) -> F) -> anyhow::Result<()>
where
    F: Future<Output = Result<(), E>>,
    anyhow::Error: From<E>,
{
    use anyhow::Context;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let cancel = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            cancel.cancel();
        });
        peers(shutdown).await
    })?;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM; never, with a warning, if the handlers cannot be
/// installed.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        tracing::warn!("cannot install signal handlers; Ctrl-C will stop the process abruptly");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

//! Peer configuration: defaults from `config/peer.toml` (embedded), a `--config` file, then
//! `HASHVOTE_*` environment variables and flags (applied by [`crate::cli`]), then [`PeerConfig::validate`].

use serde::{Deserialize, Serialize};

use crate::pace::Pace;
use crate::pow::HashAlg;
use crate::protocol::{PeerId, max_difficulty};

/// The embedded default configuration.
pub const DEFAULT_TOML: &str = include_str!("../../config/peer.toml");

/// Everything a peer needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Broker host name or address; or several brokers of one cluster, comma-separated, each
    /// `host` or `host:port` (see [`PeerConfig::brokers`]).
    pub host: String,
    /// Broker port (of each host given without one).
    pub port: u16,
    /// Peers that must know each other before the first election.
    pub room_size: usize,
    /// As controller, replace a member silent this many seconds by a live non-voter (0: never).
    pub replace_after_s: u64,
    /// Mining threads; 0 means one per available core.
    pub threads: usize,
    /// Leading zero bits of challenges issued as controller.
    pub difficulty: u8,
    /// Retarget towards a block every this many ms (0: off).
    pub target_block_ms: u64,
    /// Bounds of the difficulty (random range, or retarget bounds).
    #[serde(default)]
    pub difficulty_range: Option<[u8; 2]>,
    /// Proof-of-work hash of a chain started as controller.
    pub hash: HashAlg,
    /// Topic prefix.
    pub prefix: String,
    /// Client id; absent or 0 means a random nonzero id.
    #[serde(default)]
    pub id: Option<PeerId>,
    /// MQTT keepalive in seconds.
    pub keepalive_s: u64,
    /// Largest accepted payload in bytes.
    pub max_payload: usize,
    /// Seconds to keep trying the first connection.
    pub connect_timeout_s: u64,
    /// Broker user name, if the broker requires a login.
    #[serde(default)]
    pub username: Option<String>,
    /// Broker password (prefer the `HASHVOTE_PASSWORD` environment variable to a file).
    #[serde(default)]
    pub password: Option<String>,
    /// The wire format: the room protocol, or the original lab's JSON messages.
    #[serde(default)]
    pub wire: Wire,
    /// The data directory (`--wire room`): identity, term and vote, chain. Absent: a new
    /// directory for this run only, removed when the peer stops.
    #[serde(default)]
    pub data_dir: Option<std::path::PathBuf>,
}

/// The protocol a peer speaks on the room's topics. Parsed from its name (config files,
/// `--wire`, `HASHVOTE_WIRE`) by [`FromStr`](std::str::FromStr), so a name that is not one gives
/// one line naming the choices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Wire {
    /// The course lab's JSON messages, to share a room with its Python clients (see `crate::lab`).
    Lab,
    /// The room protocol (wire version 2: quorum elections, committed blocks, state on disk; see
    /// `crate::room`): the default.
    #[default]
    Room,
}

impl Wire {
    /// Its name, as `--wire` and config files take it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lab => "lab",
            Self::Room => "room",
        }
    }
}

impl std::fmt::Display for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Wire {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "lab" => Ok(Self::Lab),
            "room" => Ok(Self::Room),
            // Wire version 1's name: removed, its rooms speak the room protocol now.
            "hashvote" => Err("'hashvote' (wire version 1) was removed: expected room or lab".into()),
            other => Err(format!("unknown wire format '{other}' (expected room or lab)")),
        }
    }
}

impl TryFrom<String> for Wire {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse into a configuration.
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// Where it came from.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl PeerConfig {
    /// Parses a TOML document; keys it lacks keep the embedded defaults.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse = |t: &str, o: &str| {
            toml::from_str::<toml::Table>(t)
                .map_err(|e| ConfigError::Parse { origin: o.into(), message: e.to_string() })
        };
        let mut merged = parse(DEFAULT_TOML, "(embedded defaults)")?;
        merged.extend(parse(text, origin)?);
        merged.try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
            origin: origin.into(),
            message: one_line(&e.to_string()),
        })
    }

    /// Loads the embedded defaults, overridden by `path` if given.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::from_toml("", "(embedded defaults)"),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
                Self::from_toml(&text, &p.display().to_string())
            }
        }
    }

    /// The brokers to connect to, in order: every entry of `host` (comma-separated `host` or
    /// `host:port`, a bracketed IPv6 address as `[addr]:port`), with `port` where it names none.
    pub fn brokers(&self) -> Result<Vec<(String, u16)>, ConfigError> {
        parse_brokers(&self.host, self.port).map_err(|message| ConfigError::Invalid { key: "host", message })
    }

    /// Checks every value, with a precise message for the first one out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.port == 0 {
            return bad("port", "must be 1..=65535".into());
        }
        self.brokers()?;
        if self.room_size == 0 || self.room_size > 10_000 {
            return bad("room_size", format!("{} is not in 1..=10000", self.room_size));
        }
        if self.replace_after_s > 86_400 {
            return bad("replace_after_s", format!("{} is more than a day (86400)", self.replace_after_s));
        }
        if self.threads > 1024 {
            return bad("threads", format!("{} is more than 1024", self.threads));
        }
        let max = max_difficulty(self.hash);
        if self.difficulty > max {
            return bad(
                "difficulty",
                format!("{} is more than the {max} bits of {}", self.difficulty, self.hash.name()),
            );
        }
        if let Some([lo, hi]) = self.difficulty_range
            && (lo > hi || hi > max)
        {
            return bad("difficulty_range", format!("[{lo}, {hi}] must be ordered and at most {max}"));
        }
        if self.target_block_ms > u64::from(u32::MAX) {
            return bad("target_block_ms", format!("{} is too large", self.target_block_ms));
        }
        if !self.pace().is_valid(max) {
            return bad("difficulty", format!("{} is outside difficulty_range", self.difficulty));
        }
        if self.prefix.is_empty() || self.prefix.contains(['#', '+']) || self.prefix.ends_with('/') {
            return bad("prefix", format!("'{}' must be a non-empty topic level without wildcards", self.prefix));
        }
        if self.id == Some(0) {
            return bad("id", "must be nonzero (omit it for a random id)".into());
        }
        if self.keepalive_s == 0 || self.keepalive_s > 3600 {
            return bad("keepalive_s", format!("{} is not in 1..=3600 (brokers reject 0)", self.keepalive_s));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_payload) {
            return bad("max_payload", format!("{} is not in 1024..=16777216", self.max_payload));
        }
        if self.wire == Wire::Lab {
            let (lo, hi) = self.lab_difficulty();
            let cap = crate::lab::wire::MAX_ISSUED;
            if lo == 0 || hi > cap {
                return bad("difficulty", format!("{lo}..={hi} is not within 1..={cap}, the lab wire format's bounds"));
            }
            if self.hash != HashAlg::Sha1 {
                return bad("hash", "the lab wire format's proof of work is SHA-1".into());
            }
        }
        if self.username.is_none() && self.password.is_some() {
            return bad("password", "given without a username".into());
        }
        Ok(())
    }

    /// The difficulty policy these settings describe.
    pub fn pace(&self) -> Pace {
        let max = max_difficulty(self.hash);
        match (self.target_block_ms, self.difficulty_range) {
            (0, None) => Pace::Fixed(self.difficulty),
            (0, Some([lo, hi])) => Pace::Range { lo, hi },
            (target, range) => {
                let [lo, hi] = range.unwrap_or([1, max.min(48)]);
                Pace::Retarget { target_ms: target as u32, start: self.difficulty, lo, hi }
            }
        }
    }

    /// Difficulty bounds of the challenges issued as a lab controller: the fixed difficulty, the
    /// range, or (retargeting is not part of the lab) the starting difficulty.
    pub fn lab_difficulty(&self) -> (u8, u8) {
        match self.pace() {
            Pace::Fixed(d) | Pace::Retarget { start: d, .. } => (d, d),
            Pace::Range { lo, hi } => (lo, hi),
        }
    }

    /// Mining threads to start: the setting, or one per available core.
    pub fn mining_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// A deserialization error of the merged table on one line: toml puts the key it was reading on
/// a line of its own (`message` then ``in `key` ``), which would break the error's line.
fn one_line(message: &str) -> String {
    let mut lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let key = lines.last().and_then(|l| l.strip_prefix("in `")?.strip_suffix('`'));
    if let Some(key) = key {
        lines.pop();
        return format!("{key}: {}", lines.join(" "));
    }
    lines.join(" ")
}

/// Parses a comma-separated list of brokers (`host`, `host:port` or `[ipv6]:port`), `port` for
/// an entry without one.
pub fn parse_brokers(list: &str, port: u16) -> Result<Vec<(String, u16)>, String> {
    let mut out = Vec::new();
    for entry in list.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(format!("'{list}' has an empty broker address"));
        }
        let (host, entry_port) = match entry.rsplit_once(':') {
            // A bare IPv6 address has colons and no port.
            Some((h, _)) if h.contains(':') && !h.starts_with('[') => (entry, None),
            Some((h, p)) => (
                h,
                Some(
                    p.parse::<u16>()
                        .ok()
                        .filter(|&p| p > 0)
                        .ok_or_else(|| format!("'{entry}': the port '{p}' is not in 1..=65535"))?,
                ),
            ),
            None => (entry, None),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("'{entry}' has no host"));
        }
        out.push((host.to_string(), entry_port.unwrap_or(port)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_list_names_each_broker_with_its_port_or_the_default() {
        let brokers = parse_brokers("a, b:1884,[::1]:1885,::1, 10.0.0.1:9", 1883).unwrap();
        let want = [("a", 1883), ("b", 1884), ("::1", 1885), ("::1", 1883), ("10.0.0.1", 9)];
        assert_eq!(brokers, want.map(|(h, p)| (h.to_string(), p)));
        for bad in ["", "a,,b", "a:0", "a:99999", "a:x", ":1883", "[]:1"] {
            let e = parse_brokers(bad, 1883).unwrap_err();
            assert!(!e.is_empty() && !e.contains('\n'), "{bad}: {e}");
        }
        let c = PeerConfig::from_toml("host = \"n1:1883, n2:1883\"", "test").unwrap();
        assert_eq!(c.brokers().unwrap().len(), 2);
        assert!(PeerConfig::from_toml("host = \"n1:x\"", "test").unwrap().validate().is_err());
    }

    #[test]
    fn embedded_defaults_parse_and_validate() {
        let c = PeerConfig::load(None).unwrap();
        c.validate().unwrap();
        assert_eq!((c.room_size, c.port, c.hash, c.prefix.as_str()), (10, 1883, HashAlg::Sha1, "sd"));
    }

    #[test]
    fn a_file_overrides_some_keys_and_keeps_the_rest() {
        let c = PeerConfig::from_toml("port = 1999\nhash = \"sha256\"", "test").unwrap();
        assert_eq!((c.port, c.hash, c.room_size), (1999, HashAlg::Sha256, 10));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported_precisely() {
        let e = PeerConfig::from_toml("prot = 1", "x.toml").unwrap_err().to_string();
        assert!(e.contains("x.toml") && e.contains("prot"), "{e}");
        let mut c = PeerConfig::load(None).unwrap();
        c.difficulty = 161;
        assert!(c.validate().unwrap_err().to_string().contains("difficulty"));
        c.difficulty = 20;
        c.keepalive_s = 0;
        assert!(c.validate().unwrap_err().to_string().contains("keepalive_s"));
    }

    #[test]
    fn the_lab_wire_bounds_its_difficulty() {
        let c = PeerConfig::from_toml("wire = \"lab\"\ndifficulty_range = [10, 20]", "t").unwrap();
        c.validate().unwrap();
        assert_eq!((c.wire, c.lab_difficulty()), (Wire::Lab, (10, 20)));
        let c = PeerConfig::from_toml("wire = \"lab\"\ndifficulty = 33", "t").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("1..=32"));
        assert_eq!(PeerConfig::load(None).unwrap().wire, Wire::Room);
        assert!("LAB".parse::<Wire>().is_ok() && "json".parse::<Wire>().is_err());
    }

    #[test]
    fn the_removed_wire_version_1_is_a_one_line_error_naming_the_choices() {
        for text in ["wire = \"hashvote\"", "wire = \"HashVote\""] {
            let e = PeerConfig::from_toml(text, "old.toml").unwrap_err().to_string();
            assert_eq!(
                e,
                "invalid config old.toml: wire: 'hashvote' (wire version 1) was removed: expected room or lab"
            );
        }
        let e = PeerConfig::from_toml("wire = \"json\"", "t").unwrap_err().to_string();
        assert!(e.contains("unknown wire format 'json' (expected room or lab)") && !e.trim_end().contains('\n'), "{e}");
        assert_eq!(
            "hashvote".parse::<Wire>().unwrap_err(),
            "'hashvote' (wire version 1) was removed: expected room or lab"
        );
        assert_eq!(PeerConfig::from_toml("wire = \"room\"", "t").unwrap().wire, Wire::Room);
    }
}

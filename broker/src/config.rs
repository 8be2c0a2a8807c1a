//! [`BrokerConfig`] and how it becomes a [`rumqttd::Config`].
//!
//! The rumqttd config comes from `config/broker.toml` (embedded at build time) or from a file
//! in the same format; the listen address, payload limit and auth map are then applied on top,
//! and the result is validated. rumqttd itself trusts its config: it panics on some bad values in
//! its router thread, ignores unknown keys and swallows listener errors, so this module rejects
//! what rumqttd would mishandle, before anything starts.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::BrokerError;

/// The default rumqttd config, `config/broker.toml`, as compiled into the crate.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/broker.toml");

/// Default address to listen on: loopback, since the demo runs on one machine.
pub const DEFAULT_BIND: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Default port: MQTT's registered port.
pub const DEFAULT_PORT: u16 = 1883;

/// Default time the broker is given to accept its first (probe) connection.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// MQTT's largest packet (the maximum "remaining length"); rumqttd cannot take more.
pub const MAX_MQTT_PACKET: usize = 268_435_455;

/// How [`DEFAULT_CONFIG`] is named in error messages.
const EMBEDDED_ORIGIN: &str = "embedded config/broker.toml";

/// rumqttd panics (in its router thread, leaving a broker that accepts but never routes) below this.
const MIN_SEGMENT_SIZE: usize = 1024;

/// What to run: the rumqttd config to start from and the settings applied on top of it.
#[derive(Clone)]
pub struct BrokerConfig {
    /// A rumqttd config file (TOML) that replaces the embedded `config/broker.toml`.
    pub config_file: Option<PathBuf>,
    /// Address to listen on; replaces the listener's `listen` IP.
    pub bind: IpAddr,
    /// Port to listen on; replaces the listener's `listen` port. Must not be 0.
    pub port: u16,
    /// Largest accepted packet in bytes; replaces `max_payload_size` when set.
    pub max_payload: Option<usize>,
    /// Username → password; when set, replaces the listener's `auth` and every client must log in.
    pub auth: Option<HashMap<String, String>>,
    /// How long to wait for the started broker to accept a connection.
    pub ready_timeout: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            config_file: None,
            bind: DEFAULT_BIND,
            port: DEFAULT_PORT,
            max_payload: None,
            auth: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

// By hand, so that passwords never reach a log line.
impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let users = self.auth.as_ref().map(|auth| {
            let mut users: Vec<&str> = auth.keys().map(String::as_str).collect();
            users.sort_unstable();
            users
        });
        f.debug_struct("BrokerConfig")
            .field("config_file", &self.config_file)
            .field("bind", &self.bind)
            .field("port", &self.port)
            .field("max_payload", &self.max_payload)
            .field("auth_users", &users)
            .field("ready_timeout", &self.ready_timeout)
            .finish()
    }
}

impl BrokerConfig {
    /// The address the broker will listen on.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// Loads the rumqttd config (file or embedded default), applies this config's overrides, and
    /// validates the result.
    pub fn rumqttd_config(&self) -> Result<rumqttd::Config, BrokerError> {
        if self.port == 0 {
            return Err(BrokerError::PortZero);
        }
        if let Some(max) = self.max_payload {
            if !(1..=MAX_MQTT_PACKET).contains(&max) {
                return Err(BrokerError::InvalidMaxPayload(max));
            }
        }
        if self.auth.as_ref().is_some_and(HashMap::is_empty) {
            return Err(BrokerError::EmptyAuth);
        }

        let (text, origin) = match &self.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| BrokerError::ReadConfig { path: path.clone(), source })?;
                (text, path.display().to_string())
            }
            None => (DEFAULT_CONFIG.to_owned(), EMBEDDED_ORIGIN.to_owned()),
        };

        let mut config = parse(&text, &origin)?;
        let server = single_v4_listener(&mut config, &origin)?;
        server.listen = self.listen_addr();
        if let Some(max) = self.max_payload {
            server.connections.max_payload_size = max;
        }
        if let Some(auth) = &self.auth {
            server.connections.auth = Some(auth.clone());
        }
        validate(&config, &origin)?;
        Ok(config)
    }
}

/// The environment variable a broker reads its logins from: `user:password[,user2:password2]`.
///
/// Logins come from the environment or a file, never from the command line, where every local
/// user can read them (`/proc/PID/cmdline`).
pub const AUTH_ENV: &str = "HASHVOTE_BROKER_AUTH";

/// Parses the logins of an auth file: TOML with a `[users]` table (`name = "password"`), or one
/// `user:password` per line (blank lines and lines starting with `#` are skipped). The format is
/// TOML when the first line that is neither blank nor a comment starts with `[`.
///
/// Errors name the file and the line, never a password.
pub fn parse_auth_file(text: &str, origin: &str) -> Result<HashMap<String, String>, BrokerError> {
    let invalid = |reason: String| BrokerError::InvalidConfig { origin: origin.to_owned(), reason };
    let meaningful = |line: &&str| {
        let line = line.trim();
        !line.is_empty() && !line.starts_with('#')
    };
    let mut logins = HashMap::new();
    if text.lines().find(meaningful).is_some_and(|line| line.trim_start().starts_with('[')) {
        let table: toml::Table = toml::from_str(text).map_err(|e| BrokerError::ParseConfig {
            origin: origin.to_owned(),
            reason: one_line_toml_error(text, &e),
        })?;
        if let Some(key) = table.keys().find(|key| *key != "users") {
            return Err(BrokerError::UnknownKey { origin: origin.to_owned(), key: key.clone() });
        }
        let Some(toml::Value::Table(users)) = table.get("users") else {
            return Err(invalid("expected a [users] table of name = \"password\"".to_owned()));
        };
        for (user, password) in users {
            let toml::Value::String(password) = password else {
                return Err(invalid(format!("users.{user}: the password must be a string")));
            };
            add_login(&mut logins, user, password).map_err(|reason| invalid(format!("users.{user}: {reason}")))?;
        }
    } else {
        for (number, line) in text.lines().enumerate().filter(|(_, line)| meaningful(line)) {
            let (user, password) = line
                .trim()
                .split_once(':')
                .ok_or_else(|| invalid(format!("line {}: expected user:password", number + 1)))?;
            add_login(&mut logins, user, password)
                .map_err(|reason| invalid(format!("line {}: {reason}", number + 1)))?;
        }
    }
    if logins.is_empty() {
        return Err(invalid("no logins in it: no client could connect".to_owned()));
    }
    Ok(logins)
}

/// Parses logins written as `user:password[,user2:password2]`, the form of [`AUTH_ENV`]. A
/// password can contain `:` (the first one separates it from the user) but not `,`.
pub fn parse_auth_list(text: &str, origin: &str) -> Result<HashMap<String, String>, BrokerError> {
    let invalid = |reason: String| BrokerError::InvalidConfig { origin: origin.to_owned(), reason };
    let mut logins = HashMap::new();
    for (number, entry) in text.split(',').enumerate() {
        let (user, password) = entry
            .trim()
            .split_once(':')
            .ok_or_else(|| invalid(format!("login {}: expected user:password", number + 1)))?;
        add_login(&mut logins, user, password).map_err(|reason| invalid(format!("login {}: {reason}", number + 1)))?;
    }
    Ok(logins)
}

/// Reads and parses an auth file (see [`parse_auth_file`]).
pub fn read_auth_file(path: &std::path::Path) -> Result<HashMap<String, String>, BrokerError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| BrokerError::ReadConfig { path: path.to_owned(), source })?;
    parse_auth_file(&text, &path.display().to_string())
}

/// Adds one login, refusing an empty name or password and a user given twice.
fn add_login(logins: &mut HashMap<String, String>, user: &str, password: &str) -> Result<(), String> {
    let user = user.trim();
    if user.is_empty() {
        return Err("empty user name".to_owned());
    }
    if password.is_empty() {
        return Err(format!("empty password for user {user}"));
    }
    if logins.insert(user.to_owned(), password.to_owned()).is_some() {
        return Err(format!("user {user} is given twice"));
    }
    Ok(())
}

/// Parses rumqttd's TOML config, rejecting keys it would silently ignore.
fn parse(text: &str, origin: &str) -> Result<rumqttd::Config, BrokerError> {
    let parse_error = |e: toml::de::Error| BrokerError::ParseConfig {
        origin: origin.to_owned(),
        reason: one_line_toml_error(text, &e),
    };
    let config: rumqttd::Config = toml::from_str(text).map_err(parse_error)?;

    // serde drops unknown keys, and rumqttd does not forbid them: a misspelt `auth` table would
    // leave the broker open. Every key rumqttd understood comes back when the parsed config is
    // serialized again, so anything in the file but not in that round trip was ignored.
    let written: toml::Table = toml::from_str(text).map_err(parse_error)?;
    let understood = toml::Table::try_from(&config).map_err(|e| BrokerError::InvalidConfig {
        origin: origin.to_owned(),
        reason: format!("cannot check it for unknown keys: {e}"),
    })?;
    if let Some(key) = first_unknown_key(&written, &understood, "") {
        return Err(BrokerError::UnknownKey { origin: origin.to_owned(), key });
    }
    Ok(config)
}

/// The dotted path of the first key in `written` that is missing from `understood`.
fn first_unknown_key(written: &toml::Table, understood: &toml::Table, prefix: &str) -> Option<String> {
    written.iter().find_map(|(key, value)| {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match (value, understood.get(key)) {
            (_, None) => Some(path),
            (toml::Value::Table(written), Some(toml::Value::Table(understood))) => {
                first_unknown_key(written, understood, &path)
            }
            _ => None,
        }
    })
}

/// toml's messages span several lines (a source excerpt with a caret); the CLI prints one line.
fn one_line_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().lines().map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join("; ");
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// The one `[v4.*]` listener, after checking nothing else would be started.
fn single_v4_listener<'a>(
    config: &'a mut rumqttd::Config,
    origin: &str,
) -> Result<&'a mut rumqttd::ServerSettings, BrokerError> {
    let invalid = |reason: String| BrokerError::InvalidConfig { origin: origin.to_owned(), reason };
    // Each of these would start a listener or a task whose failures rumqttd swallows and that
    // the broker's startup check does not cover.
    let extra_sections = [
        ("v5", config.v5.is_some()),
        ("ws", config.ws.is_some()),
        ("cluster", config.cluster.is_some()),
        ("console", config.console.is_some()),
        ("bridge", config.bridge.is_some()),
        ("prometheus", config.prometheus.is_some()),
        ("metrics", config.metrics.is_some()),
    ];
    if let Some((section, _)) = extra_sections.iter().find(|(_, present)| *present) {
        return Err(invalid(format!(
            "section [{section}] is not supported: the broker runs one MQTT 3.1.1 listener, [v4.1]"
        )));
    }
    let listeners = config.v4.get_or_insert_with(HashMap::new);
    if listeners.len() != 1 {
        return Err(invalid(format!("expected exactly one [v4.*] listener, found {}", listeners.len())));
    }
    listeners.values_mut().next().ok_or_else(|| invalid("no [v4.*] listener".to_owned()))
}

/// Rejects values that rumqttd would panic on, stall on, or that cannot work.
fn validate(config: &rumqttd::Config, origin: &str) -> Result<(), BrokerError> {
    let invalid = |reason: String| BrokerError::InvalidConfig { origin: origin.to_owned(), reason };
    let router = &config.router;
    if router.max_connections == 0 {
        return Err(invalid("router.max_connections must be at least 1".into()));
    }
    if router.max_outgoing_packet_count == 0 {
        return Err(invalid("router.max_outgoing_packet_count must be at least 1 (0 never delivers QoS 0)".into()));
    }
    let segments = std::iter::once(("router", router.max_segment_size, router.max_segment_count)).chain(
        router
            .custom_segment
            .iter()
            .flatten()
            .map(|(filter, segment)| (filter.as_str(), segment.max_segment_size, segment.max_segment_count)),
    );
    for (name, size, count) in segments {
        if size < MIN_SEGMENT_SIZE {
            return Err(invalid(format!(
                "{name}: max_segment_size must be at least {MIN_SEGMENT_SIZE} (rumqttd panics below it)"
            )));
        }
        if count == 0 {
            return Err(invalid(format!("{name}: max_segment_count must be at least 1 (rumqttd panics at 0)")));
        }
    }

    for (key, server) in config.v4.iter().flatten() {
        let connections = &server.connections;
        let invalid_setting = |setting: &str, rule: &str| invalid(format!("v4.{key}.{setting} {rule}"));
        if server.tls.is_some() {
            return Err(invalid_setting(
                "tls",
                "is not supported (TLS handshakes run in rumqttd's accept loop with no timeout)",
            ));
        }
        if connections.connection_timeout_ms == 0 {
            return Err(invalid_setting("connections.connection_timeout_ms", "must be at least 1"));
        }
        if !(1..=MAX_MQTT_PACKET).contains(&connections.max_payload_size) {
            return Err(invalid_setting(
                "connections.max_payload_size",
                &format!("must be between 1 and {MAX_MQTT_PACKET}"),
            ));
        }
        if connections.max_inflight_count == 0 {
            return Err(invalid_setting("connections.max_inflight_count", "must be at least 1"));
        }
        if connections.auth.as_ref().is_some_and(HashMap::is_empty) {
            return Err(invalid_setting(
                "connections.auth",
                "is empty: no client could connect (remove it to allow anyone)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn listener(config: &rumqttd::Config) -> &rumqttd::ServerSettings {
        let listeners = config.v4.as_ref().expect("a v4 section");
        assert_eq!(listeners.len(), 1);
        listeners.values().next().expect("one listener")
    }

    /// Writes `text` to a file unique to this test and returns a config that loads it.
    fn with_file(name: &str, text: &str) -> (BrokerConfig, PathBuf) {
        let dir = std::env::temp_dir().join(format!("broker-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write temp config");
        let config = BrokerConfig { config_file: Some(path.clone()), ..BrokerConfig::default() };
        (config, path)
    }

    fn error_of(config: &BrokerConfig) -> String {
        match config.rumqttd_config() {
            Ok(_) => panic!("expected an error for {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn embedded_default_is_bounded_v4_on_loopback() {
        let config = BrokerConfig::default().rumqttd_config().expect("default config");
        assert!(config.v5.is_none() && config.ws.is_none() && config.console.is_none());
        assert!(config.prometheus.is_none() && config.bridge.is_none());
        let server = listener(&config);
        assert_eq!(server.listen, "127.0.0.1:1883".parse().expect("addr"));
        assert!(server.tls.is_none());
        assert_eq!(server.connections.max_payload_size, 64 * 1024);
        assert!(server.connections.auth.is_none());
        // The memory budget per subscription filter stays small (rumqttd's example: 1 GB).
        let per_filter = config.router.max_segment_size * config.router.max_segment_count;
        assert!(per_filter <= 4 * 1024 * 1024, "{per_filter} bytes per filter");
        assert!(config.router.max_connections <= 10_000);
    }

    #[test]
    fn overrides_replace_listen_payload_and_auth() {
        let auth = HashMap::from([("peer".to_owned(), "secret".to_owned())]);
        let config = BrokerConfig {
            bind: "0.0.0.0".parse().expect("ip"),
            port: 4242,
            max_payload: Some(1000),
            auth: Some(auth.clone()),
            ..BrokerConfig::default()
        }
        .rumqttd_config()
        .expect("config");
        let server = listener(&config);
        assert_eq!(server.listen, "0.0.0.0:4242".parse().expect("addr"));
        assert_eq!(server.connections.max_payload_size, 1000);
        assert_eq!(server.connections.auth, Some(auth));
    }

    #[test]
    fn file_replaces_embedded_default() {
        let text = DEFAULT_CONFIG.replace("max_inflight_count = 100", "max_inflight_count = 7");
        let (config, path) = with_file("replace.toml", &text);
        let built = config.rumqttd_config().expect("config");
        assert_eq!(listener(&built).connections.max_inflight_count, 7);
        // The flags still win over the file's listen address.
        assert_eq!(listener(&built).listen, config.listen_addr());
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn invalid_overrides_are_rejected() {
        let port_zero = BrokerConfig { port: 0, ..BrokerConfig::default() };
        assert!(error_of(&port_zero).contains("port 0"));
        let payload_zero = BrokerConfig { max_payload: Some(0), ..BrokerConfig::default() };
        assert!(error_of(&payload_zero).contains("max payload 0"));
        let empty_auth = BrokerConfig { auth: Some(HashMap::new()), ..BrokerConfig::default() };
        assert!(error_of(&empty_auth).contains("auth map is empty"));
    }

    #[test]
    fn missing_file_names_the_file() {
        let config = BrokerConfig {
            config_file: Some(Path::new("/nonexistent/broker.toml").to_owned()),
            ..BrokerConfig::default()
        };
        assert_eq!(error_of(&config), "cannot read config /nonexistent/broker.toml");
    }

    #[test]
    fn syntax_error_is_one_line_with_position() {
        let (config, path) = with_file("syntax.toml", "id = 0\n[router\nmax_connections = 1\n");
        let message = error_of(&config);
        assert!(message.starts_with(&format!("cannot read config {}: line 2,", path.display())), "{message}");
        assert!(!message.contains('\n'), "{message}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn missing_required_field_is_reported() {
        let (config, path) = with_file("missing.toml", "[router]\nmax_connections = 1\n");
        let message = error_of(&config);
        assert!(message.contains("missing field"), "{message}");
        assert!(!message.contains('\n'), "{message}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn misspelt_key_is_rejected_not_ignored() {
        let text = format!("{DEFAULT_CONFIG}\n[v4.1.connections.auht]\nuser = \"pass\"\n");
        let (config, path) = with_file("unknown.toml", &text);
        assert!(error_of(&config).ends_with("unknown key `v4.1.connections.auht`"), "{}", error_of(&config));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn auth_table_in_file_is_understood() {
        let text = format!("{DEFAULT_CONFIG}\n[v4.1.connections.auth]\nuser = \"pass\"\n");
        let (config, path) = with_file("auth.toml", &text);
        let built = config.rumqttd_config().expect("config");
        let auth = listener(&built).connections.auth.clone();
        assert_eq!(auth, Some(HashMap::from([("user".into(), "pass".into())])));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn extra_listeners_and_sections_are_rejected() {
        let v5 = format!(
            "{DEFAULT_CONFIG}\n[v5.1]\nname = \"v5\"\nlisten = \"127.0.0.1:1884\"\n\
             next_connection_delay_ms = 1\n[v5.1.connections]\nconnection_timeout_ms = 100\n\
             max_payload_size = 100\nmax_inflight_count = 1\n"
        );
        let (config, path) = with_file("v5.toml", &v5);
        assert!(error_of(&config).contains("section [v5] is not supported"));
        let _ = std::fs::remove_file(path);

        let no_listener = "id = 0\n[router]\nmax_connections = 1\nmax_outgoing_packet_count = 1\n\
                           max_segment_size = 1024\nmax_segment_count = 1\n";
        let (config, path) = with_file("none.toml", no_listener);
        assert!(error_of(&config).contains("exactly one [v4.*] listener, found 0"));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn values_rumqttd_panics_on_are_rejected() {
        let cases = [
            ("max_segment_size = 262144", "max_segment_size = 1000", "at least 1024"),
            ("max_segment_count = 3", "max_segment_count = 0", "max_segment_count"),
            ("max_connections = 5000", "max_connections = 0", "max_connections"),
            ("connection_timeout_ms = 5000", "connection_timeout_ms = 0", "connection_timeout_ms"),
        ];
        for (i, (from, to, expected)) in cases.into_iter().enumerate() {
            assert!(DEFAULT_CONFIG.contains(from), "default lost `{from}`");
            let (config, path) = with_file(&format!("bad{i}.toml"), &DEFAULT_CONFIG.replace(from, to));
            let message = error_of(&config);
            assert!(message.contains(expected), "{to}: {message}");
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn auth_file_in_both_formats() {
        let expected = HashMap::from([("alice".to_owned(), "a:b c".to_owned()), ("bob".to_owned(), "pw".to_owned())]);
        let lines = "# logins\n\nalice:a:b c\n  bob:pw  \n";
        assert_eq!(parse_auth_file(lines, "f").expect("lines"), expected);
        let toml = "# logins\n[users]\nalice = \"a:b c\"\nbob = \"pw\"\n";
        assert_eq!(parse_auth_file(toml, "f").expect("toml"), expected);
    }

    #[test]
    fn bad_auth_files_are_rejected_without_showing_passwords() {
        let cases = [
            ("alice:secret1\nbob\n", "f: line 2: expected user:password"),
            ("alice:secret1\nalice:secret2\n", "user alice is given twice"),
            (":secret1\n", "empty user name"),
            ("alice:\n", "empty password for user alice"),
            ("# nothing\n", "no logins"),
            ("[users]\nalice = 1\n", "users.alice: the password must be a string"),
            ("[users]\nalice = \"secret1\"\n[other]\n", "unknown key `other`"),
            ("[userz]\nalice = \"secret1\"\n", "unknown key `userz`"),
        ];
        for (text, expected) in cases {
            let message = match parse_auth_file(text, "f") {
                Ok(_) => panic!("accepted {text:?}"),
                Err(e) => e.to_string(),
            };
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn auth_list_from_the_environment() {
        let logins = parse_auth_list("alice:pw1, bob:p:w2", AUTH_ENV).expect("list");
        assert_eq!(logins, HashMap::from([("alice".into(), "pw1".into()), ("bob".into(), "p:w2".into())]));
        let message = parse_auth_list("alice:secret,bob", AUTH_ENV).expect_err("no password").to_string();
        assert!(message.contains("login 2: expected user:password") && !message.contains("secret"), "{message}");
        assert!(parse_auth_list("", AUTH_ENV).is_err());
    }

    #[test]
    fn debug_hides_passwords() {
        let config =
            BrokerConfig { auth: Some(HashMap::from([("peer".into(), "hunter2".into())])), ..BrokerConfig::default() };
        let debug = format!("{config:?}");
        assert!(debug.contains("peer") && !debug.contains("hunter2"), "{debug}");
    }
}

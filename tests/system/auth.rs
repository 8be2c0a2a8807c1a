//! Access control: a broker that requires a login admits only the right one, a peer refused by it
//! says so in one line, and the demo's generated password never shows on a command line.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peer::events::Event;
use rumqttc::{Client, Connection, Event as MqttEvent, MqttOptions, Packet, QoS};

use crate::support::*;

const USER: &str = "tester";
const PASSWORD: &str = "correct-horse-battery";

/// Starts `launcher broker` on `port` with extra flags and environment, and waits for its ready line.
fn start_auth_broker(port: u16, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let child = launcher()
        .args(["broker", "--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(args)
        .env_remove(broker::config::AUTH_ENV)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn broker");
    await_broker(child, format!("broker:{port}"))
}

/// Connects a raw MQTT client; `Ok` once the broker's CONNACK arrives, `Err` with the first error.
fn login(port: u16, id: &str, credentials: Option<(&str, &str)>) -> Result<(Client, Connection), String> {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (client, mut connection) = Client::new(options, 10);
    loop {
        match connection.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => return Ok((client, connection)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(e) => return Err(format!("no answer: {e:?}")),
        }
    }
}

/// Polls `connection` until an incoming packet matches `want`, with a deadline.
fn wait_for(connection: &mut Connection, what: &str, mut want: impl FnMut(&Packet) -> bool) -> Packet {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match connection.recv_timeout(left) {
            Ok(Ok(MqttEvent::Incoming(packet))) if want(&packet) => return packet,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed while waiting for {what}: {e}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

#[test]
fn broker_with_auth_admits_only_the_right_login() {
    let port = free_port();
    let logins = format!("{USER}:{PASSWORD},other:pw2");
    let _broker = start_auth_broker(port, &[], &[(broker::config::AUTH_ENV, &logins)]);

    // The right login connects and subscribes before the intruders try anything.
    let (client, mut connection) = login(port, "auth-good", Some((USER, PASSWORD))).expect("the right login connects");
    client.subscribe("auth/t", QoS::AtLeastOnce).expect("subscribe");
    wait_for(&mut connection, "SUBACK", |p| matches!(p, Packet::SubAck(_)));

    // No login, a wrong password, an unknown user: no CONNACK, so nothing they queue is ever sent.
    for (id, credentials) in
        [("auth-none", None), ("auth-wrong", Some((USER, "wrong"))), ("auth-nobody", Some(("nobody", PASSWORD)))]
    {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (intruder, mut attempts) = Client::new(options, 10);
        intruder.try_publish("auth/t", QoS::AtLeastOnce, false, b"intruder".to_vec()).expect("queue publish");
        intruder.try_subscribe("auth/t", QoS::AtLeastOnce).expect("queue subscribe");
        for attempt in 0..3 {
            match attempts.recv_timeout(Duration::from_secs(10)) {
                Ok(Err(_)) => {}
                other => panic!("{id}: attempt {attempt} did not fail: {other:?}"),
            }
        }
        assert!(login(port, &format!("{id}-again"), credentials).is_err(), "{id} connected");
    }

    // The right login publishes and receives its own message, and only that one.
    client.publish("auth/t", QoS::AtLeastOnce, false, b"hello".to_vec()).expect("publish");
    let Packet::Publish(publish) = wait_for(&mut connection, "own message", |p| matches!(p, Packet::Publish(_))) else {
        unreachable!()
    };
    assert_eq!(&publish.payload[..], b"hello");
}

#[test]
fn peer_refused_by_the_broker_exits_within_its_connect_timeout_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let auth_file = dir.path().join("auth.toml");
    std::fs::write(&auth_file, format!("[users]\n{USER} = \"{PASSWORD}\"\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&auth_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let port = free_port();
    let _broker = start_auth_broker(port, &["--auth-file", auth_file.to_str().unwrap()], &[]);

    let cases: [(Option<&str>, &str); 2] = [
        (
            Some("wrong"),
            "closed the connection before accepting the login (wrong user name or password?; or is it full?)",
        ),
        (None, "closed the connection before accepting the login (does it require a login?"),
    ];
    for (password, expected) in cases {
        let mut cmd = launcher();
        cmd.args(["peer", "--host", "127.0.0.1", "--port", &port.to_string(), "--connect-timeout", "3"])
            .args(["--room-size", "2", "--log", "error"])
            .env_remove("HASHVOTE_USERNAME")
            .env_remove("HASHVOTE_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(password) = password {
            cmd.args(["--username", USER]).env("HASHVOTE_PASSWORD", password);
        }
        let started = Instant::now();
        let mut peer = Proc { child: cmd.spawn().expect("spawn peer"), name: "peer".into() };
        let status = peer.wait_exit(Duration::from_secs(20));
        let elapsed = started.elapsed();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut peer.child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{password:?}: {status}");
        assert!(elapsed < Duration::from_secs(3), "{password:?}: took {elapsed:?} (connect timeout 3 s)");
        assert_eq!(stderr.trim().lines().count(), 1, "{password:?}: {stderr}");
        let addr = format!("127.0.0.1:{port}");
        assert!(stderr.starts_with(&format!("peer: error: the broker at {addr} {expected}")), "{stderr}");
    }
}

/// The processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // After the command name (which may hold spaces): state, then the parent's pid.
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok()) == Some(parent)
            })
        })
        .collect()
}

/// Every command line and environment seen for each child of `parent` until `stop` is set.
#[derive(Default)]
struct Seen {
    cmdlines: BTreeMap<u32, BTreeSet<String>>,
    environs: BTreeMap<u32, BTreeSet<String>>,
}

fn watch_children(parent: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        let read = |pid: u32, what: &str| {
            std::fs::read(format!("/proc/{pid}/{what}")).ok().map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        };
        while !stop.load(Ordering::Acquire) {
            for pid in children_of(parent) {
                // Read every time: a child shows the launcher's command line until it execs.
                if let Some(cmdline) = read(pid, "cmdline").filter(|c| !c.is_empty()) {
                    seen.cmdlines.entry(pid).or_default().insert(cmdline);
                }
                if let Some(environ) = read(pid, "environ") {
                    seen.environs.entry(pid).or_default().insert(environ);
                }
            }
            // A sampling period, not synchronisation: every child lives for many periods.
            std::thread::sleep(Duration::from_millis(5));
        }
        seen
    })
}

#[test]
fn demo_with_generated_login_succeeds_and_keeps_the_password_off_command_lines() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let port = free_port();
    let child = launcher()
        .args(["--rounds", "2", "--peers", "3", "--difficulty", "10", "--target-block-ms", "0"])
        .args(["--port", &port.to_string(), "--events"])
        .arg(&events)
        .env_remove("HASHVOTE_USERNAME")
        .env_remove("HASHVOTE_PASSWORD")
        .env_remove(broker::config::AUTH_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn launcher");
    let mut launcher = Proc { child, name: "launcher".into() };
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_children(launcher.pid(), Arc::clone(&stop));

    let stdout_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = Arc::clone(&stdout_lines);
        let stdout = launcher.child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    // The password file is removed when the launcher exits: read it while it runs.
    let mut password_file = None::<PathBuf>;
    wait_until(Duration::from_secs(30), "the launcher's auth line", || {
        let lines = stdout_lines.lock().unwrap();
        password_file = lines.iter().find_map(|l| {
            let rest = l.strip_prefix("auth: on; user hashvote, password in ")?;
            Some(PathBuf::from(rest.split_whitespace().next()?))
        });
        password_file.is_some()
    });
    let password_file = password_file.unwrap();
    let password = std::fs::read_to_string(&password_file).expect("read the password file");
    let password = password.trim();
    assert_eq!(password.len(), 24, "a generated 24-character password");
    assert!(password.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_file_private(&password_file);

    let status = launcher.wait_exit(Duration::from_secs(120));
    stop.store(true, Ordering::Release);
    let seen = watcher.join().unwrap();
    reader.join().unwrap();
    let stdout = stdout_lines.lock().unwrap().join("\n");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut launcher.child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "launcher failed: {status}\n{stdout}\n{stderr}");
    assert!(stdout.contains("summary"), "{stdout}");
    assert!(!stdout.contains(password) && !stderr.contains(password), "the launcher printed the password");
    assert!(!password_file.exists(), "the password file outlived the launcher");

    // No child ever had the password on its command line; the peers had it in their environment.
    for (pid, cmdlines) in &seen.cmdlines {
        for cmdline in cmdlines {
            assert!(!cmdline.contains(password), "pid {pid} had the password on its command line: {cmdline}");
        }
    }
    let role_pids = |role: &str| -> BTreeSet<u32> {
        let marker = format!(" {role} ");
        seen.cmdlines.iter().filter(|(_, c)| c.iter().any(|c| c.contains(&marker))).map(|(pid, _)| *pid).collect()
    };
    let peers = role_pids("peer");
    assert_eq!(role_pids("broker").len(), 1, "the broker was seen: {:?}", seen.cmdlines);
    let records = read_events(&events);
    let peer_pids: BTreeSet<u32> = pids(&records).into_iter().collect();
    assert_eq!(peer_pids.len(), 3, "three peers started");
    assert!(peer_pids.is_subset(&peers), "every peer's command line was checked: {peer_pids:?} vs {peers:?}");
    let in_env = format!("HASHVOTE_PASSWORD={password}");
    assert!(
        peers.iter().all(|pid| seen.environs.get(pid).is_some_and(|e| e.iter().any(|e| e.contains(&in_env)))),
        "the peers got the password in their environment"
    );
    assert!(records.iter().any(|r| matches!(r.event, Event::BlockAccepted { .. })));
}

fn assert_file_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", path.display());
    let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
}

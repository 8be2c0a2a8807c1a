//! The lab wire format: hashvote peers (`--wire lab`) in one room with scripted lab-style clients
//! written here (JSON over MQTT, the lab's rules, their own SHA-1 check), once with integer ids and
//! a scripted controller, once with UUID-like string ids and a hashvote controller. Everyone must
//! agree on the controller and on every transaction's winner, and every winner must verify.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use peer::events::Event;
use rumqttc::{Client, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use sha1::Digest as _;

use crate::support::*;

/// Transactions every test waits for.
const BLOCKS: u64 = 5;
const ROOM: usize = 5;
const TOPICS: [&str; 5] = ["init", "voting", "challenge", "solution", "result"];

/// Leading zero bits of SHA-1 over the string's bytes: the lab's rule, computed here on its own.
fn zeros(s: &str) -> u32 {
    let d = sha1::Sha1::digest(s.as_bytes());
    let mut bits = 0;
    for b in d {
        bits += b.leading_zeros();
        if b != 0 {
            break;
        }
    }
    bits
}

/// An id as the room writes it, for comparing as strings (and as a set key: `5` and `"5"` differ).
fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// The lab's election: the highest (VoteID, ClientID); numerically if every value is an integer,
/// else as strings.
fn winner(ballots: &[(Value, Value)]) -> Value {
    let numeric = ballots.iter().all(|(v, c)| v.is_i64() && c.is_i64());
    let key = |(v, c): &(Value, Value)| {
        if numeric {
            (v.as_i64().unwrap(), c.as_i64().unwrap(), String::new(), String::new())
        } else {
            (0, 0, text(v), text(c))
        }
    };
    ballots.iter().max_by_key(|b| key(b)).expect("ballots").1.clone()
}

#[derive(Clone, Copy, PartialEq)]
enum Mine {
    /// Mines every challenge.
    All,
    /// A slow client: mines only odd transactions, so hashvote peers must win the others.
    OddOnly,
}

#[derive(Default, Debug)]
struct Seen {
    controller: Option<Value>,
    /// Difficulty by transaction.
    challenges: BTreeMap<u64, u32>,
    /// Winner and solution by transaction (results 1 that verified).
    results: BTreeMap<u64, (Value, String)>,
    /// Results 1 whose solution did not verify.
    bad_results: usize,
    /// Results (1 or 0) the controller published for this client's solutions.
    judged: usize,
    /// Ids heard of and votes held, for the message of a failed test.
    known: Vec<String>,
    votes: Vec<String>,
}

/// A scripted lab-style client on its own thread.
struct Script {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Script {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Lab {
    id: Value,
    vote: Value,
    mine: Mine,
    prefix: String,
    client: Client,
    known: BTreeSet<String>,
    votes: BTreeMap<String, (Value, Value)>,
    voted: bool,
    held: Option<(u64, u32)>,
    /// As controller: the open transaction.
    open: Option<u64>,
    seen: Arc<Mutex<Seen>>,
}

impl Script {
    fn start(port: u16, prefix: &str, id: Value, vote: Value, mine: Mine) -> Script {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut options =
            MqttOptions::new(format!("lab-script-{}-{}", std::process::id(), text(&id)), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(options, 256);
        let mut lab = Lab {
            id,
            vote,
            mine,
            prefix: prefix.to_string(),
            client,
            known: BTreeSet::new(),
            votes: BTreeMap::new(),
            voted: false,
            held: None,
            open: None,
            seen: Arc::clone(&seen),
        };
        // The connection runs on its own thread: `Connection::recv_timeout` cancels rumqttc's
        // poll when it times out, which can lose a request being sent.
        let (events, inbox) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(e) => {
                        if events.send(e).is_err() {
                            return;
                        }
                    }
                    // A failed (re)connection attempt: rumqttc retries on the next poll.
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        let halt = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut last_init: Option<Instant> = None;
            while !halt.load(Ordering::Relaxed) {
                match inbox.recv_timeout(Duration::from_millis(100)) {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                        for t in TOPICS {
                            lab.client.subscribe(format!("{}/{t}", lab.prefix), QoS::AtLeastOnce).unwrap();
                        }
                        lab.init();
                        last_init = Some(Instant::now());
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                        let v: Value = serde_json::from_slice(&p.payload).expect("peers send JSON");
                        lab.handle(p.topic.rsplit('/').next().unwrap(), &v);
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    _ => {}
                }
                // The lab re-announces on a timer (10 s there, shortened here) until the election
                // is decided: a client that missed an Init does not vote before it hears it again.
                let decided = lab.seen.lock().unwrap().controller.is_some();
                if !decided && last_init.is_some_and(|t| t.elapsed() > Duration::from_millis(500)) {
                    lab.init();
                    last_init = Some(Instant::now());
                }
            }
            // Dropping the client with `lab` then ends the connection thread.
            let _ = lab.client.disconnect();
        });
        Script { seen, stop, thread: Some(thread) }
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        assert!(!self.thread.as_ref().is_some_and(|t| t.is_finished()), "a scripted client stopped: {seen:?}");
        f(&seen)
    }
}

impl Lab {
    fn send(&self, topic: &str, msg: Value) {
        self.client.publish(format!("{}/{topic}", self.prefix), QoS::AtLeastOnce, false, msg.to_string()).unwrap();
    }

    fn init(&mut self) {
        self.send("init", json!({ "ClientID": self.id }));
    }

    fn me(&self) -> bool {
        self.seen.lock().unwrap().controller.as_ref() == Some(&self.id)
    }

    fn challenge(&mut self, tx: u64) {
        // The lab's random difficulty, kept low for the test.
        let difficulty = 14 + (tx % 3) as u32;
        self.seen.lock().unwrap().challenges.insert(tx, difficulty);
        self.open = Some(tx);
        self.send("challenge", json!({ "TransactionID": tx, "Challenge": difficulty }));
    }

    fn handle(&mut self, topic: &str, v: &Value) {
        match topic {
            "init" => {
                self.known.insert(v["ClientID"].to_string());
                self.seen.lock().unwrap().known = self.known.iter().cloned().collect();
                if !self.voted && self.known.len() >= ROOM {
                    self.voted = true;
                    self.send("voting", json!({ "ClientID": self.id, "VoteID": self.vote }));
                }
            }
            "voting" => {
                self.votes.insert(v["ClientID"].to_string(), (v["VoteID"].clone(), v["ClientID"].clone()));
                self.seen.lock().unwrap().votes = self.votes.keys().cloned().collect();
                if self.voted && self.votes.len() >= ROOM && self.seen.lock().unwrap().controller.is_none() {
                    let ballots: Vec<_> = self.votes.values().cloned().collect();
                    self.seen.lock().unwrap().controller = Some(winner(&ballots));
                    if self.me() {
                        self.challenge(0);
                    } else if let Some((tx, d)) = self.held.take() {
                        self.on_challenge(tx, d);
                    }
                }
            }
            "challenge" => {
                let (tx, d) = (v["TransactionID"].as_u64().unwrap(), v["Challenge"].as_u64().unwrap() as u32);
                if self.seen.lock().unwrap().controller.is_none() {
                    self.held = Some((tx, d));
                } else if !self.me() {
                    self.on_challenge(tx, d);
                }
            }
            "solution" if self.me() => {
                let (tx, solution) =
                    (v["TransactionID"].as_u64().unwrap(), v["Solution"].as_str().unwrap().to_string());
                let mut seen = self.seen.lock().unwrap();
                let valid = self.open == Some(tx)
                    && !seen.results.contains_key(&tx)
                    && seen.challenges.get(&tx).is_some_and(|&d| zeros(&solution) >= d);
                let result = json!({ "ClientID": v["ClientID"], "TransactionID": tx, "Solution": solution, "Result": u8::from(valid) });
                if valid {
                    seen.results.insert(tx, (v["ClientID"].clone(), solution));
                }
                drop(seen);
                self.send("result", result);
                if valid && tx + 1 < BLOCKS {
                    self.challenge(tx + 1);
                }
            }
            "result" if !self.me() && v["ClientID"] == self.id && v["Result"] == 0 => {
                self.seen.lock().unwrap().judged += 1;
            }
            "result" if !self.me() && v["Result"] == 1 => {
                let tx = v["TransactionID"].as_u64().unwrap();
                let solution = v["Solution"].as_str().unwrap().to_string();
                let mut seen = self.seen.lock().unwrap();
                seen.judged += usize::from(v["ClientID"] == self.id);
                if seen.challenges.get(&tx).is_some_and(|&d| zeros(&solution) >= d) {
                    seen.results.entry(tx).or_insert((v["ClientID"].clone(), solution));
                } else {
                    seen.bad_results += 1;
                }
            }
            _ => {}
        }
    }

    fn on_challenge(&mut self, tx: u64, d: u32) {
        self.seen.lock().unwrap().challenges.insert(tx, d);
        if self.mine == Mine::OddOnly && tx % 2 == 0 {
            return;
        }
        // The lab's way: try strings until one has the leading zero bits.
        let prefix = format!("{}-{tx}-", text(&self.id));
        let solution = (0u64..).map(|n| format!("{prefix}{n}")).find(|s| zeros(s) >= d).unwrap();
        self.send("solution", json!({ "ClientID": self.id, "TransactionID": tx, "Solution": solution }));
    }
}

/// A peer's elected controller, and its results 1: winner, solution and difficulty by transaction.
type Outcome = (Option<String>, BTreeMap<u64, (String, String, u32)>);

/// A broker, `n` hashvote peers speaking the lab format, and their events files.
struct Room {
    _broker: Proc,
    port: u16,
    prefix: String,
    dir: tempfile::TempDir,
    peers: Vec<Proc>,
    files: Vec<PathBuf>,
}

impl Room {
    fn start(tag: &str) -> Room {
        let port = free_port();
        let broker = start_broker(port);
        let dir = tempfile::Builder::new()
            .prefix("hashvote-lab")
            .disable_cleanup(std::env::var_os("KEEP_ROOMS").is_some())
            .tempdir()
            .unwrap();
        eprintln!("lab room {tag}: events and logs in {}", dir.path().display());
        let prefix = format!("lab{tag}{}r{port}", std::process::id());
        Room { _broker: broker, port, prefix, dir, peers: Vec::new(), files: Vec::new() }
    }

    fn add_peers(&mut self, n: usize, extra: &[&str]) {
        for i in 0..n {
            let file = self.dir.path().join(format!("peer{i}.jsonl"));
            let room = ROOM.to_string();
            let mut args = vec!["--wire", "lab", "--room-size", &room, "--threads", "1", "--prefix", &self.prefix];
            args.extend(extra);
            self.peers.push(start_peer(self.port, &file, &args));
            self.files.push(file);
        }
    }

    /// Each peer's elected controller and results 1 (winner and solution by transaction, with
    /// the difficulty).
    fn outcomes(&self) -> Vec<Outcome> {
        self.files
            .iter()
            .map(|f| {
                let mut controller = None;
                let mut results = BTreeMap::new();
                for r in read_events(f) {
                    match r.event {
                        Event::LabElected { controller: c, .. } => controller = Some(c),
                        Event::LabResult { tx, winner, solution, result: 1, difficulty } => {
                            results.insert(tx, (winner, solution, difficulty));
                        }
                        _ => {}
                    }
                }
                (controller, results)
            })
            .collect()
    }

    fn client_ids(&self) -> BTreeSet<String> {
        self.files
            .iter()
            .filter_map(|f| {
                read_events(f).iter().find_map(|r| match r.event {
                    Event::Started { client_id, .. } => Some(client_id.to_string()),
                    _ => None,
                })
            })
            .collect()
    }
}

/// Waits until everyone has `BLOCKS` results, then checks agreement and the work of every winner.
fn check_agreement(room: &Room, scripts: &[&Script]) -> (String, BTreeMap<u64, (String, String)>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(room.outcomes().iter().all(|(_, r)| r.len() as u64 >= BLOCKS)
        && scripts.iter().all(|s| s.seen(|s| s.results.len() as u64 >= BLOCKS)))
    {
        if Instant::now() > deadline {
            let scripts: Vec<String> = scripts.iter().map(|s| s.seen(|s| format!("{s:?}"))).collect();
            panic!("timed out waiting for the results; peers {:?}, scripts {scripts:#?}", room.outcomes());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let outcomes = room.outcomes();
    let controller = outcomes[0].0.clone().expect("an elected controller");
    let reference: BTreeMap<u64, (String, String)> =
        outcomes[0].1.iter().take(BLOCKS as usize).map(|(tx, (w, s, _))| (*tx, (w.clone(), s.clone()))).collect();
    assert_eq!(reference.keys().copied().collect::<Vec<_>>(), (0..BLOCKS).collect::<Vec<_>>());
    for (i, (c, results)) in outcomes.iter().enumerate() {
        assert_eq!(c.as_ref(), Some(&controller), "peer {i}'s controller");
        for (tx, (w, s, d)) in results.iter().take(BLOCKS as usize) {
            assert_eq!(reference.get(tx), Some(&(w.clone(), s.clone())), "peer {i}, tx {tx}");
            assert!(zeros(s) >= *d, "peer {i}, tx {tx}: {s:?} lacks {d} bits");
        }
    }
    for (k, script) in scripts.iter().enumerate() {
        script.seen(|seen| {
            assert_eq!(seen.controller.as_ref().map(text), Some(controller.clone()), "script {k}'s controller");
            assert_eq!(seen.bad_results, 0, "script {k} saw results that do not verify");
            for tx in 0..BLOCKS {
                let (w, s) = &seen.results[&tx];
                assert_eq!((text(w), s.clone()), reference[&tx], "script {k}, tx {tx}");
                assert!(zeros(s) >= seen.challenges[&tx], "script {k}, tx {tx}");
            }
        });
    }
    (controller, reference)
}

#[test]
fn a_scripted_lab_controller_with_integer_ids_is_followed_by_hashvote_peers() {
    let mut room = Room::start("int");
    // The scripted controller's vote and id are the largest 32-bit values, so it wins for sure;
    // the other script votes at random, as the lab does.
    let top = Value::from(u32::MAX);
    let controller = Script::start(room.port, &room.prefix, top.clone(), top.clone(), Mine::All);
    let slow = Script::start(room.port, &room.prefix, json!(77), json!(rand::random::<u32>()), Mine::OddOnly);
    room.add_peers(3, &[]);
    let (elected, results) = check_agreement(&room, &[&controller, &slow]);
    assert_eq!(elected, u32::MAX.to_string());
    // The slow script skips even transactions: hashvote peers won them, and the scripted
    // controller accepted their solutions.
    let ours = room.client_ids();
    for tx in (0..BLOCKS).filter(|tx| tx % 2 == 0) {
        assert!(ours.contains(&results[&tx].0), "tx {tx} won by {:?}, not a hashvote peer {ours:?}", results[&tx]);
    }
}

#[test]
fn a_hashvote_controller_with_string_ids_is_followed_by_scripted_lab_miners() {
    let mut room = Room::start("str");
    // UUID-like ids and votes, as the seed's client; "0" loses to any vote a hashvote peer makes.
    let a =
        Script::start(room.port, &room.prefix, json!("5f0c2a1e-0000-4000-8000-00000000000a"), json!("0"), Mine::All);
    let b =
        Script::start(room.port, &room.prefix, json!("9b7d4e2f-0000-4000-8000-00000000000b"), json!("0"), Mine::All);
    room.add_peers(3, &["--difficulty", "12"]);
    let (elected, _) = check_agreement(&room, &[&a, &b]);
    assert!(room.client_ids().contains(&elected), "controller {elected} is not a hashvote peer");
    // The controller issued every challenge at the configured difficulty, and judged the
    // scripted miners' solutions.
    a.seen(|seen| assert!(seen.challenges.values().take(BLOCKS as usize).all(|&d| d == 12), "{seen:?}"));
    for script in [&a, &b] {
        wait_until(Duration::from_secs(30), "a verdict on a scripted miner's solution", || {
            script.seen(|s| s.judged > 0)
        });
    }
}

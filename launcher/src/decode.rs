//! `launcher decode`: turns a room's raw MQTT traffic into JSON lines, so any MQTT client can
//! follow a room. It reads `TOPIC HEX` lines, as printed by
//! `mosquitto_sub -t 'sd/#' -F '%t %x'`, and prints one JSON object per line: the topic and the
//! decoded message or status, or the reason it was dropped.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use peer::protocol::Topics;

use crate::cli::DecodeArgs;
use crate::observe;
use crate::view::Observed;

/// Decodes one `TOPIC HEX` line into a JSON value.
pub fn line(topics: &Topics, prefix: &str, input: &str) -> serde_json::Value {
    let (topic, hex) = input.trim_end().split_once(' ').unwrap_or((input.trim_end(), ""));
    let decoded =
        hex::decode(hex).map_err(|_| "not_hex").and_then(|payload| observe::decode(topics, prefix, topic, &payload));
    match decoded {
        Ok(Observed::Message(envelope)) => serde_json::json!({ "topic": topic, "message": envelope }),
        Ok(Observed::Status(status)) => serde_json::json!({ "topic": topic, "status": status }),
        Err(reason) => serde_json::json!({ "topic": topic, "dropped": reason }),
    }
}

/// Runs `launcher decode` over stdin until it ends.
pub fn main(args: DecodeArgs) -> ExitCode {
    let topics = Topics::new(&args.prefix);
    let mut out = std::io::stdout().lock();
    for input in std::io::stdin().lock().lines() {
        let Ok(input) = input else { break };
        if input.trim().is_empty() {
            continue;
        }
        if writeln!(out, "{}", line(&topics, &args.prefix, &input)).and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use hashvote_core::room::{Envelope, Msg, encode};

    #[test]
    fn mosquitto_sub_lines_become_json() {
        let topics = Topics::new("sd");
        let leave = hex::encode(encode(&Envelope::new(7, Msg::Leave { incarnation: 1 })));
        let v = line(&topics, "sd", &format!("sd/init {leave}\n"));
        assert_eq!(v["message"]["from"], 7, "{v}");
        assert_eq!(line(&topics, "sd", "sd/init zz")["dropped"], "not_hex");
        assert_eq!(line(&topics, "sd", &format!("sd/voting {leave}"))["dropped"], "wrong_topic");
    }
}

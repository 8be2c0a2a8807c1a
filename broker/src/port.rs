//! Free TCP ports on 127.0.0.1, for the brokers that the launcher and the tests start.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether `port` on 127.0.0.1 can be bound now; the reason if not.
pub fn check(port: u16) -> std::io::Result<()> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map(drop)
}

/// A port nobody listens on right now, below the kernel's ephemeral range: no outgoing
/// connection (a peer reconnecting, say) and no ephemeral bind can be given it while a broker is
/// down for a restart. Successive calls in one process walk the range from a random start with a
/// prime stride, so two tests starting brokers at once are not given one port. An ephemeral port
/// if the range below is too small or full.
pub fn pick() -> std::io::Result<u16> {
    // The start is drawn once per process: a start drawn per call (as before) gave two of 50
    // calls one port about one run in twenty.
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u32>().ok()))
        .unwrap_or(32_768);
    if high > LOW + 1_000 {
        let start = *START.get_or_init(rand::random);
        for _ in 0..1_000 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = LOW + start.wrapping_add(n.wrapping_mul(7_919)) % (high - LOW);
            let port = u16::try_from(port).expect("below the ephemeral range");
            if check(port).is_ok() {
                return Ok(port);
            }
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr().map(|a| a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_ports_are_free_and_differ() {
        // Each call once drew its own random start, and 50 calls shared a port about one run
        // in twenty (a CI run caught it); 2,000 calls did almost always.
        let ports: std::collections::BTreeSet<u16> = (0..2_000).map(|_| pick().expect("a free port")).collect();
        assert_eq!(ports.len(), 2_000, "ports picked twice");
        for port in ports {
            check(port).expect("still free");
        }
    }
}

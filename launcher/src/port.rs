//! Free TCP ports on 127.0.0.1, for the brokers the launcher starts.

use std::net::{Ipv4Addr, TcpListener};

/// Whether `port` on 127.0.0.1 can be bound now; the reason if not.
pub(crate) fn check(port: u16) -> std::io::Result<()> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map(drop)
}

/// A free port below the kernel's ephemeral range, so that no outgoing connection (a peer
/// reconnecting, say) can be given it while a broker is down for a restart; an ephemeral port
/// if none is found.
pub(crate) fn pick() -> std::io::Result<u16> {
    use rand::Rng;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u16>().ok()))
        .unwrap_or(32768);
    let mut rng = rand::rng();
    if low > 10_001 {
        for _ in 0..100 {
            let port = rng.random_range(10_000..low);
            if check(port).is_ok() {
                return Ok(port);
            }
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr().map(|a| a.port())
}

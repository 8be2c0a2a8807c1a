//! The event stream: one JSON object per line describing what a peer does.
//!
//! The events themselves, the line format ([`Record`]) and [`describe`] are the core's
//! ([`hashvote_core::events`], re-exported here); this module stamps each event with the time and
//! writes it.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

pub use hashvote_core::events::{Event, Record, describe};

use crate::protocol::PeerId;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Writes records as JSON lines, flushing each so readers see them at once, or, between
/// [`EventSink::hold`] and [`EventSink::release`], flushing them together: a sync reply of 256
/// blocks gives 512 events, one write (and one wake-up of the reader) instead of 512.
pub struct EventSink {
    peer: PeerId,
    out: Option<Box<dyn Write + Send>>,
    held: bool,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink").field("peer", &self.peer).field("enabled", &self.out.is_some()).finish()
    }
}

impl EventSink {
    /// A sink writing to `out`, or discarding events when `None`.
    pub fn new(peer: PeerId, out: Option<Box<dyn Write + Send>>) -> Self {
        Self { peer, out, held: false }
    }

    /// Holds back the flush of the events emitted from now until [`EventSink::release`].
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// Flushes the events held since [`EventSink::hold`].
    pub fn release(&mut self) {
        self.held = false;
        self.flush();
    }

    /// Writes out what is held so far (before the loop awaits: a peer killed meanwhile must not
    /// have on disk what its events never said).
    pub fn flush(&mut self) {
        if let Some(out) = self.out.as_mut()
            && let Err(e) = out.flush()
        {
            self.closed(&e);
        }
    }

    fn closed(&mut self, e: &std::io::Error) {
        tracing::warn!(error = %e, "event stream closed; events are no longer written");
        self.out = None;
    }

    /// Writes one event. A failing sink (a closed pipe) is disabled with one warning, never fatal:
    /// the peer's work matters more than its log.
    pub fn emit(&mut self, event: Event) {
        let Some(out) = self.out.as_mut() else { return };
        let record = Record { ts_ms: now_ms(), peer: self.peer, event };
        let mut line = serde_json::to_vec(&record).expect("events serialize");
        line.push(b'\n');
        if let Err(e) = out.write_all(&line) {
            self.closed(&e);
        } else if !self.held {
            self.flush();
        }
    }
}

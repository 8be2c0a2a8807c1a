//! The terminal while the dashboard shows: raw mode on the alternate screen, keys read on a
//! thread of their own, and the terminal restored however the launcher leaves (return, error or
//! panic).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ratatui::DefaultTerminal;
use ratatui::crossterm::event::{self, Event, KeyEvent, KeyEventKind};
use tokio::sync::mpsc;

use crate::dashboard::{self, Ui};
use crate::view::RoomView;

/// How often the key thread looks at its stop flag.
const KEY_POLL: Duration = Duration::from_millis(50);

/// The dashboard's terminal; restored when dropped.
pub struct Screen {
    terminal: DefaultTerminal,
    stop_keys: Arc<AtomicBool>,
    keys: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Screen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Screen").finish_non_exhaustive()
    }
}

impl Screen {
    /// Takes over the terminal and starts reading keys, which arrive on the returned channel.
    pub fn start() -> std::io::Result<(Self, mpsc::UnboundedReceiver<KeyEvent>)> {
        // `try_init` also installs a panic hook that restores the terminal before the message.
        let terminal = ratatui::try_init()?;
        let stop_keys = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = Arc::clone(&stop_keys);
        let keys = std::thread::Builder::new().name("keys".into()).spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match event::poll(KEY_POLL) {
                    Ok(false) => {}
                    Ok(true) => match event::read() {
                        Ok(Event::Key(key)) if key.kind == KeyEventKind::Press => {
                            if tx.send(key).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    },
                    Err(_) => break,
                }
            }
        });
        let keys = match keys {
            Ok(handle) => handle,
            Err(e) => {
                ratatui::restore();
                return Err(e);
            }
        };
        Ok((Self { terminal, stop_keys, keys: Some(keys) }, rx))
    }

    /// Draws the dashboard.
    pub fn draw(&mut self, view: &RoomView, ui: &Ui, now_ms: u64) -> std::io::Result<()> {
        self.terminal.draw(|frame| dashboard::draw(frame, view, ui, now_ms)).map(|_| ())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.stop_keys.store(true, Ordering::Release);
        if let Some(keys) = self.keys.take() {
            let _ = keys.join();
        }
        ratatui::restore();
    }
}

/// True if the key is Ctrl-C, which raw mode delivers as a key instead of a signal.
pub fn is_interrupt(key: &KeyEvent) -> bool {
    use ratatui::crossterm::event::{KeyCode, KeyModifiers};
    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL)
}

/// The next key pressed while the dashboard shows; pending for ever without one.
pub(crate) async fn next_key(keys: &mut Option<mpsc::UnboundedReceiver<KeyEvent>>) -> Option<KeyEvent> {
    match keys {
        Some(keys) => keys.recv().await,
        None => std::future::pending().await,
    }
}

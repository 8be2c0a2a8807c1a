//! The dashboard: one frame of the room drawn with ratatui from a [`RoomView`], and the keys it
//! understands. Pure: the terminal loop owns the terminal, the clock and the processes, and asks
//! this module what to draw and what a key means.

use std::collections::BTreeSet;

use peer::protocol::{Outcome, PeerId};
use peer::status::Role;
use ratatui::Frame;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState};

use crate::view::{Presence, RoomView, solve_ms};

/// What the dashboard shows besides the room: its title, the selection and the peers the user
/// paused. The terminal loop owns it and changes it on [`Command`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ui {
    /// The room's title, shown in the header.
    pub title: String,
    /// The broker's address, shown in the header.
    pub broker: String,
    /// How many peers the room should have, if known.
    pub expected: Option<usize>,
    /// Index of the selected row of the peer table (clamped when drawn).
    pub selected: usize,
    /// Peers the user paused.
    pub paused: BTreeSet<PeerId>,
    /// Show the keys in the footer.
    pub show_keys: bool,
    /// A one-line message for the footer (e.g. "paused 1234"), shown instead of nothing.
    pub message: Option<String>,
}

impl Ui {
    /// A dashboard for `title` on `broker`, expecting `expected` peers if known.
    pub fn new(title: impl Into<String>, broker: impl Into<String>, expected: Option<usize>) -> Self {
        Self { title: title.into(), broker: broker.into(), expected, show_keys: true, ..Self::default() }
    }

    /// The id of the selected peer, if there is any peer.
    pub fn selected_peer(&self, view: &RoomView) -> Option<PeerId> {
        let count = view.peers().len();
        view.peers().nth(self.selected.min(count.checked_sub(1)?)).map(|p| p.id)
    }

    /// Moves the selection one row up.
    pub fn up(&mut self, view: &RoomView) {
        self.selected = self.clamped(view).saturating_sub(1);
    }

    /// Moves the selection one row down.
    pub fn down(&mut self, view: &RoomView) {
        let last = view.peers().len().saturating_sub(1);
        self.selected = (self.clamped(view) + 1).min(last);
    }

    fn clamped(&self, view: &RoomView) -> usize {
        self.selected.min(view.peers().len().saturating_sub(1))
    }
}

/// What a key asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Leave the dashboard (`q`, Esc, Ctrl-C).
    Quit,
    /// Kill the current controller's process (`k`).
    KillController,
    /// Pause or resume the selected peer (`p`).
    TogglePause(PeerId),
    /// Select the row above (↑).
    Up,
    /// Select the row below (↓).
    Down,
    /// Nothing.
    None,
}

/// What `key` asks for, given the room and the selection.
pub fn command(key: KeyEvent, view: &RoomView, ui: &Ui) -> Command {
    if key.kind == KeyEventKind::Release {
        return Command::None;
    }
    match key.code {
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Command::Quit,
        KeyCode::Char('q') | KeyCode::Esc => Command::Quit,
        KeyCode::Char('k') => Command::KillController,
        KeyCode::Char('p') => ui.selected_peer(view).map_or(Command::None, Command::TogglePause),
        KeyCode::Up => Command::Up,
        KeyCode::Down => Command::Down,
        _ => Command::None,
    }
}

/// The keys, as shown in the footer.
pub const KEYS: &str = "q quit · k kill controller · p pause/resume selected · ↑/↓ select";

/// A hash rate with a unit: `950 H/s`, `12.3 kH/s`, `12.3 MH/s`, `1.2 GH/s`.
pub fn format_rate(hashes_per_s: u64) -> String {
    let h = hashes_per_s as f64;
    match hashes_per_s {
        0..1_000 => format!("{hashes_per_s} H/s"),
        1_000..1_000_000 => format!("{:.1} kH/s", h / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MH/s", h / 1e6),
        _ => format!("{:.1} GH/s", h / 1e9),
    }
}

/// A duration in ms, as `812 ms` or `3.4 s`.
pub fn format_ms(ms: u64) -> String {
    if ms < 10_000 { format!("{ms} ms") } else { format!("{:.1} s", ms as f64 / 1000.0) }
}

/// Draws the whole dashboard on `frame`; any size works, down to nothing.
pub fn draw(frame: &mut Frame, view: &RoomView, ui: &Ui, now_ms: u64) {
    let [header, body, footer] =
        Layout::vertical([Constraint::Length(3), Constraint::Min(0), Constraint::Length(1)]).areas(frame.area());
    draw_header(frame, header, view, ui, now_ms);
    let [left, right] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(body);
    draw_peers(frame, left, view, ui, now_ms);
    let [challenge, tip, results, elections] =
        Layout::vertical([Constraint::Length(3), Constraint::Length(3), Constraint::Min(3), Constraint::Min(3)])
            .areas(right);
    draw_challenge(frame, challenge, view, now_ms);
    draw_tip(frame, tip, view);
    draw_results(frame, results, view);
    draw_elections(frame, elections, view);
    let text = match (&ui.message, ui.show_keys) {
        (Some(m), _) => m.clone(),
        (None, true) => KEYS.to_string(),
        (None, false) => String::new(),
    };
    frame.render_widget(Paragraph::new(text).style(Style::new().fg(Color::DarkGray)), footer);
}

fn title(text: &str) -> Block<'_> {
    Block::bordered().title(Span::styled(format!(" {text} "), Style::new().add_modifier(Modifier::BOLD)))
}

fn draw_header(frame: &mut Frame, area: Rect, view: &RoomView, ui: &Ui, now_ms: u64) {
    let online = view.online(now_ms);
    let peers = match ui.expected {
        Some(n) => format!("peers {online}/{n} online"),
        None => format!("peers {online}/{} online", view.peers().len()),
    };
    let waiting = view.peers().filter(|p| p.presence(now_ms) != Presence::Offline).find_map(|p| p.waiting());
    let controller = match (view.electing(), view.controller(), waiting) {
        // The minority side of a split (or a room that lost its quorum) says why nothing happens.
        (_, _, Some(w)) => w.to_string(),
        (Some(t), _, None) => format!("electing term {t}"),
        (None, Some((_, id)), None) => format!("controller {id}"),
        (None, None, None) => "no controller".to_string(),
    };
    let line = Line::from(vec![
        Span::raw(format!("broker {} · {peers} · term {} · ", ui.broker, view.term())),
        Span::styled(controller, Style::new().fg(Color::Yellow)),
        Span::raw(format!(" · height {}", view.height())),
    ]);
    frame.render_widget(Paragraph::new(line).block(title(&ui.title)), area);
}

fn draw_peers(frame: &mut Frame, area: Rect, view: &RoomView, ui: &Ui, now_ms: u64) {
    let controller = view.controller().map(|(_, id)| id);
    let rows = view.peers().map(|p| {
        let presence = p.presence(now_ms);
        let role = match (p.role(), p.waiting()) {
            // Without a quorum: how far from one.
            (_, Some(w)) => format!("quorum {}/{}", w.reachable, w.needed),
            (Some(role), None) => role.as_str().to_string(),
            // Known only from its messages.
            (None, None) if controller == Some(p.id) => Role::Controller.as_str().to_string(),
            (None, None) => "?".to_string(),
        };
        let state =
            if ui.paused.contains(&p.id) && presence != Presence::Offline { "paused" } else { presence.as_str() };
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        let style = match presence {
            Presence::Offline => Style::new().fg(Color::DarkGray),
            Presence::Silent => Style::new().fg(Color::Red),
            Presence::Online if controller == Some(p.id) => Style::new().fg(Color::Yellow),
            Presence::Online => Style::new(),
        };
        Row::new([
            p.id.to_string(),
            role,
            opt(p.term),
            state.to_string(),
            p.hash_rate().filter(|_| presence != Presence::Offline).map_or_else(|| "-".to_string(), format_rate),
            view.blocks_won(p.id).to_string(),
            opt(p.height),
        ])
        .style(style)
    });
    let widths = [
        Constraint::Length(10),
        Constraint::Length(12),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Length(11),
        Constraint::Length(4),
        Constraint::Length(6),
    ];
    let header = Row::new(["id", "role", "term", "state", "hash rate", "won", "height"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let table = Table::new(rows, widths)
        .header(header)
        .block(title("peers"))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let count = view.peers().len();
    let mut state = TableState::default().with_selected(count.checked_sub(1).map(|last| ui.selected.min(last)));
    frame.render_stateful_widget(table, area, &mut state);
}

fn draw_challenge(frame: &mut Frame, area: Rect, view: &RoomView, now_ms: u64) {
    let text = match view.open_challenge() {
        Some(open) => {
            let c = &open.challenge;
            format!(
                "tx {} · difficulty {} · term {} · open {}",
                c.tx,
                c.difficulty,
                c.term,
                format_ms(open.elapsed_ms(now_ms))
            )
        }
        None => "none open".to_string(),
    };
    frame.render_widget(Paragraph::new(text).block(title("challenge")), area);
}

fn draw_tip(frame: &mut Frame, area: Rect, view: &RoomView) {
    let text = match view.tip() {
        Some(b) => {
            let hex = b.hash.to_hex();
            let mut text =
                format!("height {} · {}… · won by {}", view.height(), hex.get(..12).unwrap_or(&hex), b.miner);
            if view.replaced() > 0 {
                text.push_str(&format!(" · {} replaced", view.replaced()));
            }
            text
        }
        None => "no block yet".to_string(),
    };
    frame.render_widget(Paragraph::new(text).block(title("chain")), area);
}

fn draw_results(frame: &mut Frame, area: Rect, view: &RoomView) {
    let rows = view.results().rev().map(|r| match r.outcome {
        Outcome::Accepted(b) => {
            Row::new([b.tx.to_string(), b.miner.to_string(), format_ms(solve_ms(&b)), format!("d{}", b.difficulty)])
        }
        Outcome::Rejected { tx, miner, reason, .. } => {
            Row::new([tx.to_string(), miner.to_string(), "rejected".to_string(), reason.as_str().to_string()])
                .style(Style::new().fg(Color::DarkGray))
        }
    });
    let widths = [Constraint::Length(6), Constraint::Length(10), Constraint::Length(9), Constraint::Min(4)];
    let header = Row::new(["tx", "winner", "solve", "diff"]).style(Style::new().add_modifier(Modifier::BOLD));
    frame.render_widget(Table::new(rows, widths).header(header).block(title("results")), area);
}

fn draw_elections(frame: &mut Frame, area: Rect, view: &RoomView) {
    let opt_ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), format_ms);
    let rows = view.elections().rev().map(|e| {
        Row::new([
            e.term.to_string(),
            e.winner.map_or_else(|| "-".to_string(), |w| w.to_string()),
            opt_ms(e.duration_ms()),
            if e.failover.is_some() { opt_ms(e.failover_ms()) } else { String::new() },
        ])
    });
    let widths = [Constraint::Length(6), Constraint::Length(10), Constraint::Length(9), Constraint::Min(8)];
    let header = Row::new(["term", "winner", "election", "failover"]).style(Style::new().add_modifier(Modifier::BOLD));
    frame.render_widget(Table::new(rows, widths).header(header).block(title("elections")), area);
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use ratatui::buffer::Buffer;
    use ratatui::crossterm::event::KeyEventState;

    use super::*;
    use crate::view::script::{self, A, B, C};

    fn render(view: &RoomView, ui: &Ui, width: u16, height: u16, now_ms: u64) -> Buffer {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, view, ui, now_ms)).unwrap();
        terminal.backend().buffer().clone()
    }

    fn lines(buf: &Buffer) -> Vec<String> {
        let area = buf.area;
        (0..area.height).map(|y| (0..area.width).map(|x| buf[(x, y)].symbol()).collect::<String>()).collect()
    }

    fn line_with<'a>(lines: &'a [String], needle: &str) -> &'a str {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{}", lines.join("\n")))
    }

    fn ui() -> Ui {
        Ui::new("hashvote room", "127.0.0.1:1883", Some(3))
    }

    #[test]
    fn the_scripted_room_is_drawn() {
        let view = script::room_view();
        let mut ui = ui();
        ui.paused.insert(A);
        let buf = render(&view, &ui, 120, 30, 4_000);
        let lines = lines(&buf);
        let all = lines.join("\n");
        assert!(all.contains("hashvote room"), "{all}");
        assert!(all.contains("peers 2/3 online · term 2 · controller 3333 · height 3"), "{all}");

        let c = line_with(&lines, "3333 ");
        assert!(c.contains("controller"), "{c}");
        let a = line_with(&lines, "1111 ");
        assert!(a.contains("paused") && a.contains("12.5 MH/s") && a.contains("miner"), "{a}");
        let b = line_with(&lines, "2222 ");
        assert!(b.contains("offline"), "{b}");

        // Results (newest first) and elections, with durations.
        assert!(line_with(&lines, "1000 ms").contains("d21"));
        let term1 = lines.iter().find(|l| l.contains("30 ms")).expect("term 1's election");
        assert!(term1.contains(&B.to_string()), "{term1}");
        let term2 = line_with(&lines, "400 ms");
        assert!(term2.contains("150 ms") && term2.contains(&C.to_string()), "{term2}");
        assert!(all.contains("none open"), "{all}");
        assert!(all.contains("won by 1111"), "{all}");
        assert!(all.contains(KEYS), "{all}");

        // The selected row (the first, A) is highlighted, and only it.
        let y = lines.iter().position(|l| l.contains("1111 ")).unwrap();
        let x = lines[y][..lines[y].find("1111").unwrap()].chars().count() as u16;
        let y = y as u16;
        assert!(buf[(x, y)].modifier.contains(Modifier::REVERSED));
        let y3 = lines.iter().position(|l| l.contains("3333 ")).unwrap() as u16;
        assert!(!buf[(x, y3)].modifier.contains(Modifier::REVERSED));
    }

    #[test]
    fn a_peer_without_a_quorum_says_so_in_the_header_and_its_row() {
        let mut view = RoomView::new();
        let waiting = peer::status::Waiting { reachable: 2, needed: 4, voters: 6 };
        let crate::view::Observed::Status(s) = script::status(A, Role::Electing, 3, None, 0) else { unreachable!() };
        let told =
            view.observe(1_000, crate::view::Observed::Status(peer::status::Status { waiting: Some(waiting), ..s }));
        assert!(told.iter().any(|h| h.to_string() == format!("peer {A}: {waiting}")), "{told:?}");
        let lines = lines(&render(&view, &ui(), 120, 30, 1_500));
        let all = lines.join("\n");
        assert!(all.contains("waiting for a quorum: 2 of 4 needed reachable (6 voters)"), "{all}");
        assert!(line_with(&lines, "1111 ").contains("quorum 2/4"), "{all}");
    }

    #[test]
    fn an_open_challenge_shows_its_age() {
        let mut view = RoomView::new();
        view.observe(1_000, script::challenge(B, 1, 7, 22, 0));
        let lines = lines(&render(&view, &ui(), 120, 30, 4_500));
        let all = lines.join("\n");
        assert!(all.contains("tx 7 · difficulty 22 · term 1 · open 3500 ms"), "{all}");
        // B is known only from its challenge, yet shown as the controller.
        assert!(line_with(&lines, "2222 ").contains("controller"));
    }

    #[test]
    fn tiny_and_empty_terminals_do_not_panic() {
        let view = script::room_view();
        for (w, h) in [(20, 5), (1, 1), (0, 0), (5, 40), (200, 2), (40, 12)] {
            render(&view, &ui(), w, h, 4_000);
            render(&RoomView::new(), &Ui::default(), w, h, 0);
        }
    }

    proptest::proptest! {
        #[test]
        fn any_room_draws_at_any_size(
            script in proptest::collection::vec(script::any_observed(), 0..60),
            width in 0u16..100, height in 0u16..30, selected in 0usize..10,
        ) {
            let mut view = RoomView::new();
            for (at, seen) in script {
                view.observe(at, seen);
            }
            let mut ui = ui();
            ui.selected = selected;
            ui.paused.extend([1, 2]);
            render(&view, &ui, width, height, view.now_ms());
        }
    }

    #[test]
    fn rates_and_durations_are_readable() {
        assert_eq!(format_rate(950), "950 H/s");
        assert_eq!(format_rate(12_345), "12.3 kH/s");
        assert_eq!(format_rate(12_300_000), "12.3 MH/s");
        assert_eq!(format_rate(u64::MAX), "18446744073.7 GH/s");
        assert_eq!(format_ms(812), "812 ms");
        assert_eq!(format_ms(12_345), "12.3 s");
    }

    #[test]
    fn keys_map_to_commands_and_the_selection_stays_in_range() {
        let view = script::room_view();
        let mut ui = ui();
        let key = |code| KeyEvent::new(code, KeyModifiers::NONE);
        assert_eq!(command(key(KeyCode::Char('q')), &view, &ui), Command::Quit);
        assert_eq!(command(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL), &view, &ui), Command::Quit);
        assert_eq!(command(key(KeyCode::Char('k')), &view, &ui), Command::KillController);
        assert_eq!(command(key(KeyCode::Up), &view, &ui), Command::Up);
        assert_eq!(command(key(KeyCode::Down), &view, &ui), Command::Down);
        assert_eq!(command(key(KeyCode::Char('x')), &view, &ui), Command::None);
        let release = KeyEvent {
            code: KeyCode::Char('q'),
            modifiers: KeyModifiers::NONE,
            kind: KeyEventKind::Release,
            state: KeyEventState::NONE,
        };
        assert_eq!(command(release, &view, &ui), Command::None);

        assert_eq!(command(key(KeyCode::Char('p')), &view, &ui), Command::TogglePause(A));
        ui.down(&view);
        ui.down(&view);
        ui.down(&view);
        assert_eq!(ui.selected_peer(&view), Some(C));
        ui.up(&view);
        assert_eq!(command(key(KeyCode::Char('p')), &view, &ui), Command::TogglePause(B));
        ui.selected = 99;
        assert_eq!(ui.selected_peer(&view), Some(C));
        ui.up(&view);
        assert_eq!(ui.selected_peer(&view), Some(B));
        assert_eq!(command(key(KeyCode::Char('p')), &RoomView::new(), &ui), Command::None);
        assert_eq!(ui.selected_peer(&RoomView::new()), None);
    }
}

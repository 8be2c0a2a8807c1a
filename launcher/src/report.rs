//! The report of a run: three SVG plots drawn with plotters (solve time per block, hash rate per
//! peer, election and failover durations per term) and a self-contained `index.html` with the
//! plots inlined, a summary and the chain, one row per block. Built from a [`RoomView`] alone.
//!
//! Empty data still gives valid files, each saying "no data", so a run stopped early has a report.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::dashboard::{format_ms, format_rate};
use crate::view::{RoomView, solve_ms};

/// The size of each plot, in SVG pixels.
const PLOT_SIZE: (u32, u32) = (900, 420);
/// Most points drawn per series; longer series are thinned evenly (the HTML table keeps all).
const MAX_POINTS: usize = 4_000;

/// What [`write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSummary {
    /// Every file written: the plots, then `index.html`.
    pub files: Vec<PathBuf>,
    /// Blocks in the chain table.
    pub blocks: usize,
    /// Plots drawn (with data or saying "no data").
    pub plots: usize,
}

/// Writes the report of `view` into `dir` (created if needed), titled `title`.
pub fn write(dir: &Path, view: &RoomView, title: &str) -> anyhow::Result<ReportSummary> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the report directory {}", dir.display()))?;
    let plots = [
        ("solve_time.svg", "Solve time per block", solve_time(view).context("cannot draw the solve-time plot")?),
        ("hash_rate.svg", "Hash rate per peer", hash_rate(view).context("cannot draw the hash-rate plot")?),
        ("elections.svg", "Elections and failovers", elections(view).context("cannot draw the elections plot")?),
    ];
    let mut files = Vec::new();
    for (name, _, svg) in &plots {
        files.push(write_file(dir, name, svg)?);
    }
    let html = page(view, title, &plots);
    files.push(write_file(dir, "index.html", &html)?);
    Ok(ReportSummary { files, blocks: view.chain().len(), plots: plots.len() })
}

/// Writes the report and says where it is.
pub(crate) fn save(dir: &Path, view: &RoomView, title: &str) -> anyhow::Result<()> {
    let summary = write(dir, view, title).with_context(|| format!("cannot write the report to {}", dir.display()))?;
    println!("report: {} ({} blocks, {} plots)", dir.join("index.html").display(), summary.blocks, summary.plots);
    Ok(())
}

fn write_file(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Every `stride`-th item so that at most [`MAX_POINTS`] remain.
fn thin<T: Copy>(items: &[T]) -> impl Iterator<Item = T> + Clone + '_ {
    let stride = items.len().div_ceil(MAX_POINTS).max(1);
    items.iter().step_by(stride).copied()
}

/// A range over `values` that plotters can draw: never empty, never reversed.
fn span(values: impl Iterator<Item = f64>, from_zero: bool) -> Range<f64> {
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    let pad = ((hi - lo) * 0.05).max(1.0);
    (if from_zero { lo } else { lo - pad })..(hi + pad)
}

/// `x` if it is a whole number: tick labels only for ticks that fall on a block or a term.
fn whole(x: f64) -> Option<f64> {
    ((x - x.round()).abs() < 1e-6).then(|| x.round())
}

/// Draws into an SVG string.
fn svg(draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> anyhow::Result<()>) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    Ok(out)
}

/// A chart captioned `caption`, with room for the axes' labels.
fn chart<'a, 'b>(root: &'a DrawingArea<SVGBackend<'b>, Shift>, caption: &str) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder.caption(caption, ("sans-serif", 20)).margin(10).x_label_area_size(40).y_label_area_size(70);
    builder
}

fn no_data(root: &DrawingArea<SVGBackend, Shift>, caption: &str) -> anyhow::Result<()> {
    let (w, h) = PLOT_SIZE;
    let style = ("sans-serif", 22).into_font().color(&BLACK);
    root.draw(&Text::new(caption.to_string(), (20, 20), style.clone()))?;
    let centre = ("sans-serif", 28).into_font().color(&BLACK.mix(0.5)).pos(Pos::new(HPos::Center, VPos::Center));
    root.draw(&Text::new("no data", (w as i32 / 2, h as i32 / 2), centre))?;
    Ok(())
}

fn solve_time(view: &RoomView) -> anyhow::Result<String> {
    const CAPTION: &str = "Solve time per block (ms), difficulty on the right";
    let points: Vec<(f64, f64, f64)> =
        view.chain().map(|b| (b.tx as f64, solve_ms(b) as f64, f64::from(b.difficulty))).collect();
    svg(|root| {
        if points.is_empty() {
            return no_data(root, CAPTION);
        }
        let xs = span(points.iter().map(|p| p.0), false);
        let ys = span(points.iter().map(|p| p.1), true);
        let ds = span(points.iter().map(|p| p.2), true);
        let mut chart = chart(root, CAPTION)
            .right_y_label_area_size(50)
            .build_cartesian_2d(xs.clone(), ys)?
            .set_secondary_coord(xs, ds);
        chart
            .configure_mesh()
            .x_desc("block (tx)")
            .y_desc("solve time (ms)")
            .x_label_formatter(&|x| whole(*x).map_or_else(String::new, |x| format!("{x:.0}")))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        chart.configure_secondary_axes().y_desc("difficulty (bits)").draw()?;
        let solve = thin(&points).map(|p| (p.0, p.1));
        chart
            .draw_series(LineSeries::new(solve.clone(), BLUE.stroke_width(2)))?
            .label("solve time")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart.draw_series(solve.map(|p| Circle::new(p, 3, BLUE.filled())))?;
        chart
            .draw_secondary_series(LineSeries::new(thin(&points).map(|p| (p.0, p.2)), RED.stroke_width(1)))?
            .label("difficulty")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        Ok(())
    })
}

fn hash_rate(view: &RoomView) -> anyhow::Result<String> {
    const CAPTION: &str = "Hash rate per peer (MH/s) over time (s)";
    let start = view.peers().filter_map(|p| p.samples.front().map(|s| s.0)).min().unwrap_or(0);
    let series: Vec<(u32, Vec<(f64, f64)>)> = view
        .peers()
        .filter(|p| !p.samples.is_empty())
        .map(|p| {
            let points =
                p.samples.iter().map(|&(at, rate)| (at.saturating_sub(start) as f64 / 1000.0, rate as f64 / 1e6));
            (p.id, points.collect())
        })
        .collect();
    svg(|root| {
        if series.is_empty() {
            return no_data(root, CAPTION);
        }
        let xs = span(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)), true);
        let ys = span(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)), true);
        let mut chart = chart(root, CAPTION).build_cartesian_2d(xs, ys)?;
        chart.configure_mesh().x_desc("time since the first status (s)").y_desc("MH/s").draw()?;
        for (i, (id, points)) in series.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(thin(points), colour.stroke_width(2)))?
                .label(format!("peer {id}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        Ok(())
    })
}

fn elections(view: &RoomView) -> anyhow::Result<String> {
    const CAPTION: &str = "Election and failover duration per term (ms)";
    // By position rather than by term: terms may be far apart (or made up and huge).
    let bars: Vec<(u64, Option<u64>, Option<u64>)> =
        view.elections().map(|e| (e.term, e.duration_ms(), e.failover_ms())).collect();
    svg(|root| {
        if bars.iter().all(|b| b.1.is_none() && b.2.is_none()) {
            return no_data(root, CAPTION);
        }
        let ys = span(bars.iter().flat_map(|b| [b.1, b.2]).flatten().map(|v| v as f64), true);
        // Elections on one machine take a few ms or less: at least 10 ms of axis, so the
        // labels stay distinct and a 0 ms bar reads as one.
        let ys = ys.start..ys.end.max(10.0);
        let xs = -0.5..(bars.len() as f64 - 0.5);
        let terms: Vec<u64> = bars.iter().map(|b| b.0).collect();
        let label = |x: &f64| {
            let term = whole(*x).filter(|i| *i >= 0.0).and_then(|i| terms.get(i as usize));
            term.map_or_else(String::new, |t| format!("term {t}"))
        };
        let mut chart = chart(root, CAPTION).build_cartesian_2d(xs, ys)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len().min(30) * 2 + 1)
            .x_label_formatter(&label)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_desc("ms")
            .draw()?;
        let bar = |i: usize, left: bool, ms: Option<u64>, colour: RGBColor| {
            let x = i as f64;
            let (x0, x1) = if left { (x - 0.4, x) } else { (x, x + 0.4) };
            ms.map(|ms| Rectangle::new([(x0, 0.0), (x1, ms as f64)], colour.filled()))
        };
        chart
            .draw_series(bars.iter().enumerate().filter_map(|(i, b)| bar(i, true, b.1, BLUE)))?
            .label("election (first vote or controller lost → elected)")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], BLUE.filled()));
        chart
            .draw_series(bars.iter().enumerate().filter_map(|(i, b)| bar(i, false, b.2, RED)))?
            .label("failover (controller lost → first challenge)")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], RED.filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// `text` with `&`, `<`, `>`, `"` and `'` escaped for HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:1000px}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}\
th{background:#eee}code{font-family:monospace}.none{color:#888}";

fn page(view: &RoomView, title: &str, plots: &[(&str, &str, String)]) -> String {
    let mut h = String::new();
    let title = escape(title);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
    );
    summary(&mut h, view);
    peers(&mut h, view);
    controllers(&mut h, view);
    for (name, heading, svg) in plots {
        let _ = writeln!(h, "<h2>{}</h2>\n<figure id=\"{}\">", escape(heading), escape(name));
        // Inlined as it was drawn; the XML declaration, if any, has no place inside HTML.
        let body = svg.trim_start();
        let body = match body.strip_prefix("<?xml") {
            Some(rest) => rest.split_once("?>").map_or(rest, |(_, after)| after),
            None => body,
        };
        let _ = writeln!(h, "{}\n</figure>", body.trim());
    }
    chain(&mut h, view);
    let _ = writeln!(h, "</body>\n</html>");
    h
}

/// The page's summary: the chain, the peers, the terms.
fn summary(h: &mut String, view: &RoomView) {
    let _ = writeln!(h, "<h2>Summary</h2>\n<ul>");
    let _ =
        writeln!(h, "<li>blocks: {} (height {}, {} replaced)</li>", view.chain().len(), view.height(), view.replaced());
    if let Some(tip) = view.tip() {
        let _ = writeln!(h, "<li>tip: <code>{}</code> won by {}</li>", escape(&tip.hash.to_hex()), tip.miner);
    }
    let _ = writeln!(h, "<li>peers: {}</li>", view.peers().len());
    let _ = writeln!(
        h,
        "<li>terms with a known controller: {}</li>",
        view.elections().filter(|e| e.winner.is_some()).count()
    );
    if view.ignored() > 0 {
        let _ = writeln!(h, "<li>messages ignored (not from their term's controller): {}</li>", view.ignored());
    }
    let _ = writeln!(h, "</ul>");
}

/// The table of peers, as a reader wants it after the run: what each was, how fast it mined,
/// what it won, and whether it was still in the room at the end.
fn peers(h: &mut String, view: &RoomView) {
    let _ = writeln!(h, "<h2>Peers</h2>");
    if view.peers().len() == 0 {
        let _ = writeln!(h, "<p class=\"none\">no data</p>");
    } else {
        let _ = writeln!(
            h,
            "<table>\n<tr><th>peer</th><th>role</th><th>mean hash rate while mining</th><th>blocks won</th>\
             <th>in the room at the end</th></tr>"
        );
        for p in view.peers() {
            let role = p.last_role().or_else(|| p.role()).map_or("?", |r| r.as_str());
            let rate = p.mean_mining_rate().map_or_else(|| "-".to_string(), format_rate);
            let _ = writeln!(
                h,
                "<tr class=\"peer\"><td>{}</td><td>{role}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                p.id,
                escape(&rate),
                view.blocks_won(p.id),
                if view.in_room_at_end(p.id) { "yes" } else { "no" }
            );
        }
        let _ = writeln!(h, "</table>");
    }
}

/// The table of terms: controller, election and failover times.
fn controllers(h: &mut String, view: &RoomView) {
    let _ = writeln!(h, "<h2>Controllers</h2>");
    if view.elections().len() == 0 {
        let _ = writeln!(h, "<p class=\"none\">no data</p>");
    } else {
        let _ = writeln!(
            h,
            "<table>\n<tr><th>term</th><th>controller</th><th>election</th><th>failover</th><th>previous controller</th></tr>"
        );
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), format_ms);
        for e in view.elections() {
            let _ = writeln!(
                h,
                "<tr class=\"election\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e.term,
                e.winner.map_or_else(|| "-".to_string(), |w| w.to_string()),
                opt(e.duration_ms()),
                if e.failover.is_some() { opt(e.failover_ms()) } else { String::new() },
                e.failover.map_or_else(String::new, |f| f.previous.to_string()),
            );
        }
        let _ = writeln!(h, "</table>");
    }
}

/// The table of the chain, one row per block.
fn chain(h: &mut String, view: &RoomView) {
    let _ = writeln!(h, "<h2>Chain</h2>");
    if view.chain().len() == 0 {
        let _ = writeln!(h, "<p class=\"none\">no data: no block yet</p>");
    } else {
        let _ = writeln!(
            h,
            "<table>\n<tr><th>tx</th><th>term</th><th>difficulty</th><th>miner</th><th>solve ms</th><th>hash</th></tr>"
        );
        for b in view.chain() {
            let hex = b.hash.to_hex();
            let _ = writeln!(
                h,
                "<tr class=\"block\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                b.tx,
                b.term,
                b.difficulty,
                b.miner,
                solve_ms(b),
                escape(hex.get(..16).unwrap_or(&hex)),
            );
        }
        let _ = writeln!(h, "</table>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::script;

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn a_report_of_the_scripted_room() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested/report");
        let view = script::room_view();
        let summary = write(&out, &view, "room <7> & \"friends\"").unwrap();
        assert_eq!((summary.blocks, summary.plots, summary.files.len()), (3, 3, 4));
        for name in ["solve_time.svg", "hash_rate.svg", "elections.svg"] {
            let svg = read(&out.join(name));
            assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"), "{name}");
            assert!(!svg.contains("no data"), "{name}");
        }
        assert!(read(&out.join("hash_rate.svg")).contains("peer 1111"));
        assert!(read(&out.join("elections.svg")).contains("term 2"));
        let html = read(&out.join("index.html"));
        assert_eq!(html.matches("<svg").count(), 3);
        assert_eq!(html.matches("<tr class=\"block\">").count(), 3);
        assert_eq!(html.matches("<tr class=\"election\">").count(), 2);
        assert!(html.contains("<title>room &lt;7&gt; &amp; &quot;friends&quot;</title>"));
        assert!(!html.contains("<7>"));
        assert!(!html.contains("<?xml"));
        assert!(html.contains("400 ms"), "the failover");
    }

    #[test]
    fn an_empty_room_still_gives_a_report_saying_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let summary = write(dir.path(), &RoomView::new(), "empty").unwrap();
        assert_eq!((summary.blocks, summary.plots), (0, 3));
        for path in &summary.files[..3] {
            let svg = read(path);
            assert!(svg.contains("<svg") && svg.contains("no data"), "{}", path.display());
        }
        let html = read(&summary.files[3]);
        assert_eq!(html.matches("<svg").count(), 3);
        assert_eq!(html.matches("<tr class=\"block\">").count(), 0);
        assert!(html.contains("no block yet"));
    }

    #[test]
    fn one_block_and_hostile_numbers_draw() {
        use peer::status::Role;
        let mut view = RoomView::new();
        view.observe(0, script::status(2, Role::Controller, u64::MAX, Some(2), u64::MAX));
        view.observe(1, script::accepted(2, script::block(u64::MAX, u64::MAX, 3, 160, 0, u64::MAX)));
        view.observe(2, script::vote(3, 1));
        let dir = tempfile::tempdir().unwrap();
        let summary = write(dir.path(), &view, "").unwrap();
        assert_eq!(summary.blocks, 1);
        let html = read(&summary.files[3]);
        assert_eq!(html.matches("<tr class=\"block\">").count(), 1);
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("<a href='x'>&\"</a>"), "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;");
    }

    #[test]
    fn spans_are_never_empty() {
        assert_eq!(span(std::iter::empty(), true), 0.0..2.0);
        let one = span([5.0].into_iter(), false);
        assert!(one.start < 5.0 && one.end > 5.0);
    }
}

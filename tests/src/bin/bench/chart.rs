//! The picture of a run: latency percentiles of the accept phases, allot against the
//! references, as an SVG file (plotters' SVG backend), so that a reader sees the gap.
//!
//! One panel per phase, sharing one logarithmic latency axis: the accept load at the full
//! connection count (allot's closed and open loops, the three references), at few connections
//! (allot and the naive design), and `Prefer: wait` (its answers against accept-to-decided of the
//! same requests). The percentile axis is in "nines" (`-log10(1 - q)`): 90 %, 99 % and 99.9 %
//! are evenly spaced, so the tail gets as much room as the median.

use crate::refserver::{Kind, Measured};
use crate::scenarios::{Accept, WAIT_SECS, Wait};
use allot_tests::load::Tally;
use anyhow::Result;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::Path;

/// Up to which "nines" the curves go (3: 99.9 %).
const MAX_NINES: f64 = 3.0;
/// Points per curve.
const STEPS: u32 = 60;

/// One curve: a name, a colour, the latency (ms) at quantile `q`.
struct Curve {
    name: String,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

impl Curve {
    /// Samples `ms_at(q)` from q = 0 (the fastest answer) up to [`MAX_NINES`].
    fn new(name: String, colour: RGBColor, ms_at: impl Fn(f64) -> f64) -> Self {
        let points = (0..=STEPS)
            .map(|step| {
                let nines = MAX_NINES * f64::from(step) / f64::from(STEPS);
                (nines, ms_at(1.0 - 10f64.powf(-nines)))
            })
            .collect();
        Self {
            name,
            colour,
            points,
        }
    }

    fn of_tally(name: String, colour: RGBColor, tally: &Tally) -> Option<Self> {
        (!tally.latency.is_empty()).then(|| Self::new(name, colour, |q| tally.ms(q)))
    }

    fn of_histogram(name: String, colour: RGBColor, micros: &Histogram<u64>) -> Option<Self> {
        (!micros.is_empty()).then(|| {
            Self::new(name, colour, |q| {
                micros.value_at_quantile(q) as f64 / 1000.0
            })
        })
    }
}

const ALLOT: RGBColor = RGBColor(31, 119, 180);
const ALLOT_OPEN: RGBColor = RGBColor(23, 190, 207);
const DECIDED: RGBColor = RGBColor(44, 160, 44);
const BARE: RGBColor = RGBColor(127, 127, 127);
const PUBLISH: RGBColor = RGBColor(255, 127, 14);
const NAIVE: RGBColor = RGBColor(214, 39, 40);

fn reference_colour(kind: Kind) -> RGBColor {
    match kind {
        Kind::Bare => BARE,
        Kind::Publish => PUBLISH,
        Kind::Naive => NAIVE,
    }
}

fn reference_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Bare => "bare axum 202",
        Kind::Publish => "axum + confirmed publish",
        Kind::Naive => "naive hot-row UPDATE",
    }
}

/// The panels of a run, each a caption and its curves.
fn panels(references: &[Measured], a: &Accept, w: &Wait) -> Vec<(String, Vec<Curve>)> {
    let references_at = |connections: usize| {
        references
            .iter()
            .filter(move |m| m.connections == connections)
            .filter_map(|m| {
                Curve::of_tally(
                    reference_name(m.kind).into(),
                    reference_colour(m.kind),
                    &m.tally,
                )
            })
    };
    let full = [
        Curve::of_tally("allot, closed loop".into(), ALLOT, &a.closed),
        Curve::of_tally(
            format!("allot, open loop {:.0}/s (from intended send)", a.open_rate),
            ALLOT_OPEN,
            &a.open,
        ),
    ]
    .into_iter()
    .flatten()
    .chain(references_at(a.connections))
    .collect();
    let low = Curve::of_tally("allot".into(), ALLOT, &a.low)
        .into_iter()
        .chain(references_at(a.low_connections))
        .collect();
    let wait = [
        Curve::of_histogram(
            format!("answer with Prefer: wait={WAIT_SECS}"),
            ALLOT,
            &w.answer_latency,
        ),
        Curve::of_histogram(
            "accept-to-decided, same requests".into(),
            DECIDED,
            &w.decided_latency,
        ),
        Curve::of_tally(
            format!("the accept load around it ({} conns)", a.connections),
            BARE,
            &w.background,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    vec![
        (
            format!("accept, closed loop, {} connections", a.connections),
            full,
        ),
        (
            format!("accept, closed loop, {} connections", a.low_connections),
            low,
        ),
        (
            format!(
                "Prefer: wait={WAIT_SECS}, {} connections under the accept load",
                w.connections
            ),
            wait,
        ),
    ]
}

/// "99.9 %" for 3 nines.
fn percentile_label(nines: &f64) -> String {
    let percent = 100.0 * (1.0 - 10f64.powf(-nines));
    let text = format!("{percent:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} %")
}

/// Draws the run's panels into the SVG file `path` (its folder is created if missing).
pub fn write(
    path: &Path,
    title: &str,
    references: &[Measured],
    a: &Accept,
    w: &Wait,
) -> Result<()> {
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)?;
    }
    let panels = panels(references, a, w);
    let values = || panels.iter().flat_map(|(_, c)| c).flat_map(|c| &c.points);
    let lowest = values().map(|&(_, ms)| ms).fold(f64::INFINITY, f64::min);
    let highest = values().map(|&(_, ms)| ms).fold(0.0, f64::max);
    let (lowest, highest) = if lowest.is_finite() && highest > 0.0 {
        // A decade of room above the slowest curve for the legends.
        ((lowest / 1.5).max(0.01), highest * 10.0)
    } else {
        (0.01, 1.0)
    };

    let root = SVGBackend::new(path, (1500, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    for (area, (caption, curves)) in root.split_evenly((1, panels.len())).iter().zip(&panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 16))
            .margin(12)
            .margin_right(28)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..MAX_NINES, (lowest..highest).log_scale())?;
        chart
            .configure_mesh()
            .x_labels(4)
            .x_label_formatter(&percentile_label)
            .y_label_formatter(&|ms| format!("{ms}"))
            .x_desc("percentile")
            .y_desc("latency, ms (log scale)")
            .draw()?;
        for curve in curves {
            let style = curve.colour.stroke_width(2);
            chart
                .draw_series(LineSeries::new(curve.points.iter().copied(), style))?
                .label(&curve.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile_label;

    #[test]
    fn the_percentile_axis_is_labelled_in_nines() {
        assert_eq!(percentile_label(&0.0), "0 %");
        assert_eq!(percentile_label(&1.0), "90 %");
        assert_eq!(percentile_label(&2.0), "99 %");
        assert_eq!(percentile_label(&3.0), "99.9 %");
    }
}

//! SVG line charts with shaded fault windows, drawn with plotters' SVG backend. No font
//! feature is enabled: text is written as SVG `<text>` with a generic family, so rendering
//! needs no system fonts and the output is byte-identical across machines.

use plotters::prelude::*;

use crate::run::{FaultSpan, RunReport};

const W: u32 = 960;
const H: u32 = 420;
const FAULT: RGBColor = RGBColor(230, 80, 60);
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// One line of a chart; `None` values leave a gap.
pub struct Line<'a> {
    pub label: &'a str,
    pub values: Vec<Option<f64>>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub x: &'a [f64],
    pub lines: Vec<Line<'a>>,
    pub faults: &'a [FaultSpan],
    /// A dashed vertical marker at this time (the liveness phase).
    pub marker: Option<f64>,
    /// Logarithmic y axis (latencies spanning milliseconds to minutes).
    pub log_y: bool,
    /// Fixed y range, else from the data.
    pub y_range: Option<(f64, f64)>,
}

/// Renders `c` as an SVG document.
pub fn render(c: &Chart<'_>) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        // Drawing into a String cannot fail; the `expect`s below name the invariant.
        root.fill(&WHITE).expect("drawing into a string");
        let x_max = c.x.last().copied().unwrap_or(1.0).max(1.0)
            + c.x.windows(2).next().map_or(0.0, |w| w[1] - w[0]);
        let vals = c
            .lines
            .iter()
            .flat_map(|l| l.values.iter().flatten().copied());
        let (lo, hi) = c.y_range.unwrap_or_else(|| {
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            for v in vals {
                lo = lo.min(v);
                hi = hi.max(v);
            }
            if !lo.is_finite() {
                (0.0, 1.0)
            } else if c.log_y {
                (lo.max(0.1) / 1.5, hi.max(1.0) * 1.5)
            } else {
                (0.0_f64.min(lo), if hi > 0.0 { hi * 1.1 } else { 1.0 })
            }
        });
        let mut chart = ChartBuilder::on(&root);
        chart
            .caption(c.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64);
        if c.log_y {
            let mut ch = chart
                .build_cartesian_2d(0f64..x_max, (lo.max(0.01)..hi).log_scale())
                .expect("chart coordinates");
            ch.configure_mesh()
                .x_desc("simulated seconds")
                .y_desc(c.y_label)
                .draw()
                .expect("mesh");
            draw_body(&mut ch, c, lo.max(0.01), hi);
        } else {
            let mut ch = chart
                .build_cartesian_2d(0f64..x_max, lo..hi)
                .expect("chart coordinates");
            ch.configure_mesh()
                .x_desc("simulated seconds")
                .y_desc(c.y_label)
                .draw()
                .expect("mesh");
            draw_body(&mut ch, c, lo, hi);
        }
        root.present().expect("present");
    }
    svg
}

fn draw_body<'a, 'b: 'a, X, Y>(
    ch: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>,
    c: &Chart<'_>,
    lo: f64,
    hi: f64,
) where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    ch.draw_series(c.faults.iter().map(|f| {
        Rectangle::new(
            [(f.start_s, lo), (f.end_s.max(f.start_s + 0.2), hi)],
            FAULT.mix(0.12).filled(),
        )
    }))
    .expect("fault bands");
    for (i, line) in c.lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        // Split into runs of present values so that gaps stay gaps.
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for (x, v) in c.x.iter().zip(&line.values) {
            match v {
                Some(v) => segments
                    .last_mut()
                    .expect("never empty")
                    .push((*x, v.clamp(lo, hi))),
                None => segments.push(Vec::new()),
            }
        }
        let mut first = true;
        for seg in segments.into_iter().filter(|s| !s.is_empty()) {
            let series = ch
                .draw_series(LineSeries::new(seg, color.stroke_width(2)))
                .expect("a line");
            if first {
                series.label(line.label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
                first = false;
            }
        }
    }
    if !c.faults.is_empty() {
        ch.draw_series(std::iter::once(Rectangle::new(
            [(0.0, lo), (0.0, lo)],
            FAULT.mix(0.3).filled(),
        )))
        .expect("legend anchor")
        .label("fault window")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], FAULT.mix(0.3).filled()));
    }
    if let Some(t) = c.marker {
        let grey = RGBColor(90, 90, 90);
        let mut dashes = Vec::new();
        let steps = 40;
        for i in (0..steps).step_by(2) {
            let y = |k: f64| {
                if c.log_y {
                    lo * (hi / lo).powf(k)
                } else {
                    lo + (hi - lo) * k
                }
            };
            dashes.push(PathElement::new(
                vec![
                    (t, y(i as f64 / steps as f64)),
                    (t, y((i + 1) as f64 / steps as f64)),
                ],
                grey.stroke_width(1),
            ));
        }
        ch.draw_series(dashes)
            .expect("marker")
            .label("liveness phase")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], grey.stroke_width(1))
            });
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .expect("legend");
}

/// The run report's plots, as (file name, SVG).
pub fn run_plots(r: &RunReport) -> Vec<(String, String)> {
    let s = &r.series;
    let shaded = cluster_faults(&r.faults);
    let some = |v: &[f64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
    let charts = [
        (
            "latency.svg",
            Chart {
                title: "Delivery latency (send -> deliver, live recipients), and send -> ack p99",
                y_label: "simulated ms (log)",
                x: &s.t_s,
                lines: vec![
                    Line {
                        label: "deliver p50",
                        values: s.deliver_p50_ms.clone(),
                    },
                    Line {
                        label: "deliver p99",
                        values: s.deliver_p99_ms.clone(),
                    },
                    Line {
                        label: "deliver max",
                        values: s.deliver_max_ms.clone(),
                    },
                    Line {
                        label: "ack p99",
                        values: s.ack_p99_ms.clone(),
                    },
                ],
                faults: &shaded,
                marker: s.liveness_s,
                log_y: true,
                y_range: None,
            },
        ),
        (
            "rates.svg",
            Chart {
                title: "Message, delivery and push rates",
                y_label: "per simulated second (log)",
                x: &s.t_s,
                lines: vec![
                    Line {
                        label: "sends/s",
                        values: some(&s.sends_per_s),
                    },
                    Line {
                        label: "deliveries/s",
                        values: some(&s.delivers_per_s),
                    },
                    Line {
                        label: "pushes/s",
                        values: some(&s.pushes_per_s),
                    },
                ],
                faults: &shaded,
                marker: s.liveness_s,
                log_y: true,
                y_range: None,
            },
        ),
        (
            "connected.svg",
            Chart {
                title: "Connected devices",
                y_label: "devices",
                x: &s.t_s,
                lines: vec![Line {
                    label: "connected",
                    values: some(&s.connected),
                }],
                faults: &shaded,
                marker: s.liveness_s,
                log_y: false,
                y_range: None,
            },
        ),
        (
            "presence.svg",
            Chart {
                title: "Presence accuracy: connected devices' views that match the truth",
                y_label: "share of views",
                x: &s.t_s,
                lines: vec![Line {
                    label: "accuracy",
                    values: s.presence_accuracy.clone(),
                }],
                faults: &shaded,
                marker: s.liveness_s,
                log_y: false,
                y_range: Some((0.0, 1.02)),
            },
        ),
    ];
    charts
        .into_iter()
        .map(|(name, c)| (name.to_string(), render(&c)))
        .collect()
}

/// Fault spans worth shading: those that hit a server node or the whole network. Device-only
/// faults (tunnels, disconnects) are many and local; the report counts them.
pub fn cluster_faults(faults: &[FaultSpan]) -> Vec<FaultSpan> {
    faults
        .iter()
        .filter(|f| !f.targets.split(' ').all(|t| t.starts_with("device-")))
        .cloned()
        .collect()
}

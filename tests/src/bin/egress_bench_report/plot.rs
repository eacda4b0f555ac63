//! The plots of docs/benchmarks.md, drawn with plotters' bitmap backend.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use crate::{short_count, text};

/// connect() p50 against key count, one line per filter, no filter as a flat line.
pub(crate) fn plot_connect(connect: &Value, path: &Path) -> Result<(), String> {
    let rows = connect["contenders"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // (filter, colour, points of (keys, p50 median, min, max))
    type Points = Vec<(f64, f64, f64, f64)>;
    let series: Vec<(&str, RGBColor, Points)> = [
        ("egress", RGBColor(0, 114, 178)),
        ("iptables-nft", RGBColor(213, 94, 0)),
        ("nft-set", RGBColor(0, 158, 115)),
    ]
    .into_iter()
    .map(|(kind, color)| {
        let mut points: Vec<(f64, f64, f64, f64)> = rows
            .iter()
            .filter(|r| r["kind"] == kind)
            .filter_map(|r| {
                let p = &r["p50_us"];
                Some((
                    r["keys"].as_f64()?,
                    p["median"].as_f64()?,
                    p["min"].as_f64()?,
                    p["max"].as_f64()?,
                ))
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        (kind, color, points)
    })
    .filter(|(_, _, points)| !points.is_empty())
    .collect();
    let none = rows
        .iter()
        .find(|r| r["kind"] == "none")
        .and_then(|r| r["p50_us"]["median"].as_f64());
    let all = series.iter().flat_map(|s| s.2.iter());
    let (x_lo, x_hi) = all.clone().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let y_hi = all.clone().map(|p| p.3).fold(1.0, f64::max) * 2.0;
    let y_lo = all.map(|p| p.2).chain(none).fold(f64::MAX, f64::min) / 2.0;
    if series.is_empty() {
        return Err("connect.json has no scaling contenders to plot".into());
    }
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "connect() p50 by number of CIDR+port keys",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_lo / 1.5..x_hi * 1.5).log_scale(),
            (y_lo..y_hi).log_scale(),
        )
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("keys (network, port) in the allow-list")
        .y_desc("connect() p50, us (log)")
        .x_label_formatter(&|x| short_count(x.round() as u64))
        .y_label_formatter(&|y| format!("{y}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw_error)?;
    if let Some(none) = none {
        chart
            .draw_series(LineSeries::new(
                [(x_lo / 1.5, none), (x_hi * 1.5, none)],
                ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(2),
            ))
            .map_err(draw_error)?
            .label(format!("no filter ({none:.1} us)"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    for (kind, color, points) in &series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(3),
            ))
            .map_err(draw_error)?
            .label(*kind)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, color.filled(), 8)),
            )
            .map_err(draw_error)?;
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 5, color.filled())),
            )
            .map_err(draw_error)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft, 16)?;
    root.present().map_err(draw_error)
}

/// Two panels: req/s and p99 per contender, plain and TLS side by side.
pub(crate) fn plot_http(http: &Value, path: &Path) -> Result<(), String> {
    let contenders = http["contenders"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = contenders.iter().map(|c| text(&c["name"])).collect();
    let root = BitMapBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let panels = root.split_evenly((1, 2));
    let phases = [
        ("plain", "plain HTTP", RGBColor(0, 114, 178)),
        ("tls", "TLS origination", RGBColor(213, 94, 0)),
    ];
    for (panel, (key, title)) in panels.iter().zip([
        ("rps", "requests per second (wrk -c50)"),
        ("p99_ms", "p99 latency, ms (wrk -c50)"),
    ]) {
        let value = |c: &Value, phase: &str, which: &str| c[phase][key][which].as_f64();
        let top = contenders
            .iter()
            .flat_map(|c| {
                phases
                    .iter()
                    .filter_map(move |(p, _, _)| value(c, p, "max"))
            })
            .fold(0.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..names.len() as f64, 0.0..top.max(1e-9))
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(names.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| {
                if key == "rps" {
                    short_count(y.round() as u64)
                } else {
                    format!("{y:.1}")
                }
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(draw_error)?;
        for (j, (phase, label, color)) in phases.iter().enumerate() {
            let color = *color;
            let bars: Vec<(f64, f64, f64, f64)> = contenders
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    Some((
                        i as f64 + 0.1 + 0.4 * j as f64,
                        value(c, phase, "median")?,
                        value(c, phase, "min")?,
                        value(c, phase, "max")?,
                    ))
                })
                .collect();
            chart
                .draw_series(bars.iter().map(|&(x, m, _, _)| {
                    Rectangle::new([(x, 0.0), (x + 0.38, m)], color.mix(0.8).filled())
                }))
                .map_err(draw_error)?
                .label(*label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                });
            chart
                .draw_series(bars.iter().map(|&(x, m, lo, hi)| {
                    ErrorBar::new_vertical(x + 0.19, lo, m, hi, BLACK.filled(), 8)
                }))
                .map_err(draw_error)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight, 14)?;
    }
    root.present().map_err(draw_error)
}

/// The one-rule change round trip (p50 and p99) against the rules in force, with the 20 ms
/// target as a flat line.
pub(crate) fn plot_reload(reload: &Value, path: &Path) -> Result<(), String> {
    let sizes = reload["sizes"].as_object().cloned().unwrap_or_default();
    let mut points: Vec<(f64, f64, f64)> = sizes
        .iter()
        .filter_map(|(rules, s)| {
            let rt = &s["round_trip_ms"];
            Some((
                rules.parse().ok()?,
                rt["p50"].as_f64()?,
                rt["p99"].as_f64()?,
            ))
        })
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Err("reload.json has no sizes to plot".into());
    };
    let (x_lo, x_hi) = (first.0 / 2.0, last.0 * 2.0);
    let y_hi = points.iter().map(|p| p.2).fold(20.0, f64::max) * 3.0;
    let y_lo = points.iter().map(|p| p.1).fold(f64::MAX, f64::min) / 3.0;
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "One-rule change to enforced, by rules in force",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("rules in force")
        .y_desc("`egress reload` round trip, ms (log)")
        .x_label_formatter(&|x| short_count(x.round() as u64))
        .y_label_formatter(&|y| format!("{y}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(LineSeries::new(
            [(x_lo, 20.0), (x_hi, 20.0)],
            ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(2),
        ))
        .map_err(draw_error)?
        .label("target at 10,000 rules: p50 <= 20 ms")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));
    for (label, pick, color) in [
        ("p50", 1, RGBColor(0, 114, 178)),
        ("p99", 2, RGBColor(213, 94, 0)),
    ] {
        let at = |p: &(f64, f64, f64)| (p.0, if pick == 1 { p.1 } else { p.2 });
        chart
            .draw_series(LineSeries::new(
                points.iter().map(at),
                color.stroke_width(3),
            ))
            .map_err(draw_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
        chart
            .draw_series(points.iter().map(|p| Circle::new(at(p), 5, color.filled())))
            .map_err(draw_error)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft, 16)?;
    root.present().map_err(draw_error)
}

/// One of the new paths: what it times, p50 and p99 in ms, and its target (p99, ms) if any.
pub(crate) struct TimedPath {
    pub name: String,
    pub p50: f64,
    pub p99: f64,
    pub target_p99: Option<f64>,
}

/// The new paths that ran: DNS added by the FQDN path, a pod's scope, an EgressRule through
/// the API, a one-rule change of 10,000 rules.
pub(crate) fn new_paths(
    dns: Option<&Value>,
    pods: Option<&Value>,
    kube: Option<&Value>,
    reload: Option<&Value>,
) -> Vec<TimedPath> {
    let mut out = Vec::new();
    let mut push = |name: &str, p50: Option<f64>, p99: Option<f64>, target_p99: Option<f64>| {
        if let (Some(p50), Some(p99)) = (p50, p99) {
            out.push(TimedPath {
                name: name.to_owned(),
                p50,
                p99,
                target_p99,
            });
        }
    };
    if let Some(d) = dns {
        let same = &d["latency"]["same_name"];
        push(
            "DNS added (FQDN)",
            same["added_p50_ms"].as_f64(),
            same["added_p99_ms"].as_f64(),
            Some(0.2),
        );
    }
    if let Some(p) = pods {
        push(
            "pod to scope",
            p["scope_ms"]["p50"].as_f64(),
            p["scope_ms"]["p99"].as_f64(),
            Some(50.0),
        );
    }
    if let Some(r) = reload {
        let rt = &r["sizes"]["10000"]["round_trip_ms"];
        push(
            "rule change, 10k",
            rt["p50"].as_f64(),
            rt["p99"].as_f64(),
            None,
        );
    }
    if let Some(k) = kube {
        let a = &k["apply_to_enforced_ms"];
        push(
            "API rule to pod",
            a["p50"].as_f64(),
            a["p99"].as_f64(),
            None,
        );
    }
    out
}

/// Bars of p50 and p99 per path on a log scale, each path's p99 target as a tick.
pub(crate) fn plot_paths(paths: &[TimedPath], path: &Path) -> Result<(), String> {
    let y_hi = paths
        .iter()
        .flat_map(|p| [p.p99, p.target_p99.unwrap_or(0.0)])
        .fold(1.0, f64::max)
        * 3.0;
    let y_lo = paths
        .iter()
        .map(|p| p.p50)
        .fold(f64::MAX, f64::min)
        .max(1e-3)
        / 3.0;
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("The new paths, ms (log)", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..paths.len() as f64, (y_lo..y_hi).log_scale())
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(paths.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                paths.get(i).map(|p| p.name.clone()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(draw_error)?;
    for (j, (label, color)) in [
        ("p50", RGBColor(0, 114, 178)),
        ("p99", RGBColor(213, 94, 0)),
    ]
    .into_iter()
    .enumerate()
    {
        chart
            .draw_series(paths.iter().enumerate().map(|(i, p)| {
                let x = i as f64 + 0.1 + 0.4 * j as f64;
                let v = if j == 0 { p.p50 } else { p.p99 };
                Rectangle::new([(x, y_lo), (x + 0.38, v)], color.mix(0.8).filled())
            }))
            .map_err(draw_error)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .draw_series(paths.iter().enumerate().filter_map(|(i, p)| {
            let t = p.target_p99?;
            Some(PathElement::new(
                [(i as f64 + 0.05, t), (i as f64 + 0.95, t)],
                BLACK.stroke_width(2),
            ))
        }))
        .map_err(draw_error)?
        .label("p99 target")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    legend(&mut chart, SeriesLabelPosition::UpperLeft, 14)?;
    root.present().map_err(draw_error)
}

/// The box naming each series, in the plots' one style.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    font_size: u32,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", font_size))
        .draw()
        .map_err(draw_error)
}

fn draw_error(e: impl std::fmt::Display) -> String {
    format!("drawing a plot: {e}")
}

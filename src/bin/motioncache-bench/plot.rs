//! bench.png: speedup over vanilla against PSNR, one panel per schedule, one line per
//! cache family (its points sorted by PSNR), exact modes as horizontal reference lines.

use plotters::prelude::*;

use super::BoxResult;
use super::report::Row;

const FAMILIES: [(&str, RGBColor); 4] = [
    ("teacache", RGBColor(230, 120, 0)),
    ("flowcache", RGBColor(0, 120, 200)),
    ("motioncache", RGBColor(200, 0, 40)),
    ("motioncache-reference", RGBColor(120, 60, 160)),
];

/// Exact modes, drawn as horizontal lines.
const EXACT: [(&str, RGBColor); 2] = [("vanilla", BLACK), ("none", RGBColor(0, 150, 60))];

/// A panel's height, margin, caption (about 30 px at its 22 px font) and axis label areas,
/// and the height of its plot area inside them (pixels).
const PANEL_HEIGHT: u32 = 560;
const MARGIN: u32 = 20;
const CAPTION: u32 = 30;
const X_LABELS: u32 = 45;
const Y_LABELS: u32 = 55;
const PLOT_HEIGHT: f64 = (PANEL_HEIGHT - 2 * MARGIN - CAPTION - X_LABELS) as f64;
/// Height of one legend entry (pixels, at the legend's 14 px font), and the legend's
/// border and padding.
const LEGEND_ROW: f64 = 20.0;
const LEGEND_PAD: f64 = 16.0;

pub fn draw(rows: &[Row], path: &std::path::Path) -> BoxResult<()> {
    let font = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
        .iter()
        .find_map(|p| std::fs::read(p).ok());
    let labels = match font {
        Some(f) => plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(f.into_boxed_slice()),
        )
        .is_ok(),
        None => false,
    };
    let mut schedules: Vec<&str> = rows.iter().map(|r| r.schedule.as_str()).collect();
    schedules.dedup();
    let root = BitMapBackend::new(path, (700 * schedules.len().max(1) as u32, PANEL_HEIGHT))
        .into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, schedules.len().max(1)));
    for (panel, s) in panels.iter().zip(&schedules) {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.schedule == *s).collect();
        let finite: Vec<&&Row> = rs.iter().filter(|r| !r.exact).collect();
        let xmin = finite
            .iter()
            .map(|r| r.psnr_db)
            .fold(40.0, f64::min)
            .min(20.0)
            - 1.0;
        let xmax = finite
            .iter()
            .map(|r| r.psnr_db)
            .fold(20.0, f64::max)
            .max(35.0)
            + 1.0;
        let top = rs.iter().map(|r| r.speedup_vs_vanilla).fold(1.0, f64::max) * 1.05;
        // What the panel draws: the exact modes present, as horizontal lines, and each
        // family with points, as a line through them sorted by PSNR.
        let exact: Vec<(&str, RGBColor, f64)> = EXACT
            .iter()
            .filter_map(|&(name, colour)| {
                rs.iter()
                    .find(|r| r.mode == name)
                    .map(|r| (name, colour, r.speedup_vs_vanilla))
            })
            .collect();
        let families: Vec<_> = FAMILIES
            .iter()
            .filter_map(|&(fam, colour)| {
                let mut pts: Vec<(f64, f64)> = finite
                    .iter()
                    .filter(|r| r.policy == fam)
                    .map(|r| (r.psnr_db, r.speedup_vs_vanilla))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (!pts.is_empty()).then_some((fam, colour, pts))
            })
            .collect();
        // Headroom above the data for the legend in the upper right corner, so that it
        // covers no line or point: its entries take about LEGEND_ROW pixels each of the
        // plot's PLOT_HEIGHT, plus its border and padding.
        let legend = if labels {
            (LEGEND_ROW * (exact.len() + families.len()) as f64 + LEGEND_PAD) / PLOT_HEIGHT
        } else {
            0.0
        };
        let ymax = top / (1.0 - legend.min(0.6));
        let mut b = ChartBuilder::on(panel);
        b.margin(MARGIN)
            .x_label_area_size(X_LABELS)
            .y_label_area_size(Y_LABELS);
        if labels {
            b.caption(format!("{s}: speed vs quality"), ("sans-serif", 22));
        }
        let mut chart = b.build_cartesian_2d(xmin..xmax, 0.0..ymax)?;
        {
            let mut mesh = chart.configure_mesh();
            if labels {
                mesh.x_desc("PSNR against vanilla (dB)")
                    .y_desc("speedup over our vanilla");
            } else {
                mesh.disable_x_mesh().disable_y_mesh();
            }
            mesh.draw()?;
        }
        // Exact modes: horizontal lines (identical frames have no finite PSNR).
        for (name, colour, y) in exact {
            let style = ShapeStyle::from(&colour).stroke_width(1);
            let series =
                chart.draw_series(DashedLineSeries::new([(xmin, y), (xmax, y)], 6, 4, style))?;
            if labels {
                series
                    .label(format!("{name} (exact, {y:.2}x)"))
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour));
            }
        }
        for (fam, colour, pts) in families {
            let style = ShapeStyle::from(&colour).stroke_width(2);
            let series = chart.draw_series(LineSeries::new(pts.clone(), style))?;
            if labels {
                series
                    .label(fam)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour));
            }
            chart.draw_series(
                pts.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, colour.filled())),
            )?;
        }
        if labels {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_panel_per_schedule() {
        let row = |schedule: &str, mode: &str, psnr: f64, speed: f64| Row {
            mode: mode.into(),
            policy: mode.into(),
            schedule: schedule.into(),
            exact: mode == "vanilla",
            ..super::super::report::tests::row(psnr, speed)
        };
        let mut rows = Vec::new();
        for s in ["paper", "element-default"] {
            rows.push(row(s, "vanilla", 99.0, 1.0));
            rows.push(row(s, "motioncache", 30.0, 2.0));
            rows.push(row(s, "motioncache", 20.0, 3.0));
            rows.push(row(s, "teacache", 22.0, 1.5));
        }
        let path = std::env::temp_dir().join(format!("bench-plot-{}.png", std::process::id()));
        draw(&rows, &path).unwrap();
        let png = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(&png[1..4], b"PNG");
        // IHDR: width and height, big-endian, after the 8-byte signature and 8 bytes of
        // chunk length and type.
        let dim = |o: usize| u32::from_be_bytes(png[o..o + 4].try_into().unwrap());
        assert_eq!((dim(16), dim(20)), (1400, PANEL_HEIGHT));
    }
}

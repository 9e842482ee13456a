//! The benches' figures: line charts drawn with plotters' SVG backend (no default features, so
//! no fontconfig: text is left to the SVG viewer's fonts). One or more panels stacked in one
//! SVG document, each with its lines and a legend.

use plotters::prelude::*;

/// One line of a panel.
pub struct Series {
    /// Its legend.
    pub name: String,
    /// Its points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure.
pub struct Panel {
    /// Its caption.
    pub title: String,
    /// What the x axis counts.
    pub x_desc: String,
    /// What the y axis counts.
    pub y_desc: String,
    /// Its lines.
    pub series: Vec<Series>,
    /// How an x value is labelled (categories drawn at 0, 1, 2, ..., a log scale).
    pub x_label: Box<dyn Fn(f64) -> String>,
    /// Ticks on the x axis.
    pub x_ticks: usize,
}

impl Panel {
    /// A panel with plain numbers on the x axis.
    pub fn new(title: &str, x_desc: &str, y_desc: &str, series: Vec<Series>) -> Panel {
        Panel {
            title: title.into(),
            x_desc: x_desc.into(),
            y_desc: y_desc.into(),
            series,
            x_label: Box::new(|x| format!("{x}")),
            x_ticks: 10,
        }
    }
}

/// The panels stacked in an SVG of `width` × `height`.
pub fn svg(width: u32, height: u32, panels: Vec<Panel>) -> Result<String, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        for (area, panel) in areas.iter().zip(panels) {
            let xs = panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.0));
            let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
            let (x0, x1) = if x0 > x1 {
                (0.0, 1.0)
            } else {
                (x0, x1.max(x0 + 1e-9))
            };
            let top = panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.1))
                .fold(0.0f64, f64::max)
                .max(1e-9);
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x0..x1, 0f64..top * 1.15)
                .map_err(|x| e(&x))?;
            let label = &panel.x_label;
            chart
                .configure_mesh()
                .x_desc(&panel.x_desc)
                .y_desc(&panel.y_desc)
                .x_labels(panel.x_ticks)
                .x_label_formatter(&|x| label(*x))
                .draw()
                .map_err(|x| e(&x))?;
            for (i, s) in panel.series.into_iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(s.points, color.stroke_width(2)))
                    .map_err(|x| e(&x))?
                    .label(s.name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|x| e(&x))?;
        }
        root.present().map_err(|x| e(&x))?;
    }
    Ok(out)
}

/// The point lists of an SVG's polylines (what [`svg`] draws a series, or a legend's sample
/// line, as), in document order.
pub fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
    svg.split("<polyline")
        .skip(1)
        .filter_map(|p| p.split("points=\"").nth(1)?.split('"').next())
        .map(|points| {
            points
                .split_whitespace()
                .filter_map(|p| {
                    let (x, y) = p.split_once(',')?;
                    Some((x.parse().ok()?, y.parse().ok()?))
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_series_is_a_polyline_inside_the_figure_with_its_legend() {
        let series = |name: &str, k: f64| Series {
            name: name.into(),
            points: vec![(0.0, 1.0 * k), (1.0, 2.0 * k), (2.0, 1.5 * k)],
        };
        let svg = svg(
            600,
            400,
            vec![Panel::new(
                "t",
                "x",
                "y",
                vec![series("a", 1.0), series("b", 2.0)],
            )],
        )
        .unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">\na\n<") && svg.contains(">\nb\n<"), "{svg}");
        let lines: Vec<_> = polylines(&svg)
            .into_iter()
            .filter(|l| l.len() == 3)
            .collect();
        assert_eq!(lines.len(), 2, "{svg}");
        for l in &lines {
            assert!(l
                .iter()
                .all(|&(x, y)| (0.0..=600.0).contains(&x) && (0.0..=400.0).contains(&y)));
            // Higher values are drawn higher up (smaller y).
            assert!(l[1].1 < l[0].1);
        }
    }
}

//! The sweep chart: two log-log panels (UDP pps, new flows/s) over the
//! number of Services, hand-written SVG.

use std::fmt::Write as _;

use super::{Pick, Report};

const W: f64 = 920.0;
const H: f64 = 380.0;
/// The systems drawn, with their colours.
const SERIES: [(&str, &str); 3] = [
    ("xlb", "#d62728"),
    ("iptables", "#1f77b4"),
    ("nftables", "#2ca02c"),
];

impl Report {
    /// Two panels (UDP pps, new flows/s) over the sweep, log-log.
    pub fn svg(&self) -> String {
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">xlb lab sweep: NodePort Services on the node (10 backends each), measured Service last</text>\n",
            W / 2.0
        );
        let panels: [(&str, Pick); 2] = [
            ("UDP packets/s delivered (1 flow)", |f| {
                f.udp_pps_1_flow.as_ref().map(|x| x.median)
            }),
            ("new flows/s", |f| {
                f.new_flows_per_s.as_ref().map(|x| x.median)
            }),
        ];
        for (index, (title, pick)) in panels.iter().enumerate() {
            let panel = Panel::new(self, index, *pick);
            panel.axes(&mut out, title);
            for (index, (name, color)) in SERIES.iter().enumerate() {
                panel.series(&mut out, self, index, name, color);
            }
        }
        let _ = writeln!(
            out,
            "<text x=\"10\" y=\"{}\" font-size=\"10\" fill=\"#666\">{}; load average {} .. {}</text>\n</svg>",
            H - 8.0,
            xml_escape(&self.machine),
            self.load_average_start,
            self.load_average_end
        );
        out
    }
}

/// One panel: where it is, its value range (whole decades) and the
/// sweep's Service counts along x.
struct Panel {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    lo: f64,
    hi: f64,
    xs: Vec<usize>,
    pick: Pick,
}

impl Panel {
    fn new(report: &Report, index: usize, pick: Pick) -> Panel {
        let values: Vec<f64> = report
            .sweep
            .iter()
            .flat_map(|p| p.systems.values().filter_map(pick))
            .filter(|v| *v > 0.0)
            .collect();
        let (lo, hi) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let (lo, hi) = if values.is_empty() {
            (1.0, 10.0)
        } else {
            (
                10f64.powf(lo.log10().floor()),
                10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)),
            )
        };
        Panel {
            left: 70.0 + index as f64 * 450.0,
            top: 50.0,
            width: 360.0,
            height: 270.0,
            lo,
            hi,
            xs: report.sweep.iter().map(|p| p.services).collect(),
            pick,
        }
    }

    fn x_of(&self, services: usize) -> f64 {
        let (a, b) = (
            (*self.xs.first().unwrap_or(&1) as f64).max(1.0).log10(),
            (*self.xs.last().unwrap_or(&10) as f64).max(1.0).log10(),
        );
        let span = if b > a { b - a } else { 1.0 };
        self.left + ((services as f64).max(1.0).log10() - a) / span * self.width
    }

    fn y_of(&self, v: f64) -> f64 {
        self.top + self.height
            - (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10()) * self.height
    }

    /// Title, frame, a grid line per decade, the Service counts.
    fn axes(&self, out: &mut String, title: &str) {
        let (left, top, width, height) = (self.left, self.top, self.width, self.height);
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{title}</text>\n\
             <rect x=\"{left}\" y=\"{top}\" width=\"{width}\" height=\"{height}\" fill=\"none\" stroke=\"#999\"/>",
            left + width / 2.0,
            top - 8.0
        );
        let mut decade = self.lo;
        while decade <= self.hi * 1.0001 {
            let y = self.y_of(decade);
            let _ = writeln!(
                out,
                "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                left + width,
                left - 4.0,
                y + 4.0,
                axis_label(decade)
            );
            decade *= 10.0;
        }
        for services in &self.xs {
            let x = self.x_of(*services);
            let _ = writeln!(
                out,
                "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{services}</text>",
                top + height + 16.0
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">Services</text>",
            left + width / 2.0,
            top + height + 34.0
        );
    }

    /// System `name`'s line, points and legend entry (the `index`th).
    fn series(&self, out: &mut String, report: &Report, index: usize, name: &str, color: &str) {
        let points: Vec<(f64, f64)> = report
            .sweep
            .iter()
            .filter_map(|p| {
                let v = (self.pick)(p.systems.get(name)?)?;
                (v > 0.0).then(|| (self.x_of(p.services), self.y_of(v)))
            })
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = writeln!(
            out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
            path.join(" ")
        );
        for (x, y) in &points {
            let _ = writeln!(
                out,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{color}\"/>"
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>",
            self.left + 8.0,
            self.top + 16.0 + 14.0 * index as f64
        );
    }
}

/// 1e6 -> "1M", 1e4 -> "10k" (chart axes: powers of ten).
fn axis_label(value: f64) -> String {
    match value {
        v if v >= 1e6 => format!("{}M", v / 1e6),
        v if v >= 1e3 => format!("{}k", v / 1e3),
        v => format!("{v}"),
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

//! The Prometheus text exposition format 0.0.4: families written in full
//! (HELP, TYPE, samples), label values and help escaped, numbers as
//! Prometheus reads them.

use std::fmt::Write as _;

use super::Histogram;

/// One sample: label pairs and value.
pub(super) type Samples = (Vec<(&'static str, String)>, f64);

#[derive(Default)]
pub(super) struct Exposition {
    text: String,
}

impl Exposition {
    pub(super) fn into_text(self) -> String {
        self.text
    }

    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape_label(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }

    pub(super) fn counter(&mut self, name: &str, help: &str, samples: &[Samples]) {
        self.header(name, "counter", help);
        for (labels, value) in samples {
            self.sample(name, labels, *value);
        }
    }

    pub(super) fn gauge(&mut self, name: &str, help: &str, samples: &[Samples]) {
        self.header(name, "gauge", help);
        for (labels, value) in samples {
            self.sample(name, labels, *value);
        }
    }

    pub(super) fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (index, &bound) in histogram.bounds.iter().enumerate() {
            cumulative += histogram.counts[index];
            self.sample(&bucket, &[("le", format_value(bound))], cumulative as f64);
        }
        self.sample(
            &bucket,
            &[("le", String::from("+Inf"))],
            histogram.count() as f64,
        );
        self.sample(&format!("{name}_sum"), &[], histogram.sum);
        self.sample(&format!("{name}_count"), &[], histogram.count() as f64);
    }
}

/// Integers without a fraction, others as Rust prints them (never with an
/// exponent), infinities as Prometheus spells them.
fn format_value(value: f64) -> String {
    if value.is_infinite() {
        return String::from(if value > 0.0 { "+Inf" } else { "-Inf" });
    }
    if value.is_nan() {
        return String::from("NaN");
    }
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        return format!("{}", value as i64);
    }
    format!("{value}")
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_labels_are_escaped() {
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.25), "0.25");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(1e-7), "0.0000001");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut out = Exposition::default();
        out.gauge(
            "x",
            "help\nwith newline",
            &[(vec![("l", String::from("q\""))], 1.0)],
        );
        assert_eq!(
            out.text,
            "# HELP x help\\nwith newline\n# TYPE x gauge\nx{l=\"q\\\"\"} 1\n"
        );
    }
}

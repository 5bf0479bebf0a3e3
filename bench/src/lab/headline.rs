//! The headline table: UDP pps (1 flow, 60k flows), new flows/s, TCP
//! connect/close and UDP latency, every system on its own lab, measured
//! interleaved.

use std::collections::BTreeMap;

use super::progs::Flows;
use super::report::{Figure, SystemFigures};
use super::runtime::BpfTime;
use super::services::{BenchConfig, ECHO_NODE_PORT, TCP_NODE_PORT};
use super::{Bench, Plan, System, process, traffic};

/// Client threads of the TCP connect/close test.
const TCP_CLIENTS: usize = 4;
/// Requests per second of the latency test (moderate: far below capacity).
const LATENCY_RATE: u32 = 1_000;
/// Flows in the "60k flows" test.
const MANY_FLOWS: u32 = 60_000;

/// What one headline repeat of one system measured.
#[derive(Default)]
struct Samples {
    metrics: BTreeMap<&'static str, Vec<f64>>,
    /// UDP tests (metric -> per repeat): frames/s the generator offered.
    offered: BTreeMap<&'static str, Vec<f64>>,
    /// Established tests (metric -> per repeat): flows the system created
    /// during the window, where it says.
    new_flows: BTreeMap<&'static str, Vec<u64>>,
    /// UDP tests (metric -> per repeat): the system's BPF time.
    bpf: BTreeMap<&'static str, Vec<BpfTime>>,
    lost: u64,
    tcp_failed: u64,
}

/// The headline measurements, in the order they are taken.
#[derive(Clone, Copy, Debug)]
enum Measurement {
    Udp(&'static str, Flows),
    Tcp,
    Latency,
}

/// Most flows an established test's window may see created: 1% of its
/// flows (none for 1 flow). Every tuple is then a live flow, so its packets
/// measure the established path, not new flows.
fn new_flow_allowance(flows: u32) -> u64 {
    u64::from(flows) / 100
}

/// The measurements, each repeated before the next, the new-flow flood
/// last: a flood leaves a system's flow table full of its dead flows for
/// tens of seconds (xlb deletes them on sight or by its walk, the kernel's
/// conntrack by its GC), and a window after it measured lookups in that
/// table (xlb's 60k-flow windows ran at 0.4-0.7x a first repeat's).
const HEADLINE: [Measurement; 5] = [
    Measurement::Udp("udp_pps_1_flow", Flows::Cycle(1)),
    Measurement::Udp("udp_pps_60k_flows", Flows::Cycle(MANY_FLOWS)),
    Measurement::Tcp,
    Measurement::Latency,
    Measurement::Udp("new_flows_per_s", Flows::New),
];

fn measure_headline(
    bench: &mut Bench,
    measurement: Measurement,
    plan: Plan,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    match measurement {
        Measurement::Udp(metric, flows) => {
            let window = bench.udp(flows, plan)?;
            samples
                .metrics
                .entry(metric)
                .or_default()
                .push(window.delivered_pps);
            samples
                .offered
                .entry(metric)
                .or_default()
                .push(window.offered_pps);
            if let (Flows::Cycle(_), Some(created)) = (flows, window.new_flows) {
                samples.new_flows.entry(metric).or_default().push(created);
            }
            if let Some(bpf) = window.bpf {
                samples.bpf.entry(metric).or_default().push(bpf);
            }
        }
        // No NAT, no state: the ceiling only forwards the flood.
        Measurement::Tcp | Measurement::Latency if bench.system.is_yardstick() => {}
        Measurement::Tcp => {
            let (rate, failed) = traffic::tcp_connect_rate(
                &bench.lab,
                TCP_NODE_PORT,
                TCP_CLIENTS,
                plan.warmup,
                plan.window,
            )?;
            samples
                .metrics
                .entry("tcp_conn_per_s")
                .or_default()
                .push(rate);
            samples.tcp_failed += failed;
        }
        Measurement::Latency => {
            let requests = (plan.window.as_secs_f64() * f64::from(LATENCY_RATE)) as u32;
            let latency = traffic::udp_latency(&bench.lab, ECHO_NODE_PORT, LATENCY_RATE, requests)?;
            samples
                .metrics
                .entry("latency_p50_us")
                .or_default()
                .push(latency.p50_us);
            samples
                .metrics
                .entry("latency_p99_us")
                .or_default()
                .push(latency.p99_us);
            samples.lost += latency.lost;
        }
    }
    Ok(())
}

/// The headline table: every system on its own lab, all configured first,
/// then measured in turn, so a burst of load elsewhere on the machine hits
/// every system rather than one.
pub(super) fn run(
    systems: &[System],
    plan: Plan,
    udp_timeout_s: Option<u32>,
) -> (Vec<SystemFigures>, bool) {
    let config = BenchConfig {
        udp_timeout_s,
        ..BenchConfig::headline()
    };
    let mut failed = false;
    let mut figures: Vec<SystemFigures> = Vec::new();
    let mut benches: Vec<Option<(Bench, Samples)>> = Vec::new();
    for system in systems {
        eprintln!("xlb-bench: setting up {} ...", system.name());
        let mut entry = SystemFigures::new(system.name());
        match Bench::new(*system, &config, true) {
            Ok((bench, setup_s)) => {
                entry.setup_s = Some(setup_s);
                benches.push(Some((bench, Samples::default())));
            }
            Err(error) => {
                failed = true;
                eprintln!("xlb-bench: {} failed: {error:#}", system.name());
                entry.error = Some(format!("{error:#}"));
                benches.push(None);
            }
        }
        figures.push(entry);
    }
    process::pin_node_napi_threads();
    failed |= measure_all(&mut benches, &mut figures, plan);
    for (entry, figures) in benches.into_iter().zip(figures.iter_mut()) {
        if let Some((bench, samples)) = entry {
            failed |= record(bench, samples, figures);
        }
    }
    (figures, failed)
}

/// Measurement by measurement (every repeat of one before the next, in
/// `HEADLINE`'s order), system by system: a ratio compares figures taken
/// seconds apart, whatever else the machine is doing. The systems' order
/// rotates with each repeat, so none is always measured first or last. A
/// system that fails leaves the run (its error in `figures`).
fn measure_all(
    benches: &mut [Option<(Bench, Samples)>],
    figures: &mut [SystemFigures],
    plan: Plan,
) -> bool {
    let mut failed = false;
    for measurement in HEADLINE {
        if let Measurement::Udp(_, Flows::New) = measurement {
            failed |= fill_tables(benches, figures, plan);
        }
        for repeat in 0..plan.repeats {
            let count = benches.len();
            for turn in 0..count {
                let slot = (turn + repeat as usize) % count;
                let entry = &mut benches[slot];
                let Some((bench, samples)) = entry else {
                    continue;
                };
                eprintln!(
                    "xlb-bench: {} {measurement:?} (repeat {}/{}) ...",
                    bench.system.name(),
                    repeat + 1,
                    plan.repeats
                );
                if let Err(error) = measure_headline(bench, measurement, plan, samples) {
                    failed = true;
                    note_failure(bench.system, &error, &mut figures[slot]);
                    *entry = None;
                }
            }
        }
    }
    failed
}

/// A system's failure, said and kept in its figures (the caller drops
/// the system from the run).
fn note_failure(system: System, error: &anyhow::Error, figures: &mut SystemFigures) {
    eprintln!("xlb-bench: {} failed: {error:#}", system.name());
    figures.error = Some(format!("{error:#}"));
}

/// A new-flow flood window per system, not measured, before the first
/// measured one: a flood fills a system's flow table (xlb's 1M entries
/// within 2 s here) and the table stays full of dead flows for tens of
/// seconds, so without it the first repeat measured a flood into empty
/// tables and the others into full ones (xlb's IPv6: 307k new flows/s,
/// then 222k and 213k). Every measured window is a flood into full
/// tables, as under a sustained one. Whether a system failed.
fn fill_tables(
    benches: &mut [Option<(Bench, Samples)>],
    figures: &mut [SystemFigures],
    plan: Plan,
) -> bool {
    let mut failed = false;
    for (slot, entry) in benches.iter_mut().enumerate() {
        let Some((bench, _)) = entry else {
            continue;
        };
        eprintln!(
            "xlb-bench: {} new-flow flood to fill its tables (not measured) ...",
            bench.system.name()
        );
        if let Err(error) = bench.udp(Flows::New, plan) {
            failed = true;
            note_failure(bench.system, &error, &mut figures[slot]);
            *entry = None;
        }
    }
    failed
}

/// One system's samples into its figures; stops the system. Whether an
/// established window saw too many new flows.
fn record(bench: Bench, samples: Samples, figures: &mut SystemFigures) -> bool {
    let mut failed = check_new_flows(&samples.new_flows, &samples.metrics, figures);
    if bench.system == System::Limit {
        failed |= check_limit(&samples.metrics, figures);
    }
    for (metric, values) in samples.metrics {
        figures
            .metrics
            .insert(metric.to_owned(), Figure::of(values));
    }
    figures.offered_pps = Some(Figure::of(
        samples.offered.values().flatten().copied().collect(),
    ));
    for (metric, offered) in samples.offered {
        figures
            .offered_pps_by_test
            .insert(metric.to_owned(), Figure::of(offered));
    }
    for (metric, times) in samples.bpf {
        let per_packet = times.iter().map(|time| time.ns_per_delivered).collect();
        let per_run = times.iter().map(|time| time.ns_per_run).collect();
        figures
            .bpf_ns_per_packet
            .insert(metric.to_owned(), Figure::of(per_packet));
        figures
            .bpf_ns_per_run
            .insert(metric.to_owned(), Figure::of(per_run));
    }
    let what = match bench.system {
        System::Limit => Some("no NAT and no state"),
        System::LimitNat => Some("the limit plus stateless NAT, no state"),
        System::LimitLru => Some("the limit plus one LRU insert per packet, no NAT"),
        _ => None,
    };
    if let Some(what) = what {
        figures
            .notes
            .push(format!("{what}: TCP and latency do not apply"));
    }
    if samples.tcp_failed > 0 {
        figures.notes.push(format!(
            "{} TCP connections failed or timed out",
            samples.tcp_failed
        ));
    }
    if samples.lost > 0 {
        figures.notes.push(format!(
            "{} latency requests got no answer in 200 ms",
            samples.lost
        ));
    }
    let (rss, counters) = bench.finish();
    figures.rss_mib = rss;
    if let Some(counters) = counters {
        figures.notes.push(format!("agent counters: {counters}"));
    }
    failed
}

/// The limit is stateless: its three UDP tests forward the same frames the
/// same way, so their medians may differ only by noise. Notes their spread
/// beside the noise (each test's own range over its repeats, the largest);
/// with 3 repeats or more, a spread above the noise fails the run: the
/// machine changed under the bench, and no ratio to the limit holds.
fn check_limit(pps: &BTreeMap<&'static str, Vec<f64>>, figures: &mut SystemFigures) -> bool {
    let tests: Vec<(&str, &Vec<f64>)> = HEADLINE
        .iter()
        .filter_map(|measurement| match measurement {
            Measurement::Udp(key, _) => pps.get(key).map(|samples| (*key, samples)),
            _ => None,
        })
        .collect();
    let medians: Vec<f64> = tests
        .iter()
        .map(|(_, samples)| Figure::of((*samples).clone()).median)
        .collect();
    let (Some(low), Some(high)) = (
        medians.iter().copied().reduce(f64::min),
        medians.iter().copied().reduce(f64::max),
    ) else {
        return false;
    };
    let spread = (high - low) / high.max(1.0);
    let noise = tests
        .iter()
        .map(|(_, samples)| {
            let low = samples.iter().copied().fold(f64::INFINITY, f64::min);
            let high = samples.iter().copied().fold(0.0, f64::max);
            (high - low) / high.max(1.0)
        })
        .fold(0.0, f64::max);
    let repeats = tests
        .iter()
        .map(|(_, samples)| samples.len())
        .min()
        .unwrap_or(0);
    let judged = repeats >= 3;
    let disagree = judged && spread > noise;
    let list: Vec<String> = tests
        .iter()
        .zip(&medians)
        .map(|((key, _), median)| format!("{key} {:.0}k", median / 1e3))
        .collect();
    let verdict = if disagree {
        "MORE than the noise: the machine changed during the run, ratios to the limit do not hold"
    } else if judged {
        "within the noise"
    } else {
        "not judged: fewer than 3 repeats"
    };
    let note = format!(
        "the stateless limit's UDP tests: {}; spread {:.1}%, noise (largest range over repeats) \
         {:.1}%: {verdict}",
        list.join(", "),
        spread * 100.0,
        noise * 100.0
    );
    eprintln!("xlb-bench: limit: {note}");
    figures.notes.push(note);
    disagree
}

/// Records the flows created during established windows in `figures` and
/// says whether any window saw more than [`new_flow_allowance`]: its
/// packets then partly measured new flows (a flow table too small, or
/// entries expiring under traffic), and its pps is not an established
/// figure.
fn check_new_flows(
    new_flows: &BTreeMap<&'static str, Vec<u64>>,
    pps: &BTreeMap<&'static str, Vec<f64>>,
    figures: &mut SystemFigures,
) -> bool {
    let mut failed = false;
    for (&metric, created) in new_flows {
        let Some(flows) = HEADLINE.iter().find_map(|measurement| match measurement {
            Measurement::Udp(key, Flows::Cycle(flows)) if *key == metric => Some(*flows),
            _ => None,
        }) else {
            continue;
        };
        let allowed = new_flow_allowance(flows);
        let list: Vec<String> = created.iter().map(u64::to_string).collect();
        let worst = created.iter().copied().max().unwrap_or(0);
        let verdict = if worst > allowed {
            failed = true;
            // A flow's packets come this far apart on average (more with
            // bursts of loss): against the UDP timeout, whether the rate
            // was too low to keep every flow alive.
            let slowest = pps
                .get(metric)
                .and_then(|rates| rates.iter().copied().reduce(f64::min))
                .filter(|rate| *rate > 0.0)
                .map_or_else(String::new, |rate| {
                    format!(
                        "; at {rate:.0} pps a flow sees a packet every {:.0} ms",
                        f64::from(flows) * 1_000.0 / rate
                    )
                });
            format!(
                "MORE than {allowed} ({:.1}% of {flows} flows): not an established test{slowest}",
                worst as f64 * 100.0 / f64::from(flows)
            )
        } else {
            format!("ok: at most {allowed} allowed")
        };
        eprintln!(
            "xlb-bench: {} {metric}: new flows per window {}: {verdict}",
            figures.system,
            list.join(", ")
        );
        figures.notes.push(format!(
            "{metric}: new flows per window {} ({verdict})",
            list.join(", ")
        ));
        figures
            .new_flows_per_window
            .insert(metric.to_owned(), created.clone());
    }
    failed
}

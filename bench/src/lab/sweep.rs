//! The scale sweep: xlb, iptables and nftables with N Services, config
//! apply time and memory, then pps and new flows/s to the last Service.

use std::collections::BTreeMap;
use std::time::Duration;

use super::progs::Flows;
use super::report::{Figure, SweepPoint, SweepSystem};
use super::services::BenchConfig;
use super::{Bench, Options, Plan, Running, System, process};

/// Configure one system at one sweep point. xlb starts on an empty config,
/// then the whole config is written and applied (SIGHUP), and timed.
fn sweep_setup(
    system: System,
    config: &BenchConfig,
    options: &Options,
) -> anyhow::Result<(Bench, SweepSystem)> {
    let mut figures = SweepSystem::default();
    if system != System::Xlb {
        let (bench, seconds) = Bench::new(system, config, false)?;
        figures.apply_s = Some(seconds);
        return Ok((bench, figures));
    }
    let empty = BenchConfig {
        services: Vec::new(),
        ..config.clone()
    };
    let (mut bench, _) = Bench::new(system, &empty, false)?;
    let Running::Xlb(agent) = &mut bench.running else {
        unreachable!("an xlb bench runs the agent");
    };
    let applied = agent.apply(
        &config.xlb_yaml(),
        Duration::from_secs(options.apply_timeout),
    )?;
    figures.apply_s = Some(applied.seconds);
    figures.ops = Some(applied.ops);
    figures.rss_mib = agent.rss_mib().ok();
    Ok((bench, figures))
}

/// One sweep point: xlb, iptables and nftables configured for `config`,
/// then pps (1 flow) and new flows/s to the measured Service (last),
/// interleaved by repeat.
pub(super) fn point(config: &BenchConfig, plan: Plan, options: &Options) -> (SweepPoint, bool) {
    let mut failed = false;
    let mut point = SweepPoint {
        services: config.services.len(),
        backends: config.backend_count(),
        systems: BTreeMap::new(),
    };
    let mut benches: Vec<Sampled> = Vec::new();
    let systems = if options.sweep_systems.is_empty() {
        vec![System::Xlb, System::Iptables, System::Nftables]
    } else {
        options.sweep_systems.clone()
    };
    for system in systems {
        eprintln!(
            "xlb-bench: sweep {} services: setting up {} ...",
            point.services,
            system.name()
        );
        match sweep_setup(system, config, options) {
            Ok((bench, figures)) => {
                point.systems.insert(system.name().to_owned(), figures);
                benches.push(Some((bench, Vec::new(), Vec::new())));
            }
            Err(error) => {
                failed = true;
                eprintln!(
                    "xlb-bench: sweep {} services, {} failed: {error:#}",
                    point.services,
                    system.name()
                );
                point.systems.insert(
                    system.name().to_owned(),
                    SweepSystem {
                        error: Some(format!("{error:#}")),
                        ..SweepSystem::default()
                    },
                );
            }
        }
    }
    process::pin_node_napi_threads();
    failed |= measure_all(&mut benches, &mut point, plan);
    for (bench, pps, new_flows) in benches.into_iter().flatten() {
        let name = bench.system.name();
        let (rss, counters) = bench.finish();
        let Some(figures) = point.systems.get_mut(name) else {
            continue;
        };
        figures.udp_pps_1_flow = Some(Figure::of(pps));
        figures.new_flows_per_s = Some(Figure::of(new_flows));
        if let Some(rss) = rss {
            figures.rss_mib = Some(figures.rss_mib.unwrap_or(0.0).max(rss));
        }
        if let Some(counters) = counters {
            figures.notes.push(format!("agent counters: {counters}"));
        }
    }
    (point, failed)
}

/// One sweep system's lab and its samples: pps (1 flow), new flows/s.
type Sampled = Option<(Bench, Vec<f64>, Vec<f64>)>;

/// pps (1 flow) and new flows/s, interleaved by repeat; a system that fails
/// leaves the run (its error in `point`).
fn measure_all(benches: &mut [Sampled], point: &mut SweepPoint, plan: Plan) -> bool {
    let mut failed = false;
    for _ in 0..plan.repeats {
        for flows in [Flows::Cycle(1), Flows::New] {
            for entry in benches.iter_mut() {
                let Some((bench, pps, new_flows)) = entry else {
                    continue;
                };
                let name = bench.system.name();
                eprintln!(
                    "xlb-bench: sweep {} services, {name} {flows:?} ...",
                    point.services
                );
                match bench.udp(flows, plan) {
                    Ok(window) if flows == Flows::New => new_flows.push(window.delivered_pps),
                    Ok(window) => pps.push(window.delivered_pps),
                    Err(error) => {
                        failed = true;
                        eprintln!(
                            "xlb-bench: sweep {}, {name} failed: {error:#}",
                            point.services
                        );
                        if let Some(figures) = point.systems.get_mut(name) {
                            figures.error = Some(format!("{error:#}"));
                        }
                        *entry = None;
                    }
                }
            }
        }
    }
    failed
}

//! The lab's own XDP programs (bench-ebpf/src/trafficgen.rs, limit.rs): the
//! traffic generator, the backends' counting sink, and the MAC-rewrite-and-
//! redirect ceiling. Map layouts and frame arithmetic are bench-ebpf's.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray},
    programs::{SchedClassifier, Xdp, XdpMode},
};

#[cfg(test)]
use xlb_bench_ebpf::{FRAME_LEN, template::UDP_PAYLOAD};
use xlb_bench_ebpf::{
    GenConfig, LimitNat, LimitTarget,
    template::{Segment, Sources, Template},
};

use super::runtime::BpfTime;
use super::topology::{
    self, BenchLab, GEN_ADDR, GEN_MAC, NEW_FLOW_SOURCES, NODE_ADDR, NODE_GEN_IF, NODE_GEN_MAC,
    POD_IF,
};

/// Which tuples the generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flows {
    /// Cycle through this many source ports from the generator's address.
    Cycle(u32),
    /// Every frame a tuple never sent before (198.18.128.0/17, all ports).
    New,
}

/// The UDP frame the generator sends to `dst_port`, as a template plus
/// checksum bases.
pub fn gen_config(dst_port: u16, flows: Flows) -> GenConfig {
    let (addr_base, flows) = match flows {
        Flows::Cycle(count) => (GEN_ADDR, count),
        Flows::New => (NEW_FLOW_SOURCES, 0),
    };
    let template = Template {
        dst_mac: NODE_GEN_MAC,
        src_mac: GEN_MAC,
        dst_addr: NODE_ADDR.octets(),
        dst_port,
        segment: Segment::Udp,
    };
    template.config(Sources {
        addr_base: u32::from(addr_base),
        flows,
        port_base: 1024,
        port_span: 64_000,
    })
}

#[cfg(test)]
/// What `xlb_trafficgen` writes for sequence number `seq`, on the host (the
/// same `GenConfig::fields`), so it can be checked by a packet library.
pub fn frame_for(cfg: &GenConfig, seq: u64) -> Vec<u8> {
    use xlb_bench_ebpf::{IP_CSUM_AT, SRC_ADDR_AT, SRC_PORT_AT};
    let fields = cfg.fields(seq);
    let mut frame: Vec<u8> = cfg.frame.iter().flat_map(|w| w.to_ne_bytes()).collect();
    frame.truncate(FRAME_LEN);
    frame[IP_CSUM_AT..IP_CSUM_AT + 2].copy_from_slice(&fields.ip_csum.to_be_bytes());
    frame[SRC_ADDR_AT..SRC_ADDR_AT + 4].copy_from_slice(&fields.src_addr.to_be_bytes());
    frame[SRC_PORT_AT..SRC_PORT_AT + 2].copy_from_slice(&fields.src_port.to_be_bytes());
    let l4_csum_at = cfg.l4_csum_at();
    frame[l4_csum_at..l4_csum_at + 2].copy_from_slice(&fields.udp_csum.to_be_bytes());
    frame
}

fn load_program(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from its object"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("the verifier rejected {name}"))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing"))?
        .try_into()?)
}

/// `xlb_bench_sink` on every backend's `eth0`: counts and drops UDP to the
/// benchmark ports.
pub struct Sink {
    ebpf: Ebpf,
}

impl Sink {
    pub fn attach(lab: &BenchLab, ports: [u16; 2]) -> anyhow::Result<Sink> {
        let mut ebpf = EbpfLoader::new()
            .load(crate::TRAFFICGEN_OBJECT)
            .context("loading the trafficgen object")?;
        load_program(&mut ebpf, "xlb_bench_sink")?;
        set_sink_ports(&mut ebpf, ports)?;
        for backend in &lab.backends {
            let program = program(&mut ebpf, "xlb_bench_sink")?;
            backend
                .run(|| program.attach(POD_IF, XdpMode::Driver).map(drop))?
                .with_context(|| format!("attaching the sink in {}", backend.name()))?;
        }
        Ok(Sink { ebpf })
    }

    /// Datagrams counted so far, all backends and CPUs.
    pub fn count(&self) -> anyhow::Result<u64> {
        sink_count(&self.ebpf)
    }
}

/// The UDP destination ports the sinks of `ebpf` count.
pub(super) fn set_sink_ports(ebpf: &mut Ebpf, ports: [u16; 2]) -> anyhow::Result<()> {
    let mut config: Array<_, u32> = Array::try_from(
        ebpf.map_mut("SINK_CONFIG")
            .ok_or_else(|| anyhow!("SINK_CONFIG missing"))?,
    )?;
    for (index, port) in ports.iter().enumerate() {
        config.set(index as u32, u32::from(*port), 0)?;
    }
    Ok(())
}

/// Datagrams the sinks of `ebpf` counted so far, all CPUs.
pub(super) fn sink_count(ebpf: &Ebpf) -> anyhow::Result<u64> {
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
        ebpf.map("SINK_COUNT")
            .ok_or_else(|| anyhow!("SINK_COUNT missing"))?,
    )?;
    Ok(map.get(&0, 0)?.iter().sum())
}

/// `xlb_limit` on the node's generator-facing veth, sending the benchmark
/// port to the backend links by source port.
pub struct Limit {
    _ebpf: Ebpf,
}

/// Which program of the limit object runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// The ceiling: MACs and a redirect.
    Redirect,
    /// The ceiling plus stateless NAT towards `target_port`.
    Nat { target_port: u16 },
    /// The ceiling plus one LRU insert per packet.
    Lru,
}

impl LimitKind {
    pub fn program(self) -> &'static str {
        match self {
            LimitKind::Redirect => "xlb_limit",
            LimitKind::Nat { .. } => "xlb_limit_nat",
            LimitKind::Lru => "xlb_limit_lru",
        }
    }
}

impl Limit {
    pub fn attach(lab: &BenchLab, port: u16, kind: LimitKind) -> anyhow::Result<Limit> {
        let mut ebpf = EbpfLoader::new()
            .load(crate::LIMIT_OBJECT)
            .context("loading the limit object")?;
        load_program(&mut ebpf, kind.program())?;
        // Ifindexes are the node namespace's (LAB-NOTES 3).
        let targets = lab.node.run(|| -> anyhow::Result<Vec<LimitTarget>> {
            (1..=lab.backends.len() as u8)
                .map(|index| {
                    Ok(LimitTarget {
                        ifindex: topology::ifindex(&topology::node_backend_if(index))?,
                        src_mac: topology::node_backend_mac(index),
                        dst_mac: topology::backend_mac(index),
                    })
                })
                .collect()
        })??;
        {
            let mut map: Array<_, LimitTarget> = Array::try_from(
                ebpf.map_mut("LIMIT_TARGETS")
                    .ok_or_else(|| anyhow!("LIMIT_TARGETS missing"))?,
            )?;
            for (index, target) in targets.iter().enumerate() {
                map.set(index as u32, *target, 0)?;
            }
        }
        {
            let mut config: Array<_, u32> = Array::try_from(
                ebpf.map_mut("LIMIT_CONFIG")
                    .ok_or_else(|| anyhow!("LIMIT_CONFIG missing"))?,
            )?;
            config.set(0, targets.len() as u32, 0)?;
            config.set(1, u32::from(port), 0)?;
        }
        if let LimitKind::Nat { target_port } = kind {
            let mut nat: Array<_, LimitNat> = Array::try_from(
                ebpf.map_mut("LIMIT_NAT")
                    .ok_or_else(|| anyhow!("LIMIT_NAT missing"))?,
            )?;
            for index in 1..=lab.backends.len() as u8 {
                let entry = LimitNat {
                    backend_addr_be: u32::from(Ipv4Addr::new(198, 18, index, 2)).to_be(),
                    node_addr_be: u32::from(Ipv4Addr::new(198, 18, index, 1)).to_be(),
                    backend_port_be: target_port.to_be(),
                    _pad: 0,
                };
                nat.set(u32::from(index) - 1, entry, 0)?;
            }
        }
        let name = kind.program();
        let program = program(&mut ebpf, name)?;
        lab.node
            .run(|| program.attach(NODE_GEN_IF, XdpMode::Driver).map(drop))?
            .with_context(|| format!("attaching {name} to the node"))?;
        Ok(Limit { _ebpf: ebpf })
    }
}

/// Longest extra warm-up while a cycle's flows are still being created.
const SETTLE_MAX: Duration = Duration::from_secs(5);
const SETTLE_STEP: Duration = Duration::from_millis(100);

/// Extends the warm-up (by at most `SETTLE_MAX`) until the system creates
/// fewer than 1% of `flows` per second: at a low delivered rate a fixed
/// warm-up ends before every tuple of a 60k-flow cycle has had its first
/// packet, and the window would count first packets as established ones.
fn settle(count: &dyn Fn() -> anyhow::Result<u64>, flows: u32) -> anyhow::Result<()> {
    let start = Instant::now();
    let allowed_per_step = u64::from(flows) / 1_000;
    let mut last = count()?;
    loop {
        std::thread::sleep(SETTLE_STEP);
        let now = count()?;
        if now.saturating_sub(last) <= allowed_per_step {
            break;
        }
        if start.elapsed() >= SETTLE_MAX {
            eprintln!(
                "xlb-bench: {flows} flows: still {} new flows per {SETTLE_STEP:?} after {SETTLE_MAX:?} more warm-up",
                now.saturating_sub(last)
            );
            break;
        }
        last = now;
    }
    if start.elapsed() > 2 * SETTLE_STEP {
        eprintln!(
            "xlb-bench: {flows} flows: warm-up extended by {:.1} s until the flows existed",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// One measured window of generated traffic.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Frames per second the generator sent.
    pub offered_pps: f64,
    /// Benchmark datagrams per second the backends received.
    pub delivered_pps: f64,
    /// Flows the system under test created during the window, where it
    /// says (xlb: its `fwd_new_flow` counter).
    pub new_flows: Option<u64>,
    /// The system's BPF run time in the window, where it has programs.
    pub bpf: Option<BpfTime>,
}

/// The generator: `xlb_trafficgen` (a tc program that clones the test skb
/// out of the generator's wire) run with BPF_PROG_TEST_RUN from a thread
/// inside the generator namespace.
pub struct Generator {
    ebpf: Ebpf,
    ns: String,
    ifindex: u32,
}

/// Frames per BPF_PROG_TEST_RUN call: short enough to stop promptly.
const REPEAT: u32 = 1 << 18;

impl Generator {
    pub fn load(lab: &BenchLab) -> anyhow::Result<Generator> {
        let ebpf = xlb_bench::load_trafficgen()?;
        let ifindex = lab.gen_ns.run(|| topology::ifindex(POD_IF))??;
        Ok(Generator {
            ebpf,
            ns: lab.gen_ns.name().to_owned(),
            ifindex,
        })
    }

    fn set_config(&mut self, cfg: GenConfig) -> anyhow::Result<()> {
        let mut map: Array<_, GenConfig> = Array::try_from(
            self.ebpf
                .map_mut("GEN_CONFIG")
                .ok_or_else(|| anyhow!("GEN_CONFIG missing"))?,
        )?;
        map.set(0, cfg, 0)?;
        Ok(())
    }

    fn sent(&self) -> anyhow::Result<u64> {
        let map: Array<_, u64> = Array::try_from(
            self.ebpf
                .map("GEN_SENT")
                .ok_or_else(|| anyhow!("GEN_SENT missing"))?,
        )?;
        Ok(map.get(&0, 0)?)
    }

    /// Send `flows` to `dst_port` as fast as the generator goes; after
    /// `warmup`, count what `delivered` (and `new_flows`, if given) report
    /// over `window`, and the system's BPF run time from `bpf` (summed
    /// `(run_time_ns, run_cnt)` snapshots), if given.
    #[allow(clippy::too_many_arguments)]
    pub fn measure(
        &mut self,
        dst_port: u16,
        flows: Flows,
        warmup: Duration,
        window: Duration,
        delivered: &dyn Fn() -> anyhow::Result<u64>,
        new_flows: Option<&dyn Fn() -> anyhow::Result<u64>>,
        bpf: Option<&dyn Fn() -> anyhow::Result<(u64, u64)>>,
    ) -> anyhow::Result<Window> {
        let cfg = gen_config(dst_port, flows);
        let timing = (warmup, window);
        self.measure_frames(cfg, flows, timing, delivered, new_flows, bpf)
    }

    /// [`Generator::measure`] of the frames `cfg` describes (an IPv4 or
    /// IPv6 template), `flows` as `cfg` cycles them.
    pub fn measure_frames(
        &mut self,
        cfg: GenConfig,
        flows: Flows,
        (warmup, window): (Duration, Duration),
        delivered: &dyn Fn() -> anyhow::Result<u64>,
        new_flows: Option<&dyn Fn() -> anyhow::Result<u64>>,
        bpf: Option<&dyn Fn() -> anyhow::Result<(u64, u64)>>,
    ) -> anyhow::Result<Window> {
        let frame_len = cfg.layout().2;
        self.set_config(GenConfig {
            ifindex: self.ifindex,
            ..cfg
        })?;
        let stop = AtomicBool::new(false);
        let handle = topology::open_ns(&self.ns)?;
        let ns = self.ns.clone();
        let program: &SchedClassifier = self
            .ebpf
            .program("xlb_trafficgen")
            .ok_or_else(|| anyhow!("xlb_trafficgen missing"))?
            .try_into()?;
        let this = &*self;
        std::thread::scope(|scope| -> anyhow::Result<Window> {
            let sender = scope.spawn(|| -> anyhow::Result<()> {
                topology::enter(&handle, &ns)?;
                pin_thread(0, 0);
                while !stop.load(Ordering::Relaxed) {
                    xlb_bench::send_generated_of(program, REPEAT, frame_len)?;
                }
                Ok(())
            });
            let measured = (|| -> anyhow::Result<Window> {
                std::thread::sleep(warmup);
                anyhow::ensure!(!sender.is_finished(), "the generator stopped early");
                if let (Some(count), Flows::Cycle(flows)) = (new_flows, flows) {
                    settle(count, flows)?;
                }
                let created0 = new_flows.map(|count| count()).transpose()?;
                let bpf0 = bpf.map(|snapshot| snapshot()).transpose()?;
                let (sent0, got0, t0) = (this.sent()?, delivered()?, Instant::now());
                std::thread::sleep(window);
                let (sent1, got1, t1) = (this.sent()?, delivered()?, Instant::now());
                let bpf1 = bpf.map(|snapshot| snapshot()).transpose()?;
                let created1 = new_flows.map(|count| count()).transpose()?;
                let seconds = (t1 - t0).as_secs_f64();
                Ok(Window {
                    offered_pps: (sent1 - sent0) as f64 / seconds,
                    delivered_pps: got1.saturating_sub(got0) as f64 / seconds,
                    new_flows: created0
                        .zip(created1)
                        .map(|(before, after)| after.saturating_sub(before)),
                    bpf: bpf0.zip(bpf1).and_then(|(before, after)| {
                        BpfTime::between(before, after, got1.saturating_sub(got0))
                    }),
                })
            })();
            stop.store(true, Ordering::Relaxed);
            let sent = sender
                .join()
                .map_err(|_| anyhow!("the generator thread panicked"))?;
            let window = measured?;
            sent?;
            Ok(window)
        })
    }
}

/// Pin thread `tid` (0: the calling thread) to `cpu`. Best effort: on one
/// CPU it is a no-op.
pub fn pin_thread(tid: i32, cpu: usize) {
    // SAFETY: cpu_set_t is plain data, initialised by CPU_ZERO before use;
    // sched_setaffinity only changes the affinity of the named thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Source address of flow `flow` in [`Flows::Cycle`] mode.
#[cfg(test)]
fn cycle_source(flow: u32) -> (Ipv4Addr, u16) {
    (GEN_ADDR, 1024 + (flow % 64_000) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn check(cfg: &GenConfig, seq: u64) -> (Ipv4Addr, u16) {
        let frame = frame_for(cfg, seq);
        assert_eq!(frame.len(), FRAME_LEN);
        let packet = SlicedPacket::from_ethernet(&frame).expect("parses");
        let Some(NetSlice::Ipv4(ip)) = packet.net else {
            panic!("not IPv4");
        };
        let header = ip.header().to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        assert_eq!(header.destination, NODE_ADDR.octets());
        let Some(TransportSlice::Udp(udp)) = packet.transport else {
            panic!("not UDP");
        };
        let expected = udp
            .to_header()
            .calc_checksum_ipv4(&header, udp.payload())
            .expect("checksum");
        assert_eq!(udp.checksum(), expected, "UDP checksum of seq {seq}");
        assert_eq!(udp.destination_port(), 31_000);
        assert_eq!(udp.payload(), UDP_PAYLOAD);
        (Ipv4Addr::from(header.source), udp.source_port())
    }

    /// The NAT yardstick writes what xlb's masquerade path would, with
    /// checksums an independent parser accepts (a frame the backend's
    /// stack would drop would make it a cheaper yardstick than it is).
    #[test]
    fn the_nat_yardstick_rewrites_with_valid_checksums() -> anyhow::Result<()> {
        xlb_tests::require_root()?;
        let mut ebpf = EbpfLoader::new().load(crate::LIMIT_OBJECT)?;
        load_program(&mut ebpf, "xlb_limit_nat")?;
        let mut config: Array<_, u32> =
            Array::try_from(ebpf.map_mut("LIMIT_CONFIG").context("LIMIT_CONFIG")?)?;
        config.set(0, 1, 0)?;
        config.set(1, 31_000, 0)?;
        let mut targets: Array<_, LimitTarget> =
            Array::try_from(ebpf.map_mut("LIMIT_TARGETS").context("LIMIT_TARGETS")?)?;
        let target = LimitTarget {
            ifindex: 1,
            src_mac: [2, 0, 0, 0, 1, 1],
            dst_mac: [2, 0, 0, 0, 1, 2],
        };
        targets.set(0, target, 0)?;
        let mut nat: Array<_, LimitNat> =
            Array::try_from(ebpf.map_mut("LIMIT_NAT").context("LIMIT_NAT")?)?;
        let backend = Ipv4Addr::new(198, 18, 1, 2);
        let node = Ipv4Addr::new(198, 18, 1, 1);
        let entry = LimitNat {
            backend_addr_be: u32::from(backend).to_be(),
            node_addr_be: u32::from(node).to_be(),
            backend_port_be: 8_080u16.to_be(),
            _pad: 0,
        };
        nat.set(0, entry, 0)?;
        let program = program(&mut ebpf, "xlb_limit_nat")?;
        let cfg = gen_config(31_000, Flows::New);
        for seq in [0, 1, 77_777, 123_456] {
            let ((verdict, out), _) =
                xlb_tests::testrun::test_run(program, &frame_for(&cfg, seq), 1, 1);
            assert_eq!(verdict, 4, "XDP_REDIRECT");
            let packet = SlicedPacket::from_ethernet(&out).expect("parses");
            let Some(NetSlice::Ipv4(ip)) = packet.net else {
                panic!("not IPv4");
            };
            let header = ip.header().to_header();
            assert_eq!(header.header_checksum, header.calc_header_checksum());
            assert_eq!(
                (header.source, header.destination),
                (node.octets(), backend.octets())
            );
            let Some(TransportSlice::Udp(udp)) = packet.transport else {
                panic!("not UDP");
            };
            let expected = udp.to_header().calc_checksum_ipv4(&header, udp.payload())?;
            assert_eq!(udp.checksum(), expected, "UDP checksum of seq {seq}");
            assert_eq!(udp.destination_port(), 8_080);
        }
        Ok(())
    }

    #[test]
    fn generated_frames_have_valid_checksums() {
        let cycle = gen_config(31_000, Flows::Cycle(60_000));
        for seq in [0, 1, 63_999, 64_000, 59_999, 60_000, 1_234_567] {
            let (addr, port) = check(&cycle, seq);
            let flow = xlb_bench_ebpf::lap_flow(seq, 60_000);
            assert_eq!((addr, port), cycle_source(flow as u32));
        }
        let new = gen_config(31_000, Flows::New);
        let mut seen = std::collections::HashSet::new();
        for seq in (0..200_000).step_by(997) {
            let (addr, port) = check(&new, seq);
            assert!(u32::from(addr) >= u32::from(NEW_FLOW_SOURCES));
            assert!(seen.insert((addr, port)), "tuple repeated at seq {seq}");
        }
    }

    /// The SYN template tests/tests/flood.rs sends: valid checksums, every
    /// frame a new source.
    #[test]
    fn generated_syns_have_valid_checksums() {
        let template = Template {
            dst_mac: NODE_GEN_MAC,
            src_mac: GEN_MAC,
            dst_addr: NODE_ADDR.octets(),
            dst_port: 30_999,
            segment: Segment::TcpSyn {
                seq: 0x1234_5678,
                window: 64_240,
            },
        };
        let sources = Sources {
            addr_base: u32::from(NEW_FLOW_SOURCES),
            flows: 0,
            port_base: 1024,
            port_span: 50_000,
        };
        let cfg = template.config(sources);
        for seq in [0, 1, 49_999, 50_000, 123_457] {
            let frame = frame_for(&cfg, seq);
            let packet = SlicedPacket::from_ethernet(&frame).expect("parses");
            let Some(NetSlice::Ipv4(ip)) = packet.net else {
                panic!("not IPv4");
            };
            let header = ip.header().to_header();
            assert_eq!(header.header_checksum, header.calc_header_checksum());
            let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
                panic!("not TCP");
            };
            assert!(tcp.syn() && !tcp.ack());
            assert_eq!(tcp.destination_port(), 30_999);
            assert_eq!(tcp.sequence_number(), 0x1234_5678);
            let expected = tcp
                .to_header()
                .calc_checksum_ipv4(&header, &[])
                .expect("checksum");
            assert_eq!(tcp.checksum(), expected, "TCP checksum of seq {seq}");
            let source = u32::from(NEW_FLOW_SOURCES) + (seq / 50_000) as u32;
            assert_eq!(u32::from_be_bytes(header.source), source);
            assert_eq!(u64::from(tcp.source_port()), 1024 + seq % 50_000);
        }
    }
}

//! The lab's own XDP programs (bench-ebpf/src/trafficgen.rs, limit.rs): the
//! traffic generator, the backends' counting sink, and the MAC-rewrite-and-
//! redirect ceiling. Map layouts and frame arithmetic are bench-ebpf's.

#[cfg(test)]
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader, TestRunAttrs, TestRunOptions,
    maps::{Array, PerCpuArray},
    programs::{TestRun as _, Xdp, XdpMode},
};

use xlb_bench_ebpf::{FRAME_LEN, GenConfig, LimitTarget};

use super::topology::{
    self, BenchLab, GEN_ADDR, GEN_MAC, NEW_FLOW_SOURCES, NODE_ADDR, NODE_GEN_IF, NODE_GEN_MAC,
    POD_IF,
};

const PAYLOAD: &[u8; 18] = b"xlb-bench-payload!";

/// Which tuples the generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flows {
    /// Cycle through this many source ports from the generator's address.
    Cycle(u32),
    /// Every frame a tuple never sent before (198.18.128.0/17, all ports).
    New,
}

/// The UDP frame the generator sends, as a template plus checksum bases.
pub fn gen_config(dst_port: u16, flows: Flows) -> GenConfig {
    let (src_addr_base, flow_count, src_port_base, port_span) = match flows {
        Flows::Cycle(count) => (GEN_ADDR, count, 1024u16, 64_000u16),
        Flows::New => (NEW_FLOW_SOURCES, 0, 1024, 64_000),
    };
    let udp_len = (8 + PAYLOAD.len()) as u16;
    let ip_len = 20 + udp_len;
    let mut frame = [0u8; 64];
    frame[0..6].copy_from_slice(&NODE_GEN_MAC);
    frame[6..12].copy_from_slice(&GEN_MAC);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut frame[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64; // TTL
    ip[9] = 17;
    ip[16..20].copy_from_slice(&NODE_ADDR.octets());
    let udp = &mut frame[34..42];
    udp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    frame[42..FRAME_LEN].copy_from_slice(PAYLOAD);

    let ip_csum_base = word_sum(&frame[14..34]);
    // Pseudo-header (destination, protocol, length) + header + payload; the
    // source address and port are added per frame.
    let udp_csum_base =
        word_sum(&NODE_ADDR.octets()) + 17 + u32::from(udp_len) + word_sum(&frame[34..FRAME_LEN]);
    let mut words = [0u64; 8];
    for (word, chunk) in words.iter_mut().zip(frame.chunks_exact(8)) {
        *word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
    }
    GenConfig {
        frame: words,
        src_addr_base: u32::from(src_addr_base),
        flows: flow_count,
        ip_csum_base,
        udp_csum_base,
        src_port_base,
        port_span,
        tcp: 0,
    }
}

/// Sum of big-endian 16-bit words (even length), unfolded.
fn word_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks_exact(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum()
}

/// What `xlb_trafficgen` writes for sequence number `seq`, on the host (the
/// same `GenConfig::fields`), so it can be checked by a packet library, and
/// what the AF_PACKET fallback sends.
pub fn frame_for(cfg: &GenConfig, seq: u64) -> Vec<u8> {
    use xlb_bench_ebpf::{IP_CSUM_AT, SRC_ADDR_AT, SRC_PORT_AT, UDP_CSUM_AT};
    let fields = cfg.fields(seq);
    let mut frame: Vec<u8> = cfg.frame.iter().flat_map(|w| w.to_ne_bytes()).collect();
    frame.truncate(FRAME_LEN);
    frame[IP_CSUM_AT..IP_CSUM_AT + 2].copy_from_slice(&fields.ip_csum.to_be_bytes());
    frame[SRC_ADDR_AT..SRC_ADDR_AT + 4].copy_from_slice(&fields.src_addr.to_be_bytes());
    frame[SRC_PORT_AT..SRC_PORT_AT + 2].copy_from_slice(&fields.src_port.to_be_bytes());
    frame[UDP_CSUM_AT..UDP_CSUM_AT + 2].copy_from_slice(&fields.udp_csum.to_be_bytes());
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

impl Limit {
    pub fn attach(lab: &BenchLab, port: u16) -> anyhow::Result<Limit> {
        let mut ebpf = EbpfLoader::new()
            .load(crate::LIMIT_OBJECT)
            .context("loading the limit object")?;
        load_program(&mut ebpf, "xlb_limit")?;
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
        let program = program(&mut ebpf, "xlb_limit")?;
        lab.node
            .run(|| program.attach(NODE_GEN_IF, XdpMode::Driver).map(drop))?
            .context("attaching xlb_limit to the node")?;
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
}

/// The generator: `xlb_trafficgen` run with BPF_PROG_TEST_RUN in live-frames
/// mode from a thread inside the generator namespace.
pub struct Generator {
    ebpf: Ebpf,
    ns: String,
    ifindex: u32,
    /// Frames sent by the AF_PACKET fallback (`send_by_packet_socket`).
    sent_by_socket: std::sync::atomic::AtomicU64,
    /// Set once BPF_PROG_TEST_RUN with live frames was refused (EPERM on
    /// some kernels): the fallback sends from then on.
    live_refused: AtomicBool,
}

/// Frames per BPF_PROG_TEST_RUN call: short enough to stop promptly.
const REPEAT: u32 = 1 << 18;
/// Frames per live-frames batch (the kernel's default is 64, at most 256).
const BATCH: u32 = 64;

impl Generator {
    pub fn load(lab: &BenchLab) -> anyhow::Result<Generator> {
        let mut ebpf = EbpfLoader::new()
            .load(crate::TRAFFICGEN_OBJECT)
            .context("loading the trafficgen object")?;
        load_program(&mut ebpf, "xlb_trafficgen")?;
        let ifindex = lab.gen_ns.run(|| topology::ifindex(POD_IF))??;
        Ok(Generator {
            ebpf,
            ns: lab.gen_ns.name().to_owned(),
            ifindex,
            sent_by_socket: std::sync::atomic::AtomicU64::new(0),
            live_refused: AtomicBool::new(false),
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
        Ok(map.get(&0, 0)? + self.sent_by_socket.load(Ordering::Relaxed))
    }

    /// Send `flows` to `dst_port` as fast as the generator goes; after
    /// `warmup`, count what `delivered` (and `new_flows`, if given) report
    /// over `window`.
    pub fn measure(
        &mut self,
        dst_port: u16,
        flows: Flows,
        warmup: Duration,
        window: Duration,
        delivered: &dyn Fn() -> anyhow::Result<u64>,
        new_flows: Option<&dyn Fn() -> anyhow::Result<u64>>,
    ) -> anyhow::Result<Window> {
        self.set_config(gen_config(dst_port, flows))?;
        let stop = AtomicBool::new(false);
        let handle = topology::open_ns(&self.ns)?;
        let ns = self.ns.clone();
        let ifindex = self.ifindex;
        let program: &Xdp = self
            .ebpf
            .program("xlb_trafficgen")
            .ok_or_else(|| anyhow!("xlb_trafficgen missing"))?
            .try_into()?;
        let this = &*self;
        std::thread::scope(|scope| -> anyhow::Result<Window> {
            let sender = scope.spawn(|| -> anyhow::Result<()> {
                topology::enter(&handle, &ns)?;
                pin_to_cpu(0);
                let frame = vec![0u8; FRAME_LEN];
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
                // rx_queue_index, egress_ifindex.
                let mut ctx = [0u8; 24];
                ctx[4..8].copy_from_slice(&(FRAME_LEN as u32).to_ne_bytes());
                ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
                while !stop.load(Ordering::Relaxed) && !this.live_refused.load(Ordering::Relaxed) {
                    let sent = program.test_run(TestRunOptions {
                        data_in: Some(&frame),
                        ctx_in: Some(&ctx),
                        repeat: REPEAT,
                        attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                        ..TestRunOptions::default()
                    });
                    match sent {
                        Ok(_) => {}
                        Err(error) if is_eperm(&error) => {
                            eprintln!(
                                "xlb-bench: BPF_PROG_TEST_RUN with live frames refused \
                                 ({error}); sending from an AF_PACKET socket instead \
                                 (slower: read the ratios)"
                            );
                            this.live_refused.store(true, Ordering::Relaxed);
                        }
                        Err(error) => {
                            return Err(anyhow::Error::new(error)
                                .context("BPF_PROG_TEST_RUN (live frames) of xlb_trafficgen"));
                        }
                    }
                }
                if this.live_refused.load(Ordering::Relaxed) {
                    send_by_packet_socket(ifindex, dst_port, flows, &stop, &this.sent_by_socket)?;
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
                let (sent0, got0, t0) = (this.sent()?, delivered()?, Instant::now());
                std::thread::sleep(window);
                let (sent1, got1, t1) = (this.sent()?, delivered()?, Instant::now());
                let created1 = new_flows.map(|count| count()).transpose()?;
                let seconds = (t1 - t0).as_secs_f64();
                Ok(Window {
                    offered_pps: (sent1 - sent0) as f64 / seconds,
                    delivered_pps: got1.saturating_sub(got0) as f64 / seconds,
                    new_flows: created0
                        .zip(created1)
                        .map(|(before, after)| after.saturating_sub(before)),
                })
            })();
            stop.store(true, Ordering::Relaxed);
            let sent = sender
                .join()
                .map_err(|_| anyhow!("the generator thread panicked"))?;
            // The generator's own error says why it stopped early.
            sent?;
            measured
        })
    }
}

fn is_eperm(error: &aya::programs::ProgramError) -> bool {
    let text = format!("{error:?}");
    text.contains("PermissionDenied") || text.contains("os error 1)")
}

/// Frames the AF_PACKET fallback cycles through for `flows` (for new-flow
/// floods, enough that a tuple comes back only after its flow timed out).
fn fallback_frames(dst_port: u16, flows: Flows) -> Vec<Vec<u8>> {
    let cfg = gen_config(dst_port, flows);
    let count = match flows {
        Flows::Cycle(count) => u64::from(count.clamp(1, 65_536)),
        Flows::New => 1 << 18,
    };
    (0..count).map(|seq| frame_for(&cfg, seq)).collect()
}

/// The generator without BPF_PROG_TEST_RUN: the same frames from an
/// AF_PACKET socket on the generator's interface (qdisc bypassed), 64 per
/// `sendmmsg`, until `stop`.
fn send_by_packet_socket(
    ifindex: u32,
    dst_port: u16,
    flows: Flows,
    stop: &AtomicBool,
    sent: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let frames = fallback_frames(dst_port, flows);
    // SAFETY: plain socket(2) call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    anyhow::ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: the option value is a c_int we own, its size passed.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    // SAFETY: sockaddr_ll is plain data; all-zero then filled in.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = ifindex as i32;
    address.sll_halen = 6;
    const BATCH_FRAMES: usize = 64;
    let mut next = 0usize;
    let mut iovecs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH_FRAMES];
    // SAFETY: mmsghdr is plain data; all-zero is valid.
    let mut messages: [libc::mmsghdr; BATCH_FRAMES] = unsafe { std::mem::zeroed() };
    while !stop.load(Ordering::Relaxed) {
        for (iovec, message) in iovecs.iter_mut().zip(messages.iter_mut()) {
            let frame = &frames[next];
            next = (next + 1) % frames.len();
            iovec.iov_base = frame.as_ptr() as *mut libc::c_void;
            iovec.iov_len = frame.len();
            message.msg_hdr.msg_iov = iovec;
            message.msg_hdr.msg_iovlen = 1;
            message.msg_hdr.msg_name = (&mut address as *mut libc::sockaddr_ll).cast();
            message.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        }
        // SAFETY: every message points at a live frame and at `address`,
        // both outliving the call.
        let done = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                messages.as_mut_ptr(),
                BATCH_FRAMES as libc::c_uint,
                0,
            )
        };
        if done > 0 {
            sent.fetch_add(done as u64, Ordering::Relaxed);
        } else {
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => std::thread::yield_now(),
                _ => anyhow::bail!("AF_PACKET sendmmsg: {error}"),
            }
        }
    }
    Ok(())
}

/// Pin the calling thread to `cpu` (best effort: on one CPU it is a no-op).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, initialised by CPU_ZERO before use;
    // sched_setaffinity(0, ...) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
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
        assert_eq!(udp.payload(), PAYLOAD);
        (Ipv4Addr::from(header.source), udp.source_port())
    }

    #[test]
    fn generated_frames_have_valid_checksums() {
        let cycle = gen_config(31_000, Flows::Cycle(60_000));
        for seq in [0, 1, 63_999, 64_000, 59_999, 60_000, 1_234_567] {
            let (addr, port) = check(&cycle, seq);
            assert_eq!((addr, port), cycle_source((seq % 60_000) as u32));
        }
        let new = gen_config(31_000, Flows::New);
        let mut seen = std::collections::HashSet::new();
        for seq in (0..200_000).step_by(997) {
            let (addr, port) = check(&new, seq);
            assert!(u32::from(addr) >= u32::from(NEW_FLOW_SOURCES));
            assert!(seen.insert((addr, port)), "tuple repeated at seq {seq}");
        }
    }
}

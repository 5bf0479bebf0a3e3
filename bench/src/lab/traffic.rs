//! Socket traffic: the backends' TCP accept-and-close and UDP echo servers,
//! and the generator namespace's TCP connect/close and UDP latency clients.
//! Threads enter the namespaces themselves; servers stop when dropped.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};

use super::services::{ECHO_TARGET_PORT, TCP_TARGET_PORT};
use super::topology::{self, BenchLab, NODE_ADDR};

/// How often blocked server threads look at the stop flag.
const TICK: Duration = Duration::from_millis(100);
/// Accepting threads per backend namespace.
const ACCEPTORS: usize = 2;

/// The servers in every backend namespace.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Servers {
    pub fn start(lab: &BenchLab) -> anyhow::Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = Servers {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for (slot, backend) in lab.backends.iter().enumerate() {
            // One echo socket per pod address: a socket bound to 0.0.0.0
            // would answer from the namespace's first address, which NAT
            // on the node does not recognise as the flow's backend.
            let pods: Vec<Ipv4Addr> = (0..topology::PODS_PER_BACKEND)
                .map(|pod| Ipv4Addr::new(198, 18, slot as u8 + 1, 2 + pod))
                .collect();
            // Bind in the namespace first, so a failure is reported here.
            let (listener, echoes) = backend.run(|| -> anyhow::Result<_> {
                let listener = TcpListener::bind(("0.0.0.0", TCP_TARGET_PORT))
                    .context("binding the TCP server")?;
                // SAFETY: listen(2) on a socket we own; a second listen
                // only raises the backlog.
                unsafe { libc::listen(listener.as_raw_fd(), 4096) };
                listener.set_nonblocking(true)?;
                let mut echoes = Vec::new();
                for pod in &pods {
                    let echo = UdpSocket::bind((*pod, ECHO_TARGET_PORT))
                        .context("binding the UDP echo server")?;
                    echo.set_read_timeout(Some(TICK))?;
                    echoes.push(echo);
                }
                Ok((listener, echoes))
            })??;
            let listener = Arc::new(listener);
            for _ in 0..ACCEPTORS {
                let (listener, stop) = (listener.clone(), stop.clone());
                servers.threads.push(std::thread::spawn(move || {
                    accept_and_close(&listener, &stop)
                }));
            }
            for echo in echoes {
                let stop = stop.clone();
                servers
                    .threads
                    .push(std::thread::spawn(move || echo_loop(&echo, &stop)));
            }
        }
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            match thread.join() {
                Ok(Err(error)) => eprintln!("xlb-bench: a backend server failed: {error:#}"),
                Err(_) => eprintln!("xlb-bench: a backend server panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// Wait up to `TICK` for `fd` to be readable.
fn readable(fd: i32) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut poll, 1, TICK.as_millis() as i32) > 0 }
}

/// Accept connections and close them at once (the server closes first, as
/// an HTTP/1.0 server does, so TIME_WAIT stays on the server side).
fn accept_and_close(listener: &TcpListener, stop: &AtomicBool) -> anyhow::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener.as_raw_fd()) {
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => drop(stream),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.raw_os_error() == Some(libc::EMFILE) => {
                    std::thread::sleep(Duration::from_millis(1));
                    break;
                }
                Err(_) => break,
            }
        }
    }
    Ok(())
}

fn echo_loop(socket: &UdpSocket, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((len, peer)) => {
                let _ = socket.send_to(&buf[..len], peer);
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => return Err(error).context("UDP echo server"),
        }
    }
    Ok(())
}

/// TCP connections per second: `clients` threads in the generator namespace
/// each connect to `NODE_ADDR:node_port`, wait for the server's close, and
/// close, for `duration` (after `warmup`, not counted).
pub fn tcp_connect_rate(
    lab: &BenchLab,
    node_port: u16,
    clients: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<(f64, u64)> {
    let target = SocketAddr::V4(SocketAddrV4::new(NODE_ADDR, node_port));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for index in 0..clients {
        let (done, failed, counting, stop) =
            (done.clone(), failed.clone(), counting.clone(), stop.clone());
        threads.push(topology::spawn_in(
            lab.gen_ns.name(),
            &format!("tcp-client-{index}"),
            move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let ok = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                        .and_then(|mut stream| {
                            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                            // The server closes first: read until EOF.
                            while stream.read(&mut buf)? > 0 {}
                            Ok(())
                        })
                        .is_ok();
                    if counting.load(Ordering::Relaxed) {
                        if ok { &done } else { &failed }.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
        )?);
    }
    std::thread::sleep(warmup);
    counting.store(true, Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(duration);
    counting.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow!("a TCP client thread panicked"))??;
    }
    Ok((
        done.load(Ordering::Relaxed) as f64 / elapsed,
        failed.load(Ordering::Relaxed),
    ))
}

/// Round-trip times of one UDP request at a time, paced at `rate` per
/// second for `count` requests; lost requests (no answer within 200 ms)
/// are counted, not timed.
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub lost: u64,
}

pub fn udp_latency(
    lab: &BenchLab,
    node_port: u16,
    rate: u32,
    count: u32,
) -> anyhow::Result<Latency> {
    let target = SocketAddrV4::new(NODE_ADDR, node_port);
    let mut samples = lab
        .gen_ns
        .run(move || -> anyhow::Result<(Vec<f64>, u64)> {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.connect(target)?;
            socket.set_read_timeout(Some(Duration::from_millis(200)))?;
            let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let mut rtts = Vec::with_capacity(count as usize);
            let mut lost = 0;
            let mut buf = [0u8; 64];
            let start = Instant::now();
            for seq in 0..count {
                let due = start + interval * seq;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let request = u64::from(seq).to_be_bytes();
                let sent = Instant::now();
                socket.send(&request)?;
                loop {
                    match socket.recv(&mut buf) {
                        Ok(8) if buf[..8] == request => {
                            rtts.push(sent.elapsed().as_secs_f64() * 1e6);
                            break;
                        }
                        // A late answer to an earlier request.
                        Ok(_) => continue,
                        Err(_) => {
                            lost += 1;
                            break;
                        }
                    }
                }
            }
            Ok((rtts, lost))
        })??;
    anyhow::ensure!(
        !samples.0.is_empty(),
        "no UDP echo came back through NodePort {node_port}"
    );
    samples.0.sort_by(f64::total_cmp);
    let at = |q: f64| samples.0[((samples.0.len() - 1) as f64 * q).round() as usize];
    Ok(Latency {
        p50_us: at(0.50),
        p99_us: at(0.99),
        lost: samples.1,
    })
}

/// Wait until a TCP connection through `node_port` succeeds (the system
/// under test is serving), or fail after `timeout`.
pub fn wait_serving(lab: &BenchLab, node_port: u16, timeout: Duration) -> anyhow::Result<()> {
    let target = SocketAddr::V4(SocketAddrV4::new(NODE_ADDR, node_port));
    let deadline = Instant::now() + timeout;
    lab.gen_ns.run(|| {
        loop {
            if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "nothing accepted TCP connections to {target} within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })?
}

//! Measuring loss: a steady UDP stream of numbered datagrams from one socket
//! (one flow) to an echo service, and which of them came back. Also the
//! small helpers the semantics and restart tests share.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, ensure};
use xlb_tests::Netns;
use xlb_tests::client::{IO_TIMEOUT, Who};

/// Datagrams per second the loss tests send (one every 500 µs).
pub const RATE: u32 = 2000;
/// How long replies may still arrive after the last datagram.
const DRAIN: Duration = Duration::from_millis(500);
const MAGIC: &[u8; 4] = b"XLBS";

/// What a stream measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    /// Longest run of consecutive lost datagrams, as time at `RATE`.
    pub longest_gap: Duration,
    pub duration: Duration,
}

impl Report {
    /// Datagrams lost beyond those `drops` a starved receiver's socket
    /// buffer accounts for (not the path through xlb).
    pub fn lost_beyond(&self, drops: u64) -> u64 {
        self.lost.saturating_sub(drops)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} datagrams sent over {:.1} s at {RATE}/s, {} echoed back, {} lost (longest gap {:.1} ms)",
            self.sent,
            self.duration.as_secs_f64(),
            self.received,
            self.lost,
            self.longest_gap.as_secs_f64() * 1000.0
        )
    }
}

/// A running stream; `finish` stops it and reports.
pub struct Stream {
    socket: UdpSocket,
    stop: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
    sender: Option<JoinHandle<u64>>,
    receiver: Option<JoinHandle<BTreeSet<u64>>>,
    whos: Arc<Mutex<Vec<Who>>>,
    started: Instant,
}

impl Stream {
    /// Starts sending to `target` from a socket in `netns` (the client).
    pub fn start(netns: &Netns, target: SocketAddr) -> anyhow::Result<Stream> {
        let socket = netns.run(|| -> std::io::Result<UdpSocket> {
            let any: IpAddr = match target {
                SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
            };
            let socket = UdpSocket::bind((any, 0))?;
            grow_receive_buffer(&socket);
            socket.connect(target)?;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok(socket)
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_receiving = Arc::new(AtomicBool::new(false));
        let whos = Arc::new(Mutex::new(Vec::new()));
        let sender = {
            let socket = socket.try_clone()?;
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || send(&socket, &stop))
        };
        let receiver = {
            let socket = socket.try_clone()?;
            let stop = Arc::clone(&stop_receiving);
            let whos = Arc::clone(&whos);
            std::thread::spawn(move || receive(&socket, &stop, &whos))
        };
        Ok(Stream {
            socket,
            stop,
            stop_receiving,
            sender: Some(sender),
            receiver: Some(receiver),
            whos,
            started: Instant::now(),
        })
    }

    /// Asks the backend that serves the stream's flow who it is.
    pub fn who(&self) -> anyhow::Result<Who> {
        let before = self.whos.lock().map_or(0, |whos| whos.len());
        let deadline = Instant::now() + IO_TIMEOUT;
        while Instant::now() < deadline {
            self.socket.send(b"WHO\n")?;
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_millis(200) {
                if let Ok(whos) = self.whos.lock()
                    && whos.len() > before
                    && let Some(who) = whos.last()
                {
                    return Ok(who.clone());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Err(anyhow!("the stream's backend did not answer WHO"))
    }

    /// Stops sending, waits for late replies, and reports.
    pub fn finish(mut self) -> anyhow::Result<Report> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .sender
            .take()
            .map(JoinHandle::join)
            .transpose()
            .map_err(|_| anyhow!("sender panicked"))?
            .unwrap_or(0);
        let duration = self.started.elapsed();
        std::thread::sleep(DRAIN);
        self.stop_receiving.store(true, Ordering::Relaxed);
        let received = self
            .receiver
            .take()
            .map(JoinHandle::join)
            .transpose()
            .map_err(|_| anyhow!("receiver panicked"))?
            .unwrap_or_default();
        let mut longest = 0u64;
        let mut run = 0u64;
        for seq in 0..sent {
            if received.contains(&seq) {
                run = 0;
            } else {
                run += 1;
                longest = longest.max(run);
            }
        }
        let received_count = received.range(..sent).count() as u64;
        Ok(Report {
            sent,
            received: received_count,
            lost: sent - received_count,
            longest_gap: Duration::from_micros(longest * 1_000_000 / u64::from(RATE)),
            duration,
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.stop_receiving.store(true, Ordering::Relaxed);
    }
}

/// 4 MiB of receive buffer (forced: the tests run as root), so a receiver
/// thread starved for a while by a busy machine does not drop replies.
fn grow_receive_buffer(socket: &UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let size: libc::c_int = 4 << 20;
    // SAFETY: setsockopt reads an int from a valid pointer for the call.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn send(socket: &UdpSocket, stop: &AtomicBool) -> u64 {
    let interval = Duration::from_micros(1_000_000 / u64::from(RATE));
    let start = Instant::now();
    let mut seq = 0u64;
    let mut payload = [0u8; 32];
    payload[..4].copy_from_slice(MAGIC);
    while !stop.load(Ordering::Relaxed) {
        let due = start + interval * u32::try_from(seq).unwrap_or(u32::MAX);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        payload[4..12].copy_from_slice(&seq.to_be_bytes());
        // A refused send (ICMP from an earlier datagram) is a lost one.
        let _ = socket.send(&payload);
        seq += 1;
    }
    seq
}

fn receive(socket: &UdpSocket, stop: &AtomicBool, whos: &Mutex<Vec<Who>>) -> BTreeSet<u64> {
    let mut received = BTreeSet::new();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let len = match socket.recv(&mut buf) {
            Ok(len) => len,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue;
            }
            Err(_) => continue, // ECONNREFUSED from an ICMP error: keep going.
        };
        let datagram = &buf[..len];
        if len >= 12 && &datagram[..4] == MAGIC {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&datagram[4..12]);
            received.insert(u64::from_be_bytes(seq));
        } else if let Ok(line) = std::str::from_utf8(datagram)
            && let Ok(who) = line.parse::<Who>()
            && let Ok(mut whos) = whos.lock()
        {
            whos.push(who);
        }
    }
    received
}

/// A TCP connection to an echo service kept open across changes.
pub struct Connection {
    stream: TcpStream,
    pub who: Who,
    exchanges: u32,
}

impl Connection {
    /// Connects from `netns` and asks the backend who it is.
    pub fn open(netns: &Netns, target: SocketAddr) -> anyhow::Result<Connection> {
        let mut stream = netns.run(|| TcpStream::connect_timeout(&target, IO_TIMEOUT))??;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.write_all(b"WHO\n")?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            stream
                .read_exact(&mut byte)
                .context("reading the WHO line")?;
            line.push(byte[0]);
        }
        let who: Who = std::str::from_utf8(&line)?.parse()?;
        Ok(Connection {
            stream,
            who,
            exchanges: 0,
        })
    }

    /// Sends a line and checks it comes back, on the same connection.
    pub fn exchange(&mut self) -> anyhow::Result<()> {
        self.exchanges += 1;
        let line = format!("exchange {} to {}\n", self.exchanges, self.who.name);
        self.stream
            .write_all(line.as_bytes())
            .with_context(|| format!("writing to {}", self.who.name))?;
        let mut echoed = vec![0u8; line.len()];
        self.stream
            .read_exact(&mut echoed)
            .with_context(|| format!("exchange {} with {}", self.exchanges, self.who.name))?;
        ensure!(
            echoed == line.as_bytes(),
            "{} echoed other bytes",
            self.who.name
        );
        Ok(())
    }
}

/// The count the agent logged for `counter` (`name=N` in its exit line).
pub fn counter(log: &str, counter: &str) -> u64 {
    let needle = format!("{counter}=");
    log.lines()
        .filter(|line| line.contains("packet counters:"))
        .filter_map(|line| {
            let at = line.find(&needle)? + needle.len();
            let digits: String = line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .next_back()
        .unwrap_or(0)
}

/// Socket-buffer drops (see [`socket_drops`]) in some namespaces, counted
/// from `start`.
pub struct SocketDrops<'a> {
    namespaces: Vec<&'a Netns>,
    before: u64,
}

impl<'a> SocketDrops<'a> {
    pub fn start(namespaces: &[&'a Netns]) -> SocketDrops<'a> {
        let mut drops = SocketDrops {
            namespaces: namespaces.to_vec(),
            before: 0,
        };
        drops.before = drops.total();
        drops
    }

    /// Drops since `start`.
    pub fn since_start(&self) -> u64 {
        self.total() - self.before
    }

    fn total(&self) -> u64 {
        self.namespaces
            .iter()
            .map(|netns| socket_drops(netns))
            .sum()
    }
}

/// UDP datagrams the kernel of `netns` dropped for want of socket buffer
/// (`RcvbufErrors` in /proc/net/snmp, `Udp6RcvbufErrors` in
/// /proc/net/snmp6): loss of a starved receiver, not of the path in between.
fn socket_drops(netns: &Netns) -> u64 {
    let ipv4 = netns
        .exec("cat", &["/proc/net/snmp"])
        .ok()
        .and_then(|snmp| {
            let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
            let (names, values) = (udp.next()?, udp.next()?);
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == "RcvbufErrors")
                .and_then(|(_, value)| value.parse().ok())
        });
    // One `name value` line each; absent where IPv6 is off.
    let ipv6 = netns
        .exec("cat", &["/proc/net/snmp6"])
        .ok()
        .and_then(|snmp6| {
            snmp6.lines().find_map(|line| {
                let (name, value) = line.split_once(char::is_whitespace)?;
                (name == "Udp6RcvbufErrors").then(|| value.trim().parse().ok())?
            })
        });
    ipv4.unwrap_or(0) + ipv6.unwrap_or(0)
}

//! Talking to the echo backends through xlb with plain `std::net` sockets
//! (create them inside the client namespace with [`crate::in_netns`]).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};

/// Default timeout for one request/reply over the lab.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// An echo server's answer to `WHO`: `name=NAME local=IP:PORT peer=IP:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    /// The backend's name, `backend-N`.
    pub name: String,
    /// The address the backend was reached at (after DNAT: its own).
    pub local: SocketAddr,
    /// The client as the backend saw it (after masquerade: the node).
    pub peer: SocketAddr,
}

impl FromStr for Who {
    type Err = anyhow::Error;

    fn from_str(line: &str) -> anyhow::Result<Who> {
        let mut name = None;
        let mut local = None;
        let mut peer = None;
        for field in line.trim_end().split(' ') {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| anyhow!("WHO answer {line:?}: field {field:?} is not key=value"))?;
            match key {
                "name" => name = Some(value.to_owned()),
                "local" => {
                    local = Some(
                        value
                            .parse()
                            .with_context(|| format!("WHO answer {line:?}: local"))?,
                    )
                }
                "peer" => {
                    peer = Some(
                        value
                            .parse()
                            .with_context(|| format!("WHO answer {line:?}: peer"))?,
                    )
                }
                _ => bail!("WHO answer {line:?}: unknown field {key:?}"),
            }
        }
        Ok(Who {
            name: name.ok_or_else(|| anyhow!("WHO answer {line:?} has no name="))?,
            local: local.ok_or_else(|| anyhow!("WHO answer {line:?} has no local="))?,
            peer: peer.ok_or_else(|| anyhow!("WHO answer {line:?} has no peer="))?,
        })
    }
}

/// Source ports [`udp_socket`] hands out: below the kernel's ephemeral range
/// (32768-60999), so they never meet a port the kernel picked.
const UDP_SOURCE_PORTS: std::ops::Range<u16> = 10_000..32_768;
static NEXT_UDP_PORT: AtomicU16 = AtomicU16::new(UDP_SOURCE_PORTS.start);

/// A UDP socket with `IO_TIMEOUT` read timeout, on a source port this process
/// has not handed out before: each socket is a new flow for xlb, even after
/// earlier sockets were closed (the kernel may give a closed socket's
/// ephemeral port to the next one, which would join the old flow). Ports
/// wrap after about 22,000 sockets. Call it inside the client namespace.
pub fn udp_socket() -> anyhow::Result<UdpSocket> {
    udp_socket_on(Ipv4Addr::UNSPECIFIED.into())
}

/// As [`udp_socket`], an IPv6 socket (bound to `::`).
pub fn udp_socket6() -> anyhow::Result<UdpSocket> {
    udp_socket_on(Ipv6Addr::UNSPECIFIED.into())
}

/// As [`udp_socket`], of the family of `target`.
pub fn udp_socket_for(target: SocketAddr) -> anyhow::Result<UdpSocket> {
    match target {
        SocketAddr::V4(_) => udp_socket(),
        SocketAddr::V6(_) => udp_socket6(),
    }
}

fn udp_socket_on(ip: IpAddr) -> anyhow::Result<UdpSocket> {
    let span = UDP_SOURCE_PORTS.end - UDP_SOURCE_PORTS.start;
    for _ in 0..span {
        let offset = NEXT_UDP_PORT.fetch_add(1, Ordering::Relaxed) % span;
        let port = UDP_SOURCE_PORTS.start + offset;
        match UdpSocket::bind((ip, port)) {
            Ok(socket) => {
                socket.set_read_timeout(Some(IO_TIMEOUT))?;
                return Ok(socket);
            }
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(error) => return Err(error).context(format!("binding UDP port {port}")),
        }
    }
    bail!("no free UDP source port in {UDP_SOURCE_PORTS:?}")
}

/// Send `payload` to `target` and wait for one datagram; returns the reply
/// and the address it came from (xlb must answer from `target` itself).
pub fn udp_exchange(
    socket: &UdpSocket,
    target: SocketAddr,
    payload: &[u8],
) -> anyhow::Result<(Vec<u8>, SocketAddr)> {
    socket
        .send_to(payload, target)
        .with_context(|| format!("sending a UDP datagram to {target}"))?;
    let mut buf = vec![0u8; 65_536];
    let (len, from) = socket.recv_from(&mut buf).with_context(|| {
        format!(
            "no UDP reply from {target} to local port {} within {:?}",
            socket.local_addr().map(|a| a.port()).unwrap_or_default(),
            socket.read_timeout().ok().flatten().unwrap_or_default()
        )
    })?;
    buf.truncate(len);
    Ok((buf, from))
}

/// `WHO` over UDP; returns the answer and the reply's source address.
pub fn udp_who(socket: &UdpSocket, target: SocketAddr) -> anyhow::Result<(Who, SocketAddr)> {
    let (reply, from) = udp_exchange(socket, target, b"WHO\n")?;
    let line = String::from_utf8(reply).context("WHO answer over UDP is not UTF-8")?;
    Ok((line.parse()?, from))
}

/// One TCP connection: `WHO\n`, then `payload`, half-close; read the WHO line
/// and the echo to EOF. Writing runs on its own thread so payloads larger
/// than the socket buffers cannot deadlock.
pub fn tcp_who_echo(target: SocketAddr, payload: &[u8]) -> anyhow::Result<Who> {
    tcp_who_echo_timeout(target, payload, IO_TIMEOUT)
}

/// [`tcp_who_echo`] with `timeout` for the connect and for each read/write.
pub fn tcp_who_echo_timeout(
    target: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> anyhow::Result<Who> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    ensure!(
        stream.peer_addr()? == target,
        "connected to {target} but the peer is {}",
        stream.peer_addr()?
    );
    let mut writer = stream.try_clone()?;
    let received = std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> std::io::Result<()> {
            writer.write_all(b"WHO\n")?;
            writer.write_all(payload)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut received = Vec::with_capacity(payload.len() + 128);
        let read = stream.read_to_end(&mut received);
        let sent = sender.join().expect("TCP sender thread panicked");
        sent.with_context(|| format!("sending {} bytes to {target}", payload.len()))?;
        read.with_context(|| {
            format!(
                "reading the echo from {target} ({} of {} bytes and the WHO line arrived)",
                received.len(),
                payload.len()
            )
        })?;
        anyhow::Ok(received)
    })?;
    let newline = received
        .iter()
        .position(|&byte| byte == b'\n')
        .ok_or_else(|| anyhow!("{target} sent no WHO line ({} bytes)", received.len()))?;
    let who: Who = std::str::from_utf8(&received[..newline])
        .context("WHO answer over TCP is not UTF-8")?
        .parse()?;
    let echoed = &received[newline + 1..];
    ensure!(
        echoed.len() == payload.len(),
        "{target} ({}) echoed {} bytes, expected {}",
        who.name,
        echoed.len(),
        payload.len()
    );
    ensure!(
        echoed == payload,
        "{target} ({}) echoed different bytes (first difference at offset {})",
        who.name,
        echoed
            .iter()
            .zip(payload)
            .position(|(a, b)| a != b)
            .unwrap_or(0)
    );
    Ok(who)
}

/// `len` bytes of a recognisable pattern seeded by `seed`.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

/// `GET /healthz` from the agent's listener at `address`, as a kubelet
/// probe does: how long the 200 answer took, or why there was none.
pub fn healthz(address: SocketAddr, timeout: Duration) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    let mut stream =
        TcpStream::connect_timeout(&address, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: xlb\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    if answer.starts_with("HTTP/1.1 200 ") {
        Ok(started.elapsed())
    } else {
        Err(format!("answer {answer:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_who_line() {
        let who: Who = "name=backend-1 local=[2001:db8:1::2]:3333 peer=[2001:db8:1::1]:40001\n"
            .parse()
            .unwrap();
        assert_eq!(who.local, "[2001:db8:1::2]:3333".parse().unwrap());
        assert_eq!(who.peer, "[2001:db8:1::1]:40001".parse().unwrap());
        let who: Who = "name=backend-2 local=198.18.2.2:4444 peer=198.18.2.1:40001\n"
            .parse()
            .unwrap();
        assert_eq!(who.name, "backend-2");
        assert_eq!(who.local, "198.18.2.2:4444".parse().unwrap());
        assert_eq!(who.peer, "198.18.2.1:40001".parse().unwrap());
        assert!("name=x local=1.2.3.4:5".parse::<Who>().is_err());
        assert!("hello".parse::<Who>().is_err());
    }

    #[test]
    fn pattern_differs_by_seed() {
        assert_eq!(pattern(100, 1), pattern(100, 1));
        assert_ne!(pattern(100, 1), pattern(100, 2));
    }
}

//! `xlb-echo`: the backend pod of xlb's lab. Echoes UDP datagrams and TCP
//! streams, and answers `WHO` with the name, local and peer address it saw, so
//! a test can tell which backend served it and whether it was masqueraded.

mod pktinfo;
mod v6only;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;

use anyhow::{Context as _, bail};
use clap::Parser;

/// UDP and TCP echo server for xlb's lab.
///
/// UDP: each datagram is sent back; a datagram `WHO` (optionally ending in a
/// newline) is answered with `name=NAME local=IP:PORT peer=IP:PORT`.
/// TCP: a connection whose first four bytes are `WHO\n` gets that line first;
/// every other byte is echoed until the client half-closes.
#[derive(Debug, Parser)]
#[command(name = "xlb-echo")]
struct Args {
    /// Name reported in WHO answers (e.g. backend-1).
    #[arg(long)]
    name: String,
    /// TCP address to listen on (repeatable), e.g. 0.0.0.0:3333; an IPv6
    /// one, e.g. [::]:3333, listens for IPv6 only.
    #[arg(long = "tcp", value_name = "ADDR:PORT")]
    tcp: Vec<SocketAddr>,
    /// UDP address to listen on (repeatable), e.g. 0.0.0.0:4444; an IPv6
    /// one, e.g. [::]:4444, receives IPv6 only.
    #[arg(long = "udp", value_name = "ADDR:PORT")]
    udp: Vec<SocketAddr>,
}

const WHO_TCP: &[u8] = b"WHO\n";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.tcp.is_empty() && args.udp.is_empty() {
        bail!("nothing to serve: give at least one --tcp ADDR:PORT or --udp ADDR:PORT");
    }

    // Bind everything before announcing, so "listening" means ready.
    let mut tcp = Vec::new();
    for addr in &args.tcp {
        let listener = v6only::tcp_listener(*addr)
            .with_context(|| format!("binding TCP listener on {addr}"))?;
        tcp.push(listener);
    }
    let mut udp = Vec::new();
    for addr in &args.udp {
        let socket =
            v6only::udp_socket(*addr).with_context(|| format!("binding UDP socket on {addr}"))?;
        pktinfo::enable(&socket)
            .with_context(|| format!("enabling IP(V6)_PKTINFO on UDP socket {addr}"))?;
        udp.push(socket);
    }

    let mut announce = format!("xlb-echo {} listening:", args.name);
    for listener in &tcp {
        announce.push_str(&format!(" tcp={}", listener.local_addr()?));
    }
    for socket in &udp {
        announce.push_str(&format!(" udp={}", socket.local_addr()?));
    }
    println!("{announce}");
    io::stdout().flush()?;

    let name: &'static str = Box::leak(args.name.into_boxed_str());
    let mut servers = Vec::new();
    for listener in tcp {
        servers.push(thread::spawn(move || serve_tcp(name, listener)));
    }
    for socket in udp {
        servers.push(thread::spawn(move || serve_udp(name, socket)));
    }
    for server in servers {
        server
            .join()
            .map_err(|_| anyhow::anyhow!("a server thread panicked"))??;
    }
    Ok(())
}

fn who_line(name: &str, local: SocketAddr, peer: SocketAddr) -> String {
    format!("name={name} local={local} peer={peer}\n")
}

/// True if `datagram` is `WHO`, `WHO\n` or `WHO\r\n`.
fn is_udp_who(datagram: &[u8]) -> bool {
    let trimmed = datagram
        .strip_suffix(b"\n")
        .map(|rest| rest.strip_suffix(b"\r").unwrap_or(rest))
        .unwrap_or(datagram);
    trimmed == b"WHO"
}

fn serve_udp(name: &'static str, socket: UdpSocket) -> anyhow::Result<()> {
    let bound = socket.local_addr()?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = match pktinfo::recv(&socket, &mut buf) {
            Ok(received) => received,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error).context(format!("receiving on UDP {bound}")),
        };
        let datagram = &buf[..received.len];
        // The address the client actually sent to (bound may be 0.0.0.0 or ::).
        let local = SocketAddr::new(received.local_ip.unwrap_or(bound.ip()), bound.port());
        let sent = if is_udp_who(datagram) {
            socket.send_to(
                who_line(name, local, received.peer).as_bytes(),
                received.peer,
            )
        } else {
            socket.send_to(datagram, received.peer)
        };
        if let Err(error) = sent {
            // One unreachable client must not stop the server.
            eprintln!(
                "xlb-echo {name}: UDP reply to {} failed: {error}",
                received.peer
            );
        }
    }
}

fn serve_tcp(name: &'static str, listener: TcpListener) -> anyhow::Result<()> {
    let bound = listener.local_addr()?;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                thread::spawn(move || {
                    if let Err(error) = serve_connection(name, stream) {
                        eprintln!("xlb-echo {name}: TCP connection from {peer}: {error}");
                    }
                });
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => eprintln!("xlb-echo {name}: accept on TCP {bound} failed: {error}"),
        }
    }
}

/// Echo one connection until the client half-closes, then close our side.
fn serve_connection(name: &str, mut stream: TcpStream) -> io::Result<()> {
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;

    // Read only while the bytes so far could still be `WHO\n`, so an
    // interactive client typing something else is echoed at once.
    let mut head = Vec::with_capacity(WHO_TCP.len());
    let mut byte = [0u8; 1];
    while head.len() < WHO_TCP.len() && WHO_TCP.starts_with(&head) {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => head.push(byte[0]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    if head == WHO_TCP {
        stream.write_all(who_line(name, local, peer).as_bytes())?;
    } else {
        stream.write_all(&head)?;
    }

    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        stream.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP server named `t` on a free loopback port, and a client
    /// connected to it (reads time out after 10 s).
    fn connect_to_server() -> (std::net::SocketAddr, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || serve_tcp("t", listener));

        let client = TcpStream::connect(addr).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        (addr, client)
    }

    #[test]
    fn udp_who_accepts_optional_newline() {
        assert!(is_udp_who(b"WHO"));
        assert!(is_udp_who(b"WHO\n"));
        assert!(is_udp_who(b"WHO\r\n"));
        assert!(!is_udp_who(b"WHO\n\n"));
        assert!(!is_udp_who(b"who"));
        assert!(!is_udp_who(b"WHOM"));
        assert!(!is_udp_who(b""));
    }

    #[test]
    fn who_line_format() {
        let line = who_line(
            "backend-1",
            "198.18.1.2:4444".parse().unwrap(),
            "198.18.1.1:40000".parse().unwrap(),
        );
        assert_eq!(
            line,
            "name=backend-1 local=198.18.1.2:4444 peer=198.18.1.1:40000\n"
        );
    }

    #[test]
    fn tcp_who_then_echo_with_half_close() {
        let (addr, mut client) = connect_to_server();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut writer = client.try_clone().unwrap();
        let sent = payload.clone();
        let send = thread::spawn(move || {
            writer.write_all(WHO_TCP).unwrap();
            writer.write_all(&sent).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        send.join().unwrap();
        let local = client.local_addr().unwrap();
        let expected_line = format!("name=t local={addr} peer={local}\n");
        assert!(reply.starts_with(expected_line.as_bytes()));
        assert_eq!(&reply[expected_line.len()..], &payload[..]);
    }

    #[test]
    fn tcp_plain_echo_does_not_wait_for_four_bytes() {
        let (_, mut client) = connect_to_server();
        client.write_all(b"hi").unwrap();
        let mut reply = [0u8; 2];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"hi");
    }

    #[test]
    fn ipv4_and_ipv6_listen_side_by_side_on_one_port() {
        let v4 = v6only::tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = v6only::tcp_listener(format!("[::]:{port}").parse().unwrap()).unwrap();
        assert_eq!(v6.local_addr().unwrap().port(), port);
        let udp4 = v6only::udp_socket("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = udp4.local_addr().unwrap().port();
        v6only::udp_socket(format!("[::]:{port}").parse().unwrap()).unwrap();
    }

    #[test]
    fn udp_who_over_ipv6_reports_destination_address() {
        let server = v6only::udp_socket("[::]:0".parse().unwrap()).unwrap();
        pktinfo::enable(&server).unwrap();
        let port = server.local_addr().unwrap().port();
        thread::spawn(move || serve_udp("u6", server));

        let client = UdpSocket::bind("[::1]:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let target: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        client.send_to(b"WHO", target).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(from, target);
        let expected = format!(
            "name=u6 local={target} peer={}\n",
            client.local_addr().unwrap()
        );
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), expected);
    }

    #[test]
    fn udp_who_reports_destination_address() {
        let server = UdpSocket::bind("0.0.0.0:0").unwrap();
        pktinfo::enable(&server).unwrap();
        let port = server.local_addr().unwrap().port();
        thread::spawn(move || serve_udp("u", server));

        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        client.send_to(b"WHO\n", target).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(from, target);
        let expected = format!(
            "name=u local={target} peer={}\n",
            client.local_addr().unwrap()
        );
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), expected);

        client.send_to(b"hello", target).unwrap();
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
    }
}

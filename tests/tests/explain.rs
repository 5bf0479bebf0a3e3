//! `xlb explain` against the real datapath: for 1,000 random IPv4 client
//! tuples and 300 IPv6 ones (dual-stack services) it predicts the backend
//! (and the verdict) without touching the live conntrack; then a real
//! datagram or connection from each tuple goes through the running agent's
//! XDP program, and the backend that answers must be the predicted one.
//! Asked again afterwards, explain must find each tuple's live flow and say
//! the same backend.
//!
//! Measured figures are printed (`-- --nocapture`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use xlb::cli::explain::{self, Explanation, Protocol, Question};
use xlb::kernel::explain::Simulator;
use xlb::observe::catalog::Catalog;
use xlb::observe::datapath::DatapathMaps;
use xlb_tests::client::{IO_TIMEOUT, Who, udp_who};
use xlb_tests::lab::{CLIENT_ADDR, CLIENT_ADDR6, NODE_ADDR, NODE_ADDR6, NODE_CLIENT_IF};
use xlb_tests::{Agent, Bpffs, Lab, XLB_BIN_ENV, bin_from_env};

const UDP_PORT: u16 = 30980;
const TCP_PORT: u16 = 30981;
const TUPLES: usize = 1000;
/// IPv6 tuples, after the IPv4 ones.
const TUPLES6: usize = 300;
/// One tuple in this many is a TCP connection (slower: a handshake each).
const TCP_EVERY: usize = 10;

/// Both services dual-stack: each pod by its IPv4 and its IPv6 address.
fn services() -> String {
    let both = "      - address: 198.18.1.2\n      - address: 198.18.2.2\n        weight: 2\n      \
                - address: 2001:db8:1::2\n      - address: 2001:db8:2::2\n        weight: 2\n";
    format!(
        "  - name: udp-echo\n    protocol: UDP\n    nodePort: {UDP_PORT}\n    targetPort: 4444\n    backends:\n{both}\
         \n  - name: tcp-echo\n    protocol: TCP\n    nodePort: {TCP_PORT}\n    targetPort: 3333\n    backends:\n{both}"
    )
}

/// xorshift64*: reproducible from the printed seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Explains every question inside the node namespace with one simulator.
fn explain_all(
    lab: &Lab,
    bpffs: &std::path::Path,
    catalog: &Catalog,
    questions: &[Question],
) -> anyhow::Result<Vec<Explanation>> {
    let bpffs = bpffs.to_owned();
    let catalog = catalog.clone();
    let questions = questions.to_vec();
    lab.node.run(move || -> anyhow::Result<Vec<Explanation>> {
        let mut simulator = Simulator::open(&bpffs)?;
        questions
            .iter()
            .map(|question| {
                explain::explain(&mut simulator, &catalog, question, Some(NODE_CLIENT_IF))
                    .map_err(|e| anyhow::anyhow!("{}", xlb::error_chain(&e)))
            })
            .collect()
    })?
}

fn flow_entries(lab: &Lab, bpffs: &std::path::Path) -> anyhow::Result<u64> {
    let bpffs = bpffs.to_owned();
    lab.node.run(move || -> anyhow::Result<u64> {
        let maps = DatapathMaps::from_pins(&bpffs)?;
        Ok(maps
            .count_flows(Instant::now() + Duration::from_secs(5))
            .entries)
    })?
}

/// Sends the real packets: a WHO datagram from each UDP tuple, a WHO over a
/// connection from each TCP tuple; returns who answered, and the TCP
/// connections, kept open so their flows stay established (a closed flow
/// is swept after its short timeout).
fn send_all(lab: &Lab, questions: &[Question]) -> anyhow::Result<(Vec<Who>, Vec<TcpStream>)> {
    let questions = questions.to_vec();
    lab.client
        .run(move || -> anyhow::Result<(Vec<Who>, Vec<TcpStream>)> {
            let mut whos = Vec::new();
            let mut open = Vec::new();
            for question in &questions {
                match question.protocol {
                    Protocol::Udp => {
                        let socket = UdpSocket::bind(question.source)?;
                        socket.set_read_timeout(Some(IO_TIMEOUT))?;
                        whos.push(udp_who(&socket, question.destination)?.0);
                    }
                    Protocol::Tcp => {
                        let (who, stream) = tcp_who_from(question.source, question.destination)?;
                        whos.push(who);
                        open.push(stream);
                    }
                }
            }
            Ok((whos, open))
        })?
}

/// A TCP connection from exactly `source` (bound before connecting, which
/// std cannot do: hence libc here).
fn tcp_who_from(source: SocketAddr, target: SocketAddr) -> anyhow::Result<(Who, TcpStream)> {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::os::fd::{FromRawFd as _, IntoRawFd as _};
    let socket = socket_bound_to(source)?;
    // SAFETY: `socket` is a fresh TCP socket fd this function owns.
    let stream = unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) };
    connect(&stream, target)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    (&stream).write_all(b"WHO\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok((line.trim().parse()?, stream))
}

fn socket_bound_to(source: SocketAddr) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let family = if source.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with constant arguments; the fd is checked and owned.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is owned here.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and a c_int option value of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let (address, length) = sockaddr(source);
    // SAFETY: `address` holds a valid sockaddr of the length given.
    let rc = unsafe { libc::bind(fd, (&raw const address).cast(), length) };
    ensure!(
        rc == 0,
        "bind {source}: {}",
        std::io::Error::last_os_error()
    );
    Ok(owned)
}

/// `address` as a sockaddr_in or sockaddr_in6, and its length.
fn sockaddr(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let length = match address {
        SocketAddr::V4(address) => {
            let v4 = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: address.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(address.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and aligned for it.
            unsafe { std::ptr::write((&raw mut storage).cast(), v4) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(address) => {
            let v6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: address.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: address.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and aligned for it.
            unsafe { std::ptr::write((&raw mut storage).cast(), v6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, length as libc::socklen_t)
}

fn connect(stream: &TcpStream, target: SocketAddr) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let (address, length) = sockaddr(target);
    // SAFETY: a valid socket fd and a sockaddr of the length given.
    let rc = unsafe { libc::connect(stream.as_raw_fd(), (&raw const address).cast(), length) };
    ensure!(
        rc == 0,
        "connect {target}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

#[test]
fn explain_agrees_with_the_datapath_on_random_tuples_of_both_families() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let bpffs = Bpffs::mount(&lab)?;
    let config = lab.write_file("xlb.yaml", &lab.dual_stack_config_yaml(&services()))?;
    let run_dir = lab.dir().join("run");
    let run_dir_arg = run_dir.display().to_string();
    let agent = Agent::start_with(
        &bin_from_env(XLB_BIN_ENV)?,
        &lab,
        &config,
        &["--bpffs", &bpffs.arg(), "--run-dir", &run_dir_arg],
    )?;
    let catalog: Catalog =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("catalog.json"))?)?;

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    println!("random seed {seed:#x}");
    let mut random = Random(seed);
    // Distinct source ports from the client, in a range the kernel never
    // hands out itself (below 32768).
    let mut questions = Vec::new();
    for (client, node, count) in [
        (IpAddr::from(CLIENT_ADDR), IpAddr::from(NODE_ADDR), TUPLES),
        (CLIENT_ADDR6.into(), NODE_ADDR6.into(), TUPLES6),
    ] {
        let mut ports = std::collections::BTreeSet::new();
        while ports.len() < count {
            ports.insert(10_000 + (random.next() % 22_000) as u16);
        }
        questions.extend(ports.into_iter().enumerate().map(|(index, port)| {
            let (protocol, node_port) = if index % TCP_EVERY == 0 {
                (Protocol::Tcp, TCP_PORT)
            } else {
                (Protocol::Udp, UDP_PORT)
            };
            Question {
                protocol,
                source: SocketAddr::new(client, port),
                destination: SocketAddr::new(node, node_port),
            }
        }));
    }
    let all = questions.len();

    // Predictions, before any of these tuples has a flow.
    let before = flow_entries(&lab, bpffs.path())?;
    let started = Instant::now();
    let predicted = explain_all(&lab, bpffs.path(), &catalog, &questions)?;
    let took = started.elapsed();
    ensure!(
        flow_entries(&lab, bpffs.path())? == before,
        "explain wrote the live conntrack"
    );
    let mut by_backend: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for (question, explanation) in questions.iter().zip(&predicted) {
        ensure!(
            explanation.verdict.reason == "fwd_new_flow",
            "{question:?}: {}",
            serde_json::to_string(explanation)?
        );
        let backend = explanation
            .backend
            .as_ref()
            .with_context(|| format!("{question:?}: no backend"))?;
        *by_backend.entry(backend.address.ip()).or_default() += 1;
        ensure!(
            backend.address.is_ipv4() == question.source.is_ipv4(),
            "{question:?}: a backend of the other family: {}",
            serde_json::to_string(explanation)?
        );
        ensure!(explanation.maglev.is_some() && explanation.masquerade.is_some());
    }
    println!(
        "{all} tuples ({TUPLES6} IPv6) explained in {:.2} s ({:.2} ms each); predicted spread {by_backend:?}",
        took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / all as f64
    );

    // The real packets.
    let (answers, connections) = send_all(&lab, &questions)?;
    let mut agree = 0;
    for ((question, explanation), who) in questions.iter().zip(&predicted).zip(&answers) {
        let predicted = explanation.backend.as_ref().map(|b| b.address);
        ensure!(
            predicted == Some(who.local),
            "{question:?}: explain said {predicted:?}, {} answered at {} (seed {seed:#x})",
            who.name,
            who.local
        );
        agree += 1;
    }
    println!("{agree}/{all} real packets reached the predicted backend");

    // Asked again, each tuple has its live flow, to the same backend.
    let again = explain_all(&lab, bpffs.path(), &catalog, &questions)?;
    for ((question, first), second) in questions.iter().zip(&predicted).zip(&again) {
        ensure!(
            second.verdict.reason == "fwd_established" && second.existing_flow.is_some(),
            "{question:?}: {}",
            serde_json::to_string(second)?
        );
        ensure!(
            second.backend.as_ref().map(|b| b.address) == first.backend.as_ref().map(|b| b.address),
            "{question:?}: backend changed"
        );
    }

    drop(connections);

    // The CLI: `xlb explain ARGS...` in the node's namespace.
    let xlb = bin_from_env(XLB_BIN_ENV)?;
    let cli = |args: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let output = lab
            .node
            .command(&xlb)
            .arg("explain")
            .args(args)
            .args(["--bpffs", &bpffs.arg(), "--run-dir", &run_dir_arg])
            .output()?;
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        Ok((
            output.status.success(),
            text(&output.stdout),
            text(&output.stderr),
        ))
    };
    // A port no service has.
    let (ok, json, error) = cli(&["udp", "198.18.0.2:12345", "198.18.0.1:31111", "--json"])?;
    ensure!(ok, "{error}");
    let json: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(json["verdict"]["reason"], "pass_not_service", "{json}");
    for (protocol, source, destination, expect) in [
        (
            "tcp",
            "198.18.0.2:23456",
            format!("{NODE_ADDR}:{TCP_PORT}"),
            "",
        ),
        (
            "udp",
            "[2001:db8::2]:23456",
            format!("[{NODE_ADDR6}]:{UDP_PORT}"),
            "(IPv6)",
        ),
    ] {
        let (ok, text, error) = cli(&[protocol, source, &destination])?;
        println!("xlb explain {protocol} {source} {destination}:\n{text}");
        ensure!(
            ok && text.contains("fwd_new_flow") && text.contains(expect),
            "{text}{error}"
        );
    }
    // Mixed families are refused with the fix.
    let mixed = format!("{NODE_ADDR}:{UDP_PORT}");
    let (ok, _, error) = cli(&["udp", "[2001:db8::2]:23456", &mixed])?;
    ensure!(
        !ok && error.contains("different address families"),
        "{error}"
    );
    drop(agent);
    Ok(())
}

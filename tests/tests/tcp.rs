//! TCP through the `tcp-echo` NodePort (198.18.0.1:30999 -> backends:3333),
//! and over IPv6 on the dual-stack lab ([2001:db8::1]:30999, the `tcp6_`
//! tests).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use xlb_tests::Family::{self, V4, V6};
use xlb_tests::client::{IO_TIMEOUT, pattern, tcp_who_echo};
use xlb_tests::lab::ECHO_TCP_PORT;
use xlb_tests::{Agent, Lab};

#[test]
fn tcp_round_trips_many_connections() -> anyhow::Result<()> {
    round_trips(V4)
}

#[test]
fn tcp6_round_trips_many_connections() -> anyhow::Result<()> {
    round_trips(V6)
}

fn round_trips(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &family.demo_config())?;
    let service = family.tcp_echo_service();

    lab.client.run(|| -> anyhow::Result<()> {
        for connection in 0..50u32 {
            // Every fifth connection moves more than 64 KiB each way.
            let len = if connection % 5 == 0 {
                200 * 1024 + connection as usize
            } else {
                1 + 97 * connection as usize
            };
            let who = tcp_who_echo(service, &pattern(len, connection))
                .map_err(|error| error.context(format!("connection {connection} ({len} bytes)")))?;
            let backend = lab
                .backend_named(&who.name)
                .unwrap_or_else(|| panic!("unknown backend in {who:?}"));
            let (pod, node) = family.pod_and_node(backend);
            assert_eq!(who.local, SocketAddr::new(pod, ECHO_TCP_PORT));
            assert_eq!(
                who.peer.ip(),
                node,
                "masquerade: the backend sees the node's address on its link"
            );
        }
        Ok(())
    })??;
    Ok(())
}

#[test]
fn tcp_concurrent_connections_and_half_close() -> anyhow::Result<()> {
    concurrent_and_half_close(V4)
}

#[test]
fn tcp6_concurrent_connections_and_half_close() -> anyhow::Result<()> {
    concurrent_and_half_close(V6)
}

fn concurrent_and_half_close(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &family.demo_config())?;
    let service = family.tcp_echo_service();

    lab.client.run(|| -> anyhow::Result<()> {
        // Several connections open at once, written in turns, then
        // half-closed: each must get exactly its own bytes back.
        let mut streams = Vec::new();
        for _ in 0..16 {
            let stream = TcpStream::connect_timeout(&service, IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            streams.push(stream);
        }
        for round in 0..4 {
            for (index, stream) in streams.iter_mut().enumerate() {
                let chunk = format!("[{index}:{round}]");
                stream.write_all(chunk.as_bytes())?;
                let mut echoed = vec![0u8; chunk.len()];
                stream.read_exact(&mut echoed)?;
                assert_eq!(echoed, chunk.as_bytes());
            }
        }
        for stream in &mut streams {
            stream.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest)?;
            assert!(rest.is_empty(), "data after half-close: {rest:?}");
        }
        Ok(())
    })??;
    Ok(())
}

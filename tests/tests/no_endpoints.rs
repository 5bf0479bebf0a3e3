//! A service with no endpoints is refused at once, as kube-proxy does: ICMP
//! port unreachable for UDP, a TCP RST for a SYN, answered by the datapath
//! (the kernel would refuse too, so the agent's counters tell who did).

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, UdpSocket};

use xlb_tests::client::IO_TIMEOUT;
use xlb_tests::lab::NODE_ADDR;
use xlb_tests::{Agent, Lab};

const EMPTY_TCP: u16 = 30990;
const EMPTY_UDP: u16 = 30991;

#[test]
fn service_without_endpoints_is_refused_by_the_datapath() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    let services = format!(
        "  - name: tcp-empty\n    protocol: TCP\n    nodePort: {EMPTY_TCP}\n    targetPort: 3333\n    backends: []\n\
         \n  - name: udp-empty\n    protocol: UDP\n    nodePort: {EMPTY_UDP}\n    targetPort: 4444\n    backends: []\n"
    );
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(&services))?;
    let agent = Agent::start(&lab, &config)?;

    let (tcp, udp) = lab.client.run(|| -> anyhow::Result<_> {
        let service = SocketAddr::from((NODE_ADDR, EMPTY_TCP));
        let tcp = TcpStream::connect_timeout(&service, IO_TIMEOUT).map(drop);

        // A connected UDP socket reports the ICMP port unreachable on recv.
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.connect((NODE_ADDR, EMPTY_UDP))?;
        socket.send(b"anyone?")?;
        let udp = socket.recv(&mut [0u8; 64]).map(drop);
        Ok((tcp, udp))
    })??;
    // The counters are in the exit log: stop first, then judge.
    let exit = agent.stop()?;
    let mut problems = Vec::new();
    for (protocol, result) in [("TCP", tcp), ("UDP", udp)] {
        if !matches!(&result, Err(error) if error.kind() == ErrorKind::ConnectionRefused) {
            problems.push(format!(
                "{protocol}: {result:?}, expected connection refused"
            ));
        }
    }
    for counter in ["reject_tcp_reset=1", "reject_port_unreachable=1"] {
        if !exit.log.contains(counter) {
            problems.push(format!("no {counter} in the agent's exit log"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n----- agent log -----\n{}",
        problems.join("\n"),
        exit.log
    );
    Ok(())
}

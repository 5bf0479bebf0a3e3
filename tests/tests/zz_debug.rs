use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use xlb_tests::lab::NODE_ADDR;
use xlb_tests::{Agent, Lab};

#[test]
fn debug_xdp_tx() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    let services = "  - name: tcp-empty\n    protocol: TCP\n    nodePort: 30990\n    targetPort: 3333\n    backends: []\n";
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(services))?;
    let agent = Agent::start(&lab, &config)?;
    let before = lab.client.exec("ip", &["-s", "link", "show", "eth0"])?;
    let before_node = lab.node.exec("ip", &["-s", "link", "show", "xlb-c"])?;
    let r = lab.client.run(|| TcpStream::connect_timeout(&SocketAddr::from((NODE_ADDR, 30990)), Duration::from_secs(2)).map(drop))?;
    let after = lab.client.exec("ip", &["-s", "link", "show", "eth0"])?;
    let after_node = lab.node.exec("ip", &["-s", "link", "show", "xlb-c"])?;
    let nstat = lab.client.exec("nstat", &["-az"]).unwrap_or_default();
    let exit = agent.stop()?;
    println!("{r:?}\nCLIENT BEFORE\n{before}\nAFTER\n{after}\nNODE BEFORE\n{before_node}\nAFTER\n{after_node}\n{}", exit.log);
    for l in nstat.lines().filter(|l| !l.contains(" 0 ")) { println!("{l}"); }
    Ok(())
}

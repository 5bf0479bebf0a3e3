//! The userspace L4 proxy users run today (a Traefik-style entry point):
//! nginx's stream module on the node, one `server` per NodePort, proxying
//! to the same backends. Debian: nginx-light (or nginx) + libnginx-mod-stream.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;

use anyhow::Context as _;
use xlb_tests::ChildGuard;

use super::services::{BenchConfig, FLOOD_NODE_PORT, Protocol, Service};
use super::topology::BenchLab;

/// Where Debian's libnginx-mod-stream puts the module.
pub const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// nginx.conf for `config`, with its files under `dir`.
pub fn config_text(config: &BenchConfig, dir: &Path) -> String {
    let dir = dir.display();
    let mut out = format!(
        "# Written by xlb-bench.\n\
         load_module {STREAM_MODULE};\n\
         daemon off;\n\
         master_process on;\n\
         user root;\n\
         worker_processes auto;\n\
         worker_rlimit_nofile 200000;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/nginx-error.log error;\n\
         events {{ worker_connections 65536; }}\n\
         stream {{\n"
    );
    for service in &config.services {
        server_block(&mut out, config, service);
    }
    out += "}\n";
    out
}

/// One Service: its upstream (the backends) and the `server` listening on
/// its NodePort.
fn server_block(out: &mut String, config: &BenchConfig, service: &Service) {
    let upstream = format!("{}_{}", service.namespace, service.name).replace('-', "_");
    let _ = writeln!(out, "  upstream {upstream} {{");
    for backend in &service.backends {
        let _ = writeln!(out, "    server {backend};");
    }
    *out += "  }\n";
    let udp = service.protocol == Protocol::Udp;
    let _ = writeln!(
        out,
        "  server {{\n    listen {}:{}{} reuseport;\n    proxy_pass {upstream};",
        config.node_addr,
        service.node_port,
        if udp { " udp" } else { "" }
    );
    if udp {
        // The flood's backends never answer; the echo's answer once.
        let responses = if service.node_port == FLOOD_NODE_PORT {
            0
        } else {
            1
        };
        let _ = writeln!(
            out,
            "    proxy_responses {responses};\n    proxy_timeout 2s;"
        );
    }
    *out += "  }\n";
}

/// nginx running in the node namespace; stopped on drop.
pub struct Nginx {
    _child: ChildGuard,
}

impl Nginx {
    pub fn start(lab: &BenchLab, config: &BenchConfig) -> anyhow::Result<Nginx> {
        anyhow::ensure!(
            Path::new(STREAM_MODULE).exists(),
            "{STREAM_MODULE} is missing: apt-get install nginx-light libnginx-mod-stream"
        );
        let dir = lab.dir().join("nginx");
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config_text(config, &dir))?;
        let log = std::fs::File::create(dir.join("nginx.out"))?;
        let mut command = lab.node.command("nginx");
        command
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("nginx-error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        super::unblock_signals(&mut command);
        let child = ChildGuard::spawn(&mut command).context("starting nginx (is it installed?)")?;
        Ok(Nginx { _child: child })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_per_service() {
        let text = config_text(&BenchConfig::headline(), Path::new("/tmp/x"));
        assert_eq!(text.matches("  server {").count(), 3);
        assert!(text.contains("listen 198.18.0.1:31000 udp reuseport;"));
        assert!(text.contains("listen 198.18.0.1:31001 reuseport;"));
        assert!(text.contains("proxy_responses 0;"));
        assert_eq!(text.matches("    server 198.18.").count(), 30);
    }
}

//! The workload of the integration tests: joins a cgroup and a network namespace, makes one TCP
//! connection, and reports the outcome on stdout as `connected` or `error <errno> <message>`.
//!
//! Usage: `egress-probe [--cgroup DIR] [--netns NAME] ADDR:PORT`
//! (an `[::ffff:a.b.c.d]:port` address makes an AF_INET6 socket, the dual-stack case).

use std::{
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut target = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => {
                let dir = args.next().expect("--cgroup DIR");
                std::fs::write(
                    format!("{dir}/cgroup.procs"),
                    std::process::id().to_string(),
                )
                .unwrap_or_else(|e| panic!("joining cgroup {dir}: {e}"));
            }
            "--netns" => {
                let name = args.next().expect("--netns NAME");
                egress_tests::enter_netns(&name);
            }
            addr => target = Some(addr.parse::<SocketAddr>().expect("ADDR:PORT")),
        }
    }
    let target = target.expect("usage: egress-probe [--cgroup DIR] [--netns NAME] ADDR:PORT");
    match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
        Ok(_) => {
            println!("connected");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error {} {e}", e.raw_os_error().unwrap_or(0));
            ExitCode::FAILURE
        }
    }
}

//! The workload of the soak tests: joins a cgroup and a network namespace, then connects to
//! each target in turn, over and over, as fast as it can, until its standard input closes;
//! then prints one line per target: `ADDR connected=N denied=N failed=N`, where denied means
//! `EPERM` (the filter) and failed any other error, and, for each failure, a line
//! `failure ADDR ERROR` (at most 20).
//!
//! Usage: `egress-verdicts --cgroup DIR --netns NAME [--pause-us N] ADDR:PORT...`; with
//! `--pause-us` it sleeps that long after each round over the targets, to set the rate.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use egress_tests::raw;

#[derive(Default)]
struct Count {
    connected: u64,
    denied: u64,
    failed: u64,
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut targets = Vec::new();
    let mut pause = std::time::Duration::ZERO;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            flag @ ("--cgroup" | "--netns") => egress_tests::place(flag, &mut args),
            "--pause-us" => {
                let us = args.next().expect("--pause-us N");
                pause = std::time::Duration::from_micros(us.parse().expect("--pause-us N"));
            }
            addr => targets.push(
                addr.parse::<SocketAddr>()
                    .unwrap_or_else(|e| panic!("{addr}: {e}")),
            ),
        }
    }
    assert!(
        !targets.is_empty(),
        "usage: egress-verdicts [OPTIONS] ADDR:PORT..."
    );
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            stop.store(true, Ordering::Relaxed);
        });
    }
    println!("ready");
    let mut counts: BTreeMap<SocketAddr, Count> = BTreeMap::new();
    let mut failures = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for &target in &targets {
            let count = counts.entry(target).or_default();
            match raw::connect(target) {
                Ok(()) => count.connected += 1,
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => count.denied += 1,
                Err(e) => {
                    count.failed += 1;
                    if failures.len() < 20 {
                        failures.push(format!("failure {target} {e}"));
                    }
                }
            }
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    for (target, c) in &counts {
        println!(
            "{target} connected={} denied={} failed={}",
            c.connected, c.denied, c.failed
        );
    }
    for f in failures {
        println!("{f}");
    }
    ExitCode::SUCCESS
}

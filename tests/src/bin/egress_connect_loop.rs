//! The load generator of the connect benchmark (`tests/benches/connect/`): joins a cgroup and a
//! network namespace, pins itself to one CPU, then does `socket()`, `connect()`, `close()` in a
//! loop and prints how long each `connect()` took.
//!
//! Usage: `egress-connect-loop [--cgroup DIR] [--netns NAME] [--cpu N] [--warmup N] [--count N]
//! [--budget-ms MS] [--expect connected|denied] [--serve] ADDR:PORT`
//!
//! With `--serve` it does not run one block and exit: it prints `ready`, then runs one block
//! per line `WARMUP COUNT BUDGET_MS` read from stdin, until end of input. One process per
//! contender, each driven a block at a time, lets the benchmark interleave contenders every
//! few milliseconds instead of every few seconds (this machine's load drifts by 10-20 % from
//! one second to the next).
//!
//! Only the `connect()` call is timed: that is where a `cgroup/connect4` program runs and where
//! iptables/nft see the SYN (on loopback the handshake completes inside the call).
//!
//! Every socket gets `SO_LINGER {on, 0}`, so `close()` sends a RST and leaves no TIME_WAIT
//! behind: 100,000 connects to one destination would otherwise run out of ephemeral ports
//! (28,232 by default) within seconds. The server side of a reset connection leaves nothing
//! behind either.
//!
//! A block is `--warmup` untimed connects, then up to `--count` timed ones, stopping early once
//! `--budget-ms` have passed. Output, one line on stdout per block:
//! `total=<connects incl. warm-up> count=<timed> mean_ns=.. min_ns=.. p50_ns=.. p99_ns=.. max_ns=..`.
//! Any connect with another outcome than `--expect` stops the process with exit status 1 and
//! the error on stderr.

use egress_tests::raw;
use std::{
    io::{BufRead as _, Write as _},
    mem,
    net::SocketAddr,
    process::ExitCode,
    time::{Duration, Instant},
};

/// What every connect must do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Establish the connection.
    Connected,
    /// Fail with `EPERM` (the egress filter denied it).
    Denied,
}

struct Options {
    target: SocketAddr,
    cpu: Option<usize>,
    block: Block,
    expect: Expect,
    serve: bool,
}

/// One run of connects.
#[derive(Clone, Copy)]
struct Block {
    warmup: u64,
    count: u64,
    budget: Duration,
}

impl Block {
    /// `WARMUP COUNT BUDGET_MS`, as `--serve` reads it.
    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace().map(str::parse::<u64>);
        let block = Self {
            warmup: words.next()?.ok()?,
            count: words.next()?.ok()?,
            budget: Duration::from_millis(words.next()?.ok()?),
        };
        words.next().is_none().then_some(block)
    }
}

fn parse() -> Options {
    let mut args = std::env::args().skip(1);
    let mut target = None;
    let mut options = Options {
        target: SocketAddr::from(([127, 0, 0, 1], 0)),
        cpu: None,
        block: Block {
            warmup: 500,
            count: 20_000,
            budget: Duration::from_secs(3600),
        },
        expect: Expect::Connected,
        serve: false,
    };
    let number = |args: &mut dyn Iterator<Item = String>, flag: &str| -> u64 {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        value
            .parse()
            .unwrap_or_else(|e| panic!("{flag} {value}: {e}"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            flag @ ("--cgroup" | "--netns") => egress_tests::place(flag, &mut args),
            "--cpu" => options.cpu = Some(number(&mut args, "--cpu") as usize),
            "--warmup" => options.block.warmup = number(&mut args, "--warmup"),
            "--count" => options.block.count = number(&mut args, "--count"),
            "--budget-ms" => {
                options.block.budget = Duration::from_millis(number(&mut args, "--budget-ms"))
            }
            "--serve" => options.serve = true,
            "--expect" => {
                options.expect = match args.next().as_deref() {
                    Some("connected") => Expect::Connected,
                    Some("denied") => Expect::Denied,
                    other => panic!("--expect connected|denied, not {other:?}"),
                }
            }
            addr => {
                target = Some(
                    addr.parse::<SocketAddr>()
                        .unwrap_or_else(|e| panic!("{addr}: {e}")),
                )
            }
        }
    }
    options.target = target.expect("usage: egress-connect-loop [OPTIONS] ADDR:PORT");
    options
}

/// Pins the calling thread (the whole process: it has one) to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set` (it checks the bound).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid set of the size we pass, for this thread (pid 0).
    let ret = unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        ret,
        0,
        "sched_setaffinity(cpu {cpu}): {}",
        std::io::Error::last_os_error()
    );
}

/// Prints the summary line (see the module docs).
fn report(total: u64, times: &mut [u64]) {
    times.sort_unstable();
    let n = times.len().max(1) as u64;
    let at = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "total={total} count={} mean_ns={} min_ns={} p50_ns={} p99_ns={} max_ns={}",
        times.len(),
        times.iter().sum::<u64>() / n,
        at(0.0),
        at(0.5),
        at(0.99),
        at(1.0),
    );
    let _ = out.flush();
}

/// Runs one block and prints its line; an unexpected outcome is the error.
fn run_block(options: &Options, block: Block, times: &mut Vec<u64>) -> Result<(), String> {
    let family = if options.target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let (addr, len) = raw::sockaddr(options.target);
    times.clear();
    let mut total = 0u64;
    let mut started = None;
    while (times.len() as u64) < block.count {
        if total == block.warmup {
            started = Some(Instant::now());
        }
        let (took, result) = raw::connect_once(family, &addr, len);
        total += 1;
        match (options.expect, result) {
            (Expect::Connected, Ok(())) => {}
            (Expect::Denied, Err(e)) if e.raw_os_error() == Some(libc::EPERM) => {}
            (expect, result) => {
                let wanted = if expect == Expect::Connected {
                    "connected"
                } else {
                    "EPERM"
                };
                return Err(format!(
                    "connect #{total} to {}: expected {wanted}, got {result:?}",
                    options.target
                ));
            }
        }
        if total > block.warmup {
            times.push(took.as_nanos() as u64);
        }
        if started.is_some_and(|s| s.elapsed() >= block.budget) {
            break;
        }
    }
    report(total, times);
    Ok(())
}

fn main() -> ExitCode {
    let options = parse();
    if let Some(cpu) = options.cpu {
        pin_to(cpu);
    }
    let mut times = Vec::new();
    let result = if options.serve {
        println!("ready");
        std::io::stdin()
            .lock()
            .lines()
            .map_while(Result::ok)
            .try_for_each(|line| {
                let block = Block::parse(&line)
                    .ok_or_else(|| format!("expected `WARMUP COUNT BUDGET_MS`, got {line:?}"))?;
                run_block(&options, block, &mut times)
            })
    } else {
        run_block(&options, options.block, &mut times)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-connect-loop: {e}");
            ExitCode::FAILURE
        }
    }
}

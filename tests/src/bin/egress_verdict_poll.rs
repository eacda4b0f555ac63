//! The workload of the reload benchmark (`tests/benches/reload/`): joins a cgroup and a network
//! namespace, then answers commands read from stdin, one per line, with one line each on
//! stdout. It is a separate process because a thread cannot join a cgroup alone (in cgroup v2
//! a thread moves its whole process, unless the cgroup is threaded).
//!
//! Usage: `egress-verdict-poll --cgroup DIR --netns NAME`; it prints `ready`, then serves:
//! - `check ADDR:PORT`: one `connect()`; prints `connected`, `denied` (`EPERM`: the filter) or
//!   `error <errno> <message>`.
//! - `wait ADDR:PORT connected|denied INTERVAL_US TIMEOUT_MS`: connects once, which must give
//!   the other outcome (the old verdict), prints `polling`, then connects every INTERVAL_US
//!   (sleeping between connects, timer slack 1 ns) until the outcome is the one asked for, and
//!   prints `flipped at_ns=T start_ns=S last_old_ns=L polls=N`: T is when the first connect with
//!   the new verdict returned, S when it started, L when the last connect with the old verdict
//!   returned (all `CLOCK_MONOTONIC`, which every process on the host shares; see
//!   `egress_tests::monotonic_ns`). The new verdict took effect between L and T, so T - L is
//!   the resolution of one measurement. After TIMEOUT_MS without the new verdict it prints
//!   `timeout polls=N`; on another error, `error ...`.
//!
//! Every socket is closed with `SO_LINGER 0` ([`raw::connect`]), so polling leaves no
//! TIME_WAIT behind; a denied connect fails inside `connect()` without sending a packet.

use std::{
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use egress_tests::{monotonic_ns, raw};

/// What one connect did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Verdict {
    Connected,
    Denied,
}

fn connect(addr: SocketAddr) -> Result<Verdict, String> {
    match raw::connect(addr) {
        Ok(()) => Ok(Verdict::Connected),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(Verdict::Denied),
        Err(e) => Err(format!("error {} {e}", e.raw_os_error().unwrap_or(0))),
    }
}

fn word(v: Verdict) -> &'static str {
    match v {
        Verdict::Connected => "connected",
        Verdict::Denied => "denied",
    }
}

/// Runs one command line; returns the answer line.
fn serve(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = |s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|e| format!("error 0 bad address {s}: {e}"))
    };
    let result = match words.as_slice() {
        ["check", target] => addr(target).and_then(connect).map(|v| word(v).to_owned()),
        ["wait", target, want, interval_us, timeout_ms] => (|| {
            let target = addr(target)?;
            let want = match *want {
                "connected" => Verdict::Connected,
                "denied" => Verdict::Denied,
                other => return Err(format!("error 0 want connected|denied, not {other}")),
            };
            let number = |s: &str| {
                s.parse::<u64>()
                    .map_err(|e| format!("error 0 bad number {s}: {e}"))
            };
            let interval = Duration::from_micros(number(interval_us)?);
            let timeout = Duration::from_millis(number(timeout_ms)?);
            wait(target, want, interval, timeout)
        })(),
        _ => Err(format!("error 0 unknown command {line:?}")),
    };
    result.unwrap_or_else(|e| e)
}

/// The `wait` command: prints `polling` once the old verdict is confirmed, returns the result.
fn wait(
    target: SocketAddr,
    want: Verdict,
    interval: Duration,
    timeout: Duration,
) -> Result<String, String> {
    let first = connect(target)?;
    if first == want {
        return Err(format!(
            "error 0 {target} is already {} before the change",
            word(want)
        ));
    }
    let mut last_old = monotonic_ns();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "polling");
    let _ = out.flush();
    drop(out);
    let deadline = Instant::now() + timeout;
    let mut polls = 1u64;
    loop {
        std::thread::sleep(interval);
        let start = monotonic_ns();
        let verdict = connect(target)?;
        let at = monotonic_ns();
        polls += 1;
        if verdict == want {
            return Ok(format!(
                "flipped at_ns={at} start_ns={start} last_old_ns={last_old} polls={polls}"
            ));
        }
        last_old = at;
        if Instant::now() >= deadline {
            return Ok(format!("timeout polls={polls}"));
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            flag @ ("--cgroup" | "--netns") => egress_tests::place(flag, &mut args),
            other => panic!("usage: egress-verdict-poll --cgroup DIR --netns NAME (not {other:?})"),
        }
    }
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack: sleeps end
    // within about a microsecond of their deadline instead of the default 50 us.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    println!("ready");
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let answer = serve(&line);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
}

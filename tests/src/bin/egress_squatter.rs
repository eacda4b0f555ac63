//! A hostile workload for the tests: an unprivileged process in the managed cgroup that takes
//! the proxy's port, hoping to receive other workloads' redirected connections.
//!
//! Usage: `egress-squatter [--cgroup DIR] [--netns NAME] [--uid N] [--bind-only]
//! [--no-reuseaddr] ADDR:PORT`. Joins the cgroup and the network namespace, drops to uid and
//! gid N, then binds ADDR:PORT with `SO_REUSEADDR` (unless `--no-reuseaddr`) and listens (with
//! `--bind-only`, only binds). Prints `listening` (or
//! `bound`), or `error <errno> <message>` and exits 1. Then, for every connection it receives,
//! reads until EOF (2 s at most) and prints `stolen <bytes> <first line of the data>`. Runs
//! until killed. Every line is flushed at once.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    time::Duration,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut addr = None;
    let mut uid = None;
    let mut bind_only = false;
    let mut reuse = true;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => egress_tests::join_cgroup(&args.next().expect("--cgroup DIR")),
            "--netns" => egress_tests::enter_netns(&args.next().expect("--netns NAME")),
            "--uid" => uid = Some(args.next().expect("--uid N").parse::<u32>().expect("uid")),
            "--bind-only" => bind_only = true,
            "--no-reuseaddr" => reuse = false,
            a => addr = Some(a.parse::<SocketAddr>().expect("ADDR:PORT")),
        }
    }
    let addr = addr.expect(
        "usage: egress-squatter [--cgroup DIR] [--netns NAME] [--uid N] [--bind-only] ADDR:PORT",
    );
    if let Some(uid) = uid {
        // SAFETY: plain calls without pointers; the gid first, while still allowed to.
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(uid) == 0
                && libc::setuid(uid) == 0
        };
        assert!(
            dropped,
            "dropping to uid {uid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let listener = match bind(addr, bind_only, reuse) {
        Ok(l) => l,
        Err(e) => {
            say(&format!("error {} {e}", e.raw_os_error().unwrap_or(0)));
            std::process::exit(1);
        }
    };
    say(if bind_only { "bound" } else { "listening" });
    if bind_only {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut data = Vec::new();
        let _ = stream.read_to_end(&mut data);
        let text = String::from_utf8_lossy(&data);
        say(&format!(
            "stolen {} {}",
            data.len(),
            text.lines().next().unwrap_or("")
        ));
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A TCP socket (with `SO_REUSEADDR` if `reuse`) bound to `addr`, listening unless
/// `bind_only`.
fn bind(addr: SocketAddr, bind_only: bool, reuse: bool) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if reuse {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&addr.into())?;
    if !bind_only {
        socket.listen(128)?;
    }
    Ok(socket.into())
}

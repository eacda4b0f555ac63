//! The descriptor-exhaustion attacker of the integration tests: joins a cgroup and a network
//! namespace, opens COUNT connections to ADDR:PORT and sends SEND (a request head cut short,
//! or a whole request on a kept-alive connection: `\r\n` written as backslash-r
//! backslash-n) on each, then holds them, opening a new one for each that the other end
//! closes, until its stdin closes.
//!
//! Usage: `egress-hold [--cgroup DIR] [--netns NAME] --count N --send TEXT ADDR:PORT`.
//! Prints `held N failed F` once all COUNT were tried, and at the end
//! `reopened R failed F` (connections reopened after the other end closed them, and connects
//! that failed).

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut count, mut send, mut target) = (0usize, String::new(), None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => egress_tests::join_cgroup(&args.next().expect("--cgroup DIR")),
            "--netns" => egress_tests::enter_netns(&args.next().expect("--netns NAME")),
            "--count" => count = args.next().expect("--count N").parse().expect("a number"),
            "--send" => send = args.next().expect("--send TEXT").replace("\\r\\n", "\r\n"),
            addr => target = Some(addr.parse::<SocketAddr>().expect("ADDR:PORT")),
        }
    }
    let target = target.expect("usage: egress-hold --count N --send TEXT ADDR:PORT");
    // This process holds COUNT sockets itself: lift its own limit (root may raise the hard one).
    let lim = libc::rlimit {
        rlim_cur: (count as u64 + 256).max(1024),
        rlim_max: (count as u64 + 256).max(1024),
    };
    // SAFETY: a valid rlimit that outlives the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);

    let open = |failed: &mut u64| -> Option<TcpStream> {
        let conn = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .and_then(|mut s| s.write_all(send.as_bytes()).map(|()| s))
            .and_then(|s| s.set_nonblocking(true).map(|()| s));
        conn.map_err(|_| *failed += 1).ok()
    };
    let mut failed = 0;
    let mut held: Vec<Option<TcpStream>> = (0..count).map(|_| open(&mut failed)).collect();
    println!(
        "held {} failed {failed}",
        held.iter().filter(|s| s.is_some()).count()
    );
    let _ = std::io::stdout().flush();

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop.store(true, Ordering::Relaxed);
        });
    }
    let (mut reopened, mut failed) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        for slot in &mut held {
            let closed = match slot {
                // An answer (a 403 on a kept-alive connection) leaves it open: only EOF or
                // an error means the other end closed it.
                Some(s) => match s.read(&mut [0u8; 4096]) {
                    Ok(n) => n == 0,
                    Err(e) => e.kind() != ErrorKind::WouldBlock,
                },
                None => true,
            };
            if closed && !stop.load(Ordering::Relaxed) {
                *slot = open(&mut failed);
                reopened += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("reopened {reopened} failed {failed}");
}

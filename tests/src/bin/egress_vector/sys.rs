//! What the vectors need beyond socket2: waiting on a socket with a deadline, and the
//! pieces of a hand-built TCP segment.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use socket2::Socket;

use crate::{Failure, Step};

/// Waits for a non-blocking TCP socket's handshake: writable, then `SO_ERROR`.
pub(crate) fn wait_connected(fd: &Socket, deadline: Instant, timeout: Duration) -> Step<()> {
    wait_ready(
        fd,
        libc::POLLOUT,
        deadline,
        ("connect", "handshake"),
        timeout,
    )?;
    match fd.take_error() {
        Ok(None) => Ok(()),
        Ok(Some(e)) | Err(e) => Err(Failure::from_io("connect", &e)),
    }
}

/// Polls `fd` for `events` until it is ready; past `deadline` it fails at `stage` with a
/// timeout naming `what` it waited for (`timeout`, the whole wait, goes in the message).
pub(crate) fn wait_ready(
    fd: &Socket,
    events: libc::c_short,
    deadline: Instant,
    (stage, what): (&'static str, &str),
    timeout: Duration,
) -> Step<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        match n {
            0 => return Err(Failure::timed_out(stage, what, timeout)),
            n if n > 0 => return Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(Failure::from_io(stage, &e));
                }
            }
        }
    }
}

/// The TCP checksum of `segment` (its checksum field zero) from `src` to `dst` (RFC 793:
/// the one's-complement sum over the pseudo-header and the segment).
pub(crate) fn tcp4_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.push(0);
    pseudo.push(libc::IPPROTO_TCP as u8);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A sequence number that differs from run to run (the kernel's own are random too).
pub(crate) fn initial_sequence() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.subsec_nanos() ^ std::process::id().rotate_left(16)
}

//! The system calls the vectors are made of, each failing with the stage it stands for.

use std::{
    io, mem,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use egress_tests::raw::sockaddr;

use crate::{Failure, Step};

/// `socket()` with `SOCK_CLOEXEC`, owned.
pub(crate) fn socket(family: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> Step<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(Failure::last("socket"));
    }
    // SAFETY: a descriptor socket() just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `send()` of all of `data` on a connected socket.
pub(crate) fn send(fd: &OwnedFd, data: &[u8]) -> Step<()> {
    // SAFETY: a valid socket and a buffer of its own length.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    sent(n, data.len())
}

/// `sendto()` of `data` to `addr`.
pub(crate) fn sendto(fd: &OwnedFd, data: &[u8], addr: SocketAddr) -> Step<()> {
    let (sa, len) = sockaddr(addr);
    // SAFETY: a valid socket, a buffer of its own length and a sockaddr of `len` bytes.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL,
            std::ptr::from_ref(&sa).cast(),
            len,
        )
    };
    sent(n, data.len())
}

pub(crate) fn sent(n: isize, want: usize) -> Step<()> {
    if n < 0 {
        return Err(Failure::last("send"));
    }
    if n as usize != want {
        let mut f = Failure::new("send", libc::EMSGSIZE);
        f.message = format!("sent {n} of {want} bytes");
        return Err(f);
    }
    Ok(())
}

/// Waits for a non-blocking TCP socket's handshake: writable, then `SO_ERROR`.
pub(crate) fn wait_connected(fd: &OwnedFd, deadline: Instant, timeout: Duration) -> Step<()> {
    wait_ready(
        fd,
        libc::POLLOUT,
        deadline,
        ("connect", "handshake"),
        timeout,
    )?;
    let err = so_error(fd.as_raw_fd()).map_err(|e| Failure::from_io("connect", &e))?;
    if err != 0 {
        return Err(Failure::new("connect", err));
    }
    Ok(())
}

/// Polls `fd` for `events` until it is ready; past `deadline` it fails at `stage` with a
/// timeout naming `what` it waited for (`timeout`, the whole wait, goes in the message).
pub(crate) fn wait_ready(
    fd: &OwnedFd,
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

/// The socket's pending error (`SO_ERROR`).
pub(crate) fn so_error(fd: RawFd) -> io::Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket and an int of `len` bytes.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::from_mut(&mut err).cast(),
            &mut len,
        )
    };
    if ret == 0 {
        Ok(err)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The local address of a socket (`getsockname()`).
pub(crate) fn sock_name(fd: &OwnedFd) -> Step<libc::sockaddr_storage> {
    // SAFETY: sockaddr_storage is plain data; zeroed is valid.
    let mut local: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: a valid socket and a sockaddr_storage of `len` bytes.
    let ret = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            std::ptr::from_mut(&mut local).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(Failure::last("getsockname"));
    }
    Ok(local)
}

/// The local port of a socket (`getsockname()`); for a ping socket, the echo id it sends.
pub(crate) fn local_port(fd: &OwnedFd) -> Step<u16> {
    let local = sock_name(fd)?;
    let port_be = match i32::from(local.ss_family) {
        // SAFETY: the kernel filled an AF_INET address; storage is aligned for it.
        libc::AF_INET => unsafe {
            (*std::ptr::from_ref(&local).cast::<libc::sockaddr_in>()).sin_port
        },
        // SAFETY: the kernel filled an AF_INET6 address; storage is aligned for it.
        _ => unsafe { (*std::ptr::from_ref(&local).cast::<libc::sockaddr_in6>()).sin6_port },
    };
    Ok(u16::from_be(port_be))
}

/// The IPv4 source the kernel picks for `target`: `connect()` on the raw socket (a route
/// lookup; it also makes the socket take packets from `target` only, which does not matter
/// for sending), then `getsockname()`.
pub(crate) fn raw_source(fd: &OwnedFd, target: SocketAddr) -> Step<Ipv4Addr> {
    let (sa, len) = sockaddr(target);
    // SAFETY: a valid socket and a sockaddr of `len` bytes.
    if unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&sa).cast(), len) } != 0 {
        return Err(Failure::last("connect"));
    }
    let local = sock_name(fd)?;
    // SAFETY: the kernel filled the AF_INET address of this IPv4 raw socket; storage is
    // aligned for it.
    let local = unsafe { *std::ptr::from_ref(&local).cast::<libc::sockaddr_in>() };
    Ok(Ipv4Addr::from(local.sin_addr.s_addr.to_ne_bytes()))
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

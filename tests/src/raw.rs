//! Raw `connect()` for workloads that connect in a loop: one socket per call with
//! `SO_LINGER {on, 0}`, so `close()` sends a RST and leaves no TIME_WAIT behind (100,000
//! connects to one destination would otherwise run out of ephemeral ports within seconds).

use std::{
    mem,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// The target as a `sockaddr_storage` and its length.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zeroed is valid.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// One socket, connect, close. Returns how long `connect()` took and what it returned: a
/// denied connect fails inside `connect()` and is timed the same way.
pub fn connect_once(
    family: libc::c_int,
    addr: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> (Duration, std::io::Result<()>) {
    // SAFETY: plain syscalls on a descriptor this function owns and closes on every path.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return (Duration::ZERO, Err(std::io::Error::last_os_error()));
        }
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        if let Err(e) = crate::setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger) {
            libc::close(fd);
            return (Duration::ZERO, Err(e));
        }
        let start = Instant::now();
        let ret = libc::connect(fd, std::ptr::from_ref(addr).cast(), len);
        let took = start.elapsed();
        let result = if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        libc::close(fd);
        (took, result)
    }
}

/// Connects to `addr` once (socket, connect, close): `Ok` when connected, else the error
/// (`EPERM` when the filter denied it).
pub fn connect(addr: SocketAddr) -> std::io::Result<()> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let (storage, len) = sockaddr(addr);
    connect_once(family, &storage, len).1
}

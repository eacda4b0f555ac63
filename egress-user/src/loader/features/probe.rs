//! The probes: one real bpf(2) call (or three) per feature, through `sys`. Each returns
//! `Ok(true)` when the kernel has the feature, `Ok(false)` when it refuses the way a kernel
//! without it does (`EINVAL` for an unknown type or command, "unknown func" for a helper), and
//! `Err` for anything else (not root): a failed probe counts as missing, never as present.
//! Every fd a probe gets is dropped, and so closed, before it returns.

use std::{io, os::fd::AsFd as _};

use aya_obj::generated::{
    BPF_F_NO_PREALLOC, bpf_attach_type as attach, bpf_cmd, bpf_func_id as helper,
    bpf_map_type as map, bpf_prog_type as prog,
};

use crate::loader::sys;

/// How a probe's failure ends when bpf(2) said `EPERM`.
pub(super) const NOT_PERMITTED: &str = "(run as root)";

/// `bpf(2)` refused with `EPERM`: say what to do about it.
fn failed(call: &str, e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::EPERM) {
        format!("{call}: {e} {NOT_PERMITTED}")
    } else {
        format!("{call}: {e}")
    }
}

/// The kernel knows the program type and attach type: a program `r0 = 1; exit` loads.
pub(super) fn program(prog_type: prog, attach_type: Option<attach>) -> Result<bool, String> {
    match sys::probe_prog_load(prog_type, attach_type, None, 1) {
        Ok(_closed_on_drop) => Ok(true),
        // Refused before the verifier ran: an unknown program or attach type.
        Err(r) if r.log.is_empty() && is_unsupported(&r.error) => Ok(false),
        Err(r) => Err(format!(
            "{}{}",
            failed("BPF_PROG_LOAD", &r.error),
            last_line(&r.log)
        )),
    }
}

/// The program type can call `func`.
pub(super) fn call(
    prog_type: prog,
    attach_type: Option<attach>,
    func: helper,
) -> Result<bool, String> {
    match sys::probe_prog_load(prog_type, attach_type, Some(func), 1) {
        Ok(_closed_on_drop) => Ok(true),
        Err(r) => {
            // The verifier's words for a helper this program type cannot call (libbpf's
            // probe looks for the same).
            const UNKNOWN: [&str; 3] = [
                "unknown func ",
                "invalid func ",
                "program of this type cannot use helper ",
            ];
            if UNKNOWN.iter().any(|u| r.log.contains(u)) {
                Ok(false)
            } else if !r.log.is_empty() {
                // The verifier found the helper and then objected to its (unset)
                // arguments: the helper is there.
                Ok(true)
            } else if is_unsupported(&r.error) {
                // The program type itself is missing, so the helper is too.
                Ok(false)
            } else {
                Err(failed("BPF_PROG_LOAD", &r.error))
            }
        }
    }
}

/// `func` is callable from both kinds of judging program.
pub(super) fn in_judges(func: helper) -> Result<bool, String> {
    Ok(in_connect4(func)?
        && call(
            prog::BPF_PROG_TYPE_CGROUP_SOCK,
            Some(attach::BPF_CGROUP_INET_SOCK_CREATE),
            func,
        )?)
}

/// A `cgroup_sock_addr` program loads on `attach_type` (the hooks of connect, sendmsg and
/// getpeername are all of this program type).
pub(super) fn sock_addr(attach_type: attach) -> Result<bool, String> {
    program(prog::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, Some(attach_type))
}

/// The `cgroup/connect4` program type can call `func`: the probe of a helper every
/// `cgroup_sock_addr` judge calls.
pub(super) fn in_connect4(func: helper) -> Result<bool, String> {
    call(
        prog::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        Some(attach::BPF_CGROUP_INET4_CONNECT),
        func,
    )
}

/// The kernel creates a map of this type.
pub(super) fn map_type(
    map_type: map,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> Result<bool, String> {
    match sys::map_create(map_type, key_size, value_size, max_entries, flags) {
        Ok(_closed_on_drop) => Ok(true),
        Err(e) if is_unsupported(&e) => Ok(false),
        Err(e) => Err(failed("BPF_MAP_CREATE", &e)),
    }
}

/// Cgroup programs attach through links that can be swapped and detached: `BPF_LINK_CREATE`
/// of a connect4 program on fd -1 fails with `EBADF` (it got as far as looking the cgroup
/// up), and `BPF_LINK_UPDATE`/`BPF_LINK_DETACH` on fd -1 too.
pub(super) fn cgroup_link() -> Result<bool, String> {
    let prog = match sys::probe_prog_load(
        prog::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        Some(attach::BPF_CGROUP_INET4_CONNECT),
        None,
        1,
    ) {
        Ok(fd) => fd,
        Err(r) if is_unsupported(&r.error) => return Ok(false),
        Err(r) => return Err(failed("BPF_PROG_LOAD", &r.error)),
    };
    let create = match sys::link_create(prog.as_fd(), u32::MAX, attach::BPF_CGROUP_INET4_CONNECT, 0)
    {
        Ok(_link) => {
            return Err("BPF_LINK_CREATE on cgroup fd -1 succeeded".to_owned());
        }
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => true,
        Err(e) if is_unsupported(&e) => false,
        Err(e) => return Err(failed("BPF_LINK_CREATE", &e)),
    };
    let known = |cmd| sys::link_cmd_known(cmd).map_err(|e| failed(&format!("{cmd:?}"), &e));
    Ok(create && known(bpf_cmd::BPF_LINK_UPDATE)? && known(bpf_cmd::BPF_LINK_DETACH)?)
}

/// XDP attaches through a link: an XDP program linked to the loopback of a private network
/// namespace made for the probe (nothing else sees it; the link, the program and the
/// namespace go when the probe's thread ends).
pub(super) fn xdp_link() -> Result<bool, String> {
    /// `XDP_PASS`.
    const XDP_PASS: i32 = 2;
    /// The loopback's ifindex, in every network namespace.
    const LOOPBACK: u32 = 1;
    sys::in_private_netns(|| {
        let prog = match sys::probe_prog_load(
            prog::BPF_PROG_TYPE_XDP,
            Some(attach::BPF_XDP),
            None,
            XDP_PASS,
        ) {
            Ok(fd) => fd,
            Err(r) if is_unsupported(&r.error) => return Ok(false),
            Err(r) => return Err(failed("BPF_PROG_LOAD", &r.error)),
        };
        match sys::link_create(prog.as_fd(), LOOPBACK, attach::BPF_XDP, 0) {
            Ok(_detached_on_drop) => Ok(true),
            Err(e) if is_unsupported(&e) => Ok(false),
            Err(e) => Err(failed("BPF_LINK_CREATE", &e)),
        }
    })
    .map_err(|e| failed("unshare(CLONE_NEWNET)", &e))?
}

/// Batch calls work where the loader uses them: `BPF_MAP_UPDATE_BATCH` of one prefix into an
/// LPM trie, and `BPF_MAP_LOOKUP_BATCH` over an array.
pub(super) fn batch_ops() -> Result<bool, String> {
    let trie = sys::map_create(map::BPF_MAP_TYPE_LPM_TRIE, 8, 4, 1, BPF_F_NO_PREALLOC)
        .map_err(|e| failed("BPF_MAP_CREATE", &e))?;
    // An LPM key: the prefix length (u32, host order), then the address: 192.0.2.0/24.
    let mut key = [0u8; 8];
    key[..4].copy_from_slice(&24u32.to_ne_bytes());
    key[4..].copy_from_slice(&[192, 0, 2, 0]);
    match sys::map_update_batch(trie.as_fd(), &[key], &[1u32]) {
        Ok(()) => {}
        Err(e) if is_unsupported(&e) => return Ok(false),
        Err(e) => return Err(failed("BPF_MAP_UPDATE_BATCH", &e)),
    }
    let array = sys::map_create(map::BPF_MAP_TYPE_ARRAY, 4, 4, 2, 0)
        .map_err(|e| failed("BPF_MAP_CREATE", &e))?;
    let mut values = [0u32; 2];
    match sys::array_lookup_batch(array.as_fd(), 0, &mut values) {
        Ok(()) => Ok(true),
        Err(e) if is_unsupported(&e) => Ok(false),
        Err(e) => Err(failed("BPF_MAP_LOOKUP_BATCH", &e)),
    }
}

/// How a kernel says it does not know a command, type, flag or operation: `EINVAL` (unknown
/// command or type), `E2BIG` (attribute fields it does not know, set), `ENOTSUPP` (524, the
/// map has no batch operation), `EOPNOTSUPP`.
fn is_unsupported(e: &io::Error) -> bool {
    /// The kernel-internal `ENOTSUPP`, which bpf(2) leaks to user space.
    const ENOTSUPP: i32 = 524;
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::E2BIG | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// ` (verifier: LAST LINE)`, or nothing for an empty log.
fn last_line(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(" (verifier: {l})"))
        .unwrap_or_default()
}

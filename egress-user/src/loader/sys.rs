//! The few bpf(2) calls aya 0.14 does not expose: for cgroup links, replace a link's program
//! in place (`BPF_LINK_UPDATE`), detach a link that other fds may still hold
//! (`BPF_LINK_DETACH`), and read which cgroup a link is attached to
//! (`BPF_OBJ_GET_INFO_BY_FD`); for maps, write or read many entries in one call
//! (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_LOOKUP_BATCH`: arrays since 5.6, LPM tries since
//! 5.13), where aya has one call per entry. This is the only `unsafe` in the agent.

use std::{
    io,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd, BorrowedFd},
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info};

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: `attr` is a fully initialised bpf_attr owned by the caller for the duration of
    // the call, and the size passed is its size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Atomically replaces the program behind `link` with `new_prog`: at no moment is the hook
/// without a program. Fails with `EPERM`/`EINVAL` if `old_prog` is given and no longer the
/// link's program (someone else swapped it).
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: bpf_attr is a plain C union; all-zero is its documented initial state.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = new_prog.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr)
}

/// Detaches `link` from its hook now, even while other processes hold fds to it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.link_detach.link_fd = link.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr)
}

/// What the kernel says about a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    /// Id of the program currently behind the link.
    pub prog_id: u32,
    /// The cgroup it is attached to; 0 once detached.
    pub cgroup_id: u64,
    /// `enum bpf_attach_type`.
    pub attach_type: u32,
}

fn link_info(link: BorrowedFd<'_>) -> io::Result<bpf_link_info> {
    // SAFETY: plain C structs, all-zero initial state.
    let mut info: bpf_link_info = unsafe { zeroed() };
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // `info` outlives the call and `info_len` is its size.
    attr.info.bpf_fd = link.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_link_info>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// Reads the program and cgroup of a cgroup link.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    let info = link_info(link)?;
    // SAFETY: the kernel filled the cgroup member for a cgroup link; for any other link type
    // the caller sees nonsense ids and rejects the link.
    let cgroup = unsafe { info.__bindgen_anon_1.cgroup };
    Ok(CgroupLinkInfo {
        prog_id: info.prog_id,
        cgroup_id: cgroup.cgroup_id,
        attach_type: cgroup.attach_type,
    })
}

/// `BPF_LINK_TYPE_XDP`.
const BPF_LINK_TYPE_XDP: u32 = 6;

/// The ifindex an XDP link is attached to: 0 once its interface is gone; `None` when the link
/// is not an XDP link.
pub fn xdp_link_ifindex(link: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    let info = link_info(link)?;
    if info.type_ != BPF_LINK_TYPE_XDP {
        return Ok(None);
    }
    // SAFETY: the kernel filled the xdp member for an XDP link (checked above).
    Ok(Some(unsafe { info.__bindgen_anon_1.xdp.ifindex }))
}

/// Opens a pinned bpf object (here: a link) by its bpffs path.
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // `c` outlives the call.
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    // SAFETY: as in `bpf`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET as libc::c_int,
            std::ptr::from_mut(&mut attr),
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret as i32) })
}

/// Writes `keys[i]` = `values[i]` for every `i` in one call (`BPF_MAP_UPDATE_BATCH`), as
/// `BPF_MAP_UPDATE_ELEM` with flags 0 would one by one: a 10,000-rule policy is one call
/// instead of 10,000. `K` and `V` must be the map's key and value types (their sizes are the
/// map's key and value sizes).
///
/// # Errors
/// As `BPF_MAP_UPDATE_ELEM`; the entries before the one that failed are written.
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // The kernel reads `count` keys and values from these arrays, which outlive the call.
    attr.batch.map_fd = map.as_raw_fd() as u32;
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.values = values.as_ptr() as u64;
    attr.batch.count = u32::try_from(keys.len()).map_err(io::Error::other)?;
    bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr)
}

/// Reads the entries of an array map from index `first` on into `values`, in one call
/// (`BPF_MAP_LOOKUP_BATCH`) per `values.len()` entries, as `BPF_MAP_LOOKUP_ELEM` would one by
/// one. `V` must be the map's value type and the map an array (`u32` keys).
///
/// # Errors
/// As `BPF_MAP_LOOKUP_ELEM`; also when the array has fewer than `first + values.len()` entries.
pub fn array_lookup_batch<V: aya::Pod>(
    map: BorrowedFd<'_>,
    first: u32,
    values: &mut [V],
) -> io::Result<()> {
    let mut keys = vec![0u32; values.len()];
    let mut done = 0;
    while done < values.len() {
        // The batch starts after the key `in_batch` points to; a null pointer means from 0.
        let start = first + done as u32;
        let mut previous = start.wrapping_sub(1);
        let mut out_batch = 0u32;
        // SAFETY: as in `link_update`.
        let mut attr: bpf_attr = unsafe { zeroed() };
        // The kernel writes at most `count` keys and values into these arrays and the next
        // position into `out_batch`; all of them outlive the call.
        attr.batch.map_fd = map.as_raw_fd() as u32;
        attr.batch.in_batch = if start == 0 {
            0
        } else {
            std::ptr::from_mut(&mut previous) as u64
        };
        attr.batch.out_batch = std::ptr::from_mut(&mut out_batch) as u64;
        attr.batch.keys = keys[done..].as_mut_ptr() as u64;
        attr.batch.values = values[done..].as_mut_ptr() as u64;
        attr.batch.count = u32::try_from(values.len() - done).map_err(io::Error::other)?;
        let result = bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        // SAFETY: `count` is a plain integer the kernel sets to the entries it copied.
        let copied = unsafe { attr.batch.count } as usize;
        match result {
            Ok(()) => {}
            // The end of the array: fine if everything asked for was there.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && done + copied == values.len() => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the array ends before the last row asked for",
                ));
            }
            Err(e) => return Err(e),
        }
        if copied == 0 {
            return Err(io::Error::other("BPF_MAP_LOOKUP_BATCH copied nothing"));
        }
        // An array has every key, in order: the keys are `first + done ..`.
        done += copied;
    }
    Ok(())
}

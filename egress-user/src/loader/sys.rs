//! The few bpf(2) calls aya 0.14 does not expose: for cgroup links, replace a link's program
//! in place (`BPF_LINK_UPDATE`), detach a link that other fds may still hold
//! (`BPF_LINK_DETACH`), and read which cgroup a link is attached to
//! (`BPF_OBJ_GET_INFO_BY_FD`); for maps, write or read many entries in one call
//! (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_LOOKUP_BATCH`: arrays since 5.6, LPM tries since
//! 5.13), where aya has one call per entry; and the probes of `features` (load a two- or
//! three-instruction program, create a tiny map, create a link on nothing).
//!
//! Where the agent has `unsafe` (every module outside the loader and `control/server.rs`
//! forbids it): here; `pins.rs`'s statfs and mount; `events.rs` reading an
//! `Event` out of the ring buffer's bytes; `mod.rs` registering the ring buffer's fd with
//! tokio; `xdp.rs`'s `if_nameindex`; and `control/server.rs`'s `if_indextoname`, for the
//! interface names of events. Each block says why it is sound.

use std::{
    io,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info};

/// bpf(2): what the command returned, or the error it set.
fn bpf_call(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
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
        Ok(ret)
    }
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    bpf_call(cmd, attr).map(drop)
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

/// What `BPF_OBJ_GET_INFO_BY_FD` says of the object `fd`, as `T`: `bpf_link_info` for a
/// link, `bpf_map_info` for a map.
///
/// # Safety
/// `T` must be the kernel's info struct for the kind of object `fd` is: plain C data, valid
/// all-zero, which the kernel fills up to its size.
unsafe fn obj_info<T>(fd: BorrowedFd<'_>) -> io::Result<T> {
    // SAFETY: the caller's promise: plain C data, all-zero is a valid value.
    let mut info: T = unsafe { zeroed() };
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // `info` outlives the call and `info_len` is its size.
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<T>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

fn link_info(link: BorrowedFd<'_>) -> io::Result<bpf_link_info> {
    // SAFETY: `bpf_link_info` is the kernel's info struct for a link; a fd of another kind
    // fills it with what the caller rejects as nonsense ids.
    unsafe { obj_info(link) }
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

/// Lifts `RLIMIT_MEMLOCK` for this process. Before Linux 5.11 the kernel charged BPF maps
/// and programs to it, and at the usual default (8 MiB or less) creating the maps fails with
/// `EPERM`, which reads like a missing privilege; 5.11 and later charge the memory cgroup
/// instead and ignore it. Needs `CAP_SYS_RESOURCE` (root).
pub fn raise_memlock() -> io::Result<()> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `unlimited` is a valid rlimit that outlives the call; setrlimit only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens a pinned bpf object (here: a link) by its bpffs path.
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // `c` outlives the call.
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    new_fd(bpf_cmd::BPF_OBJ_GET, &mut attr)
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
    update_batch(map, keys, values)
}

/// [`map_update_batch`] for a per-CPU map of `cpus` possible CPUs: `values` holds each key's
/// value for every CPU in turn (`cpus` values per key), as the kernel reads them (`V`'s size
/// must be a multiple of 8, the kernel's per-CPU stride).
///
/// # Errors
/// As [`map_update_batch`].
pub fn percpu_update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    cpus: usize,
) -> io::Result<()> {
    assert_eq!(size_of::<V>() % 8, 0, "per-CPU values are 8-byte strided");
    assert_eq!(keys.len() * cpus, values.len(), "one value per key and CPU");
    update_batch(map, keys, values)
}

fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
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

/// A probe program or map, or why the kernel refused it.
pub struct Refused {
    /// The errno of the call.
    pub error: io::Error,
    /// The verifier's log (empty when the load failed before the verifier ran).
    pub log: String,
}

/// One eBPF instruction.
fn insn(code: u32, dst: u8, imm: i32) -> aya_obj::generated::bpf_insn {
    // SAFETY: a plain C struct; all-zero is a valid instruction to fill in.
    let mut insn: aya_obj::generated::bpf_insn = unsafe { zeroed() };
    insn.code = code as u8;
    insn.set_dst_reg(dst);
    insn.imm = imm;
    insn
}

/// Loads (and at once drops, closing it) a probe program of `prog_type` expecting
/// `attach_type`: `r0 = ret; exit`, after a call to `helper` when given. The kernel checks the
/// program type, the attach type and that the helper exists for this program type, and then
/// the return value (getpeername programs must return 1). A helper is called without setting
/// its arguments: the verifier looks the helper up before it checks arguments, so "unknown
/// func" means it is missing and an argument complaint means it is there.
///
/// # Errors
/// The kernel refused the program, with its verifier log.
pub fn probe_prog_load(
    prog_type: aya_obj::generated::bpf_prog_type,
    attach_type: Option<aya_obj::generated::bpf_attach_type>,
    helper: Option<aya_obj::generated::bpf_func_id>,
    ret: i32,
) -> Result<OwnedFd, Refused> {
    use aya_obj::generated::{BPF_ALU64, BPF_CALL, BPF_EXIT, BPF_JMP, BPF_K, BPF_MOV};
    let mut insns = Vec::with_capacity(3);
    if let Some(helper) = helper {
        insns.push(insn(BPF_JMP | BPF_CALL, 0, helper as i32));
    }
    insns.push(insn(BPF_ALU64 | BPF_MOV | BPF_K, 0, ret));
    insns.push(insn(BPF_JMP | BPF_EXIT, 0, 0));
    let mut log = vec![0u8; 4096];
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // SAFETY: writing plain integers into the BPF_PROG_LOAD member of the union. The
    // instructions, the licence and the log buffer outlive the call.
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = prog_type as u32;
        load.insn_cnt = insns.len() as u32;
        load.insns = insns.as_ptr() as u64;
        load.license = c"GPL".as_ptr() as u64;
        load.log_level = 1;
        load.log_size = log.len() as u32;
        load.log_buf = log.as_mut_ptr() as u64;
        if let Some(attach_type) = attach_type {
            load.expected_attach_type = attach_type as u32;
        }
    }
    new_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr).map_err(|error| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        Refused {
            error,
            log: String::from_utf8_lossy(&log[..end]).into_owned(),
        }
    })
}

/// Creates a map (dropped by the caller, which closes and frees it).
///
/// # Errors
/// The kernel refused the map type, sizes or flags.
pub fn map_create(
    map_type: aya_obj::generated::bpf_map_type,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // SAFETY: writing plain integers into the BPF_MAP_CREATE member of the union.
    unsafe {
        let create = &mut attr.__bindgen_anon_1;
        create.map_type = map_type as u32;
        create.key_size = key_size;
        create.value_size = value_size;
        create.max_entries = max_entries;
        create.map_flags = flags;
    }
    new_fd(bpf_cmd::BPF_MAP_CREATE, &mut attr)
}

/// Creates an empty map like `like`: its type, key and value sizes, capacity, flags and BTF
/// types (so that `bpftool map dump` shows field names), named `name` (at most 15 bytes).
/// For a rule trie to fill and swap in behind the programs' map-of-maps slot.
///
/// # Errors
/// `like` is not a map, its BTF cannot be opened, or the kernel refused the map.
pub fn map_create_like(like: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    // SAFETY: `bpf_map_info` is the kernel's info struct for a map; for another kind of fd
    // the map created below is refused or of no use, never unsound.
    let info: aya_obj::generated::bpf_map_info = unsafe { obj_info(like)? };
    let btf = if info.btf_id != 0 {
        // SAFETY: as in `link_update`.
        let mut attr: bpf_attr = unsafe { zeroed() };
        attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = info.btf_id;
        Some(new_fd(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr)?)
    } else {
        None
    };
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // SAFETY: writing plain integers into the BPF_MAP_CREATE member of the union.
    unsafe {
        let create = &mut attr.__bindgen_anon_1;
        create.map_type = info.type_;
        create.key_size = info.key_size;
        create.value_size = info.value_size;
        create.max_entries = info.max_entries;
        create.map_flags = info.map_flags;
        create.map_extra = info.map_extra;
        for (to, from) in create.map_name.iter_mut().zip(name.bytes().take(15)) {
            *to = from as libc::c_char;
        }
        if let Some(btf) = &btf {
            create.btf_fd = btf.as_raw_fd() as u32;
            create.btf_key_type_id = info.btf_key_type_id;
            create.btf_value_type_id = info.btf_value_type_id;
        }
    }
    new_fd(bpf_cmd::BPF_MAP_CREATE, &mut attr)
}

/// Puts the map `inner` at `index` of the map-of-maps `outer` (`BPF_MAP_UPDATE_ELEM`). The
/// kernel returns only once no program that could still see the map previously there is
/// running (it waits for an RCU grace period on map-of-maps updates), so after this call the
/// previous map may be changed or dropped without any program seeing it.
///
/// # Errors
/// As `BPF_MAP_UPDATE_ELEM`: `EINVAL` when `inner` does not match the outer map's template.
pub fn map_of_maps_set(outer: BorrowedFd<'_>, index: u32, inner: BorrowedFd<'_>) -> io::Result<()> {
    let value = inner.as_raw_fd() as u32;
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // `index` and `value` outlive the call.
    attr.__bindgen_anon_2.map_fd = outer.as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = std::ptr::from_ref(&index) as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = std::ptr::from_ref(&value) as u64;
    bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// Writes `key` = `value` into `map` (`BPF_MAP_UPDATE_ELEM`, flags 0). `K` and `V` must be
/// the map's key and value types.
///
/// # Errors
/// As `BPF_MAP_UPDATE_ELEM`.
pub fn map_update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
) -> io::Result<()> {
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // `key` and `value` outlive the call.
    attr.__bindgen_anon_2.map_fd = map.as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = std::ptr::from_ref(key) as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = std::ptr::from_ref(value) as u64;
    bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// Removes `key` from `map` (`BPF_MAP_DELETE_ELEM`). `K` must be the map's key type.
///
/// # Errors
/// As `BPF_MAP_DELETE_ELEM`: `ENOENT` when the key is not there.
pub fn map_delete<K: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // `key` outlives the call.
    attr.__bindgen_anon_2.map_fd = map.as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = std::ptr::from_ref(key) as u64;
    bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr)
}

/// `BPF_LINK_CREATE` of `prog` on `target` (a cgroup fd or an ifindex) with `attach_type` and
/// `flags` (for XDP, its `XDP_FLAGS_*` mode). The returned link detaches when dropped, unless
/// pinned.
///
/// # Errors
/// As `BPF_LINK_CREATE`: `EINVAL` where the kernel has no links of this kind, `EBADF` for a
/// bad cgroup fd where it has.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: u32,
    attach_type: aya_obj::generated::bpf_attach_type,
    flags: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.__bindgen_anon_2.target_fd = target;
    attr.link_create.attach_type = attach_type as u32;
    attr.link_create.flags = flags;
    new_fd(bpf_cmd::BPF_LINK_CREATE, &mut attr)
}

/// Calls `cmd` on a link fd that cannot exist (-1): `EBADF` means the kernel knows the
/// command, `EINVAL` that it does not. Nothing is created or changed either way.
pub fn link_cmd_known(cmd: bpf_cmd) -> io::Result<bool> {
    // SAFETY: as in `link_update`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    match cmd {
        bpf_cmd::BPF_LINK_UPDATE => attr.link_update.link_fd = u32::MAX,
        bpf_cmd::BPF_LINK_DETACH => attr.link_detach.link_fd = u32::MAX,
        other => unreachable!("{other:?} is not a link command"),
    }
    match bpf(cmd, &mut attr) {
        Ok(()) => Err(io::Error::other(format!("{cmd:?} on fd -1 succeeded"))),
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A bpf(2) command that returns a new fd.
fn new_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let ret = bpf_call(cmd, attr)?;
    // SAFETY: the command returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

/// Runs `f` on a new thread in a new, empty network namespace of its own (only that thread
/// moves: a network namespace is per thread), which goes away with the thread. For a probe
/// that must attach something to an interface without touching any interface that carries
/// traffic: the namespace's loopback.
///
/// # Errors
/// `unshare(CLONE_NEWNET)` failed (not root).
pub fn in_private_netns<T: Send>(f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare(2) with a flag constant; it changes only this thread.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

//! The XDP backstop's links: one pinned `bpf_link` per host-side interface, at
//! `<pin dir>/links/xdp-<IFNAME>`. Like the cgroup links they outlive the agent and are swapped
//! to each new generation's program with `BPF_LINK_UPDATE`; an interface no longer named by
//! `--xdp-iface` has its link detached. The program runs in generic mode, on the skb (see
//! [`apply`]); a link keeps the mode it was made with.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
};

use aya::{
    Ebpf,
    programs::{Program, XdpMode, links::FdLink},
};
use egress_common::programs::XDP;

use super::{LoadError, PinDir, sys};

/// Prefix of an XDP link pin's file name.
const PREFIX: &str = "xdp-";

/// A pinned XDP link.
pub(super) struct PinnedXdp {
    /// The interface name, from the pin's file name.
    pub(super) iface: String,
    /// The pin.
    pub(super) path: PathBuf,
    /// The link.
    pub(super) fd: OwnedFd,
    /// Where the link is attached; 0 once the interface is gone.
    pub(super) ifindex: u32,
}

/// Where the link for `iface` is pinned.
fn pin_path(pins: &PinDir, iface: &str) -> PathBuf {
    pins.links_dir().join(format!("{PREFIX}{iface}"))
}

/// Every pinned XDP link in the pin directory.
pub(super) fn pinned(pins: &PinDir) -> Result<Vec<PinnedXdp>, LoadError> {
    let dir = pins.links_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LoadError::Pin {
                what: "listing",
                path: dir,
                source,
            });
        }
    };
    let mut links = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| LoadError::Pin {
            what: "listing",
            path: dir.clone(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(iface) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let path = entry.path();
        let fd = sys::obj_get(&path).map_err(|source| LoadError::Pin {
            what: "opening",
            path: path.clone(),
            source,
        })?;
        let ifindex = sys::xdp_link_ifindex(fd.as_fd())
            .map_err(|source| LoadError::Pin {
                what: "reading",
                path: path.clone(),
                source,
            })?
            .ok_or_else(|| LoadError::Pin {
                what: "reading",
                path: path.clone(),
                source: io::Error::other("not an XDP link"),
            })?;
        links.push(PinnedXdp {
            iface: iface.to_owned(),
            path,
            fd,
            ifindex,
        });
    }
    links.sort_by(|a, b| a.iface.cmp(&b.iface));
    Ok(links)
}

/// Every interface of the agent's network namespace, by name.
fn interfaces() -> Vec<(String, u32)> {
    // SAFETY: if_nameindex returns a heap array ended by a zero entry, or null; it is read
    // here and freed once with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            out.push((name, (*p).if_index));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        out
    }
}

/// The interfaces `patterns` name, sorted: an exact name, or a prefix ending in `*`
/// (`veth*`, `cali*`) for every interface whose name starts with it, now. With `strict`, an
/// exact name that does not exist is an error (at start and reload, before anything
/// changes); without it, it is left out (the periodic rescan, where interfaces come and go).
pub(super) fn resolve(patterns: &[String], strict: bool) -> Result<Vec<(String, u32)>, LoadError> {
    let all = interfaces();
    let mut out: Vec<(String, u32)> = Vec::new();
    for pattern in patterns {
        if let Some(prefix) = pattern.strip_suffix('*') {
            out.extend(all.iter().filter(|(n, _)| n.starts_with(prefix)).cloned());
            continue;
        }
        match all.iter().find(|(n, _)| n == pattern) {
            Some(found) => out.push(found.clone()),
            None if strict => {
                return Err(LoadError::Interface {
                    name: pattern.clone(),
                    source: io::Error::from_raw_os_error(libc::ENODEV),
                });
            }
            None => {}
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Puts this generation's XDP program on every interface of `ifaces` (already resolved), and
/// takes it off every other interface a previous agent attached it to.
pub(super) fn apply(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    ifaces: &[(String, u32)],
    existing: Vec<PinnedXdp>,
) -> Result<(), LoadError> {
    let err = |source| LoadError::Program { name: XDP, source };
    if !ifaces.is_empty() {
        let Program::Xdp(program) = ebpf.program_mut(XDP).expect("object has the program") else {
            unreachable!("{XDP} is an XDP program");
        };
        // A rescan attaches the generation's program, loaded once, to new interfaces.
        if program.fd().is_err() {
            super::links::retry_interrupted(|| program.load()).map_err(err)?;
        }
    }
    for (iface, ifindex) in ifaces {
        let path = pin_path(pins, iface);
        let current = existing
            .iter()
            .find(|p| p.iface == *iface && p.ifindex == *ifindex);
        let Program::Xdp(program) = ebpf.program_mut(XDP).expect("object has the program") else {
            unreachable!("{XDP} is an XDP program");
        };
        let prog_fd = program.fd().map_err(err)?;
        if let Some(link) = current {
            sys::link_update(link.fd.as_fd(), prog_fd.as_fd()).map_err(|source| {
                LoadError::Pin {
                    what: "swapping the program of",
                    path,
                    source,
                }
            })?;
            continue;
        }
        // No link, or one whose interface is gone (a new interface of the same name): start
        // afresh.
        remove_pin(&path)?;
        // Generic mode, on the skb: a veth's driver mode converts every skb its peer sends
        // into an XDP buffer (a copy), and cost pods three quarters of their TCP throughput
        // where generic mode costs about a seventh (`cargo xtask bench xdp`, docs/benchmarks.md).
        let id = program
            .attach_to_if_index(*ifindex, XdpMode::Skb)
            .map_err(err)?;
        let link: FdLink = program
            .take_link(id)
            .map_err(err)?
            .try_into()
            .map_err(|e| LoadError::Pin {
                what: "converting the XDP link of (XDP through bpf_link needs Linux 5.9)",
                path: path.clone(),
                source: io::Error::other(e),
            })?;
        link.pin(&path).map_err(|e| LoadError::Pin {
            what: "pinning",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        tracing::info!(iface = %iface, ifindex, "XDP backstop attached");
    }
    for old in existing {
        if ifaces.iter().any(|(name, _)| *name == old.iface) {
            continue;
        }
        detach(&old)?;
        tracing::info!(iface = %old.iface, "XDP backstop detached (no longer named by --xdp-iface)");
    }
    Ok(())
}

/// Detaches a pinned XDP link and removes its pin.
pub(super) fn detach(link: &PinnedXdp) -> Result<(), LoadError> {
    if link.ifindex != 0 {
        sys::link_detach(link.fd.as_fd()).map_err(|source| LoadError::Pin {
            what: "detaching",
            path: link.path.clone(),
            source,
        })?;
    }
    remove_pin(&link.path)
}

fn remove_pin(path: &std::path::Path) -> Result<(), LoadError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LoadError::Pin {
            what: "removing",
            path: path.to_owned(),
            source,
        }),
    }
}

/// An XDP program that passes every packet (`r0 = XDP_PASS; exit`), linked to one interface:
/// what the interface's XDP mode costs whatever the program. `cargo xtask bench xdp` sets it
/// beside the backstop. Detached when dropped: the link is not pinned.
pub struct PassAll {
    _link: OwnedFd,
    _program: OwnedFd,
}

impl PassAll {
    /// Loads the program and links it to `ifindex`, in the calling thread's network
    /// namespace, in `mode`.
    ///
    /// # Errors
    /// The kernel refused the program or the link (no XDP links before 5.9, or `mode` not
    /// available on the interface).
    pub fn attach(ifindex: u32, mode: XdpMode) -> io::Result<Self> {
        use aya_obj::generated::{
            XDP_FLAGS_DRV_MODE, XDP_FLAGS_HW_MODE, XDP_FLAGS_SKB_MODE, bpf_attach_type,
            bpf_prog_type,
        };
        /// `XDP_PASS`.
        const XDP_PASS: i32 = 2;
        let program = sys::probe_prog_load(
            bpf_prog_type::BPF_PROG_TYPE_XDP,
            Some(bpf_attach_type::BPF_XDP),
            None,
            XDP_PASS,
        )
        .map_err(|refused| refused.error)?;
        let flags = match mode {
            XdpMode::Default => 0,
            XdpMode::Skb => XDP_FLAGS_SKB_MODE,
            XdpMode::Driver => XDP_FLAGS_DRV_MODE,
            XdpMode::Hardware => XDP_FLAGS_HW_MODE,
        };
        let link = sys::link_create(program.as_fd(), ifindex, bpf_attach_type::BPF_XDP, flags)?;
        Ok(Self {
            _link: link,
            _program: program,
        })
    }
}

//! Every bpffs path the agent uses, in one place.
//!
//! Layout of a pin directory (default `/sys/fs/bpf/egress`):
//! ```text
//! <pin dir>/<MAP NAME>            every map of egress_common::maps (CONFIG, RULES_V4, ...)
//! <pin dir>/links/connect4        the cgroup/connect4 link (holds the program attached)
//! <pin dir>/links/connect6        the cgroup/connect6 link
//! <pin dir>/links/sockops         the sockops link (original destinations for the proxy)
//! <pin dir>/links/getpeername4    the cgroup/getpeername4 link (original destination for
//! <pin dir>/links/getpeername6    the app), and getpeername6
//! <pin dir>/links/sendmsg4        cgroup/sendmsg4 and sendmsg6 (datagrams sent to an address)
//! <pin dir>/links/sendmsg6
//! <pin dir>/links/sock_create     cgroup/sock_create (raw sockets, other protocols)
//! <pin dir>/links/recvmsg4        cgroup/recvmsg4 and recvmsg6 (DNS answers from the agent
//! <pin dir>/links/recvmsg6        shown as the resolver's)
//! <pin dir>/links/xdp-<IFNAME>    the XDP backstop on one host-side interface (--xdp-iface)
//! ```
//! Enforcement lives as long as the link pins do: the agent can exit, crash or restart.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// The default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egress";
/// Where bpffs is conventionally mounted; the agent mounts it there if it is missing.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from `<linux/magic.h>`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The link pins, by the program they hold: every program is attached to the managed cgroup
/// through a pinned link.
pub const LINKS: [(&str, &str); 10] = [
    (egress_common::programs::SOCK_CREATE, "sock_create"),
    (egress_common::programs::RECVMSG4, "recvmsg4"),
    (egress_common::programs::RECVMSG6, "recvmsg6"),
    (egress_common::programs::CONNECT4, "connect4"),
    (egress_common::programs::CONNECT6, "connect6"),
    (egress_common::programs::SENDMSG4, "sendmsg4"),
    (egress_common::programs::SENDMSG6, "sendmsg6"),
    (egress_common::programs::SOCK_OPS, "sockops"),
    (egress_common::programs::GETPEERNAME4, "getpeername4"),
    (egress_common::programs::GETPEERNAME6, "getpeername6"),
];

/// Paths inside one pin directory.
#[derive(Clone, Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// A pin directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The directory of link pins.
    pub fn links_dir(&self) -> PathBuf {
        self.0.join("links")
    }

    /// Where the link of program `program` is pinned.
    pub fn link(&self, program: &str) -> PathBuf {
        let file = LINKS
            .iter()
            .find(|(p, _)| *p == program)
            .map_or(program, |(_, f)| f);
        self.links_dir().join(file)
    }

    /// Makes sure the directory exists on a bpf filesystem, mounting bpffs at
    /// [`BPFFS_MOUNT`] if the directory is under it and nothing is mounted there yet.
    pub fn prepare(&self) -> io::Result<()> {
        if self.0.starts_with(BPFFS_MOUNT) {
            ensure_bpffs()?;
        }
        // Check before creating anything: the nearest existing ancestor must be on bpffs.
        let existing = self
            .0
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(existing)? {
            return Err(io::Error::other(format!(
                "{} is not on a bpf filesystem (mount one with `mount -t bpf bpf DIR`)",
                self.0.display()
            )));
        }
        fs::create_dir_all(self.links_dir())
    }
}

/// Mounts bpffs at [`BPFFS_MOUNT`] unless one is mounted there already (it is not at boot).
///
/// # Errors
/// The mount point cannot be checked, or the mount fails (not root).
pub fn ensure_bpffs() -> io::Result<()> {
    let mount = Path::new(BPFFS_MOUNT);
    if !is_bpffs(mount)? {
        mount_bpffs(mount)?;
    }
    Ok(())
}

/// True when `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path and `buf` a writable statfs.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ret = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    if ret != 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::NotFound {
            Ok(false)
        } else {
            Err(err)
        };
    }
    Ok(buf.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)?;
    let target = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings or null (data).
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(io::Error::other(format!(
            "mounting bpffs at {}: {}",
            path.display(),
            io::Error::last_os_error()
        )));
    }
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

//! cgroup v2: finding the mount, creating the managed cgroup, moving processes into it.
//!
//! The cgroup v2 mount differs between hosts (`/sys/fs/cgroup` on a unified host,
//! `/sys/fs/cgroup/unified` on a hybrid one), so it is always read from
//! `/proc/self/mountinfo`, never assumed.

#![forbid(unsafe_code)]

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Name of the managed cgroup under the cgroup v2 mount when `--cgroup` is not given.
pub const DEFAULT_CGROUP_NAME: &str = "egress";

/// cgroup errors.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 line in mountinfo.
    #[error("no cgroup v2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    /// Reading mountinfo failed.
    #[error("reading /proc/self/mountinfo")]
    MountInfo(#[source] io::Error),
    /// The path is not a cgroup v2 directory.
    #[error("{0} is not a cgroup v2 directory (no cgroup.procs in it)")]
    NotACgroup(PathBuf),
    /// A cgroup given by path does not exist, and creating it was not asked for: a typo
    /// (`kubepods.slice` on a node with the cgroupfs driver) must not enforce on a new, empty
    /// cgroup that no workload is in.
    #[error(
        "cgroup {path} does not exist (egress creates only the default <cgroup2 mount>/{DEFAULT_CGROUP_NAME}, \
         or a given path with --create-cgroup); {nearby}"
    )]
    Missing {
        /// The path given.
        path: PathBuf,
        /// What exists nearby, for the message.
        nearby: String,
    },
    /// Creating or reading a cgroup failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The mount point of the cgroup v2 filesystem.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    parse_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2)
}

/// Finds the cgroup2 mount point in the text of a mountinfo file.
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 0:30 / /sys/fs/cgroup/unified rw,... - cgroup2 cgroup2 rw"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(unescape_mountinfo))?
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// The managed cgroup when none is given: `<cgroup2 mount>/egress`.
pub fn default_cgroup() -> Result<PathBuf, CgroupError> {
    Ok(cgroup2_mount()?.join(DEFAULT_CGROUP_NAME))
}

/// Refuses a cgroup path that does not exist: see [`CgroupError::Missing`]. The message
/// names the nearest existing directory and the cgroups in it.
///
/// # Errors
/// [`CgroupError::Missing`].
pub fn require_existing(path: &Path) -> Result<(), CgroupError> {
    if path.exists() {
        return Ok(());
    }
    let nearest = path
        .ancestors()
        .skip(1)
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let mut children: Vec<String> = fs::read_dir(nearest)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().join("cgroup.procs").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    children.sort();
    let nearby = if children.is_empty() {
        format!("{} exists and holds no cgroup", nearest.display())
    } else {
        const SHOWN: usize = 12;
        let more = children.len().saturating_sub(SHOWN);
        children.truncate(SHOWN);
        format!(
            "{} exists and holds {}{}",
            nearest.display(),
            children.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )
    };
    Err(CgroupError::Missing {
        path: path.to_owned(),
        nearby,
    })
}

/// The extended attribute that marks a cgroup `egress run` created, so that `egress unload`
/// removes that one and no other (a `--cgroup` the operator made, `kubepods`, ...). A mark on
/// the directory itself, rather than a note in the state directory, goes with the cgroup:
/// it cannot outlive it or point at a namesake made later. `trusted.` needs
/// `CAP_SYS_ADMIN`, which the agent has, so a workload cannot forge it.
const CREATED_XATTR: &str = "trusted.egress.created";

/// Creates the cgroup directory if it is missing and checks it is a cgroup v2 directory.
/// Returns true when it created it; such a cgroup is marked, for [`created_by_egress`].
pub fn ensure(path: &Path) -> Result<bool, CgroupError> {
    // Check before creating anything: the nearest existing ancestor must be a cgroup, so a
    // mistyped path outside cgroupfs is an error, not a stray directory.
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !existing.join("cgroup.procs").exists() {
        return Err(CgroupError::NotACgroup(existing.to_owned()));
    }
    let created = !path.exists();
    fs::create_dir_all(path).map_err(|source| CgroupError::Io {
        what: "creating cgroup",
        path: path.to_owned(),
        source,
    })?;
    if !path.join("cgroup.procs").exists() {
        return Err(CgroupError::NotACgroup(path.to_owned()));
    }
    if created {
        set_xattr(path, CREATED_XATTR).map_err(|source| CgroupError::Io {
            what: "marking the cgroup egress created",
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(created)
}

/// True when `egress run` created the cgroup at `path` (it carries the mark [`ensure`] set).
pub fn created_by_egress(path: &Path) -> bool {
    has_xattr(path, CREATED_XATTR)
}

/// What keeps a cgroup from being removed: processes in it, and child cgroups.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Occupants {
    /// Process ids in the cgroup itself (`cgroup.procs`).
    pub pids: Vec<u32>,
    /// Names of the child cgroups.
    pub children: Vec<String>,
}

/// Reads the processes and child cgroups of the cgroup at `path`.
///
/// # Errors
/// [`CgroupError::Io`] when `cgroup.procs` or the directory cannot be read.
pub fn occupants(path: &Path) -> Result<Occupants, CgroupError> {
    let procs = path.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(|source| CgroupError::Io {
        what: "reading",
        path: procs,
        source,
    })?;
    let pids = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let mut children: Vec<String> = fs::read_dir(path)
        .map_err(|source| CgroupError::Io {
            what: "reading cgroup",
            path: path.to_owned(),
            source,
        })?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    children.sort();
    Ok(Occupants { pids, children })
}

/// The path of the cgroup whose id is `id`, searched under the cgroup v2 mount; `None` when
/// no cgroup has it (it was removed).
///
/// # Errors
/// No cgroup v2 mount.
pub fn find_by_id(id: u64) -> Result<Option<PathBuf>, CgroupError> {
    let mut stack = vec![cgroup2_mount()?];
    while let Some(dir) = stack.pop() {
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Ok(Some(dir));
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(None)
}

/// Removes the (empty) cgroup at `path`.
///
/// # Errors
/// [`CgroupError::Io`], e.g. `EBUSY` when a process joined it meanwhile.
pub fn remove(path: &Path) -> Result<(), CgroupError> {
    fs::remove_dir(path).map_err(|source| CgroupError::Io {
        what: "removing cgroup",
        path: path.to_owned(),
        source,
    })
}

fn set_xattr(path: &Path, name: &str) -> io::Result<()> {
    xattr::set(path, name, b"1")
}

fn has_xattr(path: &Path, name: &str) -> bool {
    matches!(xattr::get(path, name), Ok(Some(_)))
}

/// The cgroup v2 id of a cgroup directory (the kernfs inode number, as
/// `bpf_get_current_cgroup_id()` reports it).
pub fn id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Io {
            what: "reading cgroup",
            path: path.to_owned(),
            source,
        })
}

/// The cgroup v2 id of the calling process's own cgroup (from `/proc/self/cgroup`).
pub fn own_id() -> Result<u64, CgroupError> {
    let text = fs::read_to_string("/proc/self/cgroup").map_err(|source| CgroupError::Io {
        what: "reading",
        path: PathBuf::from("/proc/self/cgroup"),
        source,
    })?;
    // The cgroup v2 line is "0::/path".
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoCgroup2)?;
    id(&cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// Moves the calling process (all its threads) into the cgroup.
pub fn join(path: &Path) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).map_err(|source| CgroupError::Io {
        what: "joining cgroup",
        path: procs,
        source,
    })
}

/// Opens the cgroup directory for attaching programs to it.
pub fn open(path: &Path) -> Result<fs::File, CgroupError> {
    fs::File::open(path).map_err(|source| CgroupError::Io {
        what: "opening cgroup",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn a_missing_cgroup_is_refused_naming_what_exists_nearby() {
        let dir = TempDir::new("cg");
        fs::create_dir_all(dir.join("kubepods/pod1")).expect("dirs");
        // Fake cgroups: directories with cgroup.procs.
        fs::write(dir.join("kubepods/cgroup.procs"), "").expect("procs");
        fs::write(dir.join("kubepods/pod1/cgroup.procs"), "").expect("procs");
        assert!(require_existing(&dir.join("kubepods")).is_ok());
        let err = require_existing(&dir.join("kubepods.slice")).expect_err("missing");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "cgroup {}/kubepods.slice does not exist",
                dir.display()
            )),
            "{text}"
        );
        assert!(
            text.ends_with(&format!("{} exists and holds kubepods", dir.display())),
            "{text}"
        );
    }

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let text = "25 30 0:23 / /sys rw - sysfs sysfs rw\n\
                    35 25 0:30 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n\
                    41 35 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    42 35 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_with_optional_fields_and_escapes() {
        let text = "29 23 0:26 / /sys/fs/cg\\040v2 rw shared:4 master:1 - cgroup2 none rw\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cg v2"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            parse_cgroup2_mount("25 30 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }
}

//! The pinned cgroup links: opening them, loading and attaching programs, detaching, and
//! removing everything (`egress unload`).

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, Program, ProgramError, links::FdLink},
};
use egress_common::maps;

use super::{LoadError, PinDir, error::remove_pin, features, pins, sys, xdp};
use crate::cgroup;

/// A link pinned in the pin directory, opened.
pub(super) struct Pinned {
    program: &'static str,
    path: PathBuf,
    fd: OwnedFd,
    info: sys::CgroupLinkInfo,
}

/// Opens every link pinned in `pins` (none, one or both programs).
pub(super) fn pinned_links(pins: &PinDir) -> Result<Vec<Pinned>, LoadError> {
    let mut links = Vec::new();
    for (program, _) in pins::LINKS {
        let path = pins.link(program);
        if !path.exists() {
            continue;
        }
        let pin_err = |what, path: &Path| {
            let path = path.to_owned();
            move |source| LoadError::Pin { what, path, source }
        };
        let fd = sys::obj_get(&path).map_err(pin_err("opening", &path))?;
        let info = sys::cgroup_link_info(fd.as_fd()).map_err(pin_err("reading", &path))?;
        links.push(Pinned {
            program,
            path,
            fd,
            info,
        });
    }
    Ok(links)
}

/// Detaches a pinned link and removes its pin.
pub(super) fn drop_link(link: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<(), LoadError> {
    sys::link_detach(link).map_err(|source| LoadError::Pin {
        what: "detaching",
        path: path.to_owned(),
        source,
    })?;
    std::fs::remove_file(path).map_err(|source| LoadError::Pin {
        what: "removing",
        path: path.to_owned(),
        source,
    })
}

/// Loads (verifies) one program of the object.
pub(super) fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), LoadError> {
    let err = |source| LoadError::Rejected {
        name,
        release: features::release(),
        source: Box::new(source),
    };
    match ebpf.program_mut(name).expect("object has the program") {
        Program::CgroupSockAddr(p) => retry_interrupted(|| p.load()).map_err(err),
        Program::SockOps(p) => retry_interrupted(|| p.load()).map_err(err),
        Program::CgroupSock(p) => retry_interrupted(|| p.load()).map_err(err),
        other => unreachable!("{name} is a {:?} program", other.prog_type()),
    }
}

/// How many times a program load is tried while the verifier answers `EAGAIN` (libbpf tries
/// five times as well).
const LOAD_ATTEMPTS: usize = 5;

/// Runs `load` again while it fails with `EAGAIN`, up to [`LOAD_ATTEMPTS`] times. The
/// verifier gives up with `EAGAIN` whenever a signal is pending for the loading thread (a
/// `SIGCHLD` of a child that exited, a `SIGHUP` for a reload), whatever the program: seen
/// as `processed 1 insns` and `Resource temporarily unavailable` in a test process that
/// runs children. A failed load leaves the program unloaded, so loading it again is sound.
pub(super) fn retry_interrupted(
    load: impl FnMut() -> Result<(), ProgramError>,
) -> Result<(), ProgramError> {
    retry_while(load, |e| {
        matches!(e, ProgramError::LoadError { io_error, .. }
            if io_error.raw_os_error() == Some(libc::EAGAIN))
    })
}

fn retry_while<E>(
    mut load: impl FnMut() -> Result<(), E>,
    interrupted: impl Fn(&E) -> bool,
) -> Result<(), E> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(e) if interrupted(&e) && attempt < LOAD_ATTEMPTS => attempt += 1,
            done => return done,
        }
    }
}

/// Attaches one loaded program to the cgroup and returns its link, to be pinned.
pub(super) fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &Path,
) -> Result<FdLink, LoadError> {
    let file = cgroup::open(cgroup)?;
    let err = |source| LoadError::Program { name, source };
    let to_fd = |e: aya::programs::links::LinkError| LoadError::Pin {
        what: "converting the link of",
        path: PathBuf::from(name),
        source: io::Error::other(e),
    };
    match ebpf.program_mut(name).expect("object has the program") {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
            p.take_link(id).map_err(err)?.try_into().map_err(to_fd)
        }
        Program::SockOps(p) => {
            let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
            p.take_link(id).map_err(err)?.try_into().map_err(to_fd)
        }
        Program::CgroupSock(p) => {
            let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
            p.take_link(id).map_err(err)?.try_into().map_err(to_fd)
        }
        other => unreachable!("{name} is a {:?} program", other.prog_type()),
    }
}

/// Opens the existing link pins and checks they belong to this cgroup.
pub(super) fn existing_links(
    pins: &PinDir,
    cgroup: &Path,
    cgroup_id: u64,
) -> Result<HashMap<&'static str, OwnedFd>, LoadError> {
    let mut links = HashMap::new();
    for link in pinned_links(pins)? {
        if link.info.cgroup_id != cgroup_id {
            return Err(LoadError::LinkElsewhere {
                path: link.path,
                cgroup: cgroup.to_owned(),
                expected: cgroup_id,
                found: link.info.cgroup_id,
            });
        }
        links.insert(link.program, link.fd);
    }
    Ok(links)
}

/// Detaches the programs and removes every pin `egress` made in `pin_dir`. Links are detached
/// explicitly (`BPF_LINK_DETACH`), so enforcement stops even if a running agent still holds
/// them. Returns what was removed.
pub fn unload(pin_dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let pins = PinDir::new(pin_dir);
    let mut removed = Vec::new();
    for link in pinned_links(&pins)? {
        let path = link.path;
        sys::link_detach(link.fd.as_fd()).map_err(|source| LoadError::Pin {
            what: "detaching",
            path: path.clone(),
            source,
        })?;
        std::fs::remove_file(&path).map_err(|source| LoadError::Pin {
            what: "removing",
            path: path.clone(),
            source,
        })?;
        removed.push(path);
    }
    for link in xdp::pinned(&pins)? {
        xdp::detach(&link)?;
        removed.push(link.path);
    }
    // With the temporary pins of a change of rules that stopped half way.
    let temporary = [maps::RULES_V4, maps::RULES_V6].map(super::rules::temporary_pin);
    let names = maps::PER_GENERATION.into_iter().chain(maps::SHARED);
    for name in names.chain(temporary.iter().map(String::as_str)) {
        let path = pins.map(name);
        if remove_pin(&path, "removing")? {
            removed.push(path);
        }
    }
    // Only empty directories go; anything else in there is not ours to delete.
    let _ = std::fs::remove_dir(pins.links_dir());
    let _ = std::fs::remove_dir(pins.path());
    Ok(removed)
}

/// The cgroup ids that the pinned links in `pin_dir` enforce on, or an empty list when no
/// link is pinned there. A process is filtered when it is in one of these cgroups or below.
pub fn enforced_cgroups(pin_dir: &Path) -> Result<Vec<u64>, LoadError> {
    Ok(pinned_links(&PinDir::new(pin_dir))?
        .into_iter()
        .map(|l| l.info.cgroup_id)
        .collect())
}

#[cfg(test)]
mod retry_tests {
    use std::io;

    use super::{LOAD_ATTEMPTS, retry_while};

    fn eagain(e: &io::Error) -> bool {
        e.raw_os_error() == Some(libc::EAGAIN)
    }

    /// Runs `retry_while` over a load that fails with `errno` for its first `failures` calls;
    /// returns its result and how many calls it made.
    fn attempts(errno: i32, failures: usize) -> (Result<(), io::Error>, usize) {
        let mut calls = 0;
        let result = retry_while(
            || {
                calls += 1;
                if calls <= failures {
                    Err(io::Error::from_raw_os_error(errno))
                } else {
                    Ok(())
                }
            },
            eagain,
        );
        (result, calls)
    }

    #[test]
    fn an_interrupted_load_is_tried_again_a_bounded_number_of_times() {
        let (twice, calls) = attempts(libc::EAGAIN, 2);
        assert!(twice.is_ok());
        assert_eq!(calls, 3);

        let (always, calls) = attempts(libc::EAGAIN, usize::MAX);
        assert!(always.is_err());
        assert_eq!(calls, LOAD_ATTEMPTS);

        // A rejection is final.
        let (rejected, calls) = attempts(libc::EACCES, usize::MAX);
        assert_eq!(
            rejected.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EACCES))
        );
        assert_eq!(calls, 1);
    }
}

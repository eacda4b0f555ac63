//! What can go wrong putting a policy into the kernel.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::features;
use crate::cgroup::CgroupError;

/// What can go wrong putting a policy into the kernel. In every case the generation that was
/// in force before stays in force.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The pin directory could not be prepared.
    #[error("preparing pin directory {path}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The managed cgroup could not be prepared.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The agent itself runs in the managed cgroup.
    #[error(
        "the agent runs in the managed cgroup {cgroup} itself, so exempting its own connections \
         would exempt every workload there; run the agent in another cgroup"
    )]
    AgentInsideCgroup {
        /// The managed cgroup.
        cgroup: PathBuf,
    },
    /// An `--xdp-iface` interface does not exist.
    #[error("--xdp-iface {name}: no such interface in the agent's network namespace")]
    Interface {
        /// The name given.
        name: String,
        /// What if_nametoindex said.
        #[source]
        source: io::Error,
    },
    /// A pinned map was made by an incompatible version of egress.
    #[error(
        "pinned map {path} has {found}, this version needs {expected}; it was made by an \
         incompatible version of egress: run `egress unload --pin-dir {dir}` first"
    )]
    IncompatiblePin {
        /// The pin.
        path: PathBuf,
        /// The pin directory.
        dir: PathBuf,
        /// Its layout.
        found: String,
        /// The layout this build needs.
        expected: String,
    },
    /// The pinned links are attached to another cgroup.
    #[error(
        "{path} is attached to cgroup id {found}, not to {cgroup} (id {expected}); use another \
         --pin-dir or run `egress unload` first"
    )]
    LinkElsewhere {
        /// The link pin.
        path: PathBuf,
        /// The cgroup asked for.
        cgroup: PathBuf,
        /// Its id.
        expected: u64,
        /// The id the link is attached to.
        found: u64,
    },
    /// Loading the object or a program failed (the verifier's log is in the source).
    #[error("loading the eBPF programs")]
    Ebpf(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("program {name}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The kernel refused to load (verify) a program although every probed feature is there:
    /// most likely a kernel older than any the programs are tested on.
    #[error(
        "the kernel (Linux {release}) refused to load program {name}; egress's programs are \
         tested on Linux {} and newer, and older verifiers may reject them",
        features::TESTED_SINCE
    )]
    Rejected {
        /// The program.
        name: &'static str,
        /// `uname -r`.
        release: String,
        /// The load error, with the verifier's log (boxed: it is large, and rare).
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map operation failed.
    #[error("map {name}: {what}")]
    Map {
        /// The map.
        name: &'static str,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: aya::maps::MapError,
    },
    /// Pinning or replacing a pin failed.
    #[error("{what} {path}")]
    Pin {
        /// What was being done.
        what: &'static str,
        /// The pin.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Removes the pin at `path`: true if it was there, false if there was none.
pub(super) fn remove_pin(path: &Path, what: &'static str) -> Result<bool, LoadError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(LoadError::Pin {
            what,
            path: path.to_owned(),
            source,
        }),
    }
}

/// A [`LoadError::Map`] for map `name` while doing `what`.
pub(super) fn map_err(
    name: &'static str,
    what: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { name, what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_the_kernel_refuses_is_reported_with_the_kernel_and_the_tested_floor() {
        let error = LoadError::Rejected {
            name: "connect4",
            release: "5.10.0-30-cloud-amd64".to_owned(),
            source: Box::new(aya::programs::ProgramError::NotLoaded),
        };
        assert_eq!(
            error.to_string(),
            "the kernel (Linux 5.10.0-30-cloud-amd64) refused to load program connect4; \
             egress's programs are tested on Linux 6.1 and newer, and older verifiers may reject them"
        );
    }
}

//! Joining the host's cgroup namespace at start-up (`egress run --host-cgroupns`).
//!
//! containerd gives every container a private cgroup namespace on cgroup v2: inside the agent's
//! pod `/proc/self/cgroup` reads `0::/`. The agent exempts its own sockets (the proxy's upstream
//! connections) by its cgroup id, which [`crate::cgroup::own_id`] finds from that file; in the
//! pod's namespace `/` names the cgroup2 root, so the id would be the root's, and the agent's
//! own connections, made from its pod's cgroup below `kubepods.slice`, would be judged by the
//! policy like any pod's. In the host's namespace (`/proc/1/ns/cgroup` with `hostPID: true`)
//! the file names the real cgroup.
//!
//! A cgroup namespace belongs to a thread: [`join`] moves the calling thread, and the threads
//! it starts afterwards inherit it. `egress run` calls it first thing, on the main thread,
//! before the async runtime starts any.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

/// Why the cgroup namespace could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum CgroupNsError {
    /// The namespace file could not be opened.
    #[error("{path}: opening the cgroup namespace file")]
    Open {
        /// The file given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// setns(2) refused.
    #[error("{path}: joining its cgroup namespace with setns(CLONE_NEWCGROUP){hint}")]
    Setns {
        /// The file given.
        path: PathBuf,
        /// What the errno most likely means here.
        hint: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

/// Moves the calling thread into the cgroup namespace that `path` (a `/proc/PID/ns/cgroup`
/// file) refers to; threads started afterwards inherit it.
pub fn join(path: &Path) -> Result<(), CgroupNsError> {
    let file = File::open(path).map_err(|source| CgroupNsError::Open {
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: setns reads only its two integer arguments; `file` is open for the whole call.
    // It changes this thread's cgroup namespace and nothing Rust tracks.
    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWCGROUP) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    let hint = match source.raw_os_error() {
        Some(libc::EINVAL) => " (not a cgroup namespace file; /proc/1/ns/cgroup is one)",
        Some(libc::EPERM) => " (needs CAP_SYS_ADMIN: run the agent as root, privileged)",
        _ => "",
    };
    Err(CgroupNsError::Setns {
        path: path.to_owned(),
        hint,
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::process::ExitStatusExt as _, process::Command};

    use super::*;
    use crate::cgroup;

    /// Set in the child process of [`joining_a_namespace_shows_the_real_cgroup_path`]: the
    /// cgroup to move into and the namespace file to join, separated by a newline.
    const CHILD_ENV: &str = "EGRESS_TEST_CGROUPNS_CHILD";

    /// This thread's cgroup v2 path as its own cgroup namespace shows it.
    fn thread_cgroup() -> String {
        let text = fs::read_to_string("/proc/thread-self/cgroup").expect("read cgroup");
        text.lines()
            .find_map(|line| line.strip_prefix("0::"))
            .unwrap_or_else(|| panic!("no cgroup v2 line in {text:?}"))
            .to_owned()
    }

    /// The proof, in a child process (this test binary again, running this same test with
    /// [`CHILD_ENV`] set, when it takes [`child_unshares_then_joins`]'s part): the child moves
    /// itself into a fresh cgroup, takes a new cgroup namespace as a container does (its path
    /// reads `/`), then joins ours and reads the real path again. A child because the test
    /// harness itself may sit in the cgroup2 root, whose path is `/` in every namespace, and
    /// because unshare must not touch other tests.
    #[test]
    fn joining_a_namespace_shows_the_real_cgroup_path() {
        if let Ok(setting) = std::env::var(CHILD_ENV) {
            return child_unshares_then_joins(&setting);
        }
        let mount = cgroup::cgroup2_mount().expect("cgroup2 mount");
        let name = format!("egress-test-cgroupns-{}", std::process::id());
        let dir = mount.join(&name);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let ours = format!(
            "/proc/{}/task/{}/ns/cgroup",
            std::process::id(),
            // SAFETY: gettid has no arguments and cannot fail.
            unsafe { libc::gettid() }
        );
        let output = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "cgroupns::tests::joining_a_namespace_shows_the_real_cgroup_path",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{}\n{ours}", dir.display()))
            .output()
            .expect("starting the child");
        fs::remove_dir(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "child failed ({:?}, signal {:?}):\n{stdout}\n{}",
            output.status.code(),
            output.status.signal(),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("in a new cgroup namespace: / ; joined: /{name}\n")),
            "child's report: {stdout}"
        );
    }

    /// The child's part of [`joining_a_namespace_shows_the_real_cgroup_path`]: `setting` is
    /// the cgroup to move into and the namespace file to join, separated by a newline.
    fn child_unshares_then_joins(setting: &str) {
        let (cgroup_dir, namespace) = setting.split_once('\n').expect("two lines");
        // The whole process: a cgroup v2 process's threads share its cgroup.
        fs::write(
            Path::new(cgroup_dir).join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("moving into the test cgroup");
        // SAFETY: unshare takes a flag; it changes this thread's cgroup namespace only.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWCGROUP) };
        assert_eq!(ret, 0, "unshare: {}", io::Error::last_os_error());
        let inside = thread_cgroup();
        join(Path::new(namespace)).expect("joining the parent's cgroup namespace");
        let joined = thread_cgroup();
        println!("in a new cgroup namespace: {inside} ; joined: {joined}");
    }

    #[test]
    fn a_file_that_is_no_cgroup_namespace_is_refused_naming_it() {
        let error = join(Path::new("/proc/self/ns/net")).expect_err("a network namespace");
        let text = format!(
            "{}: {}",
            error,
            std::error::Error::source(&error).expect("errno")
        );
        assert!(
            text.starts_with(
                "/proc/self/ns/net: joining its cgroup namespace with setns(CLONE_NEWCGROUP) \
                 (not a cgroup namespace file; /proc/1/ns/cgroup is one): "
            ),
            "{text}"
        );
        assert!(text.ends_with("(os error 22)"), "{text}");
        let error = join(Path::new("/nonexistent/ns/cgroup")).expect_err("missing");
        assert_eq!(
            error.to_string(),
            "/nonexistent/ns/cgroup: opening the cgroup namespace file"
        );
    }
}

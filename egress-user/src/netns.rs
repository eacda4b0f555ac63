//! Network namespaces other than the agent's own: a pod's. The agent opens the proxy's
//! listeners inside each pod's network namespace, so that the kernel's rewrite of a redirected
//! connection to loopback reaches the proxy from inside the pod (and no other pod or host
//! process can reach that listener), and makes the proxy's upstream sockets there too, so that
//! a pod's proxied request leaves with the pod's own address.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life; a thread may change namespace with `setns(2)`. A [`NetnsThread`] is one thread that
//! joined a pod's namespace and makes sockets there on request; the sockets are then used from
//! anywhere (the tokio runtime's threads never change namespace).

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd as _},
    path::Path,
    sync::mpsc,
    thread,
};

/// The cookie of the network namespace `socket` belongs to (`SO_NETNS_COOKIE`, Linux 5.14):
/// the number the kernel programs see from `bpf_get_netns_cookie` for a socket of that
/// namespace.
///
/// # Errors
/// The kernel does not have `SO_NETNS_COOKIE` (before 5.14), or the descriptor is no socket.
pub fn cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the descriptor is valid for the borrow; value and len point at this stack frame
    // with the size the option writes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The cookie of the calling thread's network namespace.
///
/// # Errors
/// As [`cookie`], or no socket can be made.
pub fn current() -> io::Result<u64> {
    let probe = std::net::UdpSocket::bind(("127.0.0.1", 0))
        .or_else(|_| std::net::UdpSocket::bind(("::1", 0)))?;
    cookie(&probe)
}

/// Work for a [`NetnsThread`].
type Job = Box<dyn FnOnce() + Send>;

/// A thread inside another network namespace that runs closures there, one at a time: what
/// they create (sockets) belongs to that namespace. It ends when the handle is dropped.
pub struct NetnsThread {
    jobs: mpsc::Sender<Job>,
    /// The namespace's cookie.
    cookie: u64,
}

impl std::fmt::Debug for NetnsThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetnsThread")
            .field("cookie", &self.cookie)
            .finish_non_exhaustive()
    }
}

impl NetnsThread {
    /// Starts a thread in the network namespace `path` names (`/proc/PID/ns/net`,
    /// `/run/netns/NAME`).
    ///
    /// # Errors
    /// The file cannot be opened, is not a network namespace, or the thread cannot join it
    /// (the agent lacks `CAP_SYS_ADMIN`), or the kernel cannot tell the namespace's cookie.
    pub fn start(path: &Path) -> io::Result<Self> {
        let ns = File::open(path)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel::<io::Result<u64>>();
        thread::Builder::new()
            .name("egress-netns".to_owned())
            // Its jobs make sockets: a small stack is plenty.
            .stack_size(64 * 1024)
            .spawn(move || {
                let joined = join(&ns).and_then(|()| current());
                drop(ns);
                let ok = joined.is_ok();
                let _ = ready_tx.send(joined);
                if ok {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                }
            })?;
        let cookie = ready
            .recv()
            .map_err(|_| io::Error::other("the namespace thread ended before it started"))??;
        Ok(Self { jobs, cookie })
    }

    /// The namespace's cookie.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on the thread, inside the namespace, and waits for its result.
    ///
    /// # Errors
    /// The thread is gone.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let (tx, rx) = mpsc::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.recv().map_err(|_| gone())
    }

    /// As [`NetnsThread::run`], without blocking the async caller.
    ///
    /// # Errors
    /// The thread is gone.
    pub async fn run_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.await.map_err(|_| gone())
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        self.jobs.send(job).map_err(|_| gone())
    }
}

fn gone() -> io::Error {
    io::Error::other("the network namespace's thread is gone")
}

/// Moves the calling thread into the network namespace `ns`.
fn join(ns: &File) -> io::Result<()> {
    // SAFETY: setns on a descriptor valid for the borrow; it changes only this thread's
    // network namespace, which the thread keeps to itself.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_namespace_has_the_cookie_of_its_sockets() {
        let here = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let own = cookie(&here).expect("SO_NETNS_COOKIE (Linux 5.14)");
        let thread = NetnsThread::start(Path::new("/proc/self/ns/net")).expect("start");
        assert_eq!(thread.cookie(), own);
        let made = thread
            .run(|| std::net::TcpListener::bind(("127.0.0.1", 0)))
            .expect("run")
            .expect("bind in the namespace");
        assert_eq!(cookie(&made).expect("cookie"), own);
    }

    #[test]
    fn a_file_that_is_no_namespace_is_refused() {
        let err = NetnsThread::start(Path::new("/proc/self/status")).expect_err("not a netns");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }
}

//! Network namespaces other than the agent's own: a pod's. The agent opens the proxy's
//! listeners inside each pod's network namespace, so that the kernel's rewrite of a redirected
//! connection to loopback reaches the proxy from inside the pod (and no other pod or host
//! process can reach that listener), and makes the proxy's upstream sockets there too, so that
//! a pod's proxied request leaves with the pod's own address.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life; a thread may change namespace with `setns(2)`. A [`Netns`] is a pod's namespace,
//! whose sockets one worker thread makes on request, joining the namespace for the job; the
//! sockets are then used from anywhere (the tokio runtime's threads never change namespace).

use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::Path,
    sync::{Arc, Mutex, PoisonError, mpsc},
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

/// Work for the namespace worker: called inside the namespace, or with why it could not be
/// joined (then it must make nothing).
type Job = Box<dyn FnOnce(io::Result<()>) + Send>;

/// One job, with the namespace it runs in.
struct Task {
    ns: Arc<File>,
    /// The namespace's identity (device, inode of its file).
    id: (u64, u64),
    job: Job,
}

/// A network namespace whose sockets the agent makes: a pod's. Closures given to
/// [`Netns::run`] run inside it, one at a time, on the agent's one namespace worker thread,
/// which joins each job's namespace with `setns(2)` (about 3 µs) and goes back to the agent's
/// own when it has nothing to do. A thread per pod cost about 12 KiB of resident memory each
/// (its stack and thread-local pages): 12 MiB for 1,000 pods.
pub struct Netns {
    ns: Arc<File>,
    id: (u64, u64),
    /// The namespace's cookie.
    cookie: u64,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns")
            .field("cookie", &self.cookie)
            .finish_non_exhaustive()
    }
}

impl Netns {
    /// Opens the network namespace at `path` (`/proc/PID/ns/net`, a CNI's netns file,
    /// `/run/netns/NAME`).
    ///
    /// # Errors
    /// The file cannot be opened, is not a network namespace, or the worker cannot join it
    /// (the agent lacks `CAP_SYS_ADMIN`), or the kernel cannot tell the namespace's cookie.
    pub fn open(path: &Path) -> io::Result<Self> {
        let ns = File::open(path)?;
        let meta = ns.metadata()?;
        let mut netns = Self {
            ns: Arc::new(ns),
            id: (meta.dev(), meta.ino()),
            cookie: 0,
        };
        netns.cookie = netns.run(current)??;
        Ok(netns)
    }

    /// The namespace's cookie.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` inside the namespace, on the namespace worker, and waits for its result.
    ///
    /// # Errors
    /// The namespace cannot be joined, or the worker is gone.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let (tx, rx) = mpsc::channel();
        self.submit(Box::new(move |joined| {
            let _ = tx.send(joined.map(|()| f()));
        }))?;
        rx.recv().map_err(|_| gone())?
    }

    /// As [`Netns::run`], without blocking the async caller.
    ///
    /// # Errors
    /// As [`Netns::run`].
    pub async fn run_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |joined| {
            let _ = tx.send(joined.map(|()| f()));
        }))?;
        rx.await.map_err(|_| gone())?
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        worker()?
            .send(Task {
                ns: Arc::clone(&self.ns),
                id: self.id,
                job,
            })
            .map_err(|_| gone())
    }
}

/// The namespace worker's queue, started on first use.
fn worker() -> io::Result<mpsc::Sender<Task>> {
    static WORKER: Mutex<Option<mpsc::Sender<Task>>> = Mutex::new(None);
    let mut worker = WORKER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(queue) = worker.as_ref() {
        return Ok(queue.clone());
    }
    // The agent's own namespace, to go back to between jobs: a pod's namespace is not kept
    // alive by the worker after the pod is gone.
    let home = File::open("/proc/self/ns/net")?;
    let (queue, tasks) = mpsc::channel::<Task>();
    thread::Builder::new()
        .name("egress-netns".to_owned())
        // Its jobs make sockets: a small stack is plenty.
        .stack_size(64 * 1024)
        .spawn(move || work(&home, &tasks))?;
    *worker = Some(queue.clone());
    Ok(queue)
}

/// Runs each task inside its namespace, joining it only when the worker is elsewhere; goes
/// back to `home` whenever the queue is empty.
fn work(home: &File, tasks: &mpsc::Receiver<Task>) {
    // Started by the main loop, perhaps, whose SCHED_BATCH would slow the proxy's jobs.
    let _ = crate::sched::as_before();
    // The namespace the worker is in, when not its own.
    let mut here: Option<(u64, u64)> = None;
    while let Ok(mut task) = tasks.recv() {
        loop {
            let joined = if here == Some(task.id) {
                Ok(())
            } else {
                // A failed join leaves the thread where it was: the job makes nothing.
                join(&task.ns).inspect(|()| here = Some(task.id))
            };
            (task.job)(joined);
            match tasks.try_recv() {
                Ok(next) => task = next,
                Err(_) => break,
            }
        }
        if here.is_some() {
            match join(home) {
                Ok(()) => here = None,
                Err(e) => {
                    tracing::warn!(error = %e, "netns: the worker cannot go back to the agent's network namespace; it joins each job's namespace first as before");
                }
            }
        }
    }
}

fn gone() -> io::Error {
    io::Error::other("the network namespace worker is gone")
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
        let ns = Netns::open(Path::new("/proc/self/ns/net")).expect("open");
        assert_eq!(ns.cookie(), own);
        let made = ns
            .run(|| std::net::TcpListener::bind(("127.0.0.1", 0)))
            .expect("run")
            .expect("bind in the namespace");
        assert_eq!(cookie(&made).expect("cookie"), own);
    }

    #[test]
    fn a_file_that_is_no_namespace_is_refused() {
        let err = Netns::open(Path::new("/proc/self/status")).expect_err("not a netns");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    /// A new, empty network namespace, held by the returned file (root: `unshare(2)` on a
    /// thread of its own, which ends).
    fn new_namespace() -> File {
        thread::spawn(|| {
            // SAFETY: unshare changes only this short-lived thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET) needs root (CAP_SYS_ADMIN): {}",
                io::Error::last_os_error()
            );
            File::open("/proc/thread-self/ns/net").expect("open the new namespace")
        })
        .join()
        .expect("the unsharing thread")
    }

    /// Jobs of two pods' namespaces, interleaved, from several threads at once: each socket
    /// is made in its own job's namespace, and the worker is back home once idle (a job of
    /// the agent's own namespace needs no join to come out there).
    #[test]
    fn one_worker_makes_each_jobs_sockets_in_its_own_namespace() {
        let files = [new_namespace(), new_namespace()];
        let pods: Vec<Arc<Netns>> = files
            .iter()
            .map(|f| {
                let path = format!("/proc/self/fd/{}", f.as_raw_fd());
                Arc::new(Netns::open(Path::new(&path)).expect("open"))
            })
            .collect();
        let home = Netns::open(Path::new("/proc/self/ns/net")).expect("open");
        assert_ne!(pods[0].cookie(), pods[1].cookie());
        assert!(pods.iter().all(|p| p.cookie() != home.cookie()));
        let made_in = |ns: &Netns| {
            let socket = ns
                .run(|| std::net::UdpSocket::bind(("127.0.0.1", 0)))
                .expect("run")
                .expect("a socket in the namespace (its loopback is down: 127.0.0.1 binds)");
            cookie(&socket).expect("cookie")
        };
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let pods = pods.clone();
                thread::spawn(move || {
                    for i in 0..200 {
                        let pod = &pods[(i + t) % 2];
                        assert_eq!(made_in(pod), pod.cookie());
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("no job ran in the wrong namespace");
        }
        assert_eq!(made_in(&home), home.cookie());
        // Idle, the worker is back in the agent's namespace: it keeps no pod's alive.
        let own = std::fs::read_link("/proc/self/ns/net").expect("own namespace");
        let worker_ns = || {
            std::fs::read_dir("/proc/self/task")
                .expect("tasks")
                .filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "egress-netns")
                })
                .map(|t| std::fs::read_link(t.path().join("ns/net")).expect("its namespace"))
                .collect::<Vec<_>>()
        };
        made_in(&pods[1]);
        let start = std::time::Instant::now();
        while worker_ns() != [own.clone()] {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "the worker stayed in {:?}, not {own:?}",
                worker_ns()
            );
            thread::sleep(std::time::Duration::from_millis(10));
        }
        // A pod's namespace whose file is gone with the pod still serves its jobs: the
        // handle keeps it open.
        drop(files);
        assert_eq!(made_in(&pods[0]), pods[0].cookie());
    }
}

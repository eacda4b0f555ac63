//! The server every contender connects to, and CPU pinning.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use egress_tests::spawn_in_netns;

/// A TCP server that accepts as fast as it can (a blocking accept with a 4096 backlog, on its
/// own CPU) and counts. The test crate's `Sink` polls every 2 ms with the default backlog of
/// 128, which a connect loop fills in about 3 ms; the kernel then drops SYNs and the client
/// waits a second for the retransmission.
pub struct FastSink {
    accepted: Arc<AtomicU64>,
    fd: i32,
    thread: Option<thread::JoinHandle<()>>,
}

impl FastSink {
    /// Starts accepting on `addr` inside `netns`, the accept thread pinned to `cpu`.
    pub fn start(netns: &str, addr: SocketAddr, cpu: Option<usize>) -> Self {
        let accepted = Arc::new(AtomicU64::new(0));
        let ns = netns.to_owned();
        let (fd, thread) = {
            let accepted = accepted.clone();
            spawn_in_netns(netns, "sink", move |tx| {
                if let Some(cpu) = cpu {
                    pin_to(cpu);
                }
                let listener = TcpListener::bind(addr)
                    .unwrap_or_else(|e| panic!("binding {addr} in {ns}: {e}"));
                // SAFETY: listen(2) again on a listening socket only changes its backlog.
                let ret = unsafe { libc::listen(listener.as_raw_fd(), 4096) };
                assert_eq!(ret, 0, "listen: {}", std::io::Error::last_os_error());
                tx.send(listener.as_raw_fd()).expect("send fd");
                // shutdown() from Drop makes accept fail: that is the stop signal.
                while listener.accept().is_ok() {
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        Self {
            accepted,
            fd,
            thread: Some(thread),
        }
    }

    /// Waits until `expected` connections were accepted (or 2 s), and returns the count.
    pub fn wait_for(&self, expected: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.accepted.load(Ordering::SeqCst) < expected && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(5));
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FastSink {
    fn drop(&mut self) {
        // SAFETY: the listener is still open (its thread is blocked in accept on it); shutdown
        // wakes that accept with EINVAL and the thread then drops the listener.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes one bit inside it; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let ret = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            ret,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

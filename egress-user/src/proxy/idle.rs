//! The idle limit of one exchange: the proxy gives up when no byte has moved either way (the
//! app's request body going up, the upstream's response coming down) for
//! [`Timeouts::idle`](super::Timeouts::idle), however long the whole exchange takes. A limit
//! on the total would cut a steady slow upload (4.4 MB at 75 KB/s got 504 at 60 s) that was
//! making progress all along.
//!
//! [`Activity`] is shared by the request body, the wait for the response head and the
//! response body; each byte that moves pushes the deadline on. It also records what the
//! request body was waiting for when the proxy gave up, so that a stall is blamed on the side
//! that stalled: the app (408) or the upstream (504); and the app's own body error, so that a
//! malformed chunked body is the app's 400, not the upstream's 502.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// What moved, and when, in one exchange.
pub(crate) struct Activity {
    origin: Instant,
    /// Nanoseconds after `origin` of the last byte either way (or of the grace below).
    last: AtomicU64,
    /// The request body is waiting for the app's next bytes (its last poll was pending).
    app_pending: AtomicBool,
    /// Why the app's request body failed (malformed chunked framing, cut short), if it did.
    app_error: Mutex<Option<hyper::Error>>,
}

impl Activity {
    /// A new exchange. The idle clock starts `grace` from now: the upstream connection has
    /// its own limit ([`Timeouts::connect`](super::Timeouts::connect)), and a slow connect
    /// must be reported as one, not as an idle exchange.
    pub(crate) fn new(grace: Duration) -> Self {
        Self {
            origin: Instant::now(),
            last: AtomicU64::new(nanos(grace)),
            app_pending: AtomicBool::new(false),
            app_error: Mutex::new(None),
        }
    }

    /// Bytes moved now.
    pub(crate) fn touch(&self) {
        self.last.fetch_max(nanos(self.origin.elapsed()), Relaxed);
    }

    /// When the exchange is idle for `idle` unless something moves first.
    pub(crate) fn deadline(&self, idle: Duration) -> Instant {
        self.origin + Duration::from_nanos(self.last.load(Relaxed)) + idle
    }

    /// Records whether the request body waits for the app.
    pub(crate) fn set_app_pending(&self, pending: bool) {
        self.app_pending.store(pending, Relaxed);
    }

    /// Which side the exchange was waiting for.
    pub(crate) fn stalled(&self) -> Stalled {
        if self.app_pending.load(Relaxed) {
            Stalled::App
        } else {
            Stalled::Upstream
        }
    }

    /// Keeps the app's body error for [`Activity::take_app_error`].
    pub(crate) fn app_failed(&self, e: hyper::Error) {
        *self.app_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }

    /// The app's body error, if its body failed.
    pub(crate) fn take_app_error(&self) -> Option<hyper::Error> {
        self.app_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The side the exchange waited for when it went idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stalled {
    /// The request body waited for the app's next bytes.
    App,
    /// The proxy waited for the upstream: to read the request, or to answer.
    Upstream,
}

/// A timer that fires once an [`Activity`] has been idle for `idle`.
pub(crate) struct IdleTimer {
    activity: std::sync::Arc<Activity>,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    pub(crate) fn new(activity: std::sync::Arc<Activity>, idle: Duration) -> Self {
        let sleep = Box::pin(tokio::time::sleep_until(activity.deadline(idle)));
        Self {
            activity,
            idle,
            sleep,
        }
    }

    /// Bytes moved now.
    pub(crate) fn touch(&self) {
        self.activity.touch();
    }

    /// The limit.
    pub(crate) fn idle(&self) -> Duration {
        self.idle
    }

    /// True once the exchange has been idle for the limit; otherwise registers `cx` for when
    /// it could be.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let deadline = self.activity.deadline(self.idle);
            if deadline <= Instant::now() {
                return true;
            }
            if self.sleep.deadline() != deadline {
                self.sleep.as_mut().reset(deadline);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
    }
}

/// Runs `fut` to its end, unless `timer` expires first: then the side it waited for.
pub(crate) async fn until_idle<F: Future>(
    timer: &mut IdleTimer,
    fut: F,
) -> Result<F::Output, Stalled> {
    let mut fut = pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if timer.poll_expired(cx) {
            return Poll::Ready(Err(timer.activity.stalled()));
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const IDLE: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn activity_pushes_the_deadline_on() {
        let a = Arc::new(Activity::new(Duration::ZERO));
        let mut timer = IdleTimer::new(a.clone(), IDLE);
        let toucher = a.clone();
        // Bytes every 50 ms for 1.5 s: never idle for the limit, though it lasts five times it.
        let steady = async move {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                toucher.touch();
            }
        };
        let start = Instant::now();
        assert_eq!(until_idle(&mut timer, steady).await, Ok(()));
        assert!(start.elapsed() >= 5 * IDLE);
        // Then nothing moves: idle the limit after the last byte, blamed on the side waited for.
        a.set_app_pending(true);
        let last = Instant::now();
        let r = until_idle(&mut timer, std::future::pending::<()>()).await;
        assert_eq!(r, Err(Stalled::App));
        assert!(
            last.elapsed() >= IDLE - Duration::from_millis(60),
            "{:?}",
            last.elapsed()
        );
    }

    #[tokio::test]
    async fn the_clock_starts_after_the_grace() {
        let a = Arc::new(Activity::new(2 * IDLE));
        let mut timer = IdleTimer::new(a, IDLE);
        let start = Instant::now();
        let r = until_idle(&mut timer, std::future::pending::<()>()).await;
        assert_eq!(r, Err(Stalled::Upstream));
        assert!(start.elapsed() >= 3 * IDLE, "{:?}", start.elapsed());
    }
}

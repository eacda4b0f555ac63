//! The agent's end of the control socket: bind it root-only, check each client's uid, read its
//! request, and hand it to the agent (or, for `events`, serve it from the [`EventHub`]).

use std::{
    collections::VecDeque,
    io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, mpsc, oneshot},
};

use super::{MAX_REQUEST, Request, Response, WireEvent};
use crate::{events::EventRecord, proxy::RequestEvent};

/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the accept loop waits after a passing accept error (out of descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(20);
/// Recent events kept for `egress events`.
pub const RECENT_EVENTS: usize = 1024;
/// Events a following client may fall behind by before it misses some.
const FOLLOW_BUFFER: usize = 4096;

/// Binds the control socket at `path`, before the agent touches the kernel, so that a second
/// agent fails early. The directory is created mode 0700 if missing; the socket is mode 0600.
/// A socket file left by an agent that died is replaced; one that an agent still answers on
/// is an error.
///
/// # Errors
/// The directory or socket cannot be made, or another agent is serving on `path`.
pub fn bind(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let at = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(at)?;
    }
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{}: another egress agent is serving on this control socket",
                        path.display()
                    ),
                ));
            }
            // Nobody listening: a socket left by an agent that was killed.
            Err(_) => std::fs::remove_file(path).map_err(at)?,
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(at)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(at)?;
    listener.set_nonblocking(true).map_err(at)?;
    Ok(listener)
}

/// A request for the agent, with where its answer goes.
#[derive(Debug)]
pub struct Call {
    /// The request (never `Events`: the server answers those itself).
    pub request: Request,
    /// The answer.
    pub reply: oneshot::Sender<Response>,
}

/// An event as the agent got it, with when. It is turned into a [`WireEvent`] (strings, a
/// formatted time) only when a client asks: publishing costs the request path's consumer no
/// more than a move into the buffer.
#[derive(Debug)]
pub enum HubEvent {
    /// A kernel verdict.
    Connect(
        std::time::SystemTime,
        EventRecord,
        Option<std::sync::Arc<crate::cri::PodName>>,
    ),
    /// A proxied request.
    Http(std::time::SystemTime, RequestEvent),
    /// An event of an earlier run of the agent, read back from the history file
    /// ([`super::history`]).
    Restored(WireEvent),
    /// A change of the policy's sources that the agent refused (an EgressRule object of the
    /// Kubernetes API), as it is shown.
    Policy(WireEvent),
}

impl HubEvent {
    fn wire(&self) -> WireEvent {
        match self {
            Self::Restored(e) | Self::Policy(e) => e.clone(),
            Self::Connect(at, e, pod) => WireEvent {
                time: super::rfc3339(*at),
                source: e.hook.to_string(),
                verdict: e.verdict.to_string(),
                rule: e.rule.clone(),
                pid: Some(e.pid),
                comm: Some(e.comm.clone()),
                cgroup_id: Some(e.cgroup_id),
                pod: pod.as_ref().map(|p| p.to_string()),
                destination: if e.hook == crate::events::Hook::SockCreate {
                    String::new()
                } else {
                    e.destination.to_string()
                },
                protocol: crate::events::protocol_name(e.protocol),
                socket: if e.raw {
                    "raw".to_owned()
                } else {
                    String::new()
                },
                via: e.via.to_string(),
                iface: e.ifindex.map(iface_name).unwrap_or_default(),
                generation: e.generation,
                reason: e.reason.to_string(),
                ..WireEvent::default()
            },
            Self::Http(at, e) => WireEvent {
                time: super::rfc3339(*at),
                source: "http".to_owned(),
                verdict: http_verdict(e).to_owned(),
                rule: e
                    .rule
                    .clone()
                    .unwrap_or_else(|| crate::compile::NO_RULE_NAME.to_owned()),
                destination: e.orig_dst.map(|a| a.to_string()).unwrap_or_default(),
                host: e.host.clone(),
                status: e.status,
                reason: e.reason.clone().unwrap_or_default(),
                generation: e.generation,
                pid: e.process.as_ref().map(|p| p.pid),
                comm: e.process.as_ref().map(|p| p.comm.clone()),
                pod: e.process.as_ref().and_then(|p| p.pod.clone()),
                ..WireEvent::default()
            },
        }
    }
}

/// A proxied request's verdict as `egress events` and the per-pod metrics name it.
pub fn http_verdict(e: &RequestEvent) -> &'static str {
    match e.status {
        _ if e.would_deny => "would-deny",
        403 => "deny",
        0 => "refused",
        s if s >= 400 => "error",
        _ => "allow",
    }
}

/// The name of an interface by index (as the agent's namespace sees it now), or `ifindex N`.
fn iface_name(index: u32) -> String {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return format!("ifindex {index}");
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// An event with its sequence number.
type Numbered = (u64, Arc<HubEvent>);

/// Events for `egress events`: the recent ones, and a channel of new ones.
#[derive(Debug)]
pub struct EventHub {
    recent: Mutex<VecDeque<Numbered>>,
    new: broadcast::Sender<Numbered>,
    next: std::sync::atomic::AtomicU64,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            recent: Mutex::new(VecDeque::with_capacity(RECENT_EVENTS)),
            new: broadcast::channel(FOLLOW_BUFFER).0,
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }
}

impl EventHub {
    /// Publishes one event.
    pub fn publish(&self, event: HubEvent) {
        let seq = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let event = Arc::new(event);
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT_EVENTS {
                recent.pop_front();
            }
            recent.push_back((seq, event.clone()));
        }
        // No follower: nothing to do.
        let _ = self.new.send((seq, event));
    }

    /// Puts the events of an earlier run (oldest first) before any new one.
    pub fn restore(&self, events: Vec<WireEvent>) {
        for event in events {
            self.publish(HubEvent::Restored(event));
        }
    }

    /// The recent events as `egress events` shows them, if any came since `seen` (the newest
    /// sequence number of the last call, 0 at first), which is moved on. For the history file:
    /// the lock is held only to clone the list.
    pub fn recent_since(&self, seen: &mut u64) -> Option<Vec<WireEvent>> {
        let events: Vec<Arc<HubEvent>> = {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let newest = recent.back().map_or(0, |(seq, _)| *seq);
            if newest == *seen {
                return None;
            }
            *seen = newest;
            recent.iter().map(|(_, e)| e.clone()).collect()
        };
        Some(events.iter().map(|e| e.wire()).collect())
    }

    /// The last `n` events, and a receiver of every later one.
    fn subscribe(&self, n: usize) -> (Vec<Numbered>, broadcast::Receiver<Numbered>) {
        // Subscribe under the lock: an event is either in the snapshot or in the receiver.
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.new.subscribe();
        let skip = recent.len().saturating_sub(n);
        (recent.iter().skip(skip).cloned().collect(), rx)
    }
}

/// Serves clients on `listener` until it fails: each on its own task, so one slow client holds
/// up nobody. An accept error that concerns one connection or a passing shortage (`EMFILE`
/// when the agent is out of descriptors) is logged and waited out, never the end of the
/// socket: the control socket is how an operator revokes access in the middle of an attack.
/// At most [`CONTROL_CONNECTIONS`](crate::fds::CONTROL_CONNECTIONS) clients are served at
/// once; the next waits in the socket's backlog, holding no descriptor of the agent's.
///
/// # Errors
/// The listener failed for good.
pub async fn serve(
    listener: UnixListener,
    calls: mpsc::Sender<Call>,
    events: Arc<EventHub>,
) -> io::Result<()> {
    accept_loop(listener, calls, events).await
}

/// Where [`serve`] gets its clients (a test's source fails on demand).
trait Accept: Send {
    fn next(&mut self) -> impl Future<Output = io::Result<UnixStream>> + Send;
}

impl Accept for UnixListener {
    async fn next(&mut self) -> io::Result<UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// [`serve`]'s loop, over any source of connections.
async fn accept_loop(
    mut clients: impl Accept,
    calls: mpsc::Sender<Call>,
    events: Arc<EventHub>,
) -> io::Result<()> {
    let places = Arc::new(tokio::sync::Semaphore::new(crate::fds::CONTROL_CONNECTIONS));
    loop {
        let Ok(place) = places.clone().acquire_owned().await else {
            return Ok(()); // never closed
        };
        let stream = match clients.next().await {
            Ok(stream) => stream,
            Err(e) if crate::proxy::accept_error_is_per_connection(&e) => {
                tracing::warn!(error = %e, "control socket: accept failed; going on");
                // Out of descriptors: give connections a moment to close.
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let (calls, events) = (calls.clone(), events.clone());
        tokio::spawn(async move {
            if let Err(e) = client(stream, calls, events).await {
                tracing::debug!(error = %e, "control client failed");
            }
            drop(place);
        });
    }
}

async fn client(
    stream: UnixStream,
    calls: mpsc::Sender<Call>,
    events: Arc<EventHub>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let uid = read.as_ref().peer_cred()?.uid();
    if uid != 0 {
        tracing::warn!(uid, "control socket: refused a client that is not root");
        let message = format!(
            "permission denied: the egress control socket is for root only (your uid is {uid})"
        );
        return send(&mut write, &Response::Error { message }).await;
    }
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(result) => {
            result?;
        }
        Err(_) => {
            let message = "no request within 10 s".to_owned();
            return send(&mut write, &Response::Error { message }).await;
        }
    }
    if line.len() > MAX_REQUEST {
        let message = format!("request larger than {} MiB", MAX_REQUEST >> 20);
        return send(&mut write, &Response::Error { message }).await;
    }
    let request: Request = match serde_json::from_slice(&line) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("malformed request: {e}");
            return send(&mut write, &Response::Error { message }).await;
        }
    };
    if let Request::Events { follow, recent } = request {
        return stream_events(&mut write, &events, follow, recent).await;
    }
    let (reply, answer) = oneshot::channel();
    let response = match calls.send(Call { request, reply }).await {
        Ok(()) => answer.await.unwrap_or_else(|_| Response::Error {
            message: "the agent is stopping".to_owned(),
        }),
        Err(_) => Response::Error {
            message: "the agent is stopping".to_owned(),
        },
    };
    send(&mut write, &response).await
}

async fn stream_events(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    hub: &EventHub,
    follow: bool,
    recent: usize,
) -> io::Result<()> {
    let (recent, mut rx) = hub.subscribe(recent);
    let mut last = 0;
    for (seq, event) in recent {
        last = seq;
        send(write, &Response::Event(Box::new(event.wire()))).await?;
    }
    send(write, &Response::EndOfRecent).await?;
    if !follow {
        return Ok(());
    }
    loop {
        match rx.recv().await {
            Ok((seq, _)) if seq <= last => {}
            Ok((seq, event)) => {
                last = seq;
                send(write, &Response::Event(Box::new(event.wire()))).await?;
            }
            Err(broadcast::error::RecvError::Lagged(skipped)) => {
                let message = format!("{skipped} events skipped: the client read too slowly");
                send(write, &Response::Error { message }).await?;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accept results in order, then nothing more.
    struct Script(VecDeque<io::Result<UnixStream>>);

    impl Accept for Script {
        async fn next(&mut self) -> io::Result<UnixStream> {
            match self.0.pop_front() {
                Some(result) => result,
                None => std::future::pending().await,
            }
        }
    }

    /// The agent ran out of descriptors: accept() failed with EMFILE (twice), then a client
    /// came. Before, the first error ended the loop and the socket stayed dead until a restart.
    #[tokio::test]
    async fn an_accept_error_does_not_end_the_control_socket() {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let results = Script(VecDeque::from([
            Err(io::Error::from_raw_os_error(libc::EMFILE)),
            Err(io::Error::from_raw_os_error(libc::ENFILE)),
            Ok(theirs),
        ]));
        let (calls, mut agent) = mpsc::channel(1);
        let server = tokio::spawn(accept_loop(results, calls, Arc::default()));
        let (read, mut write) = ours.into_split();
        write
            .write_all(b"{\"op\":\"status\"}\n")
            .await
            .expect("send");
        let call = tokio::time::timeout(Duration::from_secs(5), agent.recv())
            .await
            .expect("the request reached the agent")
            .expect("a call");
        assert_eq!(call.request, Request::Status);
        let message = "answered".to_owned();
        call.reply.send(Response::Error { message }).expect("reply");
        let mut line = String::new();
        BufReader::new(read)
            .read_line(&mut line)
            .await
            .expect("answer");
        assert_eq!(line, "{\"type\":\"error\",\"message\":\"answered\"}\n");
        assert!(!server.is_finished(), "the accept loop ended");
        server.abort();
    }
}

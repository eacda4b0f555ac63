//! Refusing ambiguous request framing that hyper tolerates.
//!
//! hyper accepts `Content-Length` together with `Transfer-Encoding` (it drops the length and
//! closes after the response) and a repeated identical `Content-Length` (it keeps one), and
//! hands the service a request that no longer shows either. Two parsers that disagree about
//! where a body ends are how requests get smuggled past a proxy, so the proxy refuses both
//! with 400. [`FramingGuard`] sits under hyper on the app's connection, follows the byte
//! stream request by request (head, then the body by its length or its chunks), and queues a
//! verdict per request head; the service takes one verdict per request, in order. Bytes pass
//! through unchanged, and nothing is copied but request heads.
//!
//! After a head the guard cannot follow (an upgrade or CONNECT, which may turn the stream
//! into a tunnel; a head too large or unparsable, which hyper refuses anyway), it stops and
//! queues nothing more; the service closes the connection after such a request.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most head bytes the guard buffers; hyper's own limit is lower.
const MAX_HEAD: usize = 512 * 1024;
/// The most headers the guard parses; hyper refuses more than 100.
const MAX_HEADERS: usize = 128;

/// What the guard concluded about one request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Unambiguous.
    Clear,
    /// Refuse with 400, for this reason.
    Ambiguous(&'static str),
    /// The guard stopped following the stream after this head; the connection must close
    /// after its response.
    Untracked,
}

/// The verdicts, oldest first, shared between the guard and the connection's service.
pub(crate) type Verdicts = Arc<Mutex<VecDeque<Framing>>>;

#[derive(Debug)]
enum State {
    /// Between requests or inside a head: `head` holds the head's bytes so far.
    Head,
    /// In a body of known length: bytes left.
    Fixed(u64),
    /// In a chunked body.
    Chunk(Chunk),
    /// Not following any more.
    Off,
}

#[derive(Debug)]
enum Chunk {
    /// Reading the hex size: value so far, digits so far.
    Size(u64, u8),
    /// Skipping a chunk extension up to the end of the line.
    Ext(u64),
    /// Reading the LF after the size line's CR.
    SizeLf(u64),
    /// Inside chunk data: bytes left.
    Data(u64),
    /// Expecting the CR (false) or LF (true) after the data.
    DataEnd(bool),
    /// In the trailer section: bytes on the current line.
    Trailer(usize),
}

/// A transparent reader under hyper that queues a [`Framing`] per request head.
pub(crate) struct FramingGuard<S> {
    inner: S,
    state: State,
    head: Vec<u8>,
    verdicts: Verdicts,
}

impl<S> FramingGuard<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            state: State::Head,
            head: Vec::new(),
            verdicts: Verdicts::default(),
        }
    }

    /// The queue the service reads.
    pub(crate) fn verdicts(&self) -> Verdicts {
        self.verdicts.clone()
    }

    fn push(&self, f: Framing) {
        self.verdicts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(f);
    }

    /// Follows `data`, the next bytes the app sent.
    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head => {
                    if self.head.is_empty() {
                        // Empty lines before a request line are allowed (RFC 9112 2.2).
                        let skip = data
                            .iter()
                            .take_while(|&&b| b == b'\r' || b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let old = self.head.len();
                    self.head.extend_from_slice(data);
                    // Search from a little before the old end: the terminator may straddle reads.
                    let from = old.saturating_sub(3);
                    let Some(end) = find_head_end(&self.head[from..]).map(|e| from + e) else {
                        if self.head.len() > MAX_HEAD {
                            self.stop();
                        }
                        return;
                    };
                    data = &data[end - old..];
                    let (framing, next) = judge(&self.head[..end]);
                    self.head.clear();
                    self.push(framing);
                    self.state = next;
                }
                State::Fixed(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::Chunk(chunk) => {
                    if let Chunk::Data(left) = chunk {
                        let n = (*left).min(data.len() as u64);
                        *left -= n;
                        data = &data[n as usize..];
                        if *left == 0 {
                            *chunk = Chunk::DataEnd(false);
                        }
                        continue;
                    }
                    let b = data[0];
                    data = &data[1..];
                    match step(chunk, b) {
                        Some(true) => self.state = State::Head,
                        Some(false) => {}
                        None => self.state = State::Off,
                    }
                }
            }
        }
    }

    fn stop(&mut self) {
        self.state = State::Off;
        self.head = Vec::new();
        self.push(Framing::Untracked);
    }
}

/// One byte of chunked framing. `Some(true)`: the body ended; `None`: malformed (hyper
/// refuses it too).
fn step(chunk: &mut Chunk, b: u8) -> Option<bool> {
    match chunk {
        Chunk::Size(v, digits) => match (b as char).to_digit(16) {
            Some(d) if *digits < 16 => {
                *v = (*v << 4) | u64::from(d);
                *digits += 1;
            }
            Some(_) => return None,
            None if *digits == 0 => return None,
            None => match b {
                b';' | b' ' | b'\t' => *chunk = Chunk::Ext(*v),
                b'\r' => *chunk = Chunk::SizeLf(*v),
                b'\n' => *chunk = after_size(*v),
                _ => return None,
            },
        },
        Chunk::Ext(v) => match b {
            b'\r' => *chunk = Chunk::SizeLf(*v),
            b'\n' => *chunk = after_size(*v),
            _ => {}
        },
        Chunk::SizeLf(v) => match b {
            b'\n' => *chunk = after_size(*v),
            _ => return None,
        },
        Chunk::Data(_) => unreachable!("data is skipped in bulk"),
        Chunk::DataEnd(false) if b == b'\r' => *chunk = Chunk::DataEnd(true),
        Chunk::DataEnd(_) if b == b'\n' => *chunk = Chunk::Size(0, 0),
        Chunk::DataEnd(_) => return None,
        Chunk::Trailer(n) => match b {
            b'\n' if *n == 0 => return Some(true),
            b'\n' => *n = 0,
            b'\r' => {}
            _ => *n += 1,
        },
    }
    Some(false)
}

fn after_size(v: u64) -> Chunk {
    if v == 0 {
        Chunk::Trailer(0)
    } else {
        Chunk::Data(v)
    }
}

/// The offset just past the blank line that ends a head (`\r\n\r\n` or `\n\n`).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let at = i + p;
        let rest = &buf[at + 1..];
        if rest.first() == Some(&b'\n') {
            return Some(at + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(at + 3);
        }
        i = at + 1;
    }
    None
}

/// The verdict on one complete head and the state its body puts the guard in.
fn judge(head: &[u8]) -> (Framing, State) {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return (Framing::Untracked, State::Off);
    }
    let mut lengths = 0;
    let mut length = None;
    let mut chunked = false;
    let mut te = false;
    let mut upgrade = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            // `Content-Length: 5, 5` is a repeat too.
            lengths += h.value.split(|&b| b == b',').count();
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    let framing = if te && lengths > 0 {
        Framing::Ambiguous("content-length with transfer-encoding")
    } else if lengths > 1 {
        Framing::Ambiguous("more than one content-length")
    } else if upgrade {
        Framing::Untracked
    } else {
        Framing::Clear
    };
    let next = match framing {
        Framing::Clear if te && chunked => State::Chunk(Chunk::Size(0, 0)),
        Framing::Clear if te => State::Off, // hyper refuses a non-chunked final coding
        Framing::Clear if lengths == 0 => State::Head,
        Framing::Clear => match length {
            Some(0) => State::Head,
            Some(n) => State::Fixed(n),
            None => State::Off, // an invalid length: hyper refuses it
        },
        // The response closes the connection: nothing after this head matters.
        Framing::Ambiguous(_) | Framing::Untracked => State::Off,
    };
    (framing, next)
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && !matches!(this.state, State::Off)
        {
            this.observe(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingGuard<S> {
    forward_writes_to!(inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes and returns the verdicts.
    fn run(input: &[u8], step: usize) -> Vec<Framing> {
        let mut g = FramingGuard::new(());
        for piece in input.chunks(step) {
            g.observe(piece);
        }
        g.verdicts.lock().unwrap().iter().copied().collect()
    }

    fn all_splits(input: &[u8], want: &[Framing]) {
        for step in [1, 2, 3, 7, 64, input.len()] {
            assert_eq!(
                run(input, step),
                want,
                "step {step}: {}",
                String::from_utf8_lossy(input)
            );
        }
    }

    use Framing::*;

    #[test]
    fn follows_keep_alive_requests_and_bodies() {
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nGET / HTTP/\
            \r\nPOST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nGET /\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n\
            GET /last HTTP/1.1\nHost: a\n\n";
        all_splits(input, &[Clear, Clear, Clear, Clear]);
    }

    #[test]
    fn refuses_length_with_chunked_and_repeated_lengths() {
        let te_cl = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        all_splits(te_cl, &[Ambiguous("content-length with transfer-encoding")]);
        let cl_te = b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n";
        all_splits(cl_te, &[Ambiguous("content-length with transfer-encoding")]);
        let dup =
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd";
        all_splits(dup, &[Ambiguous("more than one content-length")]);
        let list = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\nabcd";
        all_splits(list, &[Ambiguous("more than one content-length")]);
        // The guard stops after a refused head: what follows is never judged.
        let then = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nxGET / HTTP/1.1\r\n\r\n";
        all_splits(then, &[Ambiguous("more than one content-length")]);
    }

    #[test]
    fn a_body_that_looks_like_a_request_is_not_judged() {
        let body = b"POST / HTTP/1.1\r\nContent-Length: 56\r\n\r\n\
            GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(
            body.len() - body.windows(4).position(|w| w == b"\r\n\r\n").unwrap() - 4,
            56
        );
        all_splits(body, &[Clear]);
    }

    #[test]
    fn stops_after_upgrades_and_garbage() {
        let ws =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
            GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        all_splits(ws, &[Untracked]);
        all_splits(b"CONNECT a:443 HTTP/1.1\r\n\r\nbytes", &[Untracked]);
        all_splits(
            b"\x00\x01garbage\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            &[Untracked],
        );
        all_splits(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            &[Clear],
        );
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(run(&big, 4096), vec![Untracked]);
    }
}

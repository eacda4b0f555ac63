//! The CLI's end of the control socket.

#![forbid(unsafe_code)]

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use super::{MAX_REQUEST, Request, Response};

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket, or nobody listening on it.
    ///
    /// The message names the cause itself, before the hint (`egress: error: no egress agent is
    /// listening on P (No such file or directory); is ...`), so `error` is not a `source`: with
    /// it in the chain too, `{:#}` printed the cause twice.
    #[error(
        "no egress agent is listening on {path} ({error}); is `egress run` running, and is \
         --socket the same as its?"
    )]
    NoAgent {
        /// The socket.
        path: PathBuf,
        /// What connect() said.
        error: io::Error,
    },
    /// The socket is root-only.
    #[error("permission denied on {path}: the egress control socket is for root only")]
    NotRoot {
        /// The socket.
        path: PathBuf,
    },
    /// The conversation broke off.
    #[error("talking to the agent on {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The agent refused the connection before reading the request.
    #[error("{message}")]
    Refused {
        /// The agent's reason.
        message: String,
    },
    /// The request is larger than the agent reads ([`super::MAX_REQUEST`]): refused before
    /// sending, so the agent never sees a cut one.
    #[error(
        "the request is {size} bytes, over the {} the agent reads; nothing was sent",
        crate::policy::read::size_shown(*limit as u64)
    )]
    TooLarge {
        /// Its size, as one JSON line.
        size: usize,
        /// [`super::MAX_REQUEST`].
        limit: usize,
    },
    /// The agent closed the connection without answering.
    #[error("the agent on {path} closed the connection without answering")]
    NoAnswer {
        /// The socket.
        path: PathBuf,
    },
}

/// A connection to the agent with one request sent.
pub struct Conversation {
    path: PathBuf,
    lines: BufReader<UnixStream>,
}

impl Conversation {
    /// Connects to the agent on `path` and sends `request`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn start(path: &Path, request: &Request) -> Result<Self, ClientError> {
        let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Io {
            path: path.to_owned(),
            source: io::Error::other(e),
        })?;
        line.push(b'\n');
        if line.len() > MAX_REQUEST {
            return Err(ClientError::TooLarge {
                size: line.len(),
                limit: MAX_REQUEST,
            });
        }
        let mut stream = UnixStream::connect(path).map_err(|source| {
            if source.kind() == io::ErrorKind::PermissionDenied {
                ClientError::NotRoot {
                    path: path.to_owned(),
                }
            } else {
                ClientError::NoAgent {
                    path: path.to_owned(),
                    error: source,
                }
            }
        })?;
        let io_err = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        let written = stream.write_all(&line);
        let mut conversation = Self {
            path: path.to_owned(),
            lines: BufReader::new(stream),
        };
        if let Err(e) = written {
            // The agent may have answered and closed before reading (it refuses a client
            // that is not root at once): its answer says more than the broken pipe.
            return match conversation.answer() {
                Ok(Some(Response::Error { message })) => Err(ClientError::Refused { message }),
                _ => Err(io_err(e)),
            };
        }
        Ok(conversation)
    }

    /// The next answer; `None` when the agent has closed the connection.
    ///
    /// # Errors
    /// Reading failed or the agent sent something that is not a [`Response`].
    pub fn answer(&mut self) -> Result<Option<Response>, ClientError> {
        let mut line = String::new();
        let n = self
            .lines
            .read_line(&mut line)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| ClientError::Io {
                path: self.path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })
    }
}

/// Sends `request` and returns the one answer.
///
/// # Errors
/// See [`ClientError`].
pub fn call(path: &Path, request: &Request) -> Result<Response, ClientError> {
    Conversation::start(path, request)?
        .answer()?
        .ok_or_else(|| ClientError::NoAnswer {
            path: path.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_over_the_limit_is_refused_before_anything_is_sent() {
        // No agent needed: the size is checked before connecting.
        let request = Request::Create {
            source: "big.yaml".to_owned(),
            text: "#".repeat(MAX_REQUEST),
            namespace: None,
        };
        let error = Conversation::start(Path::new("/nonexistent/egress.sock"), &request)
            .err()
            .expect("too large");
        let size = MAX_REQUEST + r#"{"op":"create","source":"big.yaml","text":""}"#.len() + 1;
        assert_eq!(
            error.to_string(),
            format!(
                "the request is {size} bytes, over the 16 MiB the agent reads; nothing was sent"
            )
        );
    }
}

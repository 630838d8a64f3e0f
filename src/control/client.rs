//! The command line's side of the control socket: blocking, one request at a
//! time, waiting as long as the command takes (a snapshot copies the whole
//! volume).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "{}: cannot reach a server's control socket: {source}; is `nbdcrypt serve --control {}` running, as this user?",
        path.display(), path.display()
    )]
    Connect { path: PathBuf, source: io::Error },

    #[error("the control connection failed: {0}")]
    Io(#[from] io::Error),

    #[error("the server closed the control connection without answering (did it stop?)")]
    Closed,

    #[error("the server's answer is not a control response: {0}")]
    Protocol(String),

    /// The server's own one-line message.
    #[error("{0}")]
    Refused(String),
}

pub struct Client {
    stream: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// Sends `request` and returns the result, or the server's error.
    pub fn call(&mut self, request: &Request) -> Result<Value, ControlError> {
        let mut line = serde_json::to_vec(request).expect("a request always serializes");
        line.push(b'\n');
        self.stream.get_mut().write_all(&line)?;
        let mut answer = String::new();
        if self.stream.read_line(&mut answer)? == 0 {
            return Err(ControlError::Closed);
        }
        let response: Response = serde_json::from_str(&answer)
            .map_err(|e| ControlError::Protocol(format!("{e}: {}", answer.trim_end())))?;
        match response {
            Response {
                ok: true,
                result: Some(result),
                ..
            } => Ok(result),
            Response {
                ok: false,
                error: Some(error),
                ..
            } => Err(ControlError::Refused(error)),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }
}

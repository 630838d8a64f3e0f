//! The control socket of a running server: admin commands that act on the
//! volumes it serves, which no other process can open meanwhile (the server
//! holds their locks).
//!
//! A Unix stream socket that `nbdcrypt serve --control PATH` opens beside
//! its data sockets, mode 0600, and that serves only clients running as the
//! server's own user (checked with `SO_PEERCRED` as well, so the moment
//! between bind and chmod opens no door).
//!
//! The protocol is JSON lines: the client sends one request object per line,
//! the server answers each with one response line, in order; a connection
//! may carry many requests.
//!
//! ```text
//! → {"command":"list-exports"}
//! ← {"ok":true,"result":{"exports":[{"name":"vol-ad8c6542","size":…,…}]}}
//! → {"command":"stats"}
//! ← {"ok":true,"result":{"pid":…,"uptime_seconds":…,"exports":[…],"snapshots":{…}}}
//! → {"command":"snapshot-create","volume":"vol-ad8c6542","snapshot_id":"snap-0a1b2c3d","out":"/abs/dir"}
//! ← {"ok":true,"result":{"path":"/abs/dir/snap-0a1b2c3d","pause_micros":…,…}}
//! ← {"ok":false,"error":"…one line that says what is wrong and what to do…"}
//! ```
//!
//! - `server`: the accept loop and the commands, run by `serve`.
//! - `client`: the blocking client the command line uses.

mod client;
mod server;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use client::{Client, ControlError};
pub use server::{Control, serve};

/// A request line longer than this is refused and the connection closed.
pub const MAX_LINE: usize = 64 << 10;

/// One command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The exports served: name (volume id), path, size, sector size, mode.
    ListExports,
    /// Uptime, per-export sizes, snapshot counters.
    Stats,
    /// A crash-consistent snapshot of a served volume into `out`, an
    /// absolute directory path as the server sees it.
    SnapshotCreate {
        volume: String,
        snapshot_id: String,
        out: PathBuf,
    },
}

/// One answer: `result` when `ok`, else `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_are_tagged_kebab_case_objects() {
        let req = Request::SnapshotCreate {
            volume: "vol-1".into(),
            snapshot_id: "snap-1".into(),
            out: "/d".into(),
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"command": "snapshot-create", "volume": "vol-1", "snapshot_id": "snap-1", "out": "/d"})
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"stats"}"#).unwrap(),
            Request::Stats
        );
        for bad in [
            r#"{"command":"format-disk"}"#,
            r#"{"command":"snapshot-create","volume":"v","snapshot_id":"s","out":"/","x":1}"#,
            r#"{"command":"snapshot-create","volume":"vol-1"}"#,
            r#""stats""#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_carry_a_result_or_an_error() {
        assert_eq!(
            serde_json::to_value(Response::ok(json!({"a": 1}))).unwrap(),
            json!({"ok": true, "result": {"a": 1}})
        );
        assert_eq!(
            serde_json::to_value(Response::error("no")).unwrap(),
            json!({"ok": false, "error": "no"})
        );
    }
}

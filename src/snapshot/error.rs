use std::path::PathBuf;

use crate::volume::luks2::HeaderError;
use crate::volume::{HookBusy, VolumeError};

/// Why a snapshot could not be taken, listed or restored. Whatever the
/// cause, nothing that looks like a complete snapshot or volume is left
/// behind and the source is untouched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error(
        "snapshot id {0:?} is not valid: expected snap- followed by letters and digits, at most 47 characters"
    )]
    BadId(String),

    #[error("{}: a snapshot with this id exists already; choose another --snapshot-id", .0.display())]
    Exists(PathBuf),

    #[error(
        "{}: exists: another nbdcrypt is writing it (a snapshot or a restore), or an earlier attempt was killed (then remove this file)",
        .0.display()
    )]
    InProgress(PathBuf),

    #[error("{}: cannot write there: {source}; give an existing directory you may write to", path.display())]
    OutDir {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "{}: no space left on the file system while copying; nothing was kept: free some space or write elsewhere",
        .0.display()
    )]
    NoSpace(PathBuf),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: {source}", path.display())]
    Header { path: PathBuf, source: HeaderError },

    #[error(transparent)]
    Volume(#[from] VolumeError),

    #[error(
        "{}: not a snapshot (no {} token): give a file made by `nbdcrypt snapshot create`",
        .0.display(), super::SNAPSHOT_TOKEN_TYPE
    )]
    NotASnapshot(PathBuf),

    #[error(
        "{}: the snapshot's token is bound to {context}, not to its id {id}: the header was edited; take the snapshot again",
        path.display()
    )]
    Mislabelled {
        path: PathBuf,
        id: String,
        context: String,
    },

    #[error("no volume {0:?} is served here: `nbdcrypt admin list-exports` shows the volume ids")]
    NoSuchVolume(String),

    #[error("{0}")]
    Busy(#[from] HookBusy),

    #[error("the server is shutting down: the snapshot was abandoned and nothing was kept")]
    Cancelled,
}

impl SnapshotError {
    /// An I/O error on `path`, with running out of space told apart: that
    /// one the user can act on.
    pub(super) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(nix::libc::ENOSPC)
            || source.raw_os_error() == Some(nix::libc::EDQUOT)
        {
            Self::NoSpace(path)
        } else {
            Self::Io { path, source }
        }
    }
}

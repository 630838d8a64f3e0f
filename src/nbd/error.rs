//! Why a request failed, and the one place where any failure becomes one of
//! the error values the protocol allows on the wire.

use std::io;

use nix::errno::Errno;

use super::proto::wire::{Command, CommandFlags, WireError};

/// A request the server refuses or could not carry out. The message goes to
/// the client in structured error replies and to the log; it never carries
/// data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// proto.md: "The server SHOULD return NBD_EINVAL if it receives an
    /// unknown command."
    #[error("command {0:?} is not known to this server")]
    UnknownCommand(Command),
    /// A flag not documented for the command, or not negotiated.
    #[error("{command:?} does not accept flags {flags:?} on this connection")]
    FlagsNotAllowed {
        command: Command,
        flags: CommandFlags,
    },
    /// A command whose transmission flag the server did not set.
    #[error("{0:?} was not advertised for this export")]
    NotAdvertised(Command),
    #[error("{0:?} refused: the export is read-only")]
    ReadOnly(Command),
    /// A payload larger than the advertised maximum; refused before any
    /// buffer for it exists.
    #[error("{command:?} of {length} bytes exceeds the maximum payload of {max} bytes")]
    PayloadTooLarge {
        command: Command,
        length: u32,
        max: u32,
    },
    /// A structured read larger than the advertised maximum: proto.md lets
    /// the server "reject large read requests up front with NBD_EOVERFLOW".
    #[error(
        "read of {length} bytes exceeds the maximum payload of {max} bytes; read less at a time"
    )]
    ReplyTooLarge { length: u32, max: u32 },
    /// A range that does not lie within the export.
    #[error(
        "{command:?} of {length} bytes at offset {offset} goes past the end of the {size} byte export"
    )]
    OutOfRange {
        command: Command,
        offset: u64,
        length: u32,
        size: u64,
    },
    /// `NBD_CMD_FLUSH` and `NBD_CMD_DISC` have reserved offset and length.
    #[error("{0:?} requires an offset and a length of zero")]
    ReservedFieldsSet(Command),
    #[error(
        "block status needs a metadata context selected for this export with NBD_OPT_SET_META_CONTEXT"
    )]
    NoMetaContext,
    #[error("block status of zero bytes")]
    EmptyBlockStatus,
    /// proto.md: with `NBD_CMD_FLAG_FAST_ZERO` the server "MUST fail
    /// quickly with NBD_ENOTSUP unless the request can be serviced in less
    /// time than a corresponding NBD_CMD_WRITE".
    #[error(
        "fast zeroing is not possible: the export does not punch holes (no --allow-discards, \
         or a device that cannot zero by itself), or NO_HOLE was set"
    )]
    FastZeroUnsupported,
    /// The backend failed.
    #[error("backend failed: {0}")]
    Io(#[from] io::Error),
}

impl NbdError {
    /// The error value the client sees. Only the values proto.md lists
    /// ("Error values") can come out of here.
    pub fn wire_code(&self) -> WireError {
        match self {
            NbdError::UnknownCommand(_)
            | NbdError::FlagsNotAllowed { .. }
            | NbdError::NotAdvertised(_)
            | NbdError::PayloadTooLarge { .. }
            | NbdError::ReservedFieldsSet(_)
            | NbdError::NoMetaContext
            | NbdError::EmptyBlockStatus => WireError::EINVAL,
            NbdError::ReadOnly(_) => WireError::EPERM,
            NbdError::ReplyTooLarge { .. } => WireError::EOVERFLOW,
            // "The server SHOULD return NBD_ENOSPC if it receives a write
            // request including one or more sectors beyond the size of the
            // device" (and likewise for write zeroes); reads, trims and the
            // rest get NBD_EINVAL.
            NbdError::OutOfRange { command, .. } => match *command {
                Command::WRITE | Command::WRITE_ZEROES => WireError::ENOSPC,
                _ => WireError::EINVAL,
            },
            NbdError::FastZeroUnsupported => WireError::ENOTSUP,
            NbdError::Io(e) => io_wire_code(e),
        }
    }
}

/// A backend's error as the client sees it: the errno when it has a
/// protocol counterpart (proto.md: "SHOULD map the EDQUOT and EFBIG errors
/// to NBD_ENOSPC"), else the error kind, else EIO.
fn io_wire_code(e: &io::Error) -> WireError {
    if let Some(code) = e.raw_os_error() {
        match Errno::from_raw(code) {
            Errno::EPERM | Errno::EACCES | Errno::EROFS => return WireError::EPERM,
            Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG => return WireError::ENOSPC,
            Errno::ENOMEM => return WireError::ENOMEM,
            Errno::EINVAL => return WireError::EINVAL,
            Errno::EOVERFLOW => return WireError::EOVERFLOW,
            Errno::ESHUTDOWN => return WireError::ESHUTDOWN,
            _ => {}
        }
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => WireError::EPERM,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            WireError::ENOSPC
        }
        io::ErrorKind::OutOfMemory => WireError::ENOMEM,
        io::ErrorKind::InvalidInput => WireError::EINVAL,
        _ => WireError::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_errors_depend_on_the_command() {
        let past = |command| NbdError::OutOfRange {
            command,
            offset: 10,
            length: 10,
            size: 15,
        };
        assert_eq!(past(Command::WRITE).wire_code(), WireError::ENOSPC);
        assert_eq!(past(Command::WRITE_ZEROES).wire_code(), WireError::ENOSPC);
        for command in [
            Command::READ,
            Command::TRIM,
            Command::CACHE,
            Command::BLOCK_STATUS,
        ] {
            assert_eq!(past(command).wire_code(), WireError::EINVAL);
        }
    }

    #[test]
    fn io_errors_map_to_protocol_values_only() {
        let code = |e: io::Error| NbdError::Io(e).wire_code();
        assert_eq!(code(io::Error::from_raw_os_error(28)), WireError::ENOSPC);
        assert_eq!(code(Errno::EDQUOT.into()), WireError::ENOSPC);
        assert_eq!(code(Errno::EFBIG.into()), WireError::ENOSPC);
        assert_eq!(code(Errno::EROFS.into()), WireError::EPERM);
        assert_eq!(code(Errno::ENOMEM.into()), WireError::ENOMEM);
        assert_eq!(code(Errno::EIO.into()), WireError::EIO);
        // Not a protocol value: becomes EIO rather than leaking through.
        assert_eq!(code(Errno::ENXIO.into()), WireError::EIO);
        assert_eq!(code(Errno::EOPNOTSUPP.into()), WireError::EIO);
        assert_eq!(
            code(io::Error::new(io::ErrorKind::InvalidData, "bad header")),
            WireError::EIO
        );
        assert_eq!(code(io::ErrorKind::StorageFull.into()), WireError::ENOSPC);
    }

    #[test]
    fn validation_errors_map_as_the_protocol_recommends() {
        assert_eq!(
            NbdError::ReadOnly(Command::WRITE).wire_code(),
            WireError::EPERM
        );
        assert_eq!(
            NbdError::UnknownCommand(Command(99)).wire_code(),
            WireError::EINVAL
        );
        assert_eq!(
            NbdError::ReplyTooLarge { length: 1, max: 0 }.wire_code(),
            WireError::EOVERFLOW
        );
        assert_eq!(
            NbdError::FastZeroUnsupported.wire_code(),
            WireError::ENOTSUP
        );
    }
}

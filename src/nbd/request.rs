//! What a request means on the export it was sent to: validated against the
//! export before any I/O (firecracker's `Request::parse` discipline), then
//! carried out on the backend, one arm per command.

use super::handshake::Session;
use super::proto::transmission::{BlockDescriptor, RequestHeader};
use super::proto::wire::{AllocationFlags, Command, CommandFlags, TransmissionFlags};
use super::{Backend, Extent, NbdError};

/// A validated request: within the export, with flags the command accepts
/// on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
    Disconnect,
}

/// What a successful request gives back to the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// A read filled the buffer it was given.
    Data,
    /// The `base:allocation` extents of a block status request.
    Extents(Vec<BlockDescriptor>),
}

/// At most this many descriptors per block status reply (proto.md caps it
/// at 2^20; clients ask again from where a reply stops). Bounds the reply
/// to 128 KiB.
pub const MAX_DESCRIPTORS: usize = 1 << 14;

/// The largest descriptor length that is a multiple of 4096 and fits the
/// 32-bit field.
const MAX_DESCRIPTOR_LEN: u64 = (u32::MAX as u64) & !4095;

impl RequestHeader {
    /// Checks the request against the negotiated session, in the order
    /// proto.md gives its recommendations: unknown command (EINVAL), a write
    /// to a read-only export (EPERM), commands and flags not negotiated
    /// (EINVAL), payloads over the maximum, then the range (ENOSPC for
    /// writes past the end, EINVAL for the rest).
    pub fn validate(&self, session: &Session) -> Result<Op, NbdError> {
        let command = self.command;
        let flags = session.flags;
        let (advertised, mut allowed) = match command {
            Command::DISC => return Ok(Op::Disconnect),
            Command::READ => (
                true,
                flag_if(flags, TransmissionFlags::SEND_DF, CommandFlags::DF),
            ),
            Command::WRITE => (true, CommandFlags::EMPTY),
            Command::FLUSH => (
                flags.contains(TransmissionFlags::SEND_FLUSH),
                CommandFlags::EMPTY,
            ),
            Command::TRIM => (
                flags.contains(TransmissionFlags::SEND_TRIM),
                CommandFlags::EMPTY,
            ),
            Command::CACHE => (
                flags.contains(TransmissionFlags::SEND_CACHE),
                CommandFlags::EMPTY,
            ),
            Command::WRITE_ZEROES => (
                flags.contains(TransmissionFlags::SEND_WRITE_ZEROES),
                CommandFlags::NO_HOLE
                    | flag_if(
                        flags,
                        TransmissionFlags::SEND_FAST_ZERO,
                        CommandFlags::FAST_ZERO,
                    ),
            ),
            Command::BLOCK_STATUS => (session.meta_context.is_some(), CommandFlags::REQ_ONE),
            other => return Err(NbdError::UnknownCommand(other)),
        };
        let writes = matches!(
            command,
            Command::WRITE | Command::TRIM | Command::WRITE_ZEROES
        );
        if writes && session.export.read_only {
            return Err(NbdError::ReadOnly(command));
        }
        if !advertised {
            return Err(match command {
                Command::BLOCK_STATUS => NbdError::NoMetaContext,
                _ => NbdError::NotAdvertised(command),
            });
        }
        // "This flag is valid for all commands, provided NBD_FLAG_SEND_FUA
        // has been negotiated, in which case the server MUST accept all
        // commands with this bit set (even by ignoring the bit)."
        allowed |= flag_if(flags, TransmissionFlags::SEND_FUA, CommandFlags::FUA);
        let refused = self.flags.outside(allowed);
        if !refused.is_empty() {
            return Err(NbdError::FlagsNotAllowed {
                command,
                flags: refused,
            });
        }

        let (offset, length, fua) = (
            self.offset,
            self.length,
            self.flags.contains(CommandFlags::FUA),
        );
        let max = session.max_request_bytes;
        if length > max {
            match command {
                Command::WRITE => {
                    return Err(NbdError::PayloadTooLarge {
                        command,
                        length,
                        max,
                    });
                }
                Command::READ if session.structured => {
                    return Err(NbdError::ReplyTooLarge { length, max });
                }
                Command::READ => {
                    return Err(NbdError::PayloadTooLarge {
                        command,
                        length,
                        max,
                    });
                }
                // Commands without a payload may cover more than the
                // maximum payload (proto.md, "Size constraints").
                _ => {}
            }
        }
        if command == Command::FLUSH {
            if offset != 0 || length != 0 {
                return Err(NbdError::ReservedFieldsSet(command));
            }
            return Ok(Op::Flush);
        }
        let within = offset
            .checked_add(u64::from(length))
            .is_some_and(|end| end <= session.size);
        if !within {
            return Err(NbdError::OutOfRange {
                command,
                offset,
                length,
                size: session.size,
            });
        }
        Ok(match command {
            Command::READ => Op::Read { offset, length },
            Command::WRITE => Op::Write {
                offset,
                length,
                fua,
            },
            Command::TRIM => Op::Trim {
                offset,
                length,
                fua,
            },
            Command::CACHE => Op::Cache { offset, length },
            Command::WRITE_ZEROES => {
                let may_trim = !self.flags.contains(CommandFlags::NO_HOLE);
                // Zeroing is only quicker than writing when the backend may
                // punch holes and its storage zeroes by itself; otherwise
                // zeros are written through the host, like any write. Fail
                // fast, changing nothing.
                if self.flags.contains(CommandFlags::FAST_ZERO)
                    && !(may_trim && session.export.backend.can_fast_zero())
                {
                    return Err(NbdError::FastZeroUnsupported);
                }
                Op::WriteZeroes {
                    offset,
                    length,
                    fua,
                    may_trim,
                }
            }
            Command::BLOCK_STATUS => {
                if length == 0 {
                    return Err(NbdError::EmptyBlockStatus);
                }
                Op::BlockStatus {
                    offset,
                    length,
                    req_one: self.flags.contains(CommandFlags::REQ_ONE),
                }
            }
            _ => return Err(NbdError::UnknownCommand(command)),
        })
    }
}

fn flag_if(flags: TransmissionFlags, needs: TransmissionFlags, flag: CommandFlags) -> CommandFlags {
    if flags.contains(needs) {
        flag
    } else {
        CommandFlags::EMPTY
    }
}

impl Op {
    /// The payload bytes this request holds while in flight: its read
    /// buffer, its write payload, or its block status reply.
    pub fn payload_bytes(&self) -> usize {
        match *self {
            Op::Read { length, .. } | Op::Write { length, .. } => length as usize,
            Op::BlockStatus { .. } => 4 + 8 * MAX_DESCRIPTORS,
            _ => 0,
        }
    }

    /// Carries out the request on the backend (blocking). `buf` is the
    /// write's data or the read's destination, `length` bytes, and empty
    /// for every other command. Writes with FUA
    /// are followed by a flush before the reply: the backend is shared by
    /// every connection, so that flush also honours `CAN_MULTI_CONN`.
    pub fn execute(
        self,
        backend: &dyn Backend,
        size: u64,
        buf: &mut [u8],
    ) -> Result<Outcome, NbdError> {
        let fua = match self {
            Op::Read { offset, length } => {
                if length > 0 {
                    backend.read(offset, buf)?;
                }
                return Ok(Outcome::Data);
            }
            Op::Write {
                offset,
                length,
                fua,
            } => {
                if length > 0 {
                    backend.write(offset, buf)?;
                }
                fua
            }
            Op::Flush => {
                backend.flush()?;
                false
            }
            Op::Trim {
                offset,
                length,
                fua,
            } => {
                if length > 0 {
                    backend.trim(offset, length.into())?;
                }
                fua
            }
            Op::WriteZeroes {
                offset,
                length,
                fua,
                may_trim,
            } => {
                if length > 0 {
                    backend.write_zeroes(offset, length.into(), may_trim)?;
                }
                fua
            }
            Op::Cache { offset, length } => {
                if length > 0 {
                    backend.cache(offset, length.into())?;
                }
                false
            }
            Op::BlockStatus {
                offset,
                length,
                req_one,
            } => {
                let extents = backend.extents(offset, length.into())?;
                return Ok(Outcome::Extents(descriptors(
                    &extents,
                    length,
                    size - offset,
                    req_one,
                )));
            }
            Op::Disconnect => false,
        };
        if fua {
            backend.flush()?;
        }
        Ok(Outcome::Done)
    }
}

/// Turns the backend's extents into block status descriptors as proto.md
/// requires them: nonzero lengths that fit 32 bits, none past the end of
/// the export (`remaining` bytes from the request's offset), the sum of all
/// but the last below the requested `length`, neighbours of equal status
/// merged, exactly one within `length` under `NBD_CMD_FLAG_REQ_ONE`, and at
/// least one in every case ("a server MAY always safely report a status of
/// 0").
fn descriptors(
    extents: &[Extent],
    length: u32,
    remaining: u64,
    req_one: bool,
) -> Vec<BlockDescriptor> {
    let length = u64::from(length);
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut covered = 0u64;
    'extents: for extent in extents {
        let mut status = AllocationFlags::EMPTY;
        if extent.hole {
            status |= AllocationFlags::HOLE;
        }
        if extent.zero {
            status |= AllocationFlags::ZERO;
        }
        let mut left = extent.length.min(remaining - covered);
        while left > 0 {
            if covered >= length || out.len() == MAX_DESCRIPTORS {
                break 'extents;
            }
            let mut take = left.min(MAX_DESCRIPTOR_LEN);
            if req_one {
                take = take.min(length);
            }
            match out.last_mut() {
                Some(last)
                    if last.status == status
                        && u64::from(last.length) + take <= MAX_DESCRIPTOR_LEN =>
                {
                    last.length += take as u32;
                }
                _ => out.push(BlockDescriptor {
                    length: take as u32,
                    status,
                }),
            }
            covered += take;
            left -= take;
            if req_one {
                break 'extents;
            }
        }
    }
    if out.is_empty() {
        out.push(BlockDescriptor {
            length: length.min(remaining) as u32,
            status: AllocationFlags::EMPTY,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::testing::{MemBackend, session};

    fn header(command: Command, flags: CommandFlags, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    fn check(
        s: &Session,
        command: Command,
        flags: CommandFlags,
        offset: u64,
        length: u32,
    ) -> Result<Op, NbdError> {
        header(command, flags, offset, length).validate(s)
    }

    #[test]
    fn reads_and_writes_within_the_export_pass_at_any_alignment() {
        let s = session(MemBackend::new(1 << 20, 4096, true), false, true);
        assert_eq!(
            check(&s, Command::READ, CommandFlags::EMPTY, 1, 4095).unwrap(),
            Op::Read {
                offset: 1,
                length: 4095
            }
        );
        assert_eq!(
            check(&s, Command::WRITE, CommandFlags::FUA, (1 << 20) - 3, 3).unwrap(),
            Op::Write {
                offset: (1 << 20) - 3,
                length: 3,
                fua: true
            }
        );
        assert_eq!(
            check(&s, Command::READ, CommandFlags::EMPTY, 1 << 20, 0).unwrap(),
            Op::Read {
                offset: 1 << 20,
                length: 0
            }
        );
    }

    #[test]
    fn past_the_end_is_enospc_for_writes_and_einval_for_the_rest() {
        let s = session(MemBackend::new(1 << 20, 512, true), false, true);
        let code = |command, offset, length| {
            check(&s, command, CommandFlags::EMPTY, offset, length)
                .unwrap_err()
                .wire_code()
        };
        use crate::nbd::proto::wire::WireError;
        assert_eq!(code(Command::WRITE, (1 << 20) - 1, 2), WireError::ENOSPC);
        assert_eq!(code(Command::WRITE_ZEROES, 1 << 20, 1), WireError::ENOSPC);
        assert_eq!(code(Command::READ, (1 << 20) - 1, 2), WireError::EINVAL);
        assert_eq!(code(Command::TRIM, 1 << 21, 0), WireError::EINVAL);
        assert_eq!(code(Command::CACHE, u64::MAX, 1), WireError::EINVAL);
        assert_eq!(code(Command::READ, u64::MAX - 10, 512), WireError::EINVAL);
        assert_eq!(code(Command::WRITE, u64::MAX - 10, 512), WireError::ENOSPC);
    }

    #[test]
    fn writes_to_a_read_only_export_are_eperm_whatever_else_is_wrong() {
        let s = session(MemBackend::new(1 << 20, 512, true), true, true);
        for command in [Command::WRITE, Command::TRIM, Command::WRITE_ZEROES] {
            let err = check(&s, command, CommandFlags(0xffff), u64::MAX, u32::MAX).unwrap_err();
            assert!(
                matches!(err, NbdError::ReadOnly(c) if c == command),
                "{err}"
            );
        }
        assert!(check(&s, Command::READ, CommandFlags::EMPTY, 0, 512).is_ok());
        assert!(check(&s, Command::FLUSH, CommandFlags::EMPTY, 0, 0).is_ok());
    }

    #[test]
    fn each_command_accepts_only_its_flags() {
        let s = session(MemBackend::new(1 << 20, 512, true), false, true);
        let all = [
            (Command::READ, CommandFlags::FUA | CommandFlags::DF),
            (Command::WRITE, CommandFlags::FUA),
            (Command::FLUSH, CommandFlags::FUA),
            (Command::TRIM, CommandFlags::FUA),
            (Command::CACHE, CommandFlags::FUA),
            (
                Command::WRITE_ZEROES,
                CommandFlags::FUA | CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
            ),
            (
                Command::BLOCK_STATUS,
                CommandFlags::FUA | CommandFlags::REQ_ONE,
            ),
        ];
        for (command, allowed) in all {
            let length = if command == Command::FLUSH { 0 } else { 512 };
            for bit in 0..16 {
                let flag = CommandFlags(1 << bit);
                let result = check(&s, command, flag, 0, length);
                if allowed.contains(flag) {
                    assert!(result.is_ok(), "{command:?} {flag:?}: {result:?}");
                } else {
                    assert!(
                        matches!(result, Err(NbdError::FlagsNotAllowed { flags, .. }) if flags == flag),
                        "{command:?} {flag:?}: {result:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn df_needs_structured_replies() {
        let s = session(MemBackend::new(1 << 20, 512, true), false, false);
        assert!(matches!(
            check(&s, Command::READ, CommandFlags::DF, 0, 512),
            Err(NbdError::FlagsNotAllowed { .. })
        ));
    }

    #[test]
    fn commands_not_advertised_or_unknown_are_refused() {
        let s = session(MemBackend::new(1 << 20, 512, false), false, false);
        assert!(matches!(
            check(&s, Command::TRIM, CommandFlags::EMPTY, 0, 512),
            Err(NbdError::NotAdvertised(Command::TRIM))
        ));
        assert!(matches!(
            check(&s, Command::BLOCK_STATUS, CommandFlags::EMPTY, 0, 512),
            Err(NbdError::NoMetaContext)
        ));
        for unknown in [Command::RESIZE, Command(9), Command(0xffff)] {
            assert!(matches!(
                check(&s, unknown, CommandFlags::EMPTY, 0, 0),
                Err(NbdError::UnknownCommand(c)) if c == unknown
            ));
        }
        assert_eq!(
            check(&s, Command::DISC, CommandFlags::EMPTY, 0, 0).unwrap(),
            Op::Disconnect
        );
    }

    #[test]
    fn payload_limits_apply_to_reads_and_writes_only() {
        let s = session(MemBackend::new(1 << 30, 512, true), false, true);
        let max = s.max_request_bytes;
        assert!(matches!(
            check(&s, Command::WRITE, CommandFlags::EMPTY, 0, max + 1),
            Err(NbdError::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            check(&s, Command::READ, CommandFlags::EMPTY, 0, max + 1),
            Err(NbdError::ReplyTooLarge { .. })
        ));
        assert!(check(&s, Command::WRITE, CommandFlags::EMPTY, 0, max).is_ok());
        for command in [
            Command::TRIM,
            Command::WRITE_ZEROES,
            Command::CACHE,
            Command::BLOCK_STATUS,
        ] {
            assert!(check(&s, command, CommandFlags::EMPTY, 0, max * 4).is_ok());
        }
        let simple = session(MemBackend::new(1 << 30, 512, true), false, false);
        assert!(matches!(
            check(&simple, Command::READ, CommandFlags::EMPTY, 0, max + 1),
            Err(NbdError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn flush_has_reserved_fields_and_block_status_needs_a_length() {
        let s = session(MemBackend::new(1 << 20, 512, true), false, true);
        assert!(matches!(
            check(&s, Command::FLUSH, CommandFlags::EMPTY, 1, 0),
            Err(NbdError::ReservedFieldsSet(Command::FLUSH))
        ));
        assert!(matches!(
            check(&s, Command::BLOCK_STATUS, CommandFlags::EMPTY, 0, 0),
            Err(NbdError::EmptyBlockStatus)
        ));
    }

    #[test]
    fn fast_zero_only_where_holes_may_be_punched() {
        let fast = CommandFlags::FAST_ZERO;
        let s = session(MemBackend::new(1 << 20, 512, true), false, true);
        assert!(check(&s, Command::WRITE_ZEROES, fast, 0, 4096).is_ok());
        assert!(matches!(
            check(
                &s,
                Command::WRITE_ZEROES,
                fast | CommandFlags::NO_HOLE,
                0,
                4096
            ),
            Err(NbdError::FastZeroUnsupported)
        ));
        let no_trim = session(MemBackend::new(1 << 20, 512, false), false, true);
        assert!(matches!(
            check(&no_trim, Command::WRITE_ZEROES, fast, 0, 4096),
            Err(NbdError::FastZeroUnsupported)
        ));
        assert!(
            check(
                &no_trim,
                Command::WRITE_ZEROES,
                CommandFlags::EMPTY,
                0,
                4096
            )
            .is_ok()
        );
    }

    fn ext(length: u64, hole: bool, zero: bool) -> Extent {
        Extent { length, hole, zero }
    }

    fn desc(length: u32, status: u32) -> BlockDescriptor {
        BlockDescriptor {
            length,
            status: AllocationFlags(status),
        }
    }

    #[test]
    fn descriptors_follow_the_block_status_rules() {
        // Merged neighbours, zero-length extents dropped, stop once the
        // request is covered (the last may extend past it).
        let extents = [
            ext(4096, false, false),
            ext(0, true, true),
            ext(4096, false, false),
            ext(8192, true, true),
            ext(4096, false, false),
        ];
        assert_eq!(
            descriptors(&extents, 10000, 1 << 20, false),
            vec![desc(8192, 0), desc(8192, 3)]
        );
        // REQ_ONE: one descriptor, within the request.
        assert_eq!(
            descriptors(&extents, 100, 1 << 20, true),
            vec![desc(100, 0)]
        );
        // Never past the end of the export.
        assert_eq!(
            descriptors(&[ext(1 << 40, true, true)], 512, 1000, false),
            vec![desc(1000, 3)]
        );
        // Huge extents are split to fit 32 bits.
        let split = descriptors(&[ext(1 << 40, false, false)], u32::MAX, 1 << 40, false);
        assert_eq!(split.len(), 2);
        assert_eq!(split[0].length as u64, MAX_DESCRIPTOR_LEN);
        // Nothing from the backend: one unknown-status descriptor.
        assert_eq!(descriptors(&[], 512, 1 << 20, false), vec![desc(512, 0)]);
        assert_eq!(descriptors(&[], 512, 100, false), vec![desc(100, 0)]);
    }

    #[test]
    fn descriptors_are_capped_per_reply() {
        let extents: Vec<Extent> = (0..MAX_DESCRIPTORS + 10)
            .map(|i| ext(512, i % 2 == 0, i % 2 == 0))
            .collect();
        let out = descriptors(&extents, u32::MAX, 1 << 40, false);
        assert_eq!(out.len(), MAX_DESCRIPTORS);
    }

    #[test]
    fn execute_reads_writes_and_flushes_with_fua() {
        let backend = MemBackend::new(8192, 512, true);
        let s = session(backend.clone(), false, true);
        let be = s.export.backend.as_ref();
        let write = Op::Write {
            offset: 100,
            length: 3,
            fua: true,
        };
        assert_eq!(
            write.execute(be, s.size, &mut b"abc".to_vec()).unwrap(),
            Outcome::Done
        );
        assert_eq!(backend.flushes(), 1);
        let read = Op::Read {
            offset: 99,
            length: 5,
        };
        let mut buf = [0xff; 5];
        assert_eq!(read.execute(be, s.size, &mut buf).unwrap(), Outcome::Data);
        assert_eq!(&buf, b"\0abc\0");
        let zero = Op::WriteZeroes {
            offset: 101,
            length: 1,
            fua: false,
            may_trim: false,
        };
        zero.execute(be, s.size, &mut []).unwrap();
        read.execute(be, s.size, &mut buf).unwrap();
        assert_eq!(&buf, b"\0a\0c\0");
        assert_eq!(backend.flushes(), 1);
    }
}

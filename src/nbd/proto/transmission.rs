//! Transmission messages (proto.md, "Transmission"): the request header,
//! simple replies and structured reply chunks.

use super::handshake::truncate;
use super::wire::{
    AllocationFlags, Command, CommandFlags, REQUEST_MAGIC, ReplyFlags, ReplyType,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, WireError,
};
use super::{ProtoError, Reader};

/// A request header. Only `NBD_CMD_WRITE` is followed by a payload, of
/// `length` bytes; what the length means for other commands depends on the
/// command, and whether it is acceptable on the export (validation happens
/// later, against the export, before any I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: CommandFlags,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub const LEN: usize = 28;

    pub fn read(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(bytes);
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: REQUEST_MAGIC.into(),
                found: magic.into(),
            });
        }
        let header = RequestHeader {
            flags: CommandFlags(r.u16()?),
            command: Command(r.u16()?),
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        };
        r.finish()?;
        Ok(header)
    }

    /// How many payload bytes follow this header on the wire. A payload
    /// must be consumed even when the request is refused, or the stream
    /// loses its framing.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::WRITE {
            self.length
        } else {
            0
        }
    }

    /// The client's side of the codec, for tests and tools.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.0.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.0.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A simple reply: magic, error, cookie; a successful read's data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: WireError,
    pub cookie: u64,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.0.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }
}

/// The header of a structured reply chunk; `length` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: ReplyFlags,
    pub kind: ReplyType,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.0.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.0.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..20].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// The final chunk of a successful reply that carries nothing.
    pub fn done(cookie: u64) -> Self {
        ChunkHeader {
            flags: ReplyFlags::DONE,
            kind: ReplyType::NONE,
            cookie,
            length: 0,
        }
    }
}

/// Size of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk's fixed part: the chunk
/// header and the offset. The data follows.
pub const OFFSET_DATA_HEADER_LEN: usize = ChunkHeader::LEN + 8;

/// The fixed part of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying
/// `data_len` bytes read at `offset`; the caller sends the data right after
/// it (without copying it next to the header). `data_len` must be at least
/// 1 and at most `u32::MAX - 8`.
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32) -> [u8; OFFSET_DATA_HEADER_LEN] {
    let header = ChunkHeader {
        flags: ReplyFlags::DONE,
        kind: ReplyType::OFFSET_DATA,
        cookie,
        length: data_len + 8,
    };
    let mut out = [0; OFFSET_DATA_HEADER_LEN];
    out[..ChunkHeader::LEN].copy_from_slice(&header.encode());
    out[ChunkHeader::LEN..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk: the error and a message for a human.
pub fn encode_error_chunk(cookie: u64, error: WireError, message: &str, out: &mut Vec<u8>) {
    let message = truncate(message);
    let header = ChunkHeader {
        flags: ReplyFlags::DONE,
        kind: ReplyType::ERROR,
        cookie,
        length: 6 + message.len() as u32,
    };
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&error.0.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Nonzero.
    pub length: u32,
    pub status: AllocationFlags,
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one metadata context;
/// `descriptors` must not be empty.
pub fn encode_block_status_chunk(
    cookie: u64,
    context_id: u32,
    descriptors: &[BlockDescriptor],
    out: &mut Vec<u8>,
) {
    let header = ChunkHeader {
        flags: ReplyFlags::DONE,
        kind: ReplyType::BLOCK_STATUS,
        cookie,
        length: (4 + 8 * descriptors.len()) as u32,
    };
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.status.0.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_header_reads_every_field() {
        let bytes = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset
            0, 0, 2, 0, // length
        ];
        let header = RequestHeader::read(&bytes).unwrap();
        assert_eq!(
            header,
            RequestHeader {
                flags: CommandFlags::FUA,
                command: Command::WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512,
            }
        );
        assert_eq!(header.payload_len(), 512);
        assert_eq!(header.encode(), bytes);
    }

    #[test]
    fn request_header_refuses_bad_magic_short_and_long_input() {
        let good = RequestHeader {
            flags: CommandFlags::EMPTY,
            command: Command::READ,
            cookie: 1,
            offset: 0,
            length: 1,
        }
        .encode();
        let mut bad = good;
        bad[0] = 0x12; // the historic magic 0x12560953
        bad[1] = 0x56;
        assert_eq!(
            RequestHeader::read(&bad),
            Err(ProtoError::BadMagic {
                expected: 0x2560_9513,
                found: 0x1256_9513
            })
        );
        assert_eq!(
            RequestHeader::read(&good[..27]),
            Err(ProtoError::Truncated { needed: 1 })
        );
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(
            RequestHeader::read(&long),
            Err(ProtoError::TrailingBytes(1))
        );
    }

    #[test]
    fn only_writes_carry_a_payload() {
        for command in [0u16, 2, 3, 4, 5, 6, 7, 8, 0xffff] {
            let header = RequestHeader {
                flags: CommandFlags::EMPTY,
                command: Command(command),
                cookie: 0,
                offset: 0,
                length: 4096,
            };
            assert_eq!(header.payload_len(), 0, "{:?}", header.command);
        }
    }

    #[test]
    fn replies_encode_as_the_protocol_lays_them_out() {
        let simple = SimpleReply {
            error: WireError::ENOSPC,
            cookie: 7,
        }
        .encode();
        assert_eq!(
            simple,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 7]
        );

        assert_eq!(
            ChunkHeader::done(7).encode(),
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0
            ]
        );

        let data = offset_data_header(7, 4096, 512);
        assert_eq!(&data[4..8], &[0, 1, 0, 1]);
        assert_eq!(&data[16..20], &520u32.to_be_bytes());
        assert_eq!(&data[20..28], &4096u64.to_be_bytes());

        let mut out = Vec::new();
        encode_error_chunk(7, WireError::EPERM, "read-only", &mut out);
        assert_eq!(&out[4..8], &[0, 1, 0x80, 1]);
        assert_eq!(&out[16..20], &15u32.to_be_bytes());
        assert_eq!(&out[20..26], &[0, 0, 0, 1, 0, 9]);
        assert_eq!(&out[26..], b"read-only");

        out.clear();
        encode_block_status_chunk(
            7,
            1,
            &[
                BlockDescriptor {
                    length: 4096,
                    status: AllocationFlags::EMPTY,
                },
                BlockDescriptor {
                    length: 512,
                    status: AllocationFlags::HOLE | AllocationFlags::ZERO,
                },
            ],
            &mut out,
        );
        assert_eq!(&out[4..8], &[0, 1, 0, 5]);
        assert_eq!(&out[16..20], &20u32.to_be_bytes());
        assert_eq!(
            &out[20..],
            &[0, 0, 0, 1, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3]
        );
    }

    proptest! {
        #[test]
        fn request_headers_read_only_when_well_formed(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let result = RequestHeader::read(&bytes);
            let well_formed = bytes.len() == RequestHeader::LEN && bytes[..4] == REQUEST_MAGIC.to_be_bytes();
            prop_assert_eq!(result.is_ok(), well_formed);
            if let Ok(header) = result {
                prop_assert_eq!(&header.encode()[..], &bytes[..]);
            }
        }
    }
}

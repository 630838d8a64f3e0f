//! The NBD wire format, sans I/O: bytes in, typed messages out, and typed
//! replies into a `Vec<u8>` or a fixed header array. Nothing here touches a
//! socket, allocates in proportion to a length the client announced, or
//! panics on any input; every reader rejects trailing bytes.
//!
//! - [`wire`]: magics and the protocol's codes as open enums and flag sets.
//! - [`handshake`]: the greeting, client flags, options and option replies.
//! - [`transmission`]: request headers, simple and structured replies.
//!
//! Every message of both phases starts with a fixed-size header that says
//! how much follows (an option's length, a write's payload), so "is a whole
//! frame buffered?" is answered by the header alone: the caller reads
//! `LEN` bytes, parses them, and then reads exactly the announced payload
//! into a buffer of its own, after deciding whether it accepts that size.

pub mod handshake;
pub mod transmission;
pub mod wire;

/// The longest string the protocol allows (export names, descriptions,
/// error messages, metadata context names): "MUST be no longer than 4096
/// bytes" (proto.md, Conventions).
pub const MAX_STRING_LEN: usize = 4096;

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The message ends before its fixed layout does.
    #[error("message truncated: {needed} more bytes expected")]
    Truncated { needed: usize },
    /// Bytes follow the end of a complete message.
    #[error("{0} unexpected bytes after the end of the message")]
    TrailingBytes(usize),
    /// A magic number is wrong: the peer does not speak this protocol or
    /// lost track of message boundaries.
    #[error("bad magic {found:#x} (expected {expected:#x}): not an NBD peer, or out of step")]
    BadMagic { expected: u64, found: u64 },
    /// The client sent flags this server did not offer.
    #[error("client flags {0:#x} include bits this server does not know or did not offer")]
    UnknownClientFlags(u32),
    /// An option announces more data than any valid option needs.
    #[error("option of {length} bytes exceeds the {max} byte limit; refusing to read it")]
    OptionTooLarge { length: u32, max: u32 },
    /// A string is not UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A string contains a NUL character.
    #[error("string contains a NUL character")]
    ContainsNul,
    /// A string is longer than the protocol allows.
    #[error("string of {0} bytes is longer than the protocol's {MAX_STRING_LEN} byte limit")]
    StringTooLong(usize),
    /// A metadata context query does not start with a namespace and a colon.
    #[error("metadata context query {0:?} does not start with a namespace and a colon")]
    QueryWithoutNamespace(String),
}

/// A cursor over a received message. Every read is bounds-checked and
/// fails with [`ProtoError::Truncated`] rather than panicking.
#[derive(Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.rest.len() {
            return Err(ProtoError::Truncated {
                needed: n - self.rest.len(),
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let bytes = self.take(N)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        self.array().map(u64::from_be_bytes)
    }

    /// A string of `len` bytes, checked against the protocol's rules for
    /// strings: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes.
    pub fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        let bytes = self.take(len)?;
        if len > MAX_STRING_LEN {
            return Err(ProtoError::StringTooLong(len));
        }
        let s = std::str::from_utf8(bytes).map_err(|_| ProtoError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(ProtoError::ContainsNul);
        }
        Ok(s.to_owned())
    }

    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Ends a message: anything left over is an error.
    pub fn finish(self) -> Result<(), ProtoError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(ProtoError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_big_endian_and_reports_shortfall() {
        let mut r = Reader::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.u32(), Ok(2));
        assert_eq!(r.u16(), Err(ProtoError::Truncated { needed: 1 }));
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.finish(), Err(ProtoError::TrailingBytes(1)));
    }

    #[test]
    fn strings_follow_the_protocol_rules() {
        assert_eq!(Reader::new(b"disk").string(4).as_deref(), Ok("disk"));
        assert_eq!(
            Reader::new(b"di\0k").string(4),
            Err(ProtoError::ContainsNul)
        );
        assert_eq!(
            Reader::new(&[0xff, 0xfe]).string(2),
            Err(ProtoError::InvalidUtf8)
        );
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        assert_eq!(
            Reader::new(&long).string(long.len()),
            Err(ProtoError::StringTooLong(MAX_STRING_LEN + 1))
        );
        assert_eq!(
            Reader::new(b"ab").string(3),
            Err(ProtoError::Truncated { needed: 1 })
        );
    }
}

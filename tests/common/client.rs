//! The raw NBD client of the tests: fixed newstyle, `NBD_OPT_GO`, simple
//! or structured replies, requests pipelined as the test sends them. Every
//! step returns `io::Result`, for tests in which the server may die under it
//! (kill -9) or a backend may fail: the test decides what a broken
//! connection or an error reply means. `nbd::RawClient` is the same client
//! for tests in which any failure is theirs.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nbdcrypt::nbd::proto::transmission::RequestHeader;
use nbdcrypt::nbd::proto::wire::{
    Command, CommandFlags, IHAVEOPT, InfoType, OPTION_REPLY_MAGIC, OptionCode, OptionReplyType,
    ReplyType, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, TransmissionFlags,
};

/// Socket buffering each way: small, because in-process servers' tests
/// count the process's allocations (a request larger than this bypasses
/// the buffer anyway).
const BUFFER: usize = 64 * 1024;

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    pub size: u64,
    pub flags: TransmissionFlags,
}

/// One simple reply.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    /// The NBD error value; 0 is success.
    pub error: u32,
    /// A successful read's data.
    pub data: Vec<u8>,
}

/// A reply of either kind, as it came.
#[derive(Debug, PartialEq, Eq)]
pub enum RawReply {
    Simple {
        cookie: u64,
        error: u32,
        data: Vec<u8>,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        kind: ReplyType,
        payload: Vec<u8>,
    },
}

impl RawReply {
    pub fn cookie(&self) -> u64 {
        match self {
            RawReply::Simple { cookie, .. } | RawReply::Chunk { cookie, .. } => *cookie,
        }
    }
}

fn protocol(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Whether an error means "the server went away" (killed, or closed the
/// connection), as opposed to a reply the test did not expect.
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::NotFound
    )
}

impl Client {
    /// Handshakes with `NBD_OPT_GO` to `export` on the Unix socket.
    pub fn connect(socket: &Path, export: &str) -> io::Result<Self> {
        Self::connect_with(socket, export, false)
    }

    /// Like [`Client::connect`]; with `structured`, negotiates structured
    /// replies and `base:allocation` first.
    pub fn connect_with(socket: &Path, export: &str, structured: bool) -> io::Result<Self> {
        let stream = UnixStream::connect(socket)?;
        let mut client = Client {
            reader: BufReader::with_capacity(BUFFER, stream.try_clone()?),
            writer: BufWriter::with_capacity(BUFFER, stream),
            size: 0,
            flags: TransmissionFlags::EMPTY,
        };
        let mut greeting = [0; 18];
        client.reader.read_exact(&mut greeting)?;
        if &greeting[..16] != b"NBDMAGICIHAVEOPT" {
            return Err(protocol(format!("bad greeting {greeting:?}")));
        }
        // FIXED_NEWSTYLE | NO_ZEROES
        client.writer.write_all(&3u32.to_be_bytes())?;
        if structured {
            client.expect(OptionCode::STRUCTURED_REPLY, &[], &[OptionReplyType::ACK])?;
            let mut data = (export.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(export.as_bytes());
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&15u32.to_be_bytes());
            data.extend_from_slice(b"base:allocation");
            client.expect(
                OptionCode::SET_META_CONTEXT,
                &data,
                &[OptionReplyType::META_CONTEXT, OptionReplyType::ACK],
            )?;
        }
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&InfoType::BLOCK_SIZE.0.to_be_bytes());
        client.option(OptionCode::GO, &data)?;
        loop {
            let (kind, data) = client.option_reply()?;
            match kind {
                OptionReplyType::ACK => return Ok(client),
                OptionReplyType::INFO if data.len() >= 12 && data[..2] == [0, 0] => {
                    client.size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    client.flags = TransmissionFlags(u16::from_be_bytes([data[10], data[11]]));
                }
                OptionReplyType::INFO => {}
                other => {
                    return Err(protocol(format!(
                        "GO {export:?} refused: {other:?} {}",
                        String::from_utf8_lossy(&data)
                    )));
                }
            }
        }
    }

    /// Sends an option and reads its replies, which must be of `kinds`.
    fn expect(
        &mut self,
        code: OptionCode,
        data: &[u8],
        kinds: &[OptionReplyType],
    ) -> io::Result<()> {
        self.option(code, data)?;
        for &want in kinds {
            let (kind, data) = self.option_reply()?;
            if kind != want {
                return Err(protocol(format!(
                    "{code:?}: {kind:?} instead of {want:?}: {}",
                    String::from_utf8_lossy(&data)
                )));
            }
        }
        Ok(())
    }

    pub fn option(&mut self, code: OptionCode, data: &[u8]) -> io::Result<()> {
        self.writer.write_all(&IHAVEOPT.to_be_bytes())?;
        self.writer.write_all(&code.0.to_be_bytes())?;
        self.writer.write_all(&(data.len() as u32).to_be_bytes())?;
        self.writer.write_all(data)?;
        self.writer.flush()
    }

    pub fn option_reply(&mut self) -> io::Result<(OptionReplyType, Vec<u8>)> {
        let mut header = [0; 20];
        self.reader.read_exact(&mut header)?;
        if header[..8] != OPTION_REPLY_MAGIC.to_be_bytes() {
            return Err(protocol("bad option reply magic".into()));
        }
        let kind = OptionReplyType(u32::from_be_bytes(header[12..16].try_into().unwrap()));
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0; len as usize];
        self.reader.read_exact(&mut data)?;
        Ok((kind, data))
    }

    /// Queues one request; [`Client::push`] sends what is queued.
    pub fn send(
        &mut self,
        command: Command,
        flags: CommandFlags,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.writer.write_all(&header.encode())?;
        self.writer.write_all(payload)
    }

    pub fn push(&mut self) -> io::Result<()> {
        self.writer.flush()
    }

    /// The next reply, simple or a structured chunk. A simple reply's data
    /// length is not on the wire: `read_len(cookie)` says how much data a
    /// successful reply to that cookie carries.
    pub fn next_reply(&mut self, read_len: impl Fn(u64) -> usize) -> io::Result<RawReply> {
        let mut magic = [0; 4];
        self.reader.read_exact(&mut magic)?;
        let magic = u32::from_be_bytes(magic);
        if magic == SIMPLE_REPLY_MAGIC {
            let mut rest = [0; 12];
            self.reader.read_exact(&mut rest)?;
            let error = u32::from_be_bytes(rest[..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(rest[4..].try_into().unwrap());
            let mut data = vec![0; if error == 0 { read_len(cookie) } else { 0 }];
            self.reader.read_exact(&mut data)?;
            Ok(RawReply::Simple {
                cookie,
                error,
                data,
            })
        } else if magic == STRUCTURED_REPLY_MAGIC {
            let mut rest = [0; 16];
            self.reader.read_exact(&mut rest)?;
            let len = u32::from_be_bytes(rest[12..].try_into().unwrap());
            let mut payload = vec![0; len as usize];
            self.reader.read_exact(&mut payload)?;
            Ok(RawReply::Chunk {
                cookie: u64::from_be_bytes(rest[4..12].try_into().unwrap()),
                flags: u16::from_be_bytes([rest[0], rest[1]]),
                kind: ReplyType(u16::from_be_bytes([rest[2], rest[3]])),
                payload,
            })
        } else {
            Err(protocol(format!("bad reply magic {magic:x}")))
        }
    }

    /// The next reply, which must be a simple one.
    pub fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> io::Result<Reply> {
        match self.next_reply(read_len)? {
            RawReply::Simple {
                cookie,
                error,
                data,
            } => Ok(Reply {
                cookie,
                error,
                data,
            }),
            chunk => Err(protocol(format!("a structured reply: {chunk:?}"))),
        }
    }

    /// Whether the server has closed the connection (reads end of file).
    pub fn closed(&mut self) -> bool {
        let mut byte = [0; 1];
        matches!(self.reader.read(&mut byte), Ok(0))
    }

    /// Another handle on the socket, for bytes a test writes itself; what
    /// was queued goes out first.
    pub fn socket(&mut self) -> io::Result<UnixStream> {
        self.writer.flush()?;
        self.writer.get_ref().try_clone()
    }

    /// One request and its reply; an error reply is an `io::Error` naming
    /// the NBD error value.
    fn call(
        &mut self,
        command: Command,
        flags: CommandFlags,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<Vec<u8>> {
        let read_len = if command == Command::READ {
            length as usize
        } else {
            0
        };
        self.send(command, flags, 1, offset, length, payload)?;
        self.push()?;
        let reply = self.reply(|_| read_len)?;
        if reply.error != 0 {
            return Err(io::Error::other(format!(
                "{command:?} of {length} bytes at {offset}: NBD error {}",
                reply.error
            )));
        }
        Ok(reply.data)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let flags = if fua {
            CommandFlags::FUA
        } else {
            CommandFlags::EMPTY
        };
        self.call(Command::WRITE, flags, offset, data.len() as u32, data)
            .map(drop)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.call(Command::READ, CommandFlags::EMPTY, offset, len, &[])
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.call(Command::FLUSH, CommandFlags::EMPTY, 0, 0, &[])
            .map(drop)
    }

    /// Reads the whole export, `chunk` bytes at a time.
    pub fn read_all(&mut self, chunk: u32) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.size as usize);
        let mut at = 0;
        while at < self.size {
            let n = (self.size - at).min(u64::from(chunk)) as u32;
            out.extend_from_slice(&self.read(at, n)?);
            at += u64::from(n);
        }
        Ok(out)
    }

    /// The socket, for a test that goes on byte by byte.
    pub fn into_stream(self) -> UnixStream {
        self.writer
            .into_inner()
            .expect("nothing is left to send after a reply")
    }

    /// `NBD_CMD_DISC`, then close.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(Command::DISC, CommandFlags::EMPTY, 0, 0, 0, &[])?;
        self.push()
    }
}

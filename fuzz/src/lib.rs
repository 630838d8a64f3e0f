//! Entry points of the fuzz targets: each takes any bytes, drives one of
//! nbdcrypt's readers of untrusted input with them, and panics only when an
//! invariant breaks (a crash is a bug). The test suite replays the seed
//! corpora and the regression inputs through these same functions
//! (`tests/fuzz_regressions.rs` includes this file), so whatever a fuzzer
//! once found keeps running without cargo-fuzz.
//!
//! Only the public API of `nbdcrypt`, `sha2` and `tokio` is used, so that
//! the file compiles both here and inside the main crate's tests.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use nbdcrypt::kms::{EncryptionContext, parse};
use nbdcrypt::nbd::handshake::{BASE_ALLOCATION_ID, Negotiated, Session, negotiate};
use nbdcrypt::nbd::proto::transmission::{
    RequestHeader, SimpleReply, encode_block_status_chunk, encode_error_chunk, offset_data_header,
};
use nbdcrypt::nbd::proto::wire::{OPTION_REPLY_MAGIC, WireError};
use nbdcrypt::nbd::request::{Op, Outcome};
use nbdcrypt::nbd::{Backend, Export, Extent, Limits};
use nbdcrypt::secret::SecretBytes;
use nbdcrypt::volume::luks2::Header;
use sha2::{Digest, Sha256};

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus folder.
pub const TARGETS: [(&str, Target); 5] = [
    ("nbd_handshake", nbd_handshake),
    ("nbd_transmission", nbd_transmission),
    ("luks2_header", luks2_header),
    ("kms_blob", kms_blob),
    ("kms_store", kms_store),
];

/// The root key of the key store target, and the key material of the blob
/// target; `seed_corpus` makes its examples under the same keys.
pub const ROOT_KEY: [u8; 32] = [0x5a; 32];
pub const MATERIAL: [u8; 32] = [0xa5; 32];

/// The encryption context the blob target opens blobs under.
pub fn blob_context() -> EncryptionContext {
    EncryptionContext::for_volume("db-FUZZ", "vol-fuzz")
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    /// One unlinked scratch file per thread for the header target.
    static SCRATCH: RefCell<Option<File>> = const { RefCell::new(None) };
}

/// An export in memory. Out-of-range access panics, so a request that
/// validation let through past the end is found.
pub struct MemBackend {
    data: Mutex<Vec<u8>>,
    block_size: u32,
    can_trim: bool,
}

impl MemBackend {
    pub fn new(size: usize, block_size: u32, can_trim: bool) -> Self {
        MemBackend {
            data: Mutex::new(vec![0; size]),
            block_size,
            can_trim,
        }
    }

    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        let start = usize::try_from(offset).expect("offset fits");
        start..start + usize::try_from(len).expect("length fits")
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.data.lock().unwrap();
        buf.copy_from_slice(&data[Self::range(offset, buf.len() as u64)]);
        Ok(())
    }
    fn write(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut data = self.data.lock().unwrap();
        data[Self::range(offset, buf.len() as u64)].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn can_trim(&self) -> bool {
        self.can_trim
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> io::Result<()> {
        self.data.lock().unwrap()[Self::range(offset, len)].fill(0);
        Ok(())
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = &self.data.lock().unwrap()[Self::range(offset, len)];
        Ok(())
    }
    /// 4 KiB blocks of zeros are holes, so block status has runs to report.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let data = self.data.lock().unwrap();
        let _ = &data[Self::range(offset, len)];
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let end = ((at / 4096 + 1) * 4096).min(offset + len);
            let hole = data[Self::range(at, end - at)].iter().all(|&b| b == 0);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += end - at,
                _ => out.push(Extent {
                    length: end - at,
                    hole,
                    zero: hole,
                }),
            }
            at = end;
        }
        Ok(out)
    }
}

fn export(name: &str, size: usize, block_size: u32, read_only: bool, can_trim: bool) -> Export {
    Export {
        name: name.into(),
        description: format!("fuzz export {name}"),
        read_only,
        backend: Arc::new(MemBackend::new(size, block_size, can_trim)),
    }
}

/// Small limits keep each input's allocations small.
fn limits() -> Limits {
    Limits {
        max_request_bytes: 64 * 1024,
        max_inflight_bytes_per_connection: 256 * 1024,
        ..Limits::default()
    }
}

/// The server's side of a whole connection: the handshake as the server
/// runs it (`negotiate`, over the input as the client's bytes), then, if it
/// entered transmission, the rest of the input as requests. Checks that the
/// server's output is a well-formed sequence of option replies.
pub fn nbd_handshake(data: &[u8]) {
    let exports = vec![
        export("disk", 1 << 16, 4096, false, true),
        export("ro", 3 * 512, 512, true, false),
    ];
    let limits = limits();
    let mut input = data;
    let mut out = Vec::new();
    let negotiated =
        RUNTIME.with(|rt| rt.block_on(negotiate(&mut input, &mut out, &exports, &limits)));
    assert_eq!(&out[..8], b"NBDMAGIC", "the greeting goes out first");
    let mut replies = &out[18..];
    while replies.len() >= 20 && replies[..8] == OPTION_REPLY_MAGIC.to_be_bytes() {
        let kind = u32::from_be_bytes(replies[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(replies[16..20].try_into().unwrap()) as usize;
        assert!(
            len <= replies.len() - 20,
            "an option reply runs past the output"
        );
        if kind & (1 << 31) != 0 {
            assert!(len <= 4096, "error messages are protocol strings");
        }
        replies = &replies[20 + len..];
    }
    if let Ok(Negotiated::Transmission(session)) = negotiated {
        assert_eq!(session.size, session.export.backend.size());
        // What is left after an NBD_OPT_EXPORT_NAME reply: size, flags and
        // perhaps the padding; after NBD_OPT_GO: nothing.
        assert!(
            [0, 10, 134].contains(&replies.len()),
            "{} stray bytes",
            replies.len()
        );
        transmission(&session, input);
    } else {
        assert!(replies.is_empty(), "{} stray bytes", replies.len());
    }
}

/// The request parser and validator, and each request carried out on a
/// memory export, with every reply encoded. The first byte picks the
/// session: structured replies, base:allocation, read-only, trim, and an
/// export size that need not be a whole number of blocks.
pub fn nbd_transmission(data: &[u8]) {
    let Some((&shape, requests)) = data.split_first() else {
        return;
    };
    let size = (1 << 16) + usize::from(shape >> 4) * 100;
    let export = export("disk", size, 512, shape & 4 != 0, shape & 8 != 0);
    let structured = shape & 1 != 0;
    let meta = (structured && shape & 2 != 0).then_some(BASE_ALLOCATION_ID);
    let session = Session::new(&export, structured, meta, &limits());
    transmission(&session, requests);
}

fn transmission(session: &Session, mut input: &[u8]) {
    let backend = session.export.backend.as_ref();
    let mut reply = Vec::new();
    while input.len() >= RequestHeader::LEN {
        let (bytes, rest) = input.split_at(RequestHeader::LEN);
        input = rest;
        // A malformed header: the server hangs up.
        let Ok(header) = RequestHeader::read(bytes) else {
            return;
        };
        let payload_len = header.payload_len() as usize;
        if payload_len > input.len() {
            return; // the client left mid-payload
        }
        let (payload, rest) = input.split_at(payload_len);
        input = rest;
        reply.clear();
        match header.validate(session) {
            Ok(Op::Disconnect) => return,
            Ok(op) => {
                let mut buffer = match op {
                    Op::Read { length, .. } => vec![0; length as usize],
                    _ => payload.to_vec(),
                };
                if let Op::Read { length, .. } | Op::Write { length, .. } = op {
                    assert!(length <= session.max_request_bytes);
                }
                let result = op.execute(backend, session.size, &mut buffer);
                match result {
                    Ok(Outcome::Extents(descriptors)) => {
                        let Op::BlockStatus {
                            offset,
                            length,
                            req_one,
                        } = op
                        else {
                            panic!("extents for {op:?}");
                        };
                        check_descriptors(&descriptors, offset, length, req_one, session.size);
                        encode_block_status_chunk(header.cookie, 1, &descriptors, &mut reply);
                    }
                    Ok(Outcome::Data) if !buffer.is_empty() => {
                        reply.extend_from_slice(&offset_data_header(
                            header.cookie,
                            header.offset,
                            buffer.len() as u32,
                        ));
                    }
                    Ok(_) => reply.extend_from_slice(
                        &SimpleReply {
                            error: WireError::OK,
                            cookie: header.cookie,
                        }
                        .encode(),
                    ),
                    Err(e) => refused(header.cookie, &e, &mut reply),
                }
            }
            Err(e) => refused(header.cookie, &e, &mut reply),
        }
    }
}

fn refused(cookie: u64, e: &nbdcrypt::nbd::NbdError, out: &mut Vec<u8>) {
    let code = e.wire_code();
    assert!(code.name().is_some() && code != WireError::OK, "{code:?}");
    encode_error_chunk(cookie, code, &e.to_string(), out);
}

/// proto.md's rules for `base:allocation` replies.
fn check_descriptors(
    descriptors: &[nbdcrypt::nbd::proto::transmission::BlockDescriptor],
    offset: u64,
    length: u32,
    req_one: bool,
    size: u64,
) {
    assert!(!descriptors.is_empty(), "at least one descriptor");
    if req_one {
        assert_eq!(descriptors.len(), 1, "REQ_ONE: exactly one");
    }
    assert!(
        descriptors.iter().all(|d| d.length > 0),
        "zero-length descriptor"
    );
    let total: u64 = descriptors.iter().map(|d| u64::from(d.length)).sum();
    assert!(offset + total <= size, "descriptors run past the export");
    let before_last = total - u64::from(descriptors.last().unwrap().length);
    assert!(
        before_last < u64::from(length),
        "descriptors past the request"
    );
}

/// Sets the SHA-256 checksum of the LUKS2 copy at `at` over its header size,
/// as the specification defines it, so that the fuzzer reaches the checks
/// behind the checksum.
fn fix_checksum(image: &mut [u8], at: usize) {
    let Some(size_field) = image.get(at + 8..at + 16) else {
        return;
    };
    let hdr_size = u64::from_be_bytes(size_field.try_into().unwrap());
    if !(4096..=4 << 20).contains(&hdr_size) || at + hdr_size as usize > image.len() {
        return;
    }
    let copy = &mut image[at..at + hdr_size as usize];
    copy[448..512].fill(0);
    let sum = Sha256::digest(&*copy);
    copy[448..448 + sum.len()].copy_from_slice(&sum);
}

/// `Header::read_from` on a file of the input's bytes. The first byte says
/// whether to fix the checksums of the copies found (bits 0 and 1) and
/// whether the file is extended to 64 MiB (bit 2) so that a data segment
/// fits. Any header that is accepted must write back and read back equal.
pub fn luks2_header(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut image = bytes.to_vec();
    if mode & 1 != 0 {
        fix_checksum(&mut image, 0);
    }
    if mode & 2 != 0 {
        for at in [0x4000, 0x8000, 0x1_0000, 0x2_0000, 0x4_0000] {
            if image.get(at..at + 4) == Some(b"SKUL") {
                fix_checksum(&mut image, at);
            }
        }
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let file = scratch.get_or_insert_with(|| {
            let path = std::env::temp_dir().join(format!("nbdcrypt-fuzz-{}", std::process::id()));
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("scratch file");
            let _ = std::fs::remove_file(&path);
            file
        });
        file.set_len(0).unwrap();
        file.write_all_at(&image, 0).unwrap();
        if mode & 4 != 0 {
            file.set_len(64 << 20).unwrap();
        }
        let Ok(mut header) = Header::read_from(file) else {
            return;
        };
        let token = header
            .kms_token()
            .expect("an accepted header has our token");
        let (seqid, metadata) = (header.seqid(), header.metadata().clone());
        if header.write_to(file).is_err() {
            return;
        }
        let again = Header::read_from(file).expect("a header we wrote reads back");
        assert_eq!(again.seqid(), seqid + 1);
        assert!(again.damage().is_none(), "both copies were rewritten");
        assert_eq!(again.metadata(), &metadata);
        let token_again = again.kms_token().unwrap();
        assert_eq!(token_again.ciphertext_blob, token.ciphertext_blob);
        assert_eq!(token_again.key_id, token.key_id);
        assert_eq!(
            (again.data_offset(), again.data_size(), again.sector_size()),
            (
                header.data_offset(),
                header.data_size(),
                header.sector_size()
            )
        );
    });
}

/// A ciphertext blob given to Decrypt: its header parsed and, when it names
/// a key, opened under fixed material and context.
pub fn kms_blob(data: &[u8]) {
    let material = SecretBytes::copy_from(&MATERIAL);
    if let Ok((_, _, plaintext)) = parse::blob(data, &material, &blob_context()) {
        // Only a blob sealed under this material and context opens.
        assert!(plaintext.len() + 49 == data.len());
    }
}

/// A key store file under a fixed root key. First byte 0: the rest is the
/// file as it is; otherwise the rest is a body that gets a valid header and
/// integrity tag first, so that the JSON and the sealed material are reached.
pub fn kms_store(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let root = SecretBytes::copy_from(&ROOT_KEY);
    let file = if mode == 0 {
        rest.to_vec()
    } else {
        parse::frame_key_store(rest, &root)
    };
    let _ = parse::key_store(&file, &root);
}

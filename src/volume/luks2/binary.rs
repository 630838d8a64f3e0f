//! The 4096-byte binary header that starts each of the two metadata copies
//! (LUKS2 on-disk format specification, section 2.1 "Binary header").
//!
//! Sans-I/O: [`BinaryHeader::encode`] turns a header and its JSON area into the
//! bytes of one copy, checksum included; [`BinaryHeader::decode`] checks one
//! copy's bytes. Reading and writing the file is the caller's business.
//!
//! All integers are big-endian. Text fields are NUL-terminated, so each holds
//! at most its length minus one byte.

use sha2::{Digest, Sha256};

use super::CopyFault;

/// Length of the binary header; the JSON area follows it.
pub(super) const BINARY_HEADER_LEN: usize = 4096;

/// Metadata sizes (binary header + JSON area) the specification allows; the
/// secondary copy starts at the first copy's size, so these are also the
/// offsets where a secondary copy is searched for when the primary is unreadable.
pub(super) const ALLOWED_HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x1_0000, 0x2_0000, 0x4_0000, 0x8_0000, 0x10_0000, 0x20_0000, 0x40_0000,
];

/// The only checksum algorithm cryptsetup writes, and the only one we accept.
pub(super) const CHECKSUM_ALG: &str = "sha256";

const MAGIC_LEN: usize = 6;
const PRIMARY_MAGIC: &[u8; MAGIC_LEN] = b"LUKS\xba\xbe";
const SECONDARY_MAGIC: &[u8; MAGIC_LEN] = b"SKUL\xba\xbe";

// Field offsets and lengths (specification, table 1).
const VERSION: usize = 6;
const HDR_SIZE: usize = 8;
const SEQID: usize = 16;
const LABEL: (usize, usize) = (24, 48);
const CSUM_ALG: (usize, usize) = (72, 32);
const SALT: (usize, usize) = (104, 64);
const UUID: (usize, usize) = (168, 40);
const SUBSYSTEM: (usize, usize) = (208, 48);
const HDR_OFFSET: usize = 256;
const CSUM: (usize, usize) = (448, 64);

/// Longest label or subsystem: the 48-byte field keeps a terminating NUL.
pub(super) const MAX_LABEL_LEN: usize = LABEL.1 - 1;

/// Which of the two metadata copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderCopy {
    /// At offset 0, magic `LUKS\xba\xbe`.
    Primary,
    /// At offset `hdr_size`, magic `SKUL\xba\xbe`.
    Secondary,
}

impl HeaderCopy {
    /// Whether `bytes` (the start of this copy's place) begin with its magic;
    /// tells "cut short" from "absent" when the device ends inside a copy.
    pub(super) fn starts(self, bytes: &[u8]) -> bool {
        bytes.starts_with(self.magic())
    }

    fn magic(self) -> &'static [u8; MAGIC_LEN] {
        match self {
            HeaderCopy::Primary => PRIMARY_MAGIC,
            HeaderCopy::Secondary => SECONDARY_MAGIC,
        }
    }
}

impl std::fmt::Display for HeaderCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeaderCopy::Primary => "primary",
            HeaderCopy::Secondary => "secondary",
        })
    }
}

/// The fields of a binary header that both copies share. The per-copy fields
/// (magic, offset, salt, checksum) are supplied when a copy is encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct BinaryHeader {
    /// Binary header plus JSON area, in bytes.
    pub hdr_size: u64,
    /// Increased on every update; the valid copy with the highest wins.
    pub seqid: u64,
    pub label: String,
    pub subsystem: String,
    pub uuid: uuid::Uuid,
}

/// A decoded copy whose checksum has been verified.
#[derive(Debug)]
pub(super) struct DecodedCopy {
    pub header: BinaryHeader,
    /// Each copy has its own salt (specification: "unique for every header").
    pub salt: [u8; 64],
}

/// The leading fields of a copy, checked before its JSON area is read, so a
/// bogus size never makes us read megabytes.
#[derive(Debug)]
pub(super) struct Prefix {
    pub hdr_size: u64,
}

impl BinaryHeader {
    /// The bytes of one copy: binary header with checksum, then `json_area`
    /// (whose length must be `hdr_size - 4096`).
    pub fn encode(&self, copy: HeaderCopy, salt: &[u8; 64], json_area: &[u8]) -> Vec<u8> {
        debug_assert_eq!(
            json_area.len() as u64 + BINARY_HEADER_LEN as u64,
            self.hdr_size
        );
        let mut out = vec![0u8; BINARY_HEADER_LEN];
        out[..MAGIC_LEN].copy_from_slice(copy.magic());
        out[VERSION..VERSION + 2].copy_from_slice(&2u16.to_be_bytes());
        out[HDR_SIZE..HDR_SIZE + 8].copy_from_slice(&self.hdr_size.to_be_bytes());
        out[SEQID..SEQID + 8].copy_from_slice(&self.seqid.to_be_bytes());
        put_text(&mut out, LABEL, &self.label);
        put_text(&mut out, CSUM_ALG, CHECKSUM_ALG);
        out[SALT.0..SALT.0 + SALT.1].copy_from_slice(salt);
        put_text(&mut out, UUID, &self.uuid.hyphenated().to_string());
        put_text(&mut out, SUBSYSTEM, &self.subsystem);
        let offset = match copy {
            HeaderCopy::Primary => 0,
            HeaderCopy::Secondary => self.hdr_size,
        };
        out[HDR_OFFSET..HDR_OFFSET + 8].copy_from_slice(&offset.to_be_bytes());
        let csum = checksum(&out, json_area);
        out[CSUM.0..CSUM.0 + csum.len()].copy_from_slice(&csum);
        out.extend_from_slice(json_area);
        out
    }

    /// Checks the fields that locate and size a copy found at `offset`:
    /// magic, version, recorded offset, size (cryptsetup's
    /// `hdr_disk_sanity_check_pre`).
    pub fn decode_prefix(
        bin: &[u8; BINARY_HEADER_LEN],
        copy: HeaderCopy,
        offset: u64,
    ) -> Result<Prefix, CopyFault> {
        if &bin[..MAGIC_LEN] != copy.magic() {
            return Err(CopyFault::NoMagic);
        }
        let version = u16::from_be_bytes([bin[VERSION], bin[VERSION + 1]]);
        if version != 2 {
            return Err(CopyFault::Version(version));
        }
        let recorded = be_u64(bin, HDR_OFFSET);
        if recorded != offset {
            return Err(CopyFault::Offset {
                recorded,
                actual: offset,
            });
        }
        let hdr_size = be_u64(bin, HDR_SIZE);
        if !ALLOWED_HDR_SIZES.contains(&hdr_size) {
            return Err(CopyFault::Size(hdr_size));
        }
        if copy == HeaderCopy::Secondary && hdr_size != offset {
            return Err(CopyFault::Offset {
                recorded: hdr_size,
                actual: offset,
            });
        }
        Ok(Prefix { hdr_size })
    }

    /// Verifies the checksum over the binary header and the whole JSON area,
    /// then decodes the fields. `decode_prefix` must have accepted `bin`.
    pub fn decode(
        bin: &[u8; BINARY_HEADER_LEN],
        json_area: &[u8],
    ) -> Result<DecodedCopy, CopyFault> {
        let alg =
            text(bin, CSUM_ALG).map_err(|e| CopyFault::Malformed(format!("checksum_alg: {e}")))?;
        if alg != CHECKSUM_ALG {
            return Err(CopyFault::ChecksumAlgorithm(alg));
        }
        let mut zeroed = *bin;
        zeroed[CSUM.0..CSUM.0 + CSUM.1].fill(0);
        let expected = checksum(&zeroed, json_area);
        // Not secret: a plain comparison is fine. The rest of the 64-byte field
        // must be zero, as a 32-byte SHA-256 leaves it.
        if bin[CSUM.0..CSUM.0 + expected.len()] != expected[..]
            || bin[CSUM.0 + expected.len()..CSUM.0 + CSUM.1]
                .iter()
                .any(|&b| b != 0)
        {
            return Err(CopyFault::Checksum);
        }
        let field = |name: &str, at| {
            text(bin, at).map_err(|e| CopyFault::Malformed(format!("{name}: {e}")))
        };
        let uuid_text = field("uuid", UUID)?;
        let uuid = uuid::Uuid::parse_str(&uuid_text)
            .map_err(|e| CopyFault::Malformed(format!("uuid {uuid_text:?}: {e}")))?;
        let mut salt = [0u8; 64];
        salt.copy_from_slice(&bin[SALT.0..SALT.0 + SALT.1]);
        Ok(DecodedCopy {
            header: BinaryHeader {
                hdr_size: be_u64(bin, HDR_SIZE),
                seqid: be_u64(bin, SEQID),
                label: field("label", LABEL)?,
                subsystem: field("subsystem", SUBSYSTEM)?,
                uuid,
            },
            salt,
        })
    }
}

/// SHA-256 over the binary header (checksum field zeroed) and the full JSON
/// area, unused tail included (specification, section 2.2).
fn checksum(bin: &[u8], json_area: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(bin);
    h.update(json_area);
    h.finalize().into()
}

fn be_u64(bin: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bin[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Writes `s` into a zeroed field; callers have checked that it fits with its NUL.
fn put_text(out: &mut [u8], (at, len): (usize, usize), s: &str) {
    debug_assert!(s.len() < len);
    out[at..at + s.len()].copy_from_slice(s.as_bytes());
}

/// A NUL-terminated UTF-8 field.
fn text(bin: &[u8], (at, len): (usize, usize)) -> Result<String, String> {
    let field = &bin[at..at + len];
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| "not NUL-terminated".to_string())?;
    String::from_utf8(field[..end].to_vec()).map_err(|_| "not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BinaryHeader {
        BinaryHeader {
            hdr_size: 0x4000,
            seqid: 7,
            label: "vol-0123".into(),
            subsystem: "nbdcrypt".into(),
            uuid: uuid::Uuid::new_v4(),
        }
    }

    fn split(bytes: &[u8]) -> ([u8; BINARY_HEADER_LEN], &[u8]) {
        let mut bin = [0u8; BINARY_HEADER_LEN];
        bin.copy_from_slice(&bytes[..BINARY_HEADER_LEN]);
        (bin, &bytes[BINARY_HEADER_LEN..])
    }

    #[test]
    fn encodes_the_fields_where_the_specification_puts_them() {
        let h = sample();
        let area = vec![0u8; 0x4000 - BINARY_HEADER_LEN];
        let bytes = h.encode(HeaderCopy::Secondary, &[0x5a; 64], &area);
        assert_eq!(bytes.len(), 0x4000);
        assert_eq!(&bytes[..8], b"SKUL\xba\xbe\x00\x02");
        assert_eq!(&bytes[8..16], &0x4000u64.to_be_bytes());
        assert_eq!(&bytes[16..24], &7u64.to_be_bytes());
        assert_eq!(&bytes[24..33], b"vol-0123\0");
        assert_eq!(&bytes[72..79], b"sha256\0");
        assert_eq!(&bytes[104..168], &[0x5a; 64]);
        assert_eq!(&bytes[168..204], h.uuid.hyphenated().to_string().as_bytes());
        assert_eq!(&bytes[208..217], b"nbdcrypt\0");
        assert_eq!(&bytes[256..264], &0x4000u64.to_be_bytes());
        assert!(bytes[264..448].iter().all(|&b| b == 0));
        assert!(bytes[480..BINARY_HEADER_LEN].iter().all(|&b| b == 0));
    }

    #[test]
    fn decode_inverts_encode_and_checks_the_checksum() {
        let h = sample();
        let mut area = vec![0u8; 0x4000 - BINARY_HEADER_LEN];
        area[..2].copy_from_slice(b"{}");
        let bytes = h.encode(HeaderCopy::Primary, &[1; 64], &area);
        let (bin, json) = split(&bytes);
        assert_eq!(
            BinaryHeader::decode_prefix(&bin, HeaderCopy::Primary, 0)
                .unwrap()
                .hdr_size,
            0x4000
        );
        let decoded = BinaryHeader::decode(&bin, json).unwrap();
        assert_eq!(decoded.header, h);
        assert_eq!(decoded.salt, [1; 64]);

        let mut tampered = json.to_vec();
        tampered[100] = 1;
        assert_eq!(
            BinaryHeader::decode(&bin, &tampered).unwrap_err(),
            CopyFault::Checksum
        );
        let mut bad_bin = bin;
        bad_bin[30] ^= 1;
        assert_eq!(
            BinaryHeader::decode(&bad_bin, json).unwrap_err(),
            CopyFault::Checksum
        );
    }

    #[test]
    fn prefix_checks_magic_version_offset_and_size() {
        let h = sample();
        let area = vec![0u8; 0x4000 - BINARY_HEADER_LEN];
        let (bin, _) = split(&h.encode(HeaderCopy::Primary, &[0; 64], &area));
        assert_eq!(
            BinaryHeader::decode_prefix(&bin, HeaderCopy::Secondary, 0x4000).unwrap_err(),
            CopyFault::NoMagic
        );
        assert_eq!(
            BinaryHeader::decode_prefix(&bin, HeaderCopy::Primary, 0x4000).unwrap_err(),
            CopyFault::Offset {
                recorded: 0,
                actual: 0x4000
            }
        );
        let mut v1 = bin;
        v1[7] = 1;
        assert_eq!(
            BinaryHeader::decode_prefix(&v1, HeaderCopy::Primary, 0).unwrap_err(),
            CopyFault::Version(1)
        );
        let mut odd = bin;
        odd[HDR_SIZE..HDR_SIZE + 8].copy_from_slice(&0x5000u64.to_be_bytes());
        assert_eq!(
            BinaryHeader::decode_prefix(&odd, HeaderCopy::Primary, 0).unwrap_err(),
            CopyFault::Size(0x5000)
        );
    }
}

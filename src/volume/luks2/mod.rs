//! The LUKS2 header of an nbdcrypt volume, as the LUKS2 On-Disk Format
//! Specification describes it, so that `cryptsetup` reads our volumes and
//! dm-crypt can open them with the data key.
//!
//! Layout of a volume (file or block device):
//!
//! ```text
//! 0        primary copy: 4096-byte binary header + JSON area   (hdr_size = 16 KiB)
//! 16 KiB   secondary copy: the same, magic "SKUL\xba\xbe"
//! 32 KiB   keyslots area: empty, room for `cryptsetup luksAddKey`
//! data_offset (16 MiB)   the crypt segment: data_size bytes of AES-XTS sectors
//! ```
//!
//! The JSON holds one fixed-size `crypt` segment (`aes-xts-plain64`), one
//! `pbkdf2` digest of the volume key, no keyslot, and one `nbdcrypt-kms`
//! token carrying the volume key wrapped by the KMS.
//!
//! - [`binary`]: the binary header codec and its checksum.
//! - [`metadata`]: the JSON area, its LUKS2 validity, the segment we serve.
//! - [`digest`]: the pbkdf2 digest that tells a wrong volume key.
//! - [`token`]: our token.

mod binary;
mod digest;
mod metadata;
mod token;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use serde_json::{Map, Value, json};

use crate::secret::SecretBytes;
use crate::volume::backing::device_size;
use binary::{BINARY_HEADER_LEN, BinaryHeader, DecodedCopy};
use digest::Pbkdf2Digest;
use metadata::CryptSegment;

pub use binary::HeaderCopy;
pub use token::KmsToken;

/// Our token type. Not prefixed `luks2-`: the specification reserves that
/// prefix for cryptsetup's own tokens.
pub const TOKEN_TYPE: &str = "nbdcrypt-kms";

/// Where the data segment starts by default: cryptsetup's default, which
/// leaves a 16 MiB - 32 KiB keyslots area, so that `cryptsetup luksAddKey`
/// can add a recovery passphrase later (one 512-bit keyslot takes 252 KiB).
pub const DEFAULT_DATA_OFFSET: u64 = 16 << 20;

/// Size of each metadata copy we format (binary header + 12 KiB of JSON):
/// cryptsetup's default and the smallest the specification allows.
pub const HDR_SIZE: u64 = 16 << 10;

/// The binary header's `subsystem` label, for udev rules and `blkid`.
pub const SUBSYSTEM: &str = "nbdcrypt";

/// aes-xts-plain64 with two AES-256 keys.
pub const VOLUME_KEY_LEN: usize = 64;

/// What [`Header::format`] needs besides the key and the token.
pub struct FormatParams {
    pub uuid: uuid::Uuid,
    /// The volume id (`vol-…`); at most 47 bytes.
    pub label: String,
    /// 512 or 4096.
    pub sector_size: u32,
    /// Start of the data segment: a multiple of 4096, past both metadata
    /// copies; [`DEFAULT_DATA_OFFSET`] unless there is a reason.
    pub data_offset: u64,
    /// Bytes of data: a non-zero multiple of `sector_size`.
    pub data_size: u64,
}

/// What is wrong with a header, one variant per cause the user must act on.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error(
        "not a LUKS volume (no LUKS header at its start nor a LUKS2 secondary header): give the path of an nbdcrypt volume"
    )]
    NotLuks,
    #[error("LUKS version {0} is not supported: nbdcrypt opens only LUKS2 volumes it created")]
    UnsupportedVersion(u16),
    #[error(
        "the volume is truncated: it has {len} bytes but its header describes {needed}; restore it from a backup"
    )]
    Truncated { len: u64, needed: u64 },
    #[error(
        "both LUKS2 header copies are damaged (primary: {primary}; secondary: {secondary}); restore the header from a backup (cryptsetup luksHeaderRestore)"
    )]
    Damaged {
        primary: CopyFault,
        secondary: CopyFault,
    },
    #[error("malformed LUKS2 metadata: {0}")]
    Malformed(String),
    #[error("unsupported LUKS2 data segment: {0}")]
    UnsupportedSegment(String),
    #[error("the LUKS2 header requires features nbdcrypt does not implement ({}), e.g. an unfinished cryptsetup reencrypt: complete that operation with cryptsetup first", .0.join(", "))]
    UnsupportedRequirements(Vec<String>),
    #[error(
        "a LUKS2 volume without an nbdcrypt-kms token, e.g. made by cryptsetup luksFormat: nbdcrypt cannot open it"
    )]
    NoKmsToken,
    #[error(
        "the volume key does not match the header's digest: it is the key of another volume, or the header was replaced"
    )]
    WrongVolumeKey,
    #[error("invalid volume parameters: {0}")]
    InvalidParams(String),
    #[error(
        "the LUKS2 metadata ({len} bytes of JSON) does not fit the {area}-byte JSON area: shorten the key id or the encryption context"
    )]
    JsonTooLarge { len: usize, area: usize },
    #[error("I/O error on the LUKS2 header: {0}")]
    Io(#[from] io::Error),
}

/// Why one metadata copy was not used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CopyFault {
    #[error("no LUKS2 magic")]
    NoMagic,
    #[error("header version {0}")]
    Version(u16),
    #[error("records offset {recorded} but lies at {actual}")]
    Offset { recorded: u64, actual: u64 },
    #[error("header size {0} is not one the specification allows")]
    Size(u64),
    #[error("unsupported checksum algorithm {0:?}")]
    ChecksumAlgorithm(String),
    #[error("checksum mismatch")]
    Checksum,
    #[error("invalid JSON metadata: {0}")]
    Malformed(String),
    #[error("cut short by the end of the device (needs {needed} bytes)")]
    Truncated { needed: u64 },
    #[error("stale: seqid {seqid} is older than the other copy's {current}")]
    Stale { seqid: u64, current: u64 },
}

/// A copy that could not be used while the other could: the header is
/// usable, and the next [`Header::write_to`] rewrites both copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyDamage {
    pub copy: HeaderCopy,
    pub fault: CopyFault,
}

/// A validated LUKS2 header of an nbdcrypt volume.
#[derive(Clone, Debug)]
pub struct Header {
    binary: BinaryHeader,
    /// Salts of the primary and secondary binary headers.
    salts: [[u8; 64]; 2],
    metadata: Value,
    segment: CryptSegment,
    digest: Pbkdf2Digest,
    damage: Option<CopyDamage>,
}

impl Header {
    /// A new header (seqid 1) with the pbkdf2-sha256 digest of volume_key and the token.
    pub fn format(
        params: &FormatParams,
        volume_key: &SecretBytes,
        token: &KmsToken,
    ) -> Result<Self, HeaderError> {
        check_params(params, volume_key)?;
        Self::format_with_digest(params, Pbkdf2Digest::new(volume_key), token)
    }

    /// A new header (seqid 1) for a copy of this volume's data segment under
    /// the same volume key, which the caller never needs to see: this
    /// header's key digest, a new uuid, label and token. Snapshots and their
    /// restores are made this way; the token must wrap the same key (the
    /// KMS's ReEncrypt of this header's token). Keyslots and foreign tokens
    /// do not follow: a recovery passphrase stays with its volume.
    pub fn format_sharing_key(
        &self,
        params: &FormatParams,
        token: &KmsToken,
    ) -> Result<Self, HeaderError> {
        check_layout(params)?;
        if params.sector_size != self.sector_size() || params.data_size != self.data_size() {
            return Err(HeaderError::InvalidParams(format!(
                "a copy under the same key keeps the {}-byte sectors and the {}-byte size",
                self.sector_size(),
                self.data_size()
            )));
        }
        Self::format_with_digest(params, self.digest.clone(), token)
    }

    fn format_with_digest(
        params: &FormatParams,
        digest: Pbkdf2Digest,
        token: &KmsToken,
    ) -> Result<Self, HeaderError> {
        // As cryptsetup's LUKS2_set_keyslots_size: everything between the
        // second copy and the data, capped, in whole 4 KiB blocks.
        let keyslots_size =
            (params.data_offset - 2 * HDR_SIZE).min(metadata::MAX_KEYSLOTS_SIZE) / 4096 * 4096;
        let mut token_obj = Map::new();
        token.store(&mut token_obj);
        let metadata = json!({
            "keyslots": {},
            "tokens": {"0": token_obj},
            "segments": {"0": {
                "type": "crypt",
                "offset": params.data_offset.to_string(),
                "size": params.data_size.to_string(),
                "iv_tweak": "0",
                "encryption": metadata::CIPHER,
                "sector_size": params.sector_size,
            }},
            "digests": {"0": digest.to_json("0")},
            "config": {
                "json_size": (HDR_SIZE - BINARY_HEADER_LEN as u64).to_string(),
                "keyslots_size": keyslots_size.to_string(),
            },
        });
        // Through the reader's own checks: what we format is what we accept.
        let area = metadata::encode_area(&metadata, (HDR_SIZE as usize) - BINARY_HEADER_LEN)?;
        let metadata = metadata::decode_area(&area).map_err(HeaderError::Malformed)?;
        let binary = BinaryHeader {
            hdr_size: HDR_SIZE,
            seqid: 1,
            label: params.label.clone(),
            subsystem: SUBSYSTEM.into(),
            uuid: params.uuid,
        };
        Self::from_parts(binary, [random_salt(), random_salt()], metadata, None)
    }

    /// Reads and validates both copies, uses the valid one with the higher
    /// seqid (reporting the other in [`Header::damage`]), and checks that the
    /// file or block device holds the whole data segment.
    pub fn read_from(file: &File) -> Result<Self, HeaderError> {
        let len = device_size(file)?;
        let primary = read_copy(file, len, HeaderCopy::Primary, 0)?;
        let secondary = match primary.hdr_size {
            Some(hdr_size) => read_copy(file, len, HeaderCopy::Secondary, hdr_size)?.result,
            None => scan_secondary(file, len)?,
        };
        let chosen = match choose(primary.result, secondary) {
            Ok(chosen) => chosen,
            Err((primary, secondary)) => return Err(both_failed(primary, secondary, len)),
        };
        if let Some(d) = &chosen.damage {
            tracing::warn!(copy = %d.copy, "LUKS2 header copy not used: {}; the next header update rewrites it", d.fault);
        }
        let Chosen {
            copy,
            salts,
            damage,
        } = chosen;
        let header = Self::from_parts(copy.decoded.header, salts, copy.metadata, damage)?;
        let needed = header.segment.offset + header.segment.size; // checked in crypt_segment
        if len < needed {
            return Err(HeaderError::Truncated { len, needed });
        }
        Ok(header)
    }

    /// Writes both copies with seqid + 1: primary, fdatasync, secondary,
    /// fdatasync. This also repairs a copy that [`Header::read_from`] found
    /// damaged.
    ///
    /// The specification (section 4) asks that at least one copy be valid at
    /// every instant, and a reader uses the valid copy with the higher seqid
    /// (section 2.1). So the primary is written whole and made durable before
    /// the secondary is touched: a crash while writing the primary leaves it
    /// torn (bad checksum) or old, and the intact secondary holds the previous
    /// state; a crash while writing the secondary leaves the durable primary,
    /// whose higher seqid wins over whatever the secondary holds. Without the
    /// fdatasync between them the device could reorder the two writes and
    /// tear both copies at once. The caller serialises updates (one writer
    /// per volume, e.g. under an exclusive lock).
    pub fn write_to(&mut self, file: &File) -> Result<(), HeaderError> {
        let area_len = (self.binary.hdr_size as usize) - BINARY_HEADER_LEN;
        let area = metadata::encode_area(&self.metadata, area_len)?;
        self.binary.seqid = self.binary.seqid.checked_add(1).ok_or_else(|| {
            HeaderError::Malformed("seqid cannot be increased past 2^64-1".into())
        })?;
        let primary = self
            .binary
            .encode(HeaderCopy::Primary, &self.salts[0], &area);
        file.write_all_at(&primary, 0)?;
        file.sync_data()?;
        let secondary = self
            .binary
            .encode(HeaderCopy::Secondary, &self.salts[1], &area);
        file.write_all_at(&secondary, self.binary.hdr_size)?;
        file.sync_data()?;
        self.damage = None;
        Ok(())
    }

    pub fn uuid(&self) -> uuid::Uuid {
        self.binary.uuid
    }

    pub fn label(&self) -> &str {
        &self.binary.label
    }

    pub fn subsystem(&self) -> &str {
        &self.binary.subsystem
    }

    pub fn sector_size(&self) -> u32 {
        self.segment.sector_size
    }

    pub fn data_offset(&self) -> u64 {
        self.segment.offset
    }

    pub fn data_size(&self) -> u64 {
        self.segment.size
    }

    /// Always `aes-xts-plain64`: a header with any other cipher is refused
    /// when read.
    pub fn cipher(&self) -> &str {
        metadata::CIPHER
    }

    pub fn seqid(&self) -> u64 {
        self.binary.seqid
    }

    /// Size of one metadata copy (binary header + JSON area).
    pub fn hdr_size(&self) -> u64 {
        self.binary.hdr_size
    }

    /// The copy that [`Header::read_from`] could not use, if any.
    pub fn damage(&self) -> Option<&CopyDamage> {
        self.damage.as_ref()
    }

    pub fn kms_token(&self) -> Result<KmsToken, HeaderError> {
        load_kms_token(&self.metadata)
    }

    /// Replaces our token's fields, keeping its id and any field we do not know.
    pub fn set_kms_token(&mut self, token: &KmsToken) {
        let id = kms_token_id(&self.metadata)
            .expect("a Header always holds exactly one token of ours")
            .to_owned();
        let obj = self.metadata["tokens"][&id].as_object_mut();
        token.store(obj.expect("validated: tokens are objects"));
    }

    /// Adds a token of another type (not ours, not cryptsetup's `luks2-`
    /// ones) bound to no keyslot, or replaces the one of that type: room for
    /// facts that cryptsetup shows in `luksDump` and otherwise leaves alone,
    /// such as where a snapshot came from. Written by the next
    /// [`Header::write_to`], which refuses metadata too large for the area.
    pub fn set_aux_token(
        &mut self,
        kind: &str,
        mut fields: Map<String, Value>,
    ) -> Result<(), HeaderError> {
        if kind == TOKEN_TYPE || kind.starts_with("luks2-") || kind.is_empty() {
            return Err(HeaderError::InvalidParams(format!(
                "token type {kind:?} is reserved"
            )));
        }
        fields.insert("type".into(), kind.into());
        fields.insert("keyslots".into(), Value::Array(Vec::new()));
        let id = match metadata::ids_of_type(&self.metadata, "tokens", kind).first() {
            Some(id) => id.to_string(),
            None => (0..)
                .map(|n: u32| n.to_string())
                .find(|id| self.metadata["tokens"].get(id).is_none())
                .expect("fewer than 2^32 tokens"),
        };
        let tokens = self.metadata["tokens"]
            .as_object_mut()
            .expect("validated: tokens is an object");
        tokens.insert(id, Value::Object(fields));
        Ok(())
    }

    /// The fields of the token of type `kind` that [`Header::set_aux_token`]
    /// added, if any.
    pub fn aux_token(&self, kind: &str) -> Option<&Map<String, Value>> {
        let id = *metadata::ids_of_type(&self.metadata, "tokens", kind).first()?;
        self.metadata["tokens"][id].as_object()
    }

    /// Constant-time check of the key against the digest.
    pub fn verify_volume_key(&self, key: &SecretBytes) -> Result<(), HeaderError> {
        if key.len() == VOLUME_KEY_LEN && self.digest.matches(key) {
            Ok(())
        } else {
            Err(HeaderError::WrongVolumeKey)
        }
    }

    /// The JSON metadata, for `volume inspect --json`.
    pub fn metadata(&self) -> &Value {
        &self.metadata
    }

    /// The nbdcrypt view of a valid LUKS2 copy: our token first (without it
    /// the volume is not ours, whatever else it holds), the requirements, the
    /// segment and its digest.
    fn from_parts(
        binary: BinaryHeader,
        salts: [[u8; 64]; 2],
        metadata: Value,
        damage: Option<CopyDamage>,
    ) -> Result<Self, HeaderError> {
        load_kms_token(&metadata)?;
        let required = metadata::mandatory_requirements(&metadata);
        if !required.is_empty() {
            return Err(HeaderError::UnsupportedRequirements(required));
        }
        let segment = metadata::crypt_segment(&metadata)?;
        if segment.offset < 2 * binary.hdr_size {
            return Err(HeaderError::UnsupportedSegment(format!(
                "the data segment starts at {}, inside the header (a detached header?)",
                segment.offset
            )));
        }
        let digest = segment_digest(&metadata)?;
        Ok(Self {
            binary,
            salts,
            metadata,
            segment,
            digest,
            damage,
        })
    }
}

/// The id of our token; a volume has exactly one.
fn kms_token_id(metadata: &Value) -> Result<&str, HeaderError> {
    match metadata::ids_of_type(metadata, "tokens", TOKEN_TYPE)[..] {
        [] => Err(HeaderError::NoKmsToken),
        [id] => Ok(id),
        ref ids => Err(HeaderError::Malformed(format!(
            "{} {TOKEN_TYPE} tokens ({}); a volume has one",
            ids.len(),
            ids.join(", ")
        ))),
    }
}

fn load_kms_token(metadata: &Value) -> Result<KmsToken, HeaderError> {
    let id = kms_token_id(metadata)?;
    let obj = metadata["tokens"][id].as_object();
    KmsToken::load(id, obj.expect("validated: tokens are objects"))
}

/// The digest bound to the data segment: the one the volume key must match.
fn segment_digest(metadata: &Value) -> Result<Pbkdf2Digest, HeaderError> {
    let digests = metadata["digests"]
        .as_object()
        .expect("validated: digests is an object");
    let bound: Vec<_> = digests
        .iter()
        .filter(|(_, d)| d["segments"].as_array().is_some_and(|s| !s.is_empty()))
        .collect();
    match bound[..] {
        [(id, d)] => Pbkdf2Digest::from_json(d)
            .map_err(|e| HeaderError::Malformed(format!("digest {id}: {e}"))),
        [] => Err(HeaderError::Malformed(
            "no digest for the data segment".into(),
        )),
        _ => Err(HeaderError::Malformed(format!(
            "{} digests for the data segment",
            bound.len()
        ))),
    }
}

fn check_params(p: &FormatParams, key: &SecretBytes) -> Result<(), HeaderError> {
    check_layout(p)?;
    let bad = |why: String| Err(HeaderError::InvalidParams(why));
    if key.len() != VOLUME_KEY_LEN {
        return bad(format!(
            "a {}-byte volume key (aes-xts-plain64 needs {VOLUME_KEY_LEN})",
            key.len()
        ));
    }
    let (k1, k2) = key.expose().split_at(VOLUME_KEY_LEN / 2);
    if crate::secret::constant_time_eq(k1, k2) {
        return bad("a volume key whose two XTS halves are equal".into());
    }
    Ok(())
}

/// The geometry rules of [`FormatParams`], whatever the key.
fn check_layout(p: &FormatParams) -> Result<(), HeaderError> {
    let bad = |why: String| Err(HeaderError::InvalidParams(why));
    if p.sector_size != 512 && p.sector_size != 4096 {
        return bad(format!("sector size {} (use 512 or 4096)", p.sector_size));
    }
    if !p.data_offset.is_multiple_of(4096) || p.data_offset < 2 * HDR_SIZE {
        return bad(format!(
            "data offset {} (a multiple of 4096 of at least {})",
            p.data_offset,
            2 * HDR_SIZE
        ));
    }
    if p.data_size == 0 || !p.data_size.is_multiple_of(u64::from(p.sector_size)) {
        return bad(format!(
            "size {} is not a non-zero multiple of the {}-byte sector",
            p.data_size, p.sector_size
        ));
    }
    if p.data_offset
        .checked_add(p.data_size)
        .is_none_or(|end| end > i64::MAX as u64)
    {
        return bad(format!("size {} is too large", p.data_size));
    }
    if p.label.len() > binary::MAX_LABEL_LEN || p.label.contains('\0') {
        return bad(format!(
            "label {:?} (at most {} bytes, no NUL)",
            p.label,
            binary::MAX_LABEL_LEN
        ));
    }
    Ok(())
}

fn random_salt() -> [u8; 64] {
    let mut salt = [0u8; 64];
    getrandom::fill(&mut salt).expect("the OS random number generator failed");
    salt
}

/// One copy as read: its size when the binary header was sane enough to
/// give it, and either the decoded copy or why it is unusable.
struct CopyRead {
    hdr_size: Option<u64>,
    result: Result<ValidCopy, CopyFault>,
}

#[derive(Debug)]
struct ValidCopy {
    decoded: DecodedCopy,
    metadata: Value,
}

fn read_copy(file: &File, len: u64, copy: HeaderCopy, offset: u64) -> io::Result<CopyRead> {
    let mut read = CopyRead {
        hdr_size: None,
        result: Err(CopyFault::NoMagic),
    };
    let mut bin = [0u8; BINARY_HEADER_LEN];
    let available = len.saturating_sub(offset).min(BINARY_HEADER_LEN as u64) as usize;
    file.read_exact_at(&mut bin[..available], offset)?;
    if available < BINARY_HEADER_LEN {
        if copy.starts(&bin[..available]) {
            read.result = Err(CopyFault::Truncated {
                needed: offset + BINARY_HEADER_LEN as u64,
            });
        }
        return Ok(read);
    }
    let hdr_size = match BinaryHeader::decode_prefix(&bin, copy, offset) {
        Ok(prefix) => prefix.hdr_size,
        Err(fault) => {
            read.result = Err(fault);
            return Ok(read);
        }
    };
    read.hdr_size = Some(hdr_size);
    if offset + hdr_size > len {
        read.result = Err(CopyFault::Truncated {
            needed: offset + hdr_size,
        });
        return Ok(read);
    }
    let mut area = vec![0u8; hdr_size as usize - BINARY_HEADER_LEN];
    file.read_exact_at(&mut area, offset + BINARY_HEADER_LEN as u64)?;
    read.result = BinaryHeader::decode(&bin, &area).and_then(|decoded| {
        let metadata = metadata::decode_area(&area).map_err(CopyFault::Malformed)?;
        Ok(ValidCopy { decoded, metadata })
    });
    Ok(read)
}

/// With no usable primary to give its size, the secondary is searched for
/// at every offset the specification allows (section 2.1, table 1), as
/// cryptsetup does; the first one that is valid wins.
fn scan_secondary(file: &File, len: u64) -> io::Result<Result<ValidCopy, CopyFault>> {
    let mut first_fault = CopyFault::NoMagic;
    for offset in binary::ALLOWED_HDR_SIZES
        .into_iter()
        .take_while(|&o| o < len)
    {
        match read_copy(file, len, HeaderCopy::Secondary, offset)?.result {
            Ok(copy) => return Ok(Ok(copy)),
            Err(CopyFault::NoMagic) => {}
            Err(fault) if first_fault == CopyFault::NoMagic => first_fault = fault,
            Err(_) => {}
        }
    }
    Ok(Err(first_fault))
}

/// The copy to use, the salts to write both copies with, and the damage.
struct Chosen {
    copy: ValidCopy,
    salts: [[u8; 64]; 2],
    damage: Option<CopyDamage>,
}

/// The valid copy with the higher seqid (specification, section 2.1), the
/// primary when they are equal; a copy that is not used is reported. The
/// specification asks for a fresh salt when a damaged copy is rewritten.
fn choose(
    primary: Result<ValidCopy, CopyFault>,
    secondary: Result<ValidCopy, CopyFault>,
) -> Result<Chosen, (CopyFault, CopyFault)> {
    let damaged = |copy, fault| Some(CopyDamage { copy, fault });
    let stale = |old: &ValidCopy, new: &ValidCopy| CopyFault::Stale {
        seqid: old.decoded.header.seqid,
        current: new.decoded.header.seqid,
    };
    match (primary, secondary) {
        (Ok(p), Ok(s)) => {
            let salts = [p.decoded.salt, s.decoded.salt];
            let (p_seq, s_seq) = (p.decoded.header.seqid, s.decoded.header.seqid);
            let damage = if s_seq > p_seq {
                damaged(HeaderCopy::Primary, stale(&p, &s))
            } else if p_seq > s_seq {
                damaged(HeaderCopy::Secondary, stale(&s, &p))
            } else {
                None
            };
            let copy = if s_seq > p_seq { s } else { p };
            Ok(Chosen {
                copy,
                salts,
                damage,
            })
        }
        (Ok(p), Err(fault)) => Ok(Chosen {
            salts: [p.decoded.salt, random_salt()],
            copy: p,
            damage: damaged(HeaderCopy::Secondary, fault),
        }),
        (Err(fault), Ok(s)) => Ok(Chosen {
            salts: [random_salt(), s.decoded.salt],
            copy: s,
            damage: damaged(HeaderCopy::Primary, fault),
        }),
        (Err(p), Err(s)) => Err((p, s)),
    }
}

/// The one error that best says why neither copy could be used.
fn both_failed(primary: CopyFault, secondary: CopyFault, len: u64) -> HeaderError {
    match (primary, secondary) {
        (CopyFault::Version(v), _) => HeaderError::UnsupportedVersion(v),
        (CopyFault::NoMagic, CopyFault::NoMagic) => HeaderError::NotLuks,
        (CopyFault::Truncated { needed }, _) | (_, CopyFault::Truncated { needed }) => {
            HeaderError::Truncated { len, needed }
        }
        // Both checksums hold: the metadata was written this way.
        (CopyFault::Malformed(why), CopyFault::Malformed(_)) => HeaderError::Malformed(why),
        (primary, secondary) => HeaderError::Damaged { primary, secondary },
    }
}

#[cfg(test)]
mod tests;

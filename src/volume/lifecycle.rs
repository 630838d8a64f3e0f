//! Creating a volume and unlocking it: the envelope around the volume key.
//!
//! The volume key is a KMS data key. It is generated under a CMK with the
//! encryption context `{"aws:rds:db-id": DB, "aws:ebs:id": VOL}`, and only its
//! wrapped form is kept, in the header's `nbdcrypt-kms` token. Unlocking builds
//! the context afresh from the caller's DB id and the volume id in the
//! header's label, so a volume attached by another DB instance, or a token
//! moved between volumes, fails inside the KMS (and is audited there).

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::crypto::SectorCipher;
use crate::kms::{EncryptionContext, Kms};
use crate::secret::{SecretBytes, harden_process};
use crate::volume::backing::{Backing, BackingKind, device_size};
use crate::volume::luks2::{DEFAULT_DATA_OFFSET, FormatParams, Header, KmsToken, VOLUME_KEY_LEN};
use crate::volume::{Volume, VolumeError};

/// What `volume create` needs.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Bytes of data; for a block device, `None` takes all of it.
    pub size: Option<u64>,
    pub sector_size: u32,
    /// The CMK: key id, ARN or alias.
    pub kms_key: String,
    pub db_id: String,
    pub vol_id: String,
    /// Overwrite a file or device that holds data.
    pub force: bool,
    /// Reserve a file's space now (a device has its space already).
    pub preallocate: bool,
}

/// How a volume is attached.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// The DB instance that attaches the volume: half of the encryption context.
    pub db_id: String,
    pub read_only: bool,
    /// Let TRIM punch holes; it reveals which blocks are free, as dm-crypt's
    /// `--allow-discards` documents.
    pub allow_discards: bool,
}

/// Creates a fresh volume that reads as zeros and returns its header.
pub fn create(path: &Path, kms: &dyn Kms, opts: &CreateOptions) -> Result<Header, VolumeError> {
    check_id("--db-id", &opts.db_id, "db-")?;
    check_id("--vol-id", &opts.vol_id, "vol-")?;
    if opts.sector_size != 512 && opts.sector_size != 4096 {
        return Err(VolumeError::BadSectorSize(opts.sector_size));
    }
    if let Some(size) = opts.size {
        check_size(size, opts.sector_size)?;
    }
    let io = |source| VolumeError::Io {
        path: path.to_owned(),
        source,
    };
    let (file, created) = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => (f, true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io)?;
            if !opts.force && holds_data(&f).map_err(io)? {
                return Err(VolumeError::HoldsData(path.to_owned()));
            }
            (f, false)
        }
        Err(e) => return Err(io(e)),
    };
    let result = format(path, file, kms, opts);
    if result.is_err() && created {
        // Nothing that looks like a volume may be left behind a failure.
        let _ = std::fs::remove_file(path);
    }
    result
}

fn format(
    path: &Path,
    file: File,
    kms: &dyn Kms,
    opts: &CreateOptions,
) -> Result<Header, VolumeError> {
    let io = |source| VolumeError::Io {
        path: path.to_owned(),
        source,
    };
    let backing = Backing::new(file).map_err(io)?;
    let size = match (backing.kind(), opts.size) {
        (BackingKind::File, None) => return Err(VolumeError::SizeRequired(path.to_owned())),
        (BackingKind::File, Some(size)) => size,
        (BackingKind::BlockDevice, asked) => {
            let available = backing
                .len()
                .map_err(io)?
                .saturating_sub(DEFAULT_DATA_OFFSET);
            let size = asked
                .unwrap_or(available / u64::from(opts.sector_size) * u64::from(opts.sector_size));
            if size > available {
                return Err(VolumeError::DeviceTooSmall {
                    path: path.to_owned(),
                    size,
                    available,
                });
            }
            check_size(size, opts.sector_size)?;
            size
        }
    };

    let context = EncryptionContext::for_volume(&opts.db_id, &opts.vol_id);
    let data_key = kms
        .generate_data_key(&opts.kms_key, &context, VOLUME_KEY_LEN)
        .map_err(|source| VolumeError::DataKey {
            key_id: opts.kms_key.clone(),
            source,
        })?;
    // Refuses a key whose halves are equal before anything is written.
    SectorCipher::new(&data_key.plaintext, opts.sector_size as usize).map_err(|source| {
        VolumeError::Cipher {
            path: path.to_owned(),
            source,
        }
    })?;
    let token = KmsToken {
        key_id: data_key.key_id.clone(),
        encryption_context: context
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ciphertext_blob: data_key.ciphertext_blob.clone(),
    };
    let params = FormatParams {
        uuid: uuid::Uuid::new_v4(),
        label: opts.vol_id.clone(),
        sector_size: opts.sector_size,
        data_offset: DEFAULT_DATA_OFFSET,
        data_size: size,
    };
    let header_err = |source| VolumeError::Header {
        path: path.to_owned(),
        source,
    };
    let mut header = Header::format(&params, &data_key.plaintext, &token).map_err(header_err)?;

    // The data area must read as zeros, like a new EBS volume: a file is cut
    // to nothing and regrown sparse, or reserved (unwritten extents read as
    // zeros too); a device's old contents are zeroed.
    match backing.kind() {
        BackingKind::File => {
            backing.file().set_len(0).map_err(io)?;
            let len = DEFAULT_DATA_OFFSET + size;
            if opts.preallocate
                && let Err(source) = backing.reserve(len)
            {
                // What the file system reserved before it ran out is given
                // back: the file's old contents are gone already.
                let _ = backing.file().set_len(0);
                return Err(VolumeError::Reserve {
                    path: path.to_owned(),
                    len,
                    source,
                });
            }
            backing.file().set_len(len).map_err(io)?;
        }
        BackingKind::BlockDevice => {
            // A device always zeroes, one way or the other.
            backing
                .zero_range(0, DEFAULT_DATA_OFFSET + size)
                .map_err(io)?;
        }
    }
    header.write_to(backing.file()).map_err(header_err)?;
    backing.file().sync_all().map_err(io)?;
    Ok(header)
}

/// Reads the header and has the KMS unwrap the volume key under the context
/// of `db_id` and the header's volume id; checks the key against the digest.
pub fn unlock(
    path: &Path,
    file: &File,
    kms: &dyn Kms,
    db_id: &str,
) -> Result<(Header, SecretBytes), VolumeError> {
    harden_process();
    let header = read_header(path, file)?;
    let header_err = |source| VolumeError::Header {
        path: path.to_owned(),
        source,
    };
    let token = header.kms_token().map_err(header_err)?;
    let context = EncryptionContext::for_volume(db_id, header.label());
    let decrypted = kms
        .decrypt(&token.ciphertext_blob, &context, Some(&token.key_id))
        .map_err(|source| VolumeError::Unlock {
            key_id: token.key_id.clone(),
            context: context.clone(),
            source,
        })?;
    header
        .verify_volume_key(&decrypted.plaintext)
        .map_err(|_| VolumeError::KeyMismatch(path.to_owned()))?;
    // The context the KMS accepted is the one built from the label and the
    // caller; the copy stored in the token must say the same, or it was edited.
    let stored: EncryptionContext = token.encryption_context.clone().into_iter().collect();
    if stored != context {
        return Err(VolumeError::TokenEdited {
            path: path.to_owned(),
            stored,
            actual: context,
        });
    }
    Ok((header, decrypted.plaintext))
}

/// Re-wraps the volume key with ReEncrypt: under the newest material of its
/// CMK, or under `new_key`. The data is not touched; the key never leaves the
/// KMS. The header update is LUKS2's two-copy write, so a crash leaves the
/// old or the new token, both of which unwrap the same volume key.
pub fn rekey(
    path: &Path,
    kms: &dyn Kms,
    db_id: &str,
    new_key: Option<&str>,
) -> Result<Header, VolumeError> {
    let io = |source| VolumeError::Io {
        path: path.to_owned(),
        source,
    };
    let backing = Backing::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?,
    )
    .map_err(io)?;
    backing.lock(true).map_err(io)?;
    // Unlocking first proves the header intact and the caller entitled.
    let (mut header, _key) = unlock(path, backing.file(), kms, db_id)?;
    let mut token = header.kms_token().map_err(|source| VolumeError::Header {
        path: path.to_owned(),
        source,
    })?;
    let context = EncryptionContext::for_volume(db_id, header.label());
    let destination = new_key.unwrap_or(&token.key_id).to_owned();
    let re = kms
        .re_encrypt(&token.ciphertext_blob, &context, &destination, &context)
        .map_err(|source| VolumeError::Rewrap {
            key_id: destination.clone(),
            source,
        })?;
    token.key_id = re.key_id;
    token.ciphertext_blob = re.ciphertext_blob;
    header.set_kms_token(&token);
    header
        .write_to(backing.file())
        .map_err(|source| VolumeError::Header {
            path: path.to_owned(),
            source,
        })?;
    Ok(header)
}

/// The header alone, for `inspect`: no KMS call, no key.
pub fn read_header(path: &Path, file: &File) -> Result<Header, VolumeError> {
    Header::read_from(file).map_err(|source| VolumeError::Header {
        path: path.to_owned(),
        source,
    })
}

impl Volume {
    /// Opens and unlocks a volume for I/O.
    pub fn open(path: &Path, kms: &dyn Kms, opts: &AttachOptions) -> Result<Self, VolumeError> {
        let volume = Self::open_and_unlock(path, kms, opts);
        // Unlocking left copies of keys in the stack frames it used.
        crate::secret::scrub_stack();
        volume
    }

    #[inline(never)]
    fn open_and_unlock(
        path: &Path,
        kms: &dyn Kms,
        opts: &AttachOptions,
    ) -> Result<Self, VolumeError> {
        let io = |source| VolumeError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(io)?;
        let backing = Backing::new(file).map_err(io)?;
        backing.lock(!opts.read_only).map_err(io)?;
        let (header, key) = unlock(path, backing.file(), kms, &opts.db_id)?;
        let cipher = SectorCipher::new(&key, header.sector_size() as usize).map_err(|source| {
            VolumeError::Cipher {
                path: path.to_owned(),
                source,
            }
        })?;
        drop(key);
        Ok(Volume::assemble(
            path.to_owned(),
            backing,
            header,
            cipher,
            opts,
        ))
    }
}

/// An existing file holds data if it is not empty; a device if its first MiB
/// is not all zeros (where any partition table, file system or LUKS header
/// would be).
fn holds_data(file: &File) -> std::io::Result<bool> {
    if file.metadata()?.file_type().is_file() {
        return Ok(file.metadata()?.len() > 0);
    }
    let probe = device_size(file)?.min(1 << 20) as usize;
    let mut buf = vec![0u8; probe];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, 0)?;
    Ok(buf.iter().any(|&b| b != 0))
}

fn check_size(size: u64, sector_size: u32) -> Result<(), VolumeError> {
    if size == 0 || !size.is_multiple_of(u64::from(sector_size)) {
        return Err(VolumeError::BadSize { size, sector_size });
    }
    Ok(())
}

/// AWS ids are a prefix and letters or digits (`db-CQYSMDPBRZ7BPMH7Y3RTDG5QY`,
/// `vol-ad8c6542`); anything else is refused before it reaches a header.
pub(crate) fn check_id(
    what: &'static str,
    value: &str,
    prefix: &'static str,
) -> Result<(), VolumeError> {
    let rest = value.strip_prefix(prefix).unwrap_or("");
    if rest.is_empty() || rest.len() > 64 || !rest.chars().all(|c| c.is_ascii_alphanumeric()) {
        let expected = if prefix == "db-" {
            "db- followed by letters and digits"
        } else {
            "vol- followed by letters and digits"
        };
        return Err(VolumeError::BadId {
            what,
            value: value.to_owned(),
            expected,
        });
    }
    Ok(())
}

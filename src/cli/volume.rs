//! `nbdcrypt volume …`: create, inspect, import, export and break-glass key
//! export of encrypted volumes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::json;

use super::{CliResult, Global, open_kms, parse_size, progress_bar};
use crate::volume::{self, AttachOptions, CreateOptions, Volume, VolumeError};

#[derive(clap::Args, Debug)]
pub struct VolumeArgs {
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create an encrypted volume in a new file (sparse, unless
    /// --preallocate) or on a block device.
    Create {
        /// The file or block device to create the volume in.
        path: PathBuf,
        /// Bytes of data, with an optional K/M/G/T suffix (powers of 1024).
        /// Required for a file; a device defaults to all of it.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// The customer master key that wraps the data key: key id, ARN or alias.
        #[arg(long, value_name = "KEY")]
        kms_key: String,
        /// The DB instance the volume belongs to (encryption context).
        #[arg(long, value_name = "DB_ID")]
        db_id: String,
        /// The volume id (encryption context, and the NBD export name).
        #[arg(long, value_name = "VOL_ID")]
        vol_id: String,
        /// Encryption sector size in bytes.
        #[arg(long, default_value_t = 4096, value_parser = parse_sector_size)]
        sector_size: u32,
        /// Overwrite a file or device that already holds data.
        #[arg(long)]
        force: bool,
        /// Reserve the file's space now (fallocate, like qemu-img's
        /// preallocation=falloc), as a thick volume: on a file system that
        /// overwrites in place (ext4, XFS) a write then cannot fail for lack
        /// of space, and first writes skip its block allocation. TRIM and
        /// write-zeroes under --allow-discards give space back, and a
        /// snapshot that shares the file's blocks (reflink) makes later
        /// writes need new space. A device has its space already.
        #[arg(long)]
        preallocate: bool,
    },
    /// Show a volume's header: ids, cipher, sizes, KMS key and context. Needs no key.
    Inspect { path: PathBuf },
    /// Copy a raw image into the volume (from offset 0).
    Import {
        path: PathBuf,
        /// The raw image (file or device) to copy in.
        #[arg(long, value_name = "RAW")]
        from: PathBuf,
        /// The DB instance attaching the volume.
        #[arg(long, value_name = "DB_ID")]
        db_id: String,
    },
    /// Copy the volume's plaintext into a new raw image (sparse).
    Export {
        path: PathBuf,
        /// The raw image to create; an existing file is never overwritten.
        #[arg(long, value_name = "RAW")]
        to: PathBuf,
        #[arg(long, value_name = "DB_ID")]
        db_id: String,
    },
    /// Re-wrap the volume key under the newest material of its CMK, or under
    /// another CMK (ReEncrypt: the key never leaves the KMS, no data is
    /// rewritten). The volume must not be in use.
    Rekey {
        path: PathBuf,
        #[arg(long, value_name = "DB_ID")]
        db_id: String,
        /// Move the volume to this CMK (key id, ARN or alias).
        #[arg(long, value_name = "KEY")]
        kms_key: Option<String>,
    },
    /// Break glass: write the raw volume key to a new 0600 file (audited), as
    /// `cryptsetup luksDump --dump-volume-key` does. Anyone holding the file
    /// can decrypt the volume.
    ExportKey {
        path: PathBuf,
        /// The key file to create; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[arg(long, value_name = "DB_ID")]
        db_id: String,
    },
}

pub fn run(args: VolumeArgs, global: &Global) -> CliResult {
    match args.command {
        VolumeCommand::Create {
            path,
            size,
            kms_key,
            db_id,
            vol_id,
            sector_size,
            force,
            preallocate,
        } => {
            let kms = open_kms(global)?;
            let opts = CreateOptions {
                size,
                sector_size,
                kms_key,
                db_id,
                vol_id,
                force,
                preallocate,
            };
            let header = volume::create(&path, &kms, &opts)?;
            if global.json {
                println!("{}", inspect_json(&path, &header)?);
            } else {
                println!(
                    "created {} on {}: {} bytes, sector size {}, data key wrapped by {}",
                    header.label(),
                    path.display(),
                    header.data_size(),
                    header.sector_size(),
                    header.kms_token()?.key_id
                );
            }
            Ok(())
        }
        VolumeCommand::Inspect { path } => {
            let file = File::open(&path).map_err(|source| VolumeError::Io {
                path: path.clone(),
                source,
            })?;
            let header = volume::read_header(&path, &file)?;
            if global.json {
                println!("{}", inspect_json(&path, &header)?);
            } else {
                print_inspect(&path, &header)?;
            }
            Ok(())
        }
        VolumeCommand::Import { path, from, db_id } => {
            let kms = open_kms(global)?;
            let vol = attach(&path, &kms, db_id, false)?;
            let image = File::open(&from).map_err(|source| VolumeError::Io {
                path: from.clone(),
                source,
            })?;
            let bar = progress_bar(global, vol.size(), "import");
            let copied = vol.import(&image, &from, &|done| bar.set_position(done))?;
            bar.finish_and_clear();
            report_copy(global, "imported", copied, &from, &path);
            Ok(())
        }
        VolumeCommand::Export { path, to, db_id } => {
            let kms = open_kms(global)?;
            let vol = attach(&path, &kms, db_id, true)?;
            // The plaintext of the whole volume: only its owner may read it.
            let out = create_new(&to, 0o600)?;
            out.set_len(vol.size()).map_err(|source| VolumeError::Io {
                path: to.clone(),
                source,
            })?;
            let bar = progress_bar(global, vol.size(), "export");
            let result = vol.export(&out, &to, &|done| bar.set_position(done));
            bar.finish_and_clear();
            if result.is_err() {
                let _ = std::fs::remove_file(&to);
            }
            report_copy(global, "exported", result?, &path, &to);
            Ok(())
        }
        VolumeCommand::Rekey {
            path,
            db_id,
            kms_key,
        } => {
            let kms = open_kms(global)?;
            let header = volume::rekey(&path, &kms, &db_id, kms_key.as_deref())?;
            let key_id = header.kms_token()?.key_id;
            if global.json {
                println!(
                    "{}",
                    json!({ "path": path, "volume_id": header.label(), "kms_key_id": key_id, "seqid": header.seqid() })
                );
            } else {
                println!("re-wrapped the key of {} under {key_id}", header.label());
            }
            Ok(())
        }
        VolumeCommand::ExportKey { path, out, db_id } => {
            let kms = open_kms(global)?;
            let file = File::open(&path).map_err(|source| VolumeError::Io {
                path: path.clone(),
                source,
            })?;
            let (header, key) = volume::unlock(&path, &file, &kms, &db_id)?;
            let mut key_file = create_new(&out, 0o600)?;
            let written = key_file
                .write_all(key.expose())
                .and_then(|()| key_file.sync_all());
            if let Err(source) = written {
                let _ = std::fs::remove_file(&out);
                return Err(VolumeError::Io { path: out, source }.into());
            }
            eprintln!(
                "nbdcrypt: wrote the raw volume key of {} to {} (0600): anyone holding that file can decrypt the volume; destroy it when done",
                header.label(),
                out.display()
            );
            Ok(())
        }
    }
}

fn attach(
    path: &Path,
    kms: &dyn crate::kms::Kms,
    db_id: String,
    read_only: bool,
) -> Result<Volume, VolumeError> {
    Volume::open(
        path,
        kms,
        &AttachOptions {
            db_id,
            read_only,
            allow_discards: false,
        },
    )
}

/// A new file with the given mode; refuses to replace anything.
fn create_new(path: &Path, mode: u32) -> Result<File, VolumeError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                VolumeError::OutputExists(path.to_owned())
            } else {
                VolumeError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })
}

fn report_copy(global: &Global, verb: &str, bytes: u64, from: &Path, to: &Path) {
    if global.json {
        println!(
            "{}",
            json!({ "result": verb, "bytes": bytes, "from": from, "to": to })
        );
    } else {
        println!(
            "{verb} {bytes} bytes from {} to {}",
            from.display(),
            to.display()
        );
    }
}

fn inspect_json(
    path: &Path,
    header: &volume::luks2::Header,
) -> Result<serde_json::Value, super::CliError> {
    let token = header.kms_token()?;
    Ok(json!({
        "path": path,
        "format": "LUKS2",
        "uuid": header.uuid().to_string(),
        "volume_id": header.label(),
        "cipher": header.cipher(),
        "key_bits": volume::luks2::VOLUME_KEY_LEN * 8,
        "sector_size": header.sector_size(),
        "data_offset": header.data_offset(),
        "size": header.data_size(),
        "kms_key_id": token.key_id,
        "encryption_context": token.encryption_context,
        "seqid": header.seqid(),
        "metadata": header.metadata(),
    }))
}

fn print_inspect(path: &Path, header: &volume::luks2::Header) -> CliResult {
    let token = header.kms_token()?;
    let context = serde_json::to_string(&token.encryption_context)?;
    let rows = [
        ("path", path.display().to_string()),
        ("format", "LUKS2".to_owned()),
        ("uuid", header.uuid().to_string()),
        ("volume id", header.label().to_owned()),
        (
            "cipher",
            format!(
                "{}, {}-bit key",
                header.cipher(),
                volume::luks2::VOLUME_KEY_LEN * 8
            ),
        ),
        ("sector size", header.sector_size().to_string()),
        ("data offset", header.data_offset().to_string()),
        (
            "size",
            format!(
                "{} bytes ({})",
                header.data_size(),
                human_bytes(header.data_size())
            ),
        ),
        ("kms key", token.key_id),
        ("context", context),
        ("header seqid", header.seqid().to_string()),
    ];
    for (name, value) in rows {
        println!("{name:<14} {value}");
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn parse_sector_size(text: &str) -> Result<u32, String> {
    match text {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("the sector size is 512 or 4096".to_owned()),
    }
}

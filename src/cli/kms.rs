//! `nbdcrypt kms …`: the local KMS's operations and its audit log. Verb and
//! option names follow the AWS CLI's (`aws kms create-key --key-spec …`);
//! `--json` prints AWS's response shapes. Plaintext (data keys, decrypted
//! data) is only ever written to a file the caller names.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use serde_json::{Value, json};

use super::{CliError, CliResult, Global};
use crate::kms::{
    AuditFilter, CreateKeyRequest, EncryptionAlgorithm, EncryptionContext, KeyMetadata, KeySpec,
    KeyUsage, Kms, LocalKms, MessageType, SigningAlgorithm, validate_alias_name, write_new_private,
};

#[derive(clap::Args, Debug)]
pub struct KmsArgs {
    /// Root key file of the KMS (default: root.key in the KMS directory).
    /// Keep it apart from the key store in production.
    #[arg(
        long,
        global = true,
        env = "NBDCRYPT_KMS_ROOT_KEY",
        value_name = "FILE"
    )]
    pub root_key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: KmsCommand,
}

/// A key: key id, key ARN, alias name (alias/…) or alias ARN.
type KeyName = String;

#[derive(Subcommand, Debug)]
pub enum KmsCommand {
    /// Create a customer master key (symmetric by default).
    CreateKey {
        /// Also create this alias for the key (alias/NAME).
        #[arg(long)]
        alias: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// SYMMETRIC_DEFAULT, RSA_2048, RSA_3072, RSA_4096, ECC_NIST_P256, ECC_NIST_P384.
        #[arg(long, default_value = "SYMMETRIC_DEFAULT", value_parser = parse::<KeySpec>)]
        key_spec: KeySpec,
        /// ENCRYPT_DECRYPT or SIGN_VERIFY; required for asymmetric keys.
        #[arg(long, value_parser = parse::<KeyUsage>)]
        key_usage: Option<KeyUsage>,
    },
    /// Show a key's metadata (KeySpec, KeyUsage, KeyState, rotation, …).
    DescribeKey {
        key: KeyName,
    },
    /// List the keys.
    ListKeys,
    /// Create an alias for a key (key id or ARN).
    CreateAlias {
        alias: String,
        key: KeyName,
    },
    /// Point an alias at another key of the same spec and usage.
    UpdateAlias {
        alias: String,
        key: KeyName,
    },
    DeleteAlias {
        alias: String,
    },
    /// List the aliases, of one key if given.
    ListAliases {
        #[arg(long)]
        key_id: Option<KeyName>,
    },
    EnableKey {
        key: KeyName,
    },
    /// Disable a key: every cryptographic use fails until it is enabled.
    DisableKey {
        key: KeyName,
    },
    /// Make a key unusable now and delete it after the window (7–30 days).
    ScheduleKeyDeletion {
        key: KeyName,
        #[arg(long)]
        pending_window_in_days: Option<u32>,
    },
    /// Cancel a scheduled deletion; the key stays disabled until enabled.
    CancelKeyDeletion {
        key: KeyName,
    },
    /// Rotate a symmetric key's material automatically (90–2560 days).
    EnableKeyRotation {
        key: KeyName,
        #[arg(long)]
        rotation_period_in_days: Option<u32>,
    },
    DisableKeyRotation {
        key: KeyName,
    },
    GetKeyRotationStatus {
        key: KeyName,
    },
    /// New key material now; blobs made under older material still decrypt.
    RotateKeyOnDemand {
        key: KeyName,
    },
    ListKeyRotations {
        key: KeyName,
    },
    /// A data key: its plaintext to a new file, its ciphertext blob printed
    /// (base64) or written.
    GenerateDataKey {
        key: KeyName,
        #[command(flatten)]
        data_key: DataKeyArgs,
        /// New file (0600) for the plaintext data key; `-` for stdout.
        #[arg(long, value_name = "FILE")]
        plaintext_out: PathBuf,
    },
    /// A data key's ciphertext blob only.
    GenerateDataKeyWithoutPlaintext {
        key: KeyName,
        #[command(flatten)]
        data_key: DataKeyArgs,
    },
    /// Encrypt up to 4096 bytes.
    Encrypt {
        key: KeyName,
        /// File to encrypt; `-` for stdin.
        #[arg(long, value_name = "FILE")]
        plaintext_file: PathBuf,
        #[command(flatten)]
        context: ContextArgs,
        /// SYMMETRIC_DEFAULT, or RSAES_OAEP_SHA_256 for RSA keys.
        #[arg(long, value_parser = parse::<EncryptionAlgorithm>)]
        encryption_algorithm: Option<EncryptionAlgorithm>,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Decrypt a ciphertext blob.
    Decrypt {
        /// The ciphertext blob (raw bytes); `-` for stdin.
        #[arg(long, value_name = "FILE")]
        ciphertext_file: PathBuf,
        #[command(flatten)]
        context: ContextArgs,
        /// The key that must have made the blob (required for RSA).
        #[arg(long)]
        key_id: Option<KeyName>,
        #[arg(long, value_parser = parse::<EncryptionAlgorithm>)]
        encryption_algorithm: Option<EncryptionAlgorithm>,
        /// New file (0600) for the plaintext; `-` for stdout.
        #[arg(long, value_name = "FILE")]
        plaintext_out: PathBuf,
    },
    /// Re-wrap a blob under another key and/or context; the plaintext never
    /// leaves the KMS.
    ReEncrypt {
        #[arg(long, value_name = "FILE")]
        ciphertext_file: PathBuf,
        /// Context the blob was made with (KEY=VALUE, repeatable, or a JSON object).
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_pair)]
        source_encryption_context: Vec<Context>,
        #[arg(long)]
        source_key_id: Option<KeyName>,
        #[arg(long)]
        destination_key_id: KeyName,
        /// Context for the new blob (KEY=VALUE, repeatable, or a JSON object).
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_pair)]
        destination_encryption_context: Vec<Context>,
        #[command(flatten)]
        out: OutArgs,
    },
    /// The public key of an asymmetric key (DER SubjectPublicKeyInfo).
    GetPublicKey {
        key: KeyName,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Sign a message (or its digest) with a SIGN_VERIFY key.
    Sign {
        key: KeyName,
        #[command(flatten)]
        message: MessageArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Verify a signature; exits non-zero if it is not valid.
    Verify {
        key: KeyName,
        #[command(flatten)]
        message: MessageArgs,
        /// The signature (raw bytes).
        #[arg(long, value_name = "FILE")]
        signature_file: PathBuf,
    },
    /// Show the audit log (--json: the CloudTrail records, one per line),
    /// or check it with `audit verify`.
    Audit(AuditArgs),
}

#[derive(clap::Args, Debug)]
pub struct DataKeyArgs {
    /// Length of the data key in bytes (1–1024).
    #[arg(long, default_value_t = 32)]
    number_of_bytes: usize,
    #[command(flatten)]
    context: ContextArgs,
    /// Write the ciphertext blob (raw bytes) to this new file instead of
    /// printing it in base64.
    #[arg(long, value_name = "FILE")]
    ciphertext_out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ContextArgs {
    /// Encryption context entry KEY=VALUE (repeatable), or a JSON object.
    #[arg(short = 'c', long, value_name = "KEY=VALUE", value_parser = parse_pair)]
    encryption_context: Vec<Context>,
}

#[derive(clap::Args, Debug)]
pub struct OutArgs {
    /// Write the result (raw bytes) to this new file, or `-` for stdout,
    /// instead of printing it in base64.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct MessageArgs {
    /// The message, or its digest with --message-type DIGEST; `-` for stdin.
    #[arg(long, value_name = "FILE")]
    message_file: PathBuf,
    #[arg(long, default_value = "RAW", value_parser = parse::<MessageType>)]
    message_type: MessageType,
    /// RSASSA_PSS_SHA_256|384|512, RSASSA_PKCS1_V1_5_SHA_256|384|512, ECDSA_SHA_256|384.
    #[arg(long, value_parser = parse::<SigningAlgorithm>)]
    signing_algorithm: SigningAlgorithm,
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: Option<AuditCommand>,
    /// Only records about this key (id, ARN or alias); repeatable.
    #[arg(long)]
    key: Vec<KeyName>,
    /// Only records of this event (CreateKey, Decrypt, …).
    #[arg(long)]
    event: Option<String>,
    /// Only records whose encryption context has KEY=VALUE; repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<Context>,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain; names the first record that was edited,
    /// removed or moved.
    Verify,
}

/// Context entries as given: one KEY=VALUE pair, or a JSON object.
#[derive(Clone, Debug)]
pub struct Context(Vec<(String, String)>);

fn parse<T: std::str::FromStr<Err = crate::kms::KmsError>>(s: &str) -> Result<T, String> {
    s.parse().map_err(|e: crate::kms::KmsError| e.message())
}

fn parse_pair(s: &str) -> Result<Context, String> {
    if s.trim_start().starts_with('{') {
        let map: std::collections::BTreeMap<String, String> =
            serde_json::from_str(s).map_err(|e| format!("not a JSON object of strings: {e}"))?;
        return Ok(Context(map.into_iter().collect()));
    }
    match s.split_once('=') {
        Some((k, v)) => Ok(Context(vec![(k.to_owned(), v.to_owned())])),
        None => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

fn context(entries: &[Context]) -> EncryptionContext {
    entries.iter().flat_map(|c| c.0.iter().cloned()).collect()
}

fn read_input(path: &Path, what: &str) -> Result<Vec<u8>, CliError> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("cannot read the {what} from stdin: {e}"))?;
        return Ok(buf);
    }
    std::fs::read(path)
        .map_err(|e| format!("cannot read the {what} from {}: {e}", path.display()).into())
}

/// Writes `bytes` to a new 0600 file (never over an existing one), or to
/// stdout for `-`.
fn write_output(path: &Path, bytes: &[u8]) -> CliResult {
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).and_then(|()| out.flush())?;
        return Ok(());
    }
    if path.exists() {
        return Err(format!(
            "{} already exists; name a new file (nbdcrypt never overwrites key or data files)",
            path.display()
        )
        .into());
    }
    write_new_private(path, bytes)?;
    Ok(())
}

/// Prints a binary result: to `out` if given (and says where in human
/// mode), else base64 under `field`.
fn emit_bytes(
    global: &Global,
    out: &Option<PathBuf>,
    field: &str,
    bytes: &[u8],
    mut json: Value,
) -> CliResult {
    match out {
        Some(path) => {
            write_output(path, bytes)?;
            if path != Path::new("-") {
                json[format!("{field}File")] = json!(path);
                if !global.json {
                    println!("{field} written to {}", path.display());
                }
            }
        }
        None => {
            json[field] = json!(B64.encode(bytes));
            if !global.json {
                println!("{field} {}", B64.encode(bytes));
            }
        }
    }
    if global.json && out.as_deref() != Some(Path::new("-")) {
        println!("{json}");
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("responses serialize")
    );
}

fn print_metadata(meta: &KeyMetadata) {
    let rows = [
        ("KeyId", meta.key_id.clone()),
        ("Arn", meta.arn.clone()),
        ("KeySpec", meta.key_spec.to_string()),
        ("KeyUsage", meta.key_usage.to_string()),
        ("KeyState", meta.key_state.to_string()),
        ("CreationDate", meta.creation_date.to_string()),
        ("Description", meta.description.clone()),
    ];
    for (k, v) in rows {
        println!("{k:<18}{v}");
    }
    if let Some(date) = meta.deletion_date {
        println!("{:<18}{date}", "DeletionDate");
    }
    if meta.key_spec.is_symmetric() {
        return;
    }
    let algs: Vec<String> = meta
        .encryption_algorithms
        .iter()
        .map(|a| a.to_string())
        .chain(meta.signing_algorithms.iter().map(|a| a.to_string()))
        .collect();
    println!("{:<18}{}", "Algorithms", algs.join(", "));
}

pub fn run(args: KmsArgs, global: &Global) -> CliResult {
    let dir = global.kms_dir.clone().unwrap_or_else(LocalKms::default_dir);
    let kms = LocalKms::open_with_root_key(&dir, args.root_key.as_deref())?;
    let human = !global.json;
    match args.command {
        KmsCommand::CreateKey {
            alias,
            description,
            key_spec,
            key_usage,
        } => {
            if let Some(alias) = &alias {
                validate_alias_name(alias)?;
            }
            let req = CreateKeyRequest {
                description,
                key_spec,
                key_usage,
            };
            let meta = kms.create_key(&req)?;
            if let Some(alias) = &alias {
                kms.create_alias(alias, &meta.key_id).map_err(|e| {
                    format!("key {} was created, but not its alias: {e}", meta.key_id)
                })?;
            }
            if human {
                print_metadata(&meta);
                if let Some(alias) = alias {
                    println!("{:<18}{alias}", "Alias");
                }
            } else {
                print_json(&json!({"KeyMetadata": meta}));
            }
        }
        KmsCommand::DescribeKey { key } => {
            let desc = kms.describe(&key)?;
            if human {
                print_metadata(&desc.key_metadata);
                if let Some(r) = &desc.key_rotation_status {
                    let auto = match (
                        r.key_rotation_enabled,
                        r.rotation_period_in_days,
                        r.next_rotation_date,
                    ) {
                        (true, Some(days), Some(next)) => format!("every {days} days, next {next}"),
                        _ => "off".into(),
                    };
                    println!("{:<18}{auto}", "Rotation");
                    println!(
                        "{:<18}{}",
                        "MaterialVersion", r.current_key_material_version
                    );
                }
            } else {
                print_json(&desc);
            }
        }
        KmsCommand::ListKeys => {
            let keys = kms.list_keys()?;
            if human {
                for k in &keys {
                    println!("{}  {}", k.key_id, k.key_arn);
                }
            } else {
                print_json(&json!({"Keys": keys}));
            }
        }
        KmsCommand::CreateAlias { alias, key } => {
            kms.create_alias(&alias, &key)?;
            confirm(global, &format!("{alias} now names key {key}"));
        }
        KmsCommand::UpdateAlias { alias, key } => {
            kms.update_alias(&alias, &key)?;
            confirm(global, &format!("{alias} now names key {key}"));
        }
        KmsCommand::DeleteAlias { alias } => {
            kms.delete_alias(&alias)?;
            confirm(global, &format!("{alias} deleted"));
        }
        KmsCommand::ListAliases { key_id } => {
            let aliases = kms.list_aliases(key_id.as_deref())?;
            if human {
                for a in &aliases {
                    println!("{:<40}{}", a.alias_name, a.target_key_id);
                }
            } else {
                print_json(&json!({"Aliases": aliases}));
            }
        }
        KmsCommand::EnableKey { key } => {
            kms.enable_key(&key)?;
            confirm(global, &format!("key {key} enabled"));
        }
        KmsCommand::DisableKey { key } => {
            kms.disable_key(&key)?;
            confirm(global, &format!("key {key} disabled"));
        }
        KmsCommand::ScheduleKeyDeletion {
            key,
            pending_window_in_days,
        } => {
            let s = kms.schedule_key_deletion(&key, pending_window_in_days)?;
            if human {
                println!(
                    "key {key} is pending deletion and unusable; it is deleted at the first KMS start after {} (cancel with `nbdcrypt kms cancel-key-deletion {key}`)",
                    s.deletion_date
                );
            } else {
                print_json(&s);
            }
        }
        KmsCommand::CancelKeyDeletion { key } => {
            let arn = kms.cancel_key_deletion(&key)?;
            if human {
                println!(
                    "deletion of key {key} cancelled; it is disabled (enable it with `nbdcrypt kms enable-key {key}`)"
                );
            } else {
                print_json(&json!({"KeyId": arn}));
            }
        }
        KmsCommand::EnableKeyRotation {
            key,
            rotation_period_in_days,
        } => {
            kms.enable_key_rotation(&key, rotation_period_in_days)?;
            confirm(global, &format!("automatic rotation of key {key} enabled"));
        }
        KmsCommand::DisableKeyRotation { key } => {
            kms.disable_key_rotation(&key)?;
            confirm(global, &format!("automatic rotation of key {key} disabled"));
        }
        KmsCommand::GetKeyRotationStatus { key } => {
            let r = kms.get_key_rotation_status(&key)?;
            if human {
                println!("{:<22}{}", "KeyRotationEnabled", r.key_rotation_enabled);
                if let (Some(days), Some(next)) = (r.rotation_period_in_days, r.next_rotation_date)
                {
                    println!("{:<22}{days}", "RotationPeriodInDays");
                    println!("{:<22}{next}", "NextRotationDate");
                }
                println!(
                    "{:<22}{}",
                    "MaterialVersion", r.current_key_material_version
                );
            } else {
                print_json(&r);
            }
        }
        KmsCommand::RotateKeyOnDemand { key } => {
            let r = kms.rotate_key_on_demand(&key)?;
            if human {
                println!(
                    "key {key} rotated: new data keys use material version {}; older blobs still decrypt",
                    r.current_key_material_version
                );
            } else {
                print_json(
                    &json!({"KeyId": r.key_id, "KeyMaterialVersion": r.current_key_material_version}),
                );
            }
        }
        KmsCommand::ListKeyRotations { key } => {
            let rotations = kms.list_key_rotations(&key)?;
            if human {
                for r in &rotations {
                    println!(
                        "{}  version {:<4} {:?}",
                        r.rotation_date, r.key_material_version, r.rotation_type
                    );
                }
            } else {
                print_json(&json!({"Rotations": rotations}));
            }
        }
        KmsCommand::GenerateDataKey {
            key,
            data_key,
            plaintext_out,
        } => {
            let out = data_key.ciphertext_out;
            // Every output is checked before the KMS makes a key, so that no
            // plaintext key is ever left without its blob.
            let stdout = Path::new("-");
            if plaintext_out == stdout
                && (global.json || out.as_deref().is_none_or(|o| o == stdout))
            {
                return Err("with --plaintext-out - give --ciphertext-out FILE and no --json, so that the key is the only thing on stdout".into());
            }
            for path in std::iter::once(&plaintext_out).chain(out.as_ref()) {
                if path != stdout && path.exists() {
                    return Err(format!("{} already exists; name a new file (nbdcrypt never overwrites key or data files)", path.display()).into());
                }
            }
            let ctx = context(&data_key.context.encryption_context);
            let dk = kms.generate_data_key(&key, &ctx, data_key.number_of_bytes)?;
            write_output(&plaintext_out, dk.plaintext.expose())?;
            if human && plaintext_out != stdout {
                println!("Plaintext written to {}", plaintext_out.display());
            }
            println_key(global, &dk.key_id);
            let emitted = emit_bytes(
                global,
                &out,
                "CiphertextBlob",
                &dk.ciphertext_blob,
                json!({"KeyId": dk.key_id, "PlaintextFile": plaintext_out}),
            );
            if emitted.is_err() && plaintext_out != stdout {
                let _ = std::fs::remove_file(&plaintext_out);
            }
            emitted?;
        }
        KmsCommand::GenerateDataKeyWithoutPlaintext { key, data_key } => {
            let ctx = context(&data_key.context.encryption_context);
            let e =
                kms.generate_data_key_without_plaintext(&key, &ctx, data_key.number_of_bytes)?;
            println_key(global, &e.key_id);
            emit_bytes(
                global,
                &data_key.ciphertext_out,
                "CiphertextBlob",
                &e.ciphertext_blob,
                json!({"KeyId": e.key_id}),
            )?;
        }
        KmsCommand::Encrypt {
            key,
            plaintext_file,
            context: ctx,
            encryption_algorithm,
            out,
        } => {
            let plaintext = crate::secret::SecretBytes::copy_from(&zeroize::Zeroizing::new(
                read_input(&plaintext_file, "plaintext")?,
            ));
            let e = kms.encrypt(
                &key,
                plaintext.expose(),
                &context(&ctx.encryption_context),
                encryption_algorithm,
            )?;
            println_key(global, &e.key_id);
            let json = json!({"KeyId": e.key_id, "EncryptionAlgorithm": e.encryption_algorithm});
            emit_bytes(global, &out.out, "CiphertextBlob", &e.ciphertext_blob, json)?;
        }
        KmsCommand::Decrypt {
            ciphertext_file,
            context: ctx,
            key_id,
            encryption_algorithm,
            plaintext_out,
        } => {
            let blob = read_input(&ciphertext_file, "ciphertext blob")?;
            let d = kms.decrypt_with(
                &blob,
                &context(&ctx.encryption_context),
                key_id.as_deref(),
                encryption_algorithm,
            )?;
            write_output(&plaintext_out, d.plaintext.expose())?;
            if plaintext_out != Path::new("-") {
                if human {
                    println!(
                        "KeyId {}\nPlaintext written to {}",
                        d.key_id,
                        plaintext_out.display()
                    );
                } else {
                    print_json(&json!({"KeyId": d.key_id, "PlaintextFile": plaintext_out}));
                }
            }
        }
        KmsCommand::ReEncrypt {
            ciphertext_file,
            source_encryption_context,
            source_key_id,
            destination_key_id,
            destination_encryption_context,
            out,
        } => {
            let blob = read_input(&ciphertext_file, "ciphertext blob")?;
            let r = kms.re_encrypt_from(
                &blob,
                &context(&source_encryption_context),
                source_key_id.as_deref(),
                &destination_key_id,
                &context(&destination_encryption_context),
            )?;
            if human && out.out.as_deref() != Some(Path::new("-")) {
                println!("SourceKeyId {}", r.source_key_id);
            }
            println_key(global, &r.key_id);
            let json = json!({"KeyId": r.key_id, "SourceKeyId": r.source_key_id});
            emit_bytes(global, &out.out, "CiphertextBlob", &r.ciphertext_blob, json)?;
        }
        KmsCommand::GetPublicKey { key, out } => {
            let p = kms.get_public_key(&key)?;
            println_key(global, &p.key_id);
            let json = json!({
                "KeyId": p.key_id, "KeySpec": p.key_spec, "KeyUsage": p.key_usage,
                "EncryptionAlgorithms": p.encryption_algorithms, "SigningAlgorithms": p.signing_algorithms,
            });
            emit_bytes(global, &out.out, "PublicKey", &p.public_key, json)?;
        }
        KmsCommand::Sign { key, message, out } => {
            let msg = read_input(&message.message_file, "message")?;
            let sig = kms.sign(&key, &msg, message.message_type, message.signing_algorithm)?;
            let json = json!({"KeyId": key, "SigningAlgorithm": message.signing_algorithm});
            emit_bytes(global, &out.out, "Signature", &sig, json)?;
        }
        KmsCommand::Verify {
            key,
            message,
            signature_file,
        } => {
            let msg = read_input(&message.message_file, "message")?;
            let sig = read_input(&signature_file, "signature")?;
            kms.verify(
                &key,
                &msg,
                message.message_type,
                &sig,
                message.signing_algorithm,
            )?;
            if human {
                println!("signature valid");
            } else {
                print_json(
                    &json!({"KeyId": key, "SignatureValid": true, "SigningAlgorithm": message.signing_algorithm}),
                );
            }
        }
        KmsCommand::Audit(audit) => run_audit(&kms, audit, global)?,
    }
    Ok(())
}

fn confirm(global: &Global, text: &str) {
    if global.json {
        println!("{{}}");
    } else {
        println!("{text}");
    }
}

fn println_key(global: &Global, arn: &str) {
    if !global.json {
        println!("KeyId {arn}");
    }
}

fn run_audit(kms: &LocalKms, args: AuditArgs, global: &Global) -> CliResult {
    if let Some(AuditCommand::Verify) = args.command {
        let v = kms.audit_verify()?;
        if global.json {
            print_json(&json!({"Intact": true, "Records": v.records}));
        } else {
            println!(
                "audit log intact: {} records, hash chain verified",
                v.records
            );
        }
        return Ok(());
    }
    let filter = AuditFilter {
        keys: args.key,
        event: args.event,
        context: args.context.into_iter().flat_map(|c| c.0).collect(),
    };
    let records = kms.audit_records(&filter)?;
    if global.json {
        for r in &records {
            println!("{r}");
        }
        return Ok(());
    }
    println!(
        "{:<21}{:<33}{:<38}{:<30}{:<12}CONTEXT",
        "TIME", "EVENT", "KEY", "RESULT", "CALLER"
    );
    for r in &records {
        let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
        let key = r["resources"]
            .as_array()
            .and_then(|rs| rs.first())
            .map(|x| s(&x["ARN"]))
            .or_else(|| r["requestParameters"]["keyId"].as_str().map(str::to_owned))
            .map(|k| {
                k.rsplit_once("key/")
                    .map_or(k.clone(), |(_, id)| id.to_owned())
            })
            .unwrap_or_else(|| "-".into());
        let result = r["errorCode"].as_str().unwrap_or("OK");
        let caller = format!("{}/{}", r["userIdentity"]["uid"], r["userIdentity"]["pid"]);
        let contexts: Vec<String> = crate::kms::audit::contexts(r)
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| c.to_string())
            .collect();
        println!(
            "{:<21}{:<33}{:<38}{:<30}{:<12}{}",
            s(&r["eventTime"]),
            s(&r["eventName"]),
            key,
            result,
            caller,
            contexts.join(" -> ")
        );
    }
    Ok(())
}

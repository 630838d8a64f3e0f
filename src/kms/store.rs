//! The key store: every key's metadata and its key material, the aliases, and
//! the region and account of the directory, in one file.
//!
//! Key material is sealed (AES-256-GCM) under a key derived from the root
//! key, and the whole file carries an HMAC under another derived key, so a
//! reader learns no key and an editor cannot flip a key's state unnoticed.
//! The file is replaced atomically (`fsio::write_atomic`) under the directory
//! lock, so a crash leaves the previous or the next store, never a torn one.

use std::fs;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use super::id::Partition;
use super::key::KeyMetadata;
use super::time::Timestamp;
use super::{KmsError, fsio, gcm};
use crate::secret::SecretBytes;

const FORMAT: u32 = 1;
const MAGIC: &str = "nbdcrypt-kms-store";
const ROOT_KEY_LEN: usize = 32;
/// The region of every local KMS; the account is drawn per directory.
const LOCAL_REGION: &str = "local-1";

/// The keys the root key is expanded into, one per purpose, so that no
/// two uses share a key (HMAC-SHA256 as a PRF, labels below).
#[derive(Debug)]
pub struct RootKeys {
    material: SecretBytes,
    store_mac: SecretBytes,
    pub audit_chain: SecretBytes,
    fingerprint: String,
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    for p in parts {
        mac.update(p);
    }
    mac
}

/// HMAC-SHA256 of the concatenated `parts` under `key`.
pub fn mac(key: &SecretBytes, parts: &[&[u8]]) -> [u8; 32] {
    hmac(key.expose(), parts).finalize().into_bytes().into()
}

/// Checks an HMAC-SHA256 in constant time.
pub fn mac_matches(key: &SecretBytes, parts: &[&[u8]], tag: &[u8]) -> bool {
    hmac(key.expose(), parts).verify_slice(tag).is_ok()
}

impl RootKeys {
    pub fn derive(root: &SecretBytes) -> Self {
        let sub = |label: &str| {
            let mut out = SecretBytes::zeroed(32);
            let mut tag = mac(root, &[label.as_bytes()]);
            out.expose_mut().copy_from_slice(&tag);
            zeroize::Zeroize::zeroize(&mut tag);
            out
        };
        let fingerprint = to_hex(&mac(root, &[b"nbdcrypt kms root key fingerprint v1"])[..8]);
        Self {
            material: sub("nbdcrypt kms key material v1"),
            store_mac: sub("nbdcrypt kms store mac v1"),
            audit_chain: sub("nbdcrypt kms audit chain v1"),
            fingerprint,
        }
    }

    /// Reads the root key at `path`, or creates one there if `create` (a
    /// new store). Creation is announced: the embedded default keeps the
    /// root key beside the store, which production should not.
    pub fn load_or_create(path: &Path, create: bool, dir: &Path) -> Result<Self, KmsError> {
        match fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound && create => {
                let root = SecretBytes::random(ROOT_KEY_LEN);
                // All or nothing: a torn root key would lock the store forever.
                fsio::write_new_private(path, root.expose())?;
                tracing::warn!(
                    "created a new KMS root key at {} (mode 0600); in production keep it apart from the key store and point NBDCRYPT_KMS_ROOT_KEY at it",
                    path.display()
                );
                return Ok(Self::derive(&root));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(KmsError::RootKeyMissing {
                    dir: dir.to_owned(),
                    root_key: path.to_owned(),
                });
            }
            Err(e) => return Err(KmsError::io("read the root key", path, e)),
        }
        fsio::check_private(path)?;
        let mut file =
            fs::File::open(path).map_err(|e| KmsError::io("open the root key", path, e))?;
        let mut root = SecretBytes::zeroed(ROOT_KEY_LEN);
        let mut extra = [0u8; 1];
        file.read_exact(root.expose_mut())
            .map_err(|e| KmsError::io("read the root key", path, e))?;
        if file
            .read(&mut extra)
            .map_err(|e| KmsError::io("read the root key", path, e))?
            != 0
        {
            return Err(KmsError::Corrupt {
                path: path.to_owned(),
                reason: format!("a root key is exactly {ROOT_KEY_LEN} bytes"),
            });
        }
        Ok(Self::derive(&root))
    }

    fn material_aad(key_id: Uuid, version: u32) -> Vec<u8> {
        let mut aad = b"nbdcrypt kms key material v1".to_vec();
        aad.extend_from_slice(key_id.as_bytes());
        aad.extend_from_slice(&version.to_be_bytes());
        aad
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Automatic rotation settings (AWS `GetKeyRotationStatus`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    pub enabled: bool,
    pub period_days: Option<u32>,
    pub next_rotation_date: Option<Timestamp>,
}

/// How a material version came to be (AWS `ListKeyRotations`'
/// `RotationType`; the first version has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RotationType {
    Automatic,
    OnDemand,
}

/// One version of a key's material, sealed under the root key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Material {
    pub version: u32,
    pub created: Timestamp,
    pub rotation_type: Option<RotationType>,
    sealed: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredKey {
    pub id: Uuid,
    pub metadata: KeyMetadata,
    pub rotation: Rotation,
    /// Oldest first; the last is the one new ciphertexts use.
    pub materials: Vec<Material>,
}

impl StoredKey {
    pub fn newest_version(&self) -> u32 {
        self.materials.last().map_or(0, |m| m.version)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AliasEntry {
    pub name: String,
    pub target: Uuid,
    pub creation_date: Timestamp,
    pub last_updated_date: Timestamp,
}

/// The decoded contents of the key store file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Store {
    format: u32,
    root_key_fingerprint: String,
    pub region: String,
    pub account: String,
    pub keys: Vec<StoredKey>,
    pub aliases: Vec<AliasEntry>,
}

impl Store {
    /// An empty store for a new directory, with a random 12-digit account.
    pub fn new(root: &RootKeys) -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the OS random number generator failed");
        let account = format!("{:012}", u64::from_le_bytes(bytes) % 1_000_000_000_000);
        Self {
            format: FORMAT,
            root_key_fingerprint: root.fingerprint.clone(),
            region: LOCAL_REGION.to_owned(),
            account,
            keys: Vec::new(),
            aliases: Vec::new(),
        }
    }

    pub fn partition(&self) -> Partition {
        Partition {
            region: self.region.clone(),
            account: self.account.clone(),
        }
    }

    /// Reads and authenticates the store at `path`.
    pub fn load(
        path: &Path,
        root: &RootKeys,
        dir: &Path,
        root_path: &Path,
    ) -> Result<Self, KmsError> {
        let bytes = fs::read(path).map_err(|e| KmsError::io("read the key store", path, e))?;
        Self::decode(&bytes, path, root, dir, root_path)
    }

    /// Authenticates and decodes the bytes of a key store file; `path` is
    /// where they came from, for the errors.
    pub fn decode(
        bytes: &[u8],
        path: &Path,
        root: &RootKeys,
        dir: &Path,
        root_path: &Path,
    ) -> Result<Self, KmsError> {
        let corrupt = |reason: &str| KmsError::Corrupt {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let newline = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| corrupt("no header line"))?;
        let (header, body) = (&bytes[..newline], &bytes[newline + 1..]);
        let header = std::str::from_utf8(header).map_err(|_| corrupt("header is not text"))?;
        let mut fields = header.split(' ');
        let (Some(MAGIC), Some(format), Some(fingerprint), Some(tag), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(corrupt("not an nbdcrypt key store header"));
        };
        if format != FORMAT.to_string() {
            return Err(corrupt(&format!(
                "format {format}, this nbdcrypt reads format {FORMAT}"
            )));
        }
        if fingerprint != root.fingerprint {
            return Err(KmsError::WrongRootKey {
                dir: dir.to_owned(),
                root_key: root_path.to_owned(),
            });
        }
        let tag = from_hex(tag).ok_or_else(|| corrupt("malformed integrity tag"))?;
        if !mac_matches(&root.store_mac, &[MAGIC.as_bytes(), body], &tag) {
            return Err(corrupt("integrity tag does not match"));
        }
        let store: Store = serde_json::from_slice(body).map_err(|e| corrupt(&e.to_string()))?;
        if store.root_key_fingerprint != root.fingerprint {
            return Err(corrupt("root key fingerprint differs from the header's"));
        }
        Ok(store)
    }

    /// Writes the store atomically and durably.
    pub fn save(&self, path: &Path, root: &RootKeys) -> Result<(), KmsError> {
        self.stage(path, root)?.commit()
    }

    /// Writes the store beside `path`, to be put in place by a commit.
    pub fn stage(&self, path: &Path, root: &RootKeys) -> Result<fsio::Staged, KmsError> {
        let body = serde_json::to_vec_pretty(self).expect("the store serializes");
        fsio::stage(path, &frame(&body, root))
    }

    pub fn key(&self, id: Uuid) -> Option<&StoredKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    pub fn key_mut(&mut self, id: Uuid) -> Option<&mut StoredKey> {
        self.keys.iter_mut().find(|k| k.id == id)
    }

    pub fn alias(&self, name: &str) -> Option<&AliasEntry> {
        self.aliases.iter().find(|a| a.name == name)
    }
}

/// A store file: the header line (magic, format, root key fingerprint,
/// integrity tag over `body`), then `body`.
pub fn frame(body: &[u8], root: &RootKeys) -> Vec<u8> {
    let tag = mac(&root.store_mac, &[MAGIC.as_bytes(), body]);
    let mut bytes =
        format!("{MAGIC} {FORMAT} {} {}\n", root.fingerprint, to_hex(&tag)).into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

impl Material {
    /// Seals `secret` as version `version` of key `key_id`.
    pub fn seal(
        root: &RootKeys,
        key_id: Uuid,
        version: u32,
        created: Timestamp,
        rotation_type: Option<RotationType>,
        secret: &SecretBytes,
    ) -> Self {
        let sealed = gcm::seal(
            &root.material,
            &RootKeys::material_aad(key_id, version),
            secret.expose(),
        );
        Self {
            version,
            created,
            rotation_type,
            sealed: B64.encode(sealed),
        }
    }

    /// The material in clear, in protected memory.
    pub fn open(
        &self,
        root: &RootKeys,
        key_id: Uuid,
        store_path: &Path,
    ) -> Result<SecretBytes, KmsError> {
        let corrupt = || KmsError::Corrupt {
            path: store_path.to_owned(),
            reason: format!(
                "material version {} of key {key_id} does not unseal",
                self.version
            ),
        };
        let sealed = B64.decode(&self.sealed).map_err(|_| corrupt())?;
        gcm::open(
            &root.material,
            &RootKeys::material_aad(key_id, self.version),
            &sealed,
        )
        .ok_or_else(corrupt)
    }
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Where the files of one KMS directory live.
#[derive(Clone, Debug)]
pub struct Paths {
    pub dir: PathBuf,
    pub store: PathBuf,
    pub root_key: PathBuf,
    pub lock: PathBuf,
    pub audit: PathBuf,
    pub audit_head: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path, root_key: Option<PathBuf>) -> Self {
        Self {
            dir: dir.to_owned(),
            store: dir.join("keystore"),
            root_key: root_key.unwrap_or_else(|| dir.join("root.key")),
            lock: dir.join("lock"),
            audit: dir.join("audit.log"),
            audit_head: dir.join("audit.head"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Paths, RootKeys) {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path(), None);
        let root = RootKeys::load_or_create(&paths.root_key, true, dir.path()).unwrap();
        (dir, paths, root)
    }

    #[test]
    fn store_survives_a_reload_and_material_unseals() {
        let (_d, paths, root) = setup();
        let mut store = Store::new(&root);
        assert_eq!(store.account.len(), 12);
        let id = Uuid::new_v4();
        let secret = SecretBytes::random(32);
        let m = Material::seal(&root, id, 1, Timestamp::from_unix(5), None, &secret);
        store.aliases.push(AliasEntry {
            name: "alias/x".into(),
            target: id,
            creation_date: Timestamp::from_unix(5),
            last_updated_date: Timestamp::from_unix(5),
        });
        store.save(&paths.store, &root).unwrap();
        fsio::check_private(&paths.store).unwrap();
        let again = RootKeys::load_or_create(&paths.root_key, false, &paths.dir).unwrap();
        let back = Store::load(&paths.store, &again, &paths.dir, &paths.root_key).unwrap();
        assert_eq!(back.account, store.account);
        assert_eq!(back.alias("alias/x").unwrap().target, id);
        assert_eq!(m.open(&again, id, &paths.store).unwrap(), secret);
        // Material is bound to its key and version.
        assert!(m.open(&again, Uuid::new_v4(), &paths.store).is_err());
    }

    #[test]
    fn an_edited_store_is_refused() {
        let (_d, paths, root) = setup();
        Store::new(&root).save(&paths.store, &root).unwrap();
        let text = fs::read_to_string(&paths.store).unwrap();
        fs::write(&paths.store, text.replace("local-1", "local-2")).unwrap();
        let err = Store::load(&paths.store, &root, &paths.dir, &paths.root_key).unwrap_err();
        assert!(err.to_string().contains("integrity tag"), "{err}");
    }

    #[test]
    fn another_root_key_is_named_as_such() {
        let (d, paths, root) = setup();
        Store::new(&root).save(&paths.store, &root).unwrap();
        let other_path = d.path().join("other.key");
        let other = RootKeys::load_or_create(&other_path, true, d.path()).unwrap();
        let err = Store::load(&paths.store, &other, &paths.dir, &other_path).unwrap_err();
        assert!(matches!(err, KmsError::WrongRootKey { .. }), "{err}");
    }

    #[test]
    fn a_missing_root_key_is_not_recreated_for_an_existing_store() {
        let (d, paths, _root) = setup();
        fs::remove_file(&paths.root_key).unwrap();
        let err = RootKeys::load_or_create(&paths.root_key, false, d.path()).unwrap_err();
        assert!(matches!(err, KmsError::RootKeyMissing { .. }), "{err}");
    }
}

//! The file discipline of the KMS directory: private modes, atomic and
//! durable replacement, and the directory lock.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::KmsError;

/// Creates `dir` (and missing parents) readable by its owner only.
pub fn create_private_dir(dir: &Path) -> Result<(), KmsError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| KmsError::io("create the KMS directory", dir, e))
}

/// Refuses a file or directory that other users may read or change: the key
/// store, its root key and the audit log are the owner's alone, as ssh
/// treats its private keys.
pub fn check_private(path: &Path) -> Result<(), KmsError> {
    let meta = fs::metadata(path).map_err(|e| KmsError::io("read the mode of", path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KmsError::InsecurePermissions {
            path: path.to_owned(),
            mode,
            fix: if meta.is_dir() { "700" } else { "600" },
        });
    }
    Ok(())
}

/// Makes a rename or a file creation in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), KmsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| KmsError::io("sync the directory", dir, e))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` so that a crash at any moment leaves either
/// the old or the new contents, never a mix: write a temporary file, fsync
/// it, rename it over the old one, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KmsError> {
    stage(path, bytes)?.commit()
}

/// The first half of [`write_atomic`]: the new contents, durable beside
/// `path`, for a caller that has something to do (write an audit record)
/// between what can fail slowly and the rename.
pub fn stage(path: &Path, bytes: &[u8]) -> Result<Staged, KmsError> {
    let tmp = tmp_path(path);
    let staged = Staged {
        tmp,
        path: path.to_owned(),
        renamed: false,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staged.tmp)
        .map_err(|e| KmsError::io("create", &staged.tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| KmsError::io("write", &staged.tmp, e))?;
    Ok(staged)
}

/// New contents written beside their file; dropped without a commit, they
/// are removed and the file stays as it was.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    renamed: bool,
}

impl Staged {
    /// Puts the new contents in place, durably.
    pub fn commit(mut self) -> Result<(), KmsError> {
        fs::rename(&self.tmp, &self.path).map_err(|e| KmsError::io("replace", &self.path, e))?;
        self.renamed = true;
        sync_dir(parent(&self.path))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.renamed {
            // A stray file would only be truncated by the next stage.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Creates `path` with `bytes` (mode 0600), refusing to replace an existing
/// file; durable before it returns. A crash leaves no partial file under the
/// final name.
pub fn write_new_private(path: &Path, bytes: &[u8]) -> Result<(), KmsError> {
    // A name of our own, so that no file of the caller's is ever truncated.
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let tmp = path.with_file_name(name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| KmsError::io("create", &tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| KmsError::io("write", &tmp, e))?;
    // link(2) fails if the target exists, where rename(2) would replace it.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| KmsError::io("create", path, e))?;
    sync_dir(parent(path))
}

/// An exclusive lock on the KMS directory, held for one operation so that
/// two processes never interleave a read-modify-write of the key store or
/// the audit chain. Released when dropped.
pub struct DirLock {
    _lock: Flock<File>,
}

impl DirLock {
    pub fn acquire(path: &Path) -> Result<Self, KmsError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| KmsError::io("open the lock file", path, e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| KmsError::io("lock", path, errno.into()))?;
        Ok(Self { _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!tmp_path(&path).exists());
        check_private(&path).unwrap();
    }

    #[test]
    fn new_private_file_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        write_new_private(&path, b"one").unwrap();
        let err = write_new_private(&path, b"two").unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary is left"
        );
    }

    #[test]
    fn files_open_to_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_private(&path).unwrap_err();
        assert_eq!(err.aws_code(), "AccessDeniedException");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}

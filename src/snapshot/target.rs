//! The file a snapshot (or a restored volume) is written to: `DIR/.NAME.partial`,
//! created exclusively, filled, fsynced, then renamed to `DIR/NAME` without
//! replacing anything and the directory fsynced. So a reader never sees half
//! a snapshot under its name, a crash leaves at most a hidden `.partial`
//! file, and a failure removes it.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use super::SnapshotError;
use crate::volume::luks2::Header;

pub(super) struct Target {
    partial: PathBuf,
    path: PathBuf,
    file: File,
    committed: bool,
}

impl Target {
    /// Creates the hidden partial file for `path`, sparse and `len` bytes
    /// long. Refuses when `path` exists (`exists` makes the error) or its
    /// partial file does (another attempt is running, or was killed).
    pub fn create(
        path: &Path,
        len: u64,
        exists: impl FnOnce(PathBuf) -> SnapshotError,
    ) -> Result<Self, SnapshotError> {
        let (dir, name) = match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => (dir, name),
            _ => {
                return Err(SnapshotError::OutDir {
                    path: path.to_owned(),
                    source: ErrorKind::InvalidInput.into(),
                });
            }
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let out_dir = |source| SnapshotError::OutDir {
            path: dir.to_owned(),
            source,
        };
        if !std::fs::metadata(dir).map_err(out_dir)?.is_dir() {
            return Err(out_dir(ErrorKind::NotADirectory.into()));
        }
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(exists(path.to_owned()));
        }
        let mut hidden = OsString::from(".");
        hidden.push(name);
        hidden.push(".partial");
        let partial = dir.join(hidden);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| match e.kind() {
                ErrorKind::AlreadyExists => SnapshotError::InProgress(partial.clone()),
                _ => out_dir(e),
            })?;
        let target = Self {
            partial,
            path: path.to_owned(),
            file,
            committed: false,
        };
        target
            .file
            .set_len(len)
            .map_err(|e| SnapshotError::io(&target.partial, e))?;
        Ok(target)
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The name the file will have.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hidden name the data is written under until the commit.
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// Writes `header` if given (both copies, each fdatasync'd), makes the
    /// whole file durable, gives it `mode`, renames it to its name (never
    /// over an existing file) and makes the rename durable.
    pub fn commit(
        mut self,
        header: Option<&mut Header>,
        mode: u32,
        exists: impl FnOnce(PathBuf) -> SnapshotError,
    ) -> Result<PathBuf, SnapshotError> {
        let io = |e| SnapshotError::io(&self.partial, e);
        if let Some(header) = header {
            header
                .write_to(&self.file)
                .map_err(|source| SnapshotError::Header {
                    path: self.partial.clone(),
                    source,
                })?;
        }
        self.file.sync_all().map_err(io)?;
        self.file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io)?;
        match renameat2(
            AT_FDCWD,
            &self.partial,
            AT_FDCWD,
            &self.path,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {}
            Err(nix::errno::Errno::EEXIST) => return Err(exists(self.path.clone())),
            Err(e) => return Err(io(e.into())),
        }
        self.committed = true;
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))
            .and_then(|d| d.sync_all())
            .map_err(|e| SnapshotError::io(&self.path, e))?;
        Ok(self.path.clone())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exists(p: PathBuf) -> SnapshotError {
        SnapshotError::Exists(p)
    }

    #[test]
    fn the_name_appears_only_at_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap-1");
        let t = Target::create(&path, 1 << 20, exists).unwrap();
        assert_eq!(t.partial_path(), dir.path().join(".snap-1.partial"));
        assert!(!path.exists());
        assert!(matches!(
            Target::create(&path, 1, exists),
            Err(SnapshotError::InProgress(_))
        ));
        let done = t.commit(None, 0o400, exists).unwrap();
        assert_eq!(done, path);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o400
        );
        assert!(!dir.path().join(".snap-1.partial").exists());
        assert!(matches!(
            Target::create(&path, 1, exists),
            Err(SnapshotError::Exists(_))
        ));
    }

    #[test]
    fn a_dropped_target_leaves_nothing_and_a_late_rival_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap-2");
        drop(Target::create(&path, 4096, exists).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let t = Target::create(&path, 4096, exists).unwrap();
        std::fs::write(&path, b"rival").unwrap();
        assert!(matches!(
            t.commit(None, 0o400, exists),
            Err(SnapshotError::Exists(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"rival");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Target::create(&dir.path().join("nope/snap-3"), 1, exists)
            .err()
            .unwrap();
        assert!(
            matches!(err, SnapshotError::OutDir { .. }) && err.to_string().contains("nope"),
            "{err}"
        );
    }
}

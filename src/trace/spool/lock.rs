//! Who owns a node's spool folder: a live node holds an exclusive `flock` on `owner.lock` in
//! its folder for as long as it runs, so that no other process writes, replays or adopts the
//! folder meanwhile (see `trace::adoption`).

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lock file in every node folder.
pub const LOCK_FILE: &str = "owner.lock";
/// How long a starting node waits for its own folder's lock: an adopter holds it only while
/// it moves files, and a process of the same node that still runs holds it for good.
const OWN_LOCK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FolderLockError {
    #[error("trace spool folder {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "trace spool folder {path} is locked by another process (another process of the same \
         node, or a node adopting this folder that did not finish within {OWN_LOCK_WAIT:?})"
    )]
    Held { path: PathBuf },
}

/// An exclusive lock on a node folder's `owner.lock`: whoever holds it is the only process
/// that writes, replays or removes the folder's files.
pub struct FolderLock {
    path: PathBuf,
    _file: File,
}

impl FolderLock {
    /// Takes the lock of `dir` if it is free, creating the folder and the lock file as
    /// needed; `Ok(None)` if another process holds it.
    pub fn try_take(dir: &Path) -> std::io::Result<Option<FolderLock>> {
        fs::create_dir_all(dir)?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Ok(None),
                _ => Err(error),
            };
        }
        // An adopter may have removed the file (and the folder) between our open and our
        // lock: a lock on a file no longer at `path` guards nothing.
        let opened = file.metadata()?;
        match fs::metadata(&path) {
            Ok(linked) if linked.dev() == opened.dev() && linked.ino() == opened.ino() => {
                Ok(Some(FolderLock { path, _file: file }))
            }
            _ => Ok(None),
        }
    }

    /// Takes the lock of the node's own folder, waiting a little for an adopter that is
    /// moving the files a previous run of this node left (the folder is then recreated).
    pub fn take_own(dir: &Path) -> Result<FolderLock, FolderLockError> {
        let deadline = std::time::Instant::now() + OWN_LOCK_WAIT;
        loop {
            match FolderLock::try_take(dir) {
                Ok(Some(lock)) => return Ok(lock),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(None) => {
                    return Err(FolderLockError::Held {
                        path: dir.to_path_buf(),
                    })
                }
                Err(source) => {
                    return Err(FolderLockError::Io {
                        path: dir.to_path_buf(),
                        source,
                    })
                }
            }
        }
    }

    /// Gives up the folder on a clean exit: the lock file goes, so that an empty folder can
    /// be removed.
    pub fn release(self) {
        let _ = fs::remove_file(&self.path);
    }
}

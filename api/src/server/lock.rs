//! The lock file beside the API socket: `<socket>.lock`, held with
//! `flock(LOCK_EX | LOCK_NB)` for the server's life. Only its holder may
//! inspect, remove or bind the socket path, so two servers started on one
//! path cannot both take a stale socket for theirs and unlink each other's.
//! The kernel drops the lock when its holder exits, however it exits, so a
//! lock file left by a killed server never blocks the next one.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{ApiError, FileIdentity};

/// Mode of a lock file the server creates.
const LOCK_MODE: u32 = 0o600;

/// How many times a lock file replaced under our feet is opened again
/// before giving up (each replacement is a server releasing it meanwhile).
const ATTEMPTS: usize = 8;

/// The path of `socket`'s lock file: `<socket>.lock`.
pub(super) fn lock_path(socket: &Path) -> PathBuf {
    let mut path = OsString::from(socket.as_os_str());
    path.push(".lock");
    PathBuf::from(path)
}

/// The exclusive lock on a socket's lock file. Dropping it removes the file
/// (while still holding the lock) and releases the lock.
#[derive(Debug)]
pub(super) struct SocketLock {
    path: PathBuf,
    identity: FileIdentity,
    /// Holds the lock until it is closed.
    _file: File,
}

impl SocketLock {
    /// Takes the lock of `socket`, creating its lock file if need be; fails
    /// with [`ApiError::Locked`] if another server holds it.
    pub(super) fn acquire(socket: &Path) -> Result<Self, ApiError> {
        let path = lock_path(socket);
        for _ in 0..ATTEMPTS {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(LOCK_MODE)
                // Never create or lock a file a symbolic link points to.
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|source| ApiError::OpenLock {
                    path: path.clone(),
                    source,
                })?;
            let metadata = file.metadata().map_err(|source| ApiError::OpenLock {
                path: path.clone(),
                source,
            })?;
            if !metadata.is_file() {
                return Err(ApiError::LockNotAFile(path));
            }
            match try_lock(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(ApiError::Locked {
                        socket: socket.to_owned(),
                        lock: path,
                    })
                }
                Err(source) => return Err(ApiError::Lock { path, source }),
            }
            // The previous holder removes the file before releasing it: if it
            // did so between our open() and flock(), we hold the lock of a
            // file nobody else will ever open. Open the path again.
            let identity = (metadata.dev(), metadata.ino());
            match std::fs::symlink_metadata(&path) {
                Ok(now) if (now.dev(), now.ino()) == identity => {
                    return Ok(Self {
                        path,
                        identity,
                        _file: file,
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(ApiError::OpenLock { path, source }),
            }
        }
        Err(ApiError::Locked {
            socket: socket.to_owned(),
            lock: path,
        })
    }
}

impl Drop for SocketLock {
    fn drop(&mut self) {
        // Removed while locked, so that whoever locks it next checks the path
        // again; left alone if someone else has put a file there since.
        let still_ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.identity)
            .unwrap_or(false);
        if still_ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!(
                    "Cannot remove the API socket's lock file {}: {e}",
                    self.path.display()
                );
            }
        }
        // Closing the file (dropping `_file`) releases the lock.
    }
}

/// `flock(LOCK_EX | LOCK_NB)` on `file`; fails with `WouldBlock` if another
/// open file description holds a lock on it.
fn try_lock(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: flock() on a descriptor `file` owns and keeps open for the
        // call; it touches no memory of ours.
        #[allow(unsafe_code)]
        let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_sits_beside_the_socket() {
        assert_eq!(
            lock_path(Path::new("/run/pvmm.sock")),
            Path::new("/run/pvmm.sock.lock")
        );
    }
}

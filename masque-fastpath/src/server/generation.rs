//! Which process generation this proxy is (`server/route.rs`), and whether the other one is
//! alive.
//!
//! Two proxies may run at once with the same `quic.reset_key_file` (a new one started before
//! the old one has finished). Each takes one of two lock files next to the key,
//! `<reset_key_file>.gen0` and `.gen1` (flock(2), released by the kernel when the process dies,
//! however it dies), and draws its connection IDs among its generation's route values. A
//! datagram for an unknown connection ID of the other generation is not reset while the other
//! generation's lock is held: that connection may be alive in the other process, which gets it
//! (`server/peer.rs`: a graceful restart, both on one port) or, on another port, it is dropped.
//! Once the lock is free, it is reset like any other. Without a key file there is one process
//! per key: generation 0, and no other.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// This process's generation and its lock.
pub struct Generation {
    ours: u8,
    /// Held while the process lives (`None` without a key file).
    _lock: Option<File>,
    /// The other generation's lock file.
    other: Option<PathBuf>,
    /// The other generation's lock was held when last looked at ([`Generation::refresh`]).
    other_live: AtomicBool,
}

impl Generation {
    /// Takes the first free generation of the key at `key_file`; generation 0 without one.
    pub fn claim(key_file: Option<&Path>) -> Result<Generation, String> {
        let Some(key) = key_file else {
            return Ok(Generation {
                ours: 0,
                _lock: None,
                other: None,
                other_live: AtomicBool::new(false),
            });
        };
        for ours in 0..2u8 {
            let path = lock_path(key, ours);
            let file = open(&path)?;
            if try_lock(&file) {
                let g = Generation {
                    ours,
                    _lock: Some(file),
                    other: Some(lock_path(key, 1 - ours)),
                    other_live: AtomicBool::new(false),
                };
                g.refresh();
                return Ok(g);
            }
        }
        Err(format!(
            "quic.reset_key_file {}: two proxies already run with this key (both {}.gen0 and .gen1 are locked)",
            key.display(),
            key.display()
        ))
    }

    /// This process's generation.
    pub fn ours(&self) -> u8 {
        self.ours
    }

    /// Whether a process of the other generation was alive when last looked at.
    pub fn other_live(&self) -> bool {
        self.other_live.load(Ordering::Relaxed)
    }

    /// Looks again whether the other generation's process lives (its lock is held).
    pub fn refresh(&self) {
        let live = self.other.as_deref().is_some_and(|path| match open(path) {
            // Free: taken and given back at once (closing the file releases it).
            Ok(f) => !try_lock(&f),
            Err(_) => false,
        });
        self.other_live.store(live, Ordering::Relaxed);
    }
}

fn lock_path(key: &Path, generation: u8) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(format!(".gen{generation}"));
    PathBuf::from(p)
}

fn open(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// An exclusive lock without waiting; false when another open file holds it.
#[allow(unsafe_code)]
fn try_lock(file: &File) -> bool {
    // SAFETY: flock takes a descriptor this process owns (for as long as `file` lives) and two
    // flags; it touches no memory of ours.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_processes_take_the_two_generations_and_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("reset.key");
        let a = Generation::claim(Some(&key)).unwrap();
        assert_eq!(a.ours(), 0);
        assert!(!a.other_live());
        let b = Generation::claim(Some(&key)).unwrap();
        assert_eq!(b.ours(), 1);
        assert!(b.other_live());
        a.refresh();
        assert!(a.other_live());
        let e = Generation::claim(Some(&key)).err().unwrap();
        assert!(e.contains("two proxies already run"), "{e}");
        drop(a);
        b.refresh();
        assert!(!b.other_live(), "the first one is gone");
        // A new one takes the free generation.
        assert_eq!(Generation::claim(Some(&key)).unwrap().ours(), 0);
        let none = Generation::claim(None).unwrap();
        assert_eq!((none.ours(), none.other_live()), (0, false));
    }
}

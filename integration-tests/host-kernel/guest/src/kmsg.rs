//! Reading new kernel log records from `/dev/kmsg` (e.g. DMAR faults).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// A reader of kernel log records written after it was opened.
pub struct Kmsg {
    file: File,
}

impl Kmsg {
    /// Opens `path` (normally `/dev/kmsg`) positioned after the last record.
    pub fn open_at_end(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        file.seek(SeekFrom::End(0))?;
        Ok(Self { file })
    }

    /// The messages of every record logged since the last call.
    pub fn read_new(&mut self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.push(message(&String::from_utf8_lossy(&buf[..n]))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // A record overwritten before we read it; go on with the next.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Waits up to `timeout` for a record whose message contains every one of
    /// `needles`, and returns it.
    pub fn wait_for(&mut self, needles: &[&str], timeout: Duration) -> io::Result<Option<String>> {
        let start = Instant::now();
        loop {
            if let Some(m) = self
                .read_new()?
                .into_iter()
                .find(|m| needles.iter().all(|n| m.contains(n)))
            {
                return Ok(Some(m));
            }
            if start.elapsed() > timeout {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The message of a record `prio,seq,time,flags;message\n[continuation]`.
fn message(record: &str) -> String {
    let text = record.split_once(';').map_or(record, |(_, m)| m);
    text.lines().next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_strips_the_record_header() {
        assert_eq!(
            message(
                "3,512,1234567,-;DMAR: [DMA Write NO_PASID] fault addr 0x800000\n SUBSYSTEM=pci\n"
            ),
            "DMAR: [DMA Write NO_PASID] fault addr 0x800000"
        );
        assert_eq!(message("no header"), "no header");
    }

    #[test]
    fn reads_records_from_a_file_opened_at_its_end() {
        let path = std::env::temp_dir().join(format!("hk-kmsg-{}", std::process::id()));
        std::fs::write(&path, "6,1,0,-;old\n").expect("write");
        let mut k = Kmsg::open_at_end(&path).expect("open");
        assert!(k.read_new().expect("read").is_empty());
        std::fs::write(&path, "6,1,0,-;old\n6,2,0,-;new DMAR fault\n").expect("write");
        // A plain file yields everything after the old end in one read.
        let found = k
            .wait_for(&["DMAR"], Duration::from_millis(10))
            .expect("read");
        assert_eq!(found.as_deref(), Some("new DMAR fault"));
        std::fs::remove_file(&path).expect("cleanup");
    }
}

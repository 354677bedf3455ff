//! PCI devices in sysfs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where the kernel lists PCI devices.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// QEMU's educational device, `-device edu`.
pub const EDU_VENDOR: u16 = 0x1234;
pub const EDU_DEVICE: u16 = 0x11e8;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot list {0}")]
    List(String, #[source] io::Error),
    #[error("No PCI device {vendor:04x}:{device:04x} in {dir}")]
    NotFound {
        vendor: u16,
        device: u16,
        dir: String,
    },
}

/// Reads a `0x1234`-style hexadecimal sysfs attribute.
fn read_hex(path: &Path) -> Option<u16> {
    let text = fs::read_to_string(path).ok()?;
    u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Sysfs paths of every PCI device `vendor:device` under `dir`, sorted.
pub fn find_in(dir: &Path, vendor: u16, device: u16) -> Result<Vec<PathBuf>, Error> {
    let entries = fs::read_dir(dir).map_err(|e| Error::List(dir.display().to_string(), e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            read_hex(&p.join("vendor")) == Some(vendor)
                && read_hex(&p.join("device")) == Some(device)
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The sysfs path of the first `vendor:device` PCI device.
pub fn find_one(vendor: u16, device: u16) -> Result<PathBuf, Error> {
    let dir = Path::new(SYSFS_PCI_DEVICES);
    find_in(dir, vendor, device)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::NotFound {
            vendor,
            device,
            dir: dir.display().to_string(),
        })
}

/// The name of the driver bound to the device at `sysfs`, if any.
pub fn driver(sysfs: &Path) -> Option<String> {
    let link = fs::read_link(sysfs.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Every PCI device under `dir` that is not `vendor:device`, sorted.
pub fn others_in(dir: &Path, vendor: u16, device: u16) -> Result<Vec<PathBuf>, Error> {
    let entries = fs::read_dir(dir).map_err(|e| Error::List(dir.display().to_string(), e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            !(read_hex(&p.join("vendor")) == Some(vendor)
                && read_hex(&p.join("device")) == Some(device))
        })
        .collect();
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_device(root: &Path, bdf: &str, vendor: &str, device: &str) {
        let d = root.join(bdf);
        fs::create_dir_all(&d).expect("mkdir");
        fs::write(d.join("vendor"), format!("{vendor}\n")).expect("vendor");
        fs::write(d.join("device"), format!("{device}\n")).expect("device");
    }

    #[test]
    fn finds_devices_by_id() {
        let root = std::env::temp_dir().join(format!("hk-pci-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fake_device(&root, "0000:00:04.0", "0x1234", "0x11e8");
        fake_device(&root, "0000:00:00.0", "0x8086", "0x29c0");
        fake_device(&root, "0000:00:03.0", "0x1234", "0x11e8");
        fake_device(&root, "0000:00:05.0", "garbage", "0x11e8");

        let edu = find_in(&root, EDU_VENDOR, EDU_DEVICE).expect("list");
        assert_eq!(
            edu,
            vec![root.join("0000:00:03.0"), root.join("0000:00:04.0")]
        );
        let others = others_in(&root, EDU_VENDOR, EDU_DEVICE).expect("list");
        assert_eq!(
            others,
            vec![root.join("0000:00:00.0"), root.join("0000:00:05.0")]
        );
        assert_eq!(driver(&root.join("0000:00:03.0")), None);
        assert!(matches!(
            find_in(&root.join("missing"), 1, 2),
            Err(Error::List(..))
        ));
        fs::remove_dir_all(&root).expect("cleanup");
    }
}

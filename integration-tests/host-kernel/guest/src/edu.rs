//! A user-space driver for QEMU's educational PCI device (`-device edu`,
//! hw/misc/edu.c), through VFIO region reads and writes.
//!
//! BAR0 registers used here: 0x00 identification (0x010000ed), 0x04 liveness
//! (reads back the inverse of what was written), 0x80 DMA source, 0x88 DMA
//! destination, 0x90 DMA count, 0x98 DMA command (bit 0 start, cleared by the
//! device when done; bit 1 direction, set = from the device to RAM; bit 2
//! raise an interrupt). The device's side of a DMA is a 4 KiB buffer at
//! device address 0x40000, and the device masks bus addresses to 28 bits.
//! QEMU 7.2 aborts (hw_error) on a transfer outside the buffer, and its bounds
//! check wrongly counts a transfer ending at the buffer's last byte as outside
//! too, so [`Edu::dma`] refuses anything past [`DMA_MAX_END`] before it
//! reaches the device. A DMA that the IOMMU blocks is not
//! reported by the device: reads return zeros, writes are dropped.

use std::io;
use std::thread;
use std::time::{Duration, Instant};

use vfio_ioctls::VfioDevice;

use devices::vfio::VfioHw;

/// VFIO region index of BAR0 (`VFIO_PCI_BAR0_REGION_INDEX`).
pub const BAR0_REGION: u32 = 0;
/// VFIO region index of the config space (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const CONFIG_REGION: u32 = 7;

const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

const REG_ID: u64 = 0x00;
const REG_LIVENESS: u64 = 0x04;
const REG_DMA_SRC: u64 = 0x80;
const REG_DMA_DST: u64 = 0x88;
const REG_DMA_COUNT: u64 = 0x90;
const REG_DMA_CMD: u64 = 0x98;
const CMD_START: u32 = 1 << 0;
const CMD_TO_RAM: u32 = 1 << 1;

/// What the identification register reads.
pub const EDU_ID: u32 = 0x0100_00ed;
/// Device address of the device's DMA buffer.
pub const DMA_BUF_ADDR: u64 = 0x40000;
/// Size of the device's DMA buffer.
pub const DMA_BUF_SIZE: usize = 4096;
/// End (exclusive) of what a transfer may touch in the buffer: QEMU 7.2's
/// `edu_check_range` rejects a transfer whose end equals the buffer's end.
pub const DMA_MAX_END: u64 = DMA_BUF_SIZE as u64 - 1;
/// The device's DMA address mask (28 bits).
pub const DMA_MASK: u64 = (1 << 28) - 1;
/// How long a DMA may take: the device runs it from a 100 ms virtual timer.
pub const DMA_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the edu driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot access VFIO region {region} at {offset:#x}")]
    Region {
        region: u32,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("VFIO region {region} has no offset {offset:#x}+{len}")]
    RegionRange {
        region: u32,
        offset: u64,
        len: usize,
    },
    #[error("Not an edu device: identification register reads {0:#010x}")]
    BadId(u32),
    #[error("DMA of {len} bytes at buffer offset {buf_offset:#x} leaves the device's buffer (4095 usable bytes)")]
    BufferRange { buf_offset: u64, len: usize },
    #[error("DMA of {len} bytes at IOVA {iova:#x} is beyond the device's 28-bit DMA mask")]
    Mask { iova: u64, len: usize },
    #[error("DMA did not finish in {0:?}")]
    Timeout(Duration),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Reads and writes of a device's VFIO regions, by region index.
pub trait RegionAccess {
    fn read_region(&self, region: u32, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn write_region(&self, region: u32, offset: u64, data: &[u8]) -> Result<()>;
}

impl RegionAccess for VfioDevice {
    fn read_region(&self, region: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        VfioHw::read(self, region, offset, buf).map_err(|source| Error::Region {
            region,
            offset,
            source,
        })
    }

    fn write_region(&self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
        VfioHw::write(self, region, offset, data).map_err(|source| Error::Region {
            region,
            offset,
            source,
        })
    }
}

/// Direction of an edu DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Memory at the IOVA is read into the device's buffer.
    RamToDevice,
    /// The device's buffer is written to memory at the IOVA.
    DeviceToRam,
}

/// An edu device behind VFIO.
pub struct Edu<'a, D: RegionAccess + ?Sized> {
    dev: &'a D,
}

impl<'a, D: RegionAccess + ?Sized> Edu<'a, D> {
    /// Enables memory decoding and bus mastering (DMA) in the command
    /// register and checks the identification register.
    pub fn new(dev: &'a D) -> Result<Self> {
        let edu = Self { dev };
        // Decoding first: behind an emulated command register BAR0 answers
        // nothing until memory decoding is on.
        let mut cmd = [0u8; 2];
        dev.read_region(CONFIG_REGION, PCI_COMMAND, &mut cmd)?;
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        dev.write_region(CONFIG_REGION, PCI_COMMAND, &cmd.to_le_bytes())?;
        let id = edu.read32(REG_ID)?;
        if id != EDU_ID {
            return Err(Error::BadId(id));
        }
        Ok(edu)
    }

    fn read32(&self, reg: u64) -> Result<u32> {
        let mut v = [0u8; 4];
        self.dev.read_region(BAR0_REGION, reg, &mut v)?;
        Ok(u32::from_le_bytes(v))
    }

    fn write32(&self, reg: u64, value: u32) -> Result<()> {
        self.dev
            .write_region(BAR0_REGION, reg, &value.to_le_bytes())
    }

    /// Writes `value` to the liveness register and returns what it reads back
    /// (the bitwise inverse on a live device).
    pub fn liveness(&self, value: u32) -> Result<u32> {
        self.write32(REG_LIVENESS, value)?;
        self.read32(REG_LIVENESS)
    }

    /// Runs one DMA of `len` bytes between bus address `iova` and the device
    /// buffer at `buf_offset`, and waits for it to finish.
    pub fn dma(&self, dir: Direction, iova: u64, buf_offset: u64, len: usize) -> Result<()> {
        let DmaRegs {
            iova,
            buf_addr,
            count,
        } = check_dma(iova, buf_offset, len)?;
        let (src, dst, dir_bit) = match dir {
            Direction::RamToDevice => (iova, buf_addr, 0),
            Direction::DeviceToRam => (buf_addr, iova, CMD_TO_RAM),
        };
        self.wait_idle()?;
        self.write32(REG_DMA_SRC, src)?;
        self.write32(REG_DMA_DST, dst)?;
        self.write32(REG_DMA_COUNT, count)?;
        self.write32(REG_DMA_CMD, CMD_START | dir_bit)?;
        self.wait_idle()
    }

    fn wait_idle(&self) -> Result<()> {
        let start = Instant::now();
        while self.read32(REG_DMA_CMD)? & CMD_START != 0 {
            if start.elapsed() > DMA_TIMEOUT {
                return Err(Error::Timeout(DMA_TIMEOUT));
            }
            thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

/// The register values of a checked DMA. Every address is below 2^28, so
/// 32-bit register writes (which the device zero-extends) are exact.
#[derive(Debug, PartialEq, Eq)]
pub struct DmaRegs {
    pub iova: u32,
    pub buf_addr: u32,
    pub count: u32,
}

/// Refuses a DMA the device would clamp or abort on.
pub fn check_dma(iova: u64, buf_offset: u64, len: usize) -> Result<DmaRegs> {
    let buf_ok = len > 0
        && buf_offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= DMA_MAX_END);
    if !buf_ok {
        return Err(Error::BufferRange { buf_offset, len });
    }
    let last = iova.checked_add(len as u64 - 1);
    if last.is_none_or(|last| last > DMA_MASK) {
        return Err(Error::Mask { iova, len });
    }
    let range = Error::BufferRange { buf_offset, len };
    Ok(DmaRegs {
        iova: u32::try_from(iova).map_err(|_| Error::Mask { iova, len })?,
        buf_addr: u32::try_from(DMA_BUF_ADDR + buf_offset).map_err(|_| range)?,
        count: u32::try_from(len).map_err(|_| Error::BufferRange { buf_offset, len })?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// A fake edu: registers in a map, DMA completes at once.
    #[derive(Default)]
    struct FakeEdu {
        regs: RefCell<BTreeMap<(u32, u64), Vec<u8>>>,
        writes: RefCell<Vec<(u32, u64, Vec<u8>)>>,
    }

    impl RegionAccess for FakeEdu {
        fn read_region(&self, region: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
            let v = match (region, offset) {
                (BAR0_REGION, REG_ID) => EDU_ID.to_le_bytes().to_vec(),
                (BAR0_REGION, REG_DMA_CMD) => vec![0; 4],
                _ => self
                    .regs
                    .borrow()
                    .get(&(region, offset))
                    .cloned()
                    .unwrap_or_else(|| vec![0; buf.len()]),
            };
            buf.copy_from_slice(&v[..buf.len()]);
            Ok(())
        }

        fn write_region(&self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
            let stored = if (region, offset) == (BAR0_REGION, REG_LIVENESS) {
                let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
                (!v).to_le_bytes().to_vec()
            } else {
                data.to_vec()
            };
            self.regs.borrow_mut().insert((region, offset), stored);
            self.writes
                .borrow_mut()
                .push((region, offset, data.to_vec()));
            Ok(())
        }
    }

    #[test]
    fn new_enables_memory_and_bus_master() {
        let fake = FakeEdu::default();
        let edu = Edu::new(&fake).expect("edu");
        let cmd = fake.regs.borrow()[&(CONFIG_REGION, PCI_COMMAND)].clone();
        assert_eq!(cmd, vec![0x06, 0x00]);
        assert_eq!(edu.liveness(0x1234_5678).expect("liveness"), !0x1234_5678);
    }

    #[test]
    fn dma_programs_registers_in_order() {
        let fake = FakeEdu::default();
        let edu = Edu::new(&fake).expect("edu");
        fake.writes.borrow_mut().clear();
        edu.dma(Direction::DeviceToRam, 0x3000, 0x10, 0x20)
            .expect("dma");
        let writes = fake.writes.borrow().clone();
        let expect = vec![
            (BAR0_REGION, REG_DMA_SRC, 0x40010u32.to_le_bytes().to_vec()),
            (BAR0_REGION, REG_DMA_DST, 0x3000u32.to_le_bytes().to_vec()),
            (BAR0_REGION, REG_DMA_COUNT, 0x20u32.to_le_bytes().to_vec()),
            (BAR0_REGION, REG_DMA_CMD, 3u32.to_le_bytes().to_vec()),
        ];
        assert_eq!(writes, expect);

        fake.writes.borrow_mut().clear();
        edu.dma(Direction::RamToDevice, 0x5000, 0, 4095)
            .expect("dma");
        let writes = fake.writes.borrow().clone();
        assert_eq!(writes[0].2, 0x5000u32.to_le_bytes());
        assert_eq!(writes[1].2, 0x40000u32.to_le_bytes());
        assert_eq!(writes[3].2, 1u32.to_le_bytes());
    }

    #[test]
    fn bad_id_is_refused() {
        struct NotEdu;
        impl RegionAccess for NotEdu {
            fn read_region(&self, _: u32, _: u64, buf: &mut [u8]) -> Result<()> {
                buf.fill(0xff);
                Ok(())
            }
            fn write_region(&self, _: u32, _: u64, _: &[u8]) -> Result<()> {
                Ok(())
            }
        }
        assert!(matches!(Edu::new(&NotEdu), Err(Error::BadId(0xffff_ffff))));
    }

    #[test]
    fn dma_outside_buffer_or_mask_is_refused_before_the_device() {
        assert!(check_dma(0, 0, 4095).is_ok());
        assert!(check_dma(0, 4094, 1).is_ok());
        assert!(check_dma(DMA_MASK, 0, 1).is_ok());
        // QEMU 7.2 would abort on these two.
        assert!(matches!(
            check_dma(0, 0, 4096),
            Err(Error::BufferRange { .. })
        ));
        assert!(matches!(
            check_dma(0, 4095, 1),
            Err(Error::BufferRange { .. })
        ));
        assert!(matches!(check_dma(0, 0, 0), Err(Error::BufferRange { .. })));
        assert!(matches!(
            check_dma(0, 1, 4096),
            Err(Error::BufferRange { .. })
        ));
        assert!(matches!(
            check_dma(0, 0, 4097),
            Err(Error::BufferRange { .. })
        ));
        assert!(matches!(
            check_dma(0, u64::MAX, 1),
            Err(Error::BufferRange { .. })
        ));
        assert!(matches!(check_dma(DMA_MASK, 0, 2), Err(Error::Mask { .. })));
        assert!(matches!(check_dma(u64::MAX, 0, 2), Err(Error::Mask { .. })));

        let fake = FakeEdu::default();
        let edu = Edu::new(&fake).expect("edu");
        fake.writes.borrow_mut().clear();
        assert!(edu.dma(Direction::RamToDevice, 1 << 28, 0, 8).is_err());
        assert!(
            fake.writes.borrow().is_empty(),
            "nothing reached the device"
        );
    }
}

//! VFIO PCI passthrough: a host PCI function, bound to vfio-pci, given to
//! the guest ([`VfioPciDevice`]).
//!
//! - Opening: the device cdev `/dev/vfio/devices/vfioN` of a sysfs path,
//!   bound to an iommufd (`vfio-ioctls`, feature `vfio_cdev`); its DMA is
//!   then steered by the pvIOMMU's IOMMUFD backend through
//!   [`VfioPciDevice::attach_handle`] and [`VfioPciDevice::iommufd_dev_id`].
//!   Where `/dev/iommu` is missing, the legacy VFIO container/group path
//!   ([`VfioPciDevice::open_legacy`]): guest RAM is then mapped with the
//!   container's `vfio_dma_map`, and only direct attach is possible.
//!   [`HostIommu::open`] picks one, [`VfioPciDevice::open_with`] uses it.
//! - Configuration space: the device's own, except the BARs and the command
//!   register (emulated: the guest programs addresses the VMM decodes), the
//!   expansion ROM (hidden: reads 0), MSI (intercepted: the guest's address
//!   and data become routes of eventfds, [`MsiRoutes`], which the VMM
//!   implements with KVM GSI routing and irqfds) and MSI-X (intercepted the
//!   same way: the control word and the vector table are shadowed, the
//!   table and PBA pages are never mapped into the guest, and each unmasked
//!   vector's eventfd is routed to the address and data the guest wrote).
//! - BARs: the parts VFIO lets this process mmap (the whole region, or its
//!   sparse-mmap areas) are mapped and handed to the VMM as guest memory
//!   slots ([`BarSlots`], KVM_SET_USER_MEMORY_REGION) wherever the guest
//!   puts the BAR; every other access is trapped and forwarded with VFIO
//!   region reads and writes ([`BusDevice`]).
//! - The device is reset when opened and when dropped (if it supports it).
//! - [`Passthrough`]: one VM's `/dev/iommu` and IOMMUFD backend, through
//!   which the VMM opens devices and registers them with the pvIOMMU.
//!
//! Where each part lives: `open.rs` opens devices ([`HostIommu`],
//! [`check_vfio_pci`]); `hw.rs` is what the device needs of VFIO
//! ([`VfioHw`]: region I/O, interrupts, reset, mmaps as [`HostMapping`]);
//! `hooks.rs` is what it needs of the VMM ([`VfioHooks`]); `msi.rs` and
//! `msix.rs` are its interrupts; `passthrough.rs` is [`Passthrough`]. This
//! file is the device itself: its configuration space and BARs as the
//! guest sees them.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use iommufd_ioctls::{AttachHwpt, IommufdError};
use vfio_ioctls::{VfioDevice, VfioError};
use vmm_sys_util::eventfd::EventFd;

mod hooks;
mod hw;
mod msi;
mod msix;
mod open;
mod passthrough;

pub use hooks::{BarSlots, DmaSync, MsiRoutes, VfioHooks};
use hw::bar_region;
pub use hw::{HostMapping, VfioHw, CONFIG_REGION, ROM_REGION};
use msi::{Msi, CAP_ID_MSI};
use msix::{subtract_holes, Msix};
pub use open::{check_vfio_pci, HostIommu};
pub use passthrough::{Passthrough, PassthroughError};

use super::bus::BusDevice;
use super::pci::{
    reg, BarKind, PciBarRegion, PciConfiguration, PciDevice, PciError, PciHeader,
    COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MEMORY, NUM_BARS,
};
use crate::guest_warn;
use resources::ErrorChain;

const PAGE_SIZE: u64 = 4096;

const CAP_ID_MSIX: u8 = 0x11;
/// Bytes of the BAR registers (six dwords).
const BARS_LEN: u16 = 24;
const _: () = assert!(BARS_LEN as usize == 4 * NUM_BARS);

/// Command register bits the guest controls on the device.
const COMMAND_PASSTHROUGH: u16 =
    COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;

/// Errors of VFIO device set-up (guest accesses never fail: they are
/// checked, and a host error reads as all ones or drops the write).
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    /// The sysfs path has no `vfio-dev/`.
    #[error("{path} is not a VFIO device (driver: {driver}): bind it to vfio-pci first")]
    NotVfioDevice {
        /// The sysfs path.
        path: PathBuf,
        /// The driver it is bound to, or "none".
        driver: String,
    },
    /// VFIO_DEVICE_BIND_IOMMUFD refused: someone else has the device.
    #[error("{path} is already bound to an iommufd (opened by another user)")]
    AlreadyBound {
        /// The sysfs path.
        path: PathBuf,
        /// The VFIO error.
        #[source]
        source: VfioError,
    },
    /// Another VFIO failure.
    #[error("VFIO set-up of {path} failed")]
    Vfio {
        /// The sysfs path.
        path: PathBuf,
        /// The VFIO error.
        #[source]
        source: VfioError,
    },
    /// The configuration space could not be read.
    #[error("Cannot read the configuration space")]
    Config(#[source] io::Error),
    /// Neither `/dev/iommu` nor the legacy `/dev/vfio/vfio` is usable.
    #[error(
        "No host IOMMU interface: /dev/iommu is missing and the VFIO container cannot be opened"
    )]
    NoHostIommu(#[source] VfioError),
    /// `/dev/iommu` exists but cannot be opened.
    #[error("Cannot open /dev/iommu")]
    OpenIommufd(#[source] IommufdError),
    /// A BAR the device reports does not fit the emulated header.
    #[error("BAR {index} cannot be emulated")]
    Bar {
        /// BAR index.
        index: usize,
        /// Why.
        #[source]
        source: PciError,
    },
}

/// An mmapped part of a BAR, as [`VfioPciDevice::bar_mappings`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMapping {
    /// BAR index.
    pub index: usize,
    /// Offset of the area in the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where it is mapped in this process.
    pub host: *mut u8,
    /// Its guest memory slot, while the guest decodes the BAR.
    pub slot: Option<u32>,
}

/// An mmapped part of a BAR and where the guest sees it.
struct BarArea {
    index: usize,
    offset: u64,
    map: HostMapping,
    slot: Option<u32>,
}

/// A host PCI function passed through to the guest with VFIO.
pub struct VfioPciDevice {
    hw: Arc<dyn VfioHw>,
    /// The VFIO device, when opened for real (not in unit tests).
    device: Option<Arc<VfioDevice>>,
    /// What keeps the device's iommufd binding or container alive.
    _owner: Option<Arc<dyn std::any::Any + Send + Sync>>,
    dev_id: Option<u32>,
    /// The guest's header: BARs and command register.
    config: PciConfiguration,
    msi: Option<Msi>,
    msi_fds: Vec<EventFd>,
    msix: Option<Msix>,
    msix_fds: Vec<EventFd>,
    /// Which MSI-X vectors have a route now.
    msix_routed: Vec<bool>,
    routes: Option<Arc<dyn MsiRoutes>>,
    bar_slots: Option<Arc<dyn BarSlots>>,
    bar_areas: Vec<BarArea>,
    dma_sync: Option<Arc<dyn DmaSync>>,
}

impl VfioPciDevice {
    /// A device on `hw`: resets it, builds the guest's configuration space
    /// from the device's and, with `hooks.bar_slots`, mmaps what it can of
    /// the memory BARs.
    pub fn from_hw(hw: Arc<dyn VfioHw>, hooks: VfioHooks) -> Result<Self, VfioPciError> {
        hw.reset();
        let mut raw = [0u8; 256];
        hw.read(CONFIG_REGION, 0, &mut raw)
            .map_err(VfioPciError::Config)?;
        let u16_at = |o: usize| u16::from_le_bytes([raw[o], raw[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: u16_at(0),
            device_id: u16_at(2),
            revision: raw[8],
            prog_if: raw[9],
            subclass: raw[10],
            class: raw[11],
            subsystem_vendor_id: u16_at(0x2c),
            subsystem_id: u16_at(0x2e),
            interrupt_pin: raw[0x3d],
        });
        let mut index = 0;
        while index < NUM_BARS {
            let bar = u32_at(usize::from(reg::BAR0) + 4 * index);
            let size = hw.region_size(bar_region(index));
            let (kind, slots) = if bar & 1 != 0 {
                (BarKind::Io, 1)
            } else if (bar >> 1) & 0x3 == 0b10 {
                (BarKind::Mmio64, 2)
            } else {
                (BarKind::Mmio32, 1)
            };
            if size != 0 {
                let min = if kind == BarKind::Io { 4 } else { 16 };
                let size = size.max(min).next_power_of_two();
                config
                    .add_bar(index, size, kind, bar & 0x8 != 0 && kind != BarKind::Io)
                    .map_err(|source| VfioPciError::Bar { index, source })?;
            }
            index += slots;
        }
        // The guest starts with decoding and DMA off, as after reset.
        let mut msi = None;
        let mut msix = None;
        let mut ptr = raw[usize::from(reg::CAPABILITIES)] & !0x3;
        let mut caps = 0;
        while ptr >= 0x40 && caps < 48 {
            caps += 1;
            let o = usize::from(ptr);
            let (id, next) = (raw[o], raw[o + 1] & !0x3);
            match id {
                CAP_ID_MSI => msi = Some(Msi::new(u16::from(ptr), u16_at(o + 2))),
                CAP_ID_MSIX => msix = Msix::parse(u16::from(ptr), &raw),
                _ => {}
            }
            ptr = next;
        }
        let mut bar_areas = Vec::new();
        // A device whose doorbells must sync its translations first keeps
        // every BAR access trapped.
        if hooks.bar_slots.is_some() && hooks.dma_sync.is_none() {
            for (index, _, kind) in config.declared_bars() {
                if kind == BarKind::Io {
                    continue;
                }
                let region = bar_region(index);
                let holes = msix.as_ref().map(|m| m.holes()).unwrap_or_default();
                for (offset, size) in subtract_holes(index, hw.mmap_areas(region), &holes) {
                    if offset % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || size == 0 {
                        continue; // KVM slots are page-granular: leave it trapped
                    }
                    match hw.mmap(region, offset, size) {
                        Ok(map) => bar_areas.push(BarArea {
                            index,
                            offset,
                            map,
                            slot: None,
                        }),
                        Err(e) => log::warn!("VFIO: cannot mmap BAR {index} at {offset:#x}: {e}"),
                    }
                }
            }
        }
        Ok(Self {
            hw,
            device: None,
            _owner: None,
            dev_id: None,
            config,
            msi,
            msi_fds: Vec::new(),
            msix,
            msix_fds: Vec::new(),
            msix_routed: Vec::new(),
            routes: hooks.msi,
            bar_slots: hooks.bar_slots,
            bar_areas,
            dma_sync: hooks.dma_sync,
        })
    }

    /// The iommufd device id (VFIO_DEVICE_BIND_IOMMUFD), for the IOMMUFD
    /// backend; None on the legacy path.
    pub fn iommufd_dev_id(&self) -> Option<u32> {
        self.dev_id
    }

    /// The BAR areas mmapped for direct guest access.
    pub fn bar_mappings(&self) -> Vec<BarMapping> {
        self.bar_areas
            .iter()
            .map(|a| BarMapping {
                index: a.index,
                offset: a.offset,
                len: a.map.len() as u64,
                host: a.map.as_ptr(),
                slot: a.slot,
            })
            .collect()
    }

    /// What the IOMMUFD backend attaches to page tables.
    pub fn attach_handle(&self) -> Option<Arc<dyn AttachHwpt>> {
        self.device
            .as_ref()
            .map(|d| Arc::clone(d) as Arc<dyn AttachHwpt>)
    }

    /// The VFIO device (for region details and the legacy container).
    pub fn vfio_device(&self) -> Option<&Arc<VfioDevice>> {
        self.device.as_ref()
    }

    /// The value the guest reads for the dword at `reg`.
    fn read_dword(&self, reg: u16) -> u32 {
        let hw = || {
            let mut b = [0u8; 4];
            match self.hw.read(CONFIG_REGION, u64::from(reg), &mut b) {
                Ok(()) => u32::from_le_bytes(b),
                Err(_) => u32::MAX,
            }
        };
        if (reg::BAR0..reg::BAR0 + BARS_LEN).contains(&reg) {
            return self.config.read_u32(reg);
        }
        if reg == reg::ROM_ADDRESS {
            return 0; // expansion ROM hidden
        }
        if reg == reg::COMMAND {
            return (hw() & 0xffff_0000) | u32::from(self.config.command());
        }
        if let Some(msi) = &self.msi {
            if (msi.offset..msi.offset + msi.len()).contains(&reg) {
                return msi.read_dword(reg, if reg == msi.offset { hw() } else { 0 });
            }
        }
        match &self.msix {
            Some(m) if reg == m.cap => m.read_header(hw()),
            _ => hw(),
        }
    }

    /// The BAR decoded at `base`, if any.
    fn bar_at(&self, base: u64) -> Option<PciBarRegion> {
        self.config
            .decoded_bars()
            .into_iter()
            .find(|r| r.addr == base)
    }
}

impl PciDevice for VfioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    /// The device's own configuration space, but for what is emulated (see
    /// the module's documentation).
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        let reg = offset & !3;
        let v = self.read_dword(reg).to_le_bytes();
        let start = usize::from(offset - reg);
        match v.get(start..start + data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0xff),
        }
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        let reg = offset & !3;
        let start = usize::from(offset - reg);
        if start + data.len() > 4 {
            return;
        }
        if reg == reg::COMMAND && start < 2 {
            self.config.write(offset, data);
            let cmd = self.config.command() & COMMAND_PASSTHROUGH;
            let _ = self
                .hw
                .write(CONFIG_REGION, u64::from(reg::COMMAND), &cmd.to_le_bytes());
            return;
        }
        if (reg::BAR0..reg::BAR0 + BARS_LEN).contains(&reg) {
            self.config.write(offset, data);
            return;
        }
        if reg == reg::ROM_ADDRESS {
            return;
        }
        if let Some(mut msi) = self.msi {
            if (msi.offset..msi.offset + msi.len()).contains(&reg) {
                let was = msi.enabled();
                let mut v = msi.read_dword(reg, 0).to_le_bytes();
                v[start..start + data.len()].copy_from_slice(data);
                msi.write_dword(reg, u32::from_le_bytes(v));
                self.msi = Some(msi);
                self.update_msi(was);
                return;
            }
        }
        if let Some(m) = &mut self.msix {
            if reg == m.cap {
                // Only the control word (bytes 2-3) is writable.
                let mut v = m.read_header(0).to_le_bytes();
                v[start..start + data.len()].copy_from_slice(data);
                if m.write_control(u16::from_le_bytes([v[2], v[3]])) {
                    self.update_msix();
                }
                return;
            }
            if reg > m.cap && reg < m.cap + 12 {
                return; // table and PBA locations are read-only
            }
        }
        let _ = self.hw.write(CONFIG_REGION, u64::from(offset), data);
    }

    fn bar_moved(&mut self, index: usize, _old: Option<u64>, new: Option<u64>) {
        let Some(slots) = self.bar_slots.clone() else {
            return;
        };
        for area in self.bar_areas.iter_mut().filter(|a| a.index == index) {
            if let Some(slot) = area.slot {
                if let Err(e) = slots.remove(slot) {
                    // The slot still points at the mapping: keep both (the
                    // guest keeps reaching the BAR where it was) rather than
                    // add a second slot or ever unmap what KVM maps.
                    guest_warn!(
                        "VFIO: cannot remove the slot of BAR {index}: {}",
                        ErrorChain(&e)
                    );
                    continue;
                }
                area.slot = None;
            }
            let Some(gpa) = new.and_then(|base| base.checked_add(area.offset)) else {
                continue;
            };
            // SAFETY: `area.map` is this device's mapping of the BAR area,
            // accessed only through raw pointers; it is unmapped only in
            // `drop`, after its slot is removed (a mapping whose slot KVM
            // keeps is leaked, never unmapped), and this loop removes an
            // area's slot before it adds another.
            #[allow(unsafe_code)]
            let added = unsafe { slots.add(gpa, area.map.len() as u64, area.map.as_ptr()) };
            match added {
                Ok(slot) => area.slot = Some(slot),
                // Still correct, only slower: accesses trap to BusDevice.
                Err(e) => guest_warn!(
                    "VFIO: BAR {index} at {gpa:#x} stays trapped: {}",
                    ErrorChain(&e)
                ),
            }
        }
    }
}

impl BusDevice for VfioPciDevice {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if let (Some(bar), Some(m)) = (self.bar_at(base), &self.msix) {
            if m.in_table(bar.index, offset, data.len()) {
                m.read_table(offset, data);
                return;
            }
        }
        let ok = self
            .bar_at(base)
            .is_some_and(|bar| self.hw.read(bar_region(bar.index), offset, data).is_ok());
        if !ok {
            data.fill(0xff);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(bar) = self.bar_at(base) else {
            return;
        };
        if let Some(m) = &mut self.msix {
            if m.in_table(bar.index, offset, data.len()) {
                for v in m.write_table(offset, data) {
                    self.sync_msix_vector(v);
                }
                return;
            }
        }
        if let Some(s) = &self.dma_sync {
            s.sync();
        }
        let _ = self.hw.write(bar_region(bar.index), offset, data);
    }
}
impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        // Guest slots go before the mappings they point to. A mapping whose
        // slot KVM would not remove is leaked, never unmapped: the guest
        // could otherwise reach whatever this process maps there next.
        for area in std::mem::take(&mut self.bar_areas) {
            let removed = match (area.slot, &self.bar_slots) {
                (Some(slot), Some(slots)) => slots.remove(slot),
                _ => Ok(()),
            };
            if let Err(e) = removed {
                log::error!(
                    "VFIO: KVM kept the slot of BAR {} ({}): leaking its host mapping",
                    area.index,
                    ErrorChain(&e)
                );
                std::mem::forget(area);
            }
        }
        self.release_interrupts();
        self.hw.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::msi::{MSI_CTRL_64BIT, MSI_CTRL_ENABLE};
    use super::*;
    use std::ptr::NonNull;
    use std::sync::Mutex;

    /// A fake VFIO device: an edu-like config space (BAR0 1 MiB MMIO32, a
    /// 64-bit MSI capability at 0x40 followed by MSI-X at 0x50), a BAR0
    /// region of plain memory, and a record of what reached "hardware".
    struct FakeHw {
        config: Mutex<[u8; 256]>,
        bar0: Mutex<Vec<u8>>,
        writes: Mutex<Vec<(u32, u64, Vec<u8>)>>,
        msi: Mutex<Option<usize>>,
        msix: Mutex<Option<usize>>,
        resets: Mutex<u32>,
    }

    impl FakeHw {
        fn new() -> Arc<Self> {
            let mut c = [0u8; 256];
            c[0..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
            c[6] = 0x10; // status: capability list
            c[8] = 0x10; // revision
            c[0x0b] = 0xff; // class
            c[0x10..0x14].copy_from_slice(&0xfea0_0000u32.to_le_bytes()); // host address
            c[0x30..0x34].copy_from_slice(&0xfeb0_0001u32.to_le_bytes()); // a ROM
            c[0x34] = 0x40;
            c[0x3d] = 1;
            // MSI: id 5, next 0x50, control: 64-bit, 4 vectors capable (MMC=2).
            c[0x40] = CAP_ID_MSI;
            c[0x41] = 0x50;
            c[0x42..0x44].copy_from_slice(&(MSI_CTRL_64BIT | 2 << 1).to_le_bytes());
            // MSI-X: id 0x11, next 0 (end), 4 vectors, table at BAR0 +
            // 0x2000, PBA at BAR0 + 0x3000.
            c[0x50] = CAP_ID_MSIX;
            c[0x51] = 0;
            c[0x52..0x54].copy_from_slice(&3u16.to_le_bytes());
            c[0x54..0x58].copy_from_slice(&0x2000u32.to_le_bytes());
            c[0x58..0x5c].copy_from_slice(&0x3000u32.to_le_bytes());
            Arc::new(Self {
                config: Mutex::new(c),
                bar0: Mutex::new(vec![0; 0x4000]),
                writes: Mutex::new(Vec::new()),
                msi: Mutex::new(None),
                msix: Mutex::new(None),
                resets: Mutex::new(0),
            })
        }
    }

    impl VfioHw for FakeHw {
        fn region_size(&self, index: u32) -> u64 {
            match index {
                0 => 1 << 20,
                CONFIG_REGION => 256,
                _ => 0,
            }
        }
        fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let o = usize::try_from(offset).map_err(io::Error::other)?;
            let src: Vec<u8> = match index {
                CONFIG_REGION => self.config.lock().expect("lock").to_vec(),
                0 => self.bar0.lock().expect("lock").clone(),
                _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            };
            let bytes = src
                .get(o..o + buf.len())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            buf.copy_from_slice(bytes);
            Ok(())
        }
        fn write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
            self.writes
                .lock()
                .expect("lock")
                .push((index, offset, data.to_vec()));
            if index == 0 {
                let o = usize::try_from(offset).map_err(io::Error::other)?;
                self.bar0.lock().expect("lock")[o..o + data.len()].copy_from_slice(data);
            }
            Ok(())
        }
        fn enable_msi(&self, fds: &[&EventFd]) -> io::Result<()> {
            *self.msi.lock().expect("lock") = Some(fds.len());
            Ok(())
        }
        fn disable_msi(&self) -> io::Result<()> {
            *self.msi.lock().expect("lock") = None;
            Ok(())
        }
        fn enable_msix(&self, fds: &[&EventFd]) -> io::Result<()> {
            *self.msix.lock().expect("lock") = Some(fds.len());
            Ok(())
        }
        fn disable_msix(&self) -> io::Result<()> {
            *self.msix.lock().expect("lock") = None;
            Ok(())
        }
        fn reset(&self) {
            *self.resets.lock().expect("lock") += 1;
        }
        fn mmap_areas(&self, index: u32) -> Vec<(u64, u64)> {
            match index {
                // One mappable page, and an area KVM could not take.
                0 => vec![(0x1000, 0x1000), (0x2000, 0x800)],
                _ => Vec::new(),
            }
        }
        #[allow(unsafe_code)]
        fn mmap(&self, _index: u32, _offset: u64, size: u64) -> io::Result<HostMapping> {
            let len = usize::try_from(size).map_err(io::Error::other)?;
            // SAFETY: a new anonymous mapping; the result is checked.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("NULL"))?;
            Ok(HostMapping { ptr, len })
        }
    }

    /// Records slots; refuses GPAs above 4 GiB; fails removals while
    /// `fail_remove` is set.
    #[derive(Default)]
    struct FakeSlots {
        slots: Mutex<Vec<(u32, u64, u64)>>,
        next: Mutex<u32>,
        fail_remove: std::sync::atomic::AtomicBool,
    }

    impl BarSlots for FakeSlots {
        #[allow(unsafe_code)]
        unsafe fn add(&self, gpa: u64, size: u64, _host: *mut u8) -> io::Result<u32> {
            if gpa >= 1 << 32 {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let mut next = self.next.lock().expect("lock");
            *next += 1;
            self.slots.lock().expect("lock").push((*next, gpa, size));
            Ok(*next)
        }
        fn remove(&self, slot: u32) -> io::Result<()> {
            if self.fail_remove.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.slots.lock().expect("lock").retain(|s| s.0 != slot);
            Ok(())
        }
    }

    /// Whether `[ptr, ptr + len)` is mapped in this process.
    #[allow(unsafe_code)]
    fn mapped(ptr: *mut u8, len: u64) -> bool {
        let len = usize::try_from(len).expect("a small mapping");
        // SAFETY: msync only inspects the range; ENOMEM says unmapped.
        unsafe { libc::msync(ptr.cast(), len, libc::MS_ASYNC) == 0 }
    }

    /// Syncs counted, with the BAR writes they came before.
    #[derive(Default)]
    struct CountingSync(std::sync::atomic::AtomicU32);

    impl DmaSync for CountingSync {
        fn sync(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A device whose translations are synced before each doorbell keeps
    /// its BARs trapped (nothing mmapped for the guest) and syncs before
    /// every BAR write reaches the device, not before reads.
    #[test]
    fn dma_sync_runs_before_each_bar_write() {
        let slots = Arc::new(FakeSlots::default());
        let sync = Arc::new(CountingSync::default());
        let hw = FakeHw::new();
        let hooks = VfioHooks {
            msi: None,
            bar_slots: Some(slots.clone() as Arc<dyn BarSlots>),
            dma_sync: Some(sync.clone() as Arc<dyn DmaSync>),
        };
        let mut d = VfioPciDevice::from_hw(hw.clone(), hooks).expect("device");
        d.set_bar_address(0, 0xc000_0000).expect("BAR 0");
        d.write_config(0x04, &[0x02, 0]); // memory decoding on
        d.bar_moved(0, None, Some(0xc000_0000));
        assert!(d.bar_mappings().is_empty() && slots.slots.lock().expect("lock").is_empty());
        hw.writes.lock().expect("lock").clear();
        let mut b = [0u8; 4];
        d.read(0xc000_0000, 8, &mut b);
        assert_eq!(sync.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        d.write(0xc000_0000, 8, &[1, 0, 0, 0]);
        d.write(0xc000_0000, 12, &[2, 0, 0, 0]);
        assert_eq!(sync.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(hw.writes.lock().expect("lock").len(), 2);
    }

    /// A slot KVM will not remove keeps its mapping: the BAR stays where
    /// it was when the guest moves it, and the mapping is leaked, not
    /// unmapped, when the device goes.
    #[test]
    fn a_slot_kvm_keeps_keeps_its_mapping() {
        let slots = Arc::new(FakeSlots::default());
        let hooks = VfioHooks {
            msi: None,
            bar_slots: Some(slots.clone() as Arc<dyn BarSlots>),
            dma_sync: None,
        };
        let mut d = VfioPciDevice::from_hw(FakeHw::new(), hooks).expect("device");
        d.bar_moved(0, None, Some(0xc000_0000));
        let m = d.bar_mappings()[0];
        assert_eq!(m.slot, Some(1));
        slots
            .fail_remove
            .store(true, std::sync::atomic::Ordering::SeqCst);
        d.bar_moved(0, Some(0xc000_0000), Some(0xd000_0000));
        assert_eq!(
            *slots.slots.lock().expect("lock"),
            vec![(1, 0xc000_1000, 0x1000)],
            "no second slot on the same mapping"
        );
        assert_eq!(d.bar_mappings()[0].slot, Some(1));
        drop(d);
        assert!(
            mapped(m.host, m.len),
            "the mapping behind a slot KVM kept was unmapped"
        );
        // With removal working, drop unmaps as before.
        slots
            .fail_remove
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let hooks = VfioHooks {
            msi: None,
            bar_slots: Some(slots.clone() as Arc<dyn BarSlots>),
            dma_sync: None,
        };
        let mut d = VfioPciDevice::from_hw(FakeHw::new(), hooks).expect("device");
        d.bar_moved(0, None, Some(0xc000_0000));
        let m = d.bar_mappings()[0];
        drop(d);
        assert!(!mapped(m.host, m.len), "unmapped on drop");
    }

    #[derive(Default)]
    struct FakeRoutes {
        routes: Mutex<Vec<(u32, u64, u32)>>,
        unroutes: Mutex<Vec<u32>>,
    }

    impl MsiRoutes for FakeRoutes {
        fn route(&self, vector: u32, address: u64, data: u32, _: &EventFd) -> io::Result<()> {
            self.routes
                .lock()
                .expect("lock")
                .push((vector, address, data));
            Ok(())
        }
        fn unroute(&self, vector: u32, _: &EventFd) -> io::Result<()> {
            self.unroutes.lock().expect("lock").push(vector);
            Ok(())
        }
    }

    fn device() -> (VfioPciDevice, Arc<FakeHw>, Arc<FakeRoutes>) {
        let hw = FakeHw::new();
        let routes = Arc::new(FakeRoutes::default());
        let hooks = VfioHooks {
            msi: Some(routes.clone() as Arc<dyn MsiRoutes>),
            bar_slots: None,
            dma_sync: None,
        };
        let dev = VfioPciDevice::from_hw(hw.clone(), hooks).expect("device");
        (dev, hw, routes)
    }

    fn r32(d: &mut VfioPciDevice, off: u16) -> u32 {
        let mut b = [0u8; 4];
        d.read_config(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(d: &mut VfioPciDevice, off: u16, v: u32) {
        d.write_config(off, &v.to_le_bytes());
    }

    #[test]
    fn identity_comes_from_the_device_bars_and_rom_are_emulated() {
        let (mut d, hw, _) = device();
        assert_eq!(*hw.resets.lock().expect("lock"), 1, "reset when opened");
        assert_eq!(r32(&mut d, 0), 0x11e8_1234);
        assert_eq!(r32(&mut d, 0x10), 0, "not the host's BAR address");
        assert_eq!(r32(&mut d, 0x30), 0, "ROM hidden");
        // BAR sizing: all ones reads back the size mask.
        w32(&mut d, 0x10, u32::MAX);
        assert_eq!(r32(&mut d, 0x10), 0xfff0_0000);
        w32(&mut d, 0x10, 0xc000_0000);
        w32(&mut d, 0x30, 0xffff_f801);
        assert_eq!(r32(&mut d, 0x30), 0);
        assert!(
            hw.writes.lock().expect("lock").is_empty(),
            "BAR and ROM writes stay emulated"
        );
        assert_eq!(d.declared_bars(), vec![(0, 1 << 20, BarKind::Mmio32)]);
        assert!(d.bar_regions().is_empty(), "memory decoding still off");
        // Command: emulated, and forwarded to the device.
        w32(&mut d, 0x04, u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER));
        assert_eq!(
            r32(&mut d, 0x04) & 0xffff,
            u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER)
        );
        assert_eq!(r32(&mut d, 0x04) >> 16, 0x10, "status from the device");
        let writes = hw.writes.lock().expect("lock").clone();
        assert_eq!(
            writes,
            vec![(CONFIG_REGION, 4, 6u16.to_le_bytes().to_vec())]
        );
        assert_eq!(
            d.bar_regions(),
            vec![PciBarRegion {
                index: 0,
                addr: 0xc000_0000,
                size: 1 << 20,
                kind: BarKind::Mmio32
            }]
        );
        // Bytes and words read through the same dwords.
        let mut b = [0u8; 2];
        d.read_config(2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x11e8);
    }

    #[test]
    fn bar_accesses_are_forwarded_to_the_region() {
        let (mut d, hw, _) = device();
        w32(&mut d, 0x10, 0xc000_0000);
        let mut b = [0u8; 4];
        d.read(0xc000_0000, 0x4, &mut b);
        assert_eq!(b, [0xff; 4], "decoding off: nothing there");
        w32(&mut d, 0x04, u32::from(COMMAND_MEMORY));
        BusDevice::write(&mut d, 0xc000_0000, 0x8, &[1, 2, 3, 4]);
        d.read(0xc000_0000, 0x8, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(hw.bar0.lock().expect("lock")[8..12], [1, 2, 3, 4]);
        // An access the region refuses reads as ones.
        let mut big = [0u8; 4];
        d.read(0xc000_0000, 0x8000, &mut big);
        assert_eq!(big, [0xff; 4]);
    }

    #[test]
    fn mappable_bar_areas_follow_the_bar_in_guest_slots() {
        let hw = FakeHw::new();
        let slots = Arc::new(FakeSlots::default());
        let hooks = VfioHooks {
            msi: None,
            bar_slots: Some(slots.clone() as Arc<dyn BarSlots>),
            dma_sync: None,
        };
        let mut d = VfioPciDevice::from_hw(hw, hooks).expect("device");
        let maps = d.bar_mappings();
        assert_eq!(maps.len(), 1, "the half-page area stays trapped");
        assert_eq!(
            (maps[0].index, maps[0].offset, maps[0].len, maps[0].slot),
            (0, 0x1000, 0x1000, None)
        );
        d.bar_moved(0, None, Some(0xc000_0000));
        assert_eq!(
            *slots.slots.lock().expect("lock"),
            vec![(1, 0xc000_1000, 0x1000)]
        );
        d.bar_moved(0, Some(0xc000_0000), Some(0xd000_0000));
        assert_eq!(
            *slots.slots.lock().expect("lock"),
            vec![(2, 0xd000_1000, 0x1000)]
        );
        // A slot the VMM refuses: the area stays trapped, nothing breaks.
        d.bar_moved(0, Some(0xd000_0000), Some(1 << 33));
        assert!(slots.slots.lock().expect("lock").is_empty());
        assert_eq!(d.bar_mappings()[0].slot, None);
        d.bar_moved(0, None, Some(0xc000_0000));
        d.bar_moved(0, Some(0xc000_0000), None);
        assert!(
            slots.slots.lock().expect("lock").is_empty(),
            "unmapped with the BAR"
        );
        d.bar_moved(0, None, Some(0xc000_0000));
        drop(d);
        assert!(
            slots.slots.lock().expect("lock").is_empty(),
            "slots removed on drop"
        );
    }

    #[test]
    fn msix_is_intercepted_and_routed() {
        let (mut d, hw, routes) = device();
        // The capability stays in the list, after MSI.
        assert_eq!((r32(&mut d, 0x40) >> 8) & 0xff, 0x50);
        assert_eq!(r32(&mut d, 0x50) & 0xff, u32::from(CAP_ID_MSIX));
        assert_eq!(r32(&mut d, 0x50) >> 16, 3, "4 vectors, disabled");
        w32(&mut d, 0x10, 0xc000_0000);
        w32(&mut d, 0x04, u32::from(COMMAND_MEMORY));
        // Vector 1: address and data, unmasked; written through the BAR.
        BusDevice::write(&mut d, 0xc000_0000, 0x2010, &0xfee0_3000u32.to_le_bytes());
        BusDevice::write(&mut d, 0xc000_0000, 0x2014, &0u32.to_le_bytes());
        BusDevice::write(&mut d, 0xc000_0000, 0x2018, &0x51u32.to_le_bytes());
        BusDevice::write(&mut d, 0xc000_0000, 0x201c, &0u32.to_le_bytes());
        assert!(
            hw.writes
                .lock()
                .expect("lock")
                .iter()
                .all(|w| w.1 != 0x2010),
            "table shadowed"
        );
        let mut b = [0u8; 4];
        d.read(0xc000_0000, 0x2018, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x51);
        assert!(
            routes.routes.lock().expect("lock").is_empty(),
            "MSI-X not enabled yet"
        );
        // Enable (control is the upper half of the header dword).
        d.write_config(0x52, &0x8000u16.to_le_bytes());
        assert_eq!(*hw.msix.lock().expect("lock"), Some(4));
        assert_eq!(
            *routes.routes.lock().expect("lock"),
            vec![(1, 0xfee0_3000, 0x51)]
        );
        assert_eq!(r32(&mut d, 0x50) >> 16, 0x8003);
        // Mask vector 1: unrouted; function mask: nothing routed.
        BusDevice::write(&mut d, 0xc000_0000, 0x201c, &1u32.to_le_bytes());
        assert_eq!(*routes.unroutes.lock().expect("lock"), vec![1]);
        BusDevice::write(&mut d, 0xc000_0000, 0x201c, &0u32.to_le_bytes());
        assert_eq!(routes.routes.lock().expect("lock").len(), 2);
        d.write_config(0x52, &0xc000u16.to_le_bytes());
        assert_eq!(*routes.unroutes.lock().expect("lock"), vec![1, 1]);
        // The table location is read-only; PBA reads reach the device.
        w32(&mut d, 0x54, 0);
        assert_eq!(r32(&mut d, 0x54), 0x2000);
        d.read(0xc000_0000, 0x3000, &mut b);
        assert_eq!(b, [0; 4]);
        // Disable.
        d.write_config(0x52, &0u16.to_le_bytes());
        assert!(hw.msix.lock().expect("lock").is_none());
        d.write_config(0x52, &0x8000u16.to_le_bytes());
        drop(d);
        assert!(hw.msix.lock().expect("lock").is_none(), "MSI-X off on drop");
    }

    #[test]
    fn msi_is_intercepted_and_routed() {
        let (mut d, hw, routes) = device();
        // Control: 64-bit, 4 vectors capable, nothing enabled.
        assert_eq!(r32(&mut d, 0x40) >> 16, u32::from(MSI_CTRL_64BIT | 2 << 1));
        w32(&mut d, 0x44, 0xfee0_1003); // low bits are reserved
        w32(&mut d, 0x48, 0);
        w32(&mut d, 0x4c, 0x4041);
        assert_eq!(r32(&mut d, 0x44), 0xfee0_1000);
        assert_eq!(r32(&mut d, 0x4c), 0x4041);
        assert!(hw.msi.lock().expect("lock").is_none());
        // Enable 2 vectors (MME = 1).
        let ctrl = u32::from(MSI_CTRL_ENABLE | 1 << 4) << 16;
        w32(&mut d, 0x40, ctrl);
        assert_eq!(*hw.msi.lock().expect("lock"), Some(2));
        assert_eq!(
            *routes.routes.lock().expect("lock"),
            vec![(0, 0xfee0_1000, 0x4040 | 0x1), (1, 0xfee0_1000, 0x4041)]
        );
        assert!(
            hw.writes.lock().expect("lock").is_empty(),
            "MSI stays virtual"
        );
        // New data while enabled: routes follow.
        d.write_config(0x4c, &0x4050u16.to_le_bytes());
        assert_eq!(
            routes.routes.lock().expect("lock").last(),
            Some(&(1, 0xfee0_1000, 0x4051))
        );
        assert_eq!(*routes.unroutes.lock().expect("lock"), vec![0, 1]);
        // Disable.
        w32(&mut d, 0x40, 0);
        assert!(hw.msi.lock().expect("lock").is_none());
        assert_eq!(routes.unroutes.lock().expect("lock").len(), 4);
        // More vectors than capable are capped.
        w32(&mut d, 0x40, u32::from(MSI_CTRL_ENABLE | 7 << 4) << 16);
        assert_eq!(*hw.msi.lock().expect("lock"), Some(4));
        drop(d);
        assert!(hw.msi.lock().expect("lock").is_none(), "MSI off on drop");
        assert_eq!(*hw.resets.lock().expect("lock"), 2, "reset on drop");
    }

    #[test]
    fn hostile_config_accesses_do_not_panic() {
        let (mut d, _, _) = device();
        for off in (0..0x1000u16).step_by(1) {
            let mut b1 = [0u8; 1];
            d.read_config(off, &mut b1);
            d.write_config(off, &[0xff]);
        }
        let mut b4 = [0u8; 4];
        d.read_config(0x3, &mut b4); // misaligned: the bus never sends it
        assert_eq!(b4, [0xff; 4]);
        d.write_config(0x3, &[0xff; 4]);
    }
}

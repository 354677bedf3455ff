//! MSI and MSI-X delivery of a passthrough device: the guest's view of the
//! MSI capability ([`Msi`]; MSI-X's is in `msix.rs`), and how the vectors
//! the guest enables become eventfds that VFIO signals
//! (VFIO_DEVICE_SET_IRQS), each routed by the VMM ([`super::MsiRoutes`]) to
//! the address and data the guest wrote.

use vmm_sys_util::eventfd::EventFd;

use super::msix::Msix;
use super::VfioPciDevice;
use crate::guest_warn;
use resources::ErrorChain;

/// Capability ID of MSI.
pub(super) const CAP_ID_MSI: u8 = 0x05;
pub(super) const MSI_CTRL_ENABLE: u16 = 1 << 0;
pub(super) const MSI_CTRL_64BIT: u16 = 1 << 7;
const MSI_CTRL_MASKING: u16 = 1 << 8;

/// The guest's view of the MSI capability.
#[derive(Debug, Clone, Copy)]
pub(super) struct Msi {
    /// Offset of the capability in configuration space.
    pub offset: u16,
    control: u16,
    address: u64,
    data: u16,
    mask: u32,
}

impl Msi {
    /// The capability at `offset`, whose control word on the device is
    /// `control`: disabled, one vector, as after reset.
    pub fn new(offset: u16, control: u16) -> Self {
        Self {
            offset,
            control: control & !(MSI_CTRL_ENABLE | 0x7 << 4),
            address: 0,
            data: 0,
            mask: 0,
        }
    }

    fn is_64(&self) -> bool {
        self.control & MSI_CTRL_64BIT != 0
    }
    fn masking(&self) -> bool {
        self.control & MSI_CTRL_MASKING != 0
    }
    fn data_offset(&self) -> u16 {
        if self.is_64() {
            0x0c
        } else {
            0x08
        }
    }
    /// Bytes of the capability.
    pub fn len(&self) -> u16 {
        self.data_offset() + if self.masking() { 0x0c } else { 0x04 }
    }
    pub fn enabled(&self) -> bool {
        self.control & MSI_CTRL_ENABLE != 0
    }
    /// Vectors the guest enabled (Multiple Message Enable, capped by Capable).
    pub fn vectors(&self) -> u32 {
        let capable = (self.control >> 1) & 0x7;
        let enabled = ((self.control >> 4) & 0x7).min(capable);
        1 << enabled
    }

    /// The capability as the guest reads it, dword `reg` (absolute offset).
    pub fn read_dword(&self, reg: u16, hw_header: u32) -> u32 {
        let rel = reg - self.offset;
        let data_off = self.data_offset();
        match rel {
            0 => (hw_header & 0xffff) | u32::from(self.control) << 16,
            4 => (self.address & 0xffff_ffff) as u32,
            8 if self.is_64() => (self.address >> 32) as u32,
            r if r == data_off => u32::from(self.data),
            r if self.masking() && r == data_off + 4 => self.mask,
            _ => 0, // pending bits, reserved
        }
    }

    /// Applies a guest write of the dword at `reg` (already merged).
    pub fn write_dword(&mut self, reg: u16, value: u32) {
        let rel = reg - self.offset;
        let data_off = self.data_offset();
        match rel {
            0 => {
                // Enable and Multiple Message Enable are writable.
                let writable = MSI_CTRL_ENABLE | 0x7 << 4;
                let new = (value >> 16) as u16;
                self.control = (self.control & !writable) | (new & writable);
            }
            4 => self.address = (self.address & !0xffff_ffff) | u64::from(value & !0x3),
            8 if self.is_64() => {
                self.address = (self.address & 0xffff_ffff) | u64::from(value) << 32
            }
            r if r == data_off => self.data = (value & 0xffff) as u16,
            r if self.masking() && r == data_off + 4 => self.mask = value,
            _ => {}
        }
    }
}

impl VfioPciDevice {
    /// Routes (or unroutes) MSI-X vector `v` as the guest's table says.
    pub(super) fn sync_msix_vector(&mut self, v: usize) {
        let (Some(m), Some(routes)) = (&self.msix, &self.routes) else {
            return;
        };
        let (Some(fd), Some(routed)) = (self.msix_fds.get(v), self.msix_routed.get_mut(v)) else {
            return;
        };
        let vector = u32::try_from(v).unwrap_or(u32::MAX);
        match m.route_of(v) {
            Some((address, data)) => match routes.route(vector, address, data, fd) {
                Ok(()) => *routed = true,
                Err(e) => guest_warn!("VFIO: cannot route MSI-X vector {v}: {}", ErrorChain(&e)),
            },
            None if *routed => {
                let _ = routes.unroute(vector, fd);
                *routed = false;
            }
            None => {}
        }
    }

    /// Applies the guest's MSI-X control word: vectors on eventfds while
    /// enabled, each routed as its table entry says.
    pub(super) fn update_msix(&mut self) {
        let Some(enabled) = self.msix.as_ref().map(Msix::enabled) else {
            return;
        };
        if !enabled {
            self.disable_msix();
            return;
        }
        if self.msix_fds.is_empty() {
            let n = self.msix.as_ref().map_or(0, Msix::vectors);
            let fds: Vec<EventFd> = (0..n)
                .filter_map(|_| EventFd::new(libc::EFD_NONBLOCK).ok())
                .collect();
            let refs: Vec<&EventFd> = fds.iter().collect();
            if fds.len() != n || self.hw.enable_msix(&refs).is_err() {
                guest_warn!("VFIO: cannot enable MSI-X");
                return;
            }
            self.msix_routed = vec![false; n];
            self.msix_fds = fds;
        }
        for v in 0..self.msix_fds.len() {
            self.sync_msix_vector(v);
        }
    }

    fn disable_msix(&mut self) {
        if self.msix_fds.is_empty() {
            return;
        }
        if let Some(routes) = &self.routes {
            for ((v, fd), routed) in (0..).zip(&self.msix_fds).zip(&self.msix_routed) {
                if *routed {
                    let _ = routes.unroute(v, fd);
                }
            }
        }
        let _ = self.hw.disable_msix();
        self.msix_fds.clear();
        self.msix_routed.clear();
    }

    /// Programs MSI as the guest's capability says: vectors on eventfds,
    /// routed to the guest's address and data.
    pub(super) fn update_msi(&mut self, was_enabled: bool) {
        let Some(msi) = self.msi else { return };
        if was_enabled {
            if let Some(routes) = &self.routes {
                for (v, fd) in (0..).zip(&self.msi_fds) {
                    let _ = routes.unroute(v, fd);
                }
            }
            if !msi.enabled() {
                let _ = self.hw.disable_msi();
                self.msi_fds.clear();
                return;
            }
        }
        if !msi.enabled() {
            return;
        }
        if self.msi_fds.len() != msi.vectors() as usize {
            self.msi_fds = (0..msi.vectors())
                .filter_map(|_| EventFd::new(libc::EFD_NONBLOCK).ok())
                .collect();
            let fds: Vec<&EventFd> = self.msi_fds.iter().collect();
            if self.hw.enable_msi(&fds).is_err() {
                guest_warn!("VFIO: cannot enable MSI");
                return;
            }
        }
        if let Some(routes) = &self.routes {
            for (v, fd) in (0..).zip(&self.msi_fds) {
                // Multiple messages: the vector number goes in the low data bits.
                let data = u32::from(msi.data) | v;
                if let Err(e) = routes.route(v, msi.address, data, fd) {
                    guest_warn!("VFIO: cannot route MSI vector {v}: {}", ErrorChain(&e));
                }
            }
        }
    }

    /// Turns MSI and MSI-X off for good (the device is going): routes
    /// removed, vectors off on the device.
    pub(super) fn release_interrupts(&mut self) {
        if self.msi.is_some_and(|m| m.enabled()) {
            if let Some(routes) = &self.routes {
                for (v, fd) in (0..).zip(&self.msi_fds) {
                    let _ = routes.unroute(v, fd);
                }
            }
            let _ = self.hw.disable_msi();
        }
        self.disable_msix();
    }
}

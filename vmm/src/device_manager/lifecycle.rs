//! The whole life of a pluggable PCI device, for devices given on the
//! command line and devices added through the API alike: its name, the
//! device itself (emulated, or a host function passed through with VFIO),
//! its slot and BARs, its registration with the pvIOMMU, the table that
//! `vm.info` lists, and its removal (DMA blocked first, then unplugged).
//!
//! Announcing a hot-added device to the guest and waiting for its eject
//! belong to whoever adds at run time (the API adapter, with
//! [`crate::removal`]); this layer only raises and clears the registers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use api::{
    AddDeviceRequest, DeviceId, DeviceKind, DeviceSource, EmulatedKind, ErrorKind, IommuMode,
    PciBus,
};
use devices::pci::PciAddress;
use devices::vfio::{Passthrough, PassthroughError, VfioPciError};
use iommu::BackendId;
use resources::ErrorChain;

use super::DeviceManager;
use crate::error::Error;

/// A device in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plugged {
    /// Its name.
    pub id: DeviceId,
    /// What it is.
    pub kind: DeviceKind,
    /// Its PCI address (bus 0, function 0).
    pub addr: PciAddress,
    /// How the pvIOMMU sees it.
    pub mode: IommuMode,
    /// The host function it passes through (canonical sysfs path).
    pub path: Option<PathBuf>,
    /// Its name at the pvIOMMU.
    pub iommu_id: iommu::DeviceId,
    /// The bus the guest finds it on.
    pub bus: PciBus,
}

impl Plugged {
    /// Its address as the guest sees it: on the root, segment 0; on its
    /// vPCI bus, that bus's domain, bus 0, device 0.
    pub fn guest_address(&self) -> (u16, PciAddress) {
        match self.bus {
            PciBus::Root => (0, self.addr),
            PciBus::Vpci => (crate::vpci::domain(self.addr.device), PciAddress::slot(0)),
        }
    }
}

/// Why a device cannot be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The name is taken.
    #[error("Device id \"{0}\" is in use")]
    IdInUse(DeviceId),
    /// No device has this name.
    #[error("No device \"{0}\"")]
    NotFound(DeviceId),
    /// The host function is passed through already.
    #[error("Device {} is already passed through (as \"{id}\")", .path.display())]
    AlreadyPassedThrough {
        /// Its canonical sysfs path.
        path: PathBuf,
        /// The device that has it.
        id: DeviceId,
    },
    /// `iommu: pviommu` on a VM without the pvIOMMU.
    #[error("\"iommu\": \"pviommu\" needs a VM with the pvIOMMU (--pviommu on)")]
    NoPviommu,
    /// The path does not exist.
    #[error("Device path {} does not exist", .0.display())]
    NoSuchPath(PathBuf, #[source] std::io::Error),
    /// The path is not a PCI function's sysfs directory.
    #[error(
        "Device path {} is not a PCI function: give /sys/bus/pci/devices/SSSS:BB:DD.F",
        .0.display()
    )]
    NotPciFunction(PathBuf),
    /// The function is not bound to vfio-pci.
    #[error(transparent)]
    NotVfioPci(VfioPciError),
    /// Someone else holds the function.
    #[error("Device {} is in use by another program", .0.display())]
    Busy(PathBuf, #[source] PassthroughError),
    /// No PCI slot left.
    #[error("No free PCI slot on bus 0")]
    NoSlot(#[source] resources::Error),
    /// VFIO or IOMMUFD failed.
    #[error("Cannot pass {} through", .0.display())]
    Passthrough(PathBuf, #[source] PassthroughError),
    /// The emulated device could not be created.
    #[error("Cannot create the {0} device")]
    Create(&'static str, #[source] devices::pci::PciError),
    /// The pvIOMMU refused the registration.
    #[error("Cannot register the device with the pvIOMMU")]
    Iommu(#[source] iommu::IommuError),
    /// Plugging into the PCI root failed.
    #[error("Cannot plug the device in")]
    Plug(#[source] Error),
    /// A device for a vPCI bus on a VM without VMBus.
    #[error("A vPCI bus needs VMBus (the Hyper-V interface with --vmbus on)")]
    NoVmbus,
    /// VMBus did not take the vPCI bus's offer (too many offers, or the
    /// guest's SynIC did not take the message).
    #[error("Cannot offer a vPCI bus")]
    Vpci(#[source] vmbus::server::OfferError),
}

impl DeviceError {
    /// The caller's share in the failure (the API's status code).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::IdInUse(_) | Self::AlreadyPassedThrough { .. } | Self::Busy(..) => {
                ErrorKind::Conflict
            }
            Self::NoSlot(_) => ErrorKind::Conflict,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Vpci(_) => ErrorKind::Conflict,
            Self::NoPviommu
            | Self::NoVmbus
            | Self::NoSuchPath(..)
            | Self::NotPciFunction(_)
            | Self::NotVfioPci(_) => ErrorKind::InvalidRequest,
            Self::Passthrough(..) | Self::Create(..) | Self::Iommu(_) | Self::Plug(_) => {
                ErrorKind::Internal
            }
        }
    }
}

/// The table and what passthrough needs, kept by the device manager.
#[derive(Debug, Default)]
pub(super) struct Table {
    plugged: BTreeMap<DeviceId, Plugged>,
    /// Counter of generated names.
    next_name: u32,
    /// `/dev/iommu` and the IOMMUFD backend, from the first VFIO device on.
    passthrough: Option<Arc<Passthrough>>,
}

/// Checks that `path` is a PCI function's sysfs directory and returns its
/// canonical form (`/sys/devices/pci.../SSSS:BB:DD.F`): symbolic links are
/// resolved first, so a directory of the caller's that merely looks like
/// one (a `driver` link and a `vfio-dev/` entry) is refused.
pub fn pci_function_path(path: &Path) -> Result<PathBuf, DeviceError> {
    let real = path
        .canonicalize()
        .map_err(|e| DeviceError::NoSuchPath(path.to_path_buf(), e))?;
    let under_pci = real.starts_with("/sys/devices")
        && real
            .components()
            .nth(3)
            .and_then(|c| c.as_os_str().to_str())
            .is_some_and(|c| c.starts_with("pci"));
    let is_bdf = real
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(is_bdf_name);
    if under_pci && is_bdf && real.join("config").is_file() {
        Ok(real)
    } else {
        Err(DeviceError::NotPciFunction(path.to_path_buf()))
    }
}

/// `SSSS:BB:DD.F` in hex.
fn is_bdf_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

impl DeviceManager {
    /// Every device in the table, by name.
    pub fn plugged(&self) -> impl Iterator<Item = &Plugged> {
        self.table.plugged.values()
    }

    /// The device named `id`.
    pub fn device(&self, id: &DeviceId) -> Option<&Plugged> {
        self.table.plugged.get(id)
    }

    /// The IOMMUFD backend's counters, once a device was passed through.
    pub fn passthrough_stats(&self) -> Option<iommu::iommufd::IommufdStats> {
        self.table
            .passthrough
            .as_ref()
            .map(|pt| pt.backend().stats())
    }

    /// The table's name of the device the pvIOMMU calls `iid`.
    pub fn name_of(&self, iid: iommu::DeviceId) -> Option<&DeviceId> {
        self.plugged().find(|p| p.iommu_id == iid).map(|p| &p.id)
    }

    fn fresh_name(&mut self, prefix: &str) -> DeviceId {
        loop {
            let n = self.table.next_name;
            self.table.next_name = n.wrapping_add(1);
            // A prefix of letters and a number: always a valid id.
            if let Ok(id) = DeviceId::new(format!("{prefix}{n}")) {
                if !self.table.plugged.contains_key(&id) {
                    return id;
                }
            }
        }
    }

    /// Adds the device `request` describes, at boot or at run time: name,
    /// device, slot and BARs, pvIOMMU registration (it starts in the default
    /// domain, IOVA = GPA), table. Nothing is left behind on failure. The
    /// caller announces a run-time addition ([`DeviceManager::announce`]).
    pub fn add_device(&mut self, request: &AddDeviceRequest) -> Result<Plugged, DeviceError> {
        if let Some(id) = &request.id {
            if self.table.plugged.contains_key(id) {
                return Err(DeviceError::IdInUse(id.clone()));
            }
        }
        let mode = match (request.iommu, self.pviommu) {
            (Some(IommuMode::Pviommu), false) => return Err(DeviceError::NoPviommu),
            (Some(m), _) => m,
            (None, true) => IommuMode::Pviommu,
            (None, false) => IommuMode::Direct,
        };
        let bus = request.bus.unwrap_or(self.default_bus);
        if bus == PciBus::Vpci && self.vmbus.is_none() {
            return Err(DeviceError::NoVmbus);
        }
        match &request.source {
            DeviceSource::Emulated(EmulatedKind::DmaTest) => {
                let id = match &request.id {
                    Some(id) => id.clone(),
                    None => self.fresh_name("dma-test"),
                };
                self.add_dma_test(id, mode, bus)
            }
            DeviceSource::Vfio(path) => {
                let path = pci_function_path(path)?;
                if let Some(p) = self.plugged().find(|p| p.path.as_ref() == Some(&path)) {
                    return Err(DeviceError::AlreadyPassedThrough {
                        path,
                        id: p.id.clone(),
                    });
                }
                let id = match &request.id {
                    Some(id) => id.clone(),
                    None => self.fresh_name("vfio"),
                };
                self.add_vfio(id, mode, bus, path)
            }
        }
    }

    fn add_dma_test(
        &mut self,
        id: DeviceId,
        mode: IommuMode,
        bus: PciBus,
    ) -> Result<Plugged, DeviceError> {
        let dev = devices::dma_test::DmaTest::new(
            id.as_str(),
            self.iommu.clone(),
            self.memory.clone(),
            self.msi_sink(),
        )
        .map_err(|e| DeviceError::Create("dma-test", e))?;
        let dev = Arc::new(Mutex::new(dev));
        let iommu = self.iommu.clone();
        self.plug(
            dev.clone(),
            id,
            DeviceKind::DmaTest,
            mode,
            bus,
            None,
            |iid| {
                match mode {
                    IommuMode::Pviommu => iommu.register_device(iid, BackendId::SOFTWARE),
                    IommuMode::Direct => iommu.register_direct_device(iid, BackendId::SOFTWARE),
                }
                .map_err(DeviceError::Iommu)?;
                devices::lock::mutex(&dev).set_device_id(iid);
                Ok(())
            },
        )
    }

    /// `/dev/iommu` and the IOMMUFD backend with guest RAM mapped, opened
    /// for the first VFIO device.
    fn passthrough(&mut self, path: &Path) -> Result<Arc<Passthrough>, DeviceError> {
        if let Some(pt) = &self.table.passthrough {
            return Ok(pt.clone());
        }
        let pt = Arc::new(
            Passthrough::open(
                Path::new(iommu::iommufd::DEV_IOMMU),
                &self.iommu,
                self.memory.clone(),
                // S1 domains nest in VT-d's first-stage format (the only
                // nesting the host side implements).
                iommu::iommufd::NestFormat::VtdS1,
            )
            .map_err(|e| DeviceError::Passthrough(path.to_path_buf(), e))?,
        );
        log::info!("VFIO passthrough through {}", iommu::iommufd::DEV_IOMMU);
        self.table.passthrough = Some(pt.clone());
        Ok(pt)
    }

    fn add_vfio(
        &mut self,
        id: DeviceId,
        mode: IommuMode,
        bus: PciBus,
        path: PathBuf,
    ) -> Result<Plugged, DeviceError> {
        // Before /dev/iommu: a device not bound to vfio-pci is the caller's
        // mistake on any host.
        devices::vfio::check_vfio_pci(&path).map_err(DeviceError::NotVfioPci)?;
        let mut hooks = crate::vfio::hooks(self);
        // Behind Linux's pvIOMMU driver (on vPCI), the guest adds mappings
        // without flushing them: a host that copies its tables syncs them
        // before each doorbell (the BARs stay trapped for that).
        let sync = (bus == PciBus::Vpci && mode == IommuMode::Pviommu)
            .then(|| Arc::new(crate::vfio::SyncBeforeDoorbell::new(self.iommu.clone())));
        if let Some(s) = &sync {
            hooks.dma_sync = Some(s.clone());
        }
        let pt = self.passthrough(&path)?;
        let dev = pt.open_device(&path, hooks).map_err(|e| match e {
            PassthroughError::Device(d @ VfioPciError::NotVfioDevice { .. }) => {
                DeviceError::NotVfioPci(d)
            }
            e @ PassthroughError::Device(VfioPciError::AlreadyBound { .. }) => {
                DeviceError::Busy(path.clone(), e)
            }
            e => DeviceError::Passthrough(path.clone(), e),
        })?;
        let dev = Arc::new(Mutex::new(dev));
        let iommu = self.iommu.clone();
        self.plug(
            dev.clone(),
            id,
            DeviceKind::Vfio,
            mode,
            bus,
            Some(path.clone()),
            |iid| {
                if let Some(s) = &sync {
                    s.set_device(iid);
                }
                let d = devices::lock::mutex(&dev);
                match mode {
                    IommuMode::Pviommu => pt.register(&iommu, iid, &d),
                    IommuMode::Direct => pt.register_direct(&iommu, iid, &d),
                }
                .map_err(|e| DeviceError::Passthrough(path.clone(), e))
            },
        )
    }

    /// Plugs `dev` into a free slot, registers it (`register`, given its
    /// pvIOMMU name) and enters it in the table. On a vPCI bus the slot is
    /// hidden from the root, the pvIOMMU name is the bus's logical id, and
    /// the bus is offered over VMBus.
    #[allow(clippy::too_many_arguments)]
    fn plug<T>(
        &mut self,
        dev: Arc<Mutex<T>>,
        id: DeviceId,
        kind: DeviceKind,
        mode: IommuMode,
        bus: PciBus,
        path: Option<PathBuf>,
        register: impl FnOnce(iommu::DeviceId) -> Result<(), DeviceError>,
    ) -> Result<Plugged, DeviceError>
    where
        T: devices::pci::PciDevice + devices::bus::BusDevice + 'static,
    {
        let addr = self
            .add_pci_device(dev.clone(), None, bus == PciBus::Vpci)
            .map_err(|e| match e {
                Error::Resource(r) => DeviceError::NoSlot(r),
                e => DeviceError::Plug(e),
            })?;
        let slot = addr.device;
        let iid = iommu::DeviceId::pci(0, addr.bus, addr.device, addr.function);
        if let Err(e) = register(iid) {
            let _ = self.remove_pci_device(slot);
            return Err(e);
        }
        if let (PciBus::Vpci, Some(vmbus)) = (bus, &self.vmbus) {
            // The guest's driver names it by its bus's logical id; pvmm
            // keeps the PCI id for translation and statistics.
            let instance = crate::vpci::instance_guid(slot, self.vpci_generation);
            self.vpci_generation = self.vpci_generation.wrapping_add(1);
            let logical = crate::vpci::logical_id(&instance);
            if let Err(e) = self.iommu.register_device_alias(logical, iid) {
                let _ = self.iommu.unregister_device(iid);
                let _ = self.remove_pci_device(slot);
                return Err(DeviceError::Iommu(e));
            }
            let function = crate::vpci::VpciFunction::new(
                self.pci.clone(),
                slot,
                self.mmio_bus.clone(),
                self.mem_size,
                self.vpci_ejections.clone(),
            );
            if let Err(e) = vmbus.add_vpci(slot, instance, function.bus(self.vcpus)) {
                let _ = self.iommu.unregister_device(iid);
                let _ = self.remove_pci_device(slot);
                return Err(DeviceError::Vpci(e));
            }
        }
        let plugged = Plugged {
            id: id.clone(),
            kind,
            addr,
            mode,
            path,
            iommu_id: iid,
            bus,
        };
        self.table.plugged.insert(id.clone(), plugged.clone());
        match bus {
            PciBus::Root => log::info!("{id}: {kind:?} at {addr}"),
            PciBus::Vpci => log::info!(
                "{id}: {kind:?} on a vPCI bus (domain {:04x})",
                crate::vpci::domain(slot)
            ),
        }
        Ok(plugged)
    }

    /// Tells the guest that the device `p` arrived: ACPI hotplug (PCIU,
    /// GED) on the root; a vPCI bus's offer went out as it was added.
    pub fn announce(&self, p: &Plugged) {
        if p.bus == PciBus::Root {
            devices::lock::mutex(&self.hotplug).slot_added(p.addr.device);
        }
    }

    /// Asks the guest to eject the device in `slot`: PCID and the GED on
    /// the root, PCI_EJECT on its vPCI bus.
    pub fn request_eject(&self, slot: u8) {
        let vpci = self
            .plugged()
            .any(|p| p.addr.device == slot && p.bus == PciBus::Vpci);
        match (&self.vmbus, vpci) {
            (Some(vmbus), true) => {
                // A guest that never listed the function has nothing to
                // eject: the removal goes on at once.
                if !vmbus.eject_vpci(slot) {
                    self.vpci_ejections.ejected(slot);
                }
            }
            _ => devices::lock::mutex(&self.hotplug).request_eject(slot),
        }
    }

    /// The slots the guest ejected since the last call (both kinds).
    pub fn take_ejected(&self) -> u32 {
        devices::lock::mutex(&self.hotplug).take_ejected() | self.vpci_ejections.take()
    }

    /// Removes the device `id`: its DMA is blocked (pvIOMMU unregister,
    /// which detaches it from every domain and, for VFIO, from the host
    /// IOMMU) before it leaves the PCI root, and it is closed last.
    pub fn remove_device(&mut self, id: &DeviceId) -> Result<(), DeviceError> {
        let Some(p) = self.table.plugged.remove(id) else {
            return Err(DeviceError::NotFound(id.clone()));
        };
        let slot = p.addr.device;
        devices::lock::mutex(&self.hotplug).cancel_eject(slot);
        if let Err(e) = self.iommu.unregister_device(p.iommu_id) {
            log::error!("{id}: unregistering from the pvIOMMU: {}", ErrorChain(&e));
        }
        // Its DMA is blocked: its bus goes (the guest drops it).
        if let (PciBus::Vpci, Some(vmbus)) = (p.bus, &self.vmbus) {
            if let Err(e) = vmbus.remove_vpci(slot) {
                log::error!("{id}: rescinding its vPCI bus: {}", ErrorChain(&e));
            }
        }
        // The PCI root held the last reference: a VFIO device is reset and
        // closed when the returned one drops.
        if let Err(e) = self.remove_pci_device(slot) {
            log::error!("{id}: unplugging slot {slot}: {}", ErrorChain(&e));
        }
        log::info!("{id} removed from slot {slot}");
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bdf_names() {
        assert!(is_bdf_name("0000:00:04.0"));
        assert!(is_bdf_name("abcd:ef:1f.7"));
        for bad in [
            "0000:00:04",
            "0000:00:04.0x",
            "000:000:04.0",
            "0000-00:04.0",
            "zzzz:00:04.0",
        ] {
            assert!(!is_bdf_name(bad), "{bad}");
        }
    }

    #[test]
    fn only_pci_functions_in_sysfs_are_accepted() {
        // A look-alike: a BDF-named directory with a `config` file and a
        // `driver` link, outside /sys/devices/pci*.
        let dir = std::env::temp_dir().join(format!("pvmm-fake-pci-{}", std::process::id()));
        let fake = dir.join("0000:00:04.0");
        std::fs::create_dir_all(fake.join("vfio-dev/vfio0")).unwrap();
        std::fs::write(fake.join("config"), [0u8; 64]).unwrap();
        let _ = std::os::unix::fs::symlink("/sys/bus/pci/drivers/vfio-pci", fake.join("driver"));
        assert!(matches!(
            pci_function_path(&fake),
            Err(DeviceError::NotPciFunction(_))
        ));
        // A link to it from a place that looks right does not help.
        let link = dir.join("link");
        let _ = std::os::unix::fs::symlink(&fake, &link);
        assert!(matches!(
            pci_function_path(&link),
            Err(DeviceError::NotPciFunction(_))
        ));
        std::fs::remove_dir_all(&dir).ok();
        assert!(matches!(
            pci_function_path(Path::new("/nonexistent/0000:00:04.0")),
            Err(DeviceError::NoSuchPath(..))
        ));
        assert!(matches!(
            pci_function_path(Path::new("/sys/bus/pci")),
            Err(DeviceError::NotPciFunction(_))
        ));
        // A real function, if this machine has any: every spelling of it
        // comes out as one canonical path under /sys/devices/pci*.
        if let Some(f) = std::fs::read_dir("/sys/bus/pci/devices")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
        {
            let via_bus = f.path();
            let canonical = pci_function_path(&via_bus).unwrap();
            assert!(
                canonical.to_string_lossy().starts_with("/sys/devices/pci"),
                "{canonical:?}"
            );
            let dotted = PathBuf::from(format!(
                "/sys/bus/pci/../pci/devices/{}",
                f.file_name().to_string_lossy()
            ));
            assert_eq!(pci_function_path(&dotted).unwrap(), canonical);
        }
    }
}

//! VMBus for the Hyper-V interface (issue 13): the `vmbus` crate's
//! user-space SynIC and control plane, wired to the guest.
//!
//! - **SynIC MSRs** (SCONTROL, SVERSION, SIEFP, SIMP, EOM, SINT0-15) come
//!   through the Hyper-V MSR filter ([`crate::hyperv`]) to
//!   [`vmbus::Synic`], per VP.
//! - **HvCallPostMessage** comes through the hypercall dispatcher (the
//!   partition's `POST_MESSAGE`) to [`vmbus::Server`]; its refusals are
//!   their HV_STATUS.
//! - **SINT interrupts** are MSIs to the target VP's local APIC (KVM_SIGNAL_MSI:
//!   physical destination, APIC id = VP index, fixed, edge), as
//!   HvCallSendSyntheticClusterIpi's are ([`crate::processors`]). The
//!   guest EOIs them at its APIC: CPUID recommends against auto-EOI.
//! - **ACPI**: a `VMBS` device (`_HID "VMBus"`) under `\_SB`
//!   ([`crate::acpi`]), which Linux's `hv_vmbus` probes before it touches
//!   the SynIC.
//!
//! KVM's in-kernel SynIC is not used: it needs KVM's Hyper-V emulation
//! (kvm_pvm has none) and KVM's own hypercall path, while pvmm's hypercalls
//! come through port 0xE4 on every KVM.
//!
//! - **HvCallSignalEvent** comes through the dispatcher (`SIGNAL_EVENT`)
//!   to [`vmbus::Server::signal_event`], which runs the channel's device
//!   on the signalling vCPU.
//! - **vPCI**: each vPCI device's bus is an offer
//!   ([`VmBus::add_vpci`], [`crate::vpci`]); HvCallRetargetDeviceInterrupt
//!   reaches the bus whose logical device id prefix the call names.
//!
//! What Linux gets: version negotiation (5.3 down to 5.0), the offers (one
//! per vPCI bus), unload, GPADLs, open and close, and the channels' ring
//! traffic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use devices::interrupt::MsiSink;
use iommu::abi::{HvError, InputPostMessage, InputSignalEvent};
use vm_memory::GuestMemoryMmap;
use vmbus::abi::Guid;
use vmbus::vpci::Vpci;

use crate::vpci::VpciFunction;

/// SINT interrupts as MSIs to the VP's local APIC.
struct MsiSint {
    msi: Arc<dyn MsiSink>,
    /// KVM refused an MSI (logged once).
    failed: AtomicBool,
}

impl vmbus::SintSink for MsiSint {
    fn signal(&self, vp: u32, vector: u8) {
        let address = iommu::abi::msi_address(vp);
        if let Err(e) = self.msi.signal_msi(address, u32::from(vector)) {
            if !self.failed.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "VMBus: KVM_SIGNAL_MSI for SINT vector {vector:#x} to VP {vp} failed: {e}"
                );
            }
        }
    }
}

/// A vPCI bus offered over VMBus.
struct VpciBus {
    /// The root slot of its device.
    slot: u8,
    /// Its logical device id prefix.
    prefix: u32,
    /// Its channel.
    relid: u32,
    vpci: Vpci<VpciFunction>,
}

/// The VM's VMBus: its SynICs and its server.
pub struct VmBus {
    server: vmbus::Server<GuestMemoryMmap>,
    /// The vPCI buses.
    vpci: std::sync::Mutex<Vec<VpciBus>>,
    /// Signals refused (the first is logged).
    signals_refused: AtomicU64,
    /// Channels whose device failed on its rings (the first is logged).
    faults: AtomicU64,
    /// Retargets that would move an interrupt (the first is logged).
    moves_refused: AtomicU64,
    /// Posts refused (the first is logged; the guest may post at will).
    refused: AtomicU64,
    /// SynIC MSR writes refused (#GP; the first is logged).
    msr_refused: AtomicU64,
}

impl std::fmt::Debug for VmBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBus")
            .field("vcpus", &self.server.synic().vcpus())
            .field("connection", &self.server.connection())
            .finish_non_exhaustive()
    }
}

impl VmBus {
    /// VMBus for `vcpus` VPs whose guest RAM is `mem`, interrupting them
    /// through `msi`.
    pub fn new(vcpus: u32, mem: Arc<GuestMemoryMmap>, msi: Arc<dyn MsiSink>) -> Self {
        let sink = Arc::new(MsiSint {
            msi,
            failed: AtomicBool::new(false),
        });
        let synic = Arc::new(vmbus::Synic::new(vcpus, mem, sink));
        Self {
            server: vmbus::Server::new(synic),
            vpci: std::sync::Mutex::new(Vec::new()),
            signals_refused: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            moves_refused: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            msr_refused: AtomicU64::new(0),
        }
    }

    /// The server (offers, connection state).
    pub fn server(&self) -> &vmbus::Server<GuestMemoryMmap> {
        &self.server
    }

    /// RDMSR of SynIC MSR `index` on VP `vp`; `None` injects #GP.
    pub fn read_msr(&self, vp: u32, index: u32) -> Option<u64> {
        self.server.synic().read_msr(vp, index).ok()
    }

    /// WRMSR of SynIC MSR `index` on VP `vp`; `false` injects #GP.
    pub fn write_msr(&self, vp: u32, index: u32, value: u64) -> bool {
        match self.server.synic().write_msr(vp, index, value) {
            Ok(()) => true,
            Err(e) => {
                if self.msr_refused.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!("VMBus: VP {vp}: {e} (#GP; later refusals are counted)");
                }
                false
            }
        }
    }

    /// Offers `vpci`, the vPCI bus of the device in root slot `slot`,
    /// whose channel instance is `instance` (its logical device id prefix
    /// follows from it). A guest that has the offer list gets it now.
    pub fn add_vpci(
        &self,
        slot: u8,
        instance: Guid,
        vpci: Vpci<VpciFunction>,
    ) -> Result<vmbus::server::OfferIds, vmbus::server::OfferError> {
        let device: vmbus::server::SharedDevice = Arc::new(std::sync::Mutex::new(vpci.clone()));
        let ids = self
            .server
            .add_offer(vmbus::abi::VPCI_INTERFACE_TYPE, instance, device)?;
        devices::lock::mutex(&self.vpci).push(VpciBus {
            slot,
            prefix: iommu::abi::logical_device_id_prefix(&instance.0),
            relid: ids.relid,
            vpci,
        });
        Ok(ids)
    }

    /// Asks the guest to eject the function of slot `slot`'s vPCI bus
    /// (PCI_EJECT, sent at once). `false`: there is no such bus, or its
    /// guest driver has not listed the function yet (nothing to eject: the
    /// caller's timeout ends the removal).
    pub fn eject_vpci(&self, slot: u8) -> bool {
        let Some((relid, vpci)) = devices::lock::mutex(&self.vpci)
            .iter()
            .find(|b| b.slot == slot)
            .map(|b| (b.relid, b.vpci.clone()))
        else {
            return false;
        };
        if vpci.eject(vmbus::abi::vpci::WinSlot::new()).is_err() {
            return false;
        }
        // Only the EJECT goes out here, on the caller's thread: the guest's
        // packets wait for its own signal, served on its vCPU.
        if let Err(e) = self.server.flush_channel(relid) {
            log::warn!("VMBus: vPCI bus of slot {slot}: {e}");
        }
        true
    }

    /// Takes slot `slot`'s vPCI bus away: its offer is rescinded (the
    /// guest drops the bus).
    pub fn remove_vpci(&self, slot: u8) -> Result<(), vmbus::server::RescindError> {
        let mut buses = devices::lock::mutex(&self.vpci);
        let Some(i) = buses.iter().position(|b| b.slot == slot) else {
            return Ok(());
        };
        // The rescind closes the channel, and the bus's session with it;
        // the bus's window and server go whatever the guest does.
        let bus = buses.remove(i);
        drop(buses);
        let told = self.server.rescind(bus.relid);
        bus.vpci.functions().detach();
        if told == Ok(false) {
            log::warn!(
                "VMBus: the guest's SynIC did not take the rescind of slot {slot}'s vPCI bus"
            );
        }
        told.map(|_| ())
    }

    /// HvCallSignalEvent from VP `vp`.
    pub fn signal_event(&self, vp: u32, input: &InputSignalEvent) -> Result<(), HvError> {
        match self.server.signal_event(vp, input) {
            Ok(None) => Ok(()),
            Ok(Some(fault)) => {
                // The channel stays closed to its device until the guest
                // opens it again (the first is logged, the rest counted).
                if self.faults.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!(
                        "VMBus: channel of connection {:#x} closed to its device: {fault} (later faults are counted)",
                        input.connection_id.get()
                    );
                }
                Ok(())
            }
            Err(e) => {
                if self.signals_refused.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!("VMBus: VP {vp}: {e} (later refusals are counted)");
                }
                Err(e.status())
            }
        }
    }

    /// HvCallRetargetDeviceInterrupt: the vPCI bus of `device`'s prefix
    /// retargets its function's interrupt (`address`, `data`) to `vector`
    /// on the VPs of `vps`. INVALID_DEVICE_ID for a device on no vPCI bus,
    /// INVALID_PARAMETER for an interrupt or target the bus refuses.
    pub fn retarget_interrupt(
        &self,
        device: iommu::DeviceId,
        address: u32,
        data: u32,
        vector: u32,
        vps: u64,
    ) -> Result<(), HvError> {
        let bits = u32::try_from(device.into_bits()).map_err(|_| HvError::INVALID_DEVICE_ID)?;
        let vpci = devices::lock::mutex(&self.vpci)
            .iter()
            .find(|b| b.prefix == bits & !0x7)
            .map(|b| b.vpci.clone())
            .ok_or(HvError::INVALID_DEVICE_ID)?;
        let targets: Vec<u32> = (0..64).filter(|vp| vps & (1 << vp) != 0).collect();
        // pvmm delivers the messages it created as they are (the devices'
        // MSI paths do not translate): a retarget may confirm an
        // interrupt's target, not move it.
        let first = targets.first().copied().ok_or(HvError::INVALID_PARAMETER)?;
        if !confirms(address, data, vector, first) {
            if self.moves_refused.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!(
                    "VMBus: a retarget that moves an interrupt ({address:#x}/{data:#x} to vector {vector:#x} on VP {first}) is refused (later ones are counted)"
                );
            }
            return Err(HvError::INVALID_PARAMETER);
        }
        // The low 3 bits: the function.
        #[allow(clippy::cast_possible_truncation)]
        let function = (bits & 0x7) as u8;
        vpci.retarget(function, u64::from(address), data, vector, &targets)
            .map_err(|_| HvError::INVALID_PARAMETER)
    }

    /// HvCallPostMessage from VP `vp`.
    pub fn post_message(&self, vp: u32, input: &InputPostMessage) -> Result<(), HvError> {
        self.server.post_message(vp, input).map_err(|e| {
            if self.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!("VMBus: VP {vp} posted a message the host refuses: {e} (later refusals are counted)");
            }
            e.status()
        })
    }
}

/// Whether a retarget of the MSI (`address`'s low half, `data`) to
/// `vector` on VP `vp` leaves it where it is: the message pvmm created for
/// that vector and VP is that very one.
fn confirms(address: u32, data: u32, vector: u32, vp: u32) -> bool {
    (u64::from(address), data) == (iommu::abi::msi_address(vp) & 0xffff_ffff, vector)
}

impl Drop for VmBus {
    fn drop(&mut self) {
        let refused = self.refused.load(Ordering::Relaxed);
        let msr_refused = self.msr_refused.load(Ordering::Relaxed);
        let signals = self.signals_refused.load(Ordering::Relaxed);
        if refused != 0 || msr_refused != 0 || signals != 0 {
            log::info!(
                "VMBus: {refused} posts, {signals} signals and {msr_refused} SynIC MSR writes refused"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::processors::tests::Recorder;
    use iommu::abi::msr;
    use vm_memory::{Bytes, GuestAddress};
    use vmbus::abi::{
        version, ChannelMessageHeader, ChannelMessageType, HvMessage, InitiateContact,
        VersionResponse, VMBUS_MESSAGE_CONNECTION_ID_4,
    };
    use zerocopy::{FromBytes, FromZeros, IntoBytes};

    const SIMP: u64 = 0x10_0000;
    const SIEFP: u64 = 0x10_1000;
    const VECTOR: u64 = 0xf3;

    fn setup(vcpus: u32) -> (Arc<Recorder>, Arc<GuestMemoryMmap>, VmBus) {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap());
        let rec = Arc::new(Recorder::default());
        let bus = VmBus::new(vcpus, mem.clone(), rec.clone());
        (rec, mem, bus)
    }

    /// What Linux's `hv_hyp_synic_enable_regs` does on each CPU.
    fn enable_synic(bus: &VmBus, vp: u32) {
        let page = u64::from(vp) * 0x2000;
        assert!(bus.write_msr(vp, msr::SIMP, (SIMP + page) | 1));
        assert!(bus.write_msr(vp, msr::SIEFP, (SIEFP + page) | 1));
        assert!(bus.write_msr(vp, msr::SINT0 + 2, VECTOR));
        let scontrol = bus.read_msr(vp, msr::SCONTROL).unwrap();
        assert!(bus.write_msr(vp, msr::SCONTROL, scontrol | 1));
    }

    fn contact(requested: u32, target_vp: u32) -> InputPostMessage {
        let mut m = InitiateContact::new_zeroed();
        m.header = ChannelMessageHeader::new(ChannelMessageType::INITIATE_CONTACT);
        m.vmbus_version_requested = requested.into();
        m.target_vcpu = target_vp.into();
        // msg_sint 2, VTL 0.
        m.interrupt_page_or_target_info = 2u64.into();
        InputPostMessage::new(VMBUS_MESSAGE_CONNECTION_ID_4, 1, m.as_bytes()).unwrap()
    }

    /// Linux 7.2's `vmbus_connect`: 6.0 refused, 5.3 accepted; each answer
    /// lands in the target VP's SINT 2 slot with an MSI to its APIC.
    #[test]
    fn linux_connects_at_5_3_through_msrs_posts_and_msis() {
        let (rec, mem, bus) = setup(2);
        enable_synic(&bus, 0);
        enable_synic(&bus, 1);
        let slot = GuestAddress(SIMP + 0x2000 + 2 * 256);
        let response = |mem: &GuestMemoryMmap| {
            let mut raw = [0u8; 256];
            mem.read_slice(&mut raw, slot).unwrap();
            let m = HvMessage::read_from_bytes(&raw).unwrap();
            VersionResponse::read_from_prefix(&m.payload).unwrap().0
        };

        bus.post_message(0, &contact(version::V6_0, 1)).unwrap();
        assert_eq!(response(&mem).version_supported, 0);
        // Linux frees the slot (message type NONE) and sees no pending bit.
        mem.write_slice(&[0u8; 4], slot).unwrap();
        bus.post_message(0, &contact(version::WIN10_V5_3, 1))
            .unwrap();
        assert_eq!(response(&mem).version_supported, 1);
        assert_eq!(
            *rec.0.lock().unwrap(),
            [(0xfee0_1000, 0xf3), (0xfee0_1000, 0xf3)]
        );
        assert_eq!(
            bus.server().connection().unwrap().version,
            version::WIN10_V5_3
        );
    }

    /// pci-hyperv's unmask retargets an MSI-X vector to the vector and VP
    /// it was created for: confirmed; any move is not.
    #[test]
    fn retargets_may_confirm_not_move() {
        assert!(confirms(0xfee0_1000, 0x41, 0x41, 1));
        assert!(!confirms(0xfee0_1000, 0x41, 0x42, 1));
        assert!(!confirms(0xfee0_1000, 0x41, 0x41, 0));
        assert!(!confirms(0xfee0_0000, 0x1841, 0x41, 0));
    }

    /// A hostile guest: bad MSR writes are #GP, bad posts their status,
    /// and nothing is delivered.
    #[test]
    fn refusals_are_gp_and_statuses() {
        let (rec, _mem, bus) = setup(1);
        assert!(!bus.write_msr(0, msr::SVERSION, 1));
        assert!(!bus.write_msr(0, msr::SINT0, 0x05));
        assert!(!bus.write_msr(1, msr::SIMP, 1));
        assert_eq!(bus.read_msr(1, msr::SCONTROL), None);
        // Not connected, no SynIC: refused with a status, no interrupt.
        assert_eq!(
            bus.post_message(0, &contact(version::WIN10_V5_3, 0)),
            Err(HvError::INVALID_SYNIC_STATE)
        );
        let mut bad = contact(version::WIN10_V5_3, 0);
        bad.connection_id = 7.into();
        assert_eq!(
            bus.post_message(0, &bad),
            Err(HvError::INVALID_CONNECTION_ID)
        );
        bad = contact(version::WIN10_V5_3, 0);
        bad.payload_size = 241.into();
        assert_eq!(bus.post_message(0, &bad), Err(HvError::INVALID_PARAMETER));
        assert!(rec.0.lock().unwrap().is_empty());
    }
}

//! The dma-test PCI device: a small DMA engine behind the pvIOMMU, so that a
//! guest (the test kernel) can check what its domains do to real device
//! accesses.
//!
//! BAR 0 holds the register file of [`regs`] (one definition, shared with
//! the test kernel). A command runs synchronously on the vCPU thread that
//! writes COMMAND: every access goes through [`Iommu::translate`] for the
//! device's id (the PCI form of its BDF) — the default domain is GPA, the
//! null domain faults, S2 and S1 domains translate — then to guest memory.
//! Each command holds an `iommu::DmaPin` from its first translation to its
//! last byte, so an UNMAP or flush returns only after it. `translate` holds
//! no lock when it returns, so no IOMMU lock is held while
//! guest memory is touched. A fault is recorded in the registers, never a
//! panic; a faulting copy or fill writes nothing. Completion raises the MSI
//! of the MSI capability when the guest asked for it (polling STATUS and
//! COMPLETIONS works too).

pub mod regs;

use std::sync::Arc;

use iommu::{Access, DeviceId, Fault, FaultReason, Iommu, Segments};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::bus::BusDevice;
use crate::interrupt::MsiSink;
use crate::pci::{BarKind, PciConfiguration, PciDevice, PciError, PciHeader};
use regs::{command, fault, offset, status, DmaTestRegs};

/// PCI capability id of MSI.
const CAP_ID_MSI: u8 = 0x05;
/// MSI message control: 64-bit address capable.
const MSI_64BIT: u16 = 1 << 7;
/// MSI message control: enable.
const MSI_ENABLE: u16 = 1;

/// Register byte ranges the guest may write.
const WRITABLE: [(u64, u64); 6] = [
    (offset::SRC_IOVA, 8),
    (offset::DST_IOVA, 8),
    (offset::LEN, 4),
    (offset::PATTERN, 4),
    (offset::COMMAND, 4),
    (offset::MSI_ON_COMPLETION, 4),
];

/// The dma-test device.
pub struct DmaTest {
    name: String,
    config: PciConfiguration,
    regs: DmaTestRegs,
    msi_cap: u16,
    device_id: Option<DeviceId>,
    iommu: Arc<Iommu>,
    memory: Arc<GuestMemoryMmap>,
    msi: Arc<dyn MsiSink>,
    bounce: Vec<u8>,
}

impl std::fmt::Debug for DmaTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaTest")
            .field("name", &self.name)
            .field("device_id", &self.device_id)
            .field("regs", &self.regs)
            .finish_non_exhaustive()
    }
}

/// The register value of a fault reason.
fn fault_code(reason: FaultReason) -> u32 {
    match reason {
        FaultReason::UnknownDevice | FaultReason::NotSoftwareDevice => fault::UNKNOWN_DEVICE,
        FaultReason::AddressOverflow => fault::ADDRESS_OVERFLOW,
        FaultReason::IovaOutOfRange => fault::IOVA_OUT_OF_RANGE,
        FaultReason::Blocked => fault::BLOCKED,
        FaultReason::TranslationDisabled => fault::TRANSLATION_DISABLED,
        FaultReason::NotMapped => fault::NOT_MAPPED,
        FaultReason::WriteDenied => fault::WRITE_DENIED,
        FaultReason::SupervisorOnly => fault::SUPERVISOR_ONLY,
        FaultReason::S1NotPresent { level } => fault::S1_NOT_PRESENT | u32::from(level) << 8,
        FaultReason::S1Reserved { level } => fault::S1_RESERVED | u32::from(level) << 8,
        FaultReason::S1TableOutsideRam { level } => {
            fault::S1_TABLE_OUTSIDE_RAM | u32::from(level) << 8
        }
        FaultReason::GpaOutsideRam => fault::GPA_OUTSIDE_RAM,
    }
}

/// Why a command stopped.
enum Stop {
    Status(u32),
    Fault {
        iova: u64,
        access: Access,
        code: u32,
    },
}

impl From<Fault> for Stop {
    fn from(f: Fault) -> Self {
        Stop::Fault {
            iova: f.iova,
            access: f.access,
            code: fault_code(f.reason),
        }
    }
}

impl DmaTest {
    /// A dma-test device called `name`, translating through `iommu` into
    /// `memory`, interrupting through `msi`. It has no IOMMU identity until
    /// [`set_device_id`](Self::set_device_id) (its accesses fault as an
    /// unknown device).
    pub fn new(
        name: impl Into<String>,
        iommu: Arc<Iommu>,
        memory: Arc<GuestMemoryMmap>,
        msi: Arc<dyn MsiSink>,
    ) -> Result<Self, PciError> {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: regs::VENDOR_ID,
            device_id: regs::DEVICE_ID,
            class: 0xff,
            ..Default::default()
        });
        config.add_bar(0, regs::BAR_SIZE, BarKind::Mmio32, false)?;
        // Message control (64-bit capable), address low, high, data.
        let mut body = [0u8; 12];
        body[..2].copy_from_slice(&MSI_64BIT.to_le_bytes());
        let msi_cap = config.add_capability(CAP_ID_MSI, &body)?;
        config.set_write_mask(msi_cap, u32::from(MSI_ENABLE) << 16);
        config.set_write_mask(msi_cap + 4, 0xffff_fffc);
        config.set_write_mask(msi_cap + 8, 0xffff_ffff);
        config.set_write_mask(msi_cap + 12, 0x0000_ffff);
        Ok(Self {
            name: name.into(),
            config,
            regs: DmaTestRegs::default(),
            msi_cap,
            device_id: None,
            iommu,
            memory,
            msi,
            bounce: Vec::new(),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id the device's DMA carries (PCI form of its BDF), once plugged.
    pub fn set_device_id(&mut self, id: DeviceId) {
        self.device_id = Some(id);
    }

    /// The id set by [`set_device_id`](Self::set_device_id).
    pub fn device_id(&self) -> Option<DeviceId> {
        self.device_id
    }

    /// The registers (for tests and the API).
    pub fn regs(&self) -> &DmaTestRegs {
        &self.regs
    }

    fn translate(&self, iova: u64, len: u32, access: Access) -> Result<Segments, Stop> {
        let Some(dev) = self.device_id else {
            return Err(Stop::Fault {
                iova,
                access,
                code: fault::UNKNOWN_DEVICE,
            });
        };
        Ok(self
            .iommu
            .translate(&*self.memory, dev, iova, u64::from(len), access)?)
    }

    /// Reads the segments into the bounce buffer.
    fn read_in(&mut self, segs: &Segments) -> Result<(), Stop> {
        let mut at = 0usize;
        for s in segs {
            let end = bounce_end(at, s.len, self.bounce.len())?;
            self.memory
                .read_slice(&mut self.bounce[at..end], GuestAddress(s.gpa))
                .map_err(|_| Stop::Fault {
                    iova: 0,
                    access: Access::Read,
                    code: fault::GPA_OUTSIDE_RAM,
                })?;
            at = end;
        }
        Ok(())
    }

    /// Writes the bounce buffer out to the segments.
    fn write_out(&self, segs: &Segments) -> Result<(), Stop> {
        let mut at = 0usize;
        for s in segs {
            let end = bounce_end(at, s.len, self.bounce.len())?;
            self.memory
                .write_slice(&self.bounce[at..end], GuestAddress(s.gpa))
                .map_err(|_| Stop::Fault {
                    iova: 0,
                    access: Access::Write,
                    code: fault::GPA_OUTSIDE_RAM,
                })?;
            at = end;
        }
        Ok(())
    }

    fn run(&mut self, cmd: u32) -> Result<(), Stop> {
        if !self.config.bus_master() {
            return Err(Stop::Status(status::BUS_MASTER_OFF));
        }
        let len = self.regs.len;
        if !matches!(cmd, command::COPY | command::FILL | command::CHECKSUM) {
            return Err(Stop::Status(status::BAD_COMMAND));
        }
        if len == 0 || len > regs::MAX_LEN {
            return Err(Stop::Status(status::BAD_LENGTH));
        }
        self.bounce.clear();
        self.bounce.resize(len as usize, 0);
        // From the first translation to the last byte written: a hypercall
        // that takes a translation away returns only after this DMA ends.
        let iommu = Arc::clone(&self.iommu);
        let _pin = iommu.dma_pin();
        let (src, dst) = (self.regs.src_iova, self.regs.dst_iova);
        match cmd {
            command::COPY => {
                // Both translations first: a faulting copy writes nothing.
                let from = self.translate(src, len, Access::Read)?;
                let to = self.translate(dst, len, Access::Write)?;
                self.read_in(&from)?;
                self.write_out(&to)
            }
            command::FILL => {
                let to = self.translate(dst, len, Access::Write)?;
                let pattern = self.regs.pattern.to_le_bytes();
                for (i, b) in self.bounce.iter_mut().enumerate() {
                    *b = pattern[i % 4];
                }
                self.write_out(&to)
            }
            _ => {
                let from = self.translate(src, len, Access::Read)?;
                self.read_in(&from)?;
                self.regs.result = self
                    .bounce
                    .iter()
                    .fold(0u64, |s, b| s.wrapping_add(u64::from(*b)));
                Ok(())
            }
        }
    }

    fn execute(&mut self, cmd: u32) {
        self.regs.fault_iova = 0;
        self.regs.fault_reason = fault::NONE;
        self.regs.fault_access = 0;
        self.regs.status = match self.run(cmd) {
            Ok(()) => status::DONE,
            Err(Stop::Status(s)) => s,
            Err(Stop::Fault { iova, access, code }) => {
                self.regs.fault_iova = iova;
                self.regs.fault_reason = code;
                self.regs.fault_access = match access {
                    Access::Read => 1,
                    Access::Write => 2,
                };
                status::FAULT
            }
        };
        self.regs.completions = self.regs.completions.wrapping_add(1);
        if self.regs.msi_on_completion & 1 != 0 {
            self.signal_msi();
        }
    }

    fn signal_msi(&self) {
        let c = self.msi_cap;
        if self.config.read_u16(c + 2) & MSI_ENABLE == 0 {
            return;
        }
        let address =
            u64::from(self.config.read_u32(c + 4)) | u64::from(self.config.read_u32(c + 8)) << 32;
        let data = u32::from(self.config.read_u16(c + 12));
        if let Err(e) = self.msi.signal_msi(address, data) {
            crate::guest_warn!("{}: cannot signal the MSI: {e}", self.name);
        }
    }
}

impl PciDevice for DmaTest {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

/// Whether an access of `len` bytes at `offset` is a valid register access.
fn valid_access(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8)
        && offset % len as u64 == 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= offset::END)
}

impl BusDevice for DmaTest {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if !valid_access(offset, data.len()) {
            data.fill(if offset >= offset::END { 0 } else { 0xff });
            return;
        }
        // valid_access bounds the range inside the register file.
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| self.regs.as_bytes().get(start..start + data.len()));
        match range {
            Some(r) => data.copy_from_slice(r),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if !valid_access(offset, data.len()) {
            return;
        }
        let bytes = self.regs.as_mut_bytes();
        for (i, b) in data.iter().enumerate() {
            let at = offset + i as u64;
            if WRITABLE.iter().any(|&(o, n)| (o..o + n).contains(&at)) {
                if let Some(slot) = usize::try_from(at).ok().and_then(|a| bytes.get_mut(a)) {
                    *slot = *b;
                }
            }
        }
        if (offset..offset + data.len() as u64).contains(&offset::COMMAND) {
            let cmd = self.regs.command;
            self.execute(cmd);
        }
    }
}

/// Where a segment of `len` bytes that starts at `at` ends in a bounce buffer
/// of `cap` bytes, or BAD_LENGTH when it does not fit.
fn bounce_end(at: usize, len: u64, cap: usize) -> Result<usize, Stop> {
    usize::try_from(len)
        .ok()
        .and_then(|n| at.checked_add(n))
        .filter(|&end| end <= cap)
        .ok_or(Stop::Status(status::BAD_LENGTH))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pci::COMMAND_BUS_MASTER;
    use iommu::abi::{
        Control, DeviceDomainId, DeviceDomainType, HvStatus, HypercallCode, HypercallOutput,
        InputAttachDeviceDomain, InputCreateDeviceDomain, InputDetachDeviceDomain,
        InputMapDeviceGpaPages, InputUnmapDeviceGpaPages, MapFlags, HV_PARTITION_ID_SELF,
    };
    use iommu::{BackendId, HypercallOutcome, HypercallRegs, IommuConfig};
    use std::sync::Mutex;
    use zerocopy::little_endian::{U32, U64};

    #[derive(Default)]
    struct Msis(Mutex<Vec<(u64, u32)>>);
    impl MsiSink for Msis {
        fn signal_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push((address, data));
            Ok(())
        }
    }

    const MEM: usize = 1 << 20;
    const INPUT: u64 = 0x1000;
    const OUTPUT: u64 = 0x2000;
    const BAR: u64 = 0xe000_0000;

    struct Rig {
        dev: DmaTest,
        iommu: Arc<Iommu>,
        mem: Arc<GuestMemoryMmap>,
        msis: Arc<Msis>,
        id: DeviceId,
    }

    fn rig() -> Rig {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
        let iommu = Arc::new(Iommu::new(IommuConfig::default()).unwrap());
        let msis = Arc::new(Msis::default());
        let mut dev = DmaTest::new("dma0", iommu.clone(), mem.clone(), msis.clone()).unwrap();
        let id = DeviceId::pci(0, 0, 3, 0);
        iommu.register_device(id, BackendId::SOFTWARE).unwrap();
        dev.set_device_id(id);
        dev.write_config(4, &(COMMAND_BUS_MASTER | 2).to_le_bytes());
        Rig {
            dev,
            iommu,
            mem,
            msis,
            id,
        }
    }

    impl Rig {
        fn w64(&mut self, off: u64, v: u64) {
            self.dev.write(BAR, off, &v.to_le_bytes());
        }
        fn w32(&mut self, off: u64, v: u32) {
            self.dev.write(BAR, off, &v.to_le_bytes());
        }
        fn r32(&mut self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.dev.read(BAR, off, &mut b);
            u32::from_le_bytes(b)
        }
        fn r64(&mut self, off: u64) -> u64 {
            let mut b = [0u8; 8];
            self.dev.read(BAR, off, &mut b);
            u64::from_le_bytes(b)
        }
        fn cmd(&mut self, cmd: u32, src: u64, dst: u64, len: u32) -> u32 {
            self.w64(offset::SRC_IOVA, src);
            self.w64(offset::DST_IOVA, dst);
            self.w32(offset::LEN, len);
            self.w32(offset::COMMAND, cmd);
            self.r32(offset::STATUS)
        }
        fn call(&self, code: HypercallCode, reps: u16, input: &[u8]) -> HvStatus {
            self.mem.write_slice(input, GuestAddress(INPUT)).unwrap();
            let rcx = Control::new()
                .with_code(code.0)
                .with_rep_count(reps)
                .into_bits();
            let out = self.iommu.dispatch(
                &*self.mem,
                0,
                HypercallRegs {
                    rcx,
                    rdx: INPUT,
                    r8: OUTPUT,
                },
            );
            let HypercallOutcome::Complete { rax } = out else {
                panic!("{out:?}")
            };
            HypercallOutput::from_bits(rax).hv_status()
        }
        fn header(d: DeviceDomainId) -> iommu::abi::InputDeviceDomain {
            iommu::abi::InputDeviceDomain::new(d)
        }
        fn attach(&self, d: DeviceDomainId) -> HvStatus {
            let a = InputAttachDeviceDomain {
                device_domain: Self::header(d),
                device_id: U64::new(self.id.into_bits()),
            };
            self.call(HypercallCode::ATTACH_DEVICE_DOMAIN, 0, a.as_bytes())
        }
        fn s2_domain(&self, id: u32) -> DeviceDomainId {
            let d = DeviceDomainId::with(DeviceDomainType::S2, id);
            let c = InputCreateDeviceDomain {
                device_domain: Self::header(d),
                create_device_domain_flags: U32::new(0),
            };
            assert_eq!(
                self.call(HypercallCode::CREATE_DEVICE_DOMAIN, 0, c.as_bytes()),
                HvStatus::SUCCESS
            );
            d
        }
        fn map(&self, d: DeviceDomainId, iova: u64, gpn: u64, writable: bool) -> HvStatus {
            let h = InputMapDeviceGpaPages {
                device_domain: Self::header(d),
                target_vtl: 0,
                padding: [0; 3],
                map_flags: U32::new(
                    MapFlags::new()
                        .with_readable(true)
                        .with_writable(writable)
                        .into_bits(),
                ),
                target_device_va_base: U64::new(iova),
            };
            let mut input = h.as_bytes().to_vec();
            input.extend_from_slice(&gpn.to_le_bytes());
            self.call(HypercallCode::MAP_DEVICE_GPA_PAGES, 1, &input)
        }
    }

    #[test]
    fn register_layout() {
        assert_eq!(std::mem::size_of::<DmaTestRegs>(), 0x40);
        assert_eq!(offset::SRC_IOVA, 0x00);
        assert_eq!(offset::DST_IOVA, 0x08);
        assert_eq!(offset::LEN, 0x10);
        assert_eq!(offset::PATTERN, 0x14);
        assert_eq!(offset::COMMAND, 0x18);
        assert_eq!(offset::STATUS, 0x1c);
        assert_eq!(offset::FAULT_IOVA, 0x20);
        assert_eq!(offset::FAULT_REASON, 0x28);
        assert_eq!(offset::FAULT_ACCESS, 0x2c);
        assert_eq!(offset::RESULT, 0x30);
        assert_eq!(offset::COMPLETIONS, 0x38);
        assert_eq!(offset::MSI_ON_COMPLETION, 0x3c);
        assert_eq!(offset::END, 0x40);
    }

    #[test]
    fn default_domain_is_gpa() {
        let mut r = rig();
        r.mem
            .write_slice(&[7u8; 100], GuestAddress(0x10000))
            .unwrap();
        assert_eq!(r.cmd(command::COPY, 0x10000, 0x20000, 100), status::DONE);
        let mut got = [0u8; 101];
        r.mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
        assert_eq!(&got[..100], &[7u8; 100]);
        assert_eq!(got[100], 0);
        r.w32(offset::PATTERN, 0x0403_0201);
        assert_eq!(r.cmd(command::FILL, 0, 0x30000, 6), status::DONE);
        let mut got = [0u8; 6];
        r.mem.read_slice(&mut got, GuestAddress(0x30000)).unwrap();
        assert_eq!(got, [1, 2, 3, 4, 1, 2]);
        assert_eq!(r.cmd(command::CHECKSUM, 0x30000, 0, 6), status::DONE);
        assert_eq!(r.r64(offset::RESULT), 13);
        assert_eq!(r.r32(offset::COMPLETIONS), 3);
        // Past guest RAM: a fault (GPA outside RAM), not a host access.
        assert_eq!(
            r.cmd(command::CHECKSUM, MEM as u64 - 8, 0, 16),
            status::FAULT
        );
        assert_eq!(r.r32(offset::FAULT_REASON), fault::GPA_OUTSIDE_RAM);
    }

    #[test]
    fn null_domain_faults_and_detach_restores() {
        let mut r = rig();
        let null = DeviceDomainId::with(DeviceDomainType::S2, DeviceDomainId::ID_NULL);
        assert_eq!(r.attach(null), HvStatus::SUCCESS);
        assert_eq!(r.cmd(command::COPY, 0x10000, 0x20000, 8), status::FAULT);
        assert_eq!(r.r32(offset::FAULT_REASON), fault::BLOCKED);
        assert_eq!(r.r64(offset::FAULT_IOVA), 0x10000);
        assert_eq!(r.r32(offset::FAULT_ACCESS), 1);
        let d = InputDetachDeviceDomain {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            device_id: U64::new(r.id.into_bits()),
        };
        assert_eq!(
            r.call(HypercallCode::DETACH_DEVICE_DOMAIN, 0, d.as_bytes()),
            HvStatus::SUCCESS
        );
        assert_eq!(r.cmd(command::COPY, 0x10000, 0x20000, 8), status::DONE);
        assert_eq!(r.r32(offset::FAULT_REASON), fault::NONE);
    }

    #[test]
    fn s2_maps_and_faults_exactly() {
        let mut r = rig();
        let d = r.s2_domain(5);
        assert_eq!(r.attach(d), HvStatus::SUCCESS);
        r.mem
            .write_slice(&[9u8; 16], GuestAddress(0x40000))
            .unwrap();
        // IOVA 0x100000 -> GPA 0x40000 (read-only); 0x101000 -> 0x50000.
        assert_eq!(r.map(d, 0x10_0000, 0x40, false), HvStatus::SUCCESS);
        assert_eq!(r.map(d, 0x10_1000, 0x50, true), HvStatus::SUCCESS);
        assert_eq!(r.cmd(command::COPY, 0x10_0000, 0x10_1000, 16), status::DONE);
        let mut got = [0u8; 16];
        r.mem.read_slice(&mut got, GuestAddress(0x50000)).unwrap();
        assert_eq!(got, [9u8; 16]);
        // Write to the read-only page; access past the mapping.
        assert_eq!(r.cmd(command::COPY, 0x10_1000, 0x10_0000, 4), status::FAULT);
        assert_eq!(r.r32(offset::FAULT_REASON), fault::WRITE_DENIED);
        assert_eq!(r.r32(offset::FAULT_ACCESS), 2);
        assert_eq!(r.cmd(command::CHECKSUM, 0x10_1ff0, 0, 0x20), status::FAULT);
        assert_eq!(r.r32(offset::FAULT_REASON), fault::NOT_MAPPED);
        assert_eq!(r.r64(offset::FAULT_IOVA), 0x10_2000);
        // Unmapped: the copy faults and writes nothing.
        let u = InputUnmapDeviceGpaPages {
            device_domain: Rig::header(d),
            target_device_va_base: U64::new(0x10_0000),
        };
        assert_eq!(
            r.call(HypercallCode::UNMAP_DEVICE_GPA_PAGES, 1, u.as_bytes()),
            HvStatus::SUCCESS
        );
        r.mem
            .write_slice(&[0u8; 16], GuestAddress(0x50000))
            .unwrap();
        assert_eq!(
            r.cmd(command::COPY, 0x10_0000, 0x10_1000, 16),
            status::FAULT
        );
        assert_eq!(r.r32(offset::FAULT_REASON), fault::NOT_MAPPED);
        r.mem.read_slice(&mut got, GuestAddress(0x50000)).unwrap();
        assert_eq!(got, [0u8; 16]);
        assert!(r.iommu.stats().faults.total >= 3);
    }

    #[test]
    fn hostile_register_accesses() {
        let mut r = rig();
        // Bad length, command, widths, offsets.
        assert_eq!(r.cmd(command::COPY, 0, 0x1000, 0), status::BAD_LENGTH);
        assert_eq!(
            r.cmd(command::COPY, 0, 0x1000, regs::MAX_LEN + 1),
            status::BAD_LENGTH
        );
        assert_eq!(r.cmd(99, 0, 0x1000, 8), status::BAD_COMMAND);
        assert_eq!(r.cmd(command::COPY, u64::MAX - 2, 0x1000, 8), status::FAULT);
        assert_eq!(r.r32(offset::FAULT_REASON), fault::ADDRESS_OVERFLOW);
        let mut b = [0u8; 2];
        r.dev.read(BAR, 0, &mut b);
        assert_eq!(b, [0xff; 2]);
        let mut b = [0u8; 4];
        r.dev.read(BAR, 0x800, &mut b);
        assert_eq!(b, [0; 4]);
        r.dev.read(BAR, 2, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Read-only registers stay; stray writes are ignored.
        r.w32(offset::STATUS, 0xdead);
        r.w64(offset::RESULT, 1);
        r.dev.write(BAR, 0x3f, &[1]);
        r.dev.write(BAR, u64::MAX - 3, &[1, 2, 3, 4]);
        assert_eq!(r.r32(offset::STATUS), status::FAULT);
        // Bus mastering off: nothing moves.
        r.dev.write_config(4, &2u16.to_le_bytes());
        assert_eq!(r.cmd(command::FILL, 0, 0x1000, 8), status::BUS_MASTER_OFF);
        // An unplugged device (no id) faults.
        let mut lone = DmaTest::new("x", r.iommu.clone(), r.mem.clone(), r.msis.clone()).unwrap();
        lone.write_config(4, &COMMAND_BUS_MASTER.to_le_bytes());
        lone.write(BAR, offset::LEN, &8u32.to_le_bytes());
        lone.write(BAR, offset::COMMAND, &command::FILL.to_le_bytes());
        assert_eq!(lone.regs().status, status::FAULT);
        assert_eq!(lone.regs().fault_reason, fault::UNKNOWN_DEVICE);
    }

    #[test]
    fn completion_msi() {
        let mut r = rig();
        let cap = r.dev.msi_cap;
        // Capability chain: status bit, pointer, id.
        let mut b = [0u8; 1];
        r.dev.read_config(0x34, &mut b);
        assert_eq!(u16::from(b[0]), cap);
        r.dev.read_config(cap, &mut b);
        assert_eq!(b[0], CAP_ID_MSI);
        r.w32(offset::MSI_ON_COMPLETION, 1);
        r.w32(offset::PATTERN, 0);
        // MSI disabled: nothing sent.
        assert_eq!(r.cmd(command::FILL, 0, 0x1000, 8), status::DONE);
        assert!(r.msis.0.lock().unwrap().is_empty());
        r.dev.write_config(cap + 4, &0xfee0_1000u32.to_le_bytes());
        r.dev.write_config(cap + 8, &0u32.to_le_bytes());
        r.dev.write_config(cap + 12, &0x4041u32.to_le_bytes());
        r.dev.write_config(cap + 2, &1u16.to_le_bytes());
        assert_eq!(r.cmd(command::FILL, 0, 0x1000, 8), status::DONE);
        assert_eq!(*r.msis.0.lock().unwrap(), vec![(0xfee0_1000, 0x4041)]);
        r.w32(offset::MSI_ON_COMPLETION, 0);
        assert_eq!(r.cmd(command::FILL, 0, 0x1000, 8), status::DONE);
        assert_eq!(r.msis.0.lock().unwrap().len(), 1);
    }
}

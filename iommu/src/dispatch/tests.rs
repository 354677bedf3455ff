//! The dispatcher driven from the guest's side: registers and pages in,
//! RAX/RCX and memory out. Every call and every status of the contract.

use super::*;
use crate::testing::{Call, RecordingBackend};
use crate::{
    Access, AttachTarget, Attachment, BackendId, DeviceId, DomainInfoKind, DomainKind, FaultReason,
    Invalidation, IommuConfig, MapRun, Perms,
};
use pviommu_abi::{
    device_property, CreateDeviceDomainFlags, DeviceDomainId, DeviceDomainSettings,
    DeviceDomainSettingsFlags, DeviceDomainType, FlushListEntry, InputDeviceDomain,
    OutputGetIommuCapabilities, OutputGetLogicalDeviceProperty, HV_PARTITION_ID_SELF,
};
use pviommu_abi::{
    register, InputGetVpRegisters, InputPostMessage, InputRetargetDeviceInterrupt,
    InputSendSyntheticClusterIpi, InputSignalEvent, HV_DEVICE_INTERRUPT_TARGET_PROCESSOR_SET,
    HV_VP_INDEX_SELF,
};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromZeros, IntoBytes};

pub(crate) const MB: u64 = 1 << 20;
/// RAM: [0, 64 MiB) and [128 MiB, 132 MiB); a hole between.
pub(crate) const RAM_TOP: u64 = 64 * MB;
pub(crate) const HIGH_RAM: u64 = 128 * MB;
pub(crate) const INPUT: u64 = 0x1000;
pub(crate) const OUTPUT: u64 = 0x2000;
pub(crate) const P: u64 = 4096;

pub(crate) const S2: DeviceDomainType = DeviceDomainType::S2;
pub(crate) const S1: DeviceDomainType = DeviceDomainType::S1;

pub(crate) fn dev(n: u8) -> DeviceId {
    DeviceId::pci(0, 0, n, 0)
}

pub(crate) struct Guest {
    pub iommu: Arc<Iommu>,
    pub mem: GuestMemoryMmap<()>,
    pub rec: Arc<RecordingBackend>,
    pub rec_id: BackendId,
}

/// (status, reps completed) of a finished call.
pub(crate) type Res = (HvStatus, u16);

impl Guest {
    pub(crate) fn with(config: IommuConfig) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 << 20),
            (GuestAddress(HIGH_RAM), 4 << 20),
        ])
        .expect("memory");
        let iommu = Arc::new(Iommu::new(config).expect("iommu"));
        let rec = Arc::new(RecordingBackend::new("recording"));
        let rec_id = iommu.add_backend(rec.clone());
        for n in 1..=3 {
            iommu
                .register_device(dev(n), BackendId::SOFTWARE)
                .expect("register");
        }
        iommu.register_device(dev(9), rec_id).expect("register");
        rec.take_calls();
        Self {
            iommu,
            mem,
            rec,
            rec_id,
        }
    }

    pub(crate) fn new() -> Self {
        Self::with(IommuConfig::default())
    }

    pub(crate) fn raw(&self, rcx: u64, rdx: u64, r8: u64) -> HypercallOutcome {
        self.iommu
            .dispatch(&self.mem, 0, HypercallRegs { rcx, rdx, r8 })
    }

    /// Issues a call like the guest's hypercall page would: re-executes on
    /// "continue" until the call completes. Returns the result and how many
    /// slices it took.
    pub(crate) fn issue(&self, rcx: u64, rdx: u64, r8: u64) -> (Res, usize) {
        let mut rcx = rcx;
        let mut slices = 1;
        loop {
            match self.raw(rcx, rdx, r8) {
                HypercallOutcome::Complete { rax } => {
                    let out = HypercallOutput::from_bits(rax);
                    assert_eq!(out.reserved0(), 0);
                    assert_eq!(out.reserved1(), 0);
                    return ((out.hv_status(), out.reps_completed()), slices);
                }
                HypercallOutcome::Continue { rcx: next } => {
                    let (old, new) = (Control::from_bits(rcx), Control::from_bits(next));
                    assert!(new.rep_start() > old.rep_start(), "progress");
                    assert_eq!(
                        new.with_rep_start(0),
                        old.with_rep_start(0),
                        "only the start moves"
                    );
                    rcx = next;
                    slices += 1;
                    assert!(slices < 10_000);
                }
            }
        }
    }

    pub(crate) fn write_input(&self, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(INPUT))
            .expect("input");
    }

    pub(crate) fn simple(&self, code: HypercallCode, input: &[u8]) -> HvStatus {
        self.write_input(input);
        let rcx = Control::new().with_code(code.0).into_bits();
        let ((status, reps), _) = self.issue(rcx, INPUT, OUTPUT);
        assert_eq!(reps, 0);
        status
    }

    pub(crate) fn rep(
        &self,
        code: HypercallCode,
        header: &[u8],
        elems: &[u64],
        count: u16,
        start: u16,
    ) -> Res {
        let mut bytes = header.to_vec();
        for e in elems {
            bytes.extend_from_slice(&e.to_le_bytes());
        }
        self.write_input(&bytes);
        let rcx = Control::new()
            .with_code(code.0)
            .with_rep_count(count)
            .with_rep_start(start)
            .into_bits();
        self.issue(rcx, INPUT, OUTPUT).0
    }

    pub(crate) fn create(&self, t: DeviceDomainType, id: u32) -> HvStatus {
        self.simple(
            HypercallCode::CREATE_DEVICE_DOMAIN,
            create_input(t, id, 0).as_bytes(),
        )
    }

    pub(crate) fn delete(&self, t: DeviceDomainType, id: u32) -> HvStatus {
        let input = InputDeleteDeviceDomain {
            device_domain: hdr(t, id),
        };
        self.simple(HypercallCode::DELETE_DEVICE_DOMAIN, input.as_bytes())
    }

    pub(crate) fn attach(&self, t: DeviceDomainType, id: u32, device: DeviceId) -> HvStatus {
        let input = InputAttachDeviceDomain {
            device_domain: hdr(t, id),
            device_id: U64::new(device.into_bits()),
        };
        self.simple(HypercallCode::ATTACH_DEVICE_DOMAIN, input.as_bytes())
    }

    pub(crate) fn detach(&self, device: DeviceId) -> HvStatus {
        let input = InputDetachDeviceDomain {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            device_id: U64::new(device.into_bits()),
        };
        self.simple(HypercallCode::DETACH_DEVICE_DOMAIN, input.as_bytes())
    }

    pub(crate) fn configure(
        &self,
        id: u32,
        flags: DeviceDomainSettingsFlags,
        root: u64,
    ) -> HvStatus {
        let input = configure_input(id, flags.into_bits(), root);
        self.simple(HypercallCode::CONFIGURE_DEVICE_DOMAIN, input.as_bytes())
    }

    pub(crate) fn map(&self, id: u32, iova: u64, gpns: &[u64], flags: u32) -> Res {
        let count = u16::try_from(gpns.len()).expect("count");
        self.rep(
            HypercallCode::MAP_DEVICE_GPA_PAGES,
            map_hdr(S2, id, iova, flags).as_bytes(),
            gpns,
            count,
            0,
        )
    }

    pub(crate) fn unmap(&self, id: u32, iova: u64, pages: u16) -> Res {
        let input = InputUnmapDeviceGpaPages {
            device_domain: hdr(S2, id),
            target_device_va_base: U64::new(iova),
        };
        self.rep(
            HypercallCode::UNMAP_DEVICE_GPA_PAGES,
            input.as_bytes(),
            &[],
            pages,
            0,
        )
    }

    pub(crate) fn flush_list(&self, t: DeviceDomainType, id: u32, entries: &[u64]) -> Res {
        let count = u16::try_from(entries.len()).expect("count");
        self.rep(
            HypercallCode::FLUSH_DEVICE_DOMAIN_LIST,
            flush_list_hdr(t, id, 0).as_bytes(),
            entries,
            count,
            0,
        )
    }

    pub(crate) fn flush(&self, t: DeviceDomainType, id: u32) -> HvStatus {
        let input = InputFlushDeviceDomain {
            device_domain: hdr(t, id),
            flags: U32::new(0),
            reserved: U32::new(0),
        };
        self.simple(HypercallCode::FLUSH_DEVICE_DOMAIN, input.as_bytes())
    }

    pub(crate) fn translate(
        &self,
        device: DeviceId,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<(u64, u64)>, crate::Fault> {
        self.iommu
            .translate(&self.mem, device, iova, len, access)
            .map(|s| s.iter().map(|s| (s.gpa, s.len)).collect())
    }

    pub(crate) fn pte(&self, table: u64, index: u64, value: u64) {
        self.mem
            .write_obj(value, GuestAddress(table + index * 8))
            .expect("pte");
    }
}

pub(crate) fn hdr(t: DeviceDomainType, id: u32) -> InputDeviceDomain {
    InputDeviceDomain::new(DeviceDomainId::with(t, id))
}

pub(crate) fn create_input(t: DeviceDomainType, id: u32, flags: u32) -> InputCreateDeviceDomain {
    InputCreateDeviceDomain {
        device_domain: hdr(t, id),
        create_device_domain_flags: U32::new(flags),
    }
}

pub(crate) fn configure_input(id: u32, flags: u64, root: u64) -> InputConfigureDeviceDomain {
    InputConfigureDeviceDomain {
        device_domain: hdr(S1, id),
        settings: DeviceDomainSettings {
            flags: U64::new(flags),
            page_table_root: U64::new(root),
        },
    }
}

pub(crate) fn map_hdr(
    t: DeviceDomainType,
    id: u32,
    iova: u64,
    flags: u32,
) -> InputMapDeviceGpaPages {
    InputMapDeviceGpaPages {
        device_domain: hdr(t, id),
        target_vtl: 0,
        padding: [0; 3],
        map_flags: U32::new(flags),
        target_device_va_base: U64::new(iova),
    }
}

pub(crate) fn flush_list_hdr(
    t: DeviceDomainType,
    id: u32,
    flags: u32,
) -> InputFlushDeviceDomainList {
    InputFlushDeviceDomainList {
        device_domain: hdr(t, id),
        flags: U32::new(flags),
        reserved: U32::new(0),
    }
}

pub(crate) const R: u32 = 0x1;
pub(crate) const RW: u32 = 0x3;

pub(crate) fn entry(page: u64, shift: u16) -> u64 {
    FlushListEntry::new()
        .with_page_mask_shift(shift)
        .with_page_number(page)
        .into_bits()
}

pub(crate) fn ok() -> HvStatus {
    HvStatus::SUCCESS
}

/// The header of every call that takes `hv_input_device_domain`, as bytes
/// with a valid domain, for tests that corrupt one field.
fn calls_with_domain_header(g: &Guest) -> Vec<(HypercallCode, Vec<u8>, u16)> {
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.create(S1, 6), ok());
    vec![
        (
            HypercallCode::CREATE_DEVICE_DOMAIN,
            create_input(S2, 7, 0).as_bytes().to_vec(),
            0,
        ),
        (
            HypercallCode::DELETE_DEVICE_DOMAIN,
            InputDeleteDeviceDomain {
                device_domain: hdr(S2, 5),
            }
            .as_bytes()
            .to_vec(),
            0,
        ),
        (
            HypercallCode::ATTACH_DEVICE_DOMAIN,
            InputAttachDeviceDomain {
                device_domain: hdr(S2, 5),
                device_id: U64::new(dev(1).into_bits()),
            }
            .as_bytes()
            .to_vec(),
            0,
        ),
        (
            HypercallCode::CONFIGURE_DEVICE_DOMAIN,
            configure_input(6, 0, 0).as_bytes().to_vec(),
            0,
        ),
        (
            HypercallCode::FLUSH_DEVICE_DOMAIN,
            InputFlushDeviceDomain {
                device_domain: hdr(S2, 5),
                flags: U32::new(0),
                reserved: U32::new(0),
            }
            .as_bytes()
            .to_vec(),
            0,
        ),
        (
            HypercallCode::MAP_DEVICE_GPA_PAGES,
            {
                let mut v = map_hdr(S2, 5, 0x10_0000, R).as_bytes().to_vec();
                v.extend_from_slice(&0x100u64.to_le_bytes());
                v
            },
            1,
        ),
        (
            HypercallCode::UNMAP_DEVICE_GPA_PAGES,
            InputUnmapDeviceGpaPages {
                device_domain: hdr(S2, 5),
                target_device_va_base: U64::new(0x10_0000),
            }
            .as_bytes()
            .to_vec(),
            1,
        ),
        (
            HypercallCode::FLUSH_DEVICE_DOMAIN_LIST,
            {
                let mut v = flush_list_hdr(S2, 5, 0).as_bytes().to_vec();
                v.extend_from_slice(&entry(0x100, 0).to_le_bytes());
                v
            },
            1,
        ),
    ]
}

fn call_bytes(g: &Guest, code: HypercallCode, bytes: &[u8], reps: u16) -> Res {
    g.write_input(bytes);
    let rcx = Control::new()
        .with_code(code.0)
        .with_rep_count(reps)
        .into_bits();
    g.issue(rcx, INPUT, OUTPUT).0
}

// ---------------------------------------------------------------- control

#[test]
fn reserved_control_bits_are_invalid_input() {
    let g = Guest::new();
    for bit in (27..=30).chain(44..=47).chain(60..=63) {
        let rcx = Control::new()
            .with_code(HypercallCode::GET_IOMMU_CAPABILITIES.0)
            .into_bits()
            | 1 << bit;
        assert_eq!(
            g.issue(rcx, INPUT, OUTPUT).0,
            (HvStatus::INVALID_HYPERCALL_INPUT, 0),
            "bit {bit}"
        );
    }
}

#[test]
fn unknown_codes_are_invalid_code() {
    let g = Guest::new();
    for code in [0u16, 1, 0x00B0, 0x00B5, 0x0126, 0xFFFF] {
        let rcx = Control::new().with_code(code).into_bits();
        assert_eq!(
            g.issue(rcx, INPUT, OUTPUT).0,
            (HvStatus::INVALID_HYPERCALL_CODE, 0)
        );
    }
    assert_eq!(g.iommu.stats().hypercalls.unknown, 6);
}

#[test]
fn nested_and_variable_header_are_invalid_input() {
    let g = Guest::new();
    let base = Control::new().with_code(HypercallCode::GET_IOMMU_CAPABILITIES.0);
    for c in [
        base.with_nested(true),
        base.with_variable_header_size(1),
        base.with_variable_header_size(0x3FF),
    ] {
        assert_eq!(
            g.issue(c.into_bits(), INPUT, OUTPUT).0,
            (HvStatus::INVALID_HYPERCALL_INPUT, 0)
        );
    }
}

#[test]
fn rep_count_and_start_must_match_the_call() {
    let g = Guest::new();
    assert_eq!(g.create(S2, 5), ok());
    let simple = Control::new().with_code(HypercallCode::GET_IOMMU_CAPABILITIES.0);
    for c in [simple.with_rep_count(1), simple.with_rep_start(1)] {
        assert_eq!(
            g.issue(c.into_bits(), INPUT, OUTPUT).0,
            (HvStatus::INVALID_HYPERCALL_INPUT, 0)
        );
    }
    g.write_input(
        InputUnmapDeviceGpaPages {
            device_domain: hdr(S2, 5),
            target_device_va_base: U64::new(0),
        }
        .as_bytes(),
    );
    let rep = Control::new().with_code(HypercallCode::UNMAP_DEVICE_GPA_PAGES.0);
    for (count, start) in [(0, 0), (3, 3), (3, 4), (1, 0xFFF)] {
        let c = rep.with_rep_count(count).with_rep_start(start);
        assert_eq!(
            g.issue(c.into_bits(), INPUT, OUTPUT).0,
            (HvStatus::INVALID_HYPERCALL_INPUT, 0),
            "count {count} start {start}"
        );
    }
}

#[test]
fn fast_calls_fit_in_two_registers() {
    let g = Guest::new();
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.attach(S2, 5, dev(1)), ok());
    // DETACH (16 bytes, no output) works in the fast form.
    let fast = Control::new()
        .with_code(HypercallCode::DETACH_DEVICE_DOMAIN.0)
        .with_fast(true)
        .into_bits();
    assert_eq!(
        g.issue(fast, HV_PARTITION_ID_SELF, dev(1).into_bits()).0,
        (ok(), 0)
    );
    assert_eq!(g.iommu.device_attachment(dev(1)), Some(Attachment::Default));
    assert_eq!(
        g.issue(fast, 7, dev(1).into_bits()).0,
        (HvStatus::INVALID_PARTITION_ID, 0)
    );
    // Calls with output or more than 16 bytes of input cannot be fast.
    for code in [
        HypercallCode::GET_IOMMU_CAPABILITIES,
        HypercallCode::CREATE_DEVICE_DOMAIN,
        HypercallCode::ATTACH_DEVICE_DOMAIN,
    ] {
        let c = Control::new().with_code(code.0).with_fast(true).into_bits();
        assert_eq!(
            g.issue(c, HV_PARTITION_ID_SELF, 0).0,
            (HvStatus::INVALID_HYPERCALL_INPUT, 0),
            "{code:?}"
        );
    }
    let c = Control::new()
        .with_code(HypercallCode::UNMAP_DEVICE_GPA_PAGES.0)
        .with_fast(true)
        .with_rep_count(1)
        .into_bits();
    assert_eq!(
        g.issue(c, HV_PARTITION_ID_SELF, 0).0,
        (HvStatus::INVALID_HYPERCALL_INPUT, 0)
    );
}

// ---------------------------------------------------------------- buffers

#[test]
fn misaligned_or_page_crossing_buffers_are_invalid_alignment() {
    let g = Guest::new();
    let caps = Control::new()
        .with_code(HypercallCode::GET_IOMMU_CAPABILITIES.0)
        .into_bits();
    let input = InputGetIommuCapabilities {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        reserved: U64::new(0),
    };
    g.mem
        .write_slice(input.as_bytes(), GuestAddress(INPUT + 4))
        .expect("w");
    assert_eq!(
        g.issue(caps, INPUT + 4, OUTPUT).0,
        (HvStatus::INVALID_ALIGNMENT, 0)
    );
    // Input block of 16 bytes at 0xFF8 crosses into the next page.
    assert_eq!(
        g.issue(caps, INPUT + 0xFF8, OUTPUT).0,
        (HvStatus::INVALID_ALIGNMENT, 0)
    );
    g.write_input(input.as_bytes());
    assert_eq!(
        g.issue(caps, INPUT, OUTPUT + 2).0,
        (HvStatus::INVALID_ALIGNMENT, 0)
    );
    // Output of 24 bytes at 0xFF0 crosses.
    assert_eq!(
        g.issue(caps, INPUT, OUTPUT + 0xFF0).0,
        (HvStatus::INVALID_ALIGNMENT, 0)
    );
    assert_eq!(g.issue(caps, INPUT, OUTPUT + 0xFE8).0, (ok(), 0));
    // A rep list that does not fit the page: 508 MAP reps.
    assert_eq!(g.create(S2, 5), ok());
    g.write_input(map_hdr(S2, 5, 0, R).as_bytes());
    let map = Control::new()
        .with_code(HypercallCode::MAP_DEVICE_GPA_PAGES.0)
        .with_rep_count(508)
        .into_bits();
    assert_eq!(
        g.issue(map, INPUT, OUTPUT).0,
        (HvStatus::INVALID_ALIGNMENT, 0)
    );
    // R8 is not looked at by calls without output (the element is GPN 0).
    assert_eq!(
        g.issue(map & !(0xFFF << 32) | 1 << 32, INPUT, 3).0,
        (ok(), 1)
    );
}

#[test]
fn buffers_outside_ram_are_invalid_parameter() {
    let g = Guest::new();
    let caps = Control::new()
        .with_code(HypercallCode::GET_IOMMU_CAPABILITIES.0)
        .into_bits();
    assert_eq!(
        g.issue(caps, RAM_TOP, OUTPUT).0,
        (HvStatus::INVALID_PARAMETER, 0)
    );
    assert_eq!(
        g.issue(caps, !0xFFF_u64, OUTPUT).0,
        (HvStatus::INVALID_PARAMETER, 0)
    );
    let input = InputGetIommuCapabilities {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        reserved: U64::new(0),
    };
    g.write_input(input.as_bytes());
    assert_eq!(
        g.issue(caps, INPUT, RAM_TOP + 0x1000).0,
        (HvStatus::INVALID_PARAMETER, 0)
    );
    // High RAM works.
    g.mem
        .write_slice(input.as_bytes(), GuestAddress(HIGH_RAM))
        .expect("w");
    assert_eq!(g.issue(caps, HIGH_RAM, HIGH_RAM + 0x1000).0, (ok(), 0));
}

#[test]
fn output_is_written_only_on_success() {
    let g = Guest::new();
    let pattern = [0xA5u8; 24];
    g.mem
        .write_slice(&pattern, GuestAddress(OUTPUT))
        .expect("w");
    let bad = InputGetIommuCapabilities {
        partition_id: U64::new(0),
        reserved: U64::new(0),
    };
    assert_eq!(
        g.simple(HypercallCode::GET_IOMMU_CAPABILITIES, bad.as_bytes()),
        HvStatus::INVALID_PARTITION_ID
    );
    let mut out = [0u8; 24];
    g.mem.read_slice(&mut out, GuestAddress(OUTPUT)).expect("r");
    assert_eq!(out, pattern);
}

#[test]
fn input_is_copied_into_a_zeroed_buffer() {
    // Bytes past the declared input size are never seen by the handler: a
    // 28-byte CREATE followed by garbage works.
    let g = Guest::new();
    let mut bytes = create_input(S2, 5, 0).as_bytes().to_vec();
    bytes.extend_from_slice(&[0xFF; 64]);
    assert_eq!(g.simple(HypercallCode::CREATE_DEVICE_DOMAIN, &bytes), ok());
}

// ---------------------------------------------------------------- common header

#[test]
fn partition_id_must_be_self_for_every_call() {
    let g = Guest::new();
    let mut calls = calls_with_domain_header(&g);
    calls.push((
        HypercallCode::GET_IOMMU_CAPABILITIES,
        InputGetIommuCapabilities {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            reserved: U64::new(0),
        }
        .as_bytes()
        .to_vec(),
        0,
    ));
    calls.push((
        HypercallCode::GET_LOGICAL_DEVICE_PROPERTY,
        InputGetLogicalDeviceProperty {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            logical_device_id: U64::new(dev(1).into_bits()),
            code: U32::new(device_property::PVIOMMU),
            reserved: U32::new(0),
        }
        .as_bytes()
        .to_vec(),
        0,
    ));
    calls.push((
        HypercallCode::DETACH_DEVICE_DOMAIN,
        InputDetachDeviceDomain {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            device_id: U64::new(dev(1).into_bits()),
        }
        .as_bytes()
        .to_vec(),
        0,
    ));
    calls.push((
        HypercallCode::GET_VP_REGISTERS,
        vp_registers_input(HV_VP_INDEX_SELF, &[register::VSM_VP_STATUS]),
        1,
    ));
    // Every call but SEND_SYNTHETIC_CLUSTER_IPI, POST_MESSAGE and
    // SIGNAL_EVENT, which name no partition, and RETARGET_INTERRUPT, which
    // needs processors (its partition is checked in its own test).
    assert_eq!(calls.len(), HypercallCode::ALL.len() - 4);
    for (code, bytes, reps) in calls {
        for pid in [0u64, 1, HV_PARTITION_ID_SELF - 1] {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&pid.to_le_bytes());
            assert_eq!(
                call_bytes(&g, code, &b, reps),
                (HvStatus::INVALID_PARTITION_ID, 0),
                "{code:?}"
            );
        }
    }
}

#[test]
fn owner_vtl_padding_and_domain_reserved_bits_are_checked() {
    let g = Guest::new();
    for (code, bytes, reps) in calls_with_domain_header(&g) {
        let mut corrupt = vec![];
        for (offset, value) in [(8usize, 0x01u8), (8, 0x20), (9, 1), (15, 0x80)] {
            let mut b = bytes.clone();
            b[offset] = value;
            corrupt.push(b);
        }
        // Domain id word: reserved bits 31:4, and type SOC / unknown.
        for word_bits in [1u64 << 4, 1 << 31, 2, 0xF] {
            let mut b = bytes.clone();
            let w = u64::from_le_bytes(b[16..24].try_into().expect("8")) | word_bits;
            b[16..24].copy_from_slice(&w.to_le_bytes());
            corrupt.push(b);
        }
        for b in corrupt {
            assert_eq!(
                call_bytes(&g, code, &b, reps),
                (HvStatus::INVALID_PARAMETER, 0),
                "{code:?}"
            );
        }
        // VTL 0 named explicitly is fine.
        let mut b = bytes.clone();
        b[8] = 0x10;
        if code != HypercallCode::CREATE_DEVICE_DOMAIN
            && code != HypercallCode::DELETE_DEVICE_DOMAIN
        {
            let status = call_bytes(&g, code, &b, reps).0;
            assert!(
                status == ok() || code == HypercallCode::UNMAP_DEVICE_GPA_PAGES,
                "{code:?}: {status:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- queries

#[test]
fn get_iommu_capabilities() {
    let g = Guest::with(IommuConfig {
        max_iova_width: 39,
        s1_5level: false,
        ..Default::default()
    });
    let input = InputGetIommuCapabilities {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        reserved: U64::new(0),
    };
    assert_eq!(
        g.simple(HypercallCode::GET_IOMMU_CAPABILITIES, input.as_bytes()),
        ok()
    );
    let out: OutputGetIommuCapabilities = g.mem.read_obj_zc(OUTPUT);
    assert_eq!(out.size.get(), 24);
    assert_eq!(out.max_iova_width, 39);
    assert_eq!(out.max_pasid_width, 0);
    assert_eq!(out.iommu_cap.get(), 0b0111, "present, S2, S1, no 5-level");
    assert_eq!(out.pgsize_bitmap.get(), crate::DEFAULT_PGSIZE_BITMAP);
    let g = Guest::with(IommuConfig {
        s1: false,
        s1_5level: false,
        ..Default::default()
    });
    assert_eq!(
        g.simple(HypercallCode::GET_IOMMU_CAPABILITIES, input.as_bytes()),
        ok()
    );
    let out: OutputGetIommuCapabilities = g.mem.read_obj_zc(OUTPUT);
    assert_eq!(out.iommu_cap.get(), 0b0011);
    let bad = InputGetIommuCapabilities {
        reserved: U64::new(1),
        ..input
    };
    assert_eq!(
        g.simple(HypercallCode::GET_IOMMU_CAPABILITIES, bad.as_bytes()),
        HvStatus::INVALID_PARAMETER
    );
}

#[test]
fn get_logical_device_property() {
    let g = Guest::new();
    let input = |device: DeviceId, code: u32, reserved: u32| InputGetLogicalDeviceProperty {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        logical_device_id: U64::new(device.into_bits()),
        code: U32::new(code),
        reserved: U32::new(reserved),
    };
    let call = |i: InputGetLogicalDeviceProperty| {
        g.simple(HypercallCode::GET_LOGICAL_DEVICE_PROPERTY, i.as_bytes())
    };
    assert_eq!(call(input(dev(9), device_property::PVIOMMU, 0)), ok());
    let out: OutputGetLogicalDeviceProperty = g.mem.read_obj_zc(OUTPUT);
    assert_eq!((out.device_iommu.get(), out.reserved.get()), (1, 0));
    assert_eq!(
        call(input(dev(20), device_property::PVIOMMU, 0)),
        HvStatus::INVALID_DEVICE_ID
    );
    assert_eq!(call(input(dev(1), 9, 0)), HvStatus::INVALID_PARAMETER);
    assert_eq!(
        call(input(dev(1), device_property::PVIOMMU, 1)),
        HvStatus::INVALID_PARAMETER
    );
}

trait ReadZc {
    fn read_obj_zc<T: zerocopy::FromBytes>(&self, gpa: u64) -> T;
}

impl ReadZc for GuestMemoryMmap<()> {
    fn read_obj_zc<T: zerocopy::FromBytes>(&self, gpa: u64) -> T {
        let mut buf = vec![0u8; size_of::<T>()];
        self.read_slice(&mut buf, GuestAddress(gpa)).expect("read");
        T::read_from_bytes(&buf).expect("size")
    }
}

// ---------------------------------------------------------------- domains

#[test]
fn create_domain_rules() {
    let g = Guest::with(IommuConfig {
        max_domains: 3,
        ..Default::default()
    });
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.create(S2, 5), HvStatus::INVALID_PARAMETER, "id in use");
    assert_eq!(
        g.create(S1, 5),
        HvStatus::INVALID_PARAMETER,
        "id in use by another type"
    );
    assert_eq!(g.create(S2, 0), HvStatus::INVALID_PARAMETER, "default id");
    assert_eq!(
        g.create(S2, 0xFFFF_FFFF),
        HvStatus::INVALID_PARAMETER,
        "null id"
    );
    assert_eq!(
        g.create(DeviceDomainType::SOC, 8),
        HvStatus::INVALID_PARAMETER
    );
    let flags = CreateDeviceDomainFlags::new()
        .with_forward_progress_required(true)
        .with_inherit_owning_vtl(true)
        .into_bits();
    assert_eq!(
        g.simple(
            HypercallCode::CREATE_DEVICE_DOMAIN,
            create_input(S1, 6, flags).as_bytes()
        ),
        ok()
    );
    assert_eq!(
        g.simple(
            HypercallCode::CREATE_DEVICE_DOMAIN,
            create_input(S2, 7, 4).as_bytes()
        ),
        HvStatus::INVALID_PARAMETER,
        "unknown flag"
    );
    assert_eq!(g.create(S2, 7), ok());
    assert_eq!(g.create(S2, 8), HvStatus::INSUFFICIENT_DEVICE_DOMAINS);
    assert_eq!(g.delete(S2, 7), ok());
    assert_eq!(g.create(S2, 8), ok(), "room again after a delete");
    let ids: Vec<(u32, DomainInfoKind)> = g
        .iommu
        .domains_info()
        .iter()
        .map(|d| (d.id, d.kind))
        .collect();
    assert_eq!(
        ids,
        [
            (0, DomainInfoKind::Default),
            (0xFFFF_FFFF, DomainInfoKind::Null),
            (5, DomainInfoKind::S2),
            (6, DomainInfoKind::S1),
            (8, DomainInfoKind::S2)
        ]
    );
    let no_s1 = Guest::with(IommuConfig {
        s1: false,
        s1_5level: false,
        ..Default::default()
    });
    assert_eq!(no_s1.create(S1, 1), HvStatus::INVALID_PARAMETER);
    assert_eq!(no_s1.create(S2, 1), ok());
}

#[test]
fn delete_domain_rules() {
    let g = Guest::new();
    assert_eq!(g.delete(S2, 5), HvStatus::INVALID_PARAMETER, "unknown");
    assert_eq!(g.delete(S2, 0), HvStatus::INVALID_PARAMETER, "default");
    assert_eq!(
        g.delete(S2, 0xFFFF_FFFF),
        HvStatus::INVALID_PARAMETER,
        "null"
    );
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.delete(S1, 5), HvStatus::INVALID_PARAMETER, "wrong type");
    assert_eq!(g.attach(S2, 5, dev(1)), ok());
    assert_eq!(g.delete(S2, 5), HvStatus::OPERATION_DENIED);
    assert_eq!(g.detach(dev(1)), ok());
    assert_eq!(g.delete(S2, 5), ok());
    assert_eq!(g.delete(S2, 5), HvStatus::INVALID_PARAMETER, "gone");
}

#[test]
fn attach_and_detach_rules() {
    let g = Guest::new();
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.create(S2, 6), ok());
    assert_eq!(
        g.attach(S2, 7, dev(1)),
        HvStatus::INVALID_PARAMETER,
        "missing domain"
    );
    assert_eq!(
        g.attach(S1, 5, dev(1)),
        HvStatus::INVALID_PARAMETER,
        "wrong type"
    );
    assert_eq!(g.attach(S2, 5, dev(20)), HvStatus::INVALID_DEVICE_ID);
    assert_eq!(
        g.attach(S2, 5, DeviceId::from_bits(dev(1).into_bits() | 1 << 40)),
        HvStatus::INVALID_DEVICE_ID,
        "ids are compared whole"
    );
    assert_eq!(
        g.attach(S2, 0, dev(1)),
        HvStatus::DEVICE_ALREADY_IN_DOMAIN,
        "already in the default domain"
    );
    assert_eq!(g.attach(S2, 5, dev(1)), ok());
    assert_eq!(
        g.attach(S2, 5, dev(1)),
        HvStatus::DEVICE_ALREADY_IN_DOMAIN,
        "double attach"
    );
    assert_eq!(
        g.iommu.device_attachment(dev(1)),
        Some(Attachment::Domain(5)),
        "nothing changed"
    );
    // ATTACH replaces: a device in another domain moves.
    assert_eq!(g.attach(S2, 6, dev(1)), ok());
    assert_eq!(g.attach(S2, 0, dev(1)), ok());
    assert_eq!(g.attach(S2, 5, dev(1)), ok());
    assert_eq!(g.attach(S2, 0xFFFF_FFFF, dev(2)), ok());
    assert_eq!(g.iommu.device_attachment(dev(2)), Some(Attachment::Null));
    assert_eq!(
        g.attach(S2, 0xFFFF_FFFF, dev(2)),
        HvStatus::DEVICE_ALREADY_IN_DOMAIN
    );
    let fault = g
        .translate(dev(2), 0x1000, 8, Access::Read)
        .expect_err("null domain");
    assert_eq!(fault.reason, FaultReason::Blocked);
    assert_eq!(g.detach(dev(2)), ok());
    assert_eq!(
        g.translate(dev(2), 0x1000, 8, Access::Read),
        Ok(vec![(0x1000, 8)])
    );
    assert_eq!(
        g.detach(dev(2)),
        ok(),
        "detach in the default domain is a no-op"
    );
    assert_eq!(g.detach(dev(20)), HvStatus::INVALID_DEVICE_ID);
    assert_eq!(
        g.iommu.device_attachment(dev(1)),
        Some(Attachment::Domain(5))
    );
    let info = g.iommu.domains_info();
    assert_eq!(info[2].devices, [dev(1)]);
    assert_eq!(info[0].devices, [dev(2), dev(3), dev(9)]);
    assert_eq!(info[2].backends, ["software"]);
    assert_eq!(g.detach(dev(1)), ok());
    assert_eq!(
        g.iommu.domains_info()[2].backends,
        Vec::<&str>::new(),
        "instance dropped"
    );
}

#[test]
fn configure_rules() {
    let g = Guest::with(IommuConfig {
        s1_5level: false,
        ..Default::default()
    });
    assert_eq!(g.create(S1, 6), ok());
    assert_eq!(g.create(S2, 5), ok());
    let on = DeviceDomainSettingsFlags::new().with_translation_enabled(true);
    assert_eq!(g.configure(6, on, 0x10000), ok());
    assert_eq!(
        g.configure(6, on, 0x10800),
        HvStatus::INVALID_PARAMETER,
        "misaligned root"
    );
    assert_eq!(
        g.configure(6, on, RAM_TOP),
        HvStatus::INVALID_PARAMETER,
        "root outside RAM"
    );
    assert_eq!(g.configure(6, on, 0), ok(), "GPA 0 is RAM here");
    assert_eq!(
        g.configure(6, on.with_first_stage_paging_mode(true), 0x10000),
        HvStatus::INVALID_PARAMETER,
        "5-level not offered"
    );
    assert_eq!(
        g.configure(6, DeviceDomainSettingsFlags::from_bits(1 << 3), 0),
        HvStatus::INVALID_PARAMETER,
        "reserved flag"
    );
    assert_eq!(
        g.configure(6, DeviceDomainSettingsFlags::new(), 0),
        ok(),
        "identity"
    );
    assert_eq!(
        g.configure(6, DeviceDomainSettingsFlags::new(), 0x1001),
        ok(),
        "the root is ignored without translation"
    );
    let input = InputConfigureDeviceDomain {
        device_domain: hdr(S2, 5),
        ..configure_input(5, on.into_bits(), 0x10000)
    };
    assert_eq!(
        g.simple(HypercallCode::CONFIGURE_DEVICE_DOMAIN, input.as_bytes()),
        HvStatus::INVALID_PARAMETER
    );
    assert_eq!(
        g.configure(0, on, 0x10000),
        HvStatus::INVALID_PARAMETER,
        "default domain"
    );
    let s1 = g.iommu.domains_info()[3].s1.expect("s1");
    assert_eq!((s1.mode(), s1.root), (crate::S1Mode::Identity, 0));
    let g5 = Guest::new();
    assert_eq!(g5.create(S1, 6), ok());
    assert_eq!(
        g5.configure(6, on.with_first_stage_paging_mode(true), 0x10000),
        ok()
    );
}

// ---------------------------------------------------------------- map / unmap

#[test]
fn map_of_507_contiguous_pages_is_one_backend_map() {
    let g = Guest::new();
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.attach(S2, 5, dev(9)), ok());
    g.rec.take_calls();
    let gpns: Vec<u64> = (0x1000..0x1000 + 507).collect();
    assert_eq!(g.map(5, 0x4000_0000, &gpns, RW), (ok(), 507));
    let calls = g.rec.take_calls();
    assert_eq!(
        calls,
        [Call::Map(
            5,
            MapRun {
                iova: 0x4000_0000,
                gpa: 0x100_0000,
                len: 507 * P,
                perms: Perms::RW
            }
        )]
    );
    assert_eq!(g.iommu.domains_info()[2].mapped_pages, 507);
    assert_eq!(g.iommu.domains_info()[2].runs, 1);
    // Scattered pages: one map per page.
    let scattered: Vec<u64> = (0..10).map(|i| 0x2000 + 2 * i).collect();
    assert_eq!(g.map(5, 0x5000_0000, &scattered, R), (ok(), 10));
    assert_eq!(g.rec.take_calls().len(), 10);
    // A run does not cross a RAM region boundary even if GPAs are contiguous.
    let g2 = Guest::new();
    assert_eq!(g2.create(S2, 5), ok());
    assert_eq!(g2.attach(S2, 5, dev(9)), ok());
    g2.rec.take_calls();
    let top = RAM_TOP / P;
    assert_eq!(g2.map(5, 0, &[top - 2, top - 1], R), (ok(), 2));
    assert_eq!(g2.rec.take_calls().len(), 1);
}

#[test]
fn map_failures_report_the_failing_rep() {
    let g = Guest::with(IommuConfig {
        max_iova_width: 32,
        max_mapped_pages_per_domain: 20,
        ..Default::default()
    });
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.attach(S2, 5, dev(9)), ok());
    let base = 0x1000_0000;
    // Rep 3 is outside RAM: reps 0-2 stay mapped.
    assert_eq!(
        g.map(5, base, &[0x100, 0x101, 0x102, RAM_TOP / P, 0x104], R),
        (HvStatus::INVALID_PARAMETER, 3)
    );
    assert_eq!(g.rec.pages(5).expect("pages").len(), 3);
    // Rep 0 already mapped.
    assert_eq!(
        g.map(5, base + 2 * P, &[0x200], R),
        (HvStatus::INVALID_PARAMETER, 0)
    );
    // Rep 1 runs into a mapped page.
    assert_eq!(
        g.map(5, base - P, &[0x300, 0x301], R),
        (HvStatus::INVALID_PARAMETER, 1)
    );
    assert_eq!(g.rec.pages(5).expect("pages").len(), 4);
    // READABLE missing, unknown flag, exec flags accepted.
    assert_eq!(g.map(5, 0, &[0x400], 0x2), (HvStatus::INVALID_PARAMETER, 0));
    assert_eq!(
        g.map(5, 0, &[0x400], 0x11),
        (HvStatus::INVALID_PARAMETER, 0)
    );
    assert_eq!(g.map(5, 0, &[0x400], 0xD), (ok(), 1));
    // Misaligned base; IOVA past the width; GPA page number too large.
    assert_eq!(
        g.map(5, 0x800, &[0x400], R),
        (HvStatus::INVALID_PARAMETER, 0)
    );
    assert_eq!(
        g.map(5, (1 << 32) - 2 * P, &[0x500, 0x501, 0x502], R),
        (HvStatus::INVALID_PARAMETER, 2)
    );
    assert_eq!(
        g.map(5, 0x2000_0000, &[1 << 52], R),
        (HvStatus::INVALID_PARAMETER, 0)
    );
    // Target VTL and padding.
    let mut h = map_hdr(S2, 5, 0x3000_0000, R);
    h.target_vtl = 1;
    assert_eq!(
        g.rep(
            HypercallCode::MAP_DEVICE_GPA_PAGES,
            h.as_bytes(),
            &[0x600],
            1,
            0
        ),
        (HvStatus::INVALID_PARAMETER, 0)
    );
    let mut h = map_hdr(S2, 5, 0x3000_0000, R);
    h.padding = [0, 1, 0];
    assert_eq!(
        g.rep(
            HypercallCode::MAP_DEVICE_GPA_PAGES,
            h.as_bytes(),
            &[0x600],
            1,
            0
        ),
        (HvStatus::INVALID_PARAMETER, 0)
    );
    // Domain kinds: default, null, S1 cannot be mapped.
    assert_eq!(g.create(S1, 6), ok());
    for (t, id) in [(S2, 0), (S2, 0xFFFF_FFFF), (S1, 6), (S2, 6), (S2, 77)] {
        let h = map_hdr(t, id, 0x3000_0000, R);
        assert_eq!(
            g.rep(
                HypercallCode::MAP_DEVICE_GPA_PAGES,
                h.as_bytes(),
                &[0x600],
                1,
                0
            ),
            (HvStatus::INVALID_PARAMETER, 0)
        );
    }
    // Page limit (20): 7 mapped, 13 more fit, the 14th is refused.
    assert_eq!(g.iommu.domains_info()[2].mapped_pages, 7);
    let gpns: Vec<u64> = (0x700..0x700 + 16).collect();
    assert_eq!(
        g.map(5, 0x4000_0000, &gpns, R),
        (HvStatus::INSUFFICIENT_MEMORY, 13)
    );
    assert_eq!(g.iommu.domains_info()[2].mapped_pages, 20);
    assert_eq!(
        g.rec.pages(5).expect("pages").len(),
        20,
        "backend and domain agree"
    );
}

#[test]
fn backend_failure_is_no_resources_and_nothing_leaks() {
    let g = Guest::new();
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.attach(S2, 5, dev(9)), ok());
    assert_eq!(g.attach(S2, 5, dev(1)), ok(), "software instance too");
    g.rec.fail_next_maps(1);
    // Two runs: [0x100, 0x101] and [0x300]; the first map fails.
    assert_eq!(
        g.map(5, 0, &[0x100, 0x101, 0x300], R),
        (HvStatus::NO_RESOURCES, 0)
    );
    assert_eq!(g.iommu.domains_info()[2].mapped_pages, 0);
    assert!(
        g.translate(dev(1), 0, 8, Access::Read).is_err(),
        "software instance undone"
    );
    assert!(g.iommu.stats().backend_errors >= 1);
    assert_eq!(g.map(5, 0, &[0x100, 0x101, 0x300], R), (ok(), 3));
}

#[test]
fn unmap_splits_runs_exactly() {
    let g = Guest::new();
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.attach(S2, 5, dev(9)), ok());
    assert_eq!(g.attach(S2, 5, dev(1)), ok());
    let gpns: Vec<u64> = (0x1000..0x1000 + 507).collect();
    assert_eq!(g.map(5, 0, &gpns, RW), (ok(), 507));
    g.rec.take_calls();
    // Unmap pages 100..110 of the run: one whole unmap and two re-maps.
    assert_eq!(g.unmap(5, 100 * P, 10), (ok(), 10));
    let calls = g.rec.take_calls();
    let run = |first: u64, pages: u64| MapRun {
        iova: first * P,
        gpa: (0x1000 + first) * P,
        len: pages * P,
        perms: Perms::RW,
    };
    assert_eq!(
        calls,
        [
            Call::Unmap(5, run(0, 507)),
            Call::Map(5, run(0, 100)),
            Call::Map(5, run(110, 397))
        ]
    );
    let pages = g.rec.pages(5).expect("pages");
    assert_eq!(pages.len(), 497);
    assert!(!pages.contains_key(&100) && !pages.contains_key(&109));
    assert!(pages.contains_key(&99) && pages.contains_key(&110));
    assert_eq!(
        g.translate(dev(1), 105 * P, 8, Access::Read)
            .map_err(|f| f.reason),
        Err(FaultReason::NotMapped)
    );
    assert_eq!(
        g.translate(dev(1), 110 * P, 8, Access::Write),
        Ok(vec![(0x1000 * P + 110 * P, 8)])
    );
    // Unmap across a hole: pages 95..105, 100.. are gone: fails at rep 5.
    assert_eq!(g.unmap(5, 95 * P, 10), (HvStatus::INVALID_PARAMETER, 5));
    assert!(!g.rec.pages(5).expect("pages").contains_key(&95));
    // Whole runs are unmapped with a single call each.
    g.rec.take_calls();
    assert_eq!(g.unmap(5, 110 * P, 397), (ok(), 397));
    assert_eq!(g.rec.take_calls(), [Call::Unmap(5, run(110, 397))]);
    // Unmap of nothing; misaligned; wrong kind.
    assert_eq!(g.unmap(5, 0x100_0000, 1), (HvStatus::INVALID_PARAMETER, 0));
    assert_eq!(g.unmap(5, 0x10, 1), (HvStatus::INVALID_PARAMETER, 0));
    assert_eq!(g.unmap(0, 0, 1), (HvStatus::INVALID_PARAMETER, 0));
    assert_eq!(g.unmap(5, !0xFFF_u64, 2), (HvStatus::INVALID_PARAMETER, 0));
}

#[test]
fn rep_calls_are_time_sliced_and_restart_where_they_stopped() {
    let g = Guest::with(IommuConfig {
        rep_budget: 64,
        ..Default::default()
    });
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.attach(S2, 5, dev(9)), ok());
    g.rec.take_calls();
    let gpns: Vec<u64> = (0x1000..0x1000 + 507).collect();
    let mut bytes = map_hdr(S2, 5, 0, RW).as_bytes().to_vec();
    for e in &gpns {
        bytes.extend_from_slice(&e.to_le_bytes());
    }
    g.write_input(&bytes);
    let rcx = Control::new()
        .with_code(HypercallCode::MAP_DEVICE_GPA_PAGES.0)
        .with_rep_count(507)
        .into_bits();
    // The first slice: continue at 64.
    assert_eq!(
        g.raw(rcx, INPUT, OUTPUT),
        HypercallOutcome::Continue {
            rcx: Control::from_bits(rcx).with_rep_start(64).into_bits()
        }
    );
    let ((status, reps), slices) = g.issue(
        Control::from_bits(rcx).with_rep_start(64).into_bits(),
        INPUT,
        OUTPUT,
    );
    assert_eq!((status, reps, slices), (ok(), 507, 7));
    assert_eq!(g.rec.pages(5).expect("pages").len(), 507);
    assert_eq!(g.iommu.stats().hypercalls.continuations, 7);
    // An error in a later slice reports the total reps done.
    assert_eq!(g.unmap(5, 0, 507), (ok(), 507));
    let mut bad = gpns.clone();
    bad[200] = RAM_TOP / P;
    assert_eq!(g.map(5, 0, &bad, R), (HvStatus::INVALID_PARAMETER, 200));
    // UNMAP with a rep count past the page list limit is fine (no elements).
    assert_eq!(g.unmap(5, 0, 200), (ok(), 200));
    let many: Vec<u64> = vec![entry(0, 0); 508];
    assert_eq!(g.flush_list(S2, 5, &many), (ok(), 508));
}

// ---------------------------------------------------------------- flushes

#[test]
fn flush_list_merges_into_exact_maximal_ranges() {
    let g = Guest::new();
    assert_eq!(g.create(S1, 6), ok());
    assert_eq!(g.attach(S1, 6, dev(9)), ok());
    g.rec.take_calls();
    // [0,4) + [4,8) + [8,16) + [6,7) -> [0,16); [32,33); [64,128)
    let entries = [
        entry(8, 3),
        entry(0, 2),
        entry(64, 6),
        entry(4, 2),
        entry(32, 0),
        entry(6, 0),
    ];
    assert_eq!(g.flush_list(S1, 6, &entries), (ok(), 6));
    let inval = |start: u64, pages: u64| {
        Call::Invalidate(
            6,
            Invalidation::Range {
                iova: start * P,
                len: pages * P,
            },
        )
    };
    assert_eq!(
        g.rec.take_calls(),
        [inval(0, 16), inval(32, 1), inval(64, 64)]
    );
    let f = g.iommu.domains_info()[2].flushes;
    assert_eq!((f.entries, f.ranges, f.pages, f.full), (6, 3, 81, 0));
    // A misaligned block at entry 2: entries 0-1 are flushed, error at 2.
    assert_eq!(
        g.flush_list(S1, 6, &[entry(0, 0), entry(2, 0), entry(3, 1), entry(8, 0)]),
        (HvStatus::INVALID_PARAMETER, 2)
    );
    assert_eq!(g.rec.take_calls(), [inval(0, 1), inval(2, 1)]);
    // Past the IOVA width (48, 2^36 pages): clamped to the aperture, not an
    // error; wholly past it flushes nothing.
    assert_eq!(g.flush_list(S1, 6, &[entry(1 << 36, 0)]), (ok(), 1));
    assert_eq!(g.rec.take_calls(), []);
    for e in [entry(0, 37), entry(0, 0xFFF), entry(0, 36), entry(0, 52)] {
        assert_eq!(g.flush_list(S1, 6, &[e]), (ok(), 1));
        assert_eq!(g.rec.take_calls(), [inval(0, 1 << 36)]);
    }
    assert_eq!(
        g.flush_list(S1, 6, &[entry(1 << 20, 0xFFF)]),
        (HvStatus::INVALID_PARAMETER, 0),
        "a huge block must still be aligned"
    );
    g.rec.take_calls();
    // Flags: IOMMU format accepted, others not; reserved must be zero.
    let h = flush_list_hdr(S1, 6, 1);
    assert_eq!(
        g.rep(
            HypercallCode::FLUSH_DEVICE_DOMAIN_LIST,
            h.as_bytes(),
            &[entry(0, 0)],
            1,
            0
        ),
        (ok(), 1)
    );
    let h = flush_list_hdr(S1, 6, 2);
    assert_eq!(
        g.rep(
            HypercallCode::FLUSH_DEVICE_DOMAIN_LIST,
            h.as_bytes(),
            &[entry(0, 0)],
            1,
            0
        ),
        (HvStatus::INVALID_PARAMETER, 0)
    );
    let mut h = flush_list_hdr(S1, 6, 0);
    h.reserved = U32::new(1);
    assert_eq!(
        g.rep(
            HypercallCode::FLUSH_DEVICE_DOMAIN_LIST,
            h.as_bytes(),
            &[entry(0, 0)],
            1,
            0
        ),
        (HvStatus::INVALID_PARAMETER, 0)
    );
    // Default and null domains accept flushes (nothing cached); unknown does not.
    assert_eq!(g.flush_list(S2, 0, &[entry(0, 0)]), (ok(), 1));
    assert_eq!(g.flush_list(S2, 0xFFFF_FFFF, &[entry(0, 0)]), (ok(), 1));
    assert_eq!(
        g.flush_list(S2, 99, &[entry(0, 0)]),
        (HvStatus::INVALID_PARAMETER, 0)
    );
}

#[test]
fn flush_device_domain_flushes_everything() {
    let g = Guest::new();
    assert_eq!(g.create(S1, 6), ok());
    assert_eq!(g.attach(S1, 6, dev(9)), ok());
    g.rec.take_calls();
    assert_eq!(g.flush(S1, 6), ok());
    assert_eq!(g.rec.take_calls(), [Call::Invalidate(6, Invalidation::All)]);
    assert_eq!(g.iommu.domains_info()[2].flushes.full, 1);
    assert_eq!(g.flush(S2, 0), ok());
    assert_eq!(g.flush(S2, 0xFFFF_FFFF), ok());
    assert_eq!(g.flush(S2, 6), HvStatus::INVALID_PARAMETER, "wrong type");
    assert_eq!(g.flush(S2, 99), HvStatus::INVALID_PARAMETER);
    let bad = InputFlushDeviceDomain {
        device_domain: hdr(S1, 6),
        flags: U32::new(1),
        reserved: U32::new(0),
    };
    assert_eq!(
        g.simple(HypercallCode::FLUSH_DEVICE_DOMAIN, bad.as_bytes()),
        HvStatus::INVALID_PARAMETER
    );
    let bad = InputFlushDeviceDomain {
        flags: U32::new(0),
        reserved: U32::new(1),
        ..bad
    };
    assert_eq!(
        g.simple(HypercallCode::FLUSH_DEVICE_DOMAIN, bad.as_bytes()),
        HvStatus::INVALID_PARAMETER
    );
    assert!(g.rec.take_calls().is_empty());
}

// ---------------------------------------------------------------- end to end

pub(crate) const F: u64 = 0b111; // present, writable, user

#[test]
fn s1_domain_end_to_end_with_stale_translation() {
    let g = Guest::new();
    assert_eq!(g.create(S1, 6), ok());
    assert_eq!(g.attach(S1, 6, dev(1)), ok());
    let (pml4, pdpt, pd, pt) = (0x10000, 0x11000, 0x12000, 0x13000);
    g.pte(pml4, 0, pdpt | F);
    g.pte(pdpt, 0, pd | F);
    g.pte(pd, 0, pt | F);
    g.pte(pt, 5, 0x80_0000 | F);
    assert_eq!(
        g.translate(dev(1), 0x5000, 8, Access::Read)
            .map_err(|f| f.reason),
        Err(FaultReason::Blocked),
        "an unconfigured S1 domain blocks"
    );
    let on = DeviceDomainSettingsFlags::new().with_translation_enabled(true);
    assert_eq!(g.configure(6, on, pml4), ok());
    assert_eq!(
        g.translate(dev(1), 0x5010, 8, Access::Write),
        Ok(vec![(0x80_0010, 8)])
    );
    g.pte(pt, 5, 0x90_0000 | F);
    assert_eq!(
        g.translate(dev(1), 0x5010, 8, Access::Write),
        Ok(vec![(0x80_0010, 8)]),
        "stale"
    );
    assert_eq!(g.flush_list(S1, 6, &[entry(5, 0)]), (ok(), 1));
    assert_eq!(
        g.translate(dev(1), 0x5010, 8, Access::Write),
        Ok(vec![(0x90_0010, 8)]),
        "fresh"
    );
    g.pte(pt, 5, 0);
    assert!(
        g.translate(dev(1), 0x5010, 8, Access::Read).is_ok(),
        "stale"
    );
    assert_eq!(g.flush(S1, 6), ok());
    let fault = g
        .translate(dev(1), 0x5010, 8, Access::Read)
        .expect_err("not present");
    assert_eq!(
        (fault.reason, fault.iova, fault.domain),
        (FaultReason::S1NotPresent { level: 1 }, 0x5010, Some(6))
    );
    let blocked = on.with_blocked(true);
    assert_eq!(g.configure(6, blocked, pml4), ok());
    assert_eq!(
        g.translate(dev(1), 0x5010, 8, Access::Read)
            .map_err(|f| f.reason),
        Err(FaultReason::Blocked)
    );
    let stats = g.iommu.stats();
    assert_eq!(stats.faults.total, 3);
    assert_eq!(
        stats.faults.last().map(|f| f.reason),
        Some(FaultReason::Blocked)
    );
    assert_eq!(stats.domains[2].faults, 3);
    assert_eq!(stats.domains[2].iotlb.map(|i| i.hits), Some(2));
}

#[test]
fn s2_domain_end_to_end_and_unregister() {
    let g = Guest::new();
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.attach(S2, 5, dev(1)), ok());
    assert_eq!(g.attach(S2, 5, dev(2)), ok());
    assert_eq!(g.attach(S2, 5, dev(9)), ok());
    assert_eq!(
        g.map(5, 0x10_0000, &[0x400, 0x401, HIGH_RAM / P], R),
        (ok(), 3)
    );
    assert_eq!(
        g.translate(dev(2), 0x10_0ff0, 0x1020, Access::Read),
        Ok(vec![(0x40_0ff0, 0x1010), (HIGH_RAM, 0x10)])
    );
    let f = g
        .translate(dev(2), 0x10_0000, 1, Access::Write)
        .expect_err("read-only");
    assert_eq!(f.reason, FaultReason::WriteDenied);
    assert_eq!(g.unmap(5, 0x10_1000, 1), (ok(), 1));
    let f = g
        .translate(dev(2), 0x10_0000, 0x3000, Access::Read)
        .expect_err("unmapped");
    assert_eq!((f.reason, f.iova), (FaultReason::NotMapped, 0x10_1000));
    // A passthrough device's DMA is not the software backend's job.
    let f = g
        .translate(dev(9), 0x10_0000, 8, Access::Read)
        .expect_err("iommufd device");
    assert_eq!(f.reason, FaultReason::NotSoftwareDevice);
    let f = g
        .translate(dev(30), 0x10_0000, 8, Access::Read)
        .expect_err("unknown device");
    assert_eq!(f.reason, FaultReason::UnknownDevice);
    // Unregistering blocks the device first (never the default, IOVA = GPA
    // domain), then drops the backend's instance with its last device, then
    // removes the device.
    g.rec.take_calls();
    g.iommu.unregister_device(dev(9)).expect("unregister");
    assert_eq!(
        g.rec.take_calls(),
        [
            Call::Attach(dev(9), AttachTarget::Blocked),
            Call::DestroyDomain(5),
            Call::RemoveDevice(dev(9))
        ]
    );
    g.iommu.unregister_device(dev(1)).expect("unregister");
    assert_eq!(
        g.delete(S2, 5),
        HvStatus::OPERATION_DENIED,
        "dev(2) is still attached"
    );
    g.iommu.unregister_device(dev(2)).expect("unregister");
    assert_eq!(g.delete(S2, 5), ok());
    // A device attached later gets the domain's runs replayed.
    assert_eq!(g.create(S2, 8), ok());
    assert_eq!(g.map(8, 0, &[0x10, 0x11, 0x20], R), (ok(), 3));
    g.iommu.register_device(dev(9), g.rec_id).expect("register");
    g.rec.take_calls();
    assert_eq!(g.attach(S2, 8, dev(9)), ok());
    let calls = g.rec.take_calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(calls[0], Call::CreateDomain(8, DomainKind::S2));
    assert_eq!(calls[3], Call::Attach(dev(9), AttachTarget::Domain(8)));
    assert_eq!(g.rec.pages(8).expect("pages").len(), 3);
}

#[test]
fn concurrent_hypercalls_and_dma() {
    let g = Arc::new(Guest::new());
    for id in 1..=4 {
        assert_eq!(g.create(S2, id), ok());
    }
    assert_eq!(g.attach(S2, 1, dev(1)), ok());
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let g = Arc::clone(&g);
            std::thread::spawn(move || {
                // Each thread uses its own input page.
                let input = 0x10_0000 + u64::from(t) * P;
                let mut bytes = map_hdr(S2, 1, u64::from(t) << 30, R).as_bytes().to_vec();
                bytes.extend_from_slice(&0x300u64.to_le_bytes());
                g.mem.write_slice(&bytes, GuestAddress(input)).expect("w");
                let unmap = InputUnmapDeviceGpaPages {
                    device_domain: hdr(S2, 1),
                    target_device_va_base: U64::new(u64::from(t) << 30),
                };
                let unmap_input = input + 0x800;
                g.mem
                    .write_slice(unmap.as_bytes(), GuestAddress(unmap_input))
                    .expect("w");
                let map_rcx = Control::new()
                    .with_code(HypercallCode::MAP_DEVICE_GPA_PAGES.0)
                    .with_rep_count(1)
                    .into_bits();
                let unmap_rcx = Control::new()
                    .with_code(HypercallCode::UNMAP_DEVICE_GPA_PAGES.0)
                    .with_rep_count(1)
                    .into_bits();
                for _ in 0..500 {
                    assert_eq!(g.issue(map_rcx, input, 0).0, (ok(), 1));
                    let s = g.translate(dev(1), u64::from(t) << 30, 8, Access::Read);
                    assert_eq!(s, Ok(vec![(0x30_0000, 8)]));
                    assert_eq!(g.issue(unmap_rcx, unmap_input, 0).0, (ok(), 1));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(g.iommu.domains_info()[2].mapped_pages, 0);
}

#[test]
fn attach_replay_failure_is_no_resources_and_leaves_nothing_behind() {
    let g = Guest::new();
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.map(5, 0, &[0x10, 0x30], R), (ok(), 2));
    g.rec.fail_next_maps(1);
    assert_eq!(g.attach(S2, 5, dev(9)), HvStatus::NO_RESOURCES);
    assert_eq!(g.iommu.device_attachment(dev(9)), Some(Attachment::Default));
    assert!(
        g.rec.pages(5).is_none(),
        "the half-built instance is destroyed"
    );
    assert_eq!(g.rec.attachment(dev(9)), Some(AttachTarget::Identity));
    assert_eq!(g.iommu.domains_info()[2].backends, Vec::<&str>::new());
    assert_eq!(g.attach(S2, 5, dev(9)), ok());
    assert_eq!(g.rec.pages(5).expect("replayed").len(), 2);
}

// ---------------------------------------------------------------- security review (issue 11)

/// Item 1: S2 domains mapping alternating GPNs (no two reps merge) cannot
/// grow the VMM's memory past the VM-wide run limit, which is scaled to the
/// guest's RAM; the refused rep is the reps-completed count.
#[test]
fn hostile_scattered_maps_stay_under_the_vm_wide_run_limit() {
    let g = Guest::new(); // the default config; 68 MiB of guest RAM
    let limit = g.iommu.config().max_map_runs(68 * MB);
    assert_eq!(limit, crate::DEFAULT_MAP_RUNS_FLOOR);
    let scattered: Vec<u64> = (0..507).map(|i| 0x1000 + 2 * i).collect();
    let mut refused = None;
    'attack: for id in 1..=4u32 {
        assert_eq!(g.create(S2, id), ok());
        for call in 0..200u64 {
            let before = g.iommu.stats().map_runs;
            let res = g.map(id, call * 507 * P, &scattered, R);
            if res != (ok(), 507) {
                refused = Some((id, before, res));
                break 'attack;
            }
        }
    }
    let (id, before, res) = refused.expect("the limit refused a map");
    assert_eq!(id, 1, "the first domain already reaches it");
    let failing_rep = u16::try_from(limit - before).expect("within one call");
    assert_eq!(res, (HvStatus::INSUFFICIENT_MEMORY, failing_rep));
    assert_eq!(g.iommu.stats().map_runs, limit);
    // Every other domain of the attack is refused at its first rep.
    for id in 2..=256u32 {
        assert_eq!(g.create(S2, id), ok());
        assert_eq!(
            g.map(id, 0, &scattered, R),
            (HvStatus::INSUFFICIENT_MEMORY, 0)
        );
    }
    let stats = g.iommu.stats();
    let runs: u64 = stats.domains.iter().map(|d| d.runs).sum();
    assert_eq!((stats.map_runs, runs), (limit, limit));
    // Cutting a hole in a run needs a run too: unmap one run to get a spare,
    // map three contiguous pages with it, then try to punch the middle out.
    assert_eq!(g.unmap(1, 0, 1), (ok(), 1));
    assert_eq!(g.map(2, 0, &[0x3000, 0x3001, 0x3002], R), (ok(), 3));
    assert_eq!(
        g.unmap(2, P, 1),
        (HvStatus::INSUFFICIENT_MEMORY, 0),
        "no run left for the hole"
    );
    assert_eq!(g.iommu.domains_info()[3].mapped_pages, 3, "nothing changed");
    assert_eq!(g.unmap(2, 0, 3), (ok(), 3), "whole runs can always go");
    assert_eq!(g.iommu.stats().map_runs, limit - 1);
    // Deleting a domain gives its runs back.
    assert_eq!(g.delete(S2, 1), ok());
    assert_eq!(g.iommu.stats().map_runs, 0);
    assert_eq!(g.map(3, 0, &scattered, R), (ok(), 507));
}

/// Item 2: a device being hot-removed is blocked before anything else
/// happens to it, from every kind of domain, and never attached to the
/// default (IOVA = GPA) domain on its way out.
#[test]
fn hot_remove_blocks_first_and_never_opens_the_default_domain() {
    let g = Guest::new();
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.create(S1, 6), ok());
    assert_eq!(g.map(5, 0, &[0x100], RW), (ok(), 1));
    let dev2 = DeviceId::pci(0, 0, 10, 0);
    g.iommu.register_device(dev2, g.rec_id).expect("register");
    let dev3 = DeviceId::pci(0, 0, 11, 0);
    g.iommu.register_device(dev3, g.rec_id).expect("register");
    assert_eq!(g.attach(S2, 5, dev(9)), ok());
    assert_eq!(g.attach(S1, 6, dev2), ok());
    assert_eq!(g.attach(S2, 0xFFFF_FFFF, dev3), ok());
    for device in [dev(9), dev2, dev3] {
        g.rec.take_calls();
        g.iommu.unregister_device(device).expect("unregister");
        let calls = g.rec.take_calls();
        assert_eq!(
            calls.first(),
            Some(&Call::Attach(device, AttachTarget::Blocked)),
            "blocked first: {calls:?}"
        );
        assert_eq!(calls.last(), Some(&Call::RemoveDevice(device)));
        assert!(
            !calls.contains(&Call::Attach(device, AttachTarget::Identity)),
            "never through the default domain: {calls:?}"
        );
        assert_eq!(g.rec.attachment(device), None);
    }
    // A software device: after removal its DMA is refused, never IOVA = GPA.
    assert_eq!(g.attach(S2, 5, dev(1)), ok());
    g.iommu.unregister_device(dev(1)).expect("unregister");
    let f = g
        .translate(dev(1), 0x100 * P, 8, Access::Read)
        .expect_err("gone");
    assert_eq!(f.reason, FaultReason::UnknownDevice);
    // The guest's domains are the guest's: they stay, and can be deleted.
    assert_eq!(g.delete(S2, 5), ok());
    assert_eq!(g.delete(S1, 6), ok());
}

/// Item 3: fault counts per domain id go with the domain (a reused id
/// starts from zero) and stay bounded however many ids the guest cycles
/// through.
#[test]
fn fault_counts_per_domain_are_pruned_and_bounded() {
    let g = Guest::with(IommuConfig {
        max_domains: 4,
        ..Default::default()
    });
    let fault_in = |id: u32| {
        assert_eq!(g.create(S2, id), ok());
        assert_eq!(g.attach(S2, id, dev(1)), ok());
        assert!(g.translate(dev(1), 0x5000, 8, Access::Read).is_err());
        assert_eq!(g.detach(dev(1)), ok());
        assert_eq!(g.delete(S2, id), ok());
    };
    fault_in(7);
    assert_eq!(g.create(S2, 7), ok());
    let info = g.iommu.domains_info();
    assert_eq!(
        (info[2].id, info[2].faults),
        (7, 0),
        "a reused id starts at 0"
    );
    assert_eq!(g.delete(S2, 7), ok());
    // The attack: cycle through ids, one fault each.
    for id in 1..=2000 {
        fault_in(id);
    }
    let stats = g.iommu.stats();
    assert_eq!(stats.faults.total, 2001, "every fault is still counted");
    let tracked = g.iommu.lock_faults().by_domain.len();
    assert!(tracked <= 4 + 2, "{tracked} domain counters for 4 domains");
}

/// Item 7: the IOVA width is capped at what x86 page tables address, and
/// every range end is computed without overflow: the top of the widest
/// aperture and Linux's empty gather (page 0, shift 52) flush real ranges.
#[test]
fn iova_width_is_capped_and_range_ends_do_not_overflow() {
    for width in [58u8, 63, 64] {
        let err = Iommu::new(IommuConfig {
            max_iova_width: width,
            ..Default::default()
        })
        .expect_err("wider than 5-level tables address");
        assert!(err.to_string().contains("57 with 5-level"), "{err}");
    }
    assert!(Iommu::new(IommuConfig {
        max_iova_width: 49,
        s1_5level: false,
        ..Default::default()
    })
    .is_err());
    let g = Guest::with(IommuConfig {
        max_iova_width: 57,
        ..Default::default()
    });
    assert_eq!(g.create(S1, 6), ok());
    assert_eq!(g.attach(S1, 6, dev(9)), ok());
    g.rec.take_calls();
    let top_page = (1u64 << 45) - 1;
    assert_eq!(
        g.flush_list(S1, 6, &[entry(0, 52), entry(top_page, 0)]),
        (ok(), 2)
    );
    for call in g.rec.take_calls() {
        if let Call::Invalidate(6, Invalidation::Range { iova, len }) = call {
            assert_eq!((iova, len), (0, 1 << 57), "the whole aperture, not empty");
        } else {
            panic!("{call:?}");
        }
    }
    // An S2 run at the top of the aperture maps, translates and unmaps.
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.attach(S2, 5, dev(1)), ok());
    assert_eq!(g.map(5, top_page * P, &[0x100], RW), (ok(), 1));
    assert_eq!(
        g.map(5, (top_page + 1) * P, &[0x101], RW),
        (HvStatus::INVALID_PARAMETER, 0)
    );
    assert_eq!(
        g.translate(dev(1), top_page * P + 8, 8, Access::Read),
        Ok(vec![(0x100 * P + 8, 8)])
    );
    assert_eq!(g.unmap(5, top_page * P, 1), (ok(), 1));
}

// ---------------------------------------------------------------- Linux's driver (issue 12)

/// ATTACH is a replace (Linux's v2 driver never DETACHes): a device in
/// another domain moves in one backend call, never through the default
/// domain; the old domain's instance goes with its last device, and the
/// domain can then be deleted. Attaching to the domain a device is in
/// changes nothing.
#[test]
fn attach_replaces_and_the_old_domain_can_be_deleted() {
    let g = Guest::new();
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.create(S1, 6), ok());
    assert_eq!(g.map(5, 0, &[0x100], RW), (ok(), 1));
    assert_eq!(g.attach(S2, 5, dev(9)), ok());
    g.rec.take_calls();
    assert_eq!(g.attach(S1, 6, dev(9)), ok());
    assert_eq!(
        g.rec.take_calls(),
        [
            Call::CreateDomain(6, DomainKind::S1),
            Call::SetS1(6, crate::S1Config::UNCONFIGURED),
            Call::Attach(dev(9), AttachTarget::Domain(6)),
            Call::DestroyDomain(5),
        ]
    );
    assert_eq!(
        g.iommu.device_attachment(dev(9)),
        Some(Attachment::Domain(6))
    );
    assert_eq!(g.attach(S1, 6, dev(9)), HvStatus::DEVICE_ALREADY_IN_DOMAIN);
    assert!(g.rec.take_calls().is_empty(), "nothing changes");
    let info = g.iommu.domains_info();
    assert_eq!((info[2].id, info[2].devices.len()), (5, 0));
    assert_eq!((info[3].id, info[3].devices.clone()), (6, vec![dev(9)]));
    assert_eq!(g.delete(S2, 5), ok(), "its devices moved away");
    assert_eq!(g.delete(S1, 6), HvStatus::OPERATION_DENIED);
    // To the null domain and back: replaces too.
    assert_eq!(g.attach(S2, 0xFFFF_FFFF, dev(9)), ok());
    assert_eq!(
        g.rec.take_calls(),
        [
            Call::Attach(dev(9), AttachTarget::Blocked),
            Call::DestroyDomain(6)
        ]
    );
    assert_eq!(g.delete(S1, 6), ok());
}

/// CONFIGURE of an S1 domain the way Linux's driver does it: identity
/// (translation_enabled = 0, blocked = 0: IOVA = GPA, root ignored), blocking
/// (translation_enabled = 1, blocked = 1, root 0: everything blocked) and
/// paging (translation_enabled = 1, blocked = 0: a page-aligned root in RAM).
#[test]
fn s1_configure_identity_blocking_and_paging() {
    let g = Guest::with(IommuConfig {
        s1_5level: false,
        ..Default::default()
    });
    for id in [1, 2, 3] {
        assert_eq!(g.create(S1, id), ok());
    }
    let flags = |t: bool, b: bool| {
        DeviceDomainSettingsFlags::new()
            .with_translation_enabled(t)
            .with_blocked(b)
    };
    assert_eq!(g.configure(1, flags(false, false), 0), ok());
    assert_eq!(g.configure(2, flags(true, true), 0), ok(), "root 0 ignored");
    assert_eq!(
        g.configure(2, flags(false, true), RAM_TOP + 0x123),
        ok(),
        "blocked: any root is ignored"
    );
    assert_eq!(
        g.configure(1, flags(false, false).with_first_stage_paging_mode(true), 0),
        ok(),
        "the paging mode only matters with a table"
    );
    assert_eq!(g.configure(3, flags(true, false), 0), ok(), "GPA 0 is RAM");
    for bad in [RAM_TOP, 0x10800, !0xFFF] {
        assert_eq!(
            g.configure(3, flags(true, false), bad),
            HvStatus::INVALID_PARAMETER,
            "{bad:#x}"
        );
    }
    // The software model: identity is IOVA = GPA in guest RAM only.
    assert_eq!(g.attach(S1, 1, dev(1)), ok());
    assert_eq!(
        g.translate(dev(1), 0x12345, 8, Access::Write),
        Ok(vec![(0x12345, 8)])
    );
    assert_eq!(
        g.translate(dev(1), RAM_TOP, 8, Access::Read)
            .map_err(|f| f.reason),
        Err(FaultReason::GpaOutsideRam)
    );
    assert_eq!(g.attach(S1, 2, dev(1)), ok());
    assert_eq!(
        g.translate(dev(1), 0x12345, 8, Access::Read)
            .map_err(|f| f.reason),
        Err(FaultReason::Blocked)
    );
    // A backend sees the settings with the ignored root dropped.
    assert_eq!(g.attach(S1, 1, dev(9)), ok());
    let set: Vec<crate::S1Config> = g
        .rec
        .take_calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::SetS1(1, cfg) => Some(cfg),
            _ => None,
        })
        .collect();
    assert_eq!(set.len(), 1);
    assert_eq!((set[0].mode(), set[0].root), (crate::S1Mode::Identity, 0));
}

/// A device offered on a vPCI bus has a PCI id and a LOGICAL id (what
/// Linux's driver sends); GET_LOGICAL_DEVICE_PROPERTY, ATTACH and DETACH
/// accept either for the same device.
#[test]
fn logical_and_pci_ids_name_the_same_device() {
    let g = Guest::new();
    let guid = [
        0, 1, 2, 3, 0x44, 0x55, 0x6F, 0x77, 8, 9, 10, 11, 12, 13, 14, 15,
    ];
    let logical = DeviceId::logical_vpci(&guid, 0);
    assert_eq!(logical.into_bits(), 0x5544_7768);
    g.iommu
        .register_device_alias(logical, dev(9))
        .expect("alias");
    let property = |device: DeviceId| {
        let input = InputGetLogicalDeviceProperty {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            logical_device_id: U64::new(device.into_bits()),
            code: U32::new(device_property::PVIOMMU),
            reserved: U32::new(0),
        };
        g.simple(HypercallCode::GET_LOGICAL_DEVICE_PROPERTY, input.as_bytes())
    };
    assert_eq!(property(logical), ok());
    assert_eq!(property(dev(9)), ok());
    assert_eq!(
        property(DeviceId::logical_vpci(&guid, 1)),
        HvStatus::INVALID_DEVICE_ID,
        "another function of the bus"
    );
    assert_eq!(
        property(DeviceId::from_bits(logical.into_bits() | 1 << 40)),
        HvStatus::INVALID_DEVICE_ID,
        "ids are compared whole"
    );
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.attach(S2, 5, logical), ok());
    assert_eq!(
        g.iommu.device_attachment(dev(9)),
        Some(Attachment::Domain(5))
    );
    assert_eq!(
        g.attach(S2, 5, dev(9)),
        HvStatus::DEVICE_ALREADY_IN_DOMAIN,
        "the same device"
    );
    assert_eq!(g.detach(dev(9)), ok());
    assert_eq!(g.attach(S2, 5, dev(9)), ok());
    assert_eq!(g.detach(logical), ok());
    assert_eq!(g.iommu.device_attachment(dev(9)), Some(Attachment::Default));
    let info = g.iommu.stats().devices;
    let d9 = info.iter().find(|d| d.id == dev(9)).expect("dev 9");
    assert_eq!(d9.logical, Some(logical));
    // Registration rules.
    assert!(matches!(
        g.iommu.register_device_alias(dev(1), dev(2)),
        Err(crate::IommuError::NotLogicalDevice(_))
    ));
    assert!(matches!(
        g.iommu.register_device_alias(logical, dev(1)),
        Err(crate::IommuError::DeviceExists(_))
    ));
    assert!(matches!(
        g.iommu.register_device_alias(DeviceId::logical(8), dev(9)),
        Err(crate::IommuError::AliasExists { .. })
    ));
    assert!(matches!(
        g.iommu.register_device_alias(DeviceId::logical(8), dev(30)),
        Err(crate::IommuError::UnknownDevice(_))
    ));
    // The alias goes with the device.
    g.iommu.unregister_device(dev(9)).expect("unregister");
    assert_eq!(property(logical), HvStatus::INVALID_DEVICE_ID);
    g.iommu.register_device(dev(9), g.rec_id).expect("register");
    g.iommu
        .register_device_alias(logical, dev(9))
        .expect("alias again");
}

pub(crate) fn vp_registers_input(vp_index: u32, names: &[u32]) -> Vec<u8> {
    let mut bytes = InputGetVpRegisters {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        vp_index: U32::new(vp_index),
        input_vtl: 0,
        padding: [0; 3],
    }
    .as_bytes()
    .to_vec();
    for n in names {
        bytes.extend_from_slice(&n.to_le_bytes());
    }
    bytes
}

/// GET_VP_REGISTERS: HV_REGISTER_VSM_VP_STATUS reads 0 (Linux reads it at
/// boot and BUG()s on an error); other registers are INVALID_PARAMETER at
/// their rep, with the output of the reps before it written.
#[test]
fn get_vp_registers_answers_vsm_vp_status() {
    let g = Guest::with(IommuConfig {
        rep_budget: 5,
        ..Default::default()
    });
    let call = |input: &[u8], count: u16, r8: u64| {
        g.write_input(input);
        g.mem
            .write_slice(&[0xA5; 4096], GuestAddress(OUTPUT))
            .expect("pattern");
        let rcx = Control::new()
            .with_code(HypercallCode::GET_VP_REGISTERS.0)
            .with_rep_count(count)
            .into_bits();
        g.issue(rcx, INPUT, r8)
    };
    let output = |n: usize| {
        let mut out = vec![0u8; n];
        g.mem
            .read_slice(&mut out, GuestAddress(OUTPUT))
            .expect("read");
        out
    };
    let vsm = register::VSM_VP_STATUS;
    // What Linux's get_vtl() sends: one rep, HV_VP_INDEX_SELF.
    let (res, slices) = call(&vp_registers_input(HV_VP_INDEX_SELF, &[vsm]), 1, OUTPUT);
    assert_eq!((res, slices), ((ok(), 1), 1));
    assert_eq!(output(17), [&[0u8; 16][..], &[0xA5]].concat());
    // Many reps, time-sliced (budget 5), and the caller's own index.
    let names = vec![vsm; 40];
    let (res, slices) = call(&vp_registers_input(0, &names), 40, OUTPUT);
    assert_eq!((res, slices), ((ok(), 40), 8));
    assert_eq!(output(641), [&[0u8; 640][..], &[0xA5]].concat());
    // An unknown register at rep 21: the 21 values before it are written.
    let mut names = vec![vsm; 30];
    names[21] = 0x0009_0001;
    let (res, _) = call(&vp_registers_input(HV_VP_INDEX_SELF, &names), 30, OUTPUT);
    assert_eq!(res, (HvStatus::INVALID_PARAMETER, 21));
    assert_eq!(output(21 * 16 + 1), [&[0u8; 21 * 16][..], &[0xA5]].concat());
    // The header.
    let bad_input = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = vp_registers_input(HV_VP_INDEX_SELF, &[vsm]);
        f(&mut b);
        call(&b, 1, OUTPUT).0
    };
    assert_eq!(
        bad_input(&|b| b[0] = 0),
        (HvStatus::INVALID_PARTITION_ID, 0)
    );
    assert_eq!(
        bad_input(&|b| b[8..12].copy_from_slice(&7u32.to_le_bytes())),
        (HvStatus::INVALID_PARAMETER, 0),
        "another VP"
    );
    assert_eq!(bad_input(&|b| b[12] = 0x10), (ok(), 1), "VTL 0 named");
    assert_eq!(bad_input(&|b| b[12] = 1), (HvStatus::INVALID_PARAMETER, 0));
    for i in 13..16 {
        assert_eq!(bad_input(&|b| b[i] = 1), (HvStatus::INVALID_PARAMETER, 0));
    }
    // The output block: 16 bytes a rep, within a page, in RAM.
    let names = vec![vsm; 257];
    assert_eq!(
        call(&vp_registers_input(HV_VP_INDEX_SELF, &names), 257, OUTPUT).0,
        (HvStatus::INVALID_ALIGNMENT, 0)
    );
    assert_eq!(
        call(
            &vp_registers_input(HV_VP_INDEX_SELF, &[vsm, vsm]),
            2,
            OUTPUT + 0xFF0
        )
        .0,
        (HvStatus::INVALID_ALIGNMENT, 0)
    );
    assert_eq!(
        call(&vp_registers_input(HV_VP_INDEX_SELF, &[vsm]), 1, RAM_TOP).0,
        (HvStatus::INVALID_PARAMETER, 0)
    );
    // Not a fast call (it has output); not a simple call.
    let fast = Control::new()
        .with_code(HypercallCode::GET_VP_REGISTERS.0)
        .with_fast(true)
        .with_rep_count(1)
        .into_bits();
    assert_eq!(
        g.issue(fast, HV_PARTITION_ID_SELF, 0).0,
        (HvStatus::INVALID_HYPERCALL_INPUT, 0)
    );
    let simple = Control::new()
        .with_code(HypercallCode::GET_VP_REGISTERS.0)
        .into_bits();
    assert_eq!(
        g.issue(simple, INPUT, OUTPUT).0,
        (HvStatus::INVALID_HYPERCALL_INPUT, 0)
    );
}

/// Completed calls are counted per code and final status, so the VMM can
/// tell which calls of a guest got which error (or that none did).
#[test]
fn statuses_are_counted_per_call_code() {
    let g = Guest::with(IommuConfig {
        rep_budget: 2,
        ..Default::default()
    });
    assert!(g.iommu.stats().hypercalls.by_status.is_empty());
    assert_eq!(g.create(S2, 5), ok());
    assert_eq!(g.create(S2, 5), HvStatus::INVALID_PARAMETER);
    assert_eq!(g.create(S2, 0), HvStatus::INVALID_PARAMETER);
    assert_eq!(g.attach(S2, 5, dev(20)), HvStatus::INVALID_DEVICE_ID);
    // A time-sliced call (3 slices) counts once, with its final status.
    assert_eq!(
        g.map(5, 0, &[0x100, 0x102, 0x104, 0x106, 0x108], R),
        (ok(), 5)
    );
    let unknown = Control::new().with_code(0x0001).into_bits();
    assert_eq!(
        g.issue(unknown, INPUT, OUTPUT).0,
        (HvStatus::INVALID_HYPERCALL_CODE, 0)
    );
    let h = g.iommu.stats().hypercalls;
    let create = Some(HypercallCode::CREATE_DEVICE_DOMAIN);
    assert_eq!(h.count(create, HvStatus::SUCCESS), 1);
    assert_eq!(h.count(create, HvStatus::INVALID_PARAMETER), 2);
    assert_eq!(h.errors_of(create), 2);
    let attach = Some(HypercallCode::ATTACH_DEVICE_DOMAIN);
    assert_eq!(h.count(attach, HvStatus::INVALID_DEVICE_ID), 1);
    let map = Some(HypercallCode::MAP_DEVICE_GPA_PAGES);
    assert_eq!((h.count(map, HvStatus::SUCCESS), h.errors_of(map)), (1, 0));
    assert_eq!(h.count(None, HvStatus::INVALID_HYPERCALL_CODE), 1);
    assert_eq!(h.error_counts().map(|s| s.count).sum::<u64>(), h.errors);
    assert_eq!(
        h.by_status.iter().map(|s| s.count).sum::<u64>(),
        6,
        "completed calls, not slices"
    );
    assert_eq!(h.total, 8, "slices: MAP took 3");
}

/// The hypercall table, derived from the ABI types, has the sizes the
/// contract (section 5) gives, for every call in HypercallCode::ALL.
#[test]
fn the_table_is_the_contract() {
    // (code, rep, header, rep element, output, rep output), in bytes.
    let contract = [
        (HypercallCode::CREATE_DEVICE_DOMAIN, false, 28, 0, 0, 0),
        (HypercallCode::ATTACH_DEVICE_DOMAIN, false, 32, 0, 0, 0),
        (HypercallCode::MAP_DEVICE_GPA_PAGES, true, 40, 8, 0, 0),
        (HypercallCode::UNMAP_DEVICE_GPA_PAGES, true, 32, 0, 0, 0),
        (HypercallCode::DETACH_DEVICE_DOMAIN, false, 16, 0, 0, 0),
        (HypercallCode::DELETE_DEVICE_DOMAIN, false, 24, 0, 0, 0),
        (HypercallCode::CONFIGURE_DEVICE_DOMAIN, false, 40, 0, 0, 0),
        (HypercallCode::FLUSH_DEVICE_DOMAIN, false, 32, 0, 0, 0),
        (HypercallCode::FLUSH_DEVICE_DOMAIN_LIST, true, 32, 8, 0, 0),
        (HypercallCode::GET_IOMMU_CAPABILITIES, false, 16, 0, 24, 0),
        (
            HypercallCode::GET_LOGICAL_DEVICE_PROPERTY,
            false,
            24,
            0,
            16,
            0,
        ),
        (HypercallCode::GET_VP_REGISTERS, true, 16, 4, 0, 16),
        // TLFS, the partition's: not in the contract's section 5.
        (
            HypercallCode::SEND_SYNTHETIC_CLUSTER_IPI,
            false,
            16,
            0,
            0,
            0,
        ),
        (HypercallCode::POST_MESSAGE, false, 256, 0, 0, 0),
        (HypercallCode::SIGNAL_EVENT, false, 8, 0, 0, 0),
        // 56 fixed bytes, then up to 65 words of VP set.
        (HypercallCode::RETARGET_INTERRUPT, false, 56, 0, 0, 0),
    ];
    assert_eq!(contract.len(), HypercallCode::ALL.len());
    // The calls that may take translations away: each returns only once
    // in-flight emulated DMA has finished.
    let dma_barrier = [
        HypercallCode::ATTACH_DEVICE_DOMAIN,
        HypercallCode::UNMAP_DEVICE_GPA_PAGES,
        HypercallCode::DETACH_DEVICE_DOMAIN,
        HypercallCode::DELETE_DEVICE_DOMAIN,
        HypercallCode::CONFIGURE_DEVICE_DOMAIN,
        HypercallCode::FLUSH_DEVICE_DOMAIN,
        HypercallCode::FLUSH_DEVICE_DOMAIN_LIST,
    ];
    for (code, rep, header, elem, output, out_elem) in contract {
        assert_eq!(
            shape(code),
            Some(Shape {
                code,
                rep,
                header,
                var_header: if code == HypercallCode::RETARGET_INTERRUPT {
                    65 * 8
                } else {
                    0
                },
                elem,
                output,
                out_elem,
                dma_barrier: dma_barrier.contains(&code),
            }),
            "{code:?}"
        );
    }
    assert_eq!(CALLS.map(|s| s.code), HypercallCode::ALL);
    assert_eq!(shape(HypercallCode(0x0001)), None);
    assert_eq!(
        crate::domains::CAPABILITIES_SIZE as usize,
        size_of::<OutputGetIommuCapabilities>()
    );
}

/// A device the VMM attached directly (`"iommu": "direct"`) stays at
/// IOVA = GPA whatever the guest asks: the guest cannot name it.
#[test]
fn a_direct_device_is_not_the_guests_to_move() {
    let g = Guest::new();
    g.iommu
        .register_direct_device(dev(20), BackendId::SOFTWARE)
        .expect("register");
    let property = InputGetLogicalDeviceProperty {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        logical_device_id: U64::new(dev(20).into_bits()),
        code: U32::new(device_property::PVIOMMU),
        reserved: U32::new(0),
    };
    assert_eq!(
        g.simple(
            HypercallCode::GET_LOGICAL_DEVICE_PROPERTY,
            property.as_bytes()
        ),
        HvStatus::INVALID_DEVICE_ID
    );
    assert_eq!(g.create(S2, 7), ok());
    assert_eq!(g.attach(S2, 7, dev(20)), HvStatus::INVALID_DEVICE_ID);
    assert_eq!(g.detach(dev(20)), HvStatus::INVALID_DEVICE_ID);
    assert_eq!(
        g.iommu.device_attachment(dev(20)),
        Some(Attachment::Default)
    );
    // Its DMA goes to guest RAM at IOVA = GPA.
    assert_eq!(
        g.translate(dev(20), 0x3000, 16, Access::Write),
        Ok(vec![(0x3000, 16)])
    );
    g.iommu.unregister_device(dev(20)).expect("unregister");
}

/// An emulated device's DMA in flight on one vCPU and an UNMAP of its page
/// on another: the UNMAP returns only after the DMA's last write, so a
/// guest that reuses the page once UNMAP returned never sees the device
/// write into it.
#[test]
fn unmap_returns_only_after_the_dma_in_flight_ends() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Barrier;
    let g = Guest::new();
    assert_eq!(g.create(S2, 6), ok());
    assert_eq!(g.map(6, 0x40_0000, &[0x30], 3), (HvStatus::SUCCESS, 1));
    assert_eq!(g.attach(S2, 6, dev(2)), ok());
    let written = AtomicBool::new(false);
    let translated = Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            // The device: translate, then take its time over the write.
            let _pin = g.iommu.dma_pin();
            let segs = g
                .translate(dev(2), 0x40_0000, 8, Access::Write)
                .expect("mapped");
            translated.wait();
            std::thread::sleep(std::time::Duration::from_millis(200));
            g.mem
                .write_obj(0xdead_u64, GuestAddress(segs[0].0))
                .expect("write");
            written.store(true, Ordering::SeqCst);
        });
        translated.wait();
        assert_eq!(g.unmap(6, 0x40_0000, 1), (HvStatus::SUCCESS, 1));
        assert!(
            written.load(Ordering::SeqCst),
            "UNMAP returned while the device was still writing through it"
        );
    });
    // Later DMA faults.
    assert!(g.translate(dev(2), 0x40_0000, 8, Access::Write).is_err());
}

// ---------------------------------------------------------------- SEND_SYNTHETIC_CLUSTER_IPI

/// Processors that record what they were asked to deliver; VPs 0-3 exist.
#[derive(Default)]
struct RecordingProcessors {
    sent: std::sync::Mutex<Vec<(u8, u64)>>,
}

impl Processors for RecordingProcessors {
    fn send_ipi(&self, vector: u8, targets: u64) -> Result<(), HvError> {
        if targets >> 4 != 0 {
            return Err(HvError::INVALID_PARAMETER);
        }
        self.sent.lock().unwrap().push((vector, targets));
        Ok(())
    }
}

fn ipi_control(fast: bool) -> u64 {
    Control::new()
        .with_code(HypercallCode::SEND_SYNTHETIC_CLUSTER_IPI.0)
        .with_fast(fast)
        .into_bits()
}

fn ipi(
    g: &Guest,
    p: &RecordingProcessors,
    caller: Caller,
    rcx: u64,
    rdx: u64,
    r8: u64,
) -> HvStatus {
    match g
        .iommu
        .dispatch_for(&g.mem, caller, HypercallRegs { rcx, rdx, r8 }, Some(p))
    {
        HypercallOutcome::Complete { rax } => HypercallOutput::from_bits(rax).hv_status(),
        HypercallOutcome::Continue { .. } => panic!("a simple call does not continue"),
    }
}

/// Linux's `hv_send_ipi`: the fast form, RDX = vector (reserved above it),
/// R8 = the VP mask; and the same input from memory.
#[test]
fn send_ipi_delivers_the_vector_to_the_mask_in_both_forms() {
    let g = Guest::new();
    let p = RecordingProcessors::default();
    let me = Caller::kernel(1);
    assert_eq!(
        ipi(&g, &p, me, ipi_control(true), 0xf7, 0b1010),
        HvStatus::SUCCESS
    );
    g.write_input(
        InputSendSyntheticClusterIpi {
            vector: U32::new(0xfd),
            reserved: U32::new(0),
            cpu_mask: U64::new(0b0001),
        }
        .as_bytes(),
    );
    assert_eq!(
        ipi(&g, &p, me, ipi_control(false), INPUT, 0),
        HvStatus::SUCCESS
    );
    assert_eq!(*p.sent.lock().unwrap(), [(0xf7, 0b1010), (0xfd, 0b0001)]);
    let code = Some(HypercallCode::SEND_SYNTHETIC_CLUSTER_IPI);
    assert_eq!(g.iommu.stats().hypercalls.count(code, HvStatus::SUCCESS), 2);
}

/// A vector outside 0x10-0xff, a reserved bit, an unknown VP: the status
/// the TLFS gives, and nothing is delivered.
#[test]
fn send_ipi_refuses_bad_vectors_reserved_bits_and_unknown_vps() {
    let g = Guest::new();
    let p = RecordingProcessors::default();
    let me = Caller::kernel(0);
    for (rdx, r8) in [
        (0x0f, 1),
        (0x00, 1),
        (0x100, 1),
        (u64::from(u32::MAX), 1),
        (0xf7 | 1 << 32, 1),
        (0xf7 | 1 << 63, 1),
        (0xf7, 1 << 4),
        (0xf7, u64::MAX),
    ] {
        assert_eq!(
            ipi(&g, &p, me, ipi_control(true), rdx, r8),
            HvStatus::INVALID_PARAMETER,
            "rdx {rdx:#x} r8 {r8:#x}"
        );
    }
    assert!(p.sent.lock().unwrap().is_empty());
}

/// The dispatcher's checks come first: CPL 3, a rep count, a misaligned
/// input block; and without processors the call does not exist.
#[test]
fn send_ipi_goes_through_the_dispatchers_checks() {
    let g = Guest::new();
    let p = RecordingProcessors::default();
    let user = Caller {
        vp_index: 0,
        cpl: 3,
        restartable: true,
    };
    assert_eq!(
        ipi(&g, &p, user, ipi_control(true), 0xf7, 1),
        HvStatus::ACCESS_DENIED
    );
    let rep = Control::from_bits(ipi_control(true))
        .with_rep_count(1)
        .into_bits();
    assert_eq!(
        ipi(&g, &p, Caller::kernel(0), rep, 0xf7, 1),
        HvStatus::INVALID_HYPERCALL_INPUT
    );
    assert_eq!(
        ipi(&g, &p, Caller::kernel(0), ipi_control(false), INPUT + 4, 0),
        HvStatus::INVALID_ALIGNMENT
    );
    assert!(p.sent.lock().unwrap().is_empty());
    let rax = match g.iommu.dispatch(
        &g.mem,
        0,
        HypercallRegs {
            rcx: ipi_control(true),
            rdx: 0xf7,
            r8: 1,
        },
    ) {
        HypercallOutcome::Complete { rax } => rax,
        HypercallOutcome::Continue { .. } => panic!("continued"),
    };
    assert_eq!(
        HypercallOutput::from_bits(rax).hv_status(),
        HvStatus::INVALID_HYPERCALL_CODE
    );
}

/// Processors that offer no IPIs (a VM of more vCPUs than the mask holds):
/// the call does not exist, whatever its input.
#[test]
fn send_ipi_not_offered_does_not_exist_whatever_the_input() {
    struct NoIpis;
    impl Processors for NoIpis {
        fn offers(&self, code: HypercallCode) -> bool {
            code != HypercallCode::SEND_SYNTHETIC_CLUSTER_IPI
        }
        fn send_ipi(&self, _: u8, _: u64) -> Result<(), HvError> {
            unreachable!("not offered")
        }
    }
    let g = Guest::new();
    for (rdx, r8) in [(0xf7, 1), (0x0f, 1), (0xf7 | 1 << 32, 1)] {
        let outcome = g.iommu.dispatch_for(
            &g.mem,
            Caller::kernel(0),
            HypercallRegs {
                rcx: ipi_control(true),
                rdx,
                r8,
            },
            Some(&NoIpis),
        );
        let HypercallOutcome::Complete { rax } = outcome else {
            panic!("continued")
        };
        assert_eq!(
            HypercallOutput::from_bits(rax).hv_status(),
            HvStatus::INVALID_HYPERCALL_CODE,
            "rdx {rdx:#x}"
        );
    }
}

// ---------------------------------------------------------------- POST_MESSAGE

/// A message port that records what it is given and answers `status`.
struct RecordingPort {
    posted: std::sync::Mutex<Vec<(u32, InputPostMessage)>>,
    status: Result<(), HvError>,
}

impl Processors for RecordingPort {
    fn send_ipi(&self, _: u8, _: u64) -> Result<(), HvError> {
        Err(HvError::INVALID_HYPERCALL_CODE)
    }

    fn post_message(&self, vp: u32, input: &InputPostMessage) -> Result<(), HvError> {
        self.posted.lock().unwrap().push((vp, *input));
        self.status
    }
}

fn post(g: &Guest, p: Option<&dyn Processors>, caller: Caller, rcx: u64, rdx: u64) -> HvStatus {
    match g
        .iommu
        .dispatch_for(&g.mem, caller, HypercallRegs { rcx, rdx, r8: 0 }, p)
    {
        HypercallOutcome::Complete { rax } => HypercallOutput::from_bits(rax).hv_status(),
        HypercallOutcome::Continue { .. } => panic!("a simple call does not continue"),
    }
}

/// Linux's `hv_post_message`: a simple call whose 256-byte input the port
/// gets as written, with the caller's VP; its status is the call's.
#[test]
fn post_message_hands_the_input_to_the_port_and_returns_its_status() {
    let g = Guest::new();
    let control = Control::new()
        .with_code(HypercallCode::POST_MESSAGE.0)
        .into_bits();
    let input = InputPostMessage::new(4, 1, &[0xab; 40]).unwrap();
    g.write_input(input.as_bytes());
    for status in [Ok(()), Err(HvError::INSUFFICIENT_BUFFERS)] {
        let port = RecordingPort {
            posted: Default::default(),
            status,
        };
        let want = status.map_or_else(HvError::status, |()| HvStatus::SUCCESS);
        assert_eq!(
            post(&g, Some(&port), Caller::kernel(3), control, INPUT),
            want
        );
        assert_eq!(*port.posted.lock().unwrap(), [(3, input)]);
    }
    // The dispatcher's checks first: user mode, the fast form (256 bytes do
    // not fit two registers), a misaligned input block.
    let port = RecordingPort {
        posted: Default::default(),
        status: Ok(()),
    };
    let user = Caller {
        vp_index: 0,
        cpl: 3,
        restartable: true,
    };
    assert_eq!(
        post(&g, Some(&port), user, control, INPUT),
        HvStatus::ACCESS_DENIED
    );
    let fast = Control::from_bits(control).with_fast(true).into_bits();
    assert_eq!(
        post(&g, Some(&port), Caller::kernel(0), fast, INPUT),
        HvStatus::INVALID_HYPERCALL_INPUT
    );
    assert_eq!(
        post(&g, Some(&port), Caller::kernel(0), control, INPUT + 4),
        HvStatus::INVALID_ALIGNMENT
    );
    assert!(port.posted.lock().unwrap().is_empty());
    // Without ports (no processors, or processors without a message port)
    // the call does not exist.
    assert_eq!(
        post(&g, None, Caller::kernel(0), control, INPUT),
        HvStatus::INVALID_HYPERCALL_CODE
    );
    let ipis_only = RecordingProcessors::default();
    assert_eq!(
        post(&g, Some(&ipis_only), Caller::kernel(0), control, INPUT),
        HvStatus::INVALID_HYPERCALL_CODE
    );
}

// ------------------------------------------------- SIGNAL_EVENT, RETARGET_INTERRUPT

/// A retargeting as the VMM gets it: device, address, data, vector, VPs.
type Retargeting = (DeviceId, u32, u32, u32, u64);

/// An event port and interrupt retargeter that records what it is given.
#[derive(Default)]
struct RecordingEvents {
    signalled: std::sync::Mutex<Vec<(u32, InputSignalEvent)>>,
    retargeted: std::sync::Mutex<Vec<Retargeting>>,
}

impl Processors for RecordingEvents {
    fn send_ipi(&self, _: u8, _: u64) -> Result<(), HvError> {
        Err(HvError::INVALID_HYPERCALL_CODE)
    }

    fn signal_event(&self, vp: u32, input: &InputSignalEvent) -> Result<(), HvError> {
        self.signalled.lock().unwrap().push((vp, *input));
        Ok(())
    }

    fn retarget_interrupt(
        &self,
        device: DeviceId,
        address: u32,
        data: u32,
        vector: u32,
        vps: u64,
    ) -> Result<(), HvError> {
        self.retargeted
            .lock()
            .unwrap()
            .push((device, address, data, vector, vps));
        Ok(())
    }
}

fn issue_with(g: &Guest, p: &dyn Processors, rcx: u64, rdx: u64, r8: u64) -> HvStatus {
    match g.iommu.dispatch_for(
        &g.mem,
        Caller::kernel(1),
        HypercallRegs { rcx, rdx, r8 },
        Some(p),
    ) {
        HypercallOutcome::Complete { rax } => HypercallOutput::from_bits(rax).hv_status(),
        HypercallOutcome::Continue { .. } => panic!("a simple call does not continue"),
    }
}

/// Linux's `vmbus_set_event`: a fast call with the connection id and flag
/// in RDX; the port gets them with the caller's VP.
#[test]
fn signal_event_is_a_fast_call_to_the_port() {
    let g = Guest::new();
    let events = RecordingEvents::default();
    let control = Control::new()
        .with_code(HypercallCode::SIGNAL_EVENT.0)
        .with_fast(true)
        .into_bits();
    assert_eq!(
        issue_with(&g, &events, control, 0x1001, 0xdead),
        HvStatus::SUCCESS
    );
    let want = InputSignalEvent {
        connection_id: 0x1001.into(),
        flag_number: 0.into(),
        reserved: 0.into(),
    };
    assert_eq!(*events.signalled.lock().unwrap(), [(1, want)]);
    // Without an event port the call does not exist.
    let ipis_only = RecordingProcessors::default();
    assert_eq!(
        issue_with(&g, &ipis_only, control, 0x1001, 0),
        HvStatus::INVALID_HYPERCALL_CODE
    );
}

/// pci-hyperv's `hv_irq_retarget_interrupt` with protocol 1.2 and newer: a
/// VP set in a variable header of `1 + banks` words; malformed sets,
/// another partition, a non-MSI source and a variable header longer than
/// the call's are refused before the VMM sees them.
#[test]
fn retarget_interrupt_takes_a_vp_set_in_a_variable_header() {
    let g = Guest::new();
    let events = RecordingEvents::default();
    let mut input = InputRetargetDeviceInterrupt::new_zeroed();
    input.partition_id = HV_PARTITION_ID_SELF.into();
    input.device_id = 0x1234_5608.into();
    input.source = HV_INTERRUPT_SOURCE_MSI.into();
    input.msi_address = 0xfee0_1000.into();
    input.msi_data = 0x41.into();
    input.vector = 0x42.into();
    input.flags = HV_DEVICE_INTERRUPT_TARGET_PROCESSOR_SET.into();
    input.valid_bank_mask = 1.into();
    input.bank_contents[0] = 0b10.into();
    let given = InputRetargetDeviceInterrupt::FIXED_SIZE + 16;
    let call = |input: &InputRetargetDeviceInterrupt, var_words: u16| {
        let mut bytes = input.as_bytes().to_vec();
        bytes.resize(
            InputRetargetDeviceInterrupt::FIXED_SIZE + 8 * usize::from(var_words),
            0,
        );
        g.write_input(&bytes);
        let rcx = Control::new()
            .with_code(HypercallCode::RETARGET_INTERRUPT.0)
            .with_variable_header_size(var_words)
            .into_bits();
        issue_with(&g, &events, rcx, INPUT, 0)
    };
    assert_eq!(given, 72);
    assert_eq!(call(&input, 2), HvStatus::SUCCESS);
    assert_eq!(
        *events.retargeted.lock().unwrap(),
        [(
            DeviceId::from_bits(0x1234_5608),
            0xfee0_1000,
            0x41,
            0x42,
            0b10
        )]
    );
    // A bank count that is not the mask's, a bank of VPs pvmm lacks, an
    // unknown set format, a non-MSI source, another partition.
    assert_eq!(call(&input, 1), HvStatus::INVALID_PARAMETER);
    assert_eq!(call(&input, 3), HvStatus::INVALID_PARAMETER);
    let mut high = input;
    high.valid_bank_mask = 0b11.into();
    high.bank_contents[1] = 1.into();
    assert_eq!(call(&high, 3), HvStatus::INVALID_PARAMETER);
    high.bank_contents[1] = 0.into();
    assert_eq!(call(&high, 3), HvStatus::SUCCESS);
    let mut format = input;
    format.vp_mask_or_format = 1.into();
    assert_eq!(call(&format, 2), HvStatus::INVALID_PARAMETER);
    let mut source = input;
    source.source = 2.into();
    assert_eq!(call(&source, 2), HvStatus::INVALID_PARAMETER);
    let mut partition = input;
    partition.partition_id = 0.into();
    assert_eq!(call(&partition, 2), HvStatus::INVALID_PARTITION_ID);
    // Protocol 1.1's 64-bit mask: no variable header.
    let mut mask = input;
    mask.flags = 0.into();
    mask.vp_mask_or_format = 0b1.into();
    assert_eq!(call(&mask, 0), HvStatus::SUCCESS);
    assert_eq!(call(&mask, 1), HvStatus::INVALID_PARAMETER);
    // Past the largest VP set: the dispatcher's own check.
    assert_eq!(call(&input, 66), HvStatus::INVALID_HYPERCALL_INPUT);
    assert_eq!(events.retargeted.lock().unwrap().len(), 3);
}

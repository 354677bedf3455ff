//! Linux's Hyper-V pvIOMMU driver, replayed byte for byte: the hypercalls
//! of `drivers/iommu/hyperv/iommu.c` (v2 series, patches 3 and 4) and of
//! `get_vtl()` in `arch/x86/hyperv/hv_init.c`, built the way the C code
//! builds them (its per-CPU input page, `memset(input, 0, sizeof(*input))`
//! then the fields, outputs at `input + 1` or in the per-CPU output page,
//! `hv_do_hypercall` / `hv_do_rep_hypercall` control words and loop), each
//! checked for the status and the effect the driver expects.

use super::tests::{dev, Guest, RAM_TOP};
use super::*;
use crate::flush::linux_v1_entries;
use crate::testing::Call;
use crate::{Access, AttachTarget, FaultReason, Invalidation, IommuConfig};
use pviommu_abi::{
    device_property, register, DeviceDomainId, DeviceDomainType, DeviceId, FlushListEntry,
    InputDeviceDomain, InputFlushDeviceDomain, InputFlushDeviceDomainList, InputGetVpRegisters,
    IommuCapabilities, OutputGetIommuCapabilities, OutputGetLogicalDeviceProperty, RegisterValue,
    HV_PARTITION_ID_SELF, HV_VP_INDEX_SELF,
};
use std::mem::size_of;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

/// `hyperv_pcpu_input_arg` and `hyperv_pcpu_output_arg` of CPU 0.
const PCPU_INPUT: u64 = 0x7000;
const PCPU_OUTPUT: u64 = 0x8000;

const HV_DEVICE_DOMAIN_TYPE_S1: DeviceDomainType = DeviceDomainType::S1;
const HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU: u32 = device_property::PVIOMMU;
const HV_IOMMU_CAP_PRESENT: u64 = 1 << 0;
const HV_IOMMU_CAP_S1: u64 = 1 << 2;
const HV_IOMMU_CAP_S1_5LVL: u64 = 1 << 3;
const HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT: u32 = 1 << 0;
const SZ_4K: u64 = 1 << 12;
const SZ_2M: u64 = 1 << 21;
const SZ_1G: u64 = 1 << 30;

// generic_pt's x86-64 format (drivers/iommu/generic_pt/fmt/x86_64.h).
const X86_64_FMT_P: u64 = 1 << 0;
const X86_64_FMT_RW: u64 = 1 << 1;
const X86_64_FMT_U: u64 = 1 << 2;
const X86_64_FMT_A: u64 = 1 << 5;
const X86_64_FMT_D: u64 = 1 << 6;
const X86_64_FMT_PS: u64 = 1 << 7;
/// x86_64_pt_install_table.
const TABLE: u64 = X86_64_FMT_P | X86_64_FMT_RW | X86_64_FMT_U | X86_64_FMT_A;
/// A leaf with IOMMU_READ | IOMMU_WRITE.
const LEAF_RW: u64 = X86_64_FMT_P | X86_64_FMT_U | X86_64_FMT_A | X86_64_FMT_RW | X86_64_FMT_D;

/// The status word's HV_HYPERCALL_RESULT_MASK and reps completed.
fn hv_result(status: u64) -> HvStatus {
    HypercallOutput::from_bits(status).hv_status()
}

fn hv_repcomp(status: u64) -> u16 {
    HypercallOutput::from_bits(status).reps_completed()
}

/// The guest as Linux's driver sees it: one CPU, its per-CPU pages, and the
/// guest's own first-stage page tables in its RAM.
struct Linux {
    g: Guest,
    /// Bump allocator for page-table pages (iommu_alloc_pages).
    next_table: std::cell::Cell<u64>,
}

impl Linux {
    fn new(config: IommuConfig) -> Self {
        Self {
            g: Guest::with(config),
            next_table: std::cell::Cell::new(0x10_0000),
        }
    }

    /// `hv_do_hypercall(control, input, output)`: RCX = control, RDX and R8
    /// the physical addresses, 0 for NULL. The VMM's time slicing is
    /// invisible to the guest (its hypercall page re-executes the call).
    fn hv_do_hypercall(&self, control: u64, input: Option<u64>, output: Option<u64>) -> u64 {
        let ((status, reps), _) = self
            .g
            .issue(control, input.unwrap_or(0), output.unwrap_or(0));
        HypercallOutput::from_status(status, reps).into_bits()
    }

    /// `hv_do_rep_hypercall(code, rep_count, 0, input, output)`, with its
    /// loop: on success with fewer reps completed than asked, it calls again
    /// from there.
    fn hv_do_rep_hypercall(&self, code: HypercallCode, rep_count: u16, input: u64) -> u64 {
        let mut control = Control::new().with_code(code.0).with_rep_count(rep_count);
        loop {
            let status = self.hv_do_hypercall(control.into_bits(), Some(input), None);
            if !hv_result(status).is_success() {
                return status;
            }
            let rep_comp = hv_repcomp(status);
            control = control.with_rep_start(rep_comp);
            if rep_comp >= rep_count {
                return status;
            }
        }
    }

    /// `memset(input, 0, size)` then the struct's bytes at the start of the
    /// per-CPU input page (the rest of the page keeps what earlier calls
    /// left there, as in the kernel).
    fn fill_input(&self, size: usize, bytes: &[u8]) {
        self.g
            .mem
            .write_slice(&vec![0; size], GuestAddress(PCPU_INPUT))
            .expect("memset");
        self.g
            .mem
            .write_slice(bytes, GuestAddress(PCPU_INPUT))
            .expect("input");
    }

    fn read<T: FromBytes>(&self, gpa: u64) -> T {
        let mut buf = vec![0u8; size_of::<T>()];
        self.g
            .mem
            .read_slice(&mut buf, GuestAddress(gpa))
            .expect("read");
        T::read_from_bytes(&buf).expect("size")
    }

    // ---- arch/x86/hyperv/hv_init.c

    /// get_vtl(): HV_HYPERCALL_REP_COMP_1 | HVCALL_GET_VP_REGISTERS for
    /// HV_REGISTER_VSM_VP_STATUS; BUG() unless it succeeds.
    fn get_vtl(&self) -> u8 {
        let control = Control::new()
            .with_code(HypercallCode::GET_VP_REGISTERS.0)
            .with_rep_count(1);
        let input = InputGetVpRegisters {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            vp_index: U32::new(HV_VP_INDEX_SELF),
            input_vtl: 0,
            padding: [0; 3],
        };
        let mut bytes = input.as_bytes().to_vec();
        bytes.extend_from_slice(&register::VSM_VP_STATUS.to_le_bytes());
        // memset(input, 0, struct_size(input, names, 1))
        self.fill_input(size_of::<InputGetVpRegisters>() + 4, &bytes);
        let ret = self.hv_do_hypercall(control.into_bits(), Some(PCPU_INPUT), Some(PCPU_OUTPUT));
        assert!(
            hv_result(ret).is_success(),
            "get_vtl() would BUG(): {ret:#x}"
        );
        let value: RegisterValue = self.read(PCPU_OUTPUT);
        (value.low.get() & 0xF) as u8
    }

    // ---- drivers/iommu/hyperv/iommu.c

    /// hv_iommu_detect(): the output right after the input.
    fn hv_iommu_detect(&self) -> (u64, OutputGetIommuCapabilities) {
        let input = InputGetIommuCapabilities {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            reserved: U64::new(0),
        };
        self.fill_input(size_of_val(&input), input.as_bytes());
        let output = PCPU_INPUT + size_of_val(&input) as u64;
        let code = u64::from(HypercallCode::GET_IOMMU_CAPABILITIES.0);
        let status = self.hv_do_hypercall(code, Some(PCPU_INPUT), Some(output));
        (status, self.read(output))
    }

    fn device_domain(id: u32) -> InputDeviceDomain {
        InputDeviceDomain {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            owner_vtl: 0,
            padding: [0; 7],
            domain_id: U64::new(DeviceDomainId::with(HV_DEVICE_DOMAIN_TYPE_S1, id).into_bits()),
        }
    }

    /// hv_create_device_domain(): forward_progress_required = 1.
    fn hv_create_device_domain(&self, id: u32) -> u64 {
        let input = InputCreateDeviceDomain {
            device_domain: Self::device_domain(id),
            create_device_domain_flags: U32::new(1),
        };
        self.fill_input(size_of_val(&input), input.as_bytes());
        let code = u64::from(HypercallCode::CREATE_DEVICE_DOMAIN.0);
        self.hv_do_hypercall(code, Some(PCPU_INPUT), None)
    }

    /// hv_configure_device_domain() for IOMMU_DOMAIN_IDENTITY, _BLOCKED or
    /// a paging domain (root, 4-level).
    fn hv_configure_device_domain(&self, id: u32, kind: DomainType) -> u64 {
        let (blocked, translation_enabled, root) = match kind {
            DomainType::Identity => (false, false, 0),
            DomainType::Blocked => (true, true, 0),
            DomainType::Paging(root) => (false, true, root),
        };
        let flags = u64::from(translation_enabled) | u64::from(blocked) << 1;
        let input = InputConfigureDeviceDomain {
            device_domain: Self::device_domain(id),
            settings: pviommu_abi::DeviceDomainSettings {
                flags: U64::new(flags),
                page_table_root: U64::new(root),
            },
        };
        self.fill_input(size_of_val(&input), input.as_bytes());
        let code = u64::from(HypercallCode::CONFIGURE_DEVICE_DOMAIN.0);
        self.hv_do_hypercall(code, Some(PCPU_INPUT), None)
    }

    /// hv_delete_device_domain().
    fn hv_delete_device_domain(&self, id: u32) -> u64 {
        let input = InputDeleteDeviceDomain {
            device_domain: Self::device_domain(id),
        };
        self.fill_input(size_of_val(&input), input.as_bytes());
        let code = u64::from(HypercallCode::DELETE_DEVICE_DOMAIN.0);
        self.hv_do_hypercall(code, Some(PCPU_INPUT), None)
    }

    /// hv_iommu_get_logical_device_property(): the output right after the
    /// input.
    fn hv_iommu_get_logical_device_property(
        &self,
        logical: u64,
    ) -> (u64, OutputGetLogicalDeviceProperty) {
        let input = InputGetLogicalDeviceProperty {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            logical_device_id: U64::new(logical),
            code: U32::new(HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU),
            reserved: U32::new(0),
        };
        self.fill_input(size_of_val(&input), input.as_bytes());
        let output = PCPU_INPUT + size_of_val(&input) as u64;
        let code = u64::from(HypercallCode::GET_LOGICAL_DEVICE_PROPERTY.0);
        let status = self.hv_do_hypercall(code, Some(PCPU_INPUT), Some(output));
        (status, self.read(output))
    }

    /// hv_iommu_attach_dev(): device_id = prefix | PCI_FUNC(devfn).
    fn hv_iommu_attach_dev(&self, id: u32, logical: u64) -> u64 {
        let input = InputAttachDeviceDomain {
            device_domain: Self::device_domain(id),
            device_id: U64::new(logical),
        };
        self.fill_input(size_of_val(&input), input.as_bytes());
        let code = u64::from(HypercallCode::ATTACH_DEVICE_DOMAIN.0);
        self.hv_do_hypercall(code, Some(PCPU_INPUT), None)
    }

    /// hv_flush_device_domain() (flush_iotlb_all, and v1's iotlb_sync).
    fn hv_flush_device_domain(&self, id: u32) -> u64 {
        let input = InputFlushDeviceDomain {
            device_domain: Self::device_domain(id),
            flags: U32::new(0),
            reserved: U32::new(0),
        };
        self.fill_input(size_of_val(&input), input.as_bytes());
        let code = u64::from(HypercallCode::FLUSH_DEVICE_DOMAIN.0);
        self.hv_do_hypercall(code, Some(PCPU_INPUT), None)
    }

    /// hv_flush_device_domain_list() with `entries` (patch 4 sends one, the
    /// covering block of hv_iommu_calc_flush_range; v1 sent exact blocks);
    /// on failure the driver falls back to hv_flush_device_domain, which
    /// this replay reports instead.
    fn hv_flush_device_domain_list(&self, id: u32, entries: &[FlushListEntry]) -> u64 {
        let input = InputFlushDeviceDomainList {
            device_domain: Self::device_domain(id),
            flags: U32::new(HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT),
            reserved: U32::new(0),
        };
        // memset(input, 0, sizeof(*input)): the header only; the entries
        // are stored after it.
        let mut bytes = input.as_bytes().to_vec();
        for e in entries {
            bytes.extend_from_slice(&e.into_bits().to_le_bytes());
        }
        self.fill_input(size_of_val(&input), &bytes);
        let count = u16::try_from(entries.len()).expect("entries");
        self.hv_do_rep_hypercall(HypercallCode::FLUSH_DEVICE_DOMAIN_LIST, count, PCPU_INPUT)
    }

    // ---- the guest's first-stage table (generic_pt, x86-64, 4 levels)

    fn alloc_table(&self) -> u64 {
        let t = self.next_table.get();
        self.next_table.set(t + SZ_4K);
        self.g
            .mem
            .write_slice(&[0u8; 4096], GuestAddress(t))
            .expect("zeroed table");
        t
    }

    /// Installs a leaf of `size` (4K, 2M or 1G) at `iova` -> `gpa`, with the
    /// tables above it, as pt_iommu's map_pages does.
    fn map(&self, root: u64, iova: u64, gpa: u64, size: u64) {
        let leaf_level = match size {
            SZ_4K => 1,
            SZ_2M => 2,
            SZ_1G => 3,
            _ => panic!("page size"),
        };
        let mut table = root;
        for level in (leaf_level + 1..=4).rev() {
            let index = (iova >> (12 + 9 * (level - 1))) & 0x1FF;
            let pte: u64 = self.read(table + index * 8);
            table = if pte & X86_64_FMT_P != 0 {
                pte & 0x000F_FFFF_FFFF_F000
            } else {
                let t = self.alloc_table();
                self.g.pte(table, index, t | TABLE);
                t
            };
        }
        let index = (iova >> (12 + 9 * (leaf_level - 1))) & 0x1FF;
        let ps = if leaf_level > 1 { X86_64_FMT_PS } else { 0 };
        self.g.pte(table, index, gpa | LEAF_RW | ps);
    }

    /// Clears the 4K leaf at `iova` (unmap_pages, before iotlb_sync).
    fn unmap_4k(&self, root: u64, iova: u64) {
        let mut table = root;
        for level in (2..=4).rev() {
            let index = (iova >> (12 + 9 * (level - 1))) & 0x1FF;
            let pte: u64 = self.read(table + index * 8);
            table = pte & 0x000F_FFFF_FFFF_F000;
        }
        self.g.pte(table, (iova >> 12) & 0x1FF, 0);
    }
}

#[derive(Clone, Copy)]
enum DomainType {
    Identity,
    Blocked,
    Paging(u64),
}

/// hv_iommu_calc_flush_range() of patch 4, as written in C: the smallest
/// naturally aligned power-of-two block covering [start, end] (inclusive).
fn hv_iommu_calc_flush_range(start: u64, end: u64) -> FlushListEntry {
    let hvpfn_down = |x: u64| x >> 12;
    let hvpfn_up = |x: u64| x.wrapping_add(SZ_4K - 1) >> 12;
    let start_pfn = hvpfn_down(start);
    let last_pfn = hvpfn_up(end.wrapping_add(1)).wrapping_sub(1);
    let mask_shift = if start_pfn == last_pfn {
        0
    } else {
        // __fls(x) + 1
        64 - (start_pfn ^ last_pfn).leading_zeros()
    };
    let aligned_pfn = start_pfn & !((1u64 << mask_shift) - 1);
    FlushListEntry::new()
        .with_page_number(aligned_pfn)
        .with_page_mask_shift(u16::try_from(mask_shift).expect("shift"))
}

#[test]
fn linux_driver_replay() {
    let linux = Linux::new(IommuConfig::default());
    let g = &linux.g;
    // The device: an emulated function on a vPCI bus (PCI id dev(1)) and a
    // passthrough function of the same bus (dev(9), the recording backend).
    let guid = [
        0x3C, 0x2D, 0x1E, 0x0F, 0x84, 0x95, 0xA6, 0xB7, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let prefix = pviommu_abi::logical_device_id_prefix(&guid);
    let (emulated, passthrough) = (u64::from(prefix), u64::from(prefix | 1));
    g.iommu
        .register_device_alias(DeviceId::from_bits(emulated), dev(1))
        .expect("alias");
    g.iommu
        .register_device_alias(DeviceId::from_bits(passthrough), dev(9))
        .expect("alias");

    // hyperv_init(): the VTL must be 0.
    assert_eq!(linux.get_vtl(), 0);

    // hv_iommu_init(): detect, check what the driver checks.
    let (status, cap) = linux.hv_iommu_detect();
    assert!(hv_result(status).is_success());
    let iommu_cap = cap.iommu_cap.get();
    assert_ne!(iommu_cap & HV_IOMMU_CAP_PRESENT, 0);
    assert_ne!(iommu_cap & HV_IOMMU_CAP_S1, 0);
    assert_eq!(
        IommuCapabilities::from_bits(iommu_cap).s1_5lvl(),
        iommu_cap & HV_IOMMU_CAP_S1_5LVL != 0
    );
    let pgsize_bitmap = cap.pgsize_bitmap.get();
    assert!(pgsize_bitmap != 0 && pgsize_bitmap & !(SZ_4K | SZ_2M | SZ_1G) == 0);
    assert_eq!(
        cap.size.get() as usize,
        size_of::<OutputGetIommuCapabilities>()
    );
    let max_iova_width = cap.max_iova_width;
    assert_eq!(max_iova_width, 48);
    // cfg.top_level = (max_iova_width > 48) ? 4 : 3: a 4-level table.

    // hv_initialize_static_domains(): ida from HV_DEVICE_DOMAIN_ID_DEFAULT + 1.
    let (identity, blocking) = (1, 2);
    assert!(hv_result(linux.hv_create_device_domain(identity)).is_success());
    assert!(
        hv_result(linux.hv_configure_device_domain(identity, DomainType::Identity)).is_success()
    );
    assert!(hv_result(linux.hv_create_device_domain(blocking)).is_success());
    assert!(
        hv_result(linux.hv_configure_device_domain(blocking, DomainType::Blocked)).is_success()
    );

    // hv_iommu_probe_device(): both functions are behind the pvIOMMU.
    for logical in [emulated, passthrough] {
        let (status, property) = linux.hv_iommu_get_logical_device_property(logical);
        assert!(hv_result(status).is_success());
        assert_eq!(
            property.device_iommu.get() & 1,
            1,
            "HV_DEVICE_IOMMU_ENABLED"
        );
    }

    // Identity domain first (iommu.passthrough, or before the DMA domain):
    // IOVA = GPA.
    for logical in [emulated, passthrough] {
        assert!(hv_result(linux.hv_iommu_attach_dev(identity, logical)).is_success());
    }
    assert_eq!(
        g.translate(dev(1), 0x12_3456, 8, Access::Write),
        Ok(vec![(0x12_3456, 8)])
    );
    // The blocking domain (a DMA ownership claim): nothing gets through.
    assert!(hv_result(linux.hv_iommu_attach_dev(blocking, emulated)).is_success());
    assert_eq!(
        g.translate(dev(1), 0x12_3456, 8, Access::Read)
            .map_err(|f| f.reason),
        Err(FaultReason::Blocked)
    );

    // hv_iommu_domain_alloc_paging(): create, pt init, configure with the
    // table's root; then the DMA API domain is attached (a replace).
    let paging = 3;
    let root = linux.alloc_table();
    assert!(hv_result(linux.hv_create_device_domain(paging)).is_success());
    assert!(
        hv_result(linux.hv_configure_device_domain(paging, DomainType::Paging(root))).is_success()
    );
    g.rec.take_calls();
    for logical in [emulated, passthrough] {
        assert!(hv_result(linux.hv_iommu_attach_dev(paging, logical)).is_success());
    }
    let set_s1: Vec<Call> = g
        .rec
        .take_calls()
        .into_iter()
        .filter(|c| matches!(c, Call::SetS1(..)))
        .collect();
    assert_eq!(
        set_s1,
        [Call::SetS1(
            paging,
            crate::S1Config {
                root,
                levels: crate::PagingLevels::Four,
                translation_enabled: true,
                blocked: false,
            }
        )],
        "the passthrough function's host sees the guest's table"
    );
    assert_eq!(g.rec.attachment(dev(9)), Some(AttachTarget::Domain(paging)));

    // map_pages through the guest's own table: 4K, 2M and 1G leaves.
    let buf = 0x40_0000;
    for i in 0..8 {
        linux.map(root, 0x10_0000 + i * SZ_4K, buf + i * SZ_4K, SZ_4K);
    }
    linux.map(root, 0x4000_0000, 0x20_0000, SZ_2M);
    linux.map(root, 2 * SZ_1G, 0, SZ_1G);
    assert_eq!(
        g.translate(dev(1), 0x10_0010, 0x2000, Access::Write),
        Ok(vec![(buf + 0x10, 0x2000)])
    );
    assert_eq!(
        g.translate(dev(1), 0x10_0000, 8 * SZ_4K, Access::Read),
        Ok(vec![(buf, 8 * SZ_4K)]),
        "all 8 pages, now in the IOTLB"
    );
    assert_eq!(
        g.translate(dev(1), 0x401F_F000, 16, Access::Read),
        Ok(vec![(0x3F_F000, 16)])
    );
    assert_eq!(
        g.translate(dev(1), 2 * SZ_1G + 0x123_4000, 8, Access::Read),
        Ok(vec![(0x123_4000, 8)])
    );
    assert_eq!(
        g.translate(dev(1), 2 * SZ_1G + RAM_TOP, 8, Access::Read)
            .map_err(|f| f.reason),
        Err(FaultReason::GpaOutsideRam),
        "the 1G leaf reaches past RAM: refused there"
    );

    // unmap_pages of one page, then iotlb_sync with patch 4's single
    // covering entry (v2): stale until the flush, gone after.
    linux.unmap_4k(root, 0x10_3000);
    assert!(
        g.translate(dev(1), 0x10_3000, 8, Access::Read).is_ok(),
        "stale"
    );
    let entry = hv_iommu_calc_flush_range(0x10_3000, 0x10_3FFF);
    assert_eq!((entry.page_number(), entry.page_mask_shift()), (0x103, 0));
    g.rec.take_calls();
    let status = linux.hv_flush_device_domain_list(paging, &[entry]);
    assert_eq!(
        (hv_result(status), hv_repcomp(status)),
        (HvStatus::SUCCESS, 1)
    );
    assert_eq!(
        g.translate(dev(1), 0x10_3000, 8, Access::Read)
            .map_err(|f| f.reason),
        Err(FaultReason::S1NotPresent { level: 1 })
    );
    assert_eq!(
        g.rec.take_calls(),
        [Call::Invalidate(
            paging,
            Invalidation::Range {
                iova: 0x10_3000,
                len: SZ_4K
            }
        )]
    );
    // A gather over pages 1..=6 (v2: one block of 8 pages, over-flushing).
    for i in [1u64, 2, 4, 5, 6] {
        linux.unmap_4k(root, 0x10_0000 + i * SZ_4K);
    }
    let entry = hv_iommu_calc_flush_range(0x10_1000, 0x10_6FFF);
    assert_eq!((entry.page_number(), entry.page_mask_shift()), (0x100, 3));
    let status = linux.hv_flush_device_domain_list(paging, &[entry]);
    assert!(hv_result(status).is_success());
    for i in [1u64, 2, 4, 5, 6] {
        assert!(g
            .translate(dev(1), 0x10_0000 + i * SZ_4K, 8, Access::Read)
            .is_err());
    }
    assert!(g.translate(dev(1), 0x10_7000, 8, Access::Read).is_ok());
    // v1's shape: the range as exact 2^N blocks, several entries.
    linux.unmap_4k(root, 0x10_0000);
    linux.unmap_4k(root, 0x10_7000);
    let mut v1 = Vec::new();
    linux_v1_entries(0x100, 8, |e| v1.push(e));
    assert_eq!(v1.len(), 1, "pages 0x100..0x108: one aligned block");
    let mut v1 = Vec::new();
    linux_v1_entries(0x100, 7, |e| v1.push(e));
    assert_eq!(v1.len(), 3, "pages 0x100..0x107: 4 + 2 + 1");
    v1.push(FlushListEntry::new().with_page_number(0x107));
    g.rec.take_calls();
    let status = linux.hv_flush_device_domain_list(paging, &v1);
    assert_eq!(
        (hv_result(status), hv_repcomp(status)),
        (HvStatus::SUCCESS, 4)
    );
    assert_eq!(
        g.rec.take_calls(),
        [Call::Invalidate(
            paging,
            Invalidation::Range {
                iova: 0x10_0000,
                len: 8 * SZ_4K
            }
        )],
        "merged into one exact range"
    );
    assert!(g.translate(dev(1), 0x10_7000, 8, Access::Read).is_err());
    // An empty gather (start = ULONG_MAX, end = 0): page 0, shift 52.
    let empty = hv_iommu_calc_flush_range(u64::MAX, 0);
    assert_eq!((empty.page_number(), empty.page_mask_shift()), (0, 52));
    let status = linux.hv_flush_device_domain_list(paging, &[empty]);
    assert_eq!(
        (hv_result(status), hv_repcomp(status)),
        (HvStatus::SUCCESS, 1)
    );
    assert_eq!(
        g.rec.take_calls(),
        [Call::Invalidate(
            paging,
            Invalidation::Range {
                iova: 0,
                len: 1 << max_iova_width
            }
        )],
        "the whole aperture"
    );
    // flush_iotlb_all.
    assert!(hv_result(linux.hv_flush_device_domain(paging)).is_success());
    assert_eq!(
        g.rec.take_calls(),
        [Call::Invalidate(paging, Invalidation::All)]
    );

    // release_device: the blocking domain (release_domain); then the
    // paging domain is freed.
    for logical in [emulated, passthrough] {
        assert!(hv_result(linux.hv_iommu_attach_dev(blocking, logical)).is_success());
    }
    assert_eq!(
        g.rec.attachment(dev(9)),
        Some(AttachTarget::Domain(blocking)),
        "the driver's blocking domain (an S1 domain in blocked mode)"
    );
    assert!(hv_result(linux.hv_delete_device_domain(paging)).is_success());
    assert_eq!(
        g.translate(dev(1), 0x10_0000, 8, Access::Read)
            .map_err(|f| f.reason),
        Err(FaultReason::Blocked)
    );

    // Not one hypercall of all this got an error.
    let stats = g.iommu.stats();
    let errors: Vec<_> = stats.hypercalls.error_counts().collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(stats.hypercalls.errors, 0);
    assert_eq!(stats.backend_errors, 0);
}

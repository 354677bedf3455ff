//! vCPU set-up: CPUID with the VM's topology, MSRs, FPU, LAPIC and the
//! boot register state (64-bit Linux entry or 32-bit PVH entry).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
};
use kvm_ioctls::VcpuFd;
use resources::layout::boot;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};

/// Applies the VM's topology to the CPUID entries of vCPU `index` of
/// `count`: one package of `count` cores with one thread each; the APIC id
/// of vCPU `i` is `i`.
///
/// - leaf 1: initial APIC id, logical processor count, HTT, hypervisor bit;
/// - leaf 4: cores per package, threads sharing each cache;
/// - leaves 0xB and 0x1F (when the host has it): SMT and core levels with
///   the x2APIC id;
/// - leaf 0x8000_0008 (AMD): number of cores.
pub fn apply_topology(entries: &mut Vec<kvm_cpuid_entry2>, index: u32, count: u32) {
    let count = count.max(1);
    // Bits needed to number the cores: the x2APIC id shift of the package.
    let core_bits = 32 - (count - 1).leading_zeros();
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let has_1f = entries.iter().any(|e| e.function == 0x1f);
    let amd = entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163));

    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | (count.min(255) << 16);
                e.edx |= 1 << 28; // HTT: the logical processor count is valid
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            4 if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax =
                    (e.eax & 0x3fff) | ((sharing.min(0xfff)) << 14) | (((count - 1).min(63)) << 26);
            }
            0x8000_0008 if amd => {
                e.ecx = (e.ecx & !0xff) | ((count - 1) & 0xff);
            }
            _ => {}
        }
    }

    // Rebuild the extended topology leaves.
    entries.retain(|e| e.function != 0xb && e.function != 0x1f);
    let mut leaves = Vec::new();
    if max_basic >= 0xb {
        leaves.push(0xb);
    }
    if has_1f && max_basic >= 0x1f {
        leaves.push(0x1f);
    }
    for function in leaves {
        let levels = [
            // SMT: one thread per core, so no bits to shift.
            (0u32, 1u32, 1u32),
            // Core: `count` cores, `core_bits` to shift to the package id.
            (core_bits, count, 2),
            // End of the list.
            (0, 0, 0),
        ];
        for (sub, (shift, n, kind)) in (0u32..).zip(levels) {
            entries.push(kvm_cpuid_entry2 {
                function,
                index: sub,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: n,
                ecx: sub | (kind << 8),
                edx: index,
                ..Default::default()
            });
        }
    }
}

/// The CPUID of vCPU `index` of `count`: KVM's `supported` entries with
/// the VM's topology, then `hook`'s edits (the Hyper-V interface replaces
/// the hypervisor leaves); without a hook, KVM's own leaves stay as KVM
/// reports them (its signature at 0x40000000).
pub fn vcpu_cpuid(
    supported: &[kvm_cpuid_entry2],
    index: u32,
    count: u32,
    hook: Option<&crate::hooks::CpuidHook>,
) -> Vec<kvm_cpuid_entry2> {
    let mut entries = supported.to_vec();
    apply_topology(&mut entries, index, count);
    if let Some(hook) = hook {
        hook(index, &mut entries);
    }
    entries
}

/// Builds a [`CpuId`] from entries.
pub fn to_cpuid(entries: &[kvm_cpuid_entry2]) -> Result<CpuId> {
    CpuId::from_entries(entries).map_err(|e| Error::KvmTable("CPUID table", e))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

/// The MSR values every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs of `vcpu`.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::KvmTable("MSR table", e))?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
    if n != entries.len() {
        log::warn!(
            "KVM took {n} of {} boot MSRs (MSR {:#x} refused)",
            entries.len(),
            entries[n].index
        );
    }
    Ok(())
}

/// x87 control word and MXCSR defaults (as after FNINIT / reset).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("KVM_SET_FPU", e))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

fn set_delivery_mode(v: u32, mode: u32) -> u32 {
    (v & !0x700) | (mode << 8)
}

/// LINT0 in ExtINT mode (the PIC), LINT1 in NMI mode, as firmware leaves
/// them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    let mut l = vcpu
        .get_lapic()
        .map_err(|e| Error::Kvm("KVM_GET_LAPIC", e))?;
    let lvt0 = lapic_reg(&l, APIC_LVT0);
    set_lapic_reg(&mut l, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&l, APIC_LVT1);
    set_lapic_reg(&mut l, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&l)
        .map_err(|e| Error::Kvm("KVM_SET_LAPIC", e))
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Linux 64-bit boot protocol: long mode, identity-mapped 0-4 GiB,
    /// RSI = boot_params.
    Linux64 {
        /// Entry point.
        rip: u64,
    },
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh {
        /// Entry point.
        rip: u64,
    },
}

const GDT_NULL: u64 = 0;
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_CODE32: u64 = 0x00cf_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_TSS: u64 = 0x008f_8b00_0000_ffff;
/// Four 8-byte descriptors.
const GDT_LIMIT: u16 = 4 * 8 - 1;
const SEL_CODE: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_TSS: u16 = 0x18;

/// A `kvm_segment` for GDT descriptor `desc` at selector `sel`.
// Field extraction from the descriptor: truncation intended.
#[allow(clippy::cast_possible_truncation)]
fn segment(desc: u64, sel: u16) -> kvm_segment {
    let base = ((desc >> 16) & 0xff_ffff) | ((desc >> 32) & 0xff00_0000);
    let limit = (desc & 0xffff) | ((desc >> 32) & 0xf_0000);
    let g = ((desc >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector: sel,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry flags: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry flags for a 2 MiB page.
const PDE_2M: u64 = 0x83;

/// Writes the boot GDT (and, for 64-bit entry, the 0-4 GiB identity map)
/// into guest memory and sets the boot vCPU's registers through
/// KVM_SET_SREGS/KVM_SET_REGS (once, before the first run).
pub fn setup_boot_cpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: Entry,
    boot_info: u64,
) -> Result<()> {
    let code = match entry {
        Entry::Linux64 { .. } => GDT_CODE64,
        Entry::Pvh { .. } => GDT_CODE32,
    };
    let gdt = [GDT_NULL, code, GDT_DATA, GDT_TSS];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(boot::GDT_START + 8 * i as u64))
            .map_err(|e| Error::GuestWrite("the boot GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(boot::IDT_START))
        .map_err(|e| Error::GuestWrite("the boot IDT", e))?;

    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    sregs.gdt.base = boot::GDT_START;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = boot::IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment(code, SEL_CODE);
    let data = segment(GDT_DATA, SEL_DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT_TSS, SEL_TSS);

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Linux64 { rip } => {
            write_identity_map(mem)?;
            sregs.cr3 = boot::PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsi = boot_info;
            regs.rsp = boot::BOOT_STACK_POINTER;
            regs.rbp = boot::BOOT_STACK_POINTER;
        }
        Entry::Pvh { rip } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = boot_info;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Kvm("KVM_SET_REGS", e))
}

/// Identity map of 0-4 GiB with 2 MiB pages: PML4 -> one PDPT -> four PDs.
fn write_identity_map(mem: &GuestMemoryMmap) -> Result<()> {
    let err = |e| Error::GuestWrite("the boot page tables", e);
    mem.write_obj(
        boot::PDPT_START | PTE_PRESENT_RW,
        GuestAddress(boot::PML4_START),
    )
    .map_err(err)?;
    let mut pd = vec![0u8; 4 * 4096];
    for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
        let e = ((i as u64) << 21) | PDE_2M;
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(boot::PD_START))
        .map_err(err)?;
    for i in 0..4u64 {
        mem.write_obj(
            (boot::PD_START + i * 4096) | PTE_PRESENT_RW,
            GuestAddress(boot::PDPT_START + i * 8),
        )
        .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use iommu::abi::cpuid;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn intel_like() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(1, 0, 0x806f8, 0x0001_0800, 0, 0),
            // L1d (level 1, type 1) and L3 (level 3, type 3).
            leaf(4, 0, 0x121, 0, 0, 0),
            leaf(4, 1, 0x163, 0, 0, 0),
            leaf(4, 2, 0, 0, 0, 0),
            leaf(0xb, 0, 1, 2, 0x100, 7),
            leaf(0x1f, 0, 1, 2, 0x100, 7),
        ]
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn topology_for_six_cpus() {
        let mut e = intel_like();
        apply_topology(&mut e, 5, 6);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 5);
        assert_eq!((l1.ebx >> 16) & 0xff, 6);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.edx & (1 << 28), 0);
        assert_ne!(l1.ecx & (1 << 31), 0);
        let l1d = find(&e, 4, 0);
        assert_eq!(l1d.eax >> 26, 5);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!(l1d.eax & 0x3fff, 0x121);
        let l3 = find(&e, 4, 1);
        assert_eq!((l3.eax >> 14) & 0xfff, 5);
        assert_eq!(find(&e, 4, 2).eax, 0);
        for f in [0xb, 0x1f] {
            let smt = find(&e, f, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            let core = find(&e, f, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
            let end = find(&e, f, 2);
            assert_eq!((end.eax, end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 0, 5));
            assert_eq!(smt.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            assert_eq!(e.iter().filter(|x| x.function == f).count(), 3);
        }
    }

    #[test]
    fn topology_for_one_cpu_and_no_leaf_b() {
        let mut e = vec![
            leaf(0, 0, 0xa, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            leaf(1, 0, 0, 0x0001_0800, 0, 0),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x7, 0),
        ];
        apply_topology(&mut e, 0, 1);
        assert_eq!(find(&e, 1, 0).ebx >> 16, 1);
        assert!(!e.iter().any(|x| x.function == 0xb));
        assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xff, 0);
        let mut e = vec![
            leaf(0, 0, 0xa, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x7, 0),
        ];
        apply_topology(&mut e, 3, 254);
        assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xff, 253);
    }

    #[test]
    fn core_bits_round_up() {
        for (n, bits) in [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (254, 8)] {
            let mut e = intel_like();
            apply_topology(&mut e, 0, n);
            assert_eq!(find(&e, 0xb, 1).eax, bits, "{n}");
        }
    }

    fn signature(e: &kvm_cpuid_entry2) -> [u8; 12] {
        let mut s = [0u8; 12];
        s[..4].copy_from_slice(&e.ebx.to_le_bytes());
        s[4..8].copy_from_slice(&e.ecx.to_le_bytes());
        s[8..].copy_from_slice(&e.edx.to_le_bytes());
        s
    }

    /// The signatures at every base Linux looks at.
    fn signatures(e: &[kvm_cpuid_entry2]) -> Vec<(u32, [u8; 12])> {
        e.iter()
            .filter(|x| (0x4000_0000..0x4001_0000).contains(&x.function) && x.function & 0xff == 0)
            .map(|x| (x.function, signature(x)))
            .collect()
    }

    /// KVM's supported CPUID: this host's if it has a KVM, else what KVM
    /// reports (its signature and features leaves).
    fn supported() -> Vec<kvm_cpuid_entry2> {
        match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .unwrap()
                .as_slice()
                .to_vec(),
            Err(_) => {
                let mut e = intel_like();
                e.push(leaf(
                    0x4000_0000,
                    0,
                    0x4000_0001,
                    0x4b4d_564b,
                    0x564b_4d56,
                    0x4d,
                ));
                e.push(leaf(0x4000_0001, 0, 0x1234, 0, 0, 0));
                e
            }
        }
    }

    #[test]
    fn kvm_interface_keeps_kvms_signature_at_0x40000000() {
        let e = vcpu_cpuid(&supported(), 1, 2, None);
        assert_eq!(
            signatures(&e),
            vec![(0x4000_0000, cpuid::KVM_SIGNATURE)],
            "KVM's own layout, nothing else"
        );
        assert_eq!(find(&e, 1, 0).ebx >> 24, 1, "the topology applies");
    }

    #[test]
    fn hyperv_interface_has_no_kvm_signature() {
        let p = std::sync::Arc::new(crate::hyperv::Partition::new(crate::hyperv::HvParams {
            vcpus: 2,
            host_cpus: 2,
            tsc_khz: Some(3_000_000),
            tsc_at_start: 0,
            invariant_tsc: false,
            pviommu: true,
            kernel_clock: false,
        }));
        let hook: std::sync::Arc<crate::hooks::CpuidHook> =
            std::sync::Arc::new(move |_, e: &mut Vec<kvm_cpuid_entry2>| p.cpuid(e));
        let e = vcpu_cpuid(&supported(), 0, 2, Some(&*hook));
        assert_eq!(signatures(&e), vec![(0x4000_0000, *b"Microsoft Hv")]);
        assert!(e.iter().all(|x| signature(x) != cpuid::KVM_SIGNATURE));
        assert_eq!(find(&e, 0x4000_0001, 0).eax, cpuid::INTERFACE_EAX);
    }

    #[test]
    fn gdt_descriptors_decode() {
        let cs = segment(GDT_CODE64, SEL_CODE);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.g),
            (0, 0xffff_ffff, 1, 0, 1)
        );
        assert_eq!((cs.type_, cs.present, cs.s, cs.dpl), (0xb, 1, 1, 0));
        let cs32 = segment(GDT_CODE32, SEL_CODE);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let ds = segment(GDT_DATA, SEL_DATA);
        assert_eq!((ds.type_, ds.db, ds.limit), (3, 1, 0xffff_ffff));
        let tr = segment(GDT_TSS, SEL_TSS);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
    }

    #[test]
    fn identity_map_covers_4_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_map(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(boot::PML4_START)).unwrap();
        assert_eq!(pml4, boot::PDPT_START | 3);
        for i in 0..4 {
            let pdpte: u64 = mem
                .read_obj(GuestAddress(boot::PDPT_START + 8 * i))
                .unwrap();
            assert_eq!(pdpte, (boot::PD_START + 4096 * i) | 3);
        }
        let last: u64 = mem
            .read_obj(GuestAddress(boot::PD_START + 4 * 4096 - 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn lapic_lvt_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0700);
        let v = set_delivery_mode(lapic_reg(&l, APIC_LVT0), APIC_MODE_NMI);
        assert_eq!(v, 0x0001_0400);
        set_lapic_reg(&mut l, APIC_LVT1, 0xdead_beef);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0xdead_beef);
    }
}

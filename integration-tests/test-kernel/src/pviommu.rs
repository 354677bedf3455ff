//! The pvIOMMU guest driver: Hyper-V-style discovery through CPUID, the
//! GUEST_OS_ID and HYPERCALL MSRs, and hypercalls through the hypercall
//! page (contract: shared/pviommu-abi.md; types: the pviommu-abi crate).
//!
//! Rep calls: the VMM may slice a rep call; it then points RIP at the
//! stub's restart point (the `nop` before its `out`) with RCX holding the
//! new rep start, so the guest sees one call. The call wrapper therefore declares RCX clobbered, and the typed
//! helpers split a large map into calls of at most 507 reps (one input
//! page) themselves.

use crate::x86;
use pviommu_abi::{
    cpuid, msr, Control, DeviceDomainId, DeviceId, HvStatus, HypercallCode, HypercallMsr,
    HypercallOutput, InputAttachDeviceDomain, InputCreateDeviceDomain, InputDeleteDeviceDomain,
    InputDetachDeviceDomain, InputDeviceDomain, InputMapDeviceGpaPages, InputUnmapDeviceGpaPages,
    MapFlags, ReferenceTscPage, HV_PARTITION_ID_SELF, HYPERCALL_PAGE_CODE, MAP_MAX_REPS_PER_PAGE,
};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

/// CPUs with their own hypercall input/output pages.
pub const MAX_HV_CPUS: usize = 4;
const PAGE: u64 = 4096;

extern "C" {
    static HV_CALL_GUARD: u8;
    static HV_CALL_PAGE: u8;
    static HV_IO_PAGES: u8;
    static HV_TSC_PAGE: u8;
}

/// What CPUID advertises.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub max_leaf: u32,
    /// Leaf 0x40000003 EAX (privileges) and EDX.
    pub privileges: u32,
    pub features_edx: u32,
    /// Leaf 0x40000004 EAX (recommendations).
    pub hints: u32,
    /// Leaf 0x40000005 EAX (most virtual processors).
    pub max_vps: u32,
    /// Leaf 0x40000006 EAX.
    pub hardware: u32,
}

impl Features {
    pub fn hypercall_msrs(&self) -> bool {
        self.privileges & cpuid::FEATURES_EAX_HYPERCALL_MSRS != 0
    }
    pub fn vp_index(&self) -> bool {
        self.privileges & cpuid::FEATURES_EAX_VP_INDEX != 0
    }
    pub fn time_ref_count(&self) -> bool {
        self.privileges & cpuid::FEATURES_EAX_TIME_REF_COUNT != 0
    }
    pub fn reference_tsc(&self) -> bool {
        self.privileges & cpuid::FEATURES_EAX_REFERENCE_TSC != 0
    }
    pub fn frequency_msrs(&self) -> bool {
        self.privileges & cpuid::FEATURES_EAX_FREQUENCY_MSRS != 0
            && self.features_edx & cpuid::FEATURES_EDX_FREQUENCY_MSRS != 0
    }
    pub fn device_domains(&self) -> bool {
        self.features_edx & cpuid::FEATURES_EDX_DEVICE_DOMAINS != 0
    }
    pub fn s1_domains(&self) -> bool {
        self.features_edx & cpuid::FEATURES_EDX_S1_DEVICE_DOMAINS != 0
    }
    pub fn dma_remapping(&self) -> bool {
        self.hardware & cpuid::HARDWARE_EAX_DMA_REMAPPING != 0
    }
}

/// The 12-byte vendor signature of a hypervisor CPUID leaf.
pub fn vendor(leaf: u32) -> [u8; 12] {
    let (_, b, c, d) = x86::cpuid(leaf, 0);
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&b.to_le_bytes());
    v[4..8].copy_from_slice(&c.to_le_bytes());
    v[8..].copy_from_slice(&d.to_le_bytes());
    v
}

/// The first hypervisor leaf base with KVM's signature, where Linux looks
/// for it (every 0x100 from 0x40000000 to 0x40010000).
pub fn kvm_signature_base() -> Option<u32> {
    (0x4000_0000u32..0x4001_0000)
        .step_by(0x100)
        .find(|&base| vendor(base) == cpuid::KVM_SIGNATURE)
}

/// Looks for the Hyper-V interface the contract describes (section 1).
pub fn detect_hyperv() -> Result<Features, &'static str> {
    let hypervisor = x86::cpuid(1, 0).2 & (1 << 31) != 0;
    if !hypervisor {
        return Err("CPUID.1:ECX.hypervisor is clear: no pvIOMMU");
    }
    let (max_leaf, ebx, ecx, edx) = x86::cpuid(cpuid::LEAF_VENDOR, 0);
    if vendor(cpuid::LEAF_VENDOR) == cpuid::KVM_SIGNATURE {
        return Err("the hypervisor is KVM (its signature at 0x40000000): no pvIOMMU");
    }
    if (ebx, ecx, edx) != (cpuid::VENDOR_EBX, cpuid::VENDOR_ECX, cpuid::VENDOR_EDX) {
        return Err("leaf 0x40000000 is not \"Microsoft Hv\": no pvIOMMU");
    }
    if max_leaf < cpuid::MIN_MAX_LEAF {
        return Err("leaf 0x40000000 EAX is below 0x40000006");
    }
    if x86::cpuid(cpuid::LEAF_INTERFACE, 0).0 != cpuid::INTERFACE_EAX {
        return Err("leaf 0x40000001 EAX is not \"Hv#1\"");
    }
    let (privileges, _, _, features_edx) = x86::cpuid(cpuid::LEAF_FEATURES, 0);
    let hints = x86::cpuid(cpuid::LEAF_HINTS, 0).0;
    let max_vps = x86::cpuid(cpuid::LEAF_LIMITS, 0).0;
    let hardware = x86::cpuid(cpuid::LEAF_HARDWARE_FEATURES, 0).0;
    Ok(Features {
        max_leaf,
        privileges,
        features_edx,
        hints,
        max_vps,
        hardware,
    })
}

/// Looks for the pvIOMMU: the Hyper-V interface with the hypercall MSRs,
/// device domains and DMA remapping.
pub fn detect() -> Result<Features, &'static str> {
    let f = detect_hyperv()?;
    if !f.hypercall_msrs() {
        return Err("Hyper-V without the hypercall MSRs (0x40000003 EAX bit 5): no pvIOMMU");
    }
    if !f.device_domains() || !f.dma_remapping() {
        return Err("Hyper-V without the pvIOMMU: no device domains (0x40000003 EDX bit 24) or DMA remapping (0x40000006 EAX bit 4)");
    }
    Ok(f)
}

/// Guest physical address of the page the kernel offers as its reference
/// TSC page.
pub fn tsc_page() -> u64 {
    core::ptr::addr_of!(HV_TSC_PAGE) as u64
}

/// The reference TSC page's header as the VMM left it.
pub fn read_tsc_page() -> ReferenceTscPage {
    let mut bytes = [0u8; core::mem::size_of::<ReferenceTscPage>()];
    for (i, b) in bytes.iter_mut().enumerate() {
        // SAFETY: the kernel's own page (mapped), which the VMM writes: read
        // volatile, a byte at a time.
        *b = unsafe { x86::mmio_read(tsc_page() + i as u64) };
    }
    ReferenceTscPage::read_from_bytes(&bytes).unwrap_or_default()
}

/// Guest physical address of the hypercall page.
pub fn call_page() -> u64 {
    core::ptr::addr_of!(HV_CALL_PAGE) as u64
}

/// The first bytes of the hypercall page (as long as the VMM's stub).
pub fn call_page_code() -> [u8; HYPERCALL_PAGE_CODE.len()] {
    let mut code = [0u8; HYPERCALL_PAGE_CODE.len()];
    for (i, b) in code.iter_mut().enumerate() {
        // SAFETY: the page is the kernel's own (mapped); the VMM may rewrite
        // it, which is why it is read volatile, a byte at a time.
        *b = unsafe { x86::mmio_read(call_page() + i as u64) };
    }
    code
}

/// Bytes at the end of the page before the hypercall page that hold `ud2`:
/// a VMM that restarts a time-sliced call anywhere before the stub (say 2
/// bytes before the page, from a fixed RIP rewind on a KVM that had not
/// advanced RIP) makes the guest fault with #UD, which the test kernel
/// reports, instead of running whatever lies there.
const GUARD_BYTES: u64 = 64;

fn fill_guard() {
    let end = core::ptr::addr_of!(HV_CALL_GUARD) as u64 + PAGE;
    for at in (end - GUARD_BYTES..end).step_by(2) {
        // SAFETY: inside the kernel's own guard page, which nothing else uses.
        unsafe { x86::mmio_write::<u16>(at, u16::from_le_bytes([0x0f, 0x0b])) };
    }
}

/// Sets GUEST_OS_ID and enables the hypercall page; checks the MSR reads
/// back and the VMM's overlay is in place.
pub fn enable(guest_os_id: u64) -> Result<(), &'static str> {
    fill_guard();
    x86::wrmsr(msr::GUEST_OS_ID, guest_os_id);
    if x86::rdmsr(msr::GUEST_OS_ID) != guest_os_id {
        return Err("GUEST_OS_ID does not read back");
    }
    let value = HypercallMsr::new()
        .with_enable(true)
        .with_gpn(call_page() / PAGE);
    x86::wrmsr(msr::HYPERCALL, value.into_bits());
    let back = HypercallMsr::from_bits(x86::rdmsr(msr::HYPERCALL));
    if !back.enable() || back.gpn() != call_page() / PAGE {
        return Err("HYPERCALL MSR does not read back enabled at the page");
    }
    if call_page_code() != HYPERCALL_PAGE_CODE {
        return Err("the hypercall page does not hold `endbr64; nop; out 0xe4, al; ret`");
    }
    Ok(())
}

/// One CPU's hypercall input and output pages.
#[derive(Clone, Copy)]
pub struct Io {
    pub input: u64,
    pub output: u64,
}

impl Io {
    /// The pages of CPU `cpu` (< MAX_HV_CPUS; larger indices share the last).
    pub fn of(cpu: usize) -> Io {
        let base = core::ptr::addr_of!(HV_IO_PAGES) as u64;
        let i = cpu.min(MAX_HV_CPUS - 1) as u64;
        Io {
            input: base + 2 * i * PAGE,
            output: base + (2 * i + 1) * PAGE,
        }
    }

    /// Writes `bytes` at `offset` in the input page (clipped to the page).
    pub fn put(&self, offset: usize, bytes: &[u8]) {
        let len = bytes.len().min((PAGE as usize).saturating_sub(offset));
        // SAFETY: inside this CPU's own input page (mapped, used by nothing
        // else); one string copy, cheap under instruction emulation.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.input + offset as u64) as *mut u8,
                len,
            )
        };
    }

    /// Clears the input page's first `len` bytes.
    pub fn clear(&self, len: usize) {
        // SAFETY: as in `put`.
        unsafe { core::ptr::write_bytes(self.input as *mut u8, 0, len.min(PAGE as usize)) };
    }

    /// Reads a little-endian u64 from the output page.
    pub fn out_u64(&self, offset: u64) -> u64 {
        // SAFETY: inside this CPU's own output page.
        unsafe { x86::phys_read(self.output + offset.min(PAGE - 8)) }
    }
}

/// Issues one hypercall through the page: RCX = control, RDX and R8 as
/// given; returns RAX. The VMM may restart the `out` with a new RCX, hence
/// RCX is clobbered.
pub fn raw_call(control: u64, rdx: u64, r8: u64) -> u64 {
    let rax: u64;
    // SAFETY: the page was enabled (`enable`) and holds the VMM's stub,
    // which changes no register but RAX (and RCX on a restart) and touches
    // only the input/output pages the call names.
    unsafe {
        core::arch::asm!(
            "call {page}",
            page = in(reg) call_page(),
            inout("rcx") control => _,
            in("rdx") rdx,
            in("r8") r8,
            out("rax") rax,
        );
    }
    rax
}

/// A hypercall's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: HvStatus,
    pub reps: u16,
}

impl Outcome {
    pub fn from_rax(rax: u64) -> Outcome {
        let o = HypercallOutput::from_bits(rax);
        Outcome {
            status: o.hv_status(),
            reps: o.reps_completed(),
        }
    }

    pub fn ok(&self) -> bool {
        self.status == HvStatus::SUCCESS
    }
}

/// A status's name for messages.
pub fn status_name(s: HvStatus) -> &'static str {
    s.name().unwrap_or("(undefined status)")
}

/// A simple (non-rep, memory) call: `input` goes to the input page.
pub fn simple(io: &Io, code: HypercallCode, input: &[u8]) -> Outcome {
    io.clear(64);
    io.put(0, input);
    let control = Control::new().with_code(code.0);
    Outcome::from_rax(raw_call(control.into_bits(), io.input, io.output))
}

/// The header of a device domain call for `domain`.
pub fn domain_header(domain: DeviceDomainId) -> InputDeviceDomain {
    InputDeviceDomain::new(domain)
}

/// An S2 domain id.
pub fn s2(id: u32) -> DeviceDomainId {
    DeviceDomainId::with(pviommu_abi::DeviceDomainType::S2, id)
}

/// CREATE_DEVICE_DOMAIN of `domain` (no flags).
pub fn create_domain(io: &Io, domain: DeviceDomainId) -> Outcome {
    let input = InputCreateDeviceDomain {
        device_domain: domain_header(domain),
        create_device_domain_flags: U32::new(0),
    };
    simple(io, HypercallCode::CREATE_DEVICE_DOMAIN, input.as_bytes())
}

/// DELETE_DEVICE_DOMAIN of `domain`.
pub fn delete_domain(io: &Io, domain: DeviceDomainId) -> Outcome {
    let input = InputDeleteDeviceDomain {
        device_domain: domain_header(domain),
    };
    simple(io, HypercallCode::DELETE_DEVICE_DOMAIN, input.as_bytes())
}

/// ATTACH_DEVICE_DOMAIN of `device` to `domain`.
pub fn attach(io: &Io, domain: DeviceDomainId, device: DeviceId) -> Outcome {
    let input = InputAttachDeviceDomain {
        device_domain: domain_header(domain),
        device_id: U64::new(device.into_bits()),
    };
    simple(io, HypercallCode::ATTACH_DEVICE_DOMAIN, input.as_bytes())
}

/// DETACH_DEVICE_DOMAIN of `device` (back to the default domain).
pub fn detach(io: &Io, device: DeviceId) -> Outcome {
    let input = InputDetachDeviceDomain {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        device_id: U64::new(device.into_bits()),
    };
    simple(io, HypercallCode::DETACH_DEVICE_DOMAIN, input.as_bytes())
}

/// Maps `count` consecutive guest pages from `first_gpn` at `iova` in
/// `domain`, in calls of at most 507 reps. On error: the status and the
/// number of pages mapped before the failing one.
pub fn map_pages(
    io: &Io,
    domain: DeviceDomainId,
    iova: u64,
    first_gpn: u64,
    count: u64,
    flags: MapFlags,
) -> Result<(), (HvStatus, u64)> {
    let mut done = 0;
    while done < count {
        let n = (count - done).min(u64::from(MAP_MAX_REPS_PER_PAGE));
        let header = InputMapDeviceGpaPages {
            device_domain: domain_header(domain),
            target_vtl: 0,
            padding: [0; 3],
            map_flags: U32::new(flags.into_bits()),
            target_device_va_base: U64::new(iova + done * PAGE),
        };
        io.put(0, header.as_bytes());
        let mut list = [0u64; MAP_MAX_REPS_PER_PAGE as usize];
        for (i, slot) in list.iter_mut().enumerate().take(n as usize) {
            *slot = (first_gpn + done + i as u64).to_le();
        }
        io.put(40, list[..n as usize].as_bytes());
        let control = Control::new()
            .with_code(HypercallCode::MAP_DEVICE_GPA_PAGES.0)
            .with_rep_count(n as u16);
        let o = Outcome::from_rax(raw_call(control.into_bits(), io.input, io.output));
        if !o.ok() {
            return Err((o.status, done + u64::from(o.reps)));
        }
        if u64::from(o.reps) != n {
            return Err((HvStatus::SUCCESS, done + u64::from(o.reps)));
        }
        done += n;
    }
    Ok(())
}

/// Unmaps `count` pages at `iova` in `domain` (rep calls of at most 4095
/// reps, the rep count field's limit).
pub fn unmap_pages(
    io: &Io,
    domain: DeviceDomainId,
    iova: u64,
    count: u64,
) -> Result<(), (HvStatus, u64)> {
    let mut done = 0;
    while done < count {
        let n = (count - done).min(4095);
        let header = InputUnmapDeviceGpaPages {
            device_domain: domain_header(domain),
            target_device_va_base: U64::new(iova + done * PAGE),
        };
        io.put(0, header.as_bytes());
        let control = Control::new()
            .with_code(HypercallCode::UNMAP_DEVICE_GPA_PAGES.0)
            .with_rep_count(n as u16);
        let o = Outcome::from_rax(raw_call(control.into_bits(), io.input, io.output));
        if !o.ok() || u64::from(o.reps) != n {
            return Err((o.status, done + u64::from(o.reps)));
        }
        done += n;
    }
    Ok(())
}

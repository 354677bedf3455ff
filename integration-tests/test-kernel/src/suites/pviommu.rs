//! pviommu: the pvIOMMU as the guest sees it (contract sections 1-6):
//! discovery, the hypercall page, capabilities, the domain life cycle,
//! maps and unmaps (with rep restarts), flushes, every invalid input the
//! contract names with its status, and hypercalls from two vCPUs at once.
//!
//! First the Hyper-V interface itself: no KVM signature beside it, and the
//! partition reference time (TIME_REF_COUNT, the reference TSC page, the
//! frequency MSRs). Skipped (TAP `# SKIP`, with the reason) when CPUID does
//! not advertise Hyper-V, or Hyper-V without the pvIOMMU, unless
//! `tk.pviommu=1` requires it. Device checks (attach, double attach,
//! delete while attached, detach, device property) need a device the VMM
//! registered with the IOMMU, named by `tk.iommu_dev=BB:DD.F`.

use crate::pviommu::{self as hv, Io, Outcome};
use crate::tap::Msg;
use crate::{diag, fail, smp, x86, Ctx};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use pviommu_abi::{
    msr, Control, DeviceDomainId, DeviceId, FlushListEntry, HvStatus, HypercallCode,
    InputAttachDeviceDomain, InputConfigureDeviceDomain, InputCreateDeviceDomain,
    InputDeleteDeviceDomain, InputDetachDeviceDomain, InputFlushDeviceDomain,
    InputFlushDeviceDomainList, InputGetIommuCapabilities, InputGetLogicalDeviceProperty,
    IommuCapabilities, MapFlags, OverlayPageMsr, HV_PARTITION_ID_SELF,
};
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

/// The guest OS id the kernel reports (any non-zero value is valid).
const GUEST_OS_ID: u64 = 0x8100_0000_0001_0000;
/// IOVA where the tests map.
const IOVA: u64 = 0x1_0000_0000;
/// First guest page the tests map (RAM at 2 MiB; nothing does DMA to it).
const GPN: u64 = 0x200;

/// Result of the suite: Ok(None) ran, Ok(Some(reason)) skipped.
pub fn run(ctx: &Ctx) -> crate::tap::Verdict {
    let required = ctx.arg("tk.pviommu") == Some("1");
    // Wherever the guest may look, no KVM signature: it would win over
    // Hyper-V in Linux's detection (a KVM interface skips below).
    if let (Ok(_), Some(base)) = (hv::detect_hyperv(), hv::kvm_signature_base()) {
        fail!(
            "\"Microsoft Hv\" at 0x40000000 and KVM's signature at {:#x}",
            base
        );
    }
    match hv::detect_hyperv() {
        Ok(f) => reference_time(&f)?,
        Err(e) if required => fail!("tk.pviommu=1 but {}", e),
        Err(e) => return Ok(Some(e)),
    }
    let features = match hv::detect() {
        Ok(f) => f,
        Err(e) if required => fail!("tk.pviommu=1 but {}", e),
        Err(e) => return Ok(Some(e)),
    };
    diag!(
        "pviommu: CPUID max leaf {:#x}, privileges {:#x}, features EDX {:#x}, hints {:#x}, {} VPs, hardware {:#x}",
        features.max_leaf,
        features.privileges,
        features.features_edx,
        features.hints,
        features.max_vps,
        features.hardware
    );
    if features.max_vps < smp::started() as u32 {
        fail!(
            "CPUID 0x40000005 allows {} virtual processors, {} run",
            features.max_vps,
            smp::started()
        );
    }
    if features.vp_index() {
        let vp = crate::x86::rdmsr(pviommu_abi::msr::VP_INDEX);
        if vp != 0 {
            fail!("VP_INDEX on the boot CPU is {}, not 0", vp);
        }
    }

    // Enabling without a guest OS id is ignored.
    crate::x86::wrmsr(pviommu_abi::msr::GUEST_OS_ID, 0);
    crate::x86::wrmsr(pviommu_abi::msr::HYPERCALL, hv::call_page() | 1);
    if crate::x86::rdmsr(pviommu_abi::msr::HYPERCALL) & 1 != 0 {
        fail!("the hypercall page was enabled while GUEST_OS_ID was 0");
    }
    if let Err(e) = hv::enable(GUEST_OS_ID) {
        fail!("{}", e);
    }
    diag!(
        "pviommu: hypercall page at {:#x} holds endbr64; nop; out 0xe4, al; ret",
        hv::call_page()
    );

    let io = Io::of(0);
    capabilities(&io, features.s1_domains())?;
    life_cycle(&io)?;
    // The end of the RAM entry holding the pages the tests map: the next
    // page is not RAM (a hole or the end of memory).
    let gpa = GPN << 12;
    let Some(ram_end) = ctx
        .boot
        .mem()
        .iter()
        .find(|e| e.kind == crate::bootinfo::E820_RAM && e.addr <= gpa && gpa < e.end())
        .map(|e| e.end() & !0xfff)
    else {
        fail!("no RAM entry holds {:#x}", gpa);
    };
    hostile(&io, ram_end)?;
    if let Some(dev) = ctx.arg("tk.iommu_dev") {
        let Some(dev) = parse_bdf(dev) else {
            fail!("tk.iommu_dev={} is not BB:DD.F", dev)
        };
        device(&io, dev)?;
    } else {
        diag!("pviommu: no tk.iommu_dev given: device checks skipped");
    }
    concurrent()?;
    Ok(None)
}

/// TIME_REF_COUNT on another CPU (`reference_time`'s cross-CPU check).
static OTHER_CPU_TIME: AtomicU64 = AtomicU64::new(0);

extern "C" fn read_time_ref_count(_: u64) {
    OTHER_CPU_TIME.store(x86::rdmsr(msr::TIME_REF_COUNT), Ordering::SeqCst);
}

/// Most 100 ns units the TSC page may differ from the MSR read around it.
const PAGE_TOLERANCE: u64 = 100;

/// The partition reference time: TIME_REF_COUNT advances (and agrees
/// across CPUs); the reference TSC page the VMM writes gives the time the
/// MSR gives, and both run at the TSC frequency the MSR reports.
fn reference_time(f: &hv::Features) -> Result<(), Msg> {
    if !f.time_ref_count() {
        fail!("CPUID 0x40000003 EAX bit 1 (TIME_REF_COUNT) is clear");
    }
    let t0 = x86::rdmsr(msr::TIME_REF_COUNT);
    x86::delay_ticks(x86::TSC_PER_MS);
    let t1 = x86::rdmsr(msr::TIME_REF_COUNT);
    if t1 <= t0 {
        fail!("TIME_REF_COUNT did not advance: {} then {}", t0, t1);
    }
    if smp::started() >= 2 {
        let before = x86::rdmsr(msr::TIME_REF_COUNT);
        if !smp::run_on(1, read_time_ref_count, 0) || !smp::wait(1, 10_000) {
            fail!("cpu 1 did not read TIME_REF_COUNT");
        }
        let after = x86::rdmsr(msr::TIME_REF_COUNT);
        let other = OTHER_CPU_TIME.load(Ordering::SeqCst);
        if !(before..=after).contains(&other) {
            fail!(
                "TIME_REF_COUNT on cpu 1 ({}) is not between cpu 0's reads around it ({}, {})",
                other,
                before,
                after
            );
        }
    }
    let across = if smp::started() >= 2 {
        " and agrees across CPUs"
    } else {
        ""
    };
    if !f.reference_tsc() {
        diag!(
            "pviommu: reference time: TIME_REF_COUNT advances{}; no reference TSC page offered",
            across
        );
        return Ok(());
    }
    if !f.frequency_msrs() {
        fail!("a reference TSC page is offered without the frequency MSRs");
    }
    let tsc_hz = x86::rdmsr(msr::TSC_FREQUENCY);
    let apic_hz = x86::rdmsr(msr::APIC_FREQUENCY);
    if tsc_hz <= pviommu_abi::REFERENCE_TIME_HZ || apic_hz == 0 {
        fail!("TSC frequency {} Hz, APIC frequency {} Hz", tsc_hz, apic_hz);
    }
    let page = hv::tsc_page();
    let value = OverlayPageMsr::new().with_enable(true).with_gpn(page >> 12);
    x86::wrmsr(msr::REFERENCE_TSC, value.into_bits());
    if x86::rdmsr(msr::REFERENCE_TSC) != value.into_bits() {
        fail!("REFERENCE_TSC does not read back");
    }
    // The page's time, between two MSR reads. A hypervisor without a
    // stable TSC (KVM without a master clock) marks the page invalid, and
    // readers use the MSR: allowed, and reported.
    let header = hv::read_tsc_page();
    let before = x86::rdmsr(msr::TIME_REF_COUNT);
    let tsc = x86::rdtsc();
    let after = x86::rdmsr(msr::TIME_REF_COUNT);
    let page_time = header.reference_time(tsc);
    if let Some(t) = page_time {
        if t + PAGE_TOLERANCE < before || t > after + PAGE_TOLERANCE {
            fail!(
                "the TSC page says {} (x100 ns), TIME_REF_COUNT {} before and {} after",
                t,
                before,
                after
            );
        }
    }
    // Over 20 ms of TSC ticks at the reported frequency, the reference
    // time advances 200000 units (within 1%).
    let (m0, c0) = (x86::rdmsr(msr::TIME_REF_COUNT), x86::rdtsc());
    x86::delay_ticks(tsc_hz / 50);
    let (m1, c1) = (x86::rdmsr(msr::TIME_REF_COUNT), x86::rdtsc());
    let want = u128::from(c1.wrapping_sub(c0)) * u128::from(pviommu_abi::REFERENCE_TIME_HZ)
        / u128::from(tsc_hz);
    let got = u128::from(m1.wrapping_sub(m0));
    if got.abs_diff(want) > want / 100 + PAGE_TOLERANCE as u128 {
        fail!(
            "TIME_REF_COUNT advanced {} units over TSC ticks worth {} at {} Hz",
            got,
            want,
            tsc_hz
        );
    }
    x86::wrmsr(msr::REFERENCE_TSC, 0);
    match page_time {
        Some(t) => diag!(
            "pviommu: reference time: TIME_REF_COUNT advances{}; TSC page (sequence {}) within {} units of the MSR ({} <= {} <= {}); TSC {} Hz, APIC timer {} Hz",
            across,
            header.tsc_sequence.get(),
            PAGE_TOLERANCE,
            before,
            t,
            after,
            tsc_hz,
            apic_hz
        ),
        None => diag!(
            "pviommu: reference time: TIME_REF_COUNT advances{}; TSC page marked invalid (no stable TSC here: readers use the MSR); TSC {} Hz, APIC timer {} Hz",
            across,
            tsc_hz,
            apic_hz
        ),
    }
    Ok(())
}

pub(crate) fn parse_bdf(s: &str) -> Option<DeviceId> {
    let (bus, rest) = s.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    Some(DeviceId::pci(
        0,
        u8::from_str_radix(bus, 16).ok()?,
        u8::from_str_radix(dev, 16).ok()?,
        u8::from_str_radix(func, 16).ok()?,
    ))
}

/// Checks an outcome against the expected status (and reps, if given).
fn expect(what: &str, got: Outcome, want: HvStatus, reps: Option<u16>) -> Result<(), Msg> {
    if got.status != want || reps.is_some_and(|r| r != got.reps) {
        fail!(
            "{}: got {} reps {}, want {}{}",
            what,
            hv::status_name(got.status),
            got.reps,
            hv::status_name(want),
            if reps.is_some() {
                " with the reps shown in the test"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn create_input(domain: DeviceDomainId, flags: u32) -> InputCreateDeviceDomain {
    InputCreateDeviceDomain {
        device_domain: hv::domain_header(domain),
        create_device_domain_flags: U32::new(flags),
    }
}

fn create(io: &Io, domain: DeviceDomainId) -> Outcome {
    hv::simple(
        io,
        HypercallCode::CREATE_DEVICE_DOMAIN,
        create_input(domain, 0).as_bytes(),
    )
}

fn delete(io: &Io, domain: DeviceDomainId) -> Outcome {
    let input = InputDeleteDeviceDomain {
        device_domain: hv::domain_header(domain),
    };
    hv::simple(io, HypercallCode::DELETE_DEVICE_DOMAIN, input.as_bytes())
}

fn rw() -> MapFlags {
    MapFlags::new().with_readable(true).with_writable(true)
}

fn capabilities(io: &Io, s1: bool) -> Result<(), Msg> {
    let input = InputGetIommuCapabilities {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        reserved: U64::new(0),
    };
    let o = hv::simple(io, HypercallCode::GET_IOMMU_CAPABILITIES, input.as_bytes());
    expect("GET_IOMMU_CAPABILITIES", o, HvStatus::SUCCESS, None)?;
    let word0 = io.out_u64(0);
    let caps = IommuCapabilities::from_bits(io.out_u64(8));
    let pgsizes = io.out_u64(16);
    let iova_width = (word0 >> 48) as u8;
    diag!(
        "pviommu: capabilities {:#x} (present {}, S2 {}, S1 {}), max IOVA width {}, page sizes {:#x}",
        caps.into_bits(),
        caps.present(),
        caps.s2(),
        caps.s1(),
        iova_width,
        pgsizes
    );
    if !caps.present() || !caps.s2() {
        fail!("capabilities lack PRESENT or S2");
    }
    if caps.s1() != s1 {
        fail!(
            "capabilities S1 ({}) disagrees with CPUID ({})",
            caps.s1(),
            s1
        );
    }
    if pgsizes & (1 << 12) == 0 || !(32..=64).contains(&iova_width) {
        fail!(
            "page sizes without 4 KiB or IOVA width {} out of 32..=64",
            iova_width
        );
    }
    Ok(())
}

fn life_cycle(io: &Io) -> Result<(), Msg> {
    let d = hv::s2(1);
    expect("CREATE S2 domain 1", create(io, d), HvStatus::SUCCESS, None)?;
    expect(
        "CREATE domain 1 again",
        create(io, d),
        HvStatus::INVALID_PARAMETER,
        None,
    )?;
    // A full input page: 507 reps, more than the VMM's rep budget may allow
    // in one slice; restarts are invisible.
    if let Err((s, n)) = hv::map_pages(io, d, IOVA, GPN, 507, rw()) {
        fail!("MAP 507 pages: {} after {} pages", hv::status_name(s), n);
    }
    // More than one input page: the driver splits it.
    if let Err((s, n)) = hv::map_pages(io, d, IOVA + (1 << 30), GPN, 1200, rw()) {
        fail!("MAP 1200 pages: {} after {} pages", hv::status_name(s), n);
    }
    match hv::map_pages(io, d, IOVA + 5 * 4096, GPN, 1, rw()) {
        Err((HvStatus::INVALID_PARAMETER, 0)) => {}
        r => fail!(
            "MAP over a mapped IOVA: {:?}, want INVALID_PARAMETER at 0",
            r.err()
        ),
    }
    // Unmapping a sub-range splits the run; the rest stays mapped.
    if let Err((s, n)) = hv::unmap_pages(io, d, IOVA + 100 * 4096, 7) {
        fail!(
            "UNMAP 7 pages inside the run: {} after {}",
            hv::status_name(s),
            n
        );
    }
    match hv::unmap_pages(io, d, IOVA + 100 * 4096, 1) {
        Err((HvStatus::INVALID_PARAMETER, 0)) => {}
        r => fail!(
            "UNMAP of an unmapped page: {:?}, want INVALID_PARAMETER at 0",
            r.err()
        ),
    }
    for (iova, n) in [
        (IOVA, 100),
        (IOVA + 107 * 4096, 400),
        (IOVA + (1 << 30), 1200),
    ] {
        if let Err((s, k)) = hv::unmap_pages(io, d, iova, n) {
            fail!(
                "UNMAP {} pages at {:#x}: {} after {}",
                n,
                iova,
                hv::status_name(s),
                k
            );
        }
    }
    // Flushes.
    let flush = InputFlushDeviceDomain {
        device_domain: hv::domain_header(d),
        flags: U32::new(0),
        reserved: U32::new(0),
    };
    expect(
        "FLUSH_DEVICE_DOMAIN",
        hv::simple(io, HypercallCode::FLUSH_DEVICE_DOMAIN, flush.as_bytes()),
        HvStatus::SUCCESS,
        None,
    )?;
    let entries = [
        FlushListEntry::new()
            .with_page_number(IOVA >> 12)
            .with_page_mask_shift(4),
        FlushListEntry::new()
            .with_page_number((IOVA >> 12) + 64)
            .with_page_mask_shift(0),
    ];
    expect(
        "FLUSH_DEVICE_DOMAIN_LIST (aligned)",
        flush_list(io, d, &entries, 0),
        HvStatus::SUCCESS,
        Some(2),
    )?;
    // A list longer than a small rep budget: restarts are invisible.
    let mut many = [FlushListEntry::new(); 300];
    for (i, e) in many.iter_mut().enumerate() {
        *e = FlushListEntry::new().with_page_number((IOVA >> 12) + i as u64);
    }
    expect(
        "FLUSH_DEVICE_DOMAIN_LIST (300 entries)",
        flush_list(io, d, &many, 0),
        HvStatus::SUCCESS,
        Some(300),
    )?;
    expect("DELETE domain 1", delete(io, d), HvStatus::SUCCESS, None)?;
    expect(
        "DELETE domain 1 again",
        delete(io, d),
        HvStatus::INVALID_PARAMETER,
        None,
    )?;
    diag!("pviommu: create, map 507 and 1200 pages, split unmap, flushes of 2 and 300 entries, delete: as the contract says");
    Ok(())
}

fn flush_list(io: &Io, d: DeviceDomainId, entries: &[FlushListEntry], rep_start: u16) -> Outcome {
    let header = InputFlushDeviceDomainList {
        device_domain: hv::domain_header(d),
        flags: U32::new(0),
        reserved: U32::new(0),
    };
    io.clear(64);
    io.put(0, header.as_bytes());
    for (i, e) in entries.iter().enumerate() {
        io.put(32 + 8 * i, &e.into_bits().to_le_bytes());
    }
    let control = Control::new()
        .with_code(HypercallCode::FLUSH_DEVICE_DOMAIN_LIST.0)
        .with_rep_count(entries.len() as u16)
        .with_rep_start(rep_start);
    Outcome::from_rax(hv::raw_call(control.into_bits(), io.input, io.output))
}

/// Calls CREATE with a raw control word and input GPA.
fn create_raw(io: &Io, control: u64, input: u64, domain: DeviceDomainId) -> Outcome {
    io.clear(64);
    io.put(0, create_input(domain, 0).as_bytes());
    Outcome::from_rax(hv::raw_call(control, input, io.output))
}

fn hostile(io: &Io, ram_end: u64) -> Result<(), Msg> {
    let create_code = Control::new().with_code(HypercallCode::CREATE_DEVICE_DOMAIN.0);
    let d = hv::s2(2);
    let checks = core::cell::Cell::new(0u32);
    let check = |what: &str, got: Outcome, want: HvStatus, reps: Option<u16>| {
        checks.set(checks.get() + 1);
        expect(what, got, want, reps)
    };

    // The control word.
    check(
        "reserved control bits",
        create_raw(io, create_code.into_bits() | 1 << 27, io.input, d),
        HvStatus::INVALID_HYPERCALL_INPUT,
        Some(0),
    )?;
    check(
        "rep count on a simple call",
        create_raw(io, create_code.with_rep_count(1).into_bits(), io.input, d),
        HvStatus::INVALID_HYPERCALL_INPUT,
        Some(0),
    )?;
    check(
        "variable header on a call without one",
        create_raw(
            io,
            create_code.with_variable_header_size(1).into_bits(),
            io.input,
            d,
        ),
        HvStatus::INVALID_HYPERCALL_INPUT,
        Some(0),
    )?;
    check(
        "unknown call code",
        create_raw(
            io,
            Control::new().with_code(0x7777).into_bits(),
            io.input,
            d,
        ),
        HvStatus::INVALID_HYPERCALL_CODE,
        Some(0),
    )?;
    let e = [FlushListEntry::new().with_page_number(IOVA >> 12)];
    check(
        "rep start not below rep count",
        flush_list(io, d, &e, 1),
        HvStatus::INVALID_HYPERCALL_INPUT,
        None,
    )?;
    // Where the input is.
    check(
        "misaligned input",
        create_raw(io, create_code.into_bits(), io.input + 4, d),
        HvStatus::INVALID_ALIGNMENT,
        None,
    )?;
    check(
        "input crossing a page",
        create_raw(io, create_code.into_bits(), io.input + 4096 - 16, d),
        HvStatus::INVALID_ALIGNMENT,
        None,
    )?;
    check(
        "input outside guest RAM",
        create_raw(io, create_code.into_bits(), ram_end, d),
        HvStatus::INVALID_PARAMETER,
        None,
    )?;
    // What the input says.
    let mut bad = create_input(d, 0);
    bad.device_domain.partition_id = U64::new(1);
    check(
        "partition id not SELF",
        hv::simple(io, HypercallCode::CREATE_DEVICE_DOMAIN, bad.as_bytes()),
        HvStatus::INVALID_PARTITION_ID,
        None,
    )?;
    let mut bad = create_input(d, 0);
    bad.device_domain.padding[3] = 1;
    check(
        "non-zero padding",
        hv::simple(io, HypercallCode::CREATE_DEVICE_DOMAIN, bad.as_bytes()),
        HvStatus::INVALID_PARAMETER,
        None,
    )?;
    let bad = create_input(d, 1 << 7);
    check(
        "unknown create flag",
        hv::simple(io, HypercallCode::CREATE_DEVICE_DOMAIN, bad.as_bytes()),
        HvStatus::INVALID_PARAMETER,
        None,
    )?;
    check(
        "CREATE the default domain id",
        create(io, hv::s2(DeviceDomainId::ID_DEFAULT)),
        HvStatus::INVALID_PARAMETER,
        None,
    )?;
    check(
        "CREATE the null domain id",
        create(io, hv::s2(DeviceDomainId::ID_NULL)),
        HvStatus::INVALID_PARAMETER,
        None,
    )?;
    check(
        "DELETE an unknown domain",
        delete(io, hv::s2(77)),
        HvStatus::INVALID_PARAMETER,
        None,
    )?;
    let unknown_dev = DeviceId::pci(0, 0xfe, 0x1f, 7);
    let prop = InputGetLogicalDeviceProperty {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        logical_device_id: U64::new(unknown_dev.into_bits()),
        code: U32::new(pviommu_abi::device_property::PVIOMMU),
        reserved: U32::new(0),
    };
    check(
        "device property of an unknown device",
        hv::simple(
            io,
            HypercallCode::GET_LOGICAL_DEVICE_PROPERTY,
            prop.as_bytes(),
        ),
        HvStatus::INVALID_DEVICE_ID,
        None,
    )?;

    // With a domain.
    check("CREATE S2 domain 2", create(io, d), HvStatus::SUCCESS, None)?;
    let attach = InputAttachDeviceDomain {
        device_domain: hv::domain_header(d),
        device_id: U64::new(unknown_dev.into_bits()),
    };
    check(
        "ATTACH an unknown device",
        hv::simple(io, HypercallCode::ATTACH_DEVICE_DOMAIN, attach.as_bytes()),
        HvStatus::INVALID_DEVICE_ID,
        None,
    )?;
    let configure = InputConfigureDeviceDomain {
        device_domain: hv::domain_header(d),
        settings: pviommu_abi::DeviceDomainSettings {
            flags: U64::new(1),
            page_table_root: U64::new(0x10_0000),
        },
    };
    check(
        "CONFIGURE an S2 domain",
        hv::simple(
            io,
            HypercallCode::CONFIGURE_DEVICE_DOMAIN,
            configure.as_bytes(),
        ),
        HvStatus::INVALID_PARAMETER,
        None,
    )?;
    // MAP: a page outside RAM at rep 3 fails there; reps 0-2 stay mapped.
    match hv::map_pages(io, d, IOVA, (ram_end >> 12) - 3, 6, rw()) {
        Err((HvStatus::INVALID_PARAMETER, 3)) => checks.set(checks.get() + 1),
        r => fail!(
            "MAP with a page outside RAM at rep 3: {:?}, want INVALID_PARAMETER at 3",
            r.err()
        ),
    }
    if let Err((s, n)) = hv::unmap_pages(io, d, IOVA, 3) {
        fail!(
            "UNMAP of the 3 pages mapped before the failure: {} after {}",
            hv::status_name(s),
            n
        );
    }
    match hv::map_pages(io, d, IOVA, GPN, 1, MapFlags::new().with_writable(true)) {
        Err((HvStatus::INVALID_PARAMETER, 0)) => checks.set(checks.get() + 1),
        r => fail!(
            "MAP without READABLE: {:?}, want INVALID_PARAMETER",
            r.err()
        ),
    }
    match hv::map_pages(io, d, 1 << 63, GPN, 1, rw()) {
        Err((HvStatus::INVALID_PARAMETER, 0)) => checks.set(checks.get() + 1),
        r => fail!(
            "MAP past max_iova_width: {:?}, want INVALID_PARAMETER",
            r.err()
        ),
    }
    let misaligned = [FlushListEntry::new()
        .with_page_number((IOVA >> 12) + 1)
        .with_page_mask_shift(1)];
    check(
        "misaligned flush block",
        flush_list(io, d, &misaligned, 0),
        HvStatus::INVALID_PARAMETER,
        Some(0),
    )?;
    check("DELETE S2 domain 2", delete(io, d), HvStatus::SUCCESS, None)?;
    diag!(
        "pviommu: {} invalid inputs refused with their documented status",
        checks.get()
    );
    Ok(())
}

fn device(io: &Io, dev: DeviceId) -> Result<(), Msg> {
    let prop = InputGetLogicalDeviceProperty {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        logical_device_id: U64::new(dev.into_bits()),
        code: U32::new(pviommu_abi::device_property::PVIOMMU),
        reserved: U32::new(0),
    };
    let o = hv::simple(
        io,
        HypercallCode::GET_LOGICAL_DEVICE_PROPERTY,
        prop.as_bytes(),
    );
    expect("device property", o, HvStatus::SUCCESS, None)?;
    if io.out_u64(0) & 1 == 0 {
        fail!("device {} has the pvIOMMU disabled", dev);
    }
    let (a, b) = (hv::s2(10), hv::s2(11));
    let attach = |d: DeviceDomainId| {
        let input = InputAttachDeviceDomain {
            device_domain: hv::domain_header(d),
            device_id: U64::new(dev.into_bits()),
        };
        hv::simple(io, HypercallCode::ATTACH_DEVICE_DOMAIN, input.as_bytes())
    };
    let detach = || {
        let input = InputDetachDeviceDomain {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            device_id: U64::new(dev.into_bits()),
        };
        hv::simple(io, HypercallCode::DETACH_DEVICE_DOMAIN, input.as_bytes())
    };
    expect("CREATE domain 10", create(io, a), HvStatus::SUCCESS, None)?;
    expect("CREATE domain 11", create(io, b), HvStatus::SUCCESS, None)?;
    expect("ATTACH to domain 10", attach(a), HvStatus::SUCCESS, None)?;
    expect(
        "ATTACH to domain 10 again",
        attach(a),
        HvStatus::DEVICE_ALREADY_IN_DOMAIN,
        None,
    )?;
    expect(
        "DELETE domain 10 with the device attached",
        delete(io, a),
        HvStatus::OPERATION_DENIED,
        None,
    )?;
    // ATTACH is a replace: the device moves to domain 11, and domain 10,
    // empty now, can go.
    expect(
        "ATTACH to domain 11 while in 10",
        attach(b),
        HvStatus::SUCCESS,
        None,
    )?;
    expect(
        "DELETE domain 11 with the device attached",
        delete(io, b),
        HvStatus::OPERATION_DENIED,
        None,
    )?;
    expect(
        "DELETE domain 10 after the move",
        delete(io, a),
        HvStatus::SUCCESS,
        None,
    )?;
    expect("DETACH", detach(), HvStatus::SUCCESS, None)?;
    expect("DELETE domain 11", delete(io, b), HvStatus::SUCCESS, None)?;
    diag!("pviommu: device {}: attach, double attach, delete while attached, attach as a replace, detach: as the contract says", dev);
    Ok(())
}

/// Failures counted by `hammer` on every CPU.
static HAMMER_FAILURES: AtomicU32 = AtomicU32::new(0);
const HAMMER_ROUNDS: u32 = 20;

/// Creates, maps, unmaps and deletes its own domain repeatedly.
extern "C" fn hammer(cpu: u64) {
    let io = Io::of(cpu as usize);
    for round in 0..HAMMER_ROUNDS {
        let d = hv::s2(1000 + cpu as u32 * 100 + round);
        let iova = IOVA + (cpu << 32);
        let ok = create(&io, d).ok()
            && hv::map_pages(&io, d, iova, GPN, 64, rw()).is_ok()
            && hv::unmap_pages(&io, d, iova, 64).is_ok()
            && delete(&io, d).ok();
        if !ok {
            HAMMER_FAILURES.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn concurrent() -> Result<(), Msg> {
    if smp::started() < 2 {
        diag!("pviommu: one CPU up (run smp first for the concurrent check): skipped");
        return Ok(());
    }
    HAMMER_FAILURES.store(0, Ordering::SeqCst);
    if !smp::run_on(1, hammer, 1) {
        fail!("cpu 1 did not take the concurrent hypercall work");
    }
    hammer(0);
    if !smp::wait(1, 30_000) {
        fail!("cpu 1 did not finish its hypercalls within 30 s");
    }
    let f = HAMMER_FAILURES.load(Ordering::SeqCst);
    if f != 0 {
        fail!(
            "{} of {} rounds failed with two CPUs issuing hypercalls",
            f,
            2 * HAMMER_ROUNDS
        );
    }
    diag!(
        "pviommu: two CPUs, {} create/map/unmap/delete rounds each at the same time: all succeeded",
        HAMMER_ROUNDS
    );
    Ok(())
}

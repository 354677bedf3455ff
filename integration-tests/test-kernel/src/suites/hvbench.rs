//! hvbench (run only when named in `tk.tests`): the guest-driven pvIOMMU
//! benchmark. Ratios come from one run and one clock (the TSC), so they need
//! no calibration (medians of interleaved rounds): a null hypercall (GET_IOMMU_CAPABILITIES) against a bare
//! port-I/O exit to an unused port (0x80), and a 507-page MAP against a null
//! hypercall; with a TSC frequency (Hyper-V's MSR, or CPUID), pages mapped
//! per second.
//! Reports figures; fails only when a call fails.
//!
//! The null-call figure is split in two, because ring 0 is emulated on the
//! development machines (~250 ns an instruction, memory operands dearer):
//! the same call with the page's `out 0xE4, al` inline (no `call`/`ret`)
//! against the bare exit is what the VMM's hypercall path adds; the rest is
//! the guest's own `call` into the page and `ret`.

use super::{median, ratio};
use crate::pviommu::{self as hv, Io};
use crate::tap::Verdict;
use crate::{diag, fail, x86, Ctx};
use pviommu_abi::{
    HvStatus, HypercallCode, InputGetIommuCapabilities, MapFlags, HV_PARTITION_ID_SELF,
};
use zerocopy::little_endian::U64;
use zerocopy::IntoBytes;

const ROUNDS: u64 = 500;
const MAP_ROUNDS: u64 = 40;
const PAGES: u64 = 507;
const IOVA: u64 = 0x2_0000_0000;
const GPN: u64 = 0x200;

/// TSC kHz: Hyper-V's TSC_FREQUENCY MSR where CPUID offers it, else
/// CPUID leaf 0x15 or 0x16.
fn tsc_khz() -> Option<u64> {
    if hv::detect_hyperv().is_ok_and(|f| f.frequency_msrs()) {
        let hz = x86::rdmsr(pviommu_abi::msr::TSC_FREQUENCY);
        if hz >= 1000 {
            return Some(hz / 1000);
        }
    }
    let max = x86::cpuid(0, 0).0;
    if max >= 0x15 {
        let (den, num, crystal, _) = x86::cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            return Some(u64::from(crystal) * u64::from(num) / u64::from(den) / 1000);
        }
    }
    if max >= 0x16 {
        let mhz = x86::cpuid(0x16, 0).0 & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1000);
        }
    }
    None
}

pub fn run(_ctx: &Ctx) -> Verdict {
    if let Err(e) = hv::detect() {
        return Ok(Some(e));
    }
    if let Err(e) = hv::enable(0x8100_0000_0001_0000) {
        fail!("{}", e);
    }
    let io = Io::of(0);
    let input = InputGetIommuCapabilities {
        partition_id: U64::new(HV_PARTITION_ID_SELF),
        reserved: U64::new(0),
    };
    io.clear(64);
    io.put(0, input.as_bytes());
    let control = pviommu_abi::Control::new().with_code(HypercallCode::GET_IOMMU_CAPABILITIES.0);

    // Interleaved, so that all three see the same machine noise; medians.
    // The inline form is the same call without the page: RCX, RDX and R8
    // loaded as for it, then the page's instruction.
    let mut null_t = [0u64; ROUNDS as usize];
    let mut inline_t = [0u64; ROUNDS as usize];
    let mut pio_t = [0u64; ROUNDS as usize];
    for round in 0..ROUNDS as usize {
        let t0 = x86::rdtsc();
        let rax = hv::raw_call(control.into_bits(), io.input, io.output);
        let t1 = x86::rdtsc();
        let rax_inline: u64;
        // SAFETY: the same exit as the page's `out`, which changes only RAX
        // (and RCX on a rep restart, which a capabilities call never has).
        unsafe {
            core::arch::asm!(
                "out 0xe4, al",
                inout("rcx") control.into_bits() => _,
                in("rdx") io.input,
                in("r8") io.output,
                inout("rax") 0u64 => rax_inline,
                options(nostack),
            );
        }
        let t2 = x86::rdtsc();
        x86::outb(0x80, 0);
        let t3 = x86::rdtsc();
        if hv::Outcome::from_rax(rax).status != HvStatus::SUCCESS
            || hv::Outcome::from_rax(rax_inline).status != HvStatus::SUCCESS
        {
            fail!("GET_IOMMU_CAPABILITIES failed");
        }
        null_t[round] = t1 - t0;
        inline_t[round] = t2 - t1;
        pio_t[round] = t3 - t2;
    }
    let (null, inline, pio) = (
        median(&mut null_t),
        median(&mut inline_t),
        median(&mut pio_t),
    );

    let d = hv::s2(0xbe);
    if !hv::create_domain(&io, d).ok() {
        fail!("CREATE failed");
    }
    let flags = MapFlags::new().with_readable(true).with_writable(true);
    // Time the MAP call alone: the input page is built before the clock
    // starts (building it is guest work, emulated here).
    let map_control = pviommu_abi::Control::new()
        .with_code(HypercallCode::MAP_DEVICE_GPA_PAGES.0)
        .with_rep_count(PAGES as u16);
    let mut map_t = [0u64; MAP_ROUNDS as usize];
    for slot in map_t.iter_mut() {
        let header = pviommu_abi::InputMapDeviceGpaPages {
            device_domain: hv::domain_header(d),
            target_vtl: 0,
            padding: [0; 3],
            map_flags: flags.into_bits().into(),
            target_device_va_base: U64::new(IOVA),
        };
        io.put(0, header.as_bytes());
        let mut list = [0u64; PAGES as usize];
        for (i, slot) in list.iter_mut().enumerate() {
            *slot = (GPN + i as u64).to_le();
        }
        io.put(40, list.as_bytes());
        let t0 = x86::rdtsc();
        let rax = hv::raw_call(map_control.into_bits(), io.input, io.output);
        *slot = x86::rdtsc() - t0;
        let o = hv::Outcome::from_rax(rax);
        if !o.ok() || u64::from(o.reps) != PAGES || hv::unmap_pages(&io, d, IOVA, PAGES).is_err() {
            fail!("MAP/UNMAP of {} pages failed", PAGES);
        }
    }
    let map = median(&mut map_t);
    if !hv::delete_domain(&io, d).ok() {
        fail!("DELETE failed");
    }

    let (a, b) = ratio(null, pio);
    diag!("bench: null hypercall {} TSC ticks, port-I/O exit {} ticks: ratio {}.{:02} (target <= 1.20)", null, pio, a, b);
    let (a, b) = ratio(inline, pio);
    diag!(
        "bench: of which the VMM: the call with the page's `out` inline {} ticks: {}.{:02}x the port-I/O exit; the guest's emulated call/ret into the page {} ticks",
        inline,
        a,
        b,
        null.saturating_sub(inline)
    );
    let (a, b) = ratio(map, null);
    diag!(
        "bench: MAP of {} pages {} ticks: {}.{:02}x a null hypercall (target <= 2.00)",
        PAGES,
        map,
        a,
        b
    );
    match tsc_khz() {
        Some(khz) => diag!(
            "bench: {} pages mapped per second (TSC {} kHz); null hypercall {} ns",
            PAGES * khz * 1000 / map.max(1),
            khz,
            null * 1_000_000 / khz
        ),
        None => diag!("bench: no TSC frequency in CPUID: pages per second not computed"),
    }
    Ok(None)
}

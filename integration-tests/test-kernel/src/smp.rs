//! Application processor start-up: INIT-SIPI-SIPI through the local APIC
//! (xAPIC MMIO or x2APIC MSRs), a real-mode trampoline in a free page below
//! 1 MiB, and a table the APs fill with their APIC ids.

use crate::bootinfo::{BootInfo, E820_RAM};
use crate::{idt, paging, x86};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const MAX_CPUS: usize = 64;
const AP_STACK_SIZE: u64 = 16384;

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const MSR_X2APIC_SVR: u32 = 0x80f;
const MSR_X2APIC_ICR: u32 = 0x830;
const XAPIC_ID: u64 = 0x20;
const XAPIC_SVR: u64 = 0xf0;
const XAPIC_ICR_LO: u64 = 0x300;
const XAPIC_ICR_HI: u64 = 0x310;
const ICR_INIT: u32 = 0x0000_4500; // INIT, level assert
const ICR_STARTUP: u32 = 0x0000_4600; // start-up, level assert
const ICR_BUSY: u32 = 1 << 12;

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static AP_STACKS: u8;
}

/// Top of the stack for the AP being started (read by boot.S ap_long).
#[no_mangle]
static AP_STACK_TOP: AtomicU64 = AtomicU64::new(0);
/// Index of the AP being started (passed to `ap_main`).
#[no_mangle]
static AP_CPU_INDEX: AtomicU64 = AtomicU64::new(0);
/// What each AP reported: APIC id + 1 (0: not yet).
static REPORTED: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// The xAPIC id register as each AP read it, + 1 (0: x2APIC or not read).
static REPORTED_MMIO: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

/// This CPU's APIC id from CPUID (leaf 0xb x2APIC id when present, else
/// leaf 1 EBX[31:24]).
pub fn cpuid_apic_id() -> u32 {
    let (max, ..) = x86::cpuid(0, 0);
    if max >= 0xb {
        let (_, ebx, _, edx) = x86::cpuid(0xb, 0);
        if ebx & 0xffff != 0 {
            return edx;
        }
    }
    x86::cpuid(1, 0).1 >> 24
}

/// The local APIC: xAPIC at an MMIO base, or x2APIC.
#[derive(Clone, Copy)]
pub enum Lapic {
    X2apic,
    Xapic(u64),
}

impl Lapic {
    pub fn current() -> Lapic {
        let base = x86::rdmsr(MSR_APIC_BASE);
        if base & APIC_BASE_X2APIC != 0 {
            Lapic::X2apic
        } else {
            Lapic::Xapic(base & 0x000f_ffff_ffff_f000)
        }
    }

    /// Software-enables the APIC (spurious vector 0xff).
    pub fn enable(self) {
        match self {
            Lapic::X2apic => x86::wrmsr(MSR_X2APIC_SVR, 0x1ff),
            // SAFETY: the APIC page is MMIO inside the identity map (checked
            // by the caller); SVR is a 32-bit aligned register.
            Lapic::Xapic(b) => unsafe { x86::mmio_write::<u32>(b + XAPIC_SVR, 0x1ff) },
        }
    }

    /// The APIC id register (xAPIC only).
    pub fn mmio_id(self) -> Option<u32> {
        match self {
            Lapic::X2apic => None,
            // SAFETY: as in `enable`.
            Lapic::Xapic(b) => Some(unsafe { x86::mmio_read::<u32>(b + XAPIC_ID) } >> 24),
        }
    }

    /// Sends an IPI; false if the xAPIC stays busy.
    pub fn send_ipi(self, dest: u32, icr: u32) -> bool {
        match self {
            Lapic::X2apic => {
                x86::wrmsr(MSR_X2APIC_ICR, (u64::from(dest) << 32) | u64::from(icr));
                true
            }
            Lapic::Xapic(b) => {
                // SAFETY: as in `enable`.
                unsafe {
                    x86::mmio_write::<u32>(b + XAPIC_ICR_HI, dest << 24);
                    x86::mmio_write::<u32>(b + XAPIC_ICR_LO, icr);
                }
                let start = x86::rdtsc();
                // SAFETY: as in `enable`.
                while unsafe { x86::mmio_read::<u32>(b + XAPIC_ICR_LO) } & ICR_BUSY != 0 {
                    if x86::rdtsc().wrapping_sub(start) > 100 * x86::TSC_PER_MS {
                        return false;
                    }
                }
                true
            }
        }
    }
}

/// Picks a free RAM page below 1 MiB for the trampoline: in a RAM entry,
/// not holding boot data or ACPI tables.
pub fn trampoline_page(boot: &BootInfo, avoid: &[(u64, u64)]) -> Option<u64> {
    (0x8000..0x9f000u64)
        .step_by(4096)
        .chain((0x1000..0x8000).step_by(4096))
        .find(|&p| {
            let end = p + 4096;
            boot.mem()
                .iter()
                .any(|e| e.kind == E820_RAM && e.addr <= p && end <= e.end())
                && !boot.overlaps_boot_data(p, end)
                && !avoid.iter().any(|&(s, e)| p < e && s < end)
        })
}

/// Copies the trampoline to `page`; returns its size.
pub fn install_trampoline(page: u64) -> u64 {
    let start = core::ptr::addr_of!(ap_tramp_start) as u64;
    let end = core::ptr::addr_of!(ap_tramp_end) as u64;
    let len = end - start;
    // SAFETY: `page` is free RAM below 1 MiB (identity mapped) chosen by
    // `trampoline_page`; the trampoline is shorter than a page.
    unsafe { core::ptr::copy_nonoverlapping(start as *const u8, page as *mut u8, len as usize) };
    len
}

/// Outcome of starting one AP.
pub enum Started {
    /// Reported this APIC id (and the xAPIC id register, if read), after
    /// this many TSC ticks.
    Yes {
        cpuid_id: u32,
        mmio_id: Option<u32>,
        ticks: u64,
    },
    /// Did not report within the timeout.
    Timeout,
    /// The xAPIC did not accept the IPI.
    IpiFailed,
}

/// Starts the AP with `apic_id` as CPU `index` (1..MAX_CPUS) through the
/// trampoline at `page`, and waits until it reports.
pub fn start_ap(lapic: Lapic, apic_id: u32, index: usize, page: u64) -> Started {
    let stacks = core::ptr::addr_of!(AP_STACKS) as u64;
    AP_STACK_TOP.store(
        stacks + (index as u64 + 1) * AP_STACK_SIZE,
        Ordering::SeqCst,
    );
    AP_CPU_INDEX.store(index as u64, Ordering::SeqCst);
    let vector = u32::try_from(page >> 12).unwrap_or(0) & 0xff;
    let t0 = x86::rdtsc();
    if !lapic.send_ipi(apic_id, ICR_INIT) {
        return Started::IpiFailed;
    }
    // No 10 ms wait after INIT: as Linux does on every CPU since the P6
    // (init_udelay 0), the SIPI follows at once; a virtual CPU takes both in
    // order.
    for attempt in 0..2 {
        if !lapic.send_ipi(apic_id, ICR_STARTUP | vector) {
            return Started::IpiFailed;
        }
        // First SIPI: a short wait, as the protocol asks, then the second;
        // after that, a generous timeout (the trampoline is emulated).
        let limit = if attempt == 0 { 50 } else { 3000 } * x86::TSC_PER_MS;
        let t = x86::rdtsc();
        while x86::rdtsc().wrapping_sub(t) < limit {
            let r = REPORTED[index].load(Ordering::Acquire);
            if r != 0 {
                let m = REPORTED_MMIO[index].load(Ordering::Acquire);
                return Started::Yes {
                    cpuid_id: r - 1,
                    mmio_id: m.checked_sub(1),
                    ticks: x86::rdtsc().wrapping_sub(t0),
                };
            }
            core::hint::spin_loop();
        }
    }
    Started::Timeout
}

/// Whether the xAPIC page is inside the identity map.
pub fn lapic_mapped(lapic: Lapic) -> bool {
    match lapic {
        Lapic::X2apic => true,
        Lapic::Xapic(b) => paging::is_mapped(b, 4096),
    }
}

/// Work for an AP: a function and its argument, posted by the boot CPU.
/// `func` 0 means none; the AP clears it when the work is done.
struct Mailbox {
    func: AtomicU64,
    arg: AtomicU64,
}

static MAILBOX: [Mailbox; MAX_CPUS] = [const {
    Mailbox {
        func: AtomicU64::new(0),
        arg: AtomicU64::new(0),
    }
}; MAX_CPUS];
/// APIC id of each started CPU (index 0: the boot CPU), + 1 (0: none).
static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// EOI target of the wake-up IPI: 0 for x2APIC, else the xAPIC base.
static EOI_BASE: AtomicU64 = AtomicU64::new(0);
const XAPIC_EOI: u64 = 0xb0;
const MSR_X2APIC_EOI: u32 = 0x80b;
/// Fixed-delivery IPI to the wake-up vector.
const ICR_FIXED_WAKE: u32 = idt::IPI_VECTOR as u32 | (1 << 14);

/// Records how this CPU sends EOIs (boot CPU, before starting APs).
pub fn set_eoi(lapic: Lapic) {
    EOI_BASE.store(
        match lapic {
            Lapic::X2apic => 0,
            Lapic::Xapic(b) => b,
        },
        Ordering::Release,
    );
}

/// The wake-up IPI's handler (boot.S isr_ipi): just the EOI; the woken CPU
/// looks at its mailbox.
#[no_mangle]
extern "C" fn ipi_handler() {
    eoi();
}

/// Ends the interrupt being serviced on this CPU's local APIC.
pub fn eoi() {
    match EOI_BASE.load(Ordering::Acquire) {
        0 => x86::wrmsr(MSR_X2APIC_EOI, 0),
        // SAFETY: the xAPIC page is mapped (checked before any AP started).
        b => unsafe { x86::mmio_write::<u32>(b + XAPIC_EOI, 0) },
    }
}

/// Records that CPU `index` (0 = boot CPU) has `apic_id`.
pub fn set_apic_id(index: usize, apic_id: u32) {
    if let Some(slot) = APIC_IDS.get(index) {
        slot.store(apic_id + 1, Ordering::Release);
    }
}

/// How many CPUs are started (the boot CPU included, once smp ran).
pub fn started() -> usize {
    APIC_IDS
        .iter()
        .filter(|a| a.load(Ordering::Acquire) != 0)
        .count()
}

/// Runs `func(arg)` on the started CPU `index` (>= 1): posts it in the
/// CPU's mailbox and wakes it with an IPI. False if the CPU is not started
/// or still busy.
pub fn run_on(index: usize, func: extern "C" fn(u64), arg: u64) -> bool {
    let (Some(mb), Some(id)) = (MAILBOX.get(index), APIC_IDS.get(index)) else {
        return false;
    };
    let Some(apic_id) = id.load(Ordering::Acquire).checked_sub(1) else {
        return false;
    };
    if index == 0 || mb.func.load(Ordering::Acquire) != 0 {
        return false;
    }
    mb.arg.store(arg, Ordering::Relaxed);
    mb.func.store(func as usize as u64, Ordering::Release);
    Lapic::current().send_ipi(apic_id, ICR_FIXED_WAKE)
}

/// Waits until CPU `index` has finished its posted work; false on timeout.
pub fn wait(index: usize, timeout_ms: u64) -> bool {
    let Some(mb) = MAILBOX.get(index) else {
        return false;
    };
    let start = x86::rdtsc();
    while mb.func.load(Ordering::Acquire) != 0 {
        if x86::rdtsc().wrapping_sub(start) > timeout_ms * x86::TSC_PER_MS {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// First Rust code on an AP (boot.S ap_long), on its own stack: reports,
/// then sleeps until woken with work.
#[no_mangle]
extern "C" fn ap_main(index: u64) -> ! {
    idt::load();
    let index = usize::try_from(index).unwrap_or(0).min(MAX_CPUS - 1);
    let lapic = Lapic::current();
    lapic.enable();
    if let Some(id) = lapic.mmio_id() {
        REPORTED_MMIO[index].store(id + 1, Ordering::Release);
    }
    REPORTED[index].store(cpuid_apic_id() + 1, Ordering::Release);
    let mb = &MAILBOX[index];
    loop {
        let f = mb.func.load(Ordering::Acquire);
        if f == 0 {
            // STI's one-instruction shadow makes "sti; hlt" atomic: a wake-up
            // IPI that arrives after the check above still ends the hlt.
            // SAFETY: the IDT handles the wake-up vector; nothing else is
            // routed to this CPU.
            unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
            continue;
        }
        // SAFETY: `run_on` stored a valid `extern "C" fn(u64)`.
        let func: extern "C" fn(u64) = unsafe { core::mem::transmute(f as usize) };
        func(mb.arg.load(Ordering::Relaxed));
        mb.func.store(0, Ordering::Release);
    }
}

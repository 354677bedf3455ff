//! Exception handling: any CPU exception is a test-kernel failure; it is
//! reported as a TAP "Bail out!" with the registers, then the VM powers off.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

extern "C" {
    /// Exception stubs (boot.S), vector 6 being `isr6`, the ring-0 call.
    static ISR_TABLE: [u64; 32];
    static ISR_IPI: u64;
    static ISR_LINE: u64;
}

/// The wake-up IPI's vector.
pub const IPI_VECTOR: usize = 0xf0;
/// The vector the irq suite routes an IOAPIC line to.
pub const LINE_VECTOR: usize = 0xf1;
/// Interrupts taken on [`LINE_VECTOR`].
pub static LINE_INTERRUPTS: AtomicU64 = AtomicU64::new(0);
const VECTORS: usize = 256;

#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; 2 * VECTORS]>);

// SAFETY: written once by the boot CPU before any other CPU starts; read
// only by the CPU (lidt) afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([0; 2 * VECTORS]));

/// The frame isr_common builds: saved registers, vector, error code, then
/// what the CPU pushed.
#[repr(C)]
pub struct Frame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Fills the IDT (boot CPU, once, before anything can fault). The boot CPU
/// has loaded it already ([`load`] in ring 0); this runs in ring 3, where
/// filling it costs native time.
pub fn init() {
    // SAFETY: only the boot CPU runs, and no exception is taken while the
    // entries are written.
    let idt = unsafe { &mut *IDT.0.get() };
    let mut set = |v: usize, handler: u64| {
        // Interrupt gate, DPL 0, kernel code segment.
        idt[2 * v] =
            (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((handler >> 16) & 0xffff) << 48;
        idt[2 * v + 1] = handler >> 32;
    };
    // SAFETY: ISR_TABLE is a constant table in boot.S.
    let table = unsafe { &ISR_TABLE };
    for (v, &handler) in table.iter().enumerate() {
        set(v, handler);
    }
    // SAFETY: ISR_IPI is a constant in boot.S.
    set(IPI_VECTOR, unsafe { ISR_IPI });
    // SAFETY: ISR_LINE is a constant in boot.S.
    set(LINE_VECTOR, unsafe { ISR_LINE });
}

/// Loads the IDT on this CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr {
        limit: (VECTORS * 16 - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT is static and filled by `init` before any exception
    // can be expected.
    unsafe { asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags)) };
}

/// The line interrupt's handler (boot.S isr_line): counts, then EOI.
#[no_mangle]
extern "C" fn line_handler() {
    LINE_INTERRUPTS.fetch_add(1, Ordering::AcqRel);
    crate::smp::eoi();
}

fn name(v: u64) -> &'static str {
    match v {
        0 => "divide error",
        1 => "debug",
        2 => "NMI",
        3 => "breakpoint",
        4 => "overflow",
        5 => "bound range",
        6 => "invalid opcode",
        7 => "device not available",
        8 => "double fault",
        10 => "invalid TSS",
        11 => "segment not present",
        12 => "stack fault",
        13 => "general protection",
        14 => "page fault",
        16 => "x87 error",
        17 => "alignment check",
        18 => "machine check",
        19 => "SIMD error",
        _ => "exception",
    }
}

#[no_mangle]
extern "C" fn exception_handler(f: &Frame) -> ! {
    use core::fmt::Write;
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let mut c = crate::console::Console::force();
    let _ = writeln!(
        c,
        "Bail out! CPU exception {} ({}) error {:#x} at rip {:#x} cr2 {:#x} rsp {:#x}",
        f.vector,
        name(f.vector),
        f.error,
        f.rip,
        cr2,
        f.rsp
    );
    let _ = writeln!(
        c,
        "# rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x} cs {:#x} rflags {:#x} ss {:#x}",
        f.rax, f.rbx, f.rcx, f.rdx, f.rsi, f.rdi, f.rbp, f.cs, f.rflags, f.ss
    );
    let _ = writeln!(
        c,
        "# r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
        f.r8, f.r9, f.r10, f.r11, f.r12, f.r13, f.r14, f.r15
    );
    drop(c);
    crate::shutdown()
}

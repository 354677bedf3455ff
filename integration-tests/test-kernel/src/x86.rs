//! Thin wrappers over the x86 instructions the test kernel needs.
//!
//! Physical memory is identity mapped, so a physical address is also a
//! pointer; `phys_*` read and write it after `paging::is_mapped` says the
//! range is mapped (callers check).

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects the compiler must know about; the
    // kernel owns every device it talks to.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller names an MSR the CPU has (a #GP lands in the
    // exception handler, which reports it); rdmsr touches no memory.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    #[allow(clippy::cast_possible_truncation)]
    let (lo, hi) = (value as u32, (value >> 32) as u32);
    // SAFETY: as in `rdmsr`; the MSRs written (APIC base, hypervisor MSRs) do
    // not change the memory the compiler sees.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") lo, in("edx") hi, options(nostack, preserves_flags))
    }
}

/// CPUID leaf/subleaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Spins for about `ticks` TSC ticks.
pub fn delay_ticks(ticks: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

/// TSC ticks per millisecond assumed for timeouts and delays. The kernel has
/// no timer to calibrate against; 3 GHz is within 2x of any current host, and
/// every wait below is a generous upper bound.
pub const TSC_PER_MS: u64 = 3_000_000;

/// Enables interrupts.
pub fn sti() {
    // SAFETY: every vector that can arrive has an IDT entry (idt::init).
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Disables interrupts.
pub fn cli() {
    // SAFETY: masking interrupts has no memory effects.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt stops this CPU; nothing is left to run on it.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}

/// Reads CR3.
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Writes CR3 (flushes the TLB).
///
/// # Safety
/// `value` must point to valid page tables that keep the running code,
/// stack and data mapped at the same addresses.
pub unsafe fn write_cr3(value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov cr3, {}", in(reg) value, options(nostack, preserves_flags)) }
}

/// Reads a `T` from RAM (identity mapped), at any alignment.
///
/// # Safety
/// `[addr, addr + size_of::<T>())` must be mapped RAM and `T` valid for any
/// bit pattern.
pub unsafe fn phys_read<T: Copy>(addr: u64) -> T {
    // SAFETY: guaranteed by the caller; unaligned reads are allowed.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Views `len` bytes of RAM at `addr` (identity mapped) as a slice.
///
/// # Safety
/// `[addr, addr + len)` must be mapped RAM that nothing writes while the
/// slice lives.
pub unsafe fn phys_bytes(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: guaranteed by the caller; u8 has no alignment or validity needs.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// Reads a `T` from an aligned address with a single access (MMIO, or RAM
/// another CPU writes).
///
/// # Safety
/// `addr` must be mapped and aligned for `T`; the read's side effects (MMIO)
/// are the caller's to want.
pub unsafe fn mmio_read<T: Copy>(addr: u64) -> T {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// Writes a `T` to an aligned address with a single access.
///
/// # Safety
/// `addr` must be mapped and aligned for `T` and must not hold anything the
/// kernel relies on.
pub unsafe fn mmio_write<T: Copy>(addr: u64, value: T) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(addr as *mut T, value) }
}

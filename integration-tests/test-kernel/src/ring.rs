//! Privilege levels: the kernel computes in ring 3 and enters ring 0 only
//! for what needs it.
//!
//! On the development machines ring 0 is emulated instruction by
//! instruction (about 0.25-1 µs each) while ring 3 runs natively. So the
//! boot CPU does the few ring-0 boot steps (console, IDT and task register),
//! then drops to ring 3 ([`enter_user`]) and runs the kernel's main there:
//! parsing the boot information and the ACPI tables, the checks, and the
//! TAP formatting take native time. Port I/O, MSRs, control registers, the
//! local APIC and interrupts need ring 0: [`ring0`] runs a closure there and
//! returns its result (a `ud2` at `kcall_trap`, which the #UD handler in
//! boot.S turns into a call on the boot stack, then returns past it).
//!
//! Ring 3 runs with interrupts off; every page is user-accessible (the
//! kernel does not protect itself from itself, it only wants the speed).
//! The application processors stay in ring 0.

use core::arch::asm;

/// GDT selector of the TSS (boot.S `GDT_TSS`).
const TSS_SELECTOR: u16 = 0x28;

extern "C" {
    /// boot.S: `entry(arg0, arg1)` in ring 3 on the user stack.
    fn enter_user(entry: extern "C" fn(u64, u64) -> !, arg0: u64, arg1: u64) -> !;
    /// boot.S: runs `f(arg)` in ring 0; called from ring 3 only.
    fn kcall(f: extern "C" fn(u64), arg: u64);
    static mut GDT_TSS: [u64; 2];
    static TSS: u8;
    static TSS_END: u8;
}

/// The current privilege level.
pub fn cpl() -> u8 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    (cs & 3) as u8
}

/// Loads the task register with the TSS whose RSP0 is the boot stack
/// (boot CPU, ring 0, once).
pub fn init() {
    let base = core::ptr::addr_of!(TSS) as u64;
    let limit = core::ptr::addr_of!(TSS_END) as u64 - base - 1;
    // Available 64-bit TSS (type 9), present, DPL 0.
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40
        | (limit >> 16 & 0xf) << 48
        | (base >> 24 & 0xff) << 56;
    // SAFETY: only the boot CPU runs; the descriptor slot is reserved for
    // this TSS, which lives as long as the kernel.
    unsafe {
        let gdt = &mut *core::ptr::addr_of_mut!(GDT_TSS);
        gdt[0] = low;
        gdt[1] = base >> 32;
        asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack, preserves_flags));
    }
}

/// Continues in ring 3 with `entry(arg0, arg1)`; the boot stack becomes
/// the ring-0 stack for [`ring0`] calls and exceptions.
pub fn enter(entry: extern "C" fn(u64, u64) -> !, arg0: u64, arg1: u64) -> ! {
    // SAFETY: `init` loaded the TSS and the IDT handles #UD; every page is
    // user-accessible, so ring 3 sees the kernel as ring 0 did.
    unsafe { enter_user(entry, arg0, arg1) }
}

/// Runs `f` in ring 0 and returns its result; calls it directly when
/// already there.
pub fn ring0<F: FnOnce() -> R, R>(f: F) -> R {
    if cpl() == 0 {
        return f();
    }
    struct Call<F, R> {
        f: Option<F>,
        result: Option<R>,
    }
    extern "C" fn trampoline<F: FnOnce() -> R, R>(call: u64) {
        // SAFETY: `call` is the `Call` below, alive until kcall returns;
        // ring 3 does not run while ring 0 uses it.
        let call = unsafe { &mut *(call as *mut Call<F, R>) };
        if let Some(f) = call.f.take() {
            call.result = Some(f());
        }
    }
    let mut call = Call {
        f: Some(f),
        result: None,
    };
    // SAFETY: kcall is entered from ring 3 (checked above); the trampoline
    // matches `call`'s type.
    unsafe { kcall(trampoline::<F, R>, core::ptr::addr_of_mut!(call) as u64) };
    match call.result {
        Some(r) => r,
        None => panic!("ring-0 call did not run"),
    }
}

//! pvmm's test kernel: a small x86-64 guest that checks what the VMM gives
//! it (memory map, command line, CPUs, PCI) and reports TAP on COM1, then
//! powers off through ACPI.
//!
//! Boots through PVH (32-bit entry from the ELF note) or the Linux 64-bit
//! boot protocol (the ELF entry point); both end in [`kmain`]. Ring 0 is
//! emulated instruction by instruction on the development machines
//! (~250 ns-1 µs each), so the kernel runs in ring 3 after a few boot steps
//! and enters ring 0 only for devices, CPUs and interrupts (ring.rs).
//!
//! Command line keys (all optional):
//! - `tk.tests=mem,cmdline,smp,pci,irq,pviommu,dma,demo`: tests to run, in this order (default all)
//! - `tk.mem=<size>`: memory size the VM was given (bytes, or K/M/G suffix)
//! - `tk.echo=<token>`: printed back as `# echo: <token>`
//! - `tk.cpus=<n>`: number of vCPUs expected
//! - `tk.cf8=1`: PCI configuration mechanism #1 (0xcf8/0xcfc) must work
//! - `tk.pviommu=1`: the pvIOMMU must be there (else its test is skipped
//!   when CPUID does not advertise it)
//! - `tk.quiet=1`: test results only, no `#` diagnostics
//! - `tk.iommu_dev=BB:DD.F`: a PCI device the VMM put behind the pvIOMMU,
//!   for the attach/detach checks
//!
//! `tk.tests=hvbench` runs the guest-driven pvIOMMU benchmark,
//! `tk.tests=hvclock` prints the Hyper-V reference time twice,
//! `tk.hvclock_s` seconds apart (the host times the lines), and
//! `tk.tests=hotplug` waits for PCI hotplug events from the API, and
//! `tk.tests=runflood` floods the pvIOMMU with mapping runs (a hostile
//! guest, `tk.runflood_reps` reps at most), and `tk.tests=vmbus` connects
//! to VMBus through the SynIC and times a message round trip (never part of
//! the default set).

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// Failure reasons are formatted into a fixed buffer (no heap), so test
// results carry it by value.
#![allow(clippy::result_large_err)]

mod acpi;
mod bootinfo;
mod console;
mod idt;
mod paging;
mod power;
mod pviommu;
mod ring;
mod rules;
mod smp;
mod suites;
mod tap;
mod x86;

use acpi::Acpi;
use bootinfo::{BootInfo, Protocol, BOOT_LINUX64, BOOT_PVH};
use core::cell::UnsafeCell;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, Ordering};
use tap::{Msg, Tap, Verdict};

core::arch::global_asm!(include_str!("boot.S"), options(att_syntax));

/// What every test gets.
pub struct Ctx<'a> {
    pub boot: &'a BootInfo,
    pub acpi: Result<&'a Acpi, &'static str>,
}

impl Ctx<'_> {
    /// A command line value.
    pub fn arg(&self, key: &str) -> Option<&str> {
        rules::cmdline_arg(self.boot.cmdline(), key)
    }
}

type TestFn = fn(&Ctx) -> Verdict;

/// Where a test runs: checks of memory and tables run in ring 3 (natively)
/// and enter ring 0 for what needs it (smp); tests of devices and
/// interrupts need ring 0 throughout.
#[derive(Clone, Copy, PartialEq)]
enum Ring {
    User,
    Kernel,
}

/// Every test, in the default order.
const TESTS: &[(&str, Ring, TestFn)] = &[
    ("mem", Ring::User, |c| suites::mem::run(c).map(|()| None)),
    ("cmdline", Ring::User, |c| {
        suites::cmdline::run(c).map(|()| None)
    }),
    ("smp", Ring::User, |c| suites::smp::run(c).map(|()| None)),
    ("pci", Ring::Kernel, |c| suites::pci::run(c).map(|()| None)),
    ("irq", Ring::Kernel, |c| suites::irq::run(c).map(|()| None)),
    ("pviommu", Ring::Kernel, suites::pviommu::run),
    ("dma", Ring::Kernel, suites::dma::run),
    ("demo", Ring::Kernel, suites::dma::demo),
];

/// Tests that run only when named (benchmarks).
const ON_REQUEST: &[(&str, Ring, TestFn)] = &[
    ("hvbench", Ring::Kernel, suites::hvbench::run),
    ("hvclock", Ring::Kernel, suites::hvclock::run),
    ("hotplug", Ring::Kernel, suites::hotplug::run),
    ("runflood", Ring::Kernel, suites::runflood::run),
    ("vmbus", Ring::Kernel, suites::vmbus::run),
];

/// The ACPI tables, found once by the boot CPU (poweroff needs them from
/// anywhere, including the exception handler).
struct AcpiCell(UnsafeCell<Option<Acpi>>);
// SAFETY: written once by the boot CPU before ACPI_READY is set; only read
// after that.
unsafe impl Sync for AcpiCell {}
static ACPI: AcpiCell = AcpiCell(UnsafeCell::new(None));
static ACPI_READY: AtomicBool = AtomicBool::new(false);

fn acpi() -> Option<&'static Acpi> {
    if ACPI_READY.load(Ordering::Acquire) {
        // SAFETY: set once before ACPI_READY; never written again.
        unsafe { (*ACPI.0.get()).as_ref() }
    } else {
        None
    }
}

/// Powers off (ACPI, else reset, else halt), from either ring.
pub fn shutdown() -> ! {
    ring::ring0(|| -> () { power::poweroff(acpi()) });
    unreachable!("poweroff returned")
}

/// Called by boot.S on the boot CPU, in long mode with the kernel's own
/// identity map and stack: the ring-0 steps, then ring 3.
#[no_mangle]
extern "C" fn kernel_start(info: u64, kind: u64) -> ! {
    console::init();
    idt::load();
    ring::init();
    ring::enter(user_start, info, kind)
}

/// The kernel proper, in ring 3 from here on.
extern "C" fn user_start(info: u64, kind: u64) -> ! {
    idt::init();
    Tap::version();
    let boot = match kind {
        BOOT_PVH => BootInfo::from_pvh(info),
        BOOT_LINUX64 => BootInfo::from_linux(info),
        _ => Err("unknown entry kind"),
    };
    match boot {
        Ok(b) => kmain(b),
        Err(e) => {
            println!("Bail out! boot information: {}", e);
            shutdown()
        }
    }
}

/// The `# ACPI:` diagnostic: where the tables are.
fn print_acpi(a: &Acpi) {
    let mut c = console::Console::lock();
    let _ = write!(
        c,
        "# ACPI: RSDP at {:#x} (revision {}), {} at {:#x}:",
        a.rsdp,
        a.revision,
        core::str::from_utf8(&a.root_sig).unwrap_or("?"),
        a.root
    );
    for t in a.tables() {
        let _ = write!(
            c,
            " {}@{:#x}",
            core::str::from_utf8(&t.sig).unwrap_or("?"),
            t.addr
        );
    }
    let _ = writeln!(c);
}

/// The kernel proper: both boot paths end here.
fn kmain(boot: BootInfo) -> ! {
    if rules::cmdline_arg(boot.cmdline(), "tk.quiet") == Some("1") {
        tap::QUIET.store(true, Ordering::Relaxed);
    }
    diag!(
        "pvmm test kernel: booted through {} (info at {:#x})",
        match boot.protocol {
            Protocol::Pvh => "PVH (hvm_start_info)",
            Protocol::Linux64 => "the Linux 64-bit boot protocol (boot_params)",
        },
        boot.info_addr
    );
    // The design's premise, checked once: the kernel computes in ring 3 and
    // ring0() really gets to ring 0.
    if ring::cpl() != 3 || ring::ring0(ring::cpl) != 0 {
        println!("Bail out! not in ring 3 with a way into ring 0");
        shutdown()
    }
    let end = boot.ram_end();
    if end > paging::mapped_end() && ring::ring0(|| paging::map_up_to(end)) < end {
        diag!(
            "RAM above {:#x} is not mapped (page-table pool too small)",
            paging::mapped_end()
        );
    }
    let found = match Acpi::discover(boot.rsdp) {
        Ok(a) => {
            if tap::verbose() {
                print_acpi(&a);
            }
            // SAFETY: only the boot CPU runs, and nothing reads ACPI before
            // ACPI_READY is set.
            unsafe { *ACPI.0.get() = Some(a) };
            ACPI_READY.store(true, Ordering::Release);
            acpi().ok_or("ACPI tables lost")
        }
        Err(e) => {
            diag!("ACPI: {}", e);
            Err(e)
        }
    };
    let ctx = Ctx {
        boot: &boot,
        acpi: found,
    };

    // The plan: the selected tests in the order given, unknown names included
    // (they fail), or all of them.
    let mut planned = 0;
    match rules::selected(boot.cmdline()) {
        Some(names) => names.for_each(|_| planned += 1),
        None => planned = TESTS.len() as u32,
    }
    let mut tap = Tap::start(planned);
    let mut run = |name: &str| match TESTS.iter().chain(ON_REQUEST).find(|t| t.0 == name) {
        Some((n, ring, f)) => {
            let v = match ring {
                Ring::User => f(&ctx),
                Ring::Kernel => ring::ring0(|| f(&ctx)),
            };
            tap.report(n, v)
        }
        None => tap.report(
            name,
            Err(Msg::new(format_args!(
                "unknown test (known: mem, cmdline, smp, pci, irq, pviommu, dma, demo)"
            ))),
        ),
    };
    match rules::selected(boot.cmdline()) {
        Some(names) => names.for_each(&mut run),
        None => TESTS.iter().for_each(|t| run(t.0)),
    }
    tap.finish();
    shutdown()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let mut c = console::Console::force();
    let _ = writeln!(c, "Bail out! panic: {}", info);
    drop(c);
    shutdown()
}

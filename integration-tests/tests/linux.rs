//! Linux in pvmm: Debian's 6.12 cloud kernel (see `integration_tests::linux`).
//!
//! Here (kvm_pvm, guest ring 0 emulated) Linux prints its banner and e820
//! map and then stops on an instruction the emulator lacks; a full boot
//! needs a standard KVM. So:
//! - `banner_and_e820` and `bzimage_64_bit_entry` run everywhere;
//! - the full boots to a busybox user space are `#[ignore]`d here and run
//!   on kvm_amd inside the nested harness (tests/nested.rs), which passes
//!   `--include-ignored`: 1, 2 and 4 vCPUs, bzImage and vmlinux (PVH), the
//!   guest's own view of CPUs, RAM, ACPI and PCI, poweroff and reboot, and
//!   Linux's ACPI PCI hotplug of a dma-test device through the API.
//!
//! Linux sees pvmm's default interface, Hyper-V: every full boot checks that
//! Linux detected it (and touched no MSR pvmm lacks), one boots with KVM's
//! interface instead, and two keep time for a minute against this test's
//! clock, one with Hyper-V's clocksource (the reference TSC page where the
//! host has an invariant TSC, else the reference counter MSR), one with
//! kvm-clock.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::api_vm::request;
use integration_tests::linux::{self, fact, facts, Console, USERSPACE};
use integration_tests::{artifacts, run};

/// Emulated ring 0 is slow: the banner takes about 15 s of CPU here.
const BANNER_DEADLINE: Duration = Duration::from_secs(240);
/// A full boot to user space under nested TCG takes about 16 s.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);

fn pvmm() -> PathBuf {
    artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"))
}

fn kernel() -> linux::Kernel {
    linux::debian_kernel().unwrap_or_else(|e| panic!("Debian's 6.12 cloud kernel: {e}"))
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// e820 lines as Linux prints them: (start, end inclusive, type).
fn e820(lines: &[String]) -> Vec<(u64, u64, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.split("BIOS-e820: [mem ").nth(1)?;
            let (range, kind) = rest.split_once("] ")?;
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()?,
                u64::from_str_radix(b.trim_start_matches("0x"), 16).ok()?,
                kind.trim().to_string(),
            ))
        })
        .collect()
}

#[test]
fn banner_and_e820() {
    let k = kernel();
    let _vm = run::vm_lock();
    let memory: u64 = 5 << 30;
    let mut c = Console::start(
        &pvmm(),
        &[
            "--kernel",
            path(&k.vmlinux),
            "--memory",
            "5G",
            "--cpus",
            "2",
            "--cmdline",
            "earlyprintk=serial console=ttyS0",
        ],
    )
    .expect("pvmm starts");
    let r = c.wait_for("bootconsole [earlyser0] enabled", BANNER_DEADLINE);
    let lines = c.seen.clone();
    drop(c);
    let text = lines.join("\n");
    r.unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(
        lines.iter().any(|l| l.contains("Linux version 6.12.")),
        "no Linux banner:\n{text}"
    );
    let map = e820(&lines);
    let usable: u64 = map
        .iter()
        .filter(|e| e.2 == "usable")
        .map(|e| e.1 - e.0 + 1)
        .sum();
    // RAM plus the legacy hole below 1 MiB is what --memory gave.
    assert_eq!(usable + (0x10_0000 - 0x9_fc00), memory, "{text}");
    let want = [
        (0, 0x9_fbff, "usable"),
        (0x9_fc00, 0xf_ffff, "reserved"),
        (0x10_0000, 0xbfff_ffff, "usable"),
        (0xe000_0000, 0xe00f_ffff, "reserved"),
        (0x1_0000_0000, 0x1_7fff_ffff, "usable"),
    ];
    let got: Vec<(u64, u64, &str)> = map.iter().map(|e| (e.0, e.1, e.2.as_str())).collect();
    assert_eq!(got, want, "{text}");
}

/// The bzImage through the Linux 64-bit boot protocol: on VMX/SVM hosts it
/// prints the banner; where KVM emulates ring 0, its decompressor stops on
/// its first BMI2 instruction, well past the entry point (which shows that
/// the entry, page tables and boot_params let it run).
#[test]
fn bzimage_64_bit_entry() {
    let k = kernel();
    let _vm = run::vm_lock();
    let mut c = Console::start(
        &pvmm(),
        &[
            "--kernel",
            path(&k.bzimage),
            "--memory",
            "512M",
            "--cmdline",
            "earlyprintk=serial console=ttyS0",
        ],
    )
    .expect("pvmm starts");
    if c.wait_for("Linux version 6.12.", BANNER_DEADLINE).is_ok() {
        return; // a real boot
    }
    let (code, stderr, _) = c.finish(Duration::from_secs(5));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("KVM emulation failure"), "{stderr}");
    let rip = stderr
        .split("RIP 0x")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_hexdigit()).next())
        .and_then(|r| u64::from_str_radix(r, 16).ok())
        .unwrap_or_else(|| panic!("no RIP in {stderr}"));
    assert!(rip > 0x10_0200, "stopped at the entry point: {stderr}");
}

/// How a full boot enters the kernel.
#[derive(Clone, Copy, Debug)]
enum Image {
    BzImage,
    Pvh,
}

/// The hypervisor interface a boot gives the guest (`--hypervisor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interface {
    HyperV,
    Kvm,
}

impl Interface {
    fn arg(self) -> &'static str {
        match self {
            Interface::HyperV => "hyperv",
            Interface::Kvm => "kvm",
        }
    }

    /// What Linux prints when it detects it.
    fn detected(self) -> &'static str {
        match self {
            Interface::HyperV => "Hypervisor detected: Microsoft Hyper-V",
            Interface::Kvm => "Hypervisor detected: KVM",
        }
    }
}

/// Prints what Linux said about the hypervisor and its clocks, and when it
/// passed a few milestones of its boot.
fn print_clock_lines(lines: &[String]) {
    for l in lines.iter().filter(|l| {
        [
            "Hypervisor detected",
            "Hyper-V",
            "clocksource",
            "tsc:",
            "kvm-clock",
            "RTC",
            "smp: Brought up",
            "PCI host bridge to bus",
            "Freeing unused kernel image",
            "Run /init",
        ]
        .iter()
        .any(|w| l.contains(w))
    }) {
        println!("  {l}");
    }
}

/// Checks that Linux detected `interface`, and on Hyper-V that it touched
/// no MSR pvmm does not serve (Linux reports each #GP of an MSR access).
fn check_interface(interface: Interface, text: &str) {
    assert!(
        text.contains(interface.detected()),
        "no `{}`:\n{text}",
        interface.detected()
    );
    assert!(
        !text.contains("unchecked MSR access error"),
        "Linux touched an MSR pvmm does not serve:\n{text}"
    );
    if interface == Interface::HyperV {
        for kvm in ["Hypervisor detected: KVM", "kvm-clock"] {
            assert!(!text.contains(kvm), "`{kvm}` under Hyper-V:\n{text}");
        }
    }
}

/// The RAM a guest with `memory` bytes (at most 3 GiB) lists as System RAM
/// in /proc/iomem: pvmm's e820 map less Linux's reserved first page.
fn expected_ram(memory: u64) -> u64 {
    (0x9_fc00 - 0x1000) + (memory - 0x10_0000)
}

/// The interface of the four-vCPU boots: KVM's. In the nested harness four
/// L2 vCPUs share L1's two CPUs, and under Hyper-V's interface Linux has no
/// paravirtual spinlocks from pvmm ("Hyper-V: PV spinlocks disabled": they
/// need the guest-idle MSR and IPI hypercalls, which pvmm does not offer),
/// so a preempted lock holder stalls the other vCPUs for whole time slices:
/// measured there, about half of the four-vCPU Hyper-V boots stalled or
/// crashed. KVM's interface has PV spinlocks (PV_UNHALT), which halt a
/// waiter instead of letting it spin.
const FOUR_CPU_INTERFACE: Interface = Interface::Kvm;

/// Boots Linux to the busybox user space of `linux::initramfs` with
/// `cpus` vCPUs, 512 MiB and a dma-test device; checks what the guest saw
/// and that pvmm ends as `end` (poweroff or reboot) says.
fn full_boot(image: Image, cpus: u32, end: &str) {
    full_boot_with(image, cpus, end, Interface::HyperV)
}

/// Runs `f`; in the nested harness (`PVMM_NESTED`), once more if it fails.
/// Nested TCG's SVM sometimes stalls or crashes an L2 guest (or corrupts
/// L1) for reasons of its own, in KVM and Hyper-V mode alike; a failure that
/// repeats is real. Each retry is printed (the CI log shows them), and the
/// first failure's panic message is on stderr.
fn nested_retry<T>(what: &str, f: impl Fn() -> T) -> T {
    if std::env::var_os("PVMM_NESTED").is_none() {
        return f();
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&f)) {
        Ok(v) => v,
        Err(_) => {
            println!("RETRY {what}: failed once under nested TCG; running it again");
            f()
        }
    }
}

fn full_boot_with(image: Image, cpus: u32, end: &str, interface: Interface) {
    nested_retry(
        &format!("{image:?} {cpus} vCPUs {interface:?} {end}"),
        || full_boot_once(image, cpus, end, interface),
    )
}

fn full_boot_once(image: Image, cpus: u32, end: &str, interface: Interface) {
    let k = kernel();
    let initrd = std::env::temp_dir().join(format!(
        "pvmm-linux-{image:?}-{cpus}-{}.cpio",
        std::process::id()
    ));
    linux::initramfs(&initrd, &[]).unwrap_or_else(|e| panic!("initramfs: {e}"));
    let kernel = match image {
        Image::BzImage => &k.bzimage,
        Image::Pvh => &k.vmlinux,
    };
    let memory: u64 = 512 << 20;
    let cmdline = format!("console=ttyS0 panic=-1 pvmm.end={end}");
    let cpus_arg = cpus.to_string();
    let _vm = run::vm_lock();
    let mut c = Console::start(
        &pvmm(),
        &[
            "--kernel",
            path(kernel),
            "--initrd",
            path(&initrd),
            "--memory",
            "512M",
            "--cpus",
            &cpus_arg,
            "--device",
            "dma-test,id=dt0",
            "--hypervisor",
            interface.arg(),
            "--cmdline",
            &cmdline,
        ],
    )
    .expect("pvmm starts");
    let reached = c.wait_for(USERSPACE, BOOT_DEADLINE);
    let boot_time = c.started.elapsed();
    let (code, stderr, lines) = c.finish(Duration::from_secs(120));
    std::fs::remove_file(&initrd).ok();
    let text = lines.join("\n");
    reached.unwrap_or_else(|e| panic!("{e}\n{stderr}\n{text}"));
    println!(
        "Linux ({image:?}, {cpus} vCPUs, {interface:?}) reached user space in {boot_time:.2?}"
    );
    check_interface(interface, &text);
    print_clock_lines(&lines);

    let f = facts(&lines);
    println!("clocksource: {}", fact(&f, "clocksource").unwrap_or("?"));
    // The guest's wall clock (kvm-clock's, or the CMOS RTC's under
    // Hyper-V) is the host's.
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let guest_now: u64 = fact(&f, "time").and_then(|t| t.parse().ok()).unwrap_or(0);
    assert!(
        host_now.abs_diff(guest_now) < 600,
        "the guest's wall clock says {guest_now}, the host's {host_now}\n{text}"
    );
    assert!(
        !text.contains("Unable to read current time from RTC"),
        "{text}"
    );
    assert_eq!(fact(&f, "cpus"), Some(cpus_arg.as_str()), "{text}");
    assert_eq!(
        fact(&f, "ram").and_then(|r| r.parse::<u64>().ok()),
        Some(expected_ram(memory)),
        "System RAM in /proc/iomem\n{text}"
    );
    let acpi = fact(&f, "acpi").unwrap_or_default();
    for table in ["APIC", "DSDT", "FACP", "MCFG"] {
        assert!(acpi.split(',').any(|t| t == table), "no {table}: {acpi}");
    }
    assert!(
        f.iter()
            .any(|(k, v)| k == "pci" && v.contains("0x1234:0x0d7a")),
        "the dma-test device is not on the guest's PCI bus\n{text}"
    );
    let want = match end {
        "reboot" => "pvmm: guest requested reset",
        _ => "pvmm: guest powered off",
    };
    assert_eq!(code, Some(0), "{stderr}\n{text}");
    assert!(stderr.contains(want), "{stderr}");
}

#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn bzimage_boots_to_userspace_1_cpu() {
    full_boot(Image::BzImage, 1, "poweroff");
}

#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn bzimage_boots_to_userspace_2_cpus() {
    full_boot(Image::BzImage, 2, "poweroff");
}

#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn bzimage_boots_to_userspace_4_cpus() {
    full_boot_with(Image::BzImage, 4, "poweroff", FOUR_CPU_INTERFACE);
}

/// Linux's default reboot on hardware-reduced ACPI without EFI ends in a
/// real-mode jump to the reset vector, where pvmm's stub resets the VM.
#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn bzimage_reboot_ends_pvmm_with_the_reset_reason() {
    full_boot(Image::BzImage, 1, "reboot");
}

#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn bzimage_boots_to_userspace_2_cpus_kvm_interface() {
    full_boot_with(Image::BzImage, 2, "poweroff", Interface::Kvm);
}

#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn pvh_boots_to_userspace_1_cpu() {
    full_boot(Image::Pvh, 1, "poweroff");
}

#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn pvh_boots_to_userspace_2_cpus() {
    full_boot(Image::Pvh, 2, "poweroff");
}

#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn pvh_boots_to_userspace_4_cpus() {
    full_boot_with(Image::Pvh, 4, "poweroff", FOUR_CPU_INTERFACE);
}

/// The guest script of the timekeeping tests: switches to the clocksource
/// `pvmm.clocksource=` names (if the guest has it), then prints the guest's monotonic
/// clock (`/proc/timer_list`, ns) and uptime, sleeps `pvmm.sleep=` seconds
/// and prints them again.
const CLOCK_WATCH: &str = r#"
cs=/sys/devices/system/clocksource/clocksource0
for a in $(cat /proc/cmdline); do
    case "$a" in
    pvmm.clocksource=*) want=${a#pvmm.clocksource=} ;;
    pvmm.sleep=*) secs=${a#pvmm.sleep=} ;;
    esac
done
echo "PVMM-CLOCK available $(cat $cs/available_clocksource)"
echo "PVMM-CLOCK default $(cat $cs/current_clocksource)"
case " $(cat $cs/available_clocksource) " in
*" $want "*) echo "$want" >$cs/current_clocksource ;;
esac
now() { echo "$(grep -m1 'now at' /proc/timer_list | tr -dc 0-9) $(cut -d' ' -f1 /proc/uptime)"; }
echo "PVMM-CLOCK t0 $(now) $(cat $cs/current_clocksource)"
sleep "${secs:-60}"
echo "PVMM-CLOCK t1 $(now) $(cat $cs/current_clocksource)"
"#;

/// This machine's TSC (the test's own view, for the timekeeping report).
#[allow(unsafe_code)]
fn host_tsc() -> u64 {
    // SAFETY: RDTSC reads a counter; it has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// This machine's clocksource, as its kernel reports it.
fn host_clocksource() -> String {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Guest time (ns, from its monotonic clock) in a `PVMM-CLOCK tN` line.
fn guest_ns(line: &str) -> Option<u64> {
    line.split("PVMM-CLOCK t")
        .nth(1)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Most drift of the guest's clock against this test's over the minute:
/// measured under nested TCG, both the reference TSC page and kvm-clock
/// stay within a few milliseconds (see the test output), well below this.
const DRIFT_TOLERANCE: Duration = Duration::from_millis(250);
/// How long the guest sleeps between its two readings.
const CLOCK_SECONDS: u64 = 60;

/// What a timekeeping boot saw.
struct Timekeeping {
    /// The clocksource Linux picked.
    default: String,
    /// The one the drift was measured with.
    used: String,
    /// Linux's "Hyper-V: privilege flags low ..." line, if any.
    privileges: String,
}

/// Boots Linux (bzImage, 2 vCPUs) with `interface`, switches to
/// `clocksource` if given and the guest has it, and compares the guest's
/// monotonic clock with this test's over [`CLOCK_SECONDS`].
fn keeps_time(interface: Interface, clocksource: Option<&str>) -> Timekeeping {
    nested_retry(&format!("timekeeping {interface:?}"), || {
        keeps_time_once(interface, clocksource)
    })
}

fn keeps_time_once(interface: Interface, clocksource: Option<&str>) -> Timekeeping {
    let k = kernel();
    let initrd = std::env::temp_dir().join(format!(
        "pvmm-linux-clock-{}-{}.cpio",
        interface.arg(),
        std::process::id()
    ));
    linux::initramfs(&initrd, &[("clock.sh", 0o755, CLOCK_WATCH.as_bytes())])
        .unwrap_or_else(|e| panic!("initramfs: {e}"));
    let mut cmdline =
        format!("console=ttyS0 panic=-1 pvmm.run=clock.sh pvmm.sleep={CLOCK_SECONDS}");
    if let Some(cs) = clocksource {
        cmdline.push_str(&format!(" pvmm.clocksource={cs}"));
    }
    let _vm = run::vm_lock();
    let mut c = Console::start(
        &pvmm(),
        &[
            "--kernel",
            path(&k.bzimage),
            "--initrd",
            path(&initrd),
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--hypervisor",
            interface.arg(),
            "--cmdline",
            &cmdline,
        ],
    )
    .expect("pvmm starts");
    let fail = |c: Console, e: String| -> ! {
        let (code, stderr, lines) = c.finish(Duration::from_secs(5));
        panic!("{e} (pvmm: {code:?})\n{stderr}\n{}", lines.join("\n"))
    };
    let t0 = match c.wait_for("PVMM-CLOCK t0", BOOT_DEADLINE) {
        Ok(l) => (l, Instant::now(), host_tsc()),
        Err(e) => fail(c, e),
    };
    let t1 = match c.wait_for(
        "PVMM-CLOCK t1",
        Duration::from_secs(CLOCK_SECONDS) + Duration::from_secs(60),
    ) {
        Ok(l) => (l, Instant::now(), host_tsc()),
        Err(e) => fail(c, e),
    };
    let (code, stderr, lines) = c.finish(Duration::from_secs(60));
    std::fs::remove_file(&initrd).ok();
    let text = lines.join("\n");
    assert_eq!(code, Some(0), "{stderr}\n{text}");
    check_interface(interface, &text);
    print_clock_lines(&lines);
    let (Some(g0), Some(g1)) = (guest_ns(&t0.0), guest_ns(&t1.0)) else {
        panic!("no guest clock readings:\n{text}")
    };
    let line = |prefix: &str| {
        lines
            .iter()
            .find_map(|l| l.split(prefix).nth(1).map(|r| r.trim().to_string()))
            .unwrap_or_default()
    };
    let default = line("PVMM-CLOCK default ");
    let available = line("PVMM-CLOCK available ");
    let used =
        t1.0.split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string();
    if let Some(cs) = clocksource {
        if available.split_whitespace().any(|a| a == cs) {
            assert_eq!(used, cs, "the clocksource did not switch:\n{text}");
        }
    }
    let guest = Duration::from_nanos(g1.saturating_sub(g0));
    let host = t1.1 - t0.1;
    let drift = guest.as_secs_f64() - host.as_secs_f64();
    println!(
        "{interface:?}: default clocksource {default} (available: {available}); over {:.3} s of \
         this test's clock, the guest's ({used}) advanced {:.3} s: drift {:+.1} ms ({:+.1} ppm)",
        host.as_secs_f64(),
        guest.as_secs_f64(),
        drift * 1e3,
        drift / host.as_secs_f64() * 1e6
    );
    println!(
        "  this machine: clocksource {}, its TSC ran at {:.6} MHz by this test's clock",
        host_clocksource(),
        t1.2.wrapping_sub(t0.2) as f64 / host.as_secs_f64() / 1e6
    );
    assert!(
        drift.abs() < DRIFT_TOLERANCE.as_secs_f64(),
        "the guest's clock drifted {:+.1} ms over {host:.2?}\n{text}",
        drift * 1e3
    );
    Timekeeping {
        default,
        used,
        privileges: line("Hyper-V: privilege flags low "),
    }
}

/// Hyper-V: Linux picks the clocksource pvmm's CPUID leads it to: the raw
/// TSC where pvmm offers TSC_INVARIANT (Linux then rates the reference TSC
/// page below the TSC, by design), the reference TSC page where pvmm offers
/// it alone, and the reference counter MSR where the host has no invariant
/// TSC (no page then: the guest TSC is no timebase there). The drift is
/// measured with the reference TSC page where there is one.
#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn hyperv_bzimage_2_cpus_keeps_time() {
    let t = keeps_time(Interface::HyperV, Some("hyperv_clocksource_tsc_page"));
    // "0x..., high 0x..., hints ..., misc ...".
    let low = t
        .privileges
        .split(',')
        .next()
        .and_then(|v| u32::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("no privilege flags: {:?}", t.privileges));
    const REFERENCE_TSC: u32 = 1 << 9;
    const TSC_INVARIANT: u32 = 1 << 15;
    let (default, used) = if low & TSC_INVARIANT != 0 {
        ("tsc", "hyperv_clocksource_tsc_page")
    } else if low & REFERENCE_TSC != 0 {
        ("hyperv_clocksource_tsc_page", "hyperv_clocksource_tsc_page")
    } else {
        ("hyperv_clocksource_msr", "hyperv_clocksource_msr")
    };
    assert_eq!(
        (t.default.as_str(), t.used.as_str()),
        (default, used),
        "privileges {low:#x}"
    );
}

/// KVM's interface: kvm-clock, keeping time as well.
#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn kvm_bzimage_2_cpus_keeps_time() {
    let t = keeps_time(Interface::Kvm, None);
    assert_eq!(t.default, "kvm-clock");
}

/// The guest script of the hotplug test: reports each PCI function that
/// appears or goes (`PVMM-PCI add|remove BDF VENDOR:DEVICE`) for a minute.
const PCI_WATCH: &str = r#"
list() { for d in /sys/bus/pci/devices/*; do echo "${d##*/} $(cat "$d/vendor"):$(cat "$d/device")"; done; }
old=$(list)
echo PVMM-PCI-WATCH
i=0
while [ $i -lt 1200 ]; do
    new=$(list)
    if [ "$new" != "$old" ]; then
        echo "$old" | while read -r l; do echo "$new" | grep -qx "$l" || echo "PVMM-PCI remove $l"; done
        echo "$new" | while read -r l; do echo "$old" | grep -qx "$l" || echo "PVMM-PCI add $l"; done
        old=$new
    fi
    sleep 0.05
    i=$((i + 1))
done
"#;

/// Linux's own ACPI PCI hotplug (acpiphp) with pvmm's GED and slot AML: a
/// dma-test device added through the API appears in the guest's sysfs, and
/// removing it through the API is answered once Linux ejected it by itself
/// (well before pvmm's forced-removal timeout). Three times.
#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn linux_acpi_hotplug_through_the_api() {
    nested_retry("ACPI hotplug", acpi_hotplug_once);
}

fn acpi_hotplug_once() {
    let k = kernel();
    let dir = std::env::temp_dir();
    let tag = format!("{}", std::process::id());
    let initrd = dir.join(format!("pvmm-linux-hotplug-{tag}.cpio"));
    let socket = dir.join(format!("pvmm-linux-hotplug-{tag}.sock"));
    let _ = std::fs::remove_file(&socket);
    linux::initramfs(&initrd, &[("watch.sh", 0o755, PCI_WATCH.as_bytes())])
        .unwrap_or_else(|e| panic!("initramfs: {e}"));
    let _vm = run::vm_lock();
    let mut c = Console::start(
        &pvmm(),
        &[
            "--kernel",
            path(&k.bzimage),
            "--initrd",
            path(&initrd),
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--api-socket",
            path(&socket),
            "--cmdline",
            "console=ttyS0 panic=-1 pvmm.run=watch.sh pvmm.end=poweroff",
        ],
    )
    .expect("pvmm starts");
    let fail = |c: Console, e: String| -> ! {
        let (code, stderr, lines) = c.finish(Duration::from_secs(5));
        panic!("{e}\npvmm: {code:?}, {stderr}\n{}", lines.join("\n"))
    };
    if let Err(e) = c.wait_for("PVMM-PCI-WATCH", BOOT_DEADLINE) {
        fail(c, e);
    }
    for round in 0..3 {
        let id = format!("hp{round}");
        let body = format!(r#"{{"kind": "dma-test", "id": "{id}"}}"#);
        let (status, answer) = request(&socket, "PUT", "vm.add-device", Some(&body));
        assert_eq!(status, 200, "add-device: {answer}");
        if let Err(e) = c.wait_for("PVMM-PCI add", Duration::from_secs(60)) {
            fail(c, e);
        }
        let added = c.seen.last().cloned().unwrap_or_default();
        assert!(added.contains("0x1234:0x0d7a"), "round {round}: {added}");
        let start = Instant::now();
        let body = format!(r#"{{"id": "{id}"}}"#);
        let (status, answer) = request(&socket, "PUT", "vm.remove-device", Some(&body));
        let took = start.elapsed();
        assert_eq!(status, 204, "remove-device: {answer}");
        if let Err(e) = c.wait_for("PVMM-PCI remove", Duration::from_secs(30)) {
            fail(c, e);
        }
        // pvmm forces a removal the guest ignores after its eject timeout;
        // Linux ejects at once.
        assert!(
            took < vmm::rest::EJECT_TIMEOUT,
            "round {round}: the removal took {took:?}: Linux did not eject"
        );
        println!(
            "round {round}: Linux enumerated and ejected {id}; removal answered in {took:.2?}"
        );
    }
    let (status, _) = request(&socket, "PUT", "vmm.shutdown", None);
    assert_eq!(status, 204);
    let (code, stderr, _) = c.finish(Duration::from_secs(30));
    std::fs::remove_file(&initrd).ok();
    std::fs::remove_file(&socket).ok();
    assert_eq!(code, Some(0), "{stderr}");
}

/// The guest script of the pvIOMMU driver test: Linux's own lines about
/// the pvIOMMU, then a marker; the test then reads pvmm's view over the API.
const HVPV_REPORT: &str = r#"
dmesg | grep -i -E "pvIOMMU|iommu|Hyper-V" | sed 's/^/PVMM-DMESG /'
ls /sys/class/iommu | sed 's/^/PVMM-IOMMU /'
echo PVMM-HVPV-READY
"#;

/// Linux's own Hyper-V pvIOMMU driver (the unmodified v2 series on Linux 7.2,
/// `integration-tests/linux-hv-pviommu`) in pvmm's Hyper-V interface mode:
/// Linux detects Hyper-V, the driver reads the capabilities, creates its
/// static identity and blocking domains (S1, the flags it asks for) and
/// registers the IOMMU; no hypercall of its boot gets an error status.
#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn linux_hyperv_pviommu_driver_starts() {
    nested_retry("the pvIOMMU driver", hyperv_pviommu_driver_once);
}

fn hyperv_pviommu_driver_once() {
    let bzimage = linux::hv_pviommu_kernel().unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir();
    let tag = format!("{}", std::process::id());
    let initrd = dir.join(format!("pvmm-linux-hvpv-{tag}.cpio"));
    let socket = dir.join(format!("pvmm-linux-hvpv-{tag}.sock"));
    let _ = std::fs::remove_file(&socket);
    linux::initramfs(&initrd, &[("report.sh", 0o755, HVPV_REPORT.as_bytes())])
        .unwrap_or_else(|e| panic!("initramfs: {e}"));
    let _vm = run::vm_lock();
    let start = Instant::now();
    let mut c = Console::start(
        &pvmm(),
        &[
            "--kernel",
            path(&bzimage),
            "--initrd",
            path(&initrd),
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--device",
            "dma-test,id=dt0",
            "--api-socket",
            path(&socket),
            "--cmdline",
            "console=ttyS0 panic=-1 pvmm.run=report.sh pvmm.end=wait",
        ],
    )
    .expect("pvmm starts");
    let fail = |c: Console, e: String| -> ! {
        let (code, stderr, lines) = c.finish(Duration::from_secs(5));
        panic!("{e}\npvmm: {code:?}, {stderr}\n{}", lines.join("\n"))
    };
    if let Err(e) = c.wait_for("PVMM-HVPV-READY", BOOT_DEADLINE) {
        fail(c, e);
    }
    println!(
        "Linux 7.2 with the pvIOMMU driver reached user space in {:.2?}",
        start.elapsed()
    );
    let (status, answer) = request(&socket, "GET", "iommu.domains", None);
    let (stop, _) = request(&socket, "PUT", "vmm.shutdown", None);
    let (code, stderr, lines) = c.finish(Duration::from_secs(30));
    std::fs::remove_file(&initrd).ok();
    std::fs::remove_file(&socket).ok();
    let text = lines.join("\n");
    assert_eq!(status, 200, "iommu.domains: {answer}");
    assert_eq!((stop, code), (204, Some(0)), "{stderr}\n{text}");
    for l in lines.iter().filter(|l| l.contains("pvIOMMU")) {
        println!("  {l}");
    }
    check_interface(Interface::HyperV, &text);
    assert!(
        text.contains("Hyper-V pvIOMMU: successfully initialized"),
        "the driver did not start:\n{stderr}\n{text}"
    );
    // By its own name: the kernel also registers IOMMUFD's selftest mock
    // there (CONFIG_IOMMUFD_TEST, for the host-kernel harness).
    assert!(
        lines.iter().any(|l| l.trim_end() == "PVMM-IOMMU hv-iommu"),
        "no hv-iommu in /sys/class/iommu:\n{text}"
    );

    let domains: api::IommuDomainsResponse =
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
    println!("pvmm's view: {answer}");
    // The driver's static domains: one S1 identity domain (translation
    // disabled) and one S1 blocking domain (blocked, no table).
    let s1: Vec<api::S1Settings> = domains
        .domains
        .iter()
        .filter(|d| d.domain_type == api::DomainType::S1)
        .filter_map(|d| d.s1)
        .collect();
    let has = |mode| s1.iter().any(|s| s.mode == mode && s.root == 0);
    assert!(
        has(api::S1Mode::Identity) && has(api::S1Mode::Blocked),
        "no identity and blocking S1 domains: {answer}"
    );
    // Every call of its boot succeeded, and the ones it must make were made.
    let errors: Vec<_> = domains
        .hypercalls
        .iter()
        .filter(|h| h.status != "SUCCESS")
        .collect();
    assert!(errors.is_empty(), "calls that failed: {errors:?}");
    let made = |call: &str| {
        domains
            .hypercalls
            .iter()
            .filter(|h| h.call == call)
            .map(|h| h.count)
            .sum::<u64>()
    };
    assert!(made("GET_IOMMU_CAPABILITIES") >= 1, "{answer}");
    assert!(made("CREATE_DEVICE_DOMAIN") >= 2, "{answer}");
    assert!(made("CONFIGURE_DEVICE_DOMAIN") >= 2, "{answer}");
}

#[test]
fn expected_ram_of_512m() {
    // /proc/iomem: 00001000-0009fbff and 00100000-1fffffff.
    assert_eq!(
        expected_ram(512 << 20),
        (0x9_fbff - 0x1000 + 1) + (0x1fff_ffff - 0x10_0000 + 1)
    );
}

//! The test kernel's Linux 64-bit boot protocol entry, checked without
//! pvmm (which boots it through PVH): a minimal KVM loader in this file
//! loads the ELF with linux-loader, builds boot_params (e820, cmdline), a
//! 1 GiB identity map and a long-mode vCPU like Firecracker does, and runs
//! it, turning COM1 writes into text, until the kernel resets through the
//! i8042 (there are no ACPI tables here, so poweroff falls back to reset).
//!
//! Skipped, with the reason printed, when /dev/kvm cannot be opened.

#![allow(unsafe_code)] // KVM memory slots.

use integration_tests::{artifacts, tap};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::sync::mpsc;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const GDT: u64 = 0x500;
const ZERO_PAGE: u64 = 0x7000;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const CMDLINE: u64 = 0x2_0000;
const EBDA: u64 = 0x9_fc00;

/// How the run ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// i8042 reset (port 0x64 <- 0xfe).
    Reset,
    /// Anything else, with a description.
    Other(String),
}

/// RAM layout: [0, low) and, if `high` > 0, [4 GiB, 4 GiB + high).
fn boot(low: u64, high: u64, cmdline: &str) -> (End, String) {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    vm.set_tss_address(0xfffb_d000).expect("TSS");
    let mut ranges = vec![(GuestAddress(0), usize::try_from(low).expect("fits"))];
    if high > 0 {
        ranges.push((GuestAddress(4 * GIB), usize::try_from(high).expect("fits")));
    }
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ranges).expect("guest RAM");
    for (slot, r) in mem.iter().enumerate() {
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("host address");
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).expect("slot"),
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap of `memory_size` bytes owned by
        // `mem`, which outlives the VM (both dropped at the end of `boot`,
        // the VM's fd first).
        unsafe { vm.set_user_memory_region(region) }.expect("memory slot");
    }

    // Kernel.
    let elf = artifacts::test_kernel().unwrap_or_else(|e| panic!("{e}"));
    let mut f = std::fs::File::open(&elf).expect("open the kernel");
    let loaded = Elf::load(&mem, None, &mut f, Some(GuestAddress(MIB))).expect("load the ELF");

    // boot_params: e820, cmdline; no RSDP (the kernel scans and finds none).
    let mut zp = vec![0u8; 4096];
    let mut e820 = vec![(0, EBDA, 1u32), (EBDA, MIB - EBDA, 2), (MIB, low - MIB, 1)];
    if high > 0 {
        e820.push((4 * GIB, high, 1));
    }
    zp[0x1e8] = u8::try_from(e820.len()).expect("entries");
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        let o = 0x2d0 + i * 20;
        zp[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        zp[o + 8..o + 16].copy_from_slice(&size.to_le_bytes());
        zp[o + 16..o + 20].copy_from_slice(&kind.to_le_bytes());
    }
    zp[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    zp[0x202..0x206].copy_from_slice(b"HdrS");
    zp[0x228..0x22c].copy_from_slice(&u32::try_from(CMDLINE).expect("fits").to_le_bytes());
    mem.write_slice(&zp, GuestAddress(ZERO_PAGE))
        .expect("zero page");
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(CMDLINE)).expect("cmdline");

    // GDT and a 1 GiB identity map with 2 MiB pages, as Firecracker builds.
    for (i, d) in [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
        .iter()
        .enumerate()
    {
        mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64))
            .expect("GDT");
    }
    mem.write_obj(PDPT | 3, GuestAddress(PML4)).expect("PML4");
    mem.write_obj(PD | 3, GuestAddress(PDPT)).expect("PDPT");
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))
            .expect("PD");
    }

    let mut vcpu = vm.create_vcpu(0).expect("vCPU");
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("CPUID");
    vcpu.set_cpuid2(&cpuid).expect("set CPUID");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x08, 0xb, 1, 0);
    let data = seg(0x10, 0x3, 0, 1);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.cr3 = PML4;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x8000_0001; // PG | PE
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = loaded.kernel_load.0;
    regs.rsi = ZERO_PAGE;
    regs.rsp = 0x8ff0;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("set regs");

    // Run in a thread so that a hung guest fails the test on a timeout.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut serial = Vec::new();
        let mut dlab = false; // LCR bit 7: 0x3f8 is the divisor latch
        let end = loop {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(0x3fb, d)) => dlab = d.first().is_some_and(|l| l & 0x80 != 0),
                Ok(VcpuExit::IoOut(0x3f8, d)) if !dlab => serial.extend_from_slice(d),
                Ok(VcpuExit::IoOut(0x64, [0xfe])) => break End::Reset,
                Ok(VcpuExit::IoOut(..)) => {}
                Ok(VcpuExit::IoIn(0x3fd, d)) => d.fill(0x60), // LSR: transmitter empty
                Ok(VcpuExit::IoIn(_, d)) => d.fill(0xff),
                Ok(VcpuExit::MmioRead(_, d)) => d.fill(0xff),
                Ok(VcpuExit::MmioWrite(..)) => {}
                Ok(e) => break End::Other(format!("{e:?}")),
                Err(e) => break End::Other(format!("KVM_RUN: {e}")),
            }
        };
        let _ = tx.send((end, String::from_utf8_lossy(&serial).into_owned()));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the guest ended within 60 s")
}

fn check(low: u64, high: u64, mem: &str) {
    if !artifacts::require_kvm() {
        return;
    }
    let token = artifacts::random_token();
    let cmdline = format!("tk.tests=mem,cmdline tk.mem={mem} tk.echo={token}");
    let (end, out) = {
        let _vm = integration_tests::run::vm_lock();
        boot(low, high, &cmdline)
    };
    assert_eq!(end, End::Reset, "{out}");
    let r = tap::parse(&out);
    r.expect_all_ok(&["mem", "cmdline"])
        .unwrap_or_else(|p| panic!("{p}\n{out}"));
    assert!(
        r.diagnostics
            .iter()
            .any(|d| d.contains("booted through the Linux 64-bit boot protocol")),
        "{out}"
    );
    assert_eq!(r.diagnostic("cmdline: "), Some(cmdline.as_str()));
    assert_eq!(r.diagnostic("echo: "), Some(token.as_str()));
    assert!(
        r.diagnostics
            .iter()
            .any(|d| d.starts_with("poweroff: resetting through the i8042")),
        "{out}"
    );
}

#[test]
fn linux64_entry_128m() {
    check(128 * MIB, 0, "128M");
}

/// RAM above 4 GiB, beyond the loader's 1 GiB map: the kernel's own page
/// tables reach it.
#[test]
fn linux64_entry_ram_above_4g() {
    check(256 * MIB, 512 * MIB, "768M");
}

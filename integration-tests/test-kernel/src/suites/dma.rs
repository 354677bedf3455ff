//! dma and demo: the pvIOMMU seen through a real device. The dma-test PCI
//! device (found by scanning bus 0 for its vendor and device id) copies,
//! fills and checksums through its IOMMU domain:
//!
//! - dma: the default domain (IOVA = GPA); the null domain (everything
//!   faults) and detach (back to the default); S2 (map, DMA, unmap, DMA
//!   faults exactly at the unmapped page); a 507-page map (more than a small
//!   rep budget: restarts are invisible) used at its last page; S1 (the
//!   guest builds x86-64 page tables; a PTE changed without a flush keeps
//!   the stale translation, FLUSH_DEVICE_DOMAIN_LIST brings the new one, a
//!   full flush too).
//! - demo: a short readable account of the same for `pvmm` without
//!   arguments.
//!
//! Both are skipped (TAP SKIP) without the pvIOMMU or the device. Scratch
//! RAM: 48 MiB and up (needs 64 MiB of RAM).

#[allow(dead_code)]
#[path = "../../../../devices/src/dma_test/regs.rs"]
mod regs;

use crate::pviommu::{self as hv, Io, Outcome};
use crate::tap::{Msg, Verdict};
use crate::{diag, fail, x86, Ctx};
use pviommu_abi::{
    DeviceDomainId, DeviceDomainType, DeviceId, FlushListEntry, HypercallCode,
    InputConfigureDeviceDomain, InputFlushDeviceDomain, InputFlushDeviceDomainList, MapFlags,
};
use regs::{command, fault, offset, status};
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

const PAGE: u64 = 4096;
/// Scratch RAM for DMA buffers and S1 tables.
const SCRATCH: u64 = 0x300_0000;
const GUEST_OS_ID: u64 = 0x8100_0000_0001_0000;

/// The dma-test device.
struct Dev {
    bar: u64,
    id: DeviceId,
    slot: u8,
}

impl Dev {
    fn w32(&self, off: u64, v: u32) {
        // SAFETY: BAR 0 of the device (below 4 GiB: identity mapped).
        unsafe { x86::mmio_write::<u32>(self.bar + off, v) }
    }
    fn w64(&self, off: u64, v: u64) {
        // SAFETY: as in w32.
        unsafe { x86::mmio_write::<u64>(self.bar + off, v) }
    }
    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as in w32.
        unsafe { x86::mmio_read::<u32>(self.bar + off) }
    }
    fn r64(&self, off: u64) -> u64 {
        // SAFETY: as in w32.
        unsafe { x86::mmio_read::<u64>(self.bar + off) }
    }
    /// Runs a command; returns the status.
    fn cmd(&self, cmd: u32, src: u64, dst: u64, len: u32) -> u32 {
        self.w64(offset::SRC_IOVA, src);
        self.w64(offset::DST_IOVA, dst);
        self.w32(offset::LEN, len);
        self.w32(offset::COMMAND, cmd);
        self.r32(offset::STATUS)
    }
    fn checksum(&self, iova: u64, len: u32) -> Result<u64, u32> {
        match self.cmd(command::CHECKSUM, iova, 0, len) {
            status::DONE => Ok(self.r64(offset::RESULT)),
            s => Err(s),
        }
    }
    fn fault(&self) -> (u64, u32) {
        (self.r64(offset::FAULT_IOVA), self.r32(offset::FAULT_REASON))
    }
}

/// Finds the device on bus 0 (ECAM from the MCFG) and enables it.
fn find(ctx: &Ctx) -> Option<Dev> {
    let acpi = ctx.acpi.ok()?;
    let mut ecam = None;
    crate::rules::parse_mcfg(acpi.find(b"MCFG")?.bytes(), |e| {
        if e.segment == 0 && e.bus_start == 0 && ecam.is_none() {
            ecam = Some(e.base);
        }
    });
    let ecam = ecam?;
    if !crate::paging::is_mapped(ecam, 1 << 20) {
        return None;
    }
    let want = u32::from(regs::VENDOR_ID) | u32::from(regs::DEVICE_ID) << 16;
    for slot in 0..32u8 {
        let cfg = ecam + (u64::from(slot) << 15);
        // SAFETY: bus 0's ECAM is mapped (checked above).
        if unsafe { x86::mmio_read::<u32>(cfg) } != want {
            continue;
        }
        // SAFETY: as above; BAR 0 and the command register.
        let bar = u64::from(unsafe { x86::mmio_read::<u32>(cfg + 0x10) } & !0xf);
        if bar == 0 || !crate::paging::is_mapped(bar, regs::BAR_SIZE) {
            return None;
        }
        // SAFETY: as above: memory decoding and bus mastering on.
        unsafe { x86::mmio_write::<u16>(cfg + 4, 0x6) };
        return Some(Dev {
            bar,
            id: DeviceId::pci(0, 0, slot, 0),
            slot,
        });
    }
    None
}

/// Common start: pvIOMMU, scratch RAM, device; `Err(Ok(reason))` skips.
fn setup(ctx: &Ctx) -> Result<(Dev, Io), Verdict> {
    let required = ctx.arg("tk.pviommu") == Some("1");
    if let Err(e) = hv::detect() {
        return Err(if required {
            Err(Msg::new(format_args!("tk.pviommu=1 but {}", e)))
        } else {
            Ok(Some(e))
        });
    }
    if let Err(e) = hv::enable(GUEST_OS_ID) {
        return Err(Err(Msg::new(format_args!("{}", e))));
    }
    let ram = ctx.boot.mem().iter().any(|e| {
        e.kind == crate::bootinfo::E820_RAM && e.addr <= SCRATCH && SCRATCH + (1 << 24) <= e.end()
    });
    if !ram {
        return Err(Ok(Some("no RAM at 48-64 MiB for DMA buffers")));
    }
    match find(ctx) {
        Some(d) => Ok((d, Io::of(0))),
        None => Err(Ok(Some("no dma-test device on bus 0"))),
    }
}

fn fill(gpa: u64, byte: u8, len: u64) {
    // SAFETY: scratch RAM (checked present, identity mapped), the kernel's
    // own; one string store.
    unsafe { core::ptr::write_bytes(gpa as *mut u8, byte, len as usize) }
}

fn byte_at(gpa: u64) -> u8 {
    // SAFETY: scratch RAM, the device wrote it before the status read.
    unsafe { x86::mmio_read::<u8>(gpa) }
}

fn rw() -> MapFlags {
    MapFlags::new().with_readable(true).with_writable(true)
}

fn expect_ok(what: &str, o: Outcome) -> Result<(), Msg> {
    if !o.ok() {
        fail!("{}: {}", what, hv::status_name(o.status));
    }
    Ok(())
}

fn create(io: &Io, d: DeviceDomainId) -> Outcome {
    hv::create_domain(io, d)
}

fn delete(io: &Io, d: DeviceDomainId) -> Outcome {
    hv::delete_domain(io, d)
}

fn attach(io: &Io, d: DeviceDomainId, dev: &Dev) -> Outcome {
    hv::attach(io, d, dev.id)
}

fn detach(io: &Io, dev: &Dev) -> Outcome {
    hv::detach(io, dev.id)
}

fn flush_all(io: &Io, d: DeviceDomainId) -> Outcome {
    let input = InputFlushDeviceDomain {
        device_domain: hv::domain_header(d),
        flags: U32::new(0),
        reserved: U32::new(0),
    };
    hv::simple(io, HypercallCode::FLUSH_DEVICE_DOMAIN, input.as_bytes())
}

fn flush_page(io: &Io, d: DeviceDomainId, iova: u64) -> Outcome {
    let header = InputFlushDeviceDomainList {
        device_domain: hv::domain_header(d),
        flags: U32::new(0),
        reserved: U32::new(0),
    };
    io.clear(64);
    io.put(0, header.as_bytes());
    let e = FlushListEntry::new().with_page_number(iova >> 12);
    io.put(32, &e.into_bits().to_le_bytes());
    let control = pviommu_abi::Control::new()
        .with_code(HypercallCode::FLUSH_DEVICE_DOMAIN_LIST.0)
        .with_rep_count(1);
    Outcome::from_rax(hv::raw_call(control.into_bits(), io.input, io.output))
}

/// Expects a fault of `reason` at `iova`.
fn expect_fault(dev: &Dev, what: &str, got: u32, iova: u64, reason: u32) -> Result<(), Msg> {
    let (at, why) = dev.fault();
    if got != status::FAULT || at != iova || why & 0xff != reason {
        fail!(
            "{}: status {} fault at {:#x} ({}), want a fault at {:#x} ({})",
            what,
            got,
            at,
            fault::name(why),
            iova,
            fault::name(reason)
        );
    }
    Ok(())
}

pub fn run(ctx: &Ctx) -> Verdict {
    let (dev, io) = match setup(ctx) {
        Ok(x) => x,
        Err(v) => return v,
    };
    let (a, b) = (SCRATCH, SCRATCH + 0x10_0000);

    // Default domain: IOVA = GPA.
    fill(a, 0x5a, PAGE);
    fill(b, 0, PAGE);
    let s = dev.cmd(command::COPY, a, b, PAGE as u32);
    if s != status::DONE || byte_at(b) != 0x5a || byte_at(b + PAGE - 1) != 0x5a {
        fail!(
            "default domain: copy GPA {:#x} -> {:#x}: status {}",
            a,
            b,
            s
        );
    }

    // Null domain, then detach.
    let null = DeviceDomainId::with(DeviceDomainType::S2, DeviceDomainId::ID_NULL);
    expect_ok("ATTACH to the null domain", attach(&io, null, &dev))?;
    let s = dev.cmd(command::COPY, a, b, 64);
    expect_fault(&dev, "null domain copy", s, a, fault::BLOCKED)?;
    expect_ok("DETACH from the null domain", detach(&io, &dev))?;
    if dev.checksum(a, 64) != Ok(64 * 0x5a) {
        fail!("after DETACH the device is not back in the default domain");
    }
    diag!("dma: default domain is GPA; null domain blocks; DETACH returns to the default");

    // S2.
    let d = hv::s2(20);
    expect_ok("CREATE S2 domain 20", create(&io, d))?;
    expect_ok("ATTACH to domain 20", attach(&io, d, &dev))?;
    let iova = 0x10_0000;
    if let Err((s, n)) = hv::map_pages(&io, d, iova, a >> 12, 16, rw()) {
        fail!("MAP 16 pages: {} after {}", hv::status_name(s), n);
    }
    fill(a + 8 * PAGE, 0, PAGE);
    if dev.cmd(command::COPY, iova, iova + 8 * PAGE, PAGE as u32) != status::DONE
        || byte_at(a + 8 * PAGE + 100) != 0x5a
    {
        fail!("S2 copy IOVA {:#x} -> {:#x} failed", iova, iova + 8 * PAGE);
    }
    // GPA outside the mapping is not reachable by its GPA.
    let s = dev.cmd(command::CHECKSUM, a, 0, 64);
    expect_fault(&dev, "S2 access by GPA", s, a, fault::NOT_MAPPED)?;
    if let Err((s, n)) = hv::unmap_pages(&io, d, iova + 8 * PAGE, 1) {
        fail!("UNMAP 1 page: {} after {}", hv::status_name(s), n);
    }
    let s = dev.cmd(
        command::COPY,
        iova + 7 * PAGE,
        iova + 7 * PAGE + 64,
        2 * PAGE as u32,
    );
    expect_fault(
        &dev,
        "copy over the unmapped page",
        s,
        iova + 8 * PAGE,
        fault::NOT_MAPPED,
    )?;
    // A full input page of reps (the VMM may slice it: invisible here).
    let big = 0x4000_0000;
    if let Err((s, n)) = hv::map_pages(&io, d, big, b >> 12, 507, rw()) {
        fail!("MAP 507 pages: {} after {}", hv::status_name(s), n);
    }
    fill(b + 506 * PAGE, 0x33, PAGE);
    if dev.checksum(big + 506 * PAGE, PAGE as u32) != Ok(PAGE * 0x33) {
        fail!("the last page of a 507-page map does not reach its GPA");
    }
    for (at, n) in [(iova, 8), (iova + 9 * PAGE, 7), (big, 507)] {
        if let Err((s, k)) = hv::unmap_pages(&io, d, at, n) {
            fail!(
                "UNMAP {} at {:#x}: {} after {}",
                n,
                at,
                hv::status_name(s),
                k
            );
        }
    }
    expect_ok("DETACH from domain 20", detach(&io, &dev))?;
    expect_ok("DELETE domain 20", delete(&io, d))?;
    diag!("dma: S2 map, DMA, unmap, DMA faults at the unmapped page; 507-page map used at its last page");

    s1(&dev, &io)?;
    Ok(None)
}

fn s1(dev: &Dev, io: &Io) -> Result<(), Msg> {
    // Tables: PML4, PDPT, PD, PT; data pages X (0x11) and Y (0x22).
    let t = SCRATCH + 0x40_0000;
    let (pml4, pdpt, pd, pt, x, y) = (
        t,
        t + PAGE,
        t + 2 * PAGE,
        t + 3 * PAGE,
        t + 4 * PAGE,
        t + 5 * PAGE,
    );
    fill(t, 0, 4 * PAGE);
    fill(x, 0x11, PAGE);
    fill(y, 0x22, PAGE);
    const P_RW_US: u64 = 0x7;
    let set = |table: u64, index: u64, value: u64| {
        // SAFETY: the tables live in scratch RAM owned by this test.
        unsafe { x86::mmio_write::<u64>(table + 8 * index, value) }
    };
    // IOVA 0x20_0000: PML4[0], PDPT[0], PD[1], PT[0].
    let iova = 0x20_0000;
    set(pml4, 0, pdpt | P_RW_US);
    set(pdpt, 0, pd | P_RW_US);
    set(pd, 1, pt | P_RW_US);
    set(pt, 0, x | P_RW_US);
    let d = DeviceDomainId::with(DeviceDomainType::S1, 30);
    expect_ok("CREATE S1 domain 30", create(io, d))?;
    let configure = InputConfigureDeviceDomain {
        device_domain: hv::domain_header(d),
        settings: pviommu_abi::DeviceDomainSettings {
            flags: U64::new(1),
            page_table_root: U64::new(pml4),
        },
    };
    expect_ok(
        "CONFIGURE domain 30",
        hv::simple(
            io,
            HypercallCode::CONFIGURE_DEVICE_DOMAIN,
            configure.as_bytes(),
        ),
    )?;
    expect_ok("ATTACH to domain 30", attach(io, d, dev))?;
    let sum = |v: u8| Ok(PAGE * u64::from(v));
    if dev.checksum(iova, PAGE as u32) != sum(0x11) {
        fail!("S1: DMA through the guest's page table does not read its page");
    }
    set(pt, 0, y | P_RW_US);
    if dev.checksum(iova, PAGE as u32) != sum(0x11) {
        fail!("S1: a PTE changed without a flush was used at once (no IOTLB)");
    }
    expect_ok("FLUSH_DEVICE_DOMAIN_LIST", flush_page(io, d, iova))?;
    if dev.checksum(iova, PAGE as u32) != sum(0x22) {
        fail!("S1: after FLUSH_DEVICE_DOMAIN_LIST the new translation is not used");
    }
    set(pt, 0, x | P_RW_US);
    expect_ok("FLUSH_DEVICE_DOMAIN", flush_all(io, d))?;
    if dev.checksum(iova, PAGE as u32) != sum(0x11) {
        fail!("S1: after FLUSH_DEVICE_DOMAIN the new translation is not used");
    }
    // Not present beyond the table.
    let s = dev.cmd(command::CHECKSUM, iova + PAGE, 0, 8);
    expect_fault(
        dev,
        "S1 unmapped IOVA",
        s,
        iova + PAGE,
        fault::S1_NOT_PRESENT,
    )?;
    expect_ok("DETACH from domain 30", detach(io, dev))?;
    expect_ok("DELETE domain 30", delete(io, d))?;
    diag!("dma: S1 page walk; stale translation until FLUSH_DEVICE_DOMAIN_LIST, then the new one; full flush");
    Ok(())
}

/// A readable account of the pvIOMMU at work (pvmm's main command).
pub fn demo(ctx: &Ctx) -> Verdict {
    let (dev, io) = match setup(ctx) {
        Ok(x) => x,
        Err(v) => return v,
    };
    let say = |m: core::fmt::Arguments| diag!("pvIOMMU: {}", m);
    say(format_args!(
        "dma-test device at 00:{:02x}.0, BAR0 {:#x}; hypercall page at {:#x}",
        dev.slot,
        dev.bar,
        hv::call_page()
    ));
    let (gpa, iova, pages) = (SCRATCH, 0x10_0000u64, 16u64);
    let d = hv::s2(40);
    expect_ok("CREATE", create(&io, d))?;
    expect_ok("ATTACH", attach(&io, d, &dev))?;
    if let Err((s, n)) = hv::map_pages(&io, d, iova, gpa >> 12, pages, rw()) {
        fail!("MAP: {} after {}", hv::status_name(s), n);
    }
    say(format_args!(
        "domain 40 (S2): mapped {} pages at IOVA {:#x} -> GPA {:#x}",
        pages, iova, gpa
    ));
    fill(gpa, 0xa5, PAGE);
    fill(gpa + 4 * PAGE, 0, PAGE);
    let s = dev.cmd(command::COPY, iova, iova + 4 * PAGE, PAGE as u32);
    if s != status::DONE || byte_at(gpa + 4 * PAGE + 4095) != 0xa5 {
        fail!("DMA copy failed: status {}", s);
    }
    say(format_args!(
        "DMA copy 4096 bytes IOVA {:#x} -> {:#x} ok (data checked at GPA {:#x})",
        iova,
        iova + 4 * PAGE,
        gpa + 4 * PAGE
    ));
    if let Err((s, n)) = hv::unmap_pages(&io, d, iova + 4 * PAGE, 1) {
        fail!("UNMAP: {} after {}", hv::status_name(s), n);
    }
    expect_ok("FLUSH", flush_all(&io, d))?;
    say(format_args!(
        "unmapped 1 page at IOVA {:#x}; flushed",
        iova + 4 * PAGE
    ));
    let s = dev.cmd(command::FILL, 0, iova + 4 * PAGE, 64);
    let (at, why) = dev.fault();
    if s != status::FAULT {
        fail!("DMA to the unmapped IOVA was not refused (status {})", s);
    }
    say(format_args!(
        "refused: DMA to unmapped IOVA {:#x} faulted ({})",
        at,
        fault::name(why)
    ));
    let null = DeviceDomainId::with(DeviceDomainType::S2, DeviceDomainId::ID_NULL);
    expect_ok("DETACH", detach(&io, &dev))?;
    expect_ok("ATTACH null", attach(&io, null, &dev))?;
    let s = dev.cmd(command::COPY, gpa, gpa + PAGE, 64);
    let (at, why) = dev.fault();
    if s != status::FAULT {
        fail!("the null domain did not block DMA");
    }
    say(format_args!(
        "null domain: DMA at {:#x} refused ({})",
        at,
        fault::name(why)
    ));
    expect_ok("DETACH", detach(&io, &dev))?;
    if let Err((s, n)) = hv::unmap_pages(&io, d, iova, 4) {
        fail!("UNMAP: {} after {}", hv::status_name(s), n);
    }
    if let Err((s, n)) = hv::unmap_pages(&io, d, iova + 5 * PAGE, pages - 5) {
        fail!("UNMAP: {} after {}", hv::status_name(s), n);
    }
    expect_ok("DELETE", delete(&io, d))?;
    if dev.cmd(command::CHECKSUM, gpa, 0, 64) != status::DONE {
        fail!("after DETACH the device does not reach GPAs");
    }
    say(format_args!(
        "detached: the device is back in the default domain (IOVA = GPA); domain 40 deleted"
    ));
    Ok(None)
}

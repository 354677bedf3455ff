//! The tests that run inside the QEMU guest, against the real host kernel:
//! VFIO cdev + IOMMUFD + emulated VT-d + QEMU's edu DMA engine.
// IOAS_MAP of guest RAM is unsafe (see `Iommufd::ioas_map`).
#![allow(unsafe_code)]

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use iommu::backend::{
    AttachTarget, Backend, DomainKind, Invalidation, MapRun, PagingLevels, Perms, S1Config,
};
use iommu::DeviceId;
use iommufd_bindings::iommufd::iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT as HWPT_ALLOC_NEST_PARENT;

use crate::edu::{self, Direction, Edu, RegionAccess};
use crate::iommufd::{self, HwptData, InvalidateEntries, Iommufd, IommufdOps};
use crate::kmsg::Kmsg;
use crate::pci;
use crate::ram::GuestRam;
use crate::tap::{diag, TapWriter};
use crate::uapi::{
    CheckIotlb, HwptInvalidateSelftest, HwptSelftest, IommuTestCmd, MockDomain, MockDomainReplace,
    IOMMU_TEST_INVALIDATE_FLAG_ALL, IOMMU_TEST_IOTLB_DEFAULT, MOCK_NESTED_DOMAIN_IOTLB_ID_MAX,
    MOCK_NESTED_DOMAIN_IOTLB_NUM,
};
use crate::vfio::{self, BoundDevice};
use devices::pci::COMMAND_MEMORY;
use devices::vfio::{BarSlots, HostIommu, MsiRoutes, VfioHooks, VfioPciDevice, VfioPciError};
use iommu::iommufd::{AttachHwpt, IommufdBackend, NestFormat};
use resources::ErrorChain;

/// Why a test failed: the message chain of an error, or a failed check.
#[derive(Debug)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(ErrorChain(&e).to_string())
    }
}

pub type TestResult = Result<(), Failure>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(Failure(format!($($fmt)+)));
        }
    };
}

/// Deterministic test data: `len` bytes from an xorshift generator.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Where the tests find things; the defaults are the guest's.
pub struct Env {
    pub edu: PathBuf,
    pub dev_iommu: PathBuf,
    pub kmsg: PathBuf,
}

impl Env {
    /// The edu device (which the init script bound to vfio-pci).
    pub fn discover() -> Result<Self, Failure> {
        Ok(Self {
            edu: pci::find_one(pci::EDU_VENDOR, pci::EDU_DEVICE)?,
            dev_iommu: PathBuf::from(iommufd::DEV_IOMMU),
            kmsg: PathBuf::from("/dev/kmsg"),
        })
    }
}

type TestFn = fn(&Env) -> TestResult;

/// A named list of tests.
pub type Suite = &'static [(&'static str, TestFn)];

/// The VFIO suite: needs the emulated VT-d and the edu device bound to vfio-pci.
pub const VFIO_TESTS: Suite = &[
    (
        "edu is bound to vfio-pci and has a VFIO cdev",
        edu_bound_to_vfio_pci,
    ),
    (
        "direct attach: edu DMA into and out of memfd RAM at IOVA = offset",
        direct_attach_dma,
    ),
    (
        "S2 domain: map, DMA succeeds; unmap, DMA faults",
        s2_map_dma_unmap_fault,
    ),
    (
        "IOAS_UNMAP cannot split a mapping (ENOENT)",
        ioas_unmap_cannot_split,
    ),
    (
        "teardown destroys every IOMMUFD object",
        teardown_destroys_every_object,
    ),
    ("bad input: not a VFIO device", bad_not_vfio_device),
    ("bad input: device already bound", bad_already_bound),
    ("bad input: no /dev/iommu", bad_no_dev_iommu),
    (
        "iommu::IommufdBackend: direct attach, S2 domain, region removal, device removal (edu DMA)",
        backend_direct_s2_dma,
    ),
    (
        "iommu::IommufdBackend: S1 on VT-d without nesting is shadowed; an empty table blocks DMA",
        backend_s1_without_nesting_is_shadowed,
    ),
    (
        "devices::VfioPciDevice: emulated config, trapped BAR0, MSI routed, DMA via the backend",
        devices_vfio_passthrough,
    ),
    (
        "devices::VfioPciDevice: without /dev/iommu, the legacy container/group path with DMA",
        devices_vfio_legacy_container,
    ),
    (
        "devices::VfioPciDevice: MSI-X table shadowed, vector routed, VFIO trigger arrives",
        devices_vfio_msix,
    ),
    (
        "pvIOMMU hypercalls (iommu::Iommu) drive edu DMA through IOMMUFD: S2 map, unmap, detach",
        hypercalls_drive_edu_through_iommufd,
    ),
    (
        "pvIOMMU hypercalls drive edu DMA through a shadowed S1 domain (VT-d without nesting)",
        hypercalls_drive_edu_through_shadowed_s1,
    ),
    (
        "hotplug of edu as vm.add-device/remove-device do it (less KVM), twice",
        hotplug_edu_like_the_api,
    ),
];

/// The IOMMUFD selftest-mock suite. Linux 6.12 probes a device without
/// firmware node with the first IOMMU driver registered, so the mock device
/// only gets its mock IOMMU when VT-d is off: this suite runs in a boot of
/// its own, without intel-iommu.
pub const SELFTEST_TESTS: Suite = &[
    (
        "selftest mock: nested HWPT over NEST_PARENT, invalidation",
        selftest_nested_invalidate,
    ),
    (
        "iommu::IommufdBackend: S1 nested HWPT and invalidations on the selftest mock",
        backend_s1_selftest,
    ),
    (
        "pvIOMMU hypercalls: S1 CONFIGURE and FLUSH(_LIST) forwarded to a nested HWPT (mock)",
        hypercalls_s1_flushes_reach_the_nested_hwpt,
    ),
];

/// Runs `tests`, printing TAP; returns the number of failures.
pub fn run(tests: Suite) -> usize {
    let mut tap = TapWriter::new(tests.len());
    let env = match Env::discover() {
        Ok(env) => env,
        Err(e) => {
            for (name, _) in tests {
                tap.result(name, Err(format!("set-up: {e}")));
            }
            return tap.failed();
        }
    };
    diag(format!("edu device: {}", env.edu.display()));
    for (name, test) in tests {
        tap.result(name, test(&env));
    }
    tap.failed()
}

fn edu_bound_to_vfio_pci(env: &Env) -> TestResult {
    let driver = pci::driver(&env.edu);
    ensure!(
        driver.as_deref() == Some("vfio-pci"),
        "edu driver is {driver:?}, not vfio-pci"
    );
    let cdevs: Vec<_> = fs::read_dir(env.edu.join("vfio-dev"))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    ensure!(cdevs.len() == 1, "vfio-dev/ holds {cdevs:?}");
    let node = Path::new("/dev/vfio/devices").join(&cdevs[0]);
    ensure!(node.exists(), "{} is missing", node.display());
    diag(format!("cdev: {}", node.display()));
    Ok(())
}

const RAM_SIZE: usize = 4 << 20;

/// Bytes per edu transfer in these tests (the device takes at most 4095).
const CHUNK: usize = 2048;

/// Writes `data` (at most `CHUNK` bytes) into RAM at `src_off`, moves it
/// RAM -> edu buffer -> RAM through the IOVAs, and checks it arrived at
/// `dst_off`.
fn round_trip<D: RegionAccess + ?Sized>(
    edu: &Edu<'_, D>,
    ram: &GuestRam,
    (src_iova, src_off): (u64, u64),
    (dst_iova, dst_off): (u64, u64),
    data: &[u8],
) -> TestResult {
    ensure!(
        data.len() <= CHUNK,
        "round_trip takes at most {CHUNK} bytes"
    );
    ram.write(src_off, data)?;
    ram.write(dst_off, &vec![0u8; data.len()])?;
    edu.dma(Direction::RamToDevice, src_iova, 0, data.len())?;
    edu.dma(Direction::DeviceToRam, dst_iova, 0, data.len())?;
    let mut back = vec![0u8; data.len()];
    ram.read(dst_off, &mut back)?;
    ensure!(
        back == data,
        "data at RAM {dst_off:#x} differs from what was DMAed from {src_off:#x} \
         (first bytes {:02x?})",
        &back[..8.min(back.len())]
    );
    Ok(())
}

fn direct_attach_dma(env: &Env) -> TestResult {
    let ram = GuestRam::new(c"guest-ram", RAM_SIZE)?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let dev = BoundDevice::open(&env.edu, &fd, false)?;
    let ioas = dev.ioas_id();

    let ranges = fd.iova_ranges(ioas)?;
    ensure!(
        ranges.iter().any(|r| r.contains(0, RAM_SIZE as u64)),
        "IOVA ranges before attach {ranges:x?} do not allow the RAM"
    );
    // SAFETY: the mapping lives in `ram`, which outlives the IOAS mapping
    // (`dev`, and with it the IOAS, is dropped first); RAM is only accessed
    // through GuestRam's raw-pointer copies.
    unsafe {
        fd.ioas_map(
            ioas,
            0,
            ram.host_addr(0, RAM_SIZE)?,
            RAM_SIZE as u64,
            Perms::RW,
        )?
    };
    dev.device.attach_hwpt(ioas)?;

    // Attaching adds the device's reserved regions (the MSI window on VT-d).
    let ranges = fd.iova_ranges(ioas)?;
    diag(format!("IOVA ranges after attach: {ranges:x?}"));
    ensure!(
        !ranges.iter().any(|r| r.contains(0xfee0_0000, 1)),
        "the MSI window 0xfee00000 is still allowed after attach: {ranges:x?}"
    );
    ensure!(
        ranges.iter().any(|r| r.contains(0, RAM_SIZE as u64)),
        "IOVA ranges after attach {ranges:x?} no longer allow the RAM"
    );

    let edu = Edu::new(&*dev.device)?;
    ensure!(
        edu.liveness(0x1234_5678)? == !0x1234_5678,
        "liveness register does not invert"
    );
    // Page-aligned, across a page boundary, and a short unaligned run at RAM's end.
    round_trip(
        &edu,
        &ram,
        (0x1000, 0x1000),
        (0x3000, 0x3000),
        &pattern(1, CHUNK),
    )?;
    round_trip(
        &edu,
        &ram,
        (0x1c00, 0x1c00),
        (0x10_0a00, 0x10_0a00),
        &pattern(4, CHUNK),
    )?;
    let end = RAM_SIZE as u64 - 100;
    round_trip(
        &edu,
        &ram,
        (end, end),
        (0x20_0013, 0x20_0013),
        &pattern(2, 100),
    )?;
    diag("edu DMA RAM -> device -> RAM through the IOAS: data intact");
    Ok(())
}

fn s2_map_dma_unmap_fault(env: &Env) -> TestResult {
    const IOVA: u64 = 0x80_0000;
    const PAGE: u64 = 0x5000; // RAM offset behind IOVA
    const OTHER: u64 = 0x9000; // another RAM page, mapped later
    let ram = GuestRam::new(c"guest-ram", RAM_SIZE)?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let dev = BoundDevice::open(&env.edu, &fd, true)?;
    let s2 = fd.ioas_alloc()?;
    // SAFETY: as in direct_attach_dma; `ram` outlives `fd` and `dev`.
    unsafe { fd.ioas_map(s2, IOVA, ram.host_addr(PAGE, 4096)?, 4096, Perms::RW)? };
    // Replace the direct-attach IOAS by the S2 domain.
    dev.device.attach_hwpt(s2)?;
    let edu = Edu::new(&*dev.device)?;

    // Mapped: both halves of the page are reachable through the IOVA.
    let half = CHUNK as u64;
    round_trip(
        &edu,
        &ram,
        (IOVA, PAGE),
        (IOVA + half, PAGE + half),
        &pattern(3, CHUNK),
    )?;
    diag(format!(
        "mapped: DMA through IOVA {IOVA:#x} reached RAM page {PAGE:#x}"
    ));

    let mut kmsg = Kmsg::open_at_end(&env.kmsg)?;
    let unmapped = fd.ioas_unmap(s2, IOVA, 4096)?;
    ensure!(unmapped == 4096, "IOAS_UNMAP unmapped {unmapped} bytes");

    // Device -> RAM: the edu buffer holds pattern 3; the write must be dropped.
    let q = vec![0xa5u8; CHUNK];
    ram.write(PAGE, &q)?;
    edu.dma(Direction::DeviceToRam, IOVA, 0, CHUNK)?;
    let mut now = vec![0u8; CHUNK];
    ram.read(PAGE, &mut now)?;
    ensure!(
        now == q,
        "a DMA write through the unmapped IOVA reached RAM"
    );
    let needles = ["DMAR", &format!("fault addr {IOVA:#x}")];
    let fault = kmsg
        .wait_for(&needles, Duration::from_secs(3))?
        .ok_or_else(|| Failure(format!("no DMAR fault for {IOVA:#x} in the kernel log")))?;
    diag(format!("unmapped write faulted: {fault}"));

    // RAM -> device: RAM holds a5s; they must not reach the device's buffer.
    edu.dma(Direction::RamToDevice, IOVA, 0, CHUNK)?;
    // Look at the buffer through another page, mapped now.
    // SAFETY: as above.
    unsafe {
        fd.ioas_map(
            s2,
            IOVA + 0x1000,
            ram.host_addr(OTHER, 4096)?,
            4096,
            Perms::RW,
        )?
    };
    edu.dma(Direction::DeviceToRam, IOVA + 0x1000, 0, CHUNK)?;
    ram.read(OTHER, &mut now)?;
    ensure!(
        now != q,
        "a DMA read through the unmapped IOVA returned RAM's data"
    );
    diag(format!(
        "unmapped read faulted: the device got {:02x?}... instead of a5",
        &now[..4]
    ));
    Ok(())
}

fn ioas_unmap_cannot_split(env: &Env) -> TestResult {
    let ram = GuestRam::new(c"guest-ram", 0x4000)?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let ioas = fd.ioas_alloc()?;
    // SAFETY: as in direct_attach_dma; the IOAS dies with `fd`, before `ram`.
    unsafe {
        fd.ioas_map(
            ioas,
            0x10_0000,
            ram.host_addr(0, 0x4000)?,
            0x4000,
            Perms::RW,
        )?
    };
    let err = fd
        .ioas_unmap(ioas, 0x10_1000, 0x1000)
        .err()
        .ok_or_else(|| Failure("unmapping one page of a 4-page mapping worked".into()))?;
    ensure!(
        err.errno() == Some(libc::ENOENT),
        "partial unmap failed with {err:?}, not ENOENT"
    );
    let n = fd.ioas_unmap(ioas, 0x10_0000, 0x4000)?;
    ensure!(n == 0x4000, "whole unmap removed {n:#x} bytes");
    fd.destroy(ioas)?;
    Ok(())
}

/// Adds what was being done to an error.
fn ctx<E: std::error::Error>(what: &'static str) -> impl Fn(E) -> Failure {
    move |e| Failure(format!("{what}: {}", ErrorChain(&e)))
}

/// Checks that every id in `ids` is gone: IOMMU_DESTROY answers ENOENT.
fn all_destroyed(fd: &Iommufd, ids: &[(&str, u32)]) -> TestResult {
    for &(what, id) in ids {
        match fd.destroy(id) {
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Ok(()) => return Err(Failure(format!("{what} {id} still existed"))),
            Err(e) => return Err(Failure(format!("{what} {id}: {}", ErrorChain(&e)))),
        }
    }
    Ok(())
}

fn teardown_destroys_every_object(env: &Env) -> TestResult {
    let ram = GuestRam::new(c"guest-ram", RAM_SIZE)?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let dev = BoundDevice::open(&env.edu, &fd, true)?;
    let (direct, dev_id) = (dev.ioas_id(), dev.dev_id);
    // SAFETY: as in direct_attach_dma.
    unsafe {
        fd.ioas_map(
            direct,
            0,
            ram.host_addr(0, RAM_SIZE)?,
            RAM_SIZE as u64,
            Perms::RW,
        )?
    };
    let s2 = fd.ioas_alloc()?;
    // SAFETY: as above.
    unsafe {
        fd.ioas_map(
            s2,
            0x1000,
            ram.host_addr(0x1000, 0x1000)?,
            0x1000,
            Perms::RW,
        )?
    };
    dev.device.attach_hwpt(s2)?;

    // While in use, objects cannot go: the check below is meaningful.
    match fd.destroy(s2) {
        Err(e) if e.errno() == Some(libc::EBUSY) => {}
        other => {
            return Err(Failure(format!(
                "destroying an attached IOAS gave {other:?}"
            )))
        }
    }
    match fd.destroy(dev_id) {
        Err(e) if e.errno() == Some(libc::EBUSY) || e.errno() == Some(libc::ENOENT) => {}
        other => return Err(Failure(format!("destroying a bound device gave {other:?}"))),
    }

    drop(dev); // detach, close the cdev (unbind), destroy the direct IOAS
    fd.destroy(s2)?;
    all_destroyed(
        &fd,
        &[
            ("direct-attach IOAS", direct),
            ("S2 IOAS", s2),
            ("device", dev_id),
        ],
    )?;
    diag(format!(
        "IOMMU_DESTROY answers ENOENT for IOAS {direct}, IOAS {s2}, device {dev_id}"
    ));
    Ok(())
}

fn check_iotlb(
    fd: &Iommufd,
    hwpt: u32,
    expect: [u32; MOCK_NESTED_DOMAIN_IOTLB_NUM as usize],
) -> TestResult {
    for (id, value) in (0..).zip(expect) {
        let mut cmd = IommuTestCmd::new(
            hwpt,
            CheckIotlb {
                id,
                iotlb: value,
                ..Default::default()
            },
        );
        fd.test_cmd(&mut cmd).map_err(|e| {
            Failure(format!(
                "mock IOTLB entry {id} is not {value:#x}: {}",
                ErrorChain(&e)
            ))
        })?;
    }
    Ok(())
}

fn selftest_nested_invalidate(env: &Env) -> TestResult {
    const D: u32 = IOMMU_TEST_IOTLB_DEFAULT;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let ioas = fd.ioas_alloc()?;
    let mut mock = IommuTestCmd::new(ioas, MockDomain::default());
    fd.test_cmd(&mut mock).map_err(ctx("MOCK_DOMAIN"))?;
    let MockDomain {
        out_stdev_id: stdev,
        out_hwpt_id: auto_hwpt,
        out_idev_id: idev,
        ..
    } = mock.payload;

    let parent = fd
        .hwpt_alloc(idev, ioas, HWPT_ALLOC_NEST_PARENT, HwptData::None)
        .map_err(ctx("HWPT_ALLOC of the NEST_PARENT"))?;
    let data = HwptSelftest { iotlb: D };
    let nested = fd
        .hwpt_alloc(idev, parent, 0, HwptData::Selftest(data))
        .map_err(ctx("HWPT_ALLOC of the nested HWPT"))?;
    let mut replace = IommuTestCmd::new(
        stdev,
        MockDomainReplace {
            pt_id: nested,
            ..Default::default()
        },
    );
    fd.test_cmd(&mut replace)
        .map_err(ctx("MOCK_DOMAIN_REPLACE to the nested HWPT"))?;
    check_iotlb(&fd, nested, [D; 4])?;

    let entry = |iotlb_id| HwptInvalidateSelftest { flags: 0, iotlb_id };
    let done = fd.hwpt_invalidate(nested, InvalidateEntries::Selftest(&[entry(1), entry(3)]))?;
    ensure!(done == 2, "invalidation handled {done} of 2 entries");
    check_iotlb(&fd, nested, [D, 0, D, 0])?;

    // A bad second entry: the first is done, entry_num says where it stopped.
    let bad = [entry(2), entry(MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1)];
    match fd.hwpt_invalidate(nested, InvalidateEntries::Selftest(&bad)) {
        Err(iommufd::Error::Invalidate {
            index: 1,
            count: 2,
            source,
        }) if source.errno() == libc::EINVAL => {}
        other => return Err(Failure(format!("bad entry 1 gave {other:?}"))),
    }
    check_iotlb(&fd, nested, [D, 0, 0, 0])?;
    let bad_flags = HwptInvalidateSelftest {
        flags: 2,
        iotlb_id: 0,
    };
    match fd.hwpt_invalidate(nested, InvalidateEntries::Selftest(&[bad_flags])) {
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {}
        other => return Err(Failure(format!("an unknown flag gave {other:?}"))),
    }
    check_iotlb(&fd, nested, [D, 0, 0, 0])?;
    let all = HwptInvalidateSelftest {
        flags: IOMMU_TEST_INVALIDATE_FLAG_ALL,
        iotlb_id: 0,
    };
    let done = fd.hwpt_invalidate(nested, InvalidateEntries::Selftest(&[all]))?;
    ensure!(done == 1, "full flush handled {done} entries");
    check_iotlb(&fd, nested, [0; 4])?;
    diag("mock IOTLB: exact entries, partial failure with entry_num, full flush: as expected");

    // Teardown in dependency order, then everything must be gone.
    replace.payload.pt_id = ioas;
    fd.test_cmd(&mut replace)
        .map_err(ctx("MOCK_DOMAIN_REPLACE back to the IOAS"))?;
    fd.destroy(nested)?;
    fd.destroy(parent)?;
    fd.destroy(stdev)?;
    fd.destroy(ioas)?;
    all_destroyed(
        &fd,
        &[
            ("nested HWPT", nested),
            ("parent HWPT", parent),
            ("auto HWPT", auto_hwpt),
            ("mock device", stdev),
            ("mock idev", idev),
            ("IOAS", ioas),
        ],
    )
}

fn bad_not_vfio_device(env: &Env) -> TestResult {
    let dir = Path::new(pci::SYSFS_PCI_DEVICES);
    let other = pci::others_in(dir, pci::EDU_VENDOR, pci::EDU_DEVICE)?
        .into_iter()
        .next()
        .ok_or_else(|| Failure("no PCI device besides edu".into()))?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    match BoundDevice::open(&other, &fd, true) {
        Err(e @ vfio::Error::Vfio(VfioPciError::NotVfioDevice { .. })) => {
            diag(format!("error: {e}"));
            Ok(())
        }
        Err(e) => Err(Failure(format!("wrong error: {}", ErrorChain(&e)))),
        Ok(_) => Err(Failure(format!(
            "{} opened as a VFIO device",
            other.display()
        ))),
    }
}

fn bad_already_bound(env: &Env) -> TestResult {
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let _first = BoundDevice::open(&env.edu, &fd, true)?;
    let fd2 = Iommufd::open_path(&env.dev_iommu)?;
    for (what, f) in [("another iommufd", &fd2), ("the same iommufd", &fd)] {
        match BoundDevice::open(&env.edu, f, true) {
            Err(e @ vfio::Error::Vfio(VfioPciError::AlreadyBound { .. })) => {
                diag(format!("{what}: {}", ErrorChain(&e)))
            }
            Err(e) => return Err(Failure(format!("{what}: wrong error: {}", ErrorChain(&e)))),
            Ok(_) => return Err(Failure(format!("a second bind through {what} worked"))),
        }
    }
    Ok(())
}

fn bad_no_dev_iommu(env: &Env) -> TestResult {
    let result = {
        // Put back when the guard goes, before judging.
        let _hidden = HiddenDevIommu::new(&env.dev_iommu)?;
        Iommufd::open_path(&env.dev_iommu)
    };
    match result {
        Err(e @ iommufd::Error::NoIommufd { .. }) => {
            diag(format!("error: {}", ErrorChain(&e)));
            Ok(())
        }
        Err(e) => Err(Failure(format!("wrong error: {}", ErrorChain(&e)))),
        Ok(_) => Err(Failure("opened a missing /dev/iommu".into())),
    }
}

/// The PCI identity the backend tests give the edu device (any will do).
const EDU_ID: DeviceId = DeviceId::pci(0, 0, 3, 0);

/// Fills RAM at `ram_off` with a5s, has the device write its buffer to
/// `iova`, and checks the a5s are still there (the write was blocked).
fn dma_blocked<D: RegionAccess + ?Sized>(
    edu: &Edu<'_, D>,
    ram: &GuestRam,
    iova: u64,
    ram_off: u64,
) -> TestResult {
    let q = vec![0xa5u8; CHUNK];
    ram.write(ram_off, &q)?;
    edu.dma(Direction::DeviceToRam, iova, 0, CHUNK)?;
    let mut now = vec![0u8; CHUNK];
    ram.read(ram_off, &mut now)?;
    ensure!(now == q, "a DMA write through {iova:#x} reached RAM");
    Ok(())
}

/// The kernel's rate limit on DMAR fault reports: intel-iommu's
/// `dmar_fault` reports through one DEFAULT_RATELIMIT_INTERVAL (5 s) /
/// DEFAULT_RATELIMIT_BURST (10) state, two lines a fault, so a suite that
/// faults often can have a report dropped.
const DMAR_REPORT_WINDOW: Duration = Duration::from_secs(6);

/// [`dma_blocked`] for a device write through `iova`, and the DMAR fault
/// for it in the kernel log. A write whose report the rate limit dropped is
/// refused again once the limit's window has passed, and must be reported
/// then.
fn blocked_and_logged<D: RegionAccess + ?Sized>(
    env: &Env,
    edu: &Edu<'_, D>,
    ram: &GuestRam,
    iova: u64,
    ram_off: u64,
) -> Result<String, Failure> {
    let needles = ["DMAR", &format!("fault addr {iova:#x}")];
    for attempt in 0..2 {
        if attempt > 0 {
            std::thread::sleep(DMAR_REPORT_WINDOW);
        }
        let mut kmsg = Kmsg::open_at_end(&env.kmsg)?;
        dma_blocked(edu, ram, iova, ram_off)?;
        if let Some(fault) = kmsg.wait_for(&needles, Duration::from_secs(3))? {
            return Ok(fault);
        }
    }
    Err(Failure(format!(
        "no DMAR fault for {iova:#x} in the kernel log, twice {} s apart",
        DMAR_REPORT_WINDOW.as_secs()
    )))
}

fn backend_direct_s2_dma(env: &Env) -> TestResult {
    const S2: u32 = 5;
    let ram = GuestRam::new(c"guest-ram", RAM_SIZE)?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let backend = IommufdBackend::new(Arc::new(fd.clone()), NestFormat::VtdS1)?;
    // SAFETY: `ram` outlives the backend (dropped at the end of this
    // function, before `ram`) and is only accessed by raw-pointer copies.
    unsafe { backend.add_ram_region(0, RAM_SIZE as u64, ram.host_addr(0, RAM_SIZE)?)? };
    let dev = BoundDevice::open(&env.edu, &fd, false)?;
    backend.add_host_device(
        EDU_ID,
        dev.dev_id,
        Arc::clone(&dev.device) as Arc<dyn AttachHwpt>,
    )?;
    backend.add_device(EDU_ID).map_err(ctx("add_device"))?;
    let edu = Edu::new(&*dev.device)?;

    // Default domain: IOVA = GPA.
    round_trip(
        &edu,
        &ram,
        (0x2000, 0x2000),
        (0x30_0000, 0x30_0000),
        &pattern(5, CHUNK),
    )?;
    // S2 domain: one run, IOVA 8 MiB -> GPA 0x6000.
    backend.create_domain(S2, DomainKind::S2)?;
    let run = MapRun {
        iova: 0x80_0000,
        gpa: 0x6000,
        len: 0x1000,
        perms: Perms::RW,
    };
    backend.map(S2, run)?;
    backend.attach(EDU_ID, AttachTarget::Domain(S2))?;
    round_trip(
        &edu,
        &ram,
        (0x80_0000, 0x6000),
        (0x80_0800, 0x6800),
        &pattern(6, CHUNK),
    )?;
    dma_blocked(&edu, &ram, 0x2000, 0x2000)
        .map_err(|e| Failure(format!("S2 domain: IOVA = GPA still works: {e}")))?;
    backend.unmap(S2, run)?;
    dma_blocked(&edu, &ram, 0x80_0000, 0x6000)?;
    diag("backend S2: mapped run reached GPA 0x6000; identity and unmapped IOVAs blocked");

    // Back to the default domain, then the RAM region goes away.
    backend.attach(EDU_ID, AttachTarget::Identity)?;
    backend.destroy_domain(S2)?;
    round_trip(
        &edu,
        &ram,
        (0x1000, 0x1000),
        (0x3000, 0x3000),
        &pattern(7, CHUNK),
    )?;
    backend.remove_ram_region(0)?;
    dma_blocked(&edu, &ram, 0x3000, 0x3000).map_err(|e| Failure(format!("removed region: {e}")))?;
    // SAFETY: as above.
    unsafe { backend.add_ram_region(0, RAM_SIZE as u64, ram.host_addr(0, RAM_SIZE)?)? };
    round_trip(
        &edu,
        &ram,
        (0x1000, 0x1000),
        (0x3000, 0x3000),
        &pattern(8, CHUNK),
    )?;
    diag("backend regions: removal unmaps guest RAM, re-adding maps it again");

    // Null domain, then removal: blocked.
    backend.attach(EDU_ID, AttachTarget::Blocked)?;
    dma_blocked(&edu, &ram, 0x3000, 0x3000).map_err(|e| Failure(format!("null domain: {e}")))?;
    backend.attach(EDU_ID, AttachTarget::Identity)?;
    backend.remove_device(EDU_ID)?;
    dma_blocked(&edu, &ram, 0x3000, 0x3000).map_err(|e| Failure(format!("removed device: {e}")))?;

    let stats = backend.stats();
    diag(format!("backend stats: {stats:?}"));
    let ids = backend.object_ids();
    drop(backend);
    drop(dev);
    let named: Vec<(&str, u32)> = ids.iter().map(|&id| ("backend object", id)).collect();
    all_destroyed(&fd, &named)?;
    diag(format!("backend drop destroyed {ids:?}"));
    Ok(())
}

fn backend_s1_without_nesting_is_shadowed(env: &Env) -> TestResult {
    const S1: u32 = 6;
    let ram = GuestRam::new(c"guest-ram", RAM_SIZE)?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let backend = IommufdBackend::new(Arc::new(fd.clone()), NestFormat::VtdS1)?;
    // SAFETY: as in backend_direct_s2_dma.
    unsafe { backend.add_ram_region(0, RAM_SIZE as u64, ram.host_addr(0, RAM_SIZE)?)? };
    let dev = BoundDevice::open(&env.edu, &fd, false)?;
    backend.add_host_device(
        EDU_ID,
        dev.dev_id,
        Arc::clone(&dev.device) as Arc<dyn AttachHwpt>,
    )?;
    backend.add_device(EDU_ID)?;
    let edu = Edu::new(&*dev.device)?;
    round_trip(
        &edu,
        &ram,
        (0x2000, 0x2000),
        (0x4000, 0x4000),
        &pattern(9, CHUNK),
    )?;

    backend.create_domain(S1, DomainKind::S1)?;
    let cfg = S1Config {
        root: 0x10_0000,
        levels: PagingLevels::Four,
        translation_enabled: true,
        blocked: false,
    };
    backend.set_s1(S1, cfg)?;
    // QEMU 7.2's VT-d has no nesting: the host refuses the NEST_PARENT HWPT
    // (EOPNOTSUPP) and the backend shadows the guest's table instead. The
    // table at 0x100000 is all zeros: nothing translates, DMA is blocked.
    ensure!(!backend.shadows_s1(), "shadowing before any S1 attach");
    backend
        .attach(EDU_ID, AttachTarget::Domain(S1))
        .map_err(ctx("S1 attach (shadowed)"))?;
    ensure!(
        backend.shadows_s1() && backend.s1_hwpt(S1).is_none(),
        "the S1 domain is not shadowed on a VT-d without nesting"
    );
    let shadow = backend
        .s1_shadow_ioas(S1)
        .ok_or_else(|| Failure("no shadow IOAS after the S1 attach".into()))?;
    let runs = backend.s1_shadow_runs(S1);
    ensure!(runs.is_empty(), "an empty table shadowed as {runs:x?}");
    dma_blocked(&edu, &ram, 0x4000, 0x4000)
        .map_err(|e| Failure(format!("S1 domain with an empty table: {e}")))?;
    diag(format!(
        "EOPNOTSUPP for nesting: S1 shadowed in IOAS {shadow}; an empty table blocks DMA"
    ));
    Ok(())
}

/// The selftest mock device as a backend device: attaching is
/// IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE.
struct MockDevice {
    fd: Iommufd,
    stdev: u32,
}

impl AttachHwpt for MockDevice {
    fn attach_hwpt(&self, pt_id: u32) -> std::io::Result<()> {
        let mut cmd = IommuTestCmd::new(
            self.stdev,
            MockDomainReplace {
                pt_id,
                ..Default::default()
            },
        );
        self.fd.test_cmd(&mut cmd).map_err(std::io::Error::other)
    }

    fn detach_hwpt(&self) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
}

fn backend_s1_selftest(env: &Env) -> TestResult {
    const D: u32 = IOMMU_TEST_IOTLB_DEFAULT;
    const S1: u32 = 6;
    // The mock domain's aperture starts at 16 MiB.
    const GPA: u64 = 0x100_0000;
    let ram = GuestRam::new(c"guest-ram", RAM_SIZE)?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let backend = IommufdBackend::new(Arc::new(fd.clone()), NestFormat::Selftest)?;
    // SAFETY: as in backend_direct_s2_dma.
    unsafe { backend.add_ram_region(GPA, RAM_SIZE as u64, ram.host_addr(0, RAM_SIZE)?)? };
    let mut mock = IommuTestCmd::new(backend.direct_ioas(), MockDomain::default());
    fd.test_cmd(&mut mock).map_err(ctx("MOCK_DOMAIN"))?;
    let (stdev, idev) = (mock.payload.out_stdev_id, mock.payload.out_idev_id);
    let device = Arc::new(MockDevice {
        fd: fd.clone(),
        stdev,
    });
    backend.add_host_device(EDU_ID, idev, device)?;
    backend.add_device(EDU_ID).map_err(ctx("add_device"))?;

    backend.create_domain(S1, DomainKind::S1)?;
    backend.set_s1(
        S1,
        S1Config {
            root: GPA,
            levels: PagingLevels::Four,
            translation_enabled: true,
            blocked: false,
        },
    )?;
    backend
        .attach(EDU_ID, AttachTarget::Domain(S1))
        .map_err(ctx("attach to S1"))?;
    let nested = backend
        .s1_hwpt(S1)
        .ok_or_else(|| Failure("no nested HWPT after the S1 attach".into()))?;
    let objects = backend.object_ids();
    ensure!(
        objects.len() == 4 && objects.contains(&nested),
        "expected direct, blocked, parent and nested HWPT: {objects:?}"
    );
    check_iotlb(&fd, nested, [D; 4])?;
    // Pages 5 and 6 index mock IOTLB entries 1 and 2.
    backend.invalidate(
        S1,
        Invalidation::Range {
            iova: 0x5000,
            len: 0x2000,
        },
    )?;
    check_iotlb(&fd, nested, [D, 0, 0, D])?;
    backend.invalidate(S1, Invalidation::All)?;
    check_iotlb(&fd, nested, [0; 4])?;
    let stats = backend.stats();
    ensure!(
        stats.invalidations == 2 && stats.full_flush_fallbacks == 0,
        "stats {stats:?}"
    );
    diag(format!(
        "backend S1 on the mock: nested HWPT {nested}, exact and full invalidations"
    ));

    // A new table: a new nested HWPT; the old one is gone.
    backend.set_s1(
        S1,
        S1Config {
            root: GPA + 0x1000,
            levels: PagingLevels::Four,
            translation_enabled: true,
            blocked: false,
        },
    )?;
    let renewed = backend
        .s1_hwpt(S1)
        .ok_or_else(|| Failure("no nested HWPT after set_s1".into()))?;
    ensure!(renewed != nested, "set_s1 kept nested HWPT {nested}");
    // Ids are reused lowest first; `nested` is not `renewed`, nor anything
    // allocated since, so ENOENT means it is gone.
    all_destroyed(&fd, &[("old nested HWPT", nested)])?;
    check_iotlb(&fd, renewed, [D; 4])?;
    ensure!(
        backend.object_ids().len() == 4,
        "objects after set_s1: {:?}",
        backend.object_ids()
    );

    backend.attach(EDU_ID, AttachTarget::Identity)?;
    backend.destroy_domain(S1)?;
    // The mock cannot detach: removal leaves it on the blocked IOAS, so it
    // goes before the backend (a VFIO device detaches, see the VFIO suite).
    backend.remove_device(EDU_ID)?;
    fd.destroy(stdev).map_err(ctx("destroy the mock device"))?;
    let ids = backend.object_ids();
    drop(backend);
    let mut named: Vec<(&str, u32)> = ids.iter().map(|&id| ("backend object", id)).collect();
    named.push(("mock device", stdev));
    all_destroyed(&fd, &named)
}

/// What the edu driver sees when it runs in the VMM's guest: BAR0 through
/// the passthrough device's trapped MMIO at `base`, configuration space
/// through its emulated one.
struct GuestView<'a> {
    dev: std::sync::Mutex<&'a mut VfioPciDevice>,
    base: u64,
}

impl RegionAccess for GuestView<'_> {
    fn read_region(&self, region: u32, offset: u64, buf: &mut [u8]) -> edu::Result<()> {
        let mut dev = self
            .dev
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (region, u16::try_from(offset)) {
            (edu::BAR0_REGION, _) => devices::BusDevice::read(&mut **dev, self.base, offset, buf),
            (edu::CONFIG_REGION, Ok(off)) => {
                devices::pci::PciDevice::read_config(&mut **dev, off, buf)
            }
            _ => {
                return Err(edu::Error::RegionRange {
                    region,
                    offset,
                    len: buf.len(),
                })
            }
        }
        Ok(())
    }

    fn write_region(&self, region: u32, offset: u64, data: &[u8]) -> edu::Result<()> {
        let mut dev = self
            .dev
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (region, u16::try_from(offset)) {
            (edu::BAR0_REGION, _) => devices::BusDevice::write(&mut **dev, self.base, offset, data),
            (edu::CONFIG_REGION, Ok(off)) => {
                devices::pci::PciDevice::write_config(&mut **dev, off, data)
            }
            _ => {
                return Err(edu::Error::RegionRange {
                    region,
                    offset,
                    len: data.len(),
                })
            }
        }
        Ok(())
    }
}

/// Records MSI routes and keeps a copy of each vector's eventfd.
#[derive(Default)]
struct TestRoutes {
    routes: std::sync::Mutex<Vec<(u32, u64, u32, vmm_sys_util::eventfd::EventFd)>>,
}

impl MsiRoutes for TestRoutes {
    fn route(
        &self,
        vector: u32,
        address: u64,
        data: u32,
        eventfd: &vmm_sys_util::eventfd::EventFd,
    ) -> std::io::Result<()> {
        let fd = eventfd.try_clone()?;
        self.routes
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .push((vector, address, data, fd));
        Ok(())
    }

    fn unroute(&self, _: u32, _: &vmm_sys_util::eventfd::EventFd) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records the guest slots of mmapped BAR areas.
#[derive(Default)]
struct TestSlots {
    slots: std::sync::Mutex<Vec<(u64, u64, usize)>>,
}

impl BarSlots for TestSlots {
    /// Only records the area: no guest ever reaches it.
    unsafe fn add(&self, gpa: u64, size: u64, host: *mut u8) -> std::io::Result<u32> {
        let mut s = self
            .slots
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        s.push((gpa, size, host as usize));
        u32::try_from(s.len()).map_err(std::io::Error::other)
    }

    fn remove(&self, _: u32) -> std::io::Result<()> {
        Ok(())
    }
}

fn config32(dev: &mut VfioPciDevice, offset: u16) -> u32 {
    let mut b = [0u8; 4];
    devices::pci::PciDevice::read_config(dev, offset, &mut b);
    u32::from_le_bytes(b)
}

fn devices_vfio_passthrough(env: &Env) -> TestResult {
    const BAR0: u64 = 0xc000_0000;
    let ram = GuestRam::new(c"guest-ram", RAM_SIZE)?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let routes = Arc::new(TestRoutes::default());
    let slots = Arc::new(TestSlots::default());
    let hooks = VfioHooks {
        msi: Some(Arc::clone(&routes) as Arc<dyn MsiRoutes>),
        bar_slots: Some(Arc::clone(&slots) as Arc<dyn BarSlots>),
        dma_sync: None,
    };
    let mut dev = VfioPciDevice::open(&env.edu, Arc::clone(fd.inner()), hooks)?;
    // Configuration space as the guest sees it.
    ensure!(
        config32(&mut dev, 0) == 0x11e8_1234,
        "ids {:#x}",
        config32(&mut dev, 0)
    );
    devices::pci::PciDevice::write_config(&mut dev, 0x10, &u32::MAX.to_le_bytes());
    let mask = config32(&mut dev, 0x10);
    ensure!(
        mask == 0xfff0_0000,
        "BAR0 sizing reads {mask:#x}, not a 1 MiB mask"
    );
    ensure!(config32(&mut dev, 0x30) == 0, "expansion ROM visible");
    devices::pci::PciDevice::set_bar_address(&mut dev, 0, BAR0)?;

    // DMA: the IOMMUFD backend attaches the device to guest RAM.
    let backend = IommufdBackend::new(Arc::new(fd.clone()), NestFormat::VtdS1)?;
    // SAFETY: `ram` outlives the backend and is only accessed by raw-pointer copies.
    unsafe { backend.add_ram_region(0, RAM_SIZE as u64, ram.host_addr(0, RAM_SIZE)?)? };
    let dev_id = dev
        .iommufd_dev_id()
        .ok_or_else(|| Failure("no iommufd device id".into()))?;
    let handle = dev
        .attach_handle()
        .ok_or_else(|| Failure("no attach handle".into()))?;
    backend.add_host_device(EDU_ID, dev_id, handle)?;
    backend.add_device(EDU_ID)?;

    let msi_cap = {
        // Walk the guest-visible capability list to MSI (id 5).
        let mut ptr = config32(&mut dev, 0x34).to_le_bytes()[0] & 0xfc;
        let mut found = None;
        while ptr >= 0x40 && found.is_none() {
            let hdr = config32(&mut dev, u16::from(ptr)).to_le_bytes();
            if hdr[0] == 5 {
                found = Some(u16::from(ptr));
            }
            ptr = hdr[1] & 0xfc;
        }
        found.ok_or_else(|| Failure("no MSI capability in the guest's list".into()))?
    };
    // BAR0 placed: the mmapped area becomes a guest memory slot.
    devices::pci::PciDevice::bar_moved(&mut dev, 0, None, Some(BAR0));
    let slot = slots
        .slots
        .lock()
        .map_err(|_| Failure("poisoned".into()))?
        .first()
        .copied()
        .ok_or_else(|| Failure("BAR0 was not offered as a memory slot".into()))?;
    ensure!(slot.0 == BAR0 && slot.1 == 1 << 20, "BAR0 slot {slot:x?}");
    let host = slot.2 as *mut u32;
    let view = GuestView {
        dev: std::sync::Mutex::new(&mut dev),
        base: BAR0,
    };
    let edu = Edu::new(&view)?; // memory decoding + bus mastering, BAR0 trapped
    ensure!(
        edu.liveness(0x55aa_1234)? == !0x55aa_1234,
        "liveness through trapped BAR0"
    );
    // The same registers through the mapping a KVM slot would use.
    // SAFETY: `host` is the live mmap of BAR0 (1 MiB) held by `dev`; MMIO
    // registers are accessed with volatile 32-bit operations only.
    let (id, live) = unsafe {
        host.add(1).write_volatile(0x0f0f_0f0f);
        (host.read_volatile(), host.add(1).read_volatile())
    };
    ensure!(
        id == edu::EDU_ID && live == !0x0f0f_0f0f,
        "mmapped BAR0 reads {id:#x}, {live:#x}"
    );
    round_trip(
        &edu,
        &ram,
        (0x1000, 0x1000),
        (0x2000, 0x2000),
        &pattern(10, CHUNK),
    )?;
    diag("VfioPciDevice: BAR0 sized 1 MiB, ROM hidden, MMIO trapped and mmapped, DMA through the backend");

    // MSI: the guest programs address/data and enables; raising the edu
    // interrupt must signal the routed eventfd.
    let write_cfg =
        |off: u16, v: u32| view.write_region(edu::CONFIG_REGION, u64::from(off), &v.to_le_bytes());
    write_cfg(msi_cap + 4, 0xfee0_0000)?;
    let ctrl = config32_view(&view, msi_cap)? >> 16;
    let data_off = if ctrl & (1 << 7) != 0 { 0xc } else { 0x8 };
    write_cfg(msi_cap + data_off, 0x4021)?;
    write_cfg(msi_cap, (ctrl | 1) << 16)?;
    let route = {
        let r = routes
            .routes
            .lock()
            .map_err(|_| Failure("poisoned".into()))?;
        let (v, addr, data, fd) = r
            .first()
            .ok_or_else(|| Failure("MSI enabled but not routed".into()))?;
        ensure!(
            (*v, *addr, *data) == (0, 0xfee0_0000, 0x4021),
            "route {:?}",
            (v, addr, data)
        );
        fd.try_clone()?
    };
    view.write_region(edu::BAR0_REGION, 0x60, &1u32.to_le_bytes())?; // raise
    let mut got = false;
    for _ in 0..500 {
        if route.read().is_ok() {
            got = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    view.write_region(edu::BAR0_REGION, 0x64, &1u32.to_le_bytes())?; // acknowledge
    ensure!(got, "the edu interrupt did not signal the MSI eventfd");
    diag(
        "VfioPciDevice: MSI address/data intercepted, edu interrupt arrived on the routed eventfd",
    );
    backend.remove_device(EDU_ID)?;
    drop(dev);
    drop(backend);
    Ok(())
}

fn config32_view(view: &GuestView<'_>, off: u16) -> Result<u32, Failure> {
    let mut b = [0u8; 4];
    view.read_region(edu::CONFIG_REGION, u64::from(off), &mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// virtio-rng, modern only (`-device virtio-rng-pci,disable-legacy=on`): a
/// device with MSI-X.
const VIRTIO_RNG: (u16, u16) = (0x1af4, 0x1044);
/// `VFIO_PCI_MSIX_IRQ_INDEX` (INTx 0, MSI 1, MSI-X 2).
const MSIX_IRQ_INDEX: u32 = 2;

fn devices_vfio_msix(env: &Env) -> TestResult {
    let sysfs = pci::find_one(VIRTIO_RNG.0, VIRTIO_RNG.1)?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let routes = Arc::new(TestRoutes::default());
    let hooks = VfioHooks {
        msi: Some(Arc::clone(&routes) as Arc<dyn MsiRoutes>),
        bar_slots: None,
        dma_sync: None,
    };
    let mut dev = VfioPciDevice::open(&sysfs, Arc::clone(fd.inner()), hooks)?;
    // Find MSI-X in the guest-visible capability list.
    let mut ptr = config32(&mut dev, 0x34).to_le_bytes()[0] & 0xfc;
    let mut cap = None;
    while ptr >= 0x40 && cap.is_none() {
        let hdr = config32(&mut dev, u16::from(ptr)).to_le_bytes();
        if hdr[0] == 0x11 {
            cap = Some(u16::from(ptr));
        }
        ptr = hdr[1] & 0xfc;
    }
    let cap = cap.ok_or_else(|| Failure("no MSI-X capability in the guest's list".into()))?;
    let vectors = (config32(&mut dev, cap) >> 16 & 0x7ff) + 1;
    let table = config32(&mut dev, cap + 4);
    let (bir, table_off) = ((table & 7) as usize, u64::from(table & !7));
    ensure!(vectors >= 2, "{vectors} MSI-X vectors");
    let base = 0xc000_0000;
    devices::pci::PciDevice::set_bar_address(&mut dev, bir, base)?;
    devices::pci::PciDevice::write_config(&mut dev, 0x04, &COMMAND_MEMORY.to_le_bytes());
    // Vector 1: address and data, unmasked; vector 0 stays masked.
    let entry = table_off + 16;
    devices::BusDevice::write(&mut dev, base, entry, &0xfee0_0000u32.to_le_bytes());
    devices::BusDevice::write(&mut dev, base, entry + 4, &0u32.to_le_bytes());
    devices::BusDevice::write(&mut dev, base, entry + 8, &0x4061u32.to_le_bytes());
    devices::BusDevice::write(&mut dev, base, entry + 12, &0u32.to_le_bytes());
    devices::pci::PciDevice::write_config(&mut dev, cap + 2, &0x8000u16.to_le_bytes());
    let fired = {
        let r = routes
            .routes
            .lock()
            .map_err(|_| Failure("poisoned".into()))?;
        ensure!(
            r.len() == 1,
            "routes after enable: {} (want vector 1 only)",
            r.len()
        );
        let (v, addr, data, efd) = &r[0];
        ensure!(
            (*v, *addr, *data) == (1, 0xfee0_0000, 0x4061),
            "route {:?}",
            (v, addr, data)
        );
        efd.try_clone()?
    };
    // The kernel's loopback trigger stands in for the device raising vector 1.
    let vfio = dev
        .vfio_device()
        .ok_or_else(|| Failure("no VFIO device".into()))?;
    vfio.trigger_irq(MSIX_IRQ_INDEX, 1)?;
    ensure!(fired.read().is_ok(), "vector 1's eventfd did not fire");
    diag(format!(
        "MSI-X: {vectors} vectors, table in BAR{bir} at {table_off:#x} shadowed; vector 1 routed and signalled"
    ));
    Ok(())
}

/// Hides `/dev/iommu` (a rename) until dropped.
struct HiddenDevIommu<'a> {
    path: &'a Path,
    hidden: PathBuf,
}

impl<'a> HiddenDevIommu<'a> {
    fn new(path: &'a Path) -> std::io::Result<Self> {
        let hidden = path.with_extension("hidden");
        fs::rename(path, &hidden)?;
        Ok(Self { path, hidden })
    }
}

impl Drop for HiddenDevIommu<'_> {
    fn drop(&mut self) {
        let _ = fs::rename(&self.hidden, self.path);
    }
}

fn devices_vfio_legacy_container(env: &Env) -> TestResult {
    const BAR0: u64 = 0xc000_0000;
    let ram = GuestRam::new(c"guest-ram", RAM_SIZE)?;
    // Without /dev/iommu, the devices crate falls back to the container.
    let host = {
        let _hidden = HiddenDevIommu::new(&env.dev_iommu)?;
        HostIommu::open()?
    };
    let HostIommu::Container(container) = &host else {
        return Err(Failure(
            "HostIommu::open chose IOMMUFD without /dev/iommu".into(),
        ));
    };
    let mut dev = VfioPciDevice::open_with(&env.edu, &host, VfioHooks::default())?;
    ensure!(
        dev.iommufd_dev_id().is_none(),
        "a legacy device has no iommufd id"
    );
    // SAFETY: `ram` outlives the container mapping (unmapped below) and is
    // only accessed by raw-pointer copies.
    unsafe { container.vfio_dma_map(0, RAM_SIZE, ram.host_addr(0, RAM_SIZE)?)? };
    devices::pci::PciDevice::set_bar_address(&mut dev, 0, BAR0)?;
    let view = GuestView {
        dev: std::sync::Mutex::new(&mut dev),
        base: BAR0,
    };
    let edu = Edu::new(&view)?;
    round_trip(
        &edu,
        &ram,
        (0x1000, 0x1000),
        (0x3000, 0x3000),
        &pattern(11, CHUNK),
    )?;
    container.vfio_dma_unmap(0, RAM_SIZE)?;
    dma_blocked(&edu, &ram, 0x3000, 0x3000)?;
    diag("no /dev/iommu: legacy container chosen; DMA through VFIO type1 mapping, blocked after unmap");
    Ok(())
}

/// Guest memory and the pvIOMMU as the VMM holds them, for issuing the
/// guest's hypercalls from here: inputs go in a page of guest RAM, as a
/// guest kernel would put them.
struct Hypercalls<'a> {
    iommu: &'a iommu::Iommu,
    mem: &'a vm_memory::GuestMemoryMmap,
    input_gpa: u64,
}

impl Hypercalls<'_> {
    /// Issues call `code` with `input` (plus `reps` for a rep call);
    /// returns the status.
    fn call(
        &self,
        code: iommu::abi::HypercallCode,
        input: &[u8],
        reps: u16,
    ) -> Result<u16, Failure> {
        use vm_memory::{Bytes, GuestAddress};
        self.mem
            .write_slice(input, GuestAddress(self.input_gpa))
            .map_err(|e| Failure(format!("input page: {e}")))?;
        let mut control = iommu::abi::Control::new()
            .with_code(code.0)
            .with_rep_count(reps);
        loop {
            let regs = iommu::HypercallRegs {
                rcx: control.into_bits(),
                rdx: self.input_gpa,
                r8: 0,
            };
            match self.iommu.dispatch(self.mem, 0, regs) {
                iommu::HypercallOutcome::Complete { rax } => {
                    return Ok(iommu::abi::HypercallOutput::from_bits(rax).status())
                }
                iommu::HypercallOutcome::Continue { rcx } => {
                    control = iommu::abi::Control::from_bits(rcx)
                }
            }
        }
    }

    fn ok(
        &self,
        what: &str,
        code: iommu::abi::HypercallCode,
        input: &[u8],
        reps: u16,
    ) -> TestResult {
        match self.call(code, input, reps)? {
            0 => Ok(()),
            s => Err(Failure(format!("{what}: status {s:#x}"))),
        }
    }
}

fn hypercalls_drive_edu_through_iommufd(env: &Env) -> TestResult {
    use iommu::abi::{
        DeviceDomainId, DeviceDomainType, HypercallCode, InputAttachDeviceDomain,
        InputCreateDeviceDomain, InputDeleteDeviceDomain, InputDetachDeviceDomain,
        InputDeviceDomain, InputMapDeviceGpaPages, InputUnmapDeviceGpaPages, MapFlags,
    };
    use vm_memory::{Bytes, GuestAddress};
    use zerocopy::little_endian::{U32, U64};
    use zerocopy::IntoBytes;

    const IOVA: u64 = 0x80_0000;
    const PAGE: u64 = 0x6000; // GPA behind IOVA
    const INPUT: u64 = 0x1f_0000; // the hypercall input page
                                  // Guest RAM as the VMM has it (vm-memory), mirrored at IOVA = GPA.
    let mem = Arc::new(
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)])
            .map_err(|e| Failure(format!("guest memory: {e}")))?,
    );
    // pvmm's own passthrough glue (what vm.add-device with a path runs,
    // less the KVM hooks): /dev/iommu, guest RAM in an IOMMUFD backend,
    // the device opened on it and registered under its PCI name.
    let iommu = iommu::Iommu::new(iommu::IommuConfig::default())?;
    let pt = devices::vfio::Passthrough::open(
        &env.dev_iommu,
        &iommu,
        Arc::clone(&mem),
        NestFormat::VtdS1,
    )
    .map_err(ctx("passthrough"))?;
    let mut dev = pt
        .open_device(&env.edu, VfioHooks::default())
        .map_err(ctx("open edu"))?;
    pt.register(&iommu, EDU_ID, &dev)
        .map_err(ctx("register edu"))?;
    let backend = pt.backend();

    // A guest view of edu whose RAM is `mem`.
    const BAR0: u64 = 0xc000_0000;
    devices::pci::PciDevice::set_bar_address(&mut dev, 0, BAR0)?;
    let view = GuestView {
        dev: std::sync::Mutex::new(&mut dev),
        base: BAR0,
    };
    let edu = Edu::new(&view)?;
    let put = |gpa: u64, data: &[u8]| {
        mem.write_slice(data, GuestAddress(gpa))
            .map_err(|e| Failure(format!("write {gpa:#x}: {e}")))
    };
    let get = |gpa: u64| -> Result<Vec<u8>, Failure> {
        let mut b = vec![0u8; CHUNK];
        mem.read_slice(&mut b, GuestAddress(gpa))
            .map_err(|e| Failure(format!("read {gpa:#x}: {e}")))?;
        Ok(b)
    };
    // Through `iova`: RAM at `src` -> device -> RAM at `dst`.
    let dma =
        |iova_src: u64, src: u64, iova_dst: u64, dst: u64, seed: u32| -> Result<bool, Failure> {
            let p = pattern(seed, CHUNK);
            put(src, &p)?;
            put(dst, &vec![0u8; CHUNK])?;
            edu.dma(Direction::RamToDevice, iova_src, 0, CHUNK)?;
            edu.dma(Direction::DeviceToRam, iova_dst, 0, CHUNK)?;
            Ok(get(dst)? == p)
        };
    ensure!(
        dma(0x2000, 0x2000, 0x3000, 0x3000, 20)?,
        "default domain: DMA at IOVA = GPA failed"
    );

    let hc = Hypercalls {
        iommu: &iommu,
        mem: &mem,
        input_gpa: INPUT,
    };
    let domain = DeviceDomainId::with(DeviceDomainType::S2, 5);
    let header = InputDeviceDomain::new(domain);
    let create = InputCreateDeviceDomain {
        device_domain: header,
        create_device_domain_flags: U32::new(0),
    };
    hc.ok(
        "CREATE",
        HypercallCode::CREATE_DEVICE_DOMAIN,
        create.as_bytes(),
        0,
    )?;
    let attach = InputAttachDeviceDomain {
        device_domain: header,
        device_id: U64::new(EDU_ID.into_bits()),
    };
    hc.ok(
        "ATTACH",
        HypercallCode::ATTACH_DEVICE_DOMAIN,
        attach.as_bytes(),
        0,
    )?;
    ensure!(
        !dma(0x2000, 0x2000, 0x3000, 0x3000, 21)?,
        "IOVA = GPA still works in the S2 domain"
    );
    let map = InputMapDeviceGpaPages {
        device_domain: header,
        target_vtl: 0,
        padding: [0; 3],
        map_flags: U32::new(
            MapFlags::new()
                .with_readable(true)
                .with_writable(true)
                .into_bits(),
        ),
        target_device_va_base: U64::new(IOVA),
    };
    let mut input = map.as_bytes().to_vec();
    input.extend_from_slice(&(PAGE >> 12).to_le_bytes());
    hc.ok("MAP", HypercallCode::MAP_DEVICE_GPA_PAGES, &input, 1)?;
    ensure!(
        dma(IOVA, PAGE, IOVA + 0x800, PAGE + 0x800, 22)?,
        "DMA through the guest's mapping failed"
    );
    let unmap = InputUnmapDeviceGpaPages {
        device_domain: header,
        target_device_va_base: U64::new(IOVA),
    };
    hc.ok(
        "UNMAP",
        HypercallCode::UNMAP_DEVICE_GPA_PAGES,
        unmap.as_bytes(),
        1,
    )?;
    ensure!(
        !dma(IOVA, PAGE, IOVA + 0x800, PAGE + 0x800, 23)?,
        "DMA after UNMAP reached RAM"
    );
    let detach = InputDetachDeviceDomain {
        partition_id: U64::new(u64::MAX),
        device_id: U64::new(EDU_ID.into_bits()),
    };
    hc.ok(
        "DETACH",
        HypercallCode::DETACH_DEVICE_DOMAIN,
        detach.as_bytes(),
        0,
    )?;
    ensure!(
        dma(0x2000, 0x2000, 0x3000, 0x3000, 24)?,
        "after DETACH: IOVA = GPA failed"
    );
    let delete = InputDeleteDeviceDomain {
        device_domain: header,
    };
    hc.ok(
        "DELETE",
        HypercallCode::DELETE_DEVICE_DOMAIN,
        delete.as_bytes(),
        0,
    )?;
    let s = backend.stats();
    diag(format!(
        "hypercalls: CREATE, ATTACH, MAP (1 page), UNMAP, DETACH, DELETE; IOMMUFD: {} maps, {} unmaps, {} attaches",
        s.maps, s.unmaps, s.attaches
    ));
    pt.unregister(&iommu, EDU_ID)?;
    ensure!(
        !dma(0x2000, 0x2000, 0x3000, 0x3000, 25)?,
        "unregistered, the device still reaches guest RAM"
    );
    Ok(())
}

/// VT-d extended capability bits that decide nesting in Linux 6.12's
/// intel-iommu (`nested_supported`: scalable mode and NEST).
const VTD_ECAP_NEST: u64 = 1 << 26;
const VTD_ECAP_SMTS: u64 = 1 << 43;

/// The VT-d capability and extended capability registers the host kernel
/// reports for device `dev_id` (IOMMU_GET_HW_INFO): whether the host can
/// nest is a property of the (emulated) hardware, not of the kernel config.
fn vtd_hw_info(fd: &Iommufd, dev_id: u32) -> Result<(u64, u64), Failure> {
    use iommufd_bindings::iommufd::{
        iommu_hw_info, iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD as TYPE_VTD,
        iommu_hw_info_vtd,
    };
    let mut vtd = iommu_hw_info_vtd::default();
    let mut info = iommu_hw_info {
        size: u32::try_from(std::mem::size_of::<iommu_hw_info>())
            .map_err(|_| Failure("iommu_hw_info size".into()))?,
        dev_id,
        data_len: u32::try_from(std::mem::size_of::<iommu_hw_info_vtd>())
            .map_err(|_| Failure("iommu_hw_info_vtd size".into()))?,
        data_uptr: std::ptr::from_mut(&mut vtd) as u64,
        ..Default::default()
    };
    fd.inner()
        .get_hw_info(&mut info)
        .map_err(ctx("IOMMU_GET_HW_INFO"))?;
    // SAFETY: both members of the union are a u32; the kernel wrote the
    // output one.
    let ty = unsafe { info.__bindgen_anon_1.out_data_type };
    ensure!(
        ty == TYPE_VTD,
        "IOMMU_GET_HW_INFO: data type {ty}, not Intel VT-d"
    );
    Ok((vtd.cap_reg, vtd.ecap_reg))
}

/// The guest's first-stage table for the shadow test, written into the
/// memfd behind guest RAM (GPA = memfd offset) as a guest kernel would.
struct S1Writer<'a>(&'a GuestRam);

impl S1Writer<'_> {
    /// Present, writable, user (DMA is a user-mode access: U/S at every level).
    const RW: u64 = 0b111;
    /// Present, read-only, user.
    const RO: u64 = 0b101;
    /// A 2 MiB leaf at level 2.
    const PS: u64 = 1 << 7;

    /// Writes entry `index` of the table at GPA `table`.
    fn set(&self, table: u64, index: u64, entry: u64) -> TestResult {
        self.0.write(table + index * 8, &entry.to_le_bytes())?;
        Ok(())
    }
}

/// Host ioctls and time of one guest flush of the shadowed domain. The time
/// is the in-process dispatch of the hypercall (walk, diff, IOMMUFD calls),
/// under QEMU TCG: a figure to compare, not a KVM exit-to-return latency.
fn flush_figures(
    before: iommu::iommufd::IommufdStats,
    after: iommu::iommufd::IommufdStats,
    t: Duration,
) -> String {
    format!(
        "{} IOAS_MAP, {} IOAS_UNMAP, {} walk(s), {} entries read, {:.2} ms",
        after.maps.saturating_sub(before.maps),
        after.unmaps.saturating_sub(before.unmaps),
        after.shadow_walks.saturating_sub(before.shadow_walks),
        after
            .shadow_entries_read
            .saturating_sub(before.shadow_entries_read),
        t.as_secs_f64() * 1e3
    )
}

/// An S1 domain on a host without nesting (QEMU's VT-d), driven by the
/// guest's hypercalls: the backend must shadow the guest's table into an
/// IOAS of its own, so edu DMA follows the table as of the last flush (ABI
/// section 7). Checked on the real kernel and the emulated VT-d: the host
/// really has no nesting (so the test cannot pass through a nested HWPT);
/// 4 KiB and 2 MiB leaves mapped by FLUSH_DEVICE_DOMAIN_LIST carry DMA to
/// their GPAs; a read-only leaf refuses edu's write (data kept, DMAR fault
/// logged); a leaf cleared without a flush still translates (the shadow is
/// an IOTLB), and faults once FLUSH_DEVICE_DOMAIN is issued; a re-pointed
/// leaf moves the DMA; DELETE destroys the shadow IOAS. Prints host ioctls
/// and time per flush of 1, 512 and 262,144 pages.
fn hypercalls_drive_edu_through_shadowed_s1(env: &Env) -> TestResult {
    use iommu::abi::{
        DeviceDomainId, DeviceDomainSettings, DeviceDomainSettingsFlags, DeviceDomainType,
        FlushListEntry, HypercallCode, InputAttachDeviceDomain, InputConfigureDeviceDomain,
        InputCreateDeviceDomain, InputDeleteDeviceDomain, InputDetachDeviceDomain,
        InputDeviceDomain, InputFlushDeviceDomain, InputFlushDeviceDomainList,
    };
    use std::time::Instant;
    use vm_memory::{FileOffset, GuestAddress};
    use zerocopy::little_endian::{U32, U64};
    use zerocopy::IntoBytes;

    // Guest RAM: 16 MiB, GPA = memfd offset. Layout:
    const RAM: usize = 16 << 20;
    const INPUT: u64 = 0x1f_0000; // hypercall input page
    const PML4: u64 = 0x10_0000;
    const PDPT: u64 = 0x10_1000;
    const PD0: u64 = 0x10_2000; // IOVA 0 .. 1 GiB
    const PT0: u64 = 0x10_3000; // IOVA 8 MiB .. 10 MiB (PD0[4])
    const PD1: u64 = 0x10_4000; // IOVA 1 GiB .. 2 GiB (PDPT[1]), the flush figures
    const PT1: u64 = 0x60_0000; // 512 tables for PD1, 2 MiB
    const WINDOW: u64 = 0x80_0000; // 8 MiB of RAM the figures' pages point into
    const WINDOW_PAGES: u64 = 2048;
    // Data pages (GPA) and their IOVAs: 4 KiB leaves in PT0.
    const IOVA: u64 = 0x80_0000;
    const A: u64 = 0x20_0000; // IOVA + 0: present at CONFIGURE
    const B: u64 = 0x20_5000; // IOVA + 1 page: mapped by a flush
    const C: u64 = 0x20_9000; // IOVA + 2 pages: read-only
    const D: u64 = 0x20_c000; // IOVA + 0 re-pointed here
    const BIG_IOVA: u64 = 0xc0_0000; // PD0[6]: a 2 MiB leaf
    const BIG: u64 = 0x40_0000;
    const FIG_IOVA: u64 = 1 << 30;
    const DOMAIN: u32 = 9;
    let page = |n: u64| IOVA + n * 0x1000;

    // The host: QEMU's VT-d must not offer nesting (else this test could
    // pass through a nested HWPT, never shadowing).
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let dev = BoundDevice::open(&env.edu, &fd, false)?;
    let (cap, ecap) = vtd_hw_info(&fd, dev.dev_id)?;
    diag(format!(
        "VT-d cap {cap:#x} ecap {ecap:#x}: scalable mode {}, NEST {}",
        ecap & VTD_ECAP_SMTS != 0,
        ecap & VTD_ECAP_NEST != 0
    ));
    ensure!(
        ecap & VTD_ECAP_SMTS == 0 || ecap & VTD_ECAP_NEST == 0,
        "the emulated VT-d offers nesting (ecap {ecap:#x}): this test would not shadow"
    );

    let ram = GuestRam::new(c"guest-ram", RAM)?;
    let file = ram.file().try_clone()?;
    let mem = Arc::new(
        vm_memory::GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            RAM,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| Failure(format!("guest memory: {e}")))?,
    );
    // The backend as pvmm builds it (nesting tried first): the real host's
    // EOPNOTSUPP must switch it to shadowing.
    let backend = Arc::new(IommufdBackend::new(
        Arc::new(fd.clone()),
        NestFormat::VtdS1,
    )?);
    backend
        .add_guest_memory(Arc::clone(&mem))
        .map_err(ctx("guest memory in the backend"))?;
    let iommu = iommu::Iommu::new(iommu::IommuConfig {
        s1: true,
        ..Default::default()
    })?;
    let backend_id = iommu.add_backend(Arc::clone(&backend) as Arc<dyn Backend>);
    backend.add_host_device(
        EDU_ID,
        dev.dev_id,
        Arc::clone(&dev.device) as Arc<dyn AttachHwpt>,
    )?;
    iommu
        .register_device(EDU_ID, backend_id)
        .map_err(ctx("register edu"))?;
    let edu = Edu::new(&*dev.device)?;
    round_trip(
        &edu,
        &ram,
        (0x3000, 0x3000),
        (0x5000, 0x5000),
        &pattern(30, CHUNK),
    )
    .map_err(|e| Failure(format!("default domain: {e}")))?;

    // The table at CONFIGURE: IOVA -> A only.
    let t = S1Writer(&ram);
    t.set(PML4, 0, PDPT | S1Writer::RW)?;
    t.set(PDPT, 0, PD0 | S1Writer::RW)?;
    t.set(PD0, 4, PT0 | S1Writer::RW)?;
    t.set(PT0, 0, A | S1Writer::RW)?;

    let hc = Hypercalls {
        iommu: &iommu,
        mem: &mem,
        input_gpa: INPUT,
    };
    let header = InputDeviceDomain::new(DeviceDomainId::with(DeviceDomainType::S1, DOMAIN));
    let backend_domain = DOMAIN;
    let create = InputCreateDeviceDomain {
        device_domain: header,
        create_device_domain_flags: U32::new(0),
    };
    hc.ok(
        "CREATE",
        HypercallCode::CREATE_DEVICE_DOMAIN,
        create.as_bytes(),
        0,
    )?;
    let configure = InputConfigureDeviceDomain {
        device_domain: header,
        settings: DeviceDomainSettings {
            flags: U64::new(
                DeviceDomainSettingsFlags::new()
                    .with_translation_enabled(true)
                    .into_bits(),
            ),
            page_table_root: U64::new(PML4),
        },
    };
    hc.ok(
        "CONFIGURE",
        HypercallCode::CONFIGURE_DEVICE_DOMAIN,
        configure.as_bytes(),
        0,
    )?;
    let attach = InputAttachDeviceDomain {
        device_domain: header,
        device_id: U64::new(EDU_ID.into_bits()),
    };
    hc.ok(
        "ATTACH",
        HypercallCode::ATTACH_DEVICE_DOMAIN,
        attach.as_bytes(),
        0,
    )?;
    ensure!(
        backend.shadows_s1(),
        "the backend does not shadow S1 on a VT-d without nesting"
    );
    ensure!(
        backend.s1_hwpt(backend_domain).is_none(),
        "the S1 domain has a nested HWPT"
    );
    let shadow = backend
        .s1_shadow_ioas(backend_domain)
        .ok_or_else(|| Failure("no shadow IOAS after CONFIGURE + ATTACH".into()))?;
    ensure!(
        backend.object_ids().contains(&shadow),
        "the shadow IOAS {shadow} is not among the backend's objects"
    );
    let runs = backend.s1_shadow_runs(backend_domain);
    ensure!(
        runs.len() == 1 && runs[0].iova == IOVA && runs[0].gpa == A && runs[0].len == 0x1000,
        "shadow after ATTACH: {runs:x?}, not IOVA {IOVA:#x} -> {A:#x}"
    );
    // Mapped at ATTACH: DMA through IOVA reaches A; IOVA = GPA is gone.
    round_trip(
        &edu,
        &ram,
        (page(0), A),
        (page(0) + 0x800, A + 0x800),
        &pattern(31, CHUNK),
    )?;
    dma_blocked(&edu, &ram, 0x3000, 0x3000)
        .map_err(|e| Failure(format!("S1 domain: IOVA = GPA still works: {e}")))?;
    diag(format!(
        "S1 shadowed (IOAS {shadow}): the table at CONFIGURE/ATTACH maps IOVA {IOVA:#x} -> {A:#x}"
    ));

    // Map by writing PTEs, then FLUSH_DEVICE_DOMAIN_LIST: B (4 KiB), C (4
    // KiB, read-only), BIG (a 2 MiB leaf).
    t.set(PT0, 1, B | S1Writer::RW)?;
    t.set(PT0, 2, C | S1Writer::RO)?;
    t.set(PD0, 6, BIG | S1Writer::PS | S1Writer::RW)?;
    let list = InputFlushDeviceDomainList {
        device_domain: header,
        flags: U32::new(0),
        reserved: U32::new(0),
    };
    let flush_list = |entries: &[(u64, u16)]| -> Result<Duration, Failure> {
        let mut input = list.as_bytes().to_vec();
        for &(iova, shift) in entries {
            let e = FlushListEntry::new()
                .with_page_number(iova >> 12)
                .with_page_mask_shift(shift);
            input.extend_from_slice(&e.into_bits().to_le_bytes());
        }
        let reps = u16::try_from(entries.len()).map_err(|_| Failure("too many entries".into()))?;
        let start = Instant::now();
        hc.ok(
            "FLUSH_LIST",
            HypercallCode::FLUSH_DEVICE_DOMAIN_LIST,
            &input,
            reps,
        )?;
        Ok(start.elapsed())
    };
    let flush = InputFlushDeviceDomain {
        device_domain: header,
        flags: U32::new(0),
        reserved: U32::new(0),
    };
    let flush_all = || -> Result<Duration, Failure> {
        let start = Instant::now();
        hc.ok(
            "FLUSH",
            HypercallCode::FLUSH_DEVICE_DOMAIN,
            flush.as_bytes(),
            0,
        )?;
        Ok(start.elapsed())
    };
    flush_list(&[(page(1), 0), (page(2), 0), (BIG_IOVA, 9)])?;
    let runs = backend.s1_shadow_runs(backend_domain);
    let expect = [
        (page(0), A, 0x1000, Perms::RW),
        (page(1), B, 0x1000, Perms::RW),
        (page(2), C, 0x1000, Perms::R),
        (BIG_IOVA, BIG, 0x20_0000, Perms::RW),
    ];
    ensure!(
        runs.len() == expect.len()
            && runs
                .iter()
                .zip(expect)
                .all(|(r, (iova, gpa, len, perms))| r.iova == iova
                    && r.gpa == gpa
                    && r.len == len
                    && r.perms == perms),
        "shadow after FLUSH_LIST: {runs:x?}"
    );
    // 4 KiB leaf B, and across the 2 MiB leaf (first page -> last page).
    round_trip(
        &edu,
        &ram,
        (page(1), B),
        (page(1) + 0x800, B + 0x800),
        &pattern(32, CHUNK),
    )?;
    round_trip(
        &edu,
        &ram,
        (BIG_IOVA + 0x1000, BIG + 0x1000),
        (BIG_IOVA + 0x1f_f000, BIG + 0x1f_f000),
        &pattern(33, CHUNK),
    )?;
    diag("FLUSH_DEVICE_DOMAIN_LIST mapped a 4K leaf and a 2M leaf: edu DMA lands at their GPAs");

    // Read-only C: the device's write is refused, its read allowed. The
    // write comes first: QEMU's VT-d reports a permission fault only when it
    // walks its table, not on a hit in its IOTLB (which the read would fill
    // with the read-only entry; the write would then be dropped silently).
    let fault = blocked_and_logged(env, &edu, &ram, page(2), C)
        .map_err(|e| Failure(format!("read-only PTE: {e}")))?;
    diag(format!("read-only PTE: write refused: {fault}"));
    round_trip(&edu, &ram, (page(2), C), (page(1), B), &pattern(34, CHUNK))
        .map_err(|e| Failure(format!("read through the read-only PTE: {e}")))?;

    // Cleared without a flush: the shadow keeps the old translation (as an
    // IOTLB would) until the guest flushes (ABI section 7).
    t.set(PT0, 1, 0)?;
    round_trip(&edu, &ram, (page(0), A), (page(1), B), &pattern(35, CHUNK))
        .map_err(|e| Failure(format!("cleared, not flushed: {e}")))?;
    diag("PTE cleared, not flushed: DMA still reaches the old page (until the flush)");
    // FLUSH_DEVICE_DOMAIN: now it faults.
    flush_all()?;
    ensure!(
        !backend
            .s1_shadow_runs(backend_domain)
            .iter()
            .any(|r| r.iova == page(1)),
        "IOVA {:#x} still shadowed after FLUSH_DEVICE_DOMAIN",
        page(1)
    );
    let fault = blocked_and_logged(env, &edu, &ram, page(1), B)
        .map_err(|e| Failure(format!("cleared and flushed: {e}")))?;
    diag(format!("PTE cleared and flushed: write faulted: {fault}"));

    // Re-pointed: IOVA -> D, flushed by the list form.
    t.set(PT0, 0, D | S1Writer::RW)?;
    flush_list(&[(page(0), 0)])?;
    ram.write(A, &vec![0x5au8; CHUNK])?;
    round_trip(
        &edu,
        &ram,
        (BIG_IOVA, BIG),
        (page(0), D),
        &pattern(36, CHUNK),
    )
    .map_err(|e| Failure(format!("re-pointed: {e}")))?;
    let mut a = vec![0u8; CHUNK];
    ram.read(A, &mut a)?;
    ensure!(
        a.iter().all(|&b| b == 0x5a),
        "re-pointed: DMA still reached {A:#x}"
    );
    diag(format!(
        "PTE re-pointed and flushed: IOVA {IOVA:#x} now reaches {D:#x}"
    ));

    // Figures: host ioctls and time per flush. IOVA 1 GiB + 4K * k ->
    // WINDOW + 4K * ((k + s) mod 2048): 128 runs for 2^18 pages, since
    // scattered pages (a run each) would exceed the VM's run limit (64 Ki
    // runs for 16 MiB of RAM) and pin 1 GiB.
    let point = |k: u64, s: u64| WINDOW + ((k + s) % WINDOW_PAGES) * 0x1000;
    t.set(PDPT, 1, PD1 | S1Writer::RW)?;
    for i in 0..512 {
        t.set(PD1, i, (PT1 + i * 0x1000) | S1Writer::RW)?;
    }
    let pages: u64 = 1 << 18;
    let mut table = vec![0u8; 0x20_0000];
    for (k, e) in (0..pages).zip(table.chunks_exact_mut(8)) {
        e.copy_from_slice(&(point(k, 0) | S1Writer::RW).to_le_bytes());
    }
    ram.write(PT1, &table)?;
    let s0 = backend.stats();
    let el = flush_list(&[(FIG_IOVA, 18)])?;
    diag(format!(
        "flush of 262144 new pages (1 GiB, 2^18 in one entry): {}",
        flush_figures(s0, backend.stats(), el)
    ));
    // Each case shifts its pages by a window offset of its own (s), so
    // every one of them changes.
    for (s, (n, shift)) in (1u64..).zip([(1u64, 0u16), (512, 9), (262_144, 18)]) {
        for k in 0..n {
            t.set(
                PT1 + (k / 512) * 0x1000,
                k % 512,
                point(k, s) | S1Writer::RW,
            )?;
        }
        let s0 = backend.stats();
        let el = flush_list(&[(FIG_IOVA, shift)])?;
        diag(format!(
            "flush of {n} re-pointed page(s): {}",
            flush_figures(s0, backend.stats(), el)
        ));
        let s0 = backend.stats();
        let el = flush_list(&[(FIG_IOVA, shift)])?;
        diag(format!(
            "flush of {n} unchanged page(s): {}",
            flush_figures(s0, backend.stats(), el)
        ));
    }
    let s0 = backend.stats();
    let el = flush_all()?;
    diag(format!(
        "FLUSH_DEVICE_DOMAIN (whole table, unchanged): {}",
        flush_figures(s0, backend.stats(), el)
    ));
    let runs = backend.s1_shadow_runs(backend_domain);
    let fig_runs = runs.iter().filter(|r| r.iova >= FIG_IOVA).count();
    ensure!(
        runs.iter()
            .filter(|r| r.iova >= FIG_IOVA)
            .map(|r| r.len)
            .sum::<u64>()
            == pages * 0x1000,
        "the shadow does not map all {pages} pages of the figures' range"
    );
    diag(format!(
        "shadow holds {} runs, {fig_runs} of them for the 2^18 pages",
        runs.len()
    ));

    // DETACH: back to IOVA = GPA. DELETE: the shadow IOAS is destroyed.
    let detach = InputDetachDeviceDomain {
        partition_id: U64::new(u64::MAX),
        device_id: U64::new(EDU_ID.into_bits()),
    };
    hc.ok(
        "DETACH",
        HypercallCode::DETACH_DEVICE_DOMAIN,
        detach.as_bytes(),
        0,
    )?;
    round_trip(
        &edu,
        &ram,
        (0x3000, 0x3000),
        (0x5000, 0x5000),
        &pattern(37, CHUNK),
    )
    .map_err(|e| Failure(format!("after DETACH: {e}")))?;
    let delete = InputDeleteDeviceDomain {
        device_domain: header,
    };
    hc.ok(
        "DELETE",
        HypercallCode::DELETE_DEVICE_DOMAIN,
        delete.as_bytes(),
        0,
    )?;
    ensure!(
        backend.s1_shadow_ioas(backend_domain).is_none() && !backend.object_ids().contains(&shadow),
        "the backend still holds the shadow IOAS {shadow} after DELETE"
    );
    all_destroyed(&fd, &[("shadow IOAS", shadow)])?;
    let s = backend.stats();
    diag(format!(
        "shadow IOAS {shadow} destroyed (IOMMU_DESTROY: ENOENT); backend totals: {} maps, {} unmaps, {} attaches, {} walks, {} entries read",
        s.maps, s.unmaps, s.attaches, s.shadow_walks, s.shadow_entries_read
    ));

    iommu.unregister_device(EDU_ID)?;
    dma_blocked(&edu, &ram, 0x3000, 0x3000).map_err(|e| Failure(format!("unregistered: {e}")))?;
    let ids = backend.object_ids();
    drop(iommu);
    drop(backend);
    let named: Vec<(&str, u32)> = ids.iter().map(|&id| ("backend object", id)).collect();
    all_destroyed(&fd, &named)?;
    Ok(())
}

fn hypercalls_s1_flushes_reach_the_nested_hwpt(env: &Env) -> TestResult {
    use iommu::abi::{
        DeviceDomainId, DeviceDomainSettings, DeviceDomainSettingsFlags, DeviceDomainType,
        FlushListEntry, HypercallCode, InputAttachDeviceDomain, InputConfigureDeviceDomain,
        InputCreateDeviceDomain, InputDeviceDomain, InputFlushDeviceDomain,
        InputFlushDeviceDomainList,
    };
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    use zerocopy::little_endian::{U32, U64};
    use zerocopy::IntoBytes;

    const D: u32 = IOMMU_TEST_IOTLB_DEFAULT;
    // The mock domain's aperture starts at 16 MiB: guest RAM lives there.
    const GPA: u64 = 0x100_0000;
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(GPA), RAM_SIZE)])
        .map_err(|e| Failure(format!("guest memory: {e}")))?;
    let host = mem
        .get_host_address(GuestAddress(GPA))
        .map_err(|e| Failure(format!("host address: {e}")))?;
    let fd = Iommufd::open_path(&env.dev_iommu)?;
    let backend = Arc::new(IommufdBackend::new(
        Arc::new(fd.clone()),
        NestFormat::Selftest,
    )?);
    // SAFETY: `mem` outlives the backend and is only accessed by vm-memory.
    unsafe { backend.add_ram_region(GPA, RAM_SIZE as u64, host)? };
    let iommu = iommu::Iommu::new(iommu::IommuConfig {
        s1: true,
        ..Default::default()
    })?;
    let backend_id = iommu.add_backend(Arc::clone(&backend) as Arc<dyn Backend>);
    let mut mock = IommuTestCmd::new(backend.direct_ioas(), MockDomain::default());
    fd.test_cmd(&mut mock).map_err(ctx("MOCK_DOMAIN"))?;
    let (stdev, idev) = (mock.payload.out_stdev_id, mock.payload.out_idev_id);
    backend.add_host_device(
        EDU_ID,
        idev,
        Arc::new(MockDevice {
            fd: fd.clone(),
            stdev,
        }),
    )?;
    iommu.register_device(EDU_ID, backend_id)?;

    let hc = Hypercalls {
        iommu: &iommu,
        mem: &mem,
        input_gpa: GPA + 0x10_0000,
    };
    let header = InputDeviceDomain::new(DeviceDomainId::with(DeviceDomainType::S1, 6));
    let create = InputCreateDeviceDomain {
        device_domain: header,
        create_device_domain_flags: U32::new(0),
    };
    hc.ok(
        "CREATE",
        HypercallCode::CREATE_DEVICE_DOMAIN,
        create.as_bytes(),
        0,
    )?;
    let configure = InputConfigureDeviceDomain {
        device_domain: header,
        settings: DeviceDomainSettings {
            flags: U64::new(
                DeviceDomainSettingsFlags::new()
                    .with_translation_enabled(true)
                    .into_bits(),
            ),
            page_table_root: U64::new(GPA + 0x2000),
        },
    };
    hc.ok(
        "CONFIGURE",
        HypercallCode::CONFIGURE_DEVICE_DOMAIN,
        configure.as_bytes(),
        0,
    )?;
    let attach = InputAttachDeviceDomain {
        device_domain: header,
        device_id: U64::new(EDU_ID.into_bits()),
    };
    hc.ok(
        "ATTACH",
        HypercallCode::ATTACH_DEVICE_DOMAIN,
        attach.as_bytes(),
        0,
    )?;
    let nested = backend
        .s1_hwpt(6)
        .ok_or_else(|| Failure("no nested HWPT after CONFIGURE + ATTACH".into()))?;
    check_iotlb(&fd, nested, [D; 4])?;

    // Pages 5 and 6 as two entries: merged into one range, which the mock
    // turns into its IOTLB entries 1 and 2.
    let list = InputFlushDeviceDomainList {
        device_domain: header,
        flags: U32::new(0),
        reserved: U32::new(0),
    };
    let mut input = list.as_bytes().to_vec();
    for page in [5u64, 6] {
        let e = FlushListEntry::new()
            .with_page_number(page)
            .with_page_mask_shift(0);
        input.extend_from_slice(&e.into_bits().to_le_bytes());
    }
    hc.ok(
        "FLUSH_LIST",
        HypercallCode::FLUSH_DEVICE_DOMAIN_LIST,
        &input,
        2,
    )?;
    check_iotlb(&fd, nested, [D, 0, 0, D])?;
    let stats = backend.stats();
    ensure!(
        stats.invalidations == 1,
        "2 adjacent entries gave {} invalidations",
        stats.invalidations
    );
    let flush = InputFlushDeviceDomain {
        device_domain: header,
        flags: U32::new(0),
        reserved: U32::new(0),
    };
    hc.ok(
        "FLUSH",
        HypercallCode::FLUSH_DEVICE_DOMAIN,
        flush.as_bytes(),
        0,
    )?;
    check_iotlb(&fd, nested, [0; 4])?;
    diag("hypercalls: FLUSH_DEVICE_DOMAIN_LIST (2 entries, 1 range) and FLUSH_DEVICE_DOMAIN reached the mock IOTLB");

    iommu.unregister_device(EDU_ID)?;
    fd.destroy(stdev).map_err(ctx("destroy the mock device"))?;
    Ok(())
}

/// A guest's view of the PCI function in `slot` of `root`: configuration
/// space through the root, BAR0 through the MMIO bus at `bar0`.
struct BusView<'a> {
    root: &'a std::sync::Mutex<devices::pci::PciRoot>,
    mmio: &'a devices::bus::Bus,
    slot: u8,
    bar0: u64,
}

/// Where an access of [`BusView`] goes.
enum Target {
    /// The MMIO bus at this address.
    Bar(u64),
    /// Configuration space at this offset.
    Config(u16),
}

impl BusView<'_> {
    /// Where `region` at `offset` is, or the error for an access of `len`
    /// bytes there.
    fn target(&self, region: u32, offset: u64, len: usize) -> edu::Result<Target> {
        match (region, u16::try_from(offset)) {
            (edu::BAR0_REGION, _) => Ok(Target::Bar(self.bar0 + offset)),
            (edu::CONFIG_REGION, Ok(off)) => Ok(Target::Config(off)),
            _ => Err(edu::Error::RegionRange {
                region,
                offset,
                len,
            }),
        }
    }

    fn root(&self) -> std::sync::MutexGuard<'_, devices::pci::PciRoot> {
        devices::lock::mutex(self.root)
    }

    fn addr(&self) -> devices::pci::PciAddress {
        devices::pci::PciAddress::slot(self.slot)
    }
}

impl RegionAccess for BusView<'_> {
    fn read_region(&self, region: u32, offset: u64, buf: &mut [u8]) -> edu::Result<()> {
        match self.target(region, offset, buf.len())? {
            Target::Bar(a) if !self.mmio.read(a, buf) => Err(edu::Error::RegionRange {
                region,
                offset,
                len: buf.len(),
            }),
            Target::Bar(_) => Ok(()),
            Target::Config(off) => {
                self.root().config_read(self.addr(), off, buf);
                Ok(())
            }
        }
    }

    fn write_region(&self, region: u32, offset: u64, data: &[u8]) -> edu::Result<()> {
        match self.target(region, offset, data.len())? {
            Target::Bar(a) if !self.mmio.write(a, data) => Err(edu::Error::RegionRange {
                region,
                offset,
                len: data.len(),
            }),
            Target::Bar(_) => Ok(()),
            Target::Config(off) => {
                self.root().config_write(self.addr(), off, data);
                Ok(())
            }
        }
    }
}

/// Hot-add and hot-remove of edu the way pvmm's API does them, with the
/// same pieces, less KVM (there is none under TCG, so no MSI routes or BAR
/// memory slots: BAR0 is trapped). Add: opened through
/// [`devices::vfio::Passthrough`], plugged into a PCI root in a free slot,
/// registered under its BDF, PCIU and the GED event raised; the "guest"
/// finds it in configuration space, programs BAR0 and DMAs at IOVA = GPA.
/// Remove: PCID and the GED event, the guest's B0EJ, unregister, unplug,
/// drop. Twice: the second add only works if the removal closed the device
/// and gave back everything.
fn hotplug_edu_like_the_api(env: &Env) -> TestResult {
    use devices::acpi_hotplug::{AcpiHotplug, B0EJ, GEDS, GED_PCI_HOTPLUG, PCID, PCIU};
    use devices::bus::{Bus, BusDevice};
    use devices::legacy::EventFdTrigger;
    use devices::pci::PciRoot;
    use devices::vfio::Passthrough;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const SLOT: u8 = 3;
    const BAR0: u64 = 0xc000_0000;
    let iid = DeviceId::pci(0, 0, SLOT, 0);
    let mem = Arc::new(
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)])
            .map_err(|e| Failure(format!("guest memory: {e}")))?,
    );
    let iommu = iommu::Iommu::new(iommu::IommuConfig::default())?;
    let pt = Passthrough::open(&env.dev_iommu, &iommu, Arc::clone(&mem), NestFormat::VtdS1)
        .map_err(ctx("passthrough"))?;
    let mmio = Arc::new(Bus::new());
    let root = Mutex::new(PciRoot::new(Arc::clone(&mmio), Arc::new(Bus::new())));
    let ged = EventFd::new(EFD_NONBLOCK)?;
    let eject = EventFd::new(EFD_NONBLOCK)?;
    let mut hp = AcpiHotplug::new(EventFdTrigger::try_clone_from(&ged)?, eject.try_clone()?);
    let reg = |hp: &mut AcpiHotplug, offset: u64| {
        let mut b = [0u8; 4];
        hp.read(0, offset, &mut b);
        u32::from_le_bytes(b)
    };

    for round in 0..2u32 {
        // vm.add-device {"path": edu}
        let dev = Arc::new(Mutex::new(
            pt.open_device(&env.edu, VfioHooks::default())
                .map_err(ctx("open edu"))?,
        ));
        devices::lock::mutex(&root).add_device(SLOT, dev.clone(), dev.clone())?;
        pt.register(&iommu, iid, &devices::lock::mutex(&dev))
            .map_err(ctx("register edu"))?;
        hp.slot_added(SLOT);
        ensure!(ged.read().is_ok(), "round {round}: no GED interrupt on add");
        ensure!(
            reg(&mut hp, GEDS) & GED_PCI_HOTPLUG != 0,
            "round {round}: GEDS has no PCI hotplug event"
        );
        ensure!(
            reg(&mut hp, PCIU) == 1 << SLOT,
            "round {round}: PCIU does not name slot {SLOT}"
        );

        // The guest: identifies the function, gives BAR0 an address, DMAs.
        let view = BusView {
            root: &root,
            mmio: &mmio,
            slot: SLOT,
            bar0: BAR0,
        };
        let mut id = [0u8; 4];
        view.read_region(edu::CONFIG_REGION, 0, &mut id)?;
        ensure!(
            u32::from_le_bytes(id) == 0x11e8_1234,
            "round {round}: slot {SLOT} reads id {:#x}",
            u32::from_le_bytes(id)
        );
        #[allow(clippy::cast_possible_truncation)]
        view.write_region(edu::CONFIG_REGION, 0x10, &(BAR0 as u32).to_le_bytes())?;
        let edu = Edu::new(&view)?;
        let p = pattern(30 + round, CHUNK);
        mem.write_slice(&p, GuestAddress(0x2000))
            .map_err(|e| Failure(format!("write: {e}")))?;
        mem.write_slice(&vec![0u8; CHUNK], GuestAddress(0x3000))
            .map_err(|e| Failure(format!("write: {e}")))?;
        edu.dma(Direction::RamToDevice, 0x2000, 0, CHUNK)?;
        edu.dma(Direction::DeviceToRam, 0x3000, 0, CHUNK)?;
        let mut back = vec![0u8; CHUNK];
        mem.read_slice(&mut back, GuestAddress(0x3000))
            .map_err(|e| Failure(format!("read: {e}")))?;
        ensure!(back == p, "round {round}: DMA at IOVA = GPA lost the data");

        // vm.remove-device: PCID and the GED, the guest's _EJ0 writes B0EJ.
        hp.request_eject(SLOT);
        ensure!(
            ged.read().is_ok(),
            "round {round}: no GED interrupt on remove"
        );
        ensure!(
            reg(&mut hp, PCID) == 1 << SLOT,
            "round {round}: PCID does not name slot {SLOT}"
        );
        hp.write(0, B0EJ, &(1u32 << SLOT).to_le_bytes());
        ensure!(
            eject.read().is_ok(),
            "round {round}: B0EJ did not signal the VMM"
        );
        ensure!(
            hp.take_ejected() == 1 << SLOT,
            "round {round}: the eject is not for slot {SLOT}"
        );
        pt.unregister(&iommu, iid)?;
        devices::lock::mutex(&root).remove_device(SLOT)?;
        ensure!(
            mmio.ranges().is_empty(),
            "round {round}: BAR0 is still on the MMIO bus"
        );
        ensure!(
            iommu.device_attachment(iid).is_none(),
            "round {round}: the pvIOMMU still knows the device"
        );
        ensure!(
            Arc::strong_count(&dev) == 1,
            "round {round}: something still holds the device"
        );
        drop(dev);
    }
    diag(format!(
        "hotplug: edu added in slot {SLOT}, DMA checked, ejected and removed, twice; IOMMUFD: {} attaches",
        pt.backend().stats().attaches
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_not_constant() {
        assert_eq!(pattern(7, 64), pattern(7, 64));
        assert_ne!(pattern(7, 64), pattern(8, 64));
        let p = pattern(1, 4096);
        assert!(p.iter().any(|&b| b != p[0]));
    }

    #[test]
    fn chain_joins_sources() {
        let e = iommufd::Iommufd::open_path(Path::new("/nonexistent/x"))
            .err()
            .expect("fails");
        let s = ErrorChain(&e).to_string();
        assert!(s.starts_with("No /nonexistent/x"), "{s}");
        assert!(s.contains("No such file"), "{s}");
    }

    #[test]
    fn every_test_fails_cleanly_without_a_guest() {
        // On a machine without the edu device and /dev/iommu, each test must
        // return an error, never panic.
        let env = Env {
            edu: PathBuf::from("/nonexistent/0000:00:03.0"),
            dev_iommu: PathBuf::from("/nonexistent/iommu"),
            kmsg: PathBuf::from("/nonexistent/kmsg"),
        };
        for (name, test) in VFIO_TESTS.iter().chain(SELFTEST_TESTS) {
            if *name == "bad input: no /dev/iommu" {
                continue; // renames env.dev_iommu; covered by its error path
            }
            assert!(test(&env).is_err(), "{name} passed without a guest");
        }
    }
}

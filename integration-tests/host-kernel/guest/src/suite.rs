//! The tests that run inside the QEMU guest, against the real host kernel:
//! VFIO cdev + IOMMUFD + emulated VT-d + QEMU's edu DMA engine.
// IOAS_MAP of guest RAM is unsafe (see `Iommufd::ioas_map`).
#![allow(unsafe_code)]

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iommufd_bindings::iommufd::{
    iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE as HWPT_DATA_NONE,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT as HWPT_ALLOC_NEST_PARENT,
};

use crate::edu::{Direction, Edu};
use crate::iommufd::{self, Iommufd};
use crate::kmsg::Kmsg;
use crate::pci;
use crate::ram::GuestRam;
use crate::tap::{diag, TapWriter};
use crate::uapi::{
    CheckIotlb, HwptInvalidateSelftest, HwptSelftest, IommuTestCmd, MockDomain, MockDomainReplace,
    IOMMU_HWPT_DATA_SELFTEST, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, IOMMU_TEST_INVALIDATE_FLAG_ALL,
    IOMMU_TEST_IOTLB_DEFAULT, MOCK_NESTED_DOMAIN_IOTLB_ID_MAX, MOCK_NESTED_DOMAIN_IOTLB_NUM,
};
use crate::vfio::{self, BoundDevice};

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
        Failure(chain(&e))
    }
}

/// `error: cause: cause...`
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
];

/// The IOMMUFD selftest-mock suite. Linux 6.12 probes a device without
/// firmware node with the first IOMMU driver registered, so the mock device
/// only gets its mock IOMMU when VT-d is off: this suite runs in a boot of
/// its own, without intel-iommu.
pub const SELFTEST_TESTS: Suite = &[(
    "selftest mock: nested HWPT over NEST_PARENT, invalidation",
    selftest_nested_invalidate,
)];

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
fn round_trip(
    edu: &Edu<'_, vfio_ioctls::VfioDevice>,
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

    let (ranges, align) = fd.iova_ranges(ioas)?;
    ensure!(
        ranges.iter().any(|r| r.contains(0, RAM_SIZE as u64)),
        "IOVA ranges before attach {ranges:x?} do not allow the RAM"
    );
    // SAFETY: the mapping lives in `ram`, which outlives the IOAS mapping
    // (`dev`, and with it the IOAS, is dropped first); RAM is only accessed
    // through GuestRam's raw-pointer copies.
    unsafe { fd.ioas_map(ioas, 0, ram.host_addr(0, RAM_SIZE)?, RAM_SIZE, true)? };
    dev.device.attach_hwpt(ioas)?;

    // Attaching adds the device's reserved regions (the MSI window on VT-d).
    let (ranges, _) = fd.iova_ranges(ioas)?;
    diag(format!(
        "IOVA ranges after attach: {ranges:x?}, alignment {align:#x}"
    ));
    ensure!(
        !ranges.iter().any(|r| r.contains(0xfee0_0000, 1)),
        "the MSI window 0xfee00000 is still allowed after attach: {ranges:x?}"
    );
    ensure!(
        ranges.iter().any(|r| r.contains(0, RAM_SIZE as u64)),
        "IOVA ranges after attach {ranges:x?} no longer allow the RAM"
    );

    let edu = Edu::new(&dev.device)?;
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
    unsafe { fd.ioas_map(s2, IOVA, ram.host_addr(PAGE, 4096)?, 4096, true)? };
    // Replace the direct-attach IOAS by the S2 domain.
    dev.device.attach_hwpt(s2)?;
    let edu = Edu::new(&dev.device)?;

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
    unsafe { fd.ioas_map(s2, IOVA + 0x1000, ram.host_addr(OTHER, 4096)?, 4096, true)? };
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
    unsafe { fd.ioas_map(ioas, 0x10_0000, ram.host_addr(0, 0x4000)?, 0x4000, true)? };
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
    move |e| Failure(format!("{what}: {}", chain(&e)))
}

/// Checks that every id in `ids` is gone: IOMMU_DESTROY answers ENOENT.
fn all_destroyed(fd: &Iommufd, ids: &[(&str, u32)]) -> TestResult {
    for &(what, id) in ids {
        match fd.destroy(id) {
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Ok(()) => return Err(Failure(format!("{what} {id} still existed"))),
            Err(e) => return Err(Failure(format!("{what} {id}: {}", chain(&e)))),
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
    unsafe { fd.ioas_map(direct, 0, ram.host_addr(0, RAM_SIZE)?, RAM_SIZE, true)? };
    let s2 = fd.ioas_alloc()?;
    // SAFETY: as above.
    unsafe { fd.ioas_map(s2, 0x1000, ram.host_addr(0x1000, 0x1000)?, 0x1000, true)? };
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
                chain(&e)
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
        .hwpt_alloc::<()>(idev, ioas, HWPT_ALLOC_NEST_PARENT, HWPT_DATA_NONE, None)
        .map_err(ctx("HWPT_ALLOC of the NEST_PARENT"))?;
    let data = HwptSelftest { iotlb: D };
    let nested = fd
        .hwpt_alloc(idev, parent, 0, IOMMU_HWPT_DATA_SELFTEST, Some(&data))
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
    let done = fd.hwpt_invalidate(
        nested,
        IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
        &[entry(1), entry(3)],
    )?;
    ensure!(done == 2, "invalidation handled {done} of 2 entries");
    check_iotlb(&fd, nested, [D, 0, D, 0])?;

    // A bad second entry: the first is done, entry_num says where it stopped.
    let bad = [entry(2), entry(MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1)];
    match fd.hwpt_invalidate(nested, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, &bad) {
        Err(iommufd::Error::Invalidate {
            index: 1,
            count: 2,
            source,
            ..
        }) if source.errno() == libc::EINVAL => {}
        other => return Err(Failure(format!("bad entry 1 gave {other:?}"))),
    }
    check_iotlb(&fd, nested, [D, 0, 0, 0])?;
    match fd.hwpt_invalidate(nested, 0x0dad_beef, &[entry(0)]) {
        Err(e) if e.errno() == Some(libc::EINVAL) => {}
        other => return Err(Failure(format!("an unknown data type gave {other:?}"))),
    }
    check_iotlb(&fd, nested, [D, 0, 0, 0])?;
    let all = HwptInvalidateSelftest {
        flags: IOMMU_TEST_INVALIDATE_FLAG_ALL,
        iotlb_id: 0,
    };
    let done = fd.hwpt_invalidate(nested, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, &[all])?;
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
        Err(e @ vfio::Error::NotVfioDevice { .. }) => {
            diag(format!("error: {e}"));
            Ok(())
        }
        Err(e) => Err(Failure(format!("wrong error: {}", chain(&e)))),
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
            Err(e @ vfio::Error::AlreadyBound { .. }) => diag(format!("{what}: {}", chain(&e))),
            Err(e) => return Err(Failure(format!("{what}: wrong error: {}", chain(&e)))),
            Ok(_) => return Err(Failure(format!("a second bind through {what} worked"))),
        }
    }
    Ok(())
}

fn bad_no_dev_iommu(env: &Env) -> TestResult {
    let hidden = env.dev_iommu.with_extension("hidden");
    fs::rename(&env.dev_iommu, &hidden)?;
    let result = Iommufd::open_path(&env.dev_iommu);
    // Put it back before judging, so later tests still have it.
    fs::rename(&hidden, &env.dev_iommu)?;
    match result {
        Err(e @ iommufd::Error::NoIommufd { .. }) => {
            diag(format!("error: {}", chain(&e)));
            Ok(())
        }
        Err(e) => Err(Failure(format!("wrong error: {}", chain(&e)))),
        Ok(_) => Err(Failure("opened a missing /dev/iommu".into())),
    }
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
        let s = chain(&e);
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

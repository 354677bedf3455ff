//! hvclock (run only when named in `tk.tests`): the Hyper-V reference time
//! against the host's clock. Prints `hvclock: t0 <TIME_REF_COUNT>`, waits
//! until the reference counter has advanced `tk.hvclock_s` seconds (default
//! 10), and prints `hvclock: t1 <TIME_REF_COUNT>`; the host times the two
//! lines with its own clock (tests/pviommu.rs). With a reference TSC page,
//! each line also gives the page's time at a TSC read between two MSR reads.

use crate::pviommu as hv;
use crate::tap::Verdict;
use crate::{fail, println, x86, Ctx};
use pviommu_abi::{msr, OverlayPageMsr, REFERENCE_TIME_HZ};

/// One reading: TIME_REF_COUNT, and the page's time if there is a page.
fn reading(page: bool) -> (u64, Option<u64>) {
    let t = x86::rdmsr(msr::TIME_REF_COUNT);
    let p = page
        .then(|| hv::read_tsc_page().reference_time(x86::rdtsc()))
        .flatten();
    (t, p)
}

pub fn run(ctx: &Ctx) -> Verdict {
    let f = match hv::detect_hyperv() {
        Ok(f) => f,
        Err(e) => return Ok(Some(e)),
    };
    if !f.time_ref_count() {
        fail!("CPUID 0x40000003 EAX bit 1 (TIME_REF_COUNT) is clear");
    }
    let secs: u64 = ctx
        .arg("tk.hvclock_s")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .min(600);
    let page = f.reference_tsc();
    if page {
        let value = OverlayPageMsr::new()
            .with_enable(true)
            .with_gpn(hv::tsc_page() >> 12);
        x86::wrmsr(msr::REFERENCE_TSC, value.into_bits());
    }
    let (t0, p0) = reading(page);
    println!("hvclock: t0 {} page {}", t0, p0.unwrap_or(0));
    let end = t0 + secs * REFERENCE_TIME_HZ;
    let mut t = t0;
    while t < end {
        // About 1 ms between reads (each is an exit to the VMM).
        x86::delay_ticks(x86::TSC_PER_MS);
        t = x86::rdmsr(msr::TIME_REF_COUNT);
    }
    let (t1, p1) = reading(page);
    println!("hvclock: t1 {} page {}", t1, p1.unwrap_or(0));
    if page {
        x86::wrmsr(msr::REFERENCE_TSC, 0);
    }
    if t1 < t0 + secs * REFERENCE_TIME_HZ {
        fail!("TIME_REF_COUNT went from {} to {}", t0, t1);
    }
    Ok(None)
}

//! runflood (run only when named in `tk.tests`): the hostile guest of
//! security issue 11, item 1. It tries to make the VMM spend memory on
//! mapping runs: S2 domains (up to 256) mapping every other guest page
//! (alternating GPNs, so no two reps merge into one run) at fresh IOVAs, 507
//! reps a call, until the VMM answers INSUFFICIENT_MEMORY in every domain
//! (each new domain refused at its first rep) or `tk.runflood_reps` reps
//! have been accepted (default 2^22: without the VM-wide run limit that is
//! 4 Mi runs, hundreds of MiB of VMM heap). The host measures pvmm's peak
//! RSS (tests/hostile_memory.rs); `tk.runflood_reps=0` maps nothing, for
//! its baseline.
//!
//! With `tk.iommu_dev=BB:DD.F`, that device is attached to the first domain
//! first, so its runs are also copied into a backend instance (the dearest
//! case the run limit's memory bound covers).
//!
//! Reports, as diagnostics, the reps accepted and what stopped the flood;
//! fails on any status but SUCCESS and INSUFFICIENT_MEMORY.
//!
//! Speed (ring 0 is emulated on the development machines): the GPN list is
//! built once and copied into the input page with one string copy per
//! domain; each call rewrites only the 40-byte header.

use crate::pviommu::{self as hv, Io, Outcome};
use crate::{diag, fail, Ctx};
use pviommu_abi::{
    Control, HvStatus, HypercallCode, InputMapDeviceGpaPages, MapFlags, MAP_MAX_REPS_PER_PAGE,
};
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

/// Device domains the VMM allows a guest (IommuConfig::max_domains).
const DOMAINS: u32 = 256;
/// Reps accepted after which the flood stops anyway.
const DEFAULT_CAP: u64 = 1 << 22;
/// Reps per call: one full input page.
const REPS: u16 = MAP_MAX_REPS_PER_PAGE;
/// The first GPN mapped (RAM at 2 MiB); the list is GPN, GPN + 2, ...
const GPN: u64 = 0x200;
const PAGE: u64 = 4096;
/// Offset of the GPN list in MAP_DEVICE_GPA_PAGES's input.
const LIST: usize = core::mem::size_of::<InputMapDeviceGpaPages>();

pub fn run(ctx: &Ctx) -> crate::tap::Verdict {
    if let Err(e) = hv::detect() {
        fail!("runflood needs the pvIOMMU: {}", e);
    }
    if let Err(e) = hv::enable(0x8100_0000_0001_0000) {
        fail!("{}", e);
    }
    let cap = match ctx.arg("tk.runflood_reps").map(str::parse::<u64>) {
        None => DEFAULT_CAP,
        Some(Ok(n)) => n,
        Some(Err(_)) => fail!("tk.runflood_reps is not a number"),
    };
    let device = match ctx.arg("tk.iommu_dev") {
        None => None,
        Some(s) => match super::pviommu::parse_bdf(s) {
            Some(d) => Some(d),
            None => fail!("tk.iommu_dev={} is not BB:DD.F", s),
        },
    };
    let io = Io::of(0);
    let mut list = [0u64; REPS as usize];
    for (i, slot) in list.iter_mut().enumerate() {
        *slot = (GPN + 2 * i as u64).to_le();
    }
    let flags = MapFlags::new().with_readable(true).with_writable(true);

    let mut accepted = 0u64;
    let mut calls = 0u64;
    let mut domains = 0u32;
    let mut refused_at_first_rep = 0u32;
    // The first INSUFFICIENT_MEMORY: domain, reps accepted before it.
    let mut first_refusal = None;
    'domains: for id in 1..=DOMAINS {
        if accepted >= cap {
            break;
        }
        let d = hv::s2(id);
        let o = hv::create_domain(&io, d);
        if !o.ok() {
            fail!(
                "CREATE of S2 domain {} answered {}",
                id,
                hv::status_name(o.status)
            );
        }
        domains += 1;
        if let (1, Some(dev)) = (id, device) {
            let o = hv::attach(&io, d, dev);
            if !o.ok() {
                fail!(
                    "ATTACH to S2 domain 1 answered {}",
                    hv::status_name(o.status)
                );
            }
        }
        // CREATE and ATTACH wrote over the start of the input page.
        io.put(LIST, list.as_bytes());
        let mut iova = 0u64;
        loop {
            let n = (cap - accepted).min(u64::from(REPS));
            if n == 0 {
                break 'domains;
            }
            let header = InputMapDeviceGpaPages {
                device_domain: hv::domain_header(d),
                target_vtl: 0,
                padding: [0; 3],
                map_flags: U32::new(flags.into_bits()),
                target_device_va_base: U64::new(iova),
            };
            io.put(0, header.as_bytes());
            let control = Control::new()
                .with_code(HypercallCode::MAP_DEVICE_GPA_PAGES.0)
                .with_rep_count(n as u16);
            let o = Outcome::from_rax(hv::raw_call(control.into_bits(), io.input, io.output));
            calls += 1;
            accepted += u64::from(o.reps);
            match o.status {
                HvStatus::SUCCESS if u64::from(o.reps) == n => iova += n * PAGE,
                HvStatus::INSUFFICIENT_MEMORY => {
                    if iova == 0 && o.reps == 0 {
                        refused_at_first_rep += 1;
                    }
                    first_refusal.get_or_insert((id, accepted));
                    break;
                }
                s => fail!(
                    "S2 domain {}, IOVA {:#x}: MAP of {} reps answered {} after {} (after {} reps accepted in all)",
                    id,
                    iova,
                    n,
                    hv::status_name(s),
                    o.reps,
                    accepted
                ),
            }
        }
    }
    diag!(
        "runflood: accepted {} reps in {} MAP calls over {} S2 domains, {} of them refused at their first rep",
        accepted,
        calls,
        domains,
        refused_at_first_rep
    );
    match first_refusal {
        Some((id, before)) => diag!(
            "runflood: first INSUFFICIENT_MEMORY in S2 domain {} after {} reps",
            id,
            before
        ),
        None => diag!("runflood: no INSUFFICIENT_MEMORY"),
    }
    if accepted >= cap {
        diag!("runflood: stopped by the cap of {} reps", cap);
    } else {
        diag!("runflood: stopped by INSUFFICIENT_MEMORY in every S2 domain");
    }
    Ok(None)
}

//! A fuzzing harness for the dispatcher and the DMA path, shared by the
//! cargo-fuzz target (`iommu/fuzz`) and the in-tree smoke test.
//!
//! [`run`] decodes a byte string into a VM configuration and a sequence of
//! operations: hypercalls with arbitrary registers and input pages (with
//! optional fix-ups that make deep states reachable: a valid partition id,
//! known domain and device ids, page lists of RAM pages, aligned flush
//! entries), DMA translations, guest memory writes (page tables), device
//! hot-plug. It panics if an invariant breaks:
//!
//! - a dispatch returns a status outside the contract, more reps than asked,
//!   or a "continue" that makes no progress;
//! - a translation returns memory outside guest RAM or the wrong length, or
//!   a fault outside the requested range;
//! - the domain layer and a recording backend with IOMMUFD's rules disagree
//!   about what is mapped, or a backend call broke those rules.
//!
//! Any panic from inside the crate is a finding too.

use crate::dispatch::{Caller, HypercallOutcome, HypercallRegs, Processors};
use crate::testing::RecordingBackend;
use crate::{Access, BackendId, DomainInfoKind, Iommu, IommuConfig};
use pviommu_abi::{
    Control, DeviceDomainId, DeviceDomainType, DeviceId, FlushListEntry, HvError, HvStatus,
    HypercallCode, HypercallOutput, HV_PARTITION_ID_SELF, IPI_VECTORS,
};
use std::cell::RefCell;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const LOW_RAM: u64 = 256 << 10;
const HIGH_RAM: u64 = 1 << 20;
const HIGH_RAM_LEN: u64 = 64 << 10;
const INPUT: u64 = 0x1000;
const OUTPUT: u64 = 0x2000;

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        u64::from_le_bytes(b)
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

fn dev(n: u8) -> DeviceId {
    DeviceId::pci(0, 0, n, 0)
}

const DEVICES: [u8; 4] = [1, 2, 9, 30];

/// dev(9)'s LOGICAL id (a device on a vPCI bus has both).
const LOGICAL_9: DeviceId = DeviceId::logical(0x5544_7708);

thread_local! {
    static MEMORY: RefCell<Option<GuestMemoryMmap<()>>> = const { RefCell::new(None) };
}

/// A RAM page number: mostly inside RAM, sometimes just outside.
fn gpn(r: &mut Reader<'_>) -> u64 {
    let b = r.u8();
    match b % 8 {
        0..=5 => u64::from(b >> 3) + 0x10,
        6 => (HIGH_RAM >> 12) + u64::from(b >> 4),
        _ => (LOW_RAM >> 12) + u64::from(b >> 4),
    }
}

fn domain_word(r: &mut Reader<'_>) -> u64 {
    let b = r.u8();
    let t = if b & 1 == 0 {
        DeviceDomainType::S2
    } else {
        DeviceDomainType::S1
    };
    let id = match (b >> 1) % 8 {
        0 => DeviceDomainId::ID_DEFAULT,
        1 => DeviceDomainId::ID_NULL,
        n => u32::from(n - 1),
    };
    DeviceDomainId::with(t, id).into_bits()
}

/// What an input reached (for tests of the harness itself).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Calls that ended with SUCCESS, per [`HypercallCode::ALL`] index.
    pub successes: [u64; HypercallCode::ALL.len()],
    /// Translations that succeeded through a guest-created domain.
    pub domain_translations: u64,
    /// Translations that faulted.
    pub faults: u64,
}

/// Runs one fuzz input. Panics if an invariant breaks.
pub fn run(data: &[u8]) {
    run_counted(data, &mut Coverage::default());
}

/// [`run`], adding what the input reached to `coverage`.
pub fn run_counted(data: &[u8], coverage: &mut Coverage) {
    MEMORY.with(|cell| {
        let mut slot = cell.borrow_mut();
        let mem = slot.get_or_insert_with(|| {
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 256 << 10),
                (GuestAddress(HIGH_RAM), 64 << 10),
            ])
            .expect("fuzz guest memory")
        });
        let zeros = vec![0u8; 256 << 10];
        mem.write_slice(&zeros, GuestAddress(0))
            .expect("zero low RAM");
        mem.write_slice(&zeros[..64 << 10], GuestAddress(HIGH_RAM))
            .expect("zero high RAM");
        run_with(mem, data, coverage);
    });
}

fn run_with(mem: &GuestMemoryMmap<()>, data: &[u8], coverage: &mut Coverage) {
    let mut r = Reader { data };
    let cfg_byte = r.u8();
    let config = IommuConfig {
        max_domains: 4,
        max_mapped_pages_per_domain: 64,
        // Small enough for the VM-wide run limit to be reached.
        map_runs_per_mib: 0,
        map_runs_floor: 48,
        rep_budget: u16::from(r.u8() % 32) + 1 + if cfg_byte & 1 != 0 { 500 } else { 0 },
        // 57 bits needs 5-level tables (s1_5level below), else 48.
        max_iova_width: match usize::from(cfg_byte >> 1) % 4 {
            0 => 32,
            1 => 39,
            2 => 48,
            _ if cfg_byte & 0x18 == 0 => 57,
            _ => 48,
        },
        s1: cfg_byte & 8 == 0,
        s1_5level: cfg_byte & 0x18 == 0,
        iotlb_entries: 1 + usize::from(cfg_byte >> 5) * 4,
        ..IommuConfig::default()
    };
    let iommu = Iommu::new(config).expect("valid fuzz config");
    let rec = Arc::new(RecordingBackend::new("recording"));
    rec.set_recording(false);
    let rec_id = iommu.add_backend(rec.clone());
    for n in [1, 2] {
        iommu
            .register_device(dev(n), BackendId::SOFTWARE)
            .expect("register");
    }
    iommu.register_device(dev(9), rec_id).expect("register");
    iommu
        .register_device_alias(LOGICAL_9, dev(9))
        .expect("alias");

    for _ in 0..64 {
        if r.is_empty() {
            break;
        }
        let op = r.u8() % 8;
        match op {
            0..=3 => hypercall(&iommu, mem, &mut r, coverage),
            4 | 5 => translate(&iommu, mem, &mut r, coverage),
            6 => {
                // Guest memory writes: page tables and input pages.
                let b = r.u8();
                let addr = (u64::from(r.u16()) * 8) % LOW_RAM;
                let value = if b & 1 == 0 {
                    (u64::from(r.u8() % 64) << 12) | u64::from(r.u8())
                } else {
                    r.u64()
                };
                mem.write_obj(value, GuestAddress(addr)).expect("in RAM");
            }
            _ => {
                let b = r.u8();
                let (device, backend) = if b & 1 == 0 {
                    (dev(2), BackendId::SOFTWARE)
                } else {
                    (dev(9), rec_id)
                };
                if iommu.device_attachment(device).is_some() {
                    iommu.unregister_device(device).expect("unregister");
                } else {
                    iommu.register_device(device, backend).expect("register");
                    if device == dev(9) {
                        iommu
                            .register_device_alias(LOGICAL_9, device)
                            .expect("alias");
                    }
                }
            }
        }
        // Only hypercalls and hot-plug change what is mapped.
        if op < 4 || op == 7 {
            check_consistency(&iommu, &rec);
        }
    }
    check_consistency(&iommu, &rec);
}

/// A partition of four VPs; an IPI's vector must have been checked.
struct FuzzProcessors;

impl Processors for FuzzProcessors {
    fn send_ipi(&self, vector: u8, targets: u64) -> Result<(), HvError> {
        assert!(
            IPI_VECTORS.contains(&u32::from(vector)),
            "vector {vector:#x}"
        );
        if targets >> 4 != 0 {
            return Err(HvError::INVALID_PARAMETER);
        }
        Ok(())
    }
}

fn hypercall(
    iommu: &Iommu,
    mem: &GuestMemoryMmap<()>,
    r: &mut Reader<'_>,
    coverage: &mut Coverage,
) {
    let kind = r.u8();
    let rcx = if kind < 224 {
        let code = if kind % 16 == 15 {
            r.u16()
        } else {
            HypercallCode::ALL[usize::from(kind % 16) % HypercallCode::ALL.len()].0
        };
        let flags = r.u8();
        let count = if flags & 0x80 != 0 {
            r.u16() & 0xFFF
        } else {
            u16::from(r.u8() % 24)
        };
        let start = if flags & 0x40 != 0 {
            u16::from(r.u8() % 24)
        } else {
            0
        };
        let mut c = Control::new()
            .with_code(code)
            .with_fast(flags & 1 != 0)
            .with_rep_count(count)
            .with_rep_start(start);
        if flags & 0x20 != 0 {
            c.set_variable_header_size(u16::from(r.u8()) & 0x3FF);
        }
        if flags & 0x10 != 0 {
            c = Control::from_bits(c.into_bits() | 1 << (27 + r.u8() % 37));
        }
        c.into_bits()
    } else {
        r.u64()
    };
    let sel = r.u8();
    let rdx = match sel % 8 {
        0..=4 => INPUT,
        5 => INPUT + u64::from(r.u8()) * 8,
        6 => HIGH_RAM + HIGH_RAM_LEN - u64::from(r.u8()) * 8,
        _ => r.u64(),
    };
    let r8 = match (sel >> 3) % 8 {
        0..=4 => OUTPUT,
        5 => OUTPUT + u64::from(r.u8()),
        6 => LOW_RAM - u64::from(r.u8()) * 8,
        _ => r.u64(),
    };
    // The input page.
    let len = usize::from(r.u16()) % 4097;
    let mut page = [0u8; 4096];
    let bytes = r.bytes(len);
    page[..bytes.len()].copy_from_slice(bytes);
    let fix = r.u8();
    if fix & 1 != 0 {
        page[..8].copy_from_slice(&HV_PARTITION_ID_SELF.to_le_bytes());
    }
    if fix & 2 != 0 {
        page[8..16].fill(0);
        page[16..24].copy_from_slice(&domain_word(r).to_le_bytes());
    }
    if fix & 4 != 0 {
        let n = usize::from(r.u8());
        let d = if n % 8 == 7 {
            LOGICAL_9.into_bits()
        } else {
            dev(DEVICES[n % DEVICES.len()]).into_bits()
        };
        let at = if r.u8() & 1 == 0 { 24 } else { 8 };
        page[at..at + 8].copy_from_slice(&d.to_le_bytes());
    }
    if fix & 8 != 0 {
        // MAP header (VTL 0, READABLE, maybe WRITABLE, small page-aligned
        // base) or UNMAP base.
        let f = r.u8();
        let base = u64::from(f >> 2) << 12;
        if Control::from_bits(rcx).call_code() == HypercallCode::UNMAP_DEVICE_GPA_PAGES {
            page[24..32].copy_from_slice(&base.to_le_bytes());
        } else {
            page[24..28].fill(0);
            page[28..32].copy_from_slice(&u32::from(1 | (f & 2)).to_le_bytes());
            page[32..40].copy_from_slice(&base.to_le_bytes());
        }
    }
    if fix & 16 != 0 {
        // A list of RAM pages after the MAP header.
        let n = usize::from(r.u8() % 32);
        let contiguous = r.u8() & 1 != 0;
        let first = gpn(r);
        for i in 0..n {
            let g = if contiguous { first + i as u64 } else { gpn(r) };
            page[40 + i * 8..48 + i * 8].copy_from_slice(&g.to_le_bytes());
        }
    }
    if fix & 32 != 0 {
        // Flush header and aligned entries.
        page[24..32].fill(0);
        let n = usize::from(r.u8() % 32);
        for i in 0..n {
            let shift = r.u8() % 6;
            let p = (u64::from(r.u8()) >> shift) << shift;
            let e = FlushListEntry::new()
                .with_page_mask_shift(u16::from(shift))
                .with_page_number(p)
                .into_bits();
            page[32 + i * 8..40 + i * 8].copy_from_slice(&e.to_le_bytes());
        }
    }
    if fix & 64 != 0 {
        // CONFIGURE settings: a root in low RAM.
        let f = r.u8();
        page[24..32].copy_from_slice(&u64::from(f & 7).to_le_bytes());
        page[32..40].copy_from_slice(&(u64::from(r.u8() % 64) << 12).to_le_bytes());
    }
    mem.write_slice(&page, GuestAddress(INPUT))
        .expect("input page");

    let mut rcx = rcx;
    let count = Control::from_bits(rcx).rep_count();
    for _ in 0..5000 {
        let regs = HypercallRegs { rcx, rdx, r8 };
        match iommu.dispatch_for(mem, Caller::kernel(0), regs, Some(&FuzzProcessors)) {
            HypercallOutcome::Complete { rax } => {
                let out = HypercallOutput::from_bits(rax);
                // The contract's statuses: pviommu-abi names the SynIC's
                // too, which no call of the dispatcher returns.
                let status = out.hv_status();
                assert!(
                    HvError::from_status(status).is_none_or(|e| HvError::PVIOMMU.contains(&e)),
                    "status outside the contract {rax:#x}"
                );
                assert_eq!(rax >> 44, 0, "result reserved bits");
                assert_eq!((rax >> 16) & 0xFFFF, 0, "result reserved bits");
                assert!(out.reps_completed() <= count, "reps completed {rax:#x}");
                if out.hv_status() == HvStatus::SUCCESS {
                    assert!(out.reps_completed() == count);
                    let code = Control::from_bits(rcx).call_code();
                    if let Some(i) = HypercallCode::ALL.iter().position(|c| *c == code) {
                        coverage.successes[i] += 1;
                    }
                }
                return;
            }
            HypercallOutcome::Continue { rcx: next } => {
                let (old, new) = (Control::from_bits(rcx), Control::from_bits(next));
                assert!(new.rep_start() > old.rep_start(), "no progress");
                assert!(new.rep_start() < count, "continue past the end");
                assert_eq!(new.with_rep_start(0), old.with_rep_start(0));
                rcx = next;
            }
        }
    }
    panic!("a call did not complete in 5000 slices");
}

fn translate(
    iommu: &Iommu,
    mem: &GuestMemoryMmap<()>,
    r: &mut Reader<'_>,
    coverage: &mut Coverage,
) {
    let b = r.u8();
    let device = dev(DEVICES[usize::from(b) % DEVICES.len()]);
    let iova = match (b >> 2) % 4 {
        0 | 1 => u64::from(r.u16()) << 4,
        2 => u64::from(r.u8()) << 12,
        _ => r.u64(),
    };
    let len = match (b >> 4) % 4 {
        0 | 1 => u64::from(r.u8()),
        2 => u64::from(r.u16()),
        _ => r.u64(),
    };
    let access = if b & 0x40 != 0 {
        Access::Write
    } else {
        Access::Read
    };
    match iommu.translate(mem, device, iova, len, access) {
        Ok(segments) => {
            if !matches!(
                iommu.device_attachment(device),
                Some(crate::Attachment::Default)
            ) {
                coverage.domain_translations += 1;
            }
            assert_eq!(segments.total_len(), len, "segments cover the request");
            for s in &segments {
                let in_ram = crate::ram::in_ram(mem, s.gpa, s.len);
                assert!(in_ram, "segment {s:?} outside guest RAM");
                // The device's access through vm-memory succeeds.
                let mut buf = vec![0u8; usize::try_from(s.len.min(64)).unwrap_or(0)];
                mem.read_slice(&mut buf, GuestAddress(s.gpa))
                    .expect("DMA read");
            }
        }
        Err(fault) => {
            coverage.faults += 1;
            assert_eq!(fault.device, device);
            if let Some(end) = iova.checked_add(len) {
                assert!(
                    fault.iova >= iova && (fault.iova < end || len == 0),
                    "fault {fault} outside [{iova:#x}, {end:#x})"
                );
            }
        }
    }
}

fn check_consistency(iommu: &Iommu, rec: &RecordingBackend) {
    let stats = iommu.stats();
    assert_eq!(
        stats.backend_errors, 0,
        "a backend call broke IOMMUFD's rules"
    );
    for d in &stats.domains {
        if d.kind == DomainInfoKind::S2 && d.backends.contains(&"recording") {
            let pages = rec.pages(d.id).expect("instance exists");
            assert_eq!(
                u64::try_from(pages.len()).unwrap_or(u64::MAX),
                d.mapped_pages,
                "domain {} and its IOMMUFD-like instance disagree",
                d.id
            );
            assert_eq!(
                u64::try_from(rec.runs(d.id)).unwrap_or(u64::MAX),
                d.runs,
                "runs are host mappings"
            );
        }
        if matches!(d.kind, DomainInfoKind::S2 | DomainInfoKind::S1) {
            assert!(d.mapped_pages <= iommu.config().max_mapped_pages_per_domain);
        }
    }
    assert!(stats.domains.len() <= 2 + 4, "max_domains holds");
    let runs: u64 = stats.domains.iter().map(|d| d.runs).sum();
    assert_eq!(stats.map_runs, runs, "the VM-wide run count is exact");
    assert!(runs <= iommu.config().max_map_runs(LOW_RAM + HIGH_RAM_LEN));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// xorshift64*: deterministic random inputs without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    /// The fuzz smoke run: the committed seeds, then random inputs, through
    /// the same harness as the cargo-fuzz target. PVIOMMU_FUZZ_SMOKE_SECS
    /// makes it run longer than its default 2 seconds.
    #[test]
    fn fuzz_smoke() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        let mut n_seeds = 0;
        if let Ok(dir) = std::fs::read_dir(&seeds) {
            for entry in dir.flatten() {
                let data = std::fs::read(entry.path()).expect("seed");
                run(&data);
                n_seeds += 1;
            }
        }
        assert!(n_seeds > 0, "no seeds in {}", seeds.display());
        let secs = std::env::var("PVIOMMU_FUZZ_SMOKE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut runs = 0u64;
        let mut data = Vec::new();
        while runs < 200 || Instant::now() < deadline {
            data.clear();
            let len = rng.next() % 2048;
            for _ in 0..len / 8 + 1 {
                data.extend_from_slice(&rng.next().to_le_bytes());
            }
            run(&data);
            runs += 1;
        }
        eprintln!("fuzz smoke: {n_seeds} seeds, {runs} random inputs");
    }

    /// Builds inputs op by op, in the harness's encoding.
    #[derive(Default)]
    pub(super) struct Seed(pub Vec<u8>);

    pub(super) const CREATE: u8 = 0;
    pub(super) const ATTACH: u8 = 1;
    pub(super) const MAP: u8 = 2;
    pub(super) const UNMAP: u8 = 3;
    pub(super) const CONFIGURE: u8 = 6;
    pub(super) const FLUSH_LIST: u8 = 8;
    pub(super) const CAPS: u8 = 9;

    /// domain_word() byte for S2 (or S1) domain `id` (1..=6).
    pub(super) fn dom(s1: bool, id: u8) -> u8 {
        ((id + 1) << 1) | u8::from(s1)
    }

    impl Seed {
        pub(super) fn new(config: u8, budget: u8) -> Self {
            Self(vec![config, budget])
        }

        /// A call with `count` reps, input at INPUT, output at OUTPUT, no raw
        /// bytes, fix-up flags `fix` followed by their bytes.
        pub(super) fn call(mut self, code_index: u8, count: u8, fix: u8, fixups: &[u8]) -> Self {
            self.0
                .extend_from_slice(&[0, code_index, 0, count, 0, 0, 0, fix]);
            self.0.extend_from_slice(fixups);
            self
        }

        /// Translation of `len` bytes at page `page` for dev(1) or dev(2).
        pub(super) fn translate(mut self, dev2: bool, page: u8, len: u8, write: bool) -> Self {
            let b = u8::from(dev2) | 2 << 2 | u8::from(write) << 6;
            self.0.extend_from_slice(&[4, b, page, len]);
            self
        }

        /// A guest memory write of a PTE-like value: `page << 12 | flags` at
        /// byte address `index * 8`.
        pub(super) fn pte(mut self, index: u16, page: u8, flags: u8) -> Self {
            let [lo, hi] = index.to_le_bytes();
            self.0.extend_from_slice(&[6, 0, lo, hi, page, flags]);
            self
        }
    }

    /// A scenario through every kind of call: S2 map, DMA, unmap, S1 page
    /// tables, configure, DMA, flush.
    pub(super) fn deep_seed() -> Vec<u8> {
        Seed::new(0, 0)
            .call(CAPS, 0, 1, &[])
            .call(CREATE, 0, 0b11, &[dom(false, 1)])
            .call(ATTACH, 0, 0b111, &[dom(false, 1), 0, 0])
            .call(ATTACH, 0, 0b111, &[dom(false, 1), 2, 0])
            // MAP 3 contiguous pages (GPN 0x10..) RW at IOVA 0x1000.
            .call(MAP, 3, 0b11011, &[dom(false, 1), 0b110, 3, 1, 0])
            .translate(false, 1, 200, true)
            .call(UNMAP, 1, 0b1011, &[dom(false, 1), 0b100])
            .translate(false, 2, 8, false)
            // S1 domain 2 with a 4-level table at 0x8000.. mapping IOVA 0.
            .call(CREATE, 0, 0b11, &[dom(true, 2)])
            .call(ATTACH, 0, 0b111, &[dom(true, 2), 1, 0])
            .pte(0x8000 / 8, 0x9, 7)
            .pte(0x9000 / 8, 0xA, 7)
            .pte(0xA000 / 8, 0xB, 7)
            .pte(0xB000 / 8, 0x20, 7)
            .call(CONFIGURE, 0, 0b1000011, &[dom(true, 2), 1, 8])
            .translate(true, 0, 64, true)
            .call(FLUSH_LIST, 2, 0b100011, &[dom(true, 2), 2, 0, 0, 1, 0])
            .0
    }

    #[test]
    fn the_harness_reaches_deep_states() {
        let mut cov = Coverage::default();
        run_counted(&deep_seed(), &mut cov);
        let ok = |code: HypercallCode| {
            cov.successes[HypercallCode::ALL
                .iter()
                .position(|c| *c == code)
                .expect("code")]
        };
        assert_eq!(ok(HypercallCode::GET_IOMMU_CAPABILITIES), 1);
        assert_eq!(ok(HypercallCode::CREATE_DEVICE_DOMAIN), 2);
        assert_eq!(ok(HypercallCode::ATTACH_DEVICE_DOMAIN), 3);
        assert_eq!(ok(HypercallCode::MAP_DEVICE_GPA_PAGES), 1);
        assert_eq!(ok(HypercallCode::UNMAP_DEVICE_GPA_PAGES), 1);
        assert_eq!(ok(HypercallCode::CONFIGURE_DEVICE_DOMAIN), 1);
        assert_eq!(ok(HypercallCode::FLUSH_DEVICE_DOMAIN_LIST), 1);
        assert_eq!(cov.domain_translations, 3, "{cov:?}");
        assert_eq!(cov.faults, 0, "{cov:?}");
    }

    /// Writes the committed seed corpus (run with --ignored after changing
    /// the encoding).
    #[test]
    #[ignore]
    fn write_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        std::fs::create_dir_all(&dir).expect("seed dir");
        std::fs::write(dir.join("deep"), deep_seed()).expect("seed");
        std::fs::write(dir.join("empty"), []).expect("seed");
    }
}

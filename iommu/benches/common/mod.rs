//! Shared set-up for the iommu benchmarks: a guest with RAM, an Iommu, a
//! recording backend, guest-side call helpers, a small PRNG and a timer.
#![allow(dead_code)]

use iommu::abi::{
    Control, DeviceDomainId, DeviceDomainSettings, DeviceDomainType, HvStatus, HypercallCode,
    HypercallOutput, InputAttachDeviceDomain, InputConfigureDeviceDomain, InputCreateDeviceDomain,
    InputDeviceDomain, InputFlushDeviceDomainList, InputMapDeviceGpaPages,
    InputUnmapDeviceGpaPages,
};
use iommu::testing::RecordingBackend;
use iommu::{BackendId, DeviceId, HypercallOutcome, HypercallRegs, Iommu, IommuConfig};
use std::sync::Arc;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

pub const INPUT: u64 = 0x1000;
pub const OUTPUT: u64 = 0x2000;
pub const P: u64 = 4096;
pub const RAM: u64 = 1 << 30;

pub fn dev(n: u8) -> DeviceId {
    DeviceId::pci(0, 0, n, 0)
}

pub struct Guest {
    pub iommu: Iommu,
    pub mem: GuestMemoryMmap<()>,
    pub rec: Arc<RecordingBackend>,
}

impl Guest {
    /// 1 GiB of RAM; dev(1..=3) on the software backend, dev(9) on a recording
    /// backend.
    pub fn new(config: IommuConfig) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 30)]).expect("memory");
        let iommu = Iommu::new(config).expect("iommu");
        let rec = Arc::new(RecordingBackend::new("recording"));
        let rec_id = iommu.add_backend(rec.clone());
        for n in 1..=3 {
            iommu
                .register_device(dev(n), BackendId::SOFTWARE)
                .expect("register");
        }
        iommu.register_device(dev(9), rec_id).expect("register");
        Self { iommu, mem, rec }
    }

    pub fn dispatch(&self, rcx: u64, rdx: u64, r8: u64) -> (HvStatus, u16) {
        let mut rcx = rcx;
        loop {
            match self
                .iommu
                .dispatch(&self.mem, 0, HypercallRegs { rcx, rdx, r8 })
            {
                HypercallOutcome::Complete { rax } => {
                    let out = HypercallOutput::from_bits(rax);
                    return (out.hv_status(), out.reps_completed());
                }
                HypercallOutcome::Continue { rcx: next } => rcx = next,
            }
        }
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .expect("write");
    }

    pub fn simple(&self, code: HypercallCode, input: &[u8]) -> HvStatus {
        self.write(INPUT, input);
        self.dispatch(Control::new().with_code(code.0).into_bits(), INPUT, OUTPUT)
            .0
    }

    pub fn create(&self, t: DeviceDomainType, id: u32) {
        let input = InputCreateDeviceDomain {
            device_domain: hdr(t, id),
            create_device_domain_flags: U32::new(0),
        };
        assert_eq!(
            self.simple(HypercallCode::CREATE_DEVICE_DOMAIN, input.as_bytes()),
            HvStatus::SUCCESS
        );
    }

    pub fn attach(&self, t: DeviceDomainType, id: u32, device: DeviceId) {
        let input = InputAttachDeviceDomain {
            device_domain: hdr(t, id),
            device_id: U64::new(device.into_bits()),
        };
        assert_eq!(
            self.simple(HypercallCode::ATTACH_DEVICE_DOMAIN, input.as_bytes()),
            HvStatus::SUCCESS
        );
    }

    pub fn configure_s1(&self, id: u32, root: u64) {
        let input = InputConfigureDeviceDomain {
            device_domain: hdr(DeviceDomainType::S1, id),
            settings: DeviceDomainSettings {
                flags: U64::new(1),
                page_table_root: U64::new(root),
            },
        };
        assert_eq!(
            self.simple(HypercallCode::CONFIGURE_DEVICE_DOMAIN, input.as_bytes()),
            HvStatus::SUCCESS
        );
    }

    /// Writes a MAP input page at `gpa` and returns its RCX.
    pub fn prepare_map(&self, gpa: u64, id: u32, iova: u64, gpns: &[u64]) -> u64 {
        let header = InputMapDeviceGpaPages {
            device_domain: hdr(DeviceDomainType::S2, id),
            target_vtl: 0,
            padding: [0; 3],
            map_flags: U32::new(3),
            target_device_va_base: U64::new(iova),
        };
        let mut bytes = header.as_bytes().to_vec();
        for g in gpns {
            bytes.extend_from_slice(&g.to_le_bytes());
        }
        self.write(gpa, &bytes);
        rep_rcx(HypercallCode::MAP_DEVICE_GPA_PAGES, gpns.len())
    }

    /// Writes an UNMAP input page at `gpa` and returns its RCX.
    pub fn prepare_unmap(&self, gpa: u64, id: u32, iova: u64, pages: usize) -> u64 {
        let input = InputUnmapDeviceGpaPages {
            device_domain: hdr(DeviceDomainType::S2, id),
            target_device_va_base: U64::new(iova),
        };
        self.write(gpa, input.as_bytes());
        rep_rcx(HypercallCode::UNMAP_DEVICE_GPA_PAGES, pages)
    }

    /// Writes a FLUSH_DEVICE_DOMAIN_LIST input page at `gpa`, returns RCX.
    pub fn prepare_flush_list(
        &self,
        gpa: u64,
        t: DeviceDomainType,
        id: u32,
        entries: &[u64],
    ) -> u64 {
        let header = InputFlushDeviceDomainList {
            device_domain: hdr(t, id),
            flags: U32::new(0),
            reserved: U32::new(0),
        };
        let mut bytes = header.as_bytes().to_vec();
        for e in entries {
            bytes.extend_from_slice(&e.to_le_bytes());
        }
        self.write(gpa, &bytes);
        rep_rcx(HypercallCode::FLUSH_DEVICE_DOMAIN_LIST, entries.len())
    }
}

pub fn hdr(t: DeviceDomainType, id: u32) -> InputDeviceDomain {
    InputDeviceDomain::new(DeviceDomainId::with(t, id))
}

pub fn rep_rcx(code: HypercallCode, count: usize) -> u64 {
    Control::new()
        .with_code(code.0)
        .with_rep_count(u16::try_from(count).expect("rep count"))
        .into_bits()
}

/// xorshift64*.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Median over `batches` of the mean time of `iters` runs of `f`, in ns.
pub fn time_ns(batches: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters {
        f();
    }
    let mut samples: Vec<f64> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

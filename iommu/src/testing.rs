//! A recording [`Backend`] for tests and benchmarks, with IOMMUFD's rules.
//!
//! It keeps the mappings it was given per domain and enforces what IOMMUFD
//! enforces: a map must not overlap a mapping (EEXIST), an unmap must name a
//! whole mapping (ENOENT on a partial overlap); it uses the trait's default
//! `unmap_keep` (unmap the run, map the pieces again) as IOMMUFD would. It
//! records every call and can be told to fail the next maps.

use crate::backend::{
    AttachTarget, Backend, BackendError, DomainId, DomainKind, Invalidation, MapRun, S1Config,
};
use pviommu_abi::DeviceId;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// One backend call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// [`Backend::add_device`].
    AddDevice(DeviceId),
    /// [`Backend::remove_device`].
    RemoveDevice(DeviceId),
    /// [`Backend::create_domain`].
    CreateDomain(DomainId, DomainKind),
    /// [`Backend::destroy_domain`].
    DestroyDomain(DomainId),
    /// [`Backend::attach`].
    Attach(DeviceId, AttachTarget),
    /// [`Backend::map`].
    Map(DomainId, MapRun),
    /// [`Backend::unmap`].
    Unmap(DomainId, MapRun),
    /// [`Backend::set_s1`].
    SetS1(DomainId, S1Config),
    /// [`Backend::invalidate`].
    Invalidate(DomainId, Invalidation),
}

#[derive(Debug, Default)]
struct Rec {
    calls: Vec<Call>,
    record: bool,
    fail_maps: usize,
    devices: HashMap<DeviceId, AttachTarget>,
    domains: HashMap<DomainId, BTreeMap<u64, MapRun>>,
}

/// A backend that records calls and checks IOMMUFD's mapping rules.
#[derive(Debug)]
pub struct RecordingBackend {
    name: &'static str,
    rec: Mutex<Rec>,
}

impl RecordingBackend {
    /// A recording backend called `name`.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            rec: Mutex::new(Rec {
                record: true,
                ..Default::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Rec> {
        self.rec.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Turns call recording on or off (benchmarks turn it off).
    pub fn set_recording(&self, on: bool) {
        self.lock().record = on;
    }

    /// Takes the calls recorded so far.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.lock().calls)
    }

    /// Makes the next `n` maps fail with NoResources.
    pub fn fail_next_maps(&self, n: usize) {
        self.lock().fail_maps = n;
    }

    /// The mappings of `domain` now, page by page: IOVA page -> (GPA page,
    /// writable). `None` if the domain is not instantiated.
    pub fn pages(&self, domain: DomainId) -> Option<BTreeMap<u64, (u64, bool)>> {
        let rec = self.lock();
        let runs = rec.domains.get(&domain)?;
        let mut out = BTreeMap::new();
        for run in runs.values() {
            for p in 0..run.pages() {
                out.insert((run.iova >> 12) + p, ((run.gpa >> 12) + p, run.perms.write));
            }
        }
        Some(out)
    }

    /// Number of mappings (runs) of `domain`.
    pub fn runs(&self, domain: DomainId) -> usize {
        self.lock().domains.get(&domain).map_or(0, BTreeMap::len)
    }

    /// Where `device` is attached.
    pub fn attachment(&self, device: DeviceId) -> Option<AttachTarget> {
        self.lock().devices.get(&device).copied()
    }

    fn push(rec: &mut Rec, call: Call) {
        if rec.record {
            rec.calls.push(call);
        }
    }
}

fn host(kind: io::ErrorKind) -> BackendError {
    BackendError::Host(kind.into())
}

impl Backend for RecordingBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn add_device(&self, device: DeviceId) -> Result<(), BackendError> {
        let mut rec = self.lock();
        Self::push(&mut rec, Call::AddDevice(device));
        rec.devices.insert(device, AttachTarget::Identity);
        Ok(())
    }

    fn remove_device(&self, device: DeviceId) -> Result<(), BackendError> {
        let mut rec = self.lock();
        Self::push(&mut rec, Call::RemoveDevice(device));
        rec.devices
            .remove(&device)
            .map(|_| ())
            .ok_or(BackendError::UnknownDevice(device.into_bits()))
    }

    fn create_domain(&self, domain: DomainId, kind: DomainKind) -> Result<(), BackendError> {
        let mut rec = self.lock();
        Self::push(&mut rec, Call::CreateDomain(domain, kind));
        if rec.domains.insert(domain, BTreeMap::new()).is_some() {
            return Err(host(io::ErrorKind::AlreadyExists));
        }
        Ok(())
    }

    fn destroy_domain(&self, domain: DomainId) -> Result<(), BackendError> {
        let mut rec = self.lock();
        Self::push(&mut rec, Call::DestroyDomain(domain));
        if rec
            .devices
            .values()
            .any(|t| *t == AttachTarget::Domain(domain))
        {
            return Err(host(io::ErrorKind::ResourceBusy));
        }
        rec.domains
            .remove(&domain)
            .map(|_| ())
            .ok_or(BackendError::UnknownDomain(domain))
    }

    fn attach(&self, device: DeviceId, target: AttachTarget) -> Result<(), BackendError> {
        let mut rec = self.lock();
        Self::push(&mut rec, Call::Attach(device, target));
        if let AttachTarget::Domain(d) = target {
            if !rec.domains.contains_key(&d) {
                return Err(BackendError::UnknownDomain(d));
            }
        }
        let slot = rec
            .devices
            .get_mut(&device)
            .ok_or(BackendError::UnknownDevice(device.into_bits()))?;
        *slot = target;
        Ok(())
    }

    fn map(&self, domain: DomainId, run: MapRun) -> Result<(), BackendError> {
        let mut rec = self.lock();
        Self::push(&mut rec, Call::Map(domain, run));
        if rec.fail_maps > 0 {
            rec.fail_maps -= 1;
            return Err(BackendError::NoResources);
        }
        let runs = rec
            .domains
            .get_mut(&domain)
            .ok_or(BackendError::UnknownDomain(domain))?;
        let overlaps = runs
            .range(..run.iova_end())
            .next_back()
            .is_some_and(|(_, r)| r.iova_end() > run.iova);
        if overlaps || run.len == 0 || run.iova.checked_add(run.len).is_none() {
            return Err(host(io::ErrorKind::AlreadyExists));
        }
        runs.insert(run.iova, run);
        Ok(())
    }

    fn unmap(&self, domain: DomainId, run: MapRun) -> Result<(), BackendError> {
        let mut rec = self.lock();
        Self::push(&mut rec, Call::Unmap(domain, run));
        let runs = rec
            .domains
            .get_mut(&domain)
            .ok_or(BackendError::UnknownDomain(domain))?;
        // IOAS_UNMAP: the range must cover whole mappings (ENOENT otherwise).
        match runs.get(&run.iova) {
            Some(r) if r.len == run.len => {
                runs.remove(&run.iova);
                Ok(())
            }
            _ => Err(host(io::ErrorKind::NotFound)),
        }
    }

    fn set_s1(&self, domain: DomainId, config: S1Config) -> Result<(), BackendError> {
        let mut rec = self.lock();
        Self::push(&mut rec, Call::SetS1(domain, config));
        if !rec.domains.contains_key(&domain) {
            return Err(BackendError::UnknownDomain(domain));
        }
        Ok(())
    }

    fn invalidate(&self, domain: DomainId, what: Invalidation) -> Result<(), BackendError> {
        let mut rec = self.lock();
        Self::push(&mut rec, Call::Invalidate(domain, what));
        if !rec.domains.contains_key(&domain) {
            return Err(BackendError::UnknownDomain(domain));
        }
        Ok(())
    }
}

//! Removals that wait for the guest: the eject/timeout state machine of PCI
//! hot-remove, apart from the registers and the clock it is driven by.
//!
//! A removal starts by asking the guest to eject the device's slot
//! ([`EjectRegs::request_eject`]). It ends when the guest ejects that slot
//! (its `_EJ0` writes B0EJ: [`Removals::ejected`]) or, for a guest that
//! ignores the request, when [`Removals::timeout`] has passed
//! ([`Removals::expired`], the forced path). Each pending removal carries a
//! token of the caller's (the API request's responder) that comes back when
//! it ends. A second removal of a device already being removed is refused.

use std::time::{Duration, Instant};

use api::DeviceId;

/// The guest-facing side of a removal (the ACPI hotplug registers).
pub trait EjectRegs {
    /// Asks the guest to eject `slot` (PCID and the GED interrupt).
    fn request_eject(&mut self, slot: u8);
}

/// A removal that ended: the device, its slot, the caller's token, and
/// whether it was forced.
#[derive(Debug, PartialEq, Eq)]
pub struct Ended<T> {
    /// The device.
    pub id: DeviceId,
    /// Its slot.
    pub slot: u8,
    /// What the caller gave [`Removals::start`].
    pub token: T,
    /// The guest did not eject in time.
    pub forced: bool,
}

#[derive(Debug)]
struct Pending<T> {
    id: DeviceId,
    slot: u8,
    deadline: Instant,
    token: T,
}

/// The device is already being removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Device \"{0}\" is already being removed")]
pub struct AlreadyRemoving(pub DeviceId);

/// The removals in flight.
#[derive(Debug)]
pub struct Removals<T> {
    pending: Vec<Pending<T>>,
    timeout: Duration,
}

impl<T> Removals<T> {
    /// No removal in flight; each will wait `timeout` for the guest.
    pub fn new(timeout: Duration) -> Self {
        Self {
            pending: Vec::new(),
            timeout,
        }
    }

    /// How long a removal waits for the guest.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Starts removing `id` from `slot` at `now`: asks the guest through
    /// `regs`, and keeps `token` until the removal ends.
    pub fn start(
        &mut self,
        regs: &mut impl EjectRegs,
        id: DeviceId,
        slot: u8,
        token: T,
        now: Instant,
    ) -> Result<(), (AlreadyRemoving, T)> {
        if self.pending.iter().any(|p| p.id == id) {
            return Err((AlreadyRemoving(id), token));
        }
        regs.request_eject(slot);
        self.pending.push(Pending {
            id,
            slot,
            deadline: now + self.timeout,
            token,
        });
        Ok(())
    }

    /// The removals the guest finished: those whose slot bit is set in
    /// `ejected` (a B0EJ mask).
    pub fn ejected(&mut self, ejected: u32) -> Vec<Ended<T>> {
        self.take(|p| ejected & (1u32 << (p.slot & 0x1f)) != 0, false)
    }

    /// The removals whose deadline has passed at `now`: forced.
    pub fn expired(&mut self, now: Instant) -> Vec<Ended<T>> {
        self.take(|p| p.deadline <= now, true)
    }

    /// Every removal still in flight (the VM stopped: nobody will eject).
    pub fn drain(&mut self) -> Vec<Ended<T>> {
        self.take(|_| true, false)
    }

    /// When the next removal falls due, if any is in flight.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.deadline).min()
    }

    /// Whether `id` is being removed.
    pub fn is_pending(&self, id: &DeviceId) -> bool {
        self.pending.iter().any(|p| &p.id == id)
    }

    fn take(&mut self, which: impl Fn(&Pending<T>) -> bool, forced: bool) -> Vec<Ended<T>> {
        let (done, kept): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|p| which(p));
        self.pending = kept;
        done.into_iter()
            .map(|p| Ended {
                id: p.id,
                slot: p.slot,
                token: p.token,
                forced,
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Regs(Vec<u8>);

    impl EjectRegs for Regs {
        fn request_eject(&mut self, slot: u8) {
            self.0.push(slot);
        }
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn the_guest_ejects_before_the_deadline() {
        let t0 = Instant::now();
        let mut r = Removals::new(Duration::from_secs(5));
        let mut regs = Regs::default();
        r.start(&mut regs, id("a"), 3, "ra", t0).unwrap();
        r.start(&mut regs, id("b"), 4, "rb", t0).unwrap();
        assert_eq!(regs.0, vec![3, 4], "the guest was asked for both slots");
        assert_eq!(r.next_deadline(), Some(t0 + Duration::from_secs(5)));
        // An eject of another slot ends nothing.
        assert!(r.ejected(1 << 7).is_empty());
        let done = r.ejected(1 << 4);
        assert_eq!(
            done,
            vec![Ended {
                id: id("b"),
                slot: 4,
                token: "rb",
                forced: false
            }]
        );
        assert!(r.is_pending(&id("a")) && !r.is_pending(&id("b")));
        assert!(r.expired(t0 + Duration::from_secs(4)).is_empty());
    }

    #[test]
    fn a_guest_that_ignores_the_request_is_forced_at_the_deadline() {
        let t0 = Instant::now();
        let mut r = Removals::new(Duration::from_secs(5));
        let mut regs = Regs::default();
        r.start(&mut regs, id("a"), 3, 1, t0).unwrap();
        r.start(&mut regs, id("b"), 4, 2, t0 + Duration::from_secs(2))
            .unwrap();
        let first = r.expired(t0 + Duration::from_secs(5));
        assert_eq!(first.len(), 1);
        assert!(first[0].forced && first[0].id == id("a") && first[0].token == 1);
        assert_eq!(r.next_deadline(), Some(t0 + Duration::from_secs(7)));
        let second = r.expired(t0 + Duration::from_secs(60));
        assert_eq!((second.len(), second[0].token), (1, 2));
        assert_eq!(r.next_deadline(), None);
    }

    #[test]
    fn a_second_removal_of_the_same_device_is_refused() {
        let t0 = Instant::now();
        let mut r = Removals::new(Duration::from_secs(5));
        let mut regs = Regs::default();
        r.start(&mut regs, id("a"), 3, "first", t0).unwrap();
        let (e, token) = r.start(&mut regs, id("a"), 3, "second", t0).unwrap_err();
        assert_eq!((e, token), (AlreadyRemoving(id("a")), "second"));
        assert_eq!(regs.0, vec![3], "asked once");
        // Draining ends it unforced (the VM stopped).
        let d = r.drain();
        assert_eq!((d.len(), d[0].forced, d[0].token), (1, false, "first"));
        assert!(r.drain().is_empty());
    }
}

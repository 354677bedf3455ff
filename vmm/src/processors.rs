//! The vCPUs as the Hyper-V interface lets the guest reach them:
//! HvCallSendSyntheticClusterIpi and the GUEST_IDLE MSR. Together they are
//! Linux's paravirtual spinlocks on Hyper-V (`arch/x86/hyperv/hv_spinlock.c`,
//! `hv_apic.c`), without which a vCPU that waits for a lock whose holder's
//! vCPU is not running spins away whole host time slices (measured: 4 vCPUs
//! on 2 host CPUs stalled about half of the Linux boots under nested SVM).
//!
//! - With the cluster-IPI hint, Linux sends every IPI through the hypercall.
//!   pvmm hands it to KVM's in-kernel local APIC as an MSI (KVM_SIGNAL_MSI:
//!   physical destination, APIC id = VP index, fixed, edge), then ends the
//!   target's GUEST_IDLE wait, if any, in that order: a woken vCPU finds the
//!   interrupt pending.
//! - A waiter on a contended lock reads GUEST_IDLE with its interrupts
//!   masked; the holder's unlock kicks it with an IPI. The read blocks the
//!   vCPU's thread until an IPI has been sent to it since its last idle, or
//!   for [`IDLE_TIMEOUT`] at most. Hyper-V also ends the idle on any other
//!   interrupt; pvmm does not see those (KVM's LAPIC and irqfds take them),
//!   so the timeout bounds how late a masked timer or device interrupt
//!   gets, as well as a kick that went around the hypercall (Linux falls
//!   back to the APIC when the hypercall fails). Like KVM's PV_UNHALT, a
//!   spurious end is harmless: Linux checks the lock again and waits again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use devices::interrupt::MsiSink;
use iommu::abi::{msi_address, HvError};

/// The longest a GUEST_IDLE read blocks: a twentieth of a 100 Hz tick,
/// half of a 250 Hz one.
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(2);

/// One vCPU's idle state.
#[derive(Debug, Default)]
struct Idle {
    /// An IPI was sent to the vCPU since its last idle ended.
    kicked: Mutex<bool>,
    wake: Condvar,
}

/// What happened, for the log at the VM's end.
#[derive(Debug, Default)]
struct Counts {
    ipis: AtomicU64,
    idles: AtomicU64,
    kicked: AtomicU64,
    timeouts: AtomicU64,
}

/// The VM's virtual processors for the Hyper-V interface.
pub struct Processors {
    msi: Arc<dyn MsiSink>,
    vps: Box<[Idle]>,
    counts: Counts,
    /// KVM refused an MSI (logged once).
    msi_failed: AtomicBool,
}

impl std::fmt::Debug for Processors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processors")
            .field("vps", &self.vps.len())
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

/// The most vCPUs the cluster-IPI path serves: HvCallSendSyntheticClusterIpi
/// names its targets in one 64-bit mask (VP index = bit; the _EX form with
/// a sparse set is not offered). Larger VMs go without cluster IPIs and
/// GUEST_IDLE.
pub const MAX_VPS: u32 = u64::BITS;

impl Processors {
    /// `vcpus` processors (VP index = APIC id), their IPIs delivered
    /// through `msi`; `None` for more than [`MAX_VPS`].
    pub fn new(vcpus: u32, msi: Arc<dyn MsiSink>) -> Option<Self> {
        (vcpus <= MAX_VPS).then(|| Self {
            msi,
            vps: (0..vcpus).map(|_| Idle::default()).collect(),
            counts: Counts::default(),
            msi_failed: AtomicBool::new(false),
        })
    }

    /// A GUEST_IDLE read by VP `vp`: returns once an IPI has been sent to it
    /// since its last idle, or after [`IDLE_TIMEOUT`].
    pub fn idle(&self, vp: u32) {
        let Some(idle) = usize::try_from(vp).ok().and_then(|i| self.vps.get(i)) else {
            return;
        };
        self.counts.idles.fetch_add(1, Ordering::Relaxed);
        let kicked = idle.kicked.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut kicked, wait) = idle
            .wake
            .wait_timeout_while(kicked, IDLE_TIMEOUT, |kicked| !*kicked)
            .unwrap_or_else(PoisonError::into_inner);
        if wait.timed_out() {
            self.counts.timeouts.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counts.kicked.fetch_add(1, Ordering::Relaxed);
        }
        *kicked = false;
    }

    fn kick(&self, idle: &Idle) {
        *idle.kicked.lock().unwrap_or_else(PoisonError::into_inner) = true;
        idle.wake.notify_one();
    }
}

impl iommu::Processors for Processors {
    fn send_ipi(&self, vector: u8, targets: u64) -> Result<(), HvError> {
        // Every target first: a mask naming a VP the VM lacks delivers
        // nothing (a VM of MAX_VPS has no bit beyond its VPs).
        let vps = u32::try_from(self.vps.len()).unwrap_or(u32::MAX);
        if targets.checked_shr(vps).unwrap_or(0) != 0 {
            return Err(HvError::INVALID_PARAMETER);
        }
        let mut rest = targets;
        while rest != 0 {
            let vp = rest.trailing_zeros();
            rest &= rest - 1;
            if let Err(e) = self.msi.signal_msi(msi_address(vp), u32::from(vector)) {
                // The host's failure, not the guest's: Linux falls back to
                // the APIC when the call fails.
                if !self.msi_failed.swap(true, Ordering::Relaxed) {
                    log::warn!("Hyper-V: KVM_SIGNAL_MSI for an IPI to VP {vp} failed: {e}");
                }
                return Err(HvError::NO_RESOURCES);
            }
            self.counts.ipis.fetch_add(1, Ordering::Relaxed);
            // Checked above: every bit names a VP.
            if let Some(idle) = self.vps.get(vp as usize) {
                self.kick(idle);
            }
        }
        Ok(())
    }
}

impl Drop for Processors {
    fn drop(&mut self) {
        let c = &self.counts;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        if load(&c.ipis) != 0 || load(&c.idles) != 0 {
            log::info!(
                "Hyper-V: {} IPIs through the hypercall; {} guest-idle waits, {} ended by an IPI, {} after {} ms",
                load(&c.ipis),
                load(&c.idles),
                load(&c.kicked),
                load(&c.timeouts),
                IDLE_TIMEOUT.as_millis()
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use iommu::Processors as _;
    use std::time::Instant;

    /// An MSI sink that records what it was given.
    #[derive(Default)]
    pub(crate) struct Recorder(pub(crate) Mutex<Vec<(u64, u32)>>);

    impl MsiSink for Recorder {
        fn signal_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push((address, data));
            Ok(())
        }
    }

    /// `vcpus` processors whose IPIs go to a [`Recorder`].
    pub(crate) fn processors(vcpus: u32) -> (Arc<Recorder>, Arc<Processors>) {
        let rec = Arc::new(Recorder::default());
        let p = Processors::new(vcpus, rec.clone()).expect("at most MAX_VPS");
        (rec, Arc::new(p))
    }

    #[test]
    fn an_ipi_is_one_msi_per_target_at_its_apic_id() {
        let (rec, p) = processors(4);
        p.send_ipi(0xf7, 0b1101).unwrap();
        assert_eq!(
            *rec.0.lock().unwrap(),
            [
                (0xfee0_0000, 0xf7),
                (0xfee0_2000, 0xf7),
                (0xfee0_3000, 0xf7)
            ]
        );
    }

    #[test]
    fn a_mask_naming_a_missing_vp_delivers_nothing() {
        let (rec, p) = processors(4);
        assert_eq!(p.send_ipi(0xf7, 0b1_0001), Err(HvError::INVALID_PARAMETER));
        assert_eq!(p.send_ipi(0xf7, 1 << 63), Err(HvError::INVALID_PARAMETER));
        assert!(rec.0.lock().unwrap().is_empty());
        // With 64 VPs every bit names one; 63 lack the top one.
        let (_, p) = processors(64);
        assert_eq!(p.send_ipi(0x30, u64::MAX), Ok(()));
        let (_, p) = processors(63);
        assert_eq!(p.send_ipi(0x30, u64::MAX), Err(HvError::INVALID_PARAMETER));
    }

    #[test]
    fn more_vcpus_than_one_mask_names_get_no_processors() {
        let rec: Arc<Recorder> = Arc::default();
        assert!(Processors::new(MAX_VPS, rec.clone()).is_some());
        assert!(Processors::new(MAX_VPS + 1, rec).is_none());
    }

    #[test]
    fn a_kick_before_the_idle_ends_it_at_once_and_only_once() {
        let (_, p) = processors(2);
        p.send_ipi(0xf7, 0b10).unwrap();
        p.idle(1);
        assert_eq!(p.counts.kicked.load(Ordering::Relaxed), 1);
        // Consumed: the next idle waits for its timeout.
        let t = Instant::now();
        p.idle(1);
        assert!(t.elapsed() >= IDLE_TIMEOUT, "{:?}", t.elapsed());
        assert_eq!(p.counts.kicked.load(Ordering::Relaxed), 1);
        assert_eq!(p.counts.timeouts.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_ipi_wakes_an_idle_vp_and_no_other() {
        let (_, p) = processors(2);
        // VP 0's kick must not end VP 1's idle: VP 1 times out.
        p.send_ipi(0xf7, 0b01).unwrap();
        p.idle(1);
        assert_eq!(p.counts.timeouts.load(Ordering::Relaxed), 1);
        // A kick from another thread while VP 1 waits wakes it.
        let waker = {
            let p = p.clone();
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    p.send_ipi(0xf7, 0b10).unwrap();
                    std::thread::sleep(Duration::from_micros(200));
                    if p.counts.kicked.load(Ordering::Relaxed) > 0 {
                        break;
                    }
                }
            })
        };
        while p.counts.kicked.load(Ordering::Relaxed) == 0 {
            p.idle(1);
        }
        waker.join().unwrap();
    }

    #[test]
    fn an_unknown_vp_does_not_idle() {
        let (_, p) = processors(1);
        p.idle(7);
        p.idle(u32::MAX);
        assert_eq!(p.counts.idles.load(Ordering::Relaxed), 0);
    }
}

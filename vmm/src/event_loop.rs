//! The VMM's event loop subscribers (event-manager): standard input into
//! COM1, the events that end the VM, and SIGUSR2's request for the vCPUs'
//! state.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use devices::legacy::Serial;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::vcpu::ExitSlot;
use crate::ExitReason;

/// Feeds standard input to COM1.
pub struct StdinInput {
    serial: Arc<Mutex<Serial>>,
}

impl StdinInput {
    /// Input for `serial`.
    pub fn new(serial: Arc<Mutex<Serial>>) -> Self {
        Self { serial }
    }
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            stdin.lock().read(&mut buf)
        } else {
            Ok(0)
        };
        match n {
            Ok(0) | Err(_) => {
                // End of input (or hang-up): stop watching it.
                let _ = ops.remove(Events::new(&stdin, EventSet::IN));
            }
            Ok(n) => {
                let taken = devices::lock::mutex(&self.serial).enqueue_input(&buf[..n]);
                if taken < n {
                    log::debug!("serial: {} input bytes dropped (FIFO full)", n - taken);
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        // Regular files and /dev/null cannot be watched by epoll: no input.
        if let Err(e) = ops.add(Events::new(&stdin, EventSet::IN)) {
            log::debug!("standard input not watched: {e}");
        }
    }
}

/// Turns the devices' reset and poweroff events into the VM's end.
pub struct ExitWatcher {
    reset: EventFd,
    poweroff: EventFd,
    exit: Arc<ExitSlot>,
}

impl ExitWatcher {
    /// Watches `reset` and `poweroff`, recording into `exit`.
    pub fn new(reset: EventFd, poweroff: EventFd, exit: Arc<ExitSlot>) -> Self {
        Self {
            reset,
            poweroff,
            exit,
        }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.poweroff.as_raw_fd() {
            let _ = self.poweroff.read();
            self.exit.report(Ok(ExitReason::PowerOff));
        } else if fd == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            self.exit.report(Ok(ExitReason::Reset));
        } else if fd == self.exit.event.as_raw_fd() {
            let _ = self.exit.event.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.reset, &self.poweroff, &self.exit.event] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("cannot watch an exit event: {e}");
            }
        }
    }
}

/// The process's state-request event, written by the SIGUSR2 handler: its
/// descriptor, or -1 before [`StateRequests::new`]. The event is a static,
/// never closed, so the handler cannot write to a descriptor reused for
/// something else.
static STATE_REQUEST_FD: AtomicI32 = AtomicI32::new(-1);
static STATE_REQUEST: OnceLock<EventFd> = OnceLock::new();

#[allow(unsafe_code)]
extern "C" fn state_signal_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let fd = STATE_REQUEST_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is the static request
        // eventfd, open for the process's life, and `one` is the 8 bytes an
        // eventfd write takes. A full counter (EAGAIN) already asks.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// `kill -USR2 <pvmm>` asks every vCPU to log its state (registers, run
/// state, pending events, local APIC; `VcpuThreads::log_states`), for a
/// guest that hangs. The signal handler only writes an eventfd; this
/// subscriber reads it in the event loop and raises `requested`, which the
/// VM's run loop serves.
pub struct StateRequests {
    event: EventFd,
    requested: Arc<AtomicBool>,
}

impl StateRequests {
    /// Installs the SIGUSR2 handler (once per process) and watches its
    /// event, raising `requested`.
    pub fn new(requested: Arc<AtomicBool>) -> Result<Self> {
        let io = |what, e| Error::Io(what, e);
        let event = match STATE_REQUEST.get() {
            Some(e) => e,
            None => {
                let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| io("an event fd", e))?;
                let e = STATE_REQUEST.get_or_init(|| e);
                STATE_REQUEST_FD.store(e.as_raw_fd(), Ordering::Relaxed);
                vmm_sys_util::signal::register_signal_handler(libc::SIGUSR2, state_signal_handler)
                    .map_err(|e| io("the SIGUSR2 handler", e.into()))?;
                e
            }
        };
        Ok(Self {
            event: event.try_clone().map_err(|e| io("an event fd", e))?,
            requested,
        })
    }
}

impl MutEventSubscriber for StateRequests {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if self.event.read().is_ok() {
            self.requested.store(true, Ordering::Release);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            log::error!("cannot watch SIGUSR2's requests: {e}");
        }
    }
}

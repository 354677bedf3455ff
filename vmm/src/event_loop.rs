//! The VMM's event loop subscribers (event-manager): standard input into
//! COM1, and the events that end the VM.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::legacy::Serial;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

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

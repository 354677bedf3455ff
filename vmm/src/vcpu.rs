//! vCPU threads and their run loop.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and dispatches port-I/O and
//! MMIO exits to the buses directly. Registers are read and written with
//! KVM_GET/SET_REGS only on the few exits that need them (hypercalls,
//! failures). A vCPU is stopped by a flag and a signal whose handler sets
//! `kvm_run.immediate_exit`, so a stop request cannot be lost between the
//! flag check and `KVM_RUN`; the same signal has every vCPU log its state
//! ([`VcpuThreads::log_states`]) for a guest that hangs.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use devices::bus::Bus;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result, VcpuExitError};
use crate::hooks::{
    HypercallAction, HypercallExit, HypercallRegs, MsrContext, VmHooks, HYPERCALL_PORT,
};
use crate::ExitReason;

/// Where the first reason for the VM to end is recorded.
#[derive(Debug)]
pub struct ExitSlot {
    outcome: Mutex<Option<Result<ExitReason>>>,
    /// Signalled when an outcome is recorded.
    pub event: EventFd,
}

impl ExitSlot {
    /// An empty slot.
    pub fn new() -> Result<Self> {
        Ok(Self {
            outcome: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io("an event fd", e))?,
        })
    }

    /// Records `r` unless something was recorded first.
    pub fn report(&self, r: Result<ExitReason>) {
        let mut o = devices::lock::mutex(&self.outcome);
        if o.is_none() {
            *o = Some(r);
            if let Err(e) = self.event.write(1) {
                log::error!("cannot signal the VM exit: {e}");
            }
        }
    }

    /// Takes the outcome, if any.
    pub fn take(&self) -> Option<Result<ExitReason>> {
        devices::lock::mutex(&self.outcome).take()
    }

    /// Whether an outcome was recorded.
    pub fn is_set(&self) -> bool {
        devices::lock::mutex(&self.outcome).is_some()
    }
}

/// What every vCPU of a VM shares.
pub struct VcpuShared {
    /// Port I/O bus.
    pub pio_bus: Arc<Bus>,
    /// MMIO bus.
    pub mmio_bus: Arc<Bus>,
    /// Guest RAM.
    pub memory: Arc<GuestMemoryMmap>,
    /// Exit hooks.
    pub hooks: VmHooks,
    /// Set to stop every vCPU.
    pub stop: AtomicBool,
    /// Requests for every vCPU to log its state, counted
    /// ([`VcpuThreads::log_states`]).
    pub state_requests: AtomicU64,
    /// The VM's end.
    pub exit: Arc<ExitSlot>,
}

/// One vCPU, configured, not yet running.
pub struct Vcpu {
    /// Index (= APIC id = VP index).
    pub index: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
}

thread_local! {
    /// This thread's `kvm_run`, for the stop signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

#[allow(unsafe_code)]
extern "C" fn stop_signal_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // `try_with` never initialises lazily here (const initialiser) and does
    // not allocate: async-signal-safe.
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's live kvm_run mapping (set
            // before its first KVM_RUN and cleared before the VcpuFd is
            // dropped); a volatile byte store is what KVM expects of
            // immediate_exit.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// The signal that stops vCPUs.
fn stop_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_stop_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(stop_signal(), stop_signal_handler)
            .map_err(|e| Error::Io("the vCPU stop signal handler", e.into()));
    });
    res
}

/// An RDMSR or WRMSR exit to user space (KVM's MSR filter).
#[derive(Clone, Copy)]
struct MsrExit {
    index: u32,
    /// The value written; `None` for a read.
    write: Option<u64>,
}

/// What the loop does after an exit.
enum Next {
    Continue,
    Hypercall,
    /// Handled once the exit no longer borrows the vCPU, so that the
    /// handler can read the vCPU's TSC.
    Msr(MsrExit),
    Stop(Result<ExitReason>),
    Fail(VcpuExitError),
}

impl Vcpu {
    /// Runs until the VM ends or `shared.stop` is set; records failures and
    /// guest-initiated ends in `shared.exit`.
    pub fn run(mut self, shared: &VcpuShared) {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        // No sync regs: the registers are read with KVM_GET_REGS on the few
        // exits that need them (hypercalls, failures). Syncing the segment
        // registers on every exit slowed Linux guests on nested kvm_amd by a
        // third and made about one boot in six crash or stall there; with
        // the general registers synced on every exit, about one nested
        // Linux boot in eight still ended in an AP's triple fault (none in
        // the few boots since: too few to call it the cause).
        let mut states_logged = 0;
        let mut runs: u64 = 0;
        loop {
            if shared.stop.load(Ordering::Acquire) {
                break;
            }
            let requested = shared.state_requests.load(Ordering::Acquire);
            if requested != states_logged {
                states_logged = requested;
                self.log_state(&shared.memory, runs);
            }
            runs += 1;
            let next = match self.step(shared) {
                Next::Hypercall => match self.hypercall(shared) {
                    Ok(()) => Next::Continue,
                    Err(source) => Next::Fail(source),
                },
                next => next,
            };
            match next {
                Next::Continue | Next::Hypercall => {}
                Next::Msr(m) => self.msr(shared, m),
                Next::Stop(r) => {
                    if matches!(r, Ok(ExitReason::TripleFault)) {
                        self.log_shutdown_state();
                    }
                    shared.exit.report(r);
                    break;
                }
                Next::Fail(source) => {
                    let regs = self.fd.get_regs().unwrap_or_default();
                    shared.exit.report(Err(Error::VcpuFailed {
                        index: self.index,
                        rip: regs.rip,
                        rsp: regs.rsp,
                        source,
                    }));
                    break;
                }
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Logs (at info: the end itself is pvmm's one line) where a triple
    /// fault left the vCPU, for the diagnosis of a guest that resets
    /// without a word.
    fn log_shutdown_state(&self) {
        // On SVM, KVM re-initializes the vCPU on a shutdown intercept before
        // the exit: there this is the reset state, not where it failed.
        let regs = self.fd.get_regs().unwrap_or_default();
        let (rip, rsp, rflags) = (regs.rip, regs.rsp, regs.rflags);
        match self.fd.get_sregs() {
            Ok(s) => log::info!(
                "vCPU {}: triple fault at RIP {rip:#x} RSP {rsp:#x} RFLAGS {rflags:#x} CR0 {:#x} CR2 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x} IDT {:#x}+{:#x} CS {:#x} SS {:#x}",
                self.index,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.idt.base,
                s.idt.limit,
                s.cs.selector,
                s.ss.selector
            ),
            Err(e) => log::info!(
                "vCPU {}: triple fault at RIP {rip:#x} RSP {rsp:#x} (KVM_GET_SREGS: {e})",
                self.index
            ),
        }
    }

    /// Logs, at warn, where the vCPU is and what KVM holds for it: the
    /// registers, the run state, the event being injected, the NMI state,
    /// the local APIC's TPR, IRR and ISR, and how often KVM_RUN has
    /// returned (`runs`). For a guest that hangs: two logs a while apart
    /// tell a halted vCPU that waits for an interrupt from one that spins,
    /// and from one that KVM keeps inside the kernel (its count stays put:
    /// under nested SVM, a vCPU whose page-fault delivery faults again for
    /// ever, its CR3 outside guest RAM).
    fn log_state(&self, memory: &GuestMemoryMmap, runs: u64) {
        const CR0_PG: u64 = 1 << 31;
        const CR3_ADDRESS: u64 = 0x000f_ffff_ffff_f000;
        let i = self.index;
        let regs = match self.fd.get_regs() {
            Ok(r) => format!("RIP {:#x} RSP {:#x} RFLAGS {:#x}", r.rip, r.rsp, r.rflags),
            Err(e) => format!("registers unreadable ({e})"),
        };
        let sregs = match self.fd.get_sregs() {
            Ok(s) => {
                let root = s.cr3 & CR3_ADDRESS;
                let outside = s.cr0 & CR0_PG != 0 && !memory.address_in_range(GuestAddress(root));
                format!(
                    "CR0 {:#x} CR3 {:#x}{} CR4 {:#x} EFER {:#x}",
                    s.cr0,
                    s.cr3,
                    if outside { " (outside guest RAM)" } else { "" },
                    s.cr4,
                    s.efer
                )
            }
            Err(e) => format!("system registers unreadable ({e})"),
        };
        let run_state = match self.fd.get_mp_state().map(|m| m.mp_state) {
            Ok(kvm_bindings::KVM_MP_STATE_RUNNABLE) => "runnable".to_string(),
            Ok(kvm_bindings::KVM_MP_STATE_UNINITIALIZED) => "not started".to_string(),
            Ok(kvm_bindings::KVM_MP_STATE_INIT_RECEIVED) => "INIT received".to_string(),
            Ok(kvm_bindings::KVM_MP_STATE_HALTED) => "halted".to_string(),
            Ok(kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED) => "SIPI received".to_string(),
            Ok(other) => format!("run state {other}"),
            Err(e) => format!("run state unreadable ({e})"),
        };
        let events = match self.fd.get_vcpu_events() {
            Ok(ev) => {
                let exception = if ev.exception.injected != 0 || ev.exception.pending != 0 {
                    format!("exception {} being injected", ev.exception.nr)
                } else {
                    "no exception".to_string()
                };
                let interrupt = if ev.interrupt.injected != 0 {
                    format!("interrupt {:#x} being injected", ev.interrupt.nr)
                } else {
                    "no interrupt".to_string()
                };
                format!(
                    "{exception}, {interrupt}, NMI pending {} masked {}",
                    ev.nmi.pending, ev.nmi.masked
                )
            }
            Err(e) => format!("events unreadable ({e})"),
        };
        let apic = match self.fd.get_lapic() {
            Ok(l) => {
                let reg = |offset: usize| {
                    let b = |k: usize| l.regs.get(offset + k).map_or(0, |c| *c as u8);
                    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
                };
                // IRR and ISR: eight 32-bit registers, 16 bytes apart.
                let vectors = |base: usize| {
                    let v: Vec<String> = (0..256usize)
                        .filter(|v| reg(base + v / 32 * 0x10) & (1 << (v % 32)) != 0)
                        .map(|v| format!("{v:#x}"))
                        .collect();
                    v.join(",")
                };
                format!(
                    "APIC TPR {:#x} IRR [{}] ISR [{}]",
                    reg(0x80),
                    vectors(0x200),
                    vectors(0x100)
                )
            }
            Err(e) => format!("APIC unreadable ({e})"),
        };
        log::warn!(
            "vCPU {i}: {regs} {sregs}; {run_state}; {events}; {apic}; KVM_RUN returns: {runs}"
        );
    }

    /// One KVM_RUN and the dispatch of its exit.
    #[inline]
    fn step(&mut self, shared: &VcpuShared) -> Next {
        match self.fd.run() {
            Ok(exit) => match exit {
                // String I/O (`rep ins`/`rep outs`) arrives as `count`
                // elements of `size` bytes: one device access each.
                VcpuExit::IoIn(port, data) => {
                    let size = pio_element_size(data.len());
                    for element in data.chunks_mut(size) {
                        if !shared.pio_bus.read(u64::from(port), element) {
                            element.fill(0xff);
                        }
                    }
                    Next::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    let size = pio_element_size(data.len());
                    if port == HYPERCALL_PORT && shared.hooks.hypercall.is_some() {
                        // Only the stub's `out 0xE4, al` is a hypercall; a
                        // string or wider write there goes nowhere.
                        if data.len() == 1 {
                            Next::Hypercall
                        } else {
                            Next::Continue
                        }
                    } else {
                        for element in data.chunks(size) {
                            shared.pio_bus.write(u64::from(port), element);
                        }
                        Next::Continue
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !shared.mmio_bus.read(addr, data) {
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    shared.mmio_bus.write(addr, data);
                    Next::Continue
                }
                VcpuExit::X86Rdmsr(exit) => Next::Msr(MsrExit {
                    index: exit.index,
                    write: None,
                }),
                VcpuExit::X86Wrmsr(exit) => Next::Msr(MsrExit {
                    index: exit.index,
                    write: Some(exit.data),
                }),
                // The EOI of a level-triggered IOAPIC interrupt: pins are
                // pulsed through irqfds, so there is no line to sample
                // again (devices::ioapic).
                VcpuExit::IoapicEoi(_) => Next::Continue,
                VcpuExit::Shutdown => Next::Stop(Ok(ExitReason::TripleFault)),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(Ok(ExitReason::PowerOff)),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Stop(Ok(ExitReason::Reset)),
                    k => Next::Fail(VcpuExitError::SystemEvent(k)),
                },
                VcpuExit::InternalError => Next::Fail(self.internal_error()),
                VcpuExit::FailEntry(reason, cpu) => {
                    Next::Fail(VcpuExitError::FailedEntry { reason, cpu })
                }
                // HLT among them: the in-kernel LAPIC handles it.
                _ => Next::Fail(VcpuExitError::UnexpectedExit(
                    self.fd.get_kvm_run().exit_reason,
                )),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Fail(VcpuExitError::Run(e)),
        }
    }

    /// Runs the hypercall hook with the registers of this exit (KVM_GET_REGS
    /// and, for the CPL, KVM_GET_SREGS), and gives KVM the outcome
    /// (KVM_SET_REGS). KVM completes the `out` (skips it) on the next
    /// KVM_RUN only if RIP is still the one of the exit, so a restart that
    /// moves RIP back to the stub re-executes it on every KVM.
    fn hypercall(&mut self, shared: &VcpuShared) -> std::result::Result<(), VcpuExitError> {
        let Some(h) = shared.hooks.hypercall.as_ref() else {
            return Ok(());
        };
        let mut regs = self
            .fd
            .get_regs()
            .map_err(|e| VcpuExitError::Registers("KVM_GET_REGS", e))?;
        // A vCPU whose segment registers cannot be read is taken for user
        // mode (denied).
        let sregs = self.fd.get_sregs().ok();
        let exit = HypercallExit {
            regs: HypercallRegs {
                rcx: regs.rcx,
                rdx: regs.rdx,
                r8: regs.r8,
            },
            rip: regs.rip,
            cpl: sregs.map_or(3, |s| cpl(&s, regs.rflags)),
        };
        match h.hypercall(&shared.memory, self.index, exit) {
            // An unused port: the write goes nowhere.
            HypercallAction::NotAHypercall => return Ok(()),
            HypercallAction::Complete { rax } => regs.rax = rax,
            HypercallAction::Restart { rcx, rip } => {
                regs.rcx = rcx;
                regs.rip = rip;
            }
        }
        self.fd
            .set_regs(&regs)
            .map_err(|e| VcpuExitError::Registers("KVM_SET_REGS", e))
    }

    /// Runs the MSR hook for the RDMSR or WRMSR exit `m` (the last exit)
    /// and leaves its outcome in `kvm_run` for the next KVM_RUN: the value
    /// read, or the #GP flag.
    #[allow(unsafe_code)]
    fn msr(&mut self, shared: &VcpuShared, m: MsrExit) {
        let fd = &self.fd;
        let tsc = || guest_tsc(fd);
        let ctx = MsrContext::new(&shared.memory, self.index, &tsc);
        let outcome = match (shared.hooks.msr.as_ref(), m.write) {
            (None, _) => None,
            (Some(h), None) => h.read(&ctx, m.index),
            (Some(h), Some(value)) => h.write(&ctx, m.index, value).then_some(value),
        };
        let run = self.fd.get_kvm_run();
        // SAFETY: `m` came from the last exit, KVM_EXIT_X86_RDMSR or
        // KVM_EXIT_X86_WRMSR, and the vCPU has not run since: `msr` is the
        // union member KVM filled, and the one it reads back on KVM_RUN.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        match outcome {
            Some(value) => {
                if m.write.is_none() {
                    msr.data = value;
                }
            }
            None => msr.error = 1,
        }
    }

    /// The details of a KVM_EXIT_INTERNAL_ERROR.
    #[allow(unsafe_code)]
    fn internal_error(&mut self) -> VcpuExitError {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel
        // filled the `internal` member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        VcpuExitError::InternalError {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
        }
    }
}

/// Running vCPU threads.
pub struct VcpuThreads {
    handles: Vec<JoinHandle<()>>,
    shared: Arc<VcpuShared>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU.
    pub fn start(vcpus: Vec<Vcpu>, shared: Arc<VcpuShared>) -> Result<Self> {
        install_stop_handler()?;
        let mut threads = Self {
            handles: Vec::with_capacity(vcpus.len()),
            shared,
        };
        for vcpu in vcpus {
            let index = vcpu.index;
            let shared = threads.shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu.run(&shared))
                .map_err(|e| Error::VcpuSpawn(index, e))?;
            threads.handles.push(h);
        }
        Ok(threads)
    }

    /// Stops every vCPU and waits for the threads.
    pub fn stop(mut self) {
        self.stop_all();
    }

    /// Has every running vCPU log its state (`Vcpu::log_state`) once it is
    /// out of KVM_RUN, which this forces.
    pub fn log_states(&self) {
        self.shared.state_requests.fetch_add(1, Ordering::AcqRel);
        self.kick_all();
    }

    /// Forces every running vCPU out of KVM_RUN (the stop signal), to see
    /// `shared.stop` or a state request.
    #[allow(unsafe_code)]
    fn kick_all(&self) {
        use std::os::unix::thread::JoinHandleExt;
        for h in &self.handles {
            if !h.is_finished() {
                // SAFETY: the pthread is alive (not yet joined: joining
                // takes `&mut self`); the signal has a handler installed
                // that only sets immediate_exit.
                unsafe { libc::pthread_kill(h.as_pthread_t(), stop_signal()) };
            }
        }
    }

    fn stop_all(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.kick_all();
        for h in self.handles.drain(..) {
            if h.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            self.stop_all();
        }
    }
}

/// The TSC of `vcpu` now, as its guest reads it (KVM_GET_MSRS of
/// IA32_TSC).
pub(crate) fn guest_tsc(vcpu: &VcpuFd) -> Option<u64> {
    const MSR_IA32_TSC: u32 = 0x10;
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice().first().map(|e| e.data),
        _ => None,
    }
}

/// The current privilege level: 0 in real mode, 3 in virtual-8086 mode,
/// else SS.DPL (which both VMX and SVM keep equal to the CPL).
fn cpl(sregs: &kvm_bindings::kvm_sregs, rflags: u64) -> u8 {
    const CR0_PE: u64 = 1;
    const RFLAGS_VM: u64 = 1 << 17;
    if sregs.cr0 & CR0_PE == 0 {
        0
    } else if rflags & RFLAGS_VM != 0 {
        3
    } else {
        sregs.ss.dpl & 3
    }
}

/// The size in bytes of one element of this thread's current port-I/O exit
/// (1, 2 or 4), whose data is `len` bytes; `len` when it cannot be read.
#[allow(unsafe_code)]
fn pio_element_size(len: usize) -> usize {
    let size = KVM_RUN.with(|p| {
        let run = p.get();
        if run.is_null() {
            return 0;
        }
        // SAFETY: `run` is this thread's live kvm_run mapping (set before
        // its first KVM_RUN), the exit reason is KVM_EXIT_IO, so the kernel
        // filled the `io` member; `size` is a byte of the struct's header,
        // apart from the data area the caller borrows.
        unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read() }
    });
    match usize::from(size) {
        s @ (1 | 2 | 4) if len % s == 0 => s,
        _ => len.max(1),
    }
}

//! The hypercall dispatcher: the one place that turns guest registers into a
//! typed call.
//!
//! It owns every check of the call's shape (reserved control bits, code,
//! nested, variable header, simple vs rep, rep count and start, fast form),
//! of the buffers (8-byte alignment, no page crossing, in guest RAM), copies
//! the input into a zeroed buffer on the stack, runs the typed handler of the
//! domain layer on the reps of this time slice, and writes the output back
//! only for a call that completed. It allocates nothing and never leaves the
//! calling thread.
//!
//! Order of checks (the first failing one gives the status):
//! 1. control reserved bits: INVALID_HYPERCALL_INPUT;
//! 2. unknown code: INVALID_HYPERCALL_CODE;
//! 3. nested, variable header, rep count/start against the call's kind:
//!    INVALID_HYPERCALL_INPUT (reps completed 0 for 1-3);
//! 4. fast form whose input is over 16 bytes or that has output:
//!    INVALID_HYPERCALL_INPUT;
//! 5. input/output block misaligned or crossing a page: INVALID_ALIGNMENT;
//! 6. input/output block not in guest RAM: INVALID_PARAMETER;
//! 7. the handler's own checks.
//!
//! From step 4 on, an error reports the rep start as reps completed (the
//! reps of earlier slices stay done); a handler error reports the index of
//! the failing rep.
//!
//! The calls are one table (`hypercalls!` below): per call its code, its ABI
//! input, rep element, rep output and output types, and its handler. The
//! shapes the checks use ([`CALLS`]) are `size_of` those types, the table is
//! checked at compile time to be [`HypercallCode::ALL`] in order (the
//! counters' slots follow that list), and the handlers get typed values.
//! The IOMMU's calls run under its state lock; the calls of the
//! partition's (`vp`: SEND_SYNTHETIC_CLUSTER_IPI, POST_MESSAGE) run against
//! the VMM's [`Processors`], without it.

use crate::domains::{RepError, State};
use crate::ram;
use crate::Iommu;
use pviommu_abi::{
    Control, DeviceId, HvError, HvStatus, HypercallCode, HypercallOutput, InputAttachDeviceDomain,
    InputConfigureDeviceDomain, InputCreateDeviceDomain, InputDeleteDeviceDomain,
    InputDetachDeviceDomain, InputFlushDeviceDomain, InputFlushDeviceDomainList,
    InputGetIommuCapabilities, InputGetLogicalDeviceProperty, InputGetVpRegisters,
    InputMapDeviceGpaPages, InputPostMessage, InputRetargetDeviceInterrupt,
    InputSendSyntheticClusterIpi, InputSignalEvent, InputUnmapDeviceGpaPages,
    OutputGetIommuCapabilities, OutputGetLogicalDeviceProperty, RegisterValue,
    HV_INTERRUPT_SOURCE_MSI, HV_PAGE_SIZE, HV_PARTITION_ID_SELF, IPI_VECTORS,
};
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::GuestMemory;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

/// The registers of a hypercall: RCX (input value), RDX (input GPA or fast
/// data), R8 (output GPA or fast data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypercallRegs {
    /// Input value (control word).
    pub rcx: u64,
    /// Input block GPA, or the first 8 bytes of a fast call's input.
    pub rdx: u64,
    /// Output block GPA, or the second 8 bytes of a fast call's input.
    pub r8: u64,
}

/// Who makes a hypercall, as the vCPU's state tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The calling vCPU's index.
    pub vp_index: u32,
    /// Its privilege level: a call from CPL > 0 gets ACCESS_DENIED and does
    /// nothing (contract section 2).
    pub cpl: u8,
    /// Whether the VMM can make the guest issue the call again
    /// ([`HypercallOutcome::Continue`]): true for calls through the
    /// hypercall page's stub. A call that cannot be restarted runs all its
    /// reps in one go.
    pub restartable: bool,
}

impl Caller {
    /// Guest kernel code on vCPU `vp_index`, calling through the stub.
    pub const fn kernel(vp_index: u32) -> Self {
        Self {
            vp_index,
            cpl: 0,
            restartable: true,
        }
    }
}

/// What the VMM does with the vCPU after [`Iommu::dispatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallOutcome {
    /// The call is over: write `rax` (status and reps completed) to RAX.
    Complete {
        /// The result value.
        rax: u64,
    },
    /// The rep budget ran out: write `rcx` (the input value with the new rep
    /// start) to RCX and point RIP at the stub's restart point
    /// ([`pviommu_abi::hypercall_restart_rip`]) so that the guest issues the
    /// call again; RAX is not written. Only for a [`Caller::restartable`]
    /// call.
    Continue {
        /// The new input value.
        rcx: u64,
    },
}

/// The partition's virtual processors, for the calls that reach them
/// rather than the IOMMU (SEND_SYNTHETIC_CLUSTER_IPI, and POST_MESSAGE to
/// their SynICs' message ports). The VMM implements
/// it over its vCPUs; [`Iommu::dispatch_for`] takes one per call.
pub trait Processors: Sync {
    /// Whether the partition offers call `code` at all: the dispatcher
    /// answers a call not offered with INVALID_HYPERCALL_CODE before it
    /// checks the call's input. Default: every call.
    fn offers(&self, code: HypercallCode) -> bool {
        let _ = code;
        true
    }

    /// Delivers fixed interrupt `vector` (in [`IPI_VECTORS`], checked) to
    /// every VP whose bit is set in `targets` (bit n: VP n), and ends any
    /// GUEST_IDLE wait of theirs. A target the partition does not have is
    /// INVALID_PARAMETER, before anything is delivered.
    fn send_ipi(&self, vector: u8, targets: u64) -> Result<(), HvError>;

    /// POST_MESSAGE from VP `vp`: `input` as the guest wrote it (nothing
    /// checked), for the VMM's message ports (VMBus). Its status is the
    /// call's. A VMM without ports keeps the default: the call does not
    /// exist.
    fn post_message(&self, vp: u32, input: &InputPostMessage) -> Result<(), HvError> {
        let _ = (vp, input);
        Err(HvError::INVALID_HYPERCALL_CODE)
    }

    /// SIGNAL_EVENT from VP `vp` (nothing checked), for the VMM's event
    /// ports (VMBus channels). Default: the call does not exist.
    fn signal_event(&self, vp: u32, input: &InputSignalEvent) -> Result<(), HvError> {
        let _ = (vp, input);
        Err(HvError::INVALID_HYPERCALL_CODE)
    }

    /// RETARGET_INTERRUPT, its input checked (partition, MSI source, a
    /// well-formed VP set): the MSI `address` (low half) and `data` that
    /// device `device` was given now deliver `vector` to the VPs of
    /// `vps` (bit n: VP n; the VMM checks they exist and that the device
    /// has that interrupt). Default: the call does not exist.
    fn retarget_interrupt(
        &self,
        device: DeviceId,
        address: u32,
        data: u32,
        vector: u32,
        vps: u64,
    ) -> Result<(), HvError> {
        let _ = (device, address, data, vector, vps);
        Err(HvError::INVALID_HYPERCALL_CODE)
    }
}

/// The shape of a call, from its ABI types ([`CALLS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// The call code.
    pub code: HypercallCode,
    /// A rep call (else simple).
    pub rep: bool,
    /// `size_of` the fixed input header.
    pub header: usize,
    /// Bytes of variable input header the call takes at most (after the
    /// fixed header; 0: none).
    pub var_header: usize,
    /// `size_of` one rep's input element (0: none).
    pub elem: usize,
    /// `size_of` a simple call's output (0: none).
    pub output: usize,
    /// `size_of` one rep's output element (0: none).
    pub out_elem: usize,
    /// The call may take translations away (`[dma_barrier]` in the
    /// table): it returns only after the emulated DMA that may still use
    /// them has finished.
    pub dma_barrier: bool,
}

/// The reps of this time slice, as a typed handler gets them.
pub(crate) struct Reps<'a, E, O> {
    /// Index of the first rep (reps of earlier slices are done).
    pub start: u16,
    /// Reps in this slice.
    pub count: usize,
    /// Their input elements (empty for a call without any).
    pub elems: &'a [E],
    /// Their output elements, zeroed (empty for a call without any).
    pub out: &'a mut [O],
}

/// What a typed handler gets beside the state and its input.
pub(crate) struct Ctx<'a, M: ?Sized> {
    pub iommu: &'a Iommu,
    pub mem: &'a M,
    pub vp_index: u32,
    /// The call's variable header, in 8-byte words.
    pub var_words: usize,
    /// `None`: the calls to processors are INVALID_HYPERCALL_CODE.
    pub processors: Option<&'a dyn Processors>,
}

/// A rep element type: a slice of them over guest bytes, typed (no
/// alignment needed: the ABI's integers are byte arrays). `()` is "none".
pub(crate) trait Element: Sized {
    fn slice(bytes: &[u8]) -> Option<&[Self]>;
    fn slice_mut(bytes: &mut [u8]) -> Option<&mut [Self]>;
}

impl Element for () {
    fn slice(_: &[u8]) -> Option<&[Self]> {
        Some(&[])
    }
    fn slice_mut(_: &mut [u8]) -> Option<&mut [Self]> {
        Some(&mut [])
    }
}

macro_rules! elements {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn slice(bytes: &[u8]) -> Option<&[Self]> {
                <[Self]>::ref_from_bytes(bytes).ok()
            }
            fn slice_mut(bytes: &mut [u8]) -> Option<&mut [Self]> {
                <[Self]>::mut_from_bytes(bytes).ok()
            }
        }
    )*};
}
elements!(U32, U64, RegisterValue);

/// A simple call's output type, written at the start of the output block.
/// `()` is "none".
pub(crate) trait Output {
    fn write(&self, out: &mut [u8]);
}

impl Output for () {
    fn write(&self, _: &mut [u8]) {}
}

macro_rules! outputs {
    ($($t:ty),*) => {$(
        impl Output for $t {
            fn write(&self, out: &mut [u8]) {
                // The buffer is MAX_OUTPUT bytes, at least size_of::<Self>().
                let _ = self.write_to_prefix(out);
            }
        }
    )*};
}
outputs!(OutputGetIommuCapabilities, OutputGetLogicalDeviceProperty);

/// A handler's result: a simple call's (`HvResult`) or a rep call's
/// (`Result<_, RepError>`, the failing rep in it).
pub(crate) trait HandlerResult<T> {
    fn into_rep(self) -> Result<T, RepError>;
}

impl<T> HandlerResult<T> for Result<T, HvError> {
    fn into_rep(self) -> Result<T, RepError> {
        self.map_err(RepError::from)
    }
}

impl<T> HandlerResult<T> for Result<T, RepError> {
    fn into_rep(self) -> Self {
        self
    }
}

/// Parses a call's typed input and elements out of the zeroed copies the
/// dispatcher made, runs `handler` on them, and writes its output.
#[allow(clippy::too_many_arguments)]
fn run_typed<M, S, I, E, O, Out, R>(
    cx: &Ctx<'_, M>,
    state: &mut S,
    header: &[u8],
    elems: &[u8],
    (start, end): (u16, u16),
    output: &mut [u8],
    handler: impl FnOnce(&Ctx<'_, M>, &mut S, &I, Reps<'_, E, O>) -> R,
) -> Result<(), RepError>
where
    M: GuestMemory + ?Sized,
    I: FromBytes,
    E: Element,
    O: Element,
    Out: Output,
    R: HandlerResult<Out>,
{
    let invalid = || RepError::from(HvError::INVALID_PARAMETER);
    let (input, _) = I::read_from_prefix(header).map_err(|_| invalid())?;
    let count = usize::from(end.saturating_sub(start));
    let elems = E::slice(elems).ok_or_else(invalid)?;
    // The dispatcher gives a rep-output call a buffer for its chunk's reps
    // (never short); other calls have no per-rep output, so `out` is empty
    // and `rest` is the whole buffer, for a simple call's output.
    let out_len = count * size_of::<O>();
    if out_len > output.len() {
        return Err(invalid());
    }
    let (out, rest) = output.split_at_mut(out_len);
    let out = O::slice_mut(out).ok_or_else(invalid)?;
    let reps = Reps {
        start,
        count,
        elems,
        out,
    };
    handler(cx, state, &input, reps).into_rep()?.write(rest);
    Ok(())
}

/// The hypercall table: one line per call of the contract, in
/// [`HypercallCode::ALL`]'s order (checked at compile time): its kind, its
/// input header, rep element and rep output types, its output type,
/// `[dma_barrier]` when it may take translations away (the call returns
/// only once in-flight emulated DMA has finished: [`Shape::dma_barrier`]),
/// and its handler. [`CALLS`] (the shapes, every size a `size_of`) and the
/// dispatcher's `run_call` are both generated from it.
macro_rules! hypercalls {
    ($(
        $code:ident: $kind:ident($input:ty, $elem:ty => $out_elem:ty) -> $output:ty
            $([$attr:ident])? = $handler:expr;
    )*) => {
        /// Every call's shape, in [`HypercallCode::ALL`]'s order.
        pub(crate) const CALLS: [Shape; HypercallCode::ALL.len()] = [$(
            Shape {
                code: HypercallCode::$code,
                rep: hypercalls!(@rep $kind),
                header: hypercalls!(@fixed $input, $($attr)?),
                var_header: size_of::<$input>() - hypercalls!(@fixed $input, $($attr)?),
                elem: size_of::<$elem>(),
                output: size_of::<$output>(),
                out_elem: size_of::<$out_elem>(),
                dma_barrier: hypercalls!(@barrier $($attr)?),
            },
        )*];

        impl Iommu {
            /// Runs the typed handler of `code` under the state lock, on
            /// reps `start..end` (rep calls).
            #[allow(clippy::too_many_arguments)]
            fn run_call<M: GuestMemory + ?Sized>(
                &self,
                cx: &Ctx<'_, M>,
                code: HypercallCode,
                header: &[u8],
                elems: &[u8],
                start: u16,
                end: u16,
                output: &mut [u8],
            ) -> Result<(), RepError> {
                let reps = (start, end);
                match code {
                    $(HypercallCode::$code => hypercalls!(@state $kind, self, cx, code, |state| {
                        run_typed::<M, hypercalls!(@ty $kind), $input, $elem, $out_elem, $output, _>(
                            cx, state, header, elems, reps, output, $handler,
                        )
                    }),)*
                    _ => Err(HvError::INVALID_HYPERCALL_CODE.into()),
                }
            }
        }
    };
    (@barrier dma_barrier) => { true };
    (@barrier $($attr:ident)?) => { false };
    // `[variable]`: the input type holds the largest variable header after
    // its `FIXED_SIZE` bytes.
    (@fixed $input:ty, variable) => { <$input>::FIXED_SIZE };
    (@fixed $input:ty, $($attr:ident)?) => { size_of::<$input>() };
    (@rep simple) => { false };
    (@rep rep) => { true };
    (@rep vp) => { false };
    // The IOMMU's calls run under its state lock; a VP call (`vp`: simple,
    // about the partition's processors) takes no lock of the IOMMU's and
    // runs against the VMM's [`Processors`], where they offer it: a call
    // they do not offer does not exist, whatever its input.
    (@ty vp) => { &dyn Processors };
    (@ty $kind:ident) => { State };
    (@state vp, $iommu:ident, $cx:ident, $code:ident, $run:expr) => {
        match $cx.processors.filter(|p| p.offers($code)) {
            Some(mut processors) => ($run)(&mut processors),
            None => Err(HvError::INVALID_HYPERCALL_CODE.into()),
        }
    };
    (@state $kind:ident, $iommu:ident, $cx:ident, $code:ident, $run:expr) => {{
        let mut state = $iommu.lock_state();
        let state = &mut *state;
        state.sync_budget(&$cx.iommu.config, $cx.mem);
        ($run)(state)
    }};
}

hypercalls! {
    CREATE_DEVICE_DOMAIN: simple(InputCreateDeviceDomain, () => ()) -> ()
        // A domain's fault count starts at zero (and goes with it below).
        = |cx, state, input, _| state
            .create_domain(&cx.iommu.config, input)
            .map(|id| cx.iommu.lock_faults().forget_domain(id));
    ATTACH_DEVICE_DOMAIN: simple(InputAttachDeviceDomain, () => ()) -> () [dma_barrier]
        = |_, state, input, _| state.attach(input);
    MAP_DEVICE_GPA_PAGES: rep(InputMapDeviceGpaPages, U64 => ()) -> ()
        = |cx, state, input, reps| {
            state.map(&cx.iommu.config, cx.mem, input, reps.start, reps.elems)
        };
    UNMAP_DEVICE_GPA_PAGES: rep(InputUnmapDeviceGpaPages, () => ()) -> () [dma_barrier]
        = |cx, state, input, reps| {
            state.unmap(&cx.iommu.config, cx.mem, input, reps.start, reps.count)
        };
    DETACH_DEVICE_DOMAIN: simple(InputDetachDeviceDomain, () => ()) -> () [dma_barrier]
        = |_, state, input, _| state.detach(input);
    DELETE_DEVICE_DOMAIN: simple(InputDeleteDeviceDomain, () => ()) -> () [dma_barrier]
        = |cx, state, input, _| state
            .delete_domain(input)
            .map(|id| cx.iommu.lock_faults().forget_domain(id));
    CONFIGURE_DEVICE_DOMAIN: simple(InputConfigureDeviceDomain, () => ()) -> () [dma_barrier]
        = |cx, state, input, _| state.configure(&cx.iommu.config, cx.mem, input);
    FLUSH_DEVICE_DOMAIN: simple(InputFlushDeviceDomain, () => ()) -> () [dma_barrier]
        = |_, state, input, _| state.flush(input);
    FLUSH_DEVICE_DOMAIN_LIST: rep(InputFlushDeviceDomainList, U64 => ()) -> () [dma_barrier]
        = |cx, state, input, reps| state.flush_list(&cx.iommu.config, input, reps.elems);
    GET_IOMMU_CAPABILITIES: simple(InputGetIommuCapabilities, () => ()) -> OutputGetIommuCapabilities
        = |cx, state, input, _| state.get_capabilities(&cx.iommu.config, input);
    GET_LOGICAL_DEVICE_PROPERTY: simple(InputGetLogicalDeviceProperty, () => ())
        -> OutputGetLogicalDeviceProperty
        = |_, state, input, _| state.get_device_property(input);
    GET_VP_REGISTERS: rep(InputGetVpRegisters, U32 => RegisterValue) -> ()
        = |cx, state, input, reps| {
            state.get_vp_registers(cx.vp_index, input, reps.elems, reps.out)
        };
    SEND_SYNTHETIC_CLUSTER_IPI: vp(InputSendSyntheticClusterIpi, () => ()) -> ()
        = |_, processors, input, _| send_ipi(*processors, input);
    POST_MESSAGE: vp(InputPostMessage, () => ()) -> ()
        = |cx, processors, input, _| processors.post_message(cx.vp_index, input);
    SIGNAL_EVENT: vp(InputSignalEvent, () => ()) -> ()
        = |cx, processors, input, _| processors.signal_event(cx.vp_index, input);
    RETARGET_INTERRUPT: vp(InputRetargetDeviceInterrupt, () => ()) -> () [variable]
        = |cx, processors, input, _| retarget(*processors, input, cx.var_words);
}

/// RETARGET_INTERRUPT: the input's checks (the partition is SELF, the
/// interrupt an MSI, the VP set well formed: else INVALID_PARTITION_ID,
/// INVALID_PARAMETER), then the VMM's retargeting.
fn retarget(
    processors: &dyn Processors,
    input: &InputRetargetDeviceInterrupt,
    var_words: usize,
) -> Result<(), HvError> {
    if input.partition_id.get() != HV_PARTITION_ID_SELF {
        return Err(HvError::INVALID_PARTITION_ID);
    }
    if input.source.get() != HV_INTERRUPT_SOURCE_MSI {
        return Err(HvError::INVALID_PARAMETER);
    }
    let vps = input
        .target_vps(var_words)
        .ok_or(HvError::INVALID_PARAMETER)?;
    processors.retarget_interrupt(
        DeviceId::from_bits(input.device_id.get()),
        input.msi_address.get(),
        input.msi_data.get(),
        input.vector.get(),
        vps,
    )
}

/// SEND_SYNTHETIC_CLUSTER_IPI: the input's checks (TLFS: a vector outside
/// [`IPI_VECTORS`] or a reserved bit set is INVALID_PARAMETER), then the
/// VMM's delivery.
fn send_ipi(
    processors: &dyn Processors,
    input: &InputSendSyntheticClusterIpi,
) -> Result<(), HvError> {
    let vector = input.vector.get();
    if input.reserved.get() != 0 || !IPI_VECTORS.contains(&vector) {
        return Err(HvError::INVALID_PARAMETER);
    }
    // In IPI_VECTORS: fits a u8.
    let vector = u8::try_from(vector).map_err(|_| HvError::INVALID_PARAMETER)?;
    processors.send_ipi(vector, input.cpu_mask.get())
}

/// The largest `field` over the table (for the dispatcher's stack buffers).
macro_rules! table_max {
    ($field:ident) => {{
        let mut max = 0;
        let mut i = 0;
        while i < CALLS.len() {
            if CALLS[i].$field > max {
                max = CALLS[i].$field;
            }
            i += 1;
        }
        max
    }};
}

const PAGE: usize = 4096;
/// The largest input header, fixed and variable parts together.
const MAX_HEADER: usize = {
    let mut max = 0;
    let mut i = 0;
    while i < CALLS.len() {
        if CALLS[i].header + CALLS[i].var_header > max {
            max = CALLS[i].header + CALLS[i].var_header;
        }
        i += 1;
    }
    max
};
const MAX_OUTPUT: usize = table_max!(output);
const MAX_OUT_ELEM: usize = table_max!(out_elem);
const FAST_BYTES: usize = 16;
/// Reps of a call with per-rep output run in chunks of this many, through a
/// small output buffer on the stack.
const OUT_CHUNK: u16 = 16;

// The table is HypercallCode::ALL, in order (the counters' slots follow it);
// its shapes fit the dispatcher's buffers and the contract's rules.
const _: () = {
    assert!(PAGE as u64 == HV_PAGE_SIZE);
    let mut i = 0;
    while i < CALLS.len() {
        let c = &CALLS[i];
        assert!(
            c.code.0 == HypercallCode::ALL[i].0,
            "table out of ALL's order"
        );
        assert!(
            c.header % 8 == 0 || !c.rep,
            "rep elements must be 8-byte aligned"
        );
        assert!(
            c.rep || (c.elem == 0 && c.out_elem == 0),
            "only rep calls have elements"
        );
        assert!(
            !c.rep || c.output == 0,
            "rep calls return per-rep output only"
        );
        assert!(
            c.var_header == 0 || !c.rep,
            "only simple calls take a variable header"
        );
        assert!(c.var_header % 8 == 0, "variable headers are 8-byte words");
        assert!(c.header + c.var_header + c.elem <= PAGE && c.output <= PAGE && c.out_elem <= PAGE);
        i += 1;
    }
};

/// The shape of `code`, `None` for a code outside the contract.
pub(crate) fn shape(code: HypercallCode) -> Option<Shape> {
    CALLS.iter().find(|s| s.code == code).copied()
}

/// Code slots of the counters: one per [`HypercallCode::ALL`], then one
/// for unknown codes.
pub(crate) const CODE_SLOTS: usize = HypercallCode::ALL.len() + 1;
/// Status slots of the counters: SUCCESS, one per [`HvError::ALL`] (the
/// contract's errors and the SynIC's, which POST_MESSAGE returns), then
/// one for a status pviommu-abi does not name (never produced).
pub(crate) const STATUS_SLOTS: usize = HvError::ALL.len() + 2;

/// Per-code counters (index in [`HypercallCode::ALL`], last slot: unknown).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Dispatches (slices) per code.
    pub calls: [AtomicU64; CODE_SLOTS],
    /// Completed calls per code and final status.
    pub statuses: [[AtomicU64; STATUS_SLOTS]; CODE_SLOTS],
    pub errors: AtomicU64,
    pub continuations: AtomicU64,
}

impl Counters {
    pub(crate) fn slot(code: HypercallCode) -> usize {
        HypercallCode::ALL
            .iter()
            .position(|c| *c == code)
            .unwrap_or(HypercallCode::ALL.len())
    }

    /// The status slot of `status`; the inverse of [`Counters::status_of`].
    pub(crate) fn status_slot(status: HvStatus) -> usize {
        match HvError::from_status(status) {
            None => 0,
            Some(e) => HvError::ALL
                .iter()
                .position(|x| *x == e)
                .map_or(STATUS_SLOTS - 1, |i| i + 1),
        }
    }

    /// The status counted in `slot` (`None` for the out-of-contract slot).
    pub(crate) fn status_of(slot: usize) -> Option<HvStatus> {
        match slot {
            0 => Some(HvStatus::SUCCESS),
            _ => HvError::ALL.get(slot - 1).map(|e| e.status()),
        }
    }

    fn complete(&self, code: HypercallCode, status: HvStatus) {
        self.statuses[Self::slot(code)][Self::status_slot(status)].fetch_add(1, Ordering::Relaxed);
    }
}

enum Slice {
    Done(u16),
    Continue(u16),
}

fn check_block(gpa: u64, size: usize) -> Result<(), HvError> {
    let offset = usize::try_from(gpa & (HV_PAGE_SIZE - 1)).unwrap_or(PAGE);
    if gpa % 8 != 0 || offset + size > PAGE {
        return Err(HvError::INVALID_ALIGNMENT);
    }
    Ok(())
}

impl Iommu {
    /// Runs the hypercall in `regs` from guest kernel code on vCPU
    /// `vp_index` ([`Caller::kernel`]) against guest memory `mem`; see
    /// [`Iommu::dispatch_from`].
    pub fn dispatch<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        vp_index: u32,
        regs: HypercallRegs,
    ) -> HypercallOutcome {
        self.dispatch_from(mem, Caller::kernel(vp_index), regs)
    }

    /// Runs the hypercall in `regs` for `caller` against guest memory `mem`,
    /// on the calling thread, without [`Processors`] (their calls are
    /// INVALID_HYPERCALL_CODE); see [`Iommu::dispatch_for`].
    pub fn dispatch_from<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        caller: Caller,
        regs: HypercallRegs,
    ) -> HypercallOutcome {
        self.dispatch_for(mem, caller, regs, None)
    }

    /// Runs the hypercall in `regs` for `caller` against guest memory `mem`,
    /// on the calling thread, the partition's calls against `processors`.
    /// Never panics, whatever the registers and memory hold; allocates
    /// nothing.
    pub fn dispatch_for<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        caller: Caller,
        regs: HypercallRegs,
        processors: Option<&dyn Processors>,
    ) -> HypercallOutcome {
        let vp_index = caller.vp_index;
        let control = Control::from_bits(regs.rcx);
        self.counters.calls[Counters::slot(control.call_code())].fetch_add(1, Ordering::Relaxed);
        let result = if caller.cpl != 0 {
            Err((HvError::ACCESS_DENIED, 0))
        } else {
            let budget = if caller.restartable {
                self.config.rep_budget
            } else {
                u16::MAX
            };
            let cx = Ctx {
                iommu: self,
                mem,
                vp_index,
                var_words: usize::from(control.variable_header_size()),
                processors,
            };
            let shape = shape(control.call_code());
            let r = self.dispatch_inner(&cx, control, shape, regs, budget);
            // A call that may have taken translations away returns only
            // after the emulated DMA that may still use them has finished.
            if shape.is_some_and(|s| s.dma_barrier) {
                self.dma_barrier();
            }
            r
        };
        match result {
            Ok(Slice::Done(reps)) => {
                self.counters
                    .complete(control.call_code(), HvStatus::SUCCESS);
                HypercallOutcome::Complete {
                    rax: HypercallOutput::from_status(HvStatus::SUCCESS, reps).into_bits(),
                }
            }
            Ok(Slice::Continue(next)) => {
                self.counters.continuations.fetch_add(1, Ordering::Relaxed);
                HypercallOutcome::Continue {
                    rcx: control.with_rep_start(next).into_bits(),
                }
            }
            Err((error, reps)) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.counters.complete(control.call_code(), error.status());
                crate::guest_log!(
                    Debug,
                    "pvIOMMU: vp {vp_index}: {:?} (rcx {:#x}) -> {error} after {reps} reps",
                    control.call_code(),
                    regs.rcx
                );
                HypercallOutcome::Complete {
                    rax: HypercallOutput::from_status(error.status(), reps).into_bits(),
                }
            }
        }
    }

    fn dispatch_inner<M: GuestMemory + ?Sized>(
        &self,
        cx: &Ctx<'_, M>,
        control: Control,
        shape: Option<Shape>,
        regs: HypercallRegs,
        budget: u16,
    ) -> Result<Slice, (HvError, u16)> {
        let input_error = Err((HvError::INVALID_HYPERCALL_INPUT, 0));
        if !control.reserved_clear() {
            return input_error;
        }
        let code = control.call_code();
        let Some(shape) = shape else {
            return Err((HvError::INVALID_HYPERCALL_CODE, 0));
        };
        let var_bytes = usize::from(control.variable_header_size()) * 8;
        if control.nested() || var_bytes > shape.var_header {
            return input_error;
        }
        let (count, start) = (control.rep_count(), control.rep_start());
        if shape.rep {
            if count == 0 || start >= count {
                return input_error;
            }
        } else if count != 0 || start != 0 {
            return input_error;
        }
        let fail = |e: HvError| Err((e, start));
        let end = if shape.rep {
            count.min(start.saturating_add(budget))
        } else {
            0
        };
        // The guest's header (fixed and variable parts), and the whole one
        // the handler reads: the guest's, zero-extended to the type's size.
        let given = shape.header + var_bytes;
        let typed = shape.header + shape.var_header;
        let input_size = given + usize::from(count) * shape.elem;
        let elems_lo = given + usize::from(start) * shape.elem;
        let elems_hi = given + usize::from(end) * shape.elem;

        // Zeroed copies: the header (at most MAX_HEADER bytes) and, for rep
        // calls with elements, this slice's elements (at most one page).
        let mut header = [0u8; MAX_HEADER];
        let mut output = [0u8; MAX_OUTPUT];
        let mem = cx.mem;
        let result = if control.fast() {
            if input_size > FAST_BYTES || shape.output != 0 || shape.out_elem != 0 {
                return fail(HvError::INVALID_HYPERCALL_INPUT);
            }
            header[..8].copy_from_slice(&regs.rdx.to_le_bytes());
            header[8..16].copy_from_slice(&regs.r8.to_le_bytes());
            self.run_call(cx, code, &header[..typed], &[], start, end, &mut output)
        } else {
            if let Err(e) = check_block(regs.rdx, input_size) {
                return fail(e);
            }
            let output_size = shape.output + usize::from(count) * shape.out_elem;
            if output_size != 0 {
                if let Err(e) = check_block(regs.r8, output_size) {
                    return fail(e);
                }
                if !ram::in_ram(mem, regs.r8, u64::try_from(output_size).unwrap_or(0)) {
                    return fail(HvError::INVALID_PARAMETER);
                }
            }
            if !ram::read(mem, regs.rdx, &mut header[..given]) {
                return fail(HvError::INVALID_PARAMETER);
            }
            if elems_hi > elems_lo {
                let mut elems = [0u8; PAGE];
                let elems = &mut elems[..elems_hi - elems_lo];
                // Offsets stay within the page checked above: no overflow.
                let elems_gpa = regs.rdx + u64::try_from(elems_lo).unwrap_or(0);
                if !ram::read(mem, elems_gpa, elems) {
                    return fail(HvError::INVALID_PARAMETER);
                }
                if shape.out_elem != 0 {
                    self.run_with_rep_output(
                        cx,
                        code,
                        shape,
                        &header[..typed],
                        elems,
                        (start, end),
                        regs.r8,
                    )
                } else {
                    self.run_call(cx, code, &header[..typed], elems, start, end, &mut output)
                }
            } else {
                self.run_call(cx, code, &header[..typed], &[], start, end, &mut output)
            }
        };
        match result {
            Err(RepError { done, error }) => {
                let done = u16::try_from(done).unwrap_or(u16::MAX);
                Err((error, start.saturating_add(done).min(count)))
            }
            Ok(()) if shape.output != 0 => {
                if !ram::write(mem, regs.r8, &output[..shape.output]) {
                    return fail(HvError::INVALID_PARAMETER);
                }
                Ok(Slice::Done(0))
            }
            Ok(()) if shape.rep && end < count => Ok(Slice::Continue(end)),
            Ok(()) => Ok(Slice::Done(count)),
        }
    }
}

impl Iommu {
    /// Runs reps `start..end` of a call with per-rep output, in chunks of
    /// [`OUT_CHUNK`] reps through a small buffer, writing each completed
    /// rep's output to its place in the guest's output block (at `out_gpa`,
    /// already checked) as it goes: the output of every completed rep is
    /// there, also when a later rep fails.
    #[allow(clippy::too_many_arguments)]
    fn run_with_rep_output<M: GuestMemory + ?Sized>(
        &self,
        cx: &Ctx<'_, M>,
        code: HypercallCode,
        shape: Shape,
        header: &[u8],
        elems: &[u8],
        (start, end): (u16, u16),
        out_gpa: u64,
    ) -> Result<(), RepError> {
        let mut first = start;
        while first < end {
            let last = end.min(first.saturating_add(OUT_CHUNK));
            let at = |rep: u16, size: usize| usize::from(rep - start) * size;
            let chunk = &elems[at(first, shape.elem)..at(last, shape.elem)];
            let mut out = [0u8; OUT_CHUNK as usize * MAX_OUT_ELEM];
            let result = self.run_call(cx, code, header, chunk, first, last, &mut out);
            let done = match result {
                Ok(()) => usize::from(last - first),
                Err(e) => e.done,
            };
            let bytes = &out[..done * shape.out_elem];
            // Inside the output block checked by the caller: no overflow.
            let gpa = out_gpa + u64::try_from(usize::from(first) * shape.out_elem).unwrap_or(0);
            if !bytes.is_empty() && !ram::write(cx.mem, gpa, bytes) {
                return Err(RepError {
                    done: usize::from(first - start),
                    error: HvError::INVALID_PARAMETER,
                });
            }
            if let Err(e) = result {
                return Err(RepError {
                    done: usize::from(first - start) + e.done,
                    error: e.error,
                });
            }
            first = last;
        }
        Ok(())
    }
}

#[cfg(test)]
mod linux_replay;
#[cfg(test)]
pub(crate) mod tests;

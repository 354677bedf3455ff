//! The vCPU loop's hooks, driven by a hand-assembled PVH guest: the port
//! 0xE4 hypercall (registers and CPL through sync regs, RAX on completion,
//! RCX and a restart at a `nop` before the `out` on continuation, which
//! must re-execute the `out` whether or not this host's KVM advanced RIP
//! before the exit), user-space MSRs and the CPUID hook.

mod common;

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::{
    ExitReason, HypercallAction, HypercallExit, KernelSource, MsrContext, MsrHandler,
    PortIoHypercall, SerialConfig, VmConfig, VmHooks, Vmm,
};

const RESULT_ADDR: u32 = 0x5000;
const MSR: u32 = 0x4000_0000;
/// Guest address of the `nop` before the `out` (the restart point).
const RESTART: u64 = common::ENTRY as u64 + 12;
/// Guest address of the `out`.
const OUT: u64 = RESTART + 1;

/// 32-bit code: a hypercall, then an MSR read and write, CPUID leaf
/// 0x4000_0000, and an ACPI poweroff.
fn guest_code() -> Vec<u8> {
    let mut c = Vec::new();
    let r = RESULT_ADDR.to_le_bytes();
    c.extend([0xb9, 5, 0, 0, 0]); // mov ecx, 5
    c.extend([0xba, 0x77, 0, 0, 0]); // mov edx, 0x77
    c.extend([0x31, 0xc0]); // xor eax, eax
    assert_eq!(c.len() as u64, RESTART - u64::from(common::ENTRY));
    c.push(0x90); // nop
    c.extend([0xe6, 0xe4]); // out 0xe4, al
    c.extend([0xa3, r[0], r[1], r[2], r[3]]); // mov [0x5000], eax
    c.extend([0x89, 0x0d, r[0] + 4, r[1], r[2], r[3]]); // mov [0x5004], ecx
    c.push(0xb9); // mov ecx, MSR
    c.extend(MSR.to_le_bytes());
    c.extend([0x0f, 0x32]); // rdmsr
    c.extend([0xa3, r[0] + 8, r[1], r[2], r[3]]); // mov [0x5008], eax
    c.extend([0x89, 0x15, r[0] + 12, r[1], r[2], r[3]]); // mov [0x500c], edx
    c.extend([0xb8, 0xcd, 0xab, 0, 0]); // mov eax, 0xabcd
    c.extend([0xba, 1, 0, 0, 0]); // mov edx, 1
    c.extend([0x0f, 0x30]); // wrmsr
    c.extend([0xb8, 0, 0, 0, 0x40]); // mov eax, 0x40000000
    c.extend([0x0f, 0xa2]); // cpuid
    c.extend([0x89, 0x1d, r[0] + 16, r[1], r[2], r[3]]); // mov [0x5010], ebx
    c.extend([0x66, 0xba, 0x00, 0x06]); // mov dx, 0x600
    c.extend([0xb0, 0x34]); // mov al, 0x34 (SLP_TYP 5, SLP_EN)
    c.push(0xee); // out dx, al
    c.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    c
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(u32, HypercallExit)>>,
    msr_writes: Mutex<Vec<(u32, u32, u64)>>,
    tsc_reads: Mutex<Vec<bool>>,
}

impl PortIoHypercall for Recorder {
    fn hypercall(&self, _mem: &GuestMemoryMmap, vp: u32, exit: HypercallExit) -> HypercallAction {
        self.calls.lock().expect("lock").push((vp, exit));
        if exit.regs.rcx > 1 {
            HypercallAction::Restart {
                rcx: exit.regs.rcx - 1,
                rip: RESTART,
            }
        } else {
            HypercallAction::Complete { rax: 0x4242 }
        }
    }
}

impl MsrHandler for Recorder {
    fn msr_ranges(&self) -> Vec<std::ops::Range<u32>> {
        let one = MSR..MSR + 1;
        vec![one]
    }
    fn read(&self, ctx: &MsrContext<'_>, msr: u32) -> Option<u64> {
        // The vCPU's TSC is readable from the hook.
        self.tsc_reads
            .lock()
            .expect("lock")
            .push(ctx.guest_tsc().is_some());
        (msr == MSR).then_some(0x1122_3344_5566_7788)
    }
    fn write(&self, ctx: &MsrContext<'_>, msr: u32, value: u64) -> bool {
        self.msr_writes
            .lock()
            .expect("lock")
            .push((ctx.vp_index(), msr, value));
        true
    }
}

#[test]
fn hypercall_msr_and_cpuid_hooks() {
    let path = std::env::temp_dir().join(format!("pvmm-hooks-{}.elf", std::process::id()));
    std::fs::write(&path, common::pvh_elf(&guest_code())).expect("write guest");
    let rec = Arc::new(Recorder::default());
    let hooks = VmHooks {
        hypercall: Some(rec.clone()),
        msr: Some(rec.clone()),
        cpuid: Some(Arc::new(
            |_vp, entries: &mut Vec<kvm_bindings::kvm_cpuid_entry2>| {
                for e in entries.iter_mut().filter(|e| e.function == 0x4000_0000) {
                    e.ebx = u32::from_le_bytes(*b"pvmm");
                }
            },
        )),
    };
    let config = VmConfig {
        kernel: KernelSource::Path(path.clone()),
        memory: 16 << 20,
        serial: SerialConfig::Off,
        ..Default::default()
    };
    let vmm = Vmm::new(config, hooks).expect("VM");
    let mem = vmm.memory().clone();
    assert_eq!(vmm.run().expect("run"), ExitReason::PowerOff);
    std::fs::remove_file(&path).ok();

    // The `out` ran five times: RCX 5, 4, 3, 2, 1, with RDX intact, from
    // ring 0, RIP at the `out` or (on a KVM that advanced it) just past it,
    // the same on every call.
    let calls = rec.calls.lock().expect("lock").clone();
    let rcx: Vec<u64> = calls.iter().map(|c| c.1.regs.rcx).collect();
    assert_eq!(rcx, vec![5, 4, 3, 2, 1]);
    assert!(calls
        .iter()
        .all(|c| c.0 == 0 && c.1.regs.rdx == 0x77 && c.1.cpl == 0));
    let rip = calls[0].1.rip;
    assert!(rip == OUT || rip == OUT + 2, "RIP at the exit: {rip:#x}");
    assert!(calls.iter().all(|c| c.1.rip == rip));
    let word = |off: u64| -> u32 {
        mem.read_obj(GuestAddress(u64::from(RESULT_ADDR) + off))
            .expect("read")
    };
    assert_eq!(word(0), 0x4242, "RAX after completion");
    assert_eq!(word(4), 1, "RCX as the last continuation left it");
    assert_eq!((word(8), word(12)), (0x5566_7788, 0x1122_3344), "RDMSR");
    assert_eq!(
        rec.msr_writes.lock().expect("lock").clone(),
        vec![(0, MSR, 0x1_0000_abcd)]
    );
    assert_eq!(rec.tsc_reads.lock().expect("lock").clone(), vec![true]);
    assert_eq!(word(16), u32::from_le_bytes(*b"pvmm"), "CPUID hook");
}

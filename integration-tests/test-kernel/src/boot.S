/*
 * Test kernel entry points (AT&T syntax, assembled by rustc's global_asm!).
 *
 * - pvh_start: PVH entry (XEN_ELFNOTE_PHYS32_ENTRY), 32-bit protected mode,
 *   paging off, EBX = physical address of hvm_start_info.
 * - _start (ELF entry): Linux 64-bit boot protocol, long mode with the
 *   loader's identity map, RSI = boot_params (zero page).
 * - ap_tramp_start..ap_tramp_end: the application processor trampoline,
 *   copied to a page below 1 MiB and started by INIT-SIPI-SIPI; it goes from
 *   real mode straight to long mode (CR0.PE and CR0.PG in one write).
 *
 * - enter_user, kcall, isr6: the way into ring 3 and back (ring.rs).
 *
 * Ring 0 is emulated instruction by instruction on the development machines,
 * so this code does the least it can: the page tables are built at link time,
 * and the kernel does its computing in ring 3 (ring.rs).
 */

    .set KERNEL_CS, 0x08
    .set KERNEL_DS, 0x10
    .set USER_DS, 0x18 + 3
    .set USER_CS, 0x20 + 3
    .set USER_RFLAGS, 0x2               /* interrupts off in ring 3 */
    .set BOOT_PVH, 1
    .set BOOT_LINUX64, 2

/* ---------------------------------------------------------------- PVH note */
    .section .note.Xen, "a"
    .balign 4
    .long 4                 /* n_namesz: "Xen\0" */
    .long 8                 /* n_descsz */
    .long 18                /* n_type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start         /* 8 bytes, as Linux writes it; readers take 32 bits or 64 */
    .balign 4

/* ------------------------------------------------------------- boot code */
    .section .text.boot, "ax"

    .code64
    .globl _start
_start:
    cli
    cld
    mov %rsi, %r12                      /* boot_params */
    mov $BOOT_LINUX64, %r13d
    lea boot_stack_top(%rip), %rsp
    lgdt boot_gdtr(%rip)
    pushq $KERNEL_CS
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:
    mov %cr4, %rax
    and $~0x300000, %rax                /* no SMEP/SMAP: ring 0 uses user pages */
    mov %rax, %cr4
    mov $boot_pml4, %eax
    mov %rax, %cr3                      /* our own 0-4 GiB identity map */
    jmp common_long

    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    mov %ebx, %esi                      /* hvm_start_info */
    lgdt boot_gdtr
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                      /* CR4.PAE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx               /* EFER */
    rdmsr
    or $0x100, %eax                     /* EFER.LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax                /* CR0.PG | CR0.PE */
    mov %eax, %cr0
    ljmp $KERNEL_CS, $pvh_long

    .code64
pvh_long:
    mov %esi, %r12d
    mov $BOOT_PVH, %r13d
    mov $boot_stack_top, %esp

common_long:
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    /* Zero .bss (small: stacks and page-table pool live in .noinit). */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $3, %ecx
    xor %eax, %eax
    rep stosq
    mov %r12, %rdi
    mov %r13, %rsi
    call kernel_start
2:  cli
    hlt
    jmp 2b

/* -------------------------------------------------- AP trampoline (copied) */
    .code16
    .globl ap_tramp_start
ap_tramp_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_tramp_gdtr - ap_tramp_start)
    movl $0x20, %eax                    /* CR4.PAE */
    mov %eax, %cr4
    movl (ap_tramp_cr3 - ap_tramp_start), %eax
    mov %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax                    /* EFER.LME */
    wrmsr
    movl $0x80000001, %eax              /* CR0.PG | CR0.PE: real -> long mode */
    mov %eax, %cr0
    ljmpl *(ap_tramp_farptr - ap_tramp_start)
    .balign 8
ap_tramp_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    .word 0
ap_tramp_cr3:
    .long boot_pml4
ap_tramp_farptr:
    .long ap_long
    .word KERNEL_CS
    .globl ap_tramp_end
ap_tramp_end:

    .code64
ap_long:
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov AP_STACK_TOP(%rip), %rsp
    mov AP_CPU_INDEX(%rip), %rdi
    call ap_main
3:  cli
    hlt
    jmp 3b

/* ---------------------------------------------------- exception stubs */
    .macro ISR_NOERR n
isr\n:
    pushq $0
    pushq $\n
    jmp isr_common
    .endm
    .macro ISR_ERR n
isr\n:
    pushq $\n
    jmp isr_common
    .endm

    ISR_NOERR 0
    ISR_NOERR 1
    ISR_NOERR 2
    ISR_NOERR 3
    ISR_NOERR 4
    ISR_NOERR 5
    /* 6 (#UD) is isr6 below: a ud2 at kcall_trap is a call into ring 0. */
    ISR_NOERR 7
    ISR_ERR 8
    ISR_NOERR 9
    ISR_ERR 10
    ISR_ERR 11
    ISR_ERR 12
    ISR_ERR 13
    ISR_ERR 14
    ISR_NOERR 15
    ISR_NOERR 16
    ISR_ERR 17
    ISR_NOERR 18
    ISR_NOERR 19
    ISR_NOERR 20
    ISR_ERR 21
    ISR_NOERR 22
    ISR_NOERR 23
    ISR_NOERR 24
    ISR_NOERR 25
    ISR_NOERR 26
    ISR_NOERR 27
    ISR_NOERR 28
    ISR_ERR 29
    ISR_ERR 30
    ISR_NOERR 31

/* #UD. From ring 3 at kcall_trap it is a kernel call: RDI = function,
 * RSI = its argument; run it on the ring-0 stack and return past the ud2.
 * The CPU left RSP at 8 mod 16 (a 40-byte frame from a 16-aligned stack). */
isr6:
    cmpq $kcall_trap, (%rsp)
    jne 1f
    testb $3, 8(%rsp)
    jz 1f
    addq $2, (%rsp)
    sub $8, %rsp
    mov %rdi, %rax
    mov %rsi, %rdi
    call *%rax
    add $8, %rsp
    iretq
1:  pushq $0
    pushq $6
    jmp isr_common

isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call exception_handler
4:  cli
    hlt
    jmp 4b

/* Interrupt stubs: save the caller-saved registers around a Rust handler
 * (which sends the EOI). Alignment: the CPU aligns RSP to 16 and pushes 40
 * bytes; 9 pushes more make 112, a multiple of 16. */
    .macro ISR_CALL name, handler
    .globl \name
\name:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    call \handler
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq
    .endm

    ISR_CALL isr_ipi, ipi_handler      /* 0xf0: the wake-up IPI */
    ISR_CALL isr_line, line_handler    /* 0xf1: IOAPIC lines (suite irq) */

    .section .rodata.isr_table, "a"
    .balign 8
    .globl ISR_TABLE
ISR_TABLE:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr\n
    .endr
    .globl ISR_IPI
ISR_IPI:
    .quad isr_ipi
    .globl ISR_LINE
ISR_LINE:
    .quad isr_line

/* ------------------------------------------------------------- ring 3 */
    .section .text
/* enter_user(entry, arg0, arg1): runs entry(arg0, arg1) in ring 3 on the
 * user stack, interrupts off; never returns. Ring 3 comes back to ring 0
 * through kcall (and exceptions) on the TSS's RSP0, the boot stack. */
    .globl enter_user
enter_user:
    pushq $USER_DS
    pushq $user_stack_top - 8           /* as if called */
    pushq $USER_RFLAGS
    pushq $USER_CS
    pushq %rdi
    mov %rsi, %rdi
    mov %rdx, %rsi
    iretq

/* kcall(function, arg) from ring 3: the ud2 is isr6's cue. */
    .globl kcall
kcall:
kcall_trap:
    ud2
    ret

/* ------------------------------------------------------------- GDT */
    .section .data.gdt, "aw"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF            /* 0x08: 64-bit code, DPL 0 */
    .quad 0x00CF92000000FFFF            /* 0x10: data, DPL 0 */
    .quad 0x00CFF2000000FFFF            /* 0x18: data, DPL 3 */
    .quad 0x00AFFA000000FFFF            /* 0x20: 64-bit code, DPL 3 */
    .globl GDT_TSS
GDT_TSS:
    .quad 0, 0                          /* 0x28: the TSS (ring::init) */
boot_gdt_end:
    .balign 8
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

/* The 64-bit TSS: only RSP0, the stack ring 3 enters ring 0 on. */
    .balign 16
    .globl TSS
TSS:
    .long 0
    .quad boot_stack_top                /* RSP0 */
    .fill 88, 1, 0
    .word 104                           /* no I/O permission bitmap */
    .globl TSS_END
TSS_END:

/* --------------------------------------------------- page tables */
/* 0-4 GiB identity mapped with 2 MiB pages, built by the assembler. Every
 * entry is user-accessible: the kernel computes in ring 3 (ring.rs). */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
    .globl boot_pdpt
boot_pdpt:
    .quad boot_pd + 0x0000 + 0x7
    .quad boot_pd + 0x1000 + 0x7
    .quad boot_pd + 0x2000 + 0x7
    .quad boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0
boot_pd:
    .set tk_pd_addr, 0
    .rept 2048
    .quad tk_pd_addr + 0x87             /* present, writable, user, 2 MiB */
    .set tk_pd_addr, tk_pd_addr + 0x200000
    .endr

/* ---------------------------------------------------- stacks, pool */
    .section .noinit, "aw", @nobits
    .balign 4096
boot_stack:
    .skip 65536
    .globl boot_stack_top
boot_stack_top:
user_stack:
    .skip 65536
user_stack_top:
    .globl AP_STACKS
AP_STACKS:
    .skip 16384 * 64                    /* MAX_CPUS stacks of 16 KiB */
    .globl AP_STACKS_END
AP_STACKS_END:
    .globl PT_POOL
PT_POOL:
    .skip 4096 * 32                     /* page tables for RAM above 4 GiB */
    .globl PT_POOL_END
PT_POOL_END:

/* ------------------------------------------------------ pvIOMMU pages */
    .section .noinit.hv, "aw", @nobits
    .balign 4096
    .globl HV_CALL_GUARD
HV_CALL_GUARD:
    .skip 4096                          /* ud2s at its end: a restart that lands
                                           before the stub faults (pviommu.rs) */
    .globl HV_CALL_PAGE
HV_CALL_PAGE:
    .skip 4096                          /* the hypercall page (VMM overlay) */
    .globl HV_IO_PAGES
HV_IO_PAGES:
    .skip 4096 * 2 * 4                  /* input + output page per CPU, 4 CPUs */
    .globl HV_TSC_PAGE
HV_TSC_PAGE:
    .skip 4096                          /* the reference TSC page (VMM overlay) */
    .globl HV_SYNIC_PAGES
HV_SYNIC_PAGES:
    .skip 4096 * 2                      /* SynIC message and event-flag pages */

/* SPDX-License-Identifier: MIT */
/*
 * The access-probe image's assembly: the multiboot header and 32-bit entry
 * into long mode, the exception entry points, and the probe itself - one
 * access at CPL0, or at CPL3 through the user stub - which returns to its C
 * caller through pw_resume whether the access completed or faulted.
 */
#include "../probe_abi.h"

#define MB_MAGIC	0x1badb002
#define MB_FLAGS	0x00010000	/* the load addresses are in the header */

#define CR0_PE		(1 << 0)
#define CR0_ET		(1 << 4)
#define CR0_PG		(1 << 31)
#define CR4_PAE		(1 << 5)
#define CR4_LA57	(1 << 12)
#define MSR_EFER	0xc0000080
#define EFER_LME	(1 << 8)
#define EFER_NXE	(1 << 11)
#define RFLAGS_AC	(1 << 18)


	.section .multiboot, "a"
	.balign 4
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
	.long mb_header			/* header_addr */
	.long PW_IMAGE_BASE		/* load_addr */
	.long pw_load_end		/* load_end_addr */
	.long pw_bss_end		/* bss_end_addr */
	.long pw_entry32		/* entry_addr */

	.section .boot, "ax"
	.code32
	.globl pw_entry32
pw_entry32:
	cli
	cld
	lgdt pw_gdt_ptr
	mov $PW_SEL_KERNEL_DS, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov $pw_stack_top, %esp

	mov $PW_CASES_BASE, %ebp		/* CPUID clobbers EBX */
	mov $PW_EXIT_BAD_HEADER, %eax
	cmpl $(PW_MAGIC & 0xffffffff), (%ebp)
	jne fail32
	cmpl $(PW_MAGIC >> 32), 4(%ebp)
	jne fail32

	/* Long mode (and NX, when present: the cases set EFER.NXE themselves). */
	mov $0x80000001, %eax
	cpuid
	mov $PW_EXIT_NO_LONG_MODE, %eax
	bt $29, %edx
	jnc fail32
	mov %edx, %esi			/* bit 20: NX */

	mov $CR4_PAE, %edi
	cmpl $0, PW_HDR_LA57(%ebp)
	je 1f
	mov $7, %eax
	xor %ecx, %ecx
	cpuid
	mov $PW_EXIT_NO_LA57, %eax
	bt $16, %ecx
	jnc fail32
	or $CR4_LA57, %edi
1:	mov %edi, %cr4
	mov PW_HDR_ROOT0(%ebp), %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	bt $20, %esi
	jnc 2f
	or $EFER_NXE, %eax
2:	wrmsr
	mov $(CR0_PG | CR0_ET | CR0_PE), %eax
	mov %eax, %cr0
	ljmp $PW_SEL_KERNEL_CS, $entry64

fail32:
	mov %eax, PW_HDR_STATUS(%ebp)
	mov $PW_EXIT_PORT, %dx
	outl %eax, %dx
	hlt
	jmp fail32

	.code64
entry64:
	mov $PW_SEL_KERNEL_DS, %eax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov $pw_stack_top, %rsp
	call pw_main
	/* pw_main ends with the exit port; a VMM that resumes gets a halt. */
3:	hlt
	jmp 3b

	.text
/*
 * Exception entry points: vector and error code (0 where the processor
 * pushes none) are recorded with RIP and CR2, and the probe ends.
 */
.macro vector n, has_error
	.balign 16
	.if \has_error == 0
	pushq $0
	.endif
	pushq $\n
	jmp exception_common
.endm

	.balign 16
	.globl pw_vectors
pw_vectors:
	vector 0, 0
	vector 1, 0
	vector 2, 0
	vector 3, 0
	vector 4, 0
	vector 5, 0
	vector 6, 0
	vector 7, 0
	vector 8, 1
	vector 9, 0
	vector 10, 1
	vector 11, 1
	vector 12, 1
	vector 13, 1
	vector 14, 1
	vector 15, 0
	vector 16, 0
	vector 17, 1
	vector 18, 0
	vector 19, 0
	vector 20, 0
	vector 21, 1
	vector 22, 0
	vector 23, 0
	vector 24, 0
	vector 25, 0
	vector 26, 0
	vector 27, 0
	vector 28, 0
	vector 29, 1
	vector 30, 1
	vector 31, 0

exception_common:
	cmpq $0, pw_resume_rsp(%rip)
	je unexpected
	/* #GP from the user stub's HLT: its access completed. */
	cmpq $13, (%rsp)
	jne 1f
	lea pw_user_hlt(%rip), %rax
	cmp %rax, 16(%rsp)
	je pw_user_done
1:	mov (%rsp), %rax
	mov %eax, pw_last_vector(%rip)
	mov 8(%rsp), %rax
	mov %eax, pw_last_error(%rip)
	mov 16(%rsp), %rax
	mov %rax, pw_last_rip(%rip)
	mov %cr2, %rax
	mov %rax, pw_last_cr2(%rip)
	jmp pw_resume

/* An exception outside a probe: a bug of the image; report and stop. */
unexpected:
	mov (%rsp), %rax
	movl %eax, PW_CASES_BASE + PW_HDR_VECTOR
	movl $PW_EXIT_UNEXPECTED, PW_CASES_BASE + PW_HDR_STATUS
	mov $PW_EXIT_UNEXPECTED, %eax
	mov $PW_EXIT_PORT, %dx
	outl %eax, %dx
1:	hlt
	jmp 1b

/*
 * The #GP of HLT from the user stub: its access completed. (HLT at CPL3
 * raises #GP on every KVM; an INT n gate would not do: kvm_pvm fails INT n
 * from CPL3 with #UD.)
 */
pw_user_done:
	movl $PW_NO_FAULT, pw_last_vector(%rip)
	jmp pw_resume

/*
 * The access itself, at la (%rdi), of kind %esi (PW_ACC_*); the implicit
 * ones load DS with selector sel, an LDT descriptor in the probed page.
 */
.macro access sel
	cmp $PW_ACC_READ, %esi
	je 1f
	cmp $PW_ACC_WRITE, %esi
	je 2f
	cmp $PW_ACC_FETCH, %esi
	je 3f
	mov $\sel, %eax
	mov %ax, %ds
	jmp 4f
1:	movb (%rdi), %al
	jmp 4f
2:	movb $0xc3, (%rdi)
	jmp 4f
3:	call *%rdi
4:
.endm

/*
 * unsigned int pw_probe(u64 la, unsigned int access, unsigned int cpl3,
 *                       u64 rflags)
 *
 * Performs the access in the current paging state, at CPL0 with the given
 * RFLAGS or at CPL3 through the user stub, and returns pw_last_vector:
 * PW_NO_FAULT when it completed.
 */
	.globl pw_probe
pw_probe:
	push %rbx
	push %rbp
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, pw_resume_rsp(%rip)
	movl $0xfe, pw_last_vector(%rip)
	test %edx, %edx
	jnz to_user

	push %rcx
	popfq
	access PW_SEL_PROBE
	movl $PW_NO_FAULT, pw_last_vector(%rip)
	jmp pw_resume

to_user:
	pushq $(PW_SEL_USER_DS | 3)
	pushq $(PW_USER_STACK + 4096)
	push %rcx
	pushq $(PW_SEL_USER_CS | 3)
	pushq $pw_user_stub
	iretq

/* Back in pw_probe's frame, at CPL0, with clean flags and data segments. */
	.globl pw_resume
pw_resume:
	mov pw_resume_rsp(%rip), %rsp
	movq $0, pw_resume_rsp(%rip)	/* no probe in flight */
	mov $PW_SEL_KERNEL_DS, %eax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	pushq $2
	popfq
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %rbp
	pop %rbx
	mov pw_last_vector(%rip), %eax
	ret

/* The CPL3 side: the same accesses, then HLT (#GP) back to pw_resume. */
	.section .user_text, "ax"
pw_user_stub:
	access (PW_SEL_PROBE | 3)
pw_user_hlt:
	hlt
5:	jmp 5b

	.data
	.balign 16
	.globl pw_gdt
pw_gdt:
	.quad 0
	.quad 0x00af9a000000ffff	/* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff	/* 0x10 kernel data */
	.quad 0x00cff2000000ffff	/* 0x18 user data */
	.quad 0x00affa000000ffff	/* 0x20 user code, 64-bit */
	.quad 0, 0			/* 0x28 TSS, filled by pw_main */
	.quad 0, 0			/* 0x38 LDT, filled per case */
pw_gdt_end:
	.balign 8
	.word 0
pw_gdt_ptr:
	.word pw_gdt_end - pw_gdt - 1
	.quad pw_gdt

	.bss
	.balign 8
	.globl pw_last_vector, pw_last_error, pw_last_rip, pw_last_cr2
pw_last_vector:	.long 0
pw_last_error:	.long 0
pw_last_rip:	.quad 0
pw_last_cr2:	.quad 0
pw_resume_rsp:	.quad 0
	.balign 4096
	.space 16384
pw_stack_top:

	.section .note.GNU-stack, "", @progbits

/* SPDX-License-Identifier: MIT */
/*
 * Guest-side entry code: exception stubs for all 256 vectors, the common
 * exception path, guest_catch() and the return trampoline of entry functions.
 * Runs inside the guest at the host address it is linked at.
 */

#define PERCPU_RECOVER_RIP 8
#define PERCPU_RECOVER_RSP 16

	.text

/*
 * One 16-byte-aligned stub per vector. Vectors with a CPU-pushed error code
 * (8, 10-14, 17, 21, 29, 30) push only the vector; the others push a zero
 * error code first, so every frame has the same layout.
 */
	.align 16
	.globl virtkit_guest_vectors
virtkit_guest_vectors:
	vector = 0
	.rept 256
	.align 16
	.if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
	.else
	pushq $0
	.endif
	pushq $vector
	jmp virtkit_guest_exception_common
	vector = vector + 1
	.endr

virtkit_guest_exception_common:
	push %r15
	push %r14
	push %r13
	push %r12
	push %r11
	push %r10
	push %r9
	push %r8
	push %rdi
	push %rsi
	push %rbp
	push %rbx
	push %rdx
	push %rcx
	push %rax
	mov %rsp, %rdi
	/* Align the stack for the C handler; keep the frame pointer in rbx. */
	mov %rsp, %rbx
	and $~15, %rsp
	cld
	call virtkit_guest_route_exception@PLT
	mov %rbx, %rsp
	pop %rax
	pop %rcx
	pop %rdx
	pop %rbx
	pop %rbp
	pop %rsi
	pop %rdi
	pop %r8
	pop %r9
	pop %r10
	pop %r11
	pop %r12
	pop %r13
	pop %r14
	pop %r15
	add $16, %rsp		/* vector, error code */
	iretq

/*
 * uint64_t guest_catch(void (*fn)(void *), void *arg, struct virtkit_exception *ex)
 *
 * The exception path stores the exception in *ex, sets the frame's rax to
 * vector + 1 and rip/rsp to the recovery point below.
 */
	.globl guest_catch
guest_catch:
	push %rbp
	push %rbx
	push %r12
	push %r13
	push %r14
	push %r15
	sub $8, %rsp		/* 16-byte alignment for the call */
	mov %rdx, %gs:24	/* catch_info */
	mov %rsp, %gs:PERCPU_RECOVER_RSP
	lea 1f(%rip), %rax
	mov %rax, %gs:PERCPU_RECOVER_RIP
	mov %rdi, %rax
	mov %rsi, %rdi
	call *%rax
	xor %eax, %eax
1:
	movq $0, %gs:PERCPU_RECOVER_RIP
	add $8, %rsp
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %rbx
	pop %rbp
	ret

/*
 * void guest_enter_user(uint64_t rip, uint64_t rsp, uint64_t rdi, uint64_t rsi)
 *
 * IRET to CPL 3 loads the null selector into a segment register holding a
 * DPL 0 data selector, and Intel processors clear GS.base with it: the
 * per-CPU page the exception path reads at %gs:0. So GS gets the null
 * selector here, its base back through IA32_GS_BASE, and IRET leaves it be.
 */
	.globl guest_enter_user
guest_enter_user:
	mov %gs:0, %r8		/* this vCPU's per-CPU page */
	mov %rdx, %r9
	mov %rcx, %r10
	xor %eax, %eax
	mov %eax, %gs
	mov $0xc0000101, %ecx	/* IA32_GS_BASE */
	mov %r8, %rax
	mov %r8, %rdx
	shr $32, %rdx
	wrmsr
	pushq $0x1b		/* SS: VIRTKIT_SEL_USER_DS */
	pushq %rsi		/* RSP */
	pushq $0x2		/* RFLAGS: IF clear */
	pushq $0x23		/* CS: VIRTKIT_SEL_USER_CS */
	pushq %rdi		/* RIP */
	mov %r9, %rdi
	mov %r10, %rsi
	iretq

/* Entry functions "return" here: report DONE. */
	.globl virtkit_guest_return
virtkit_guest_return:
	and $~15, %rsp
	call virtkit_guest_done@PLT
	ud2

	.section .note.GNU-stack, "", @progbits

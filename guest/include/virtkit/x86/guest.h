/* SPDX-License-Identifier: MIT */
/*
 * Guest-side API of the virtkit x86-64 guest environment.
 *
 * Guest code is ordinary functions of the test (or VMM) binary; GuestVm loads
 * the binary's pages into the guest at their host addresses and runs them in
 * 64-bit mode at CPL0. Guest code must not call libc or anything that makes
 * system calls; it talks to the host only through these calls, which use
 * port I/O ("ucalls", as in the kernel's KVM selftests):
 *
 *   GUEST_SYNC(a, b)           host's GuestVm::run() returns Ucall{sync, {a, b}}
 *   GUEST_ASSERT(cond)         on failure: file, line and the condition
 *   GUEST_ASSERT_EQ(a, b)      on failure: both values
 *   GUEST_ASSERT_MSG(cond, fmt, ...) / GUEST_FAIL(fmt, ...)
 *   GUEST_PRINTF(fmt, ...)     printed by the host, guest continues
 *   GUEST_DONE()               the guest is finished (also when the entry
 *                              function returns)
 *
 * Exceptions: guest_catch() runs a function and reports the first exception
 * it raises (vector, error code, CR2, RIP) instead of letting it reach a
 * handler; GuestVm::install_exception_handler() installs a guest function
 * for a vector. Unhandled exceptions are reported to the host, which fails
 * the run with the vector, error code, RIP and CR2.
 */
#ifndef VIRTKIT_X86_GUEST_H
#define VIRTKIT_X86_GUEST_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* I/O port of the ucall channel. */
#define VIRTKIT_UCALL_PORT 0x1000

enum virtkit_ucall_cmd {
	VIRTKIT_UCALL_NONE = 0,
	VIRTKIT_UCALL_SYNC = 1,
	VIRTKIT_UCALL_ASSERT = 2,
	VIRTKIT_UCALL_DONE = 3,
	VIRTKIT_UCALL_UNHANDLED = 4, /* args: vector, error code, rip, cr2 */
	VIRTKIT_UCALL_PRINT = 5,
};

#define VIRTKIT_UCALL_MAX_ARGS 6

/* The message a ucall leaves in the vCPU's per-CPU page. */
struct virtkit_ucall {
	uint64_t cmd;
	uint64_t nargs;
	uint64_t args[VIRTKIT_UCALL_MAX_ARGS];
	uint64_t line;
	char file[112];
	char message[256];
};

/* Exception vectors. */
#define DE_VECTOR 0
#define DB_VECTOR 1
#define BP_VECTOR 3
#define UD_VECTOR 6
#define NM_VECTOR 7
#define DF_VECTOR 8
#define GP_VECTOR 13
#define PF_VECTOR 14
#define AC_VECTOR 17

/* #PF error code bits. */
#define PFERR_PRESENT (1u << 0)
#define PFERR_WRITE (1u << 1)
#define PFERR_USER (1u << 2)
#define PFERR_RSVD (1u << 3)
#define PFERR_FETCH (1u << 4)
#define PFERR_PK (1u << 5)

/* What the exception entry code saved; handlers may change it. */
struct virtkit_ex_frame {
	uint64_t rax, rcx, rdx, rbx, rbp, rsi, rdi;
	uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
	uint64_t vector;
	uint64_t error_code;
	uint64_t rip, cs, rflags, rsp, ss;
};

typedef void (*virtkit_ex_handler)(struct virtkit_ex_frame *frame);

struct virtkit_exception {
	uint64_t vector;
	uint64_t error_code;
	uint64_t cr2;
	uint64_t rip;
};

/* Per-vCPU data, at %gs:0. Offsets are used by the entry assembly. */
struct virtkit_percpu {
	uint64_t self;
	uint64_t recover_rip;	/* guest_catch() in progress when non-zero */
	uint64_t recover_rsp;
	uint64_t catch_info;	/* struct virtkit_exception * */
	uint64_t vcpu_id;
	uint64_t reserved[3];
	struct virtkit_ucall ucall;
};

void virtkit_guest_ucall(uint64_t cmd, uint64_t nargs, ...);
void virtkit_guest_assert_fail(const char *file, int line, const char *fmt, ...)
	__attribute__((format(printf, 3, 4), noreturn));
void virtkit_guest_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void virtkit_guest_done(void) __attribute__((noreturn));
/* Freestanding snprintf: %d %i %u %x %X %p %s %c %%, with l/ll/z and width/0 flags. */
int virtkit_guest_snprintf(char *buf, uint64_t size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* GDT selectors of the guest environment (user ones with RPL 3). */
#define VIRTKIT_SEL_KERNEL_CS 0x08
#define VIRTKIT_SEL_KERNEL_DS 0x10
#define VIRTKIT_SEL_USER_DS 0x1b
#define VIRTKIT_SEL_USER_CS 0x23

/*
 * Continue at CPL 3 (64-bit user code) at rip on stack rsp, with rdi and
 * rsi as given and RFLAGS.IF clear. Code, stack and data the user code
 * touches must be on user pages (PageFlags::user). The way back is an
 * exception: call this from a function run by guest_catch() and end the
 * user code with INT3 (its gate has DPL 3), which makes guest_catch()
 * return BP_VECTOR + 1 at CPL 0; any other exception returns the same way.
 */
void guest_enter_user(uint64_t rip, uint64_t rsp, uint64_t rdi, uint64_t rsi)
	__attribute__((noreturn));

/*
 * Run fn(arg). Returns 0 if it returned normally; otherwise the first
 * exception it raised is stored in *ex (may be NULL) and the call returns
 * the vector + 1, with fn abandoned at the faulting instruction. Not nestable.
 */
uint64_t guest_catch(void (*fn)(void *), void *arg, struct virtkit_exception *ex);

/* This vCPU's per-CPU page and id. */
static inline struct virtkit_percpu *guest_percpu(void)
{
	struct virtkit_percpu *p;
	__asm__ volatile("mov %%gs:0, %0" : "=r"(p));
	return p;
}

static inline uint32_t guest_vcpu_id(void)
{
	return (uint32_t)guest_percpu()->vcpu_id;
}

#define VIRTKIT_NARGS_(...) VIRTKIT_NARGS__(0 __VA_OPT__(,) __VA_ARGS__, 6, 5, 4, 3, 2, 1, 0)
#define VIRTKIT_NARGS__(_0, _1, _2, _3, _4, _5, _6, n, ...) n

/* Each argument converted to uint64_t, with a leading comma. */
#define VIRTKIT_C0()
#define VIRTKIT_C1(a) , (uint64_t)(a)
#define VIRTKIT_C2(a, ...) , (uint64_t)(a) VIRTKIT_C1(__VA_ARGS__)
#define VIRTKIT_C3(a, ...) , (uint64_t)(a) VIRTKIT_C2(__VA_ARGS__)
#define VIRTKIT_C4(a, ...) , (uint64_t)(a) VIRTKIT_C3(__VA_ARGS__)
#define VIRTKIT_C5(a, ...) , (uint64_t)(a) VIRTKIT_C4(__VA_ARGS__)
#define VIRTKIT_C6(a, ...) , (uint64_t)(a) VIRTKIT_C5(__VA_ARGS__)
#define VIRTKIT_CAT_(a, b) a##b
#define VIRTKIT_CAT(a, b) VIRTKIT_CAT_(a, b)
#define VIRTKIT_CASTS(...) VIRTKIT_CAT(VIRTKIT_C, VIRTKIT_NARGS_(__VA_ARGS__))(__VA_ARGS__)

/* Up to VIRTKIT_UCALL_MAX_ARGS integer arguments. */
#define GUEST_SYNC(...)                                                        \
	virtkit_guest_ucall(VIRTKIT_UCALL_SYNC,                                \
			    (uint64_t)VIRTKIT_NARGS_(__VA_ARGS__)              \
				    VIRTKIT_CASTS(__VA_ARGS__))
#define GUEST_DONE() virtkit_guest_done()
#define GUEST_PRINTF(...) virtkit_guest_printf(__VA_ARGS__)
#define GUEST_FAIL(...) virtkit_guest_assert_fail(__FILE__, __LINE__, __VA_ARGS__)
#define GUEST_ASSERT_MSG(cond, ...)                                            \
	do {                                                                   \
		if (!(cond))                                                   \
			virtkit_guest_assert_fail(__FILE__, __LINE__,          \
						  __VA_ARGS__);                \
	} while (0)
#define GUEST_ASSERT(cond) GUEST_ASSERT_MSG(cond, "%s", #cond)
#define GUEST_ASSERT_EQ(a, b)                                                  \
	do {                                                                   \
		uint64_t va_ = (uint64_t)(a), vb_ = (uint64_t)(b);             \
		if (va_ != vb_)                                                \
			virtkit_guest_assert_fail(                             \
				__FILE__, __LINE__,                            \
				"%s == %s: 0x%llx != 0x%llx", #a, #b,          \
				(unsigned long long)va_,                       \
				(unsigned long long)vb_);                      \
	} while (0)

/* Small helpers for guest code. */
static inline uint64_t guest_read_cr2(void)
{
	uint64_t v;
	__asm__ volatile("mov %%cr2, %0" : "=r"(v));
	return v;
}
static inline uint64_t guest_read_cr0(void)
{
	uint64_t v;
	__asm__ volatile("mov %%cr0, %0" : "=r"(v));
	return v;
}
static inline void guest_write_cr0(uint64_t v)
{
	__asm__ volatile("mov %0, %%cr0" ::"r"(v) : "memory");
}
static inline uint64_t guest_read_cr3(void)
{
	uint64_t v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}
static inline uint64_t guest_read_cr4(void)
{
	uint64_t v;
	__asm__ volatile("mov %%cr4, %0" : "=r"(v));
	return v;
}
static inline void guest_write_cr4(uint64_t v)
{
	__asm__ volatile("mov %0, %%cr4" ::"r"(v) : "memory");
}
static inline uint64_t guest_rdmsr(uint32_t msr)
{
	uint32_t lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return lo | ((uint64_t)hi << 32);
}
static inline void guest_wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr" ::"c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))
			 : "memory");
}
static inline void guest_outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port));
}
static inline void guest_outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port));
}
static inline uint8_t guest_inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline uint32_t guest_inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline void guest_invlpg(uint64_t gva)
{
	__asm__ volatile("invlpg (%0)" ::"r"(gva) : "memory");
}
static inline void guest_pause(void)
{
	__asm__ volatile("pause" ::: "memory");
}
static inline void guest_halt(void)
{
	__asm__ volatile("hlt" ::: "memory");
}

#ifdef __cplusplus
}
#endif

#endif /* VIRTKIT_X86_GUEST_H */

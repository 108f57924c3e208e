// SPDX-License-Identifier: MIT
/*
 * Guest code of `virtkit demo`.
 *
 * Everything in this file runs inside the guest, at CPL0 in 64-bit mode,
 * from the pages of this executable that GuestVm loaded at their host
 * addresses. So: no libc (it is a shared library, not loaded into the
 * guest), no x87/SSE (some hosts cannot run guest FPU instructions), and no
 * compiler-generated memcpy/memset calls - the Makefile compiles this file
 * with -ffreestanding -fno-builtin -fno-tree-loop-distribute-patterns
 * -mgeneral-regs-only. The helpers at the end also run on the host, to check
 * the guest's answers with the very same code.
 */
#include "demo_guest.hpp"

#include <virtkit/x86/guest.h>

namespace virtkit::tool::demo {

static constexpr std::uint32_t msr_efer = 0xc0000080;

const char guest_message[] = "hello, host: this text was written by the guest";

static inline std::uint64_t current_rip(void)
{
	std::uint64_t rip;
	__asm__ volatile("lea 0(%%rip), %0" : "=r"(rip));
	return rip;
}

static inline std::uint16_t current_cs(void)
{
	std::uint16_t cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return cs;
}

/* Plain 32/64-bit moves: KVM decodes and emulates them on an MMIO exit. */
static inline std::uint32_t mmio_read32(std::uint64_t addr)
{
	std::uint32_t v;
	__asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline void mmio_write64(std::uint64_t addr, std::uint64_t v)
{
	__asm__ volatile("movq %0, (%1)" ::"r"(v), "r"(addr) : "memory");
}

void guest_hello(void)
{
	std::uint64_t cr0 = guest_read_cr0(), cr4 = guest_read_cr4();
	std::uint64_t efer = guest_rdmsr(msr_efer);

	GUEST_PRINTF("hello from vCPU %u: CPL%u, CR0=0x%llx CR4=0x%llx EFER=0x%llx",
		     guest_vcpu_id(), current_cs() & 3u, (unsigned long long)cr0,
		     (unsigned long long)cr4, (unsigned long long)efer);
	GUEST_SYNC(current_rip(), current_cs(), cr0, cr4, efer);
	GUEST_DONE();
}

void guest_compute(std::uint64_t n, std::uint64_t buf, std::uint64_t size, std::uint64_t seed)
{
	auto *p = reinterpret_cast<std::uint8_t *>(buf);
	std::uint64_t i, len = 0;

	/* Arguments arrive in registers, results leave through GUEST_SYNC. */
	GUEST_SYNC(n, fibonacci(n));

	/* Fill guest memory; the host reads it through its own mapping. */
	while (guest_message[len])
		len++;
	fill_pattern(p, size, seed);
	for (i = 0; i <= len; i++)
		p[i] = guest_message[i];
	GUEST_SYNC(fnv1a(p, size), len);
	GUEST_DONE();
}

void guest_ports(void)
{
	/* Two INs the host answers, one OUT of their product. */
	std::uint32_t a = guest_inl(port_ask);
	std::uint32_t b = guest_inl(port_ask);
	const char *s = "6 x 7 computed";

	guest_outl(port_answer, a * b);
	for (; *s; s++)
		guest_outb(port_console, (std::uint8_t)*s);
	guest_outb(port_console, '\n');
	GUEST_SYNC(a, b, a * b);
	GUEST_DONE();
}

void guest_mmio(void)
{
	std::uint32_t id = mmio_read32(mmio_id);

	/* Ring the "doorbell" with a value derived from what we read. */
	mmio_write64(mmio_doorbell, (std::uint64_t)id << 32 | 0x600dull);
	GUEST_SYNC(id);
	GUEST_DONE();
}

void guest_raise_ud(void *)
{
	__asm__ volatile("ud2");
}

static void guest_write(void *p)
{
	*(volatile std::uint64_t *)p = 1;
}

void guest_exceptions(std::uint64_t unmapped)
{
	struct virtkit_exception ex;
	std::uint64_t r;

	ex.vector = ex.error_code = ex.cr2 = ex.rip = 0;
	r = guest_catch(guest_raise_ud, 0, &ex);
	GUEST_SYNC(r, ex.vector, ex.error_code, ex.rip);

	ex.vector = ex.error_code = ex.cr2 = ex.rip = 0;
	r = guest_catch(guest_write, (void *)unmapped, &ex);
	GUEST_SYNC(r, ex.vector, ex.error_code, ex.cr2, ex.rip);
	/* The guest carries on after both. */
	GUEST_DONE();
}

void guest_worker(std::uint64_t shared, std::uint64_t iterations)
{
	auto *counter = reinterpret_cast<std::uint64_t *>(shared);
	auto *ready = counter + 1;
	std::uint64_t last = 0, interleaved = 0;

	/* Start together, so that the two vCPUs really overlap. */
	__atomic_fetch_add(ready, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(ready, __ATOMIC_SEQ_CST) < 2)
		guest_pause();

	for (std::uint64_t i = 0; i < iterations; i++) {
		std::uint64_t old = __atomic_fetch_add(counter, 1, __ATOMIC_SEQ_CST);
		/* The other vCPU incremented in between: we ran at the same time. */
		if (i && old != last + 1)
			interleaved++;
		last = old;
	}
	GUEST_SYNC(guest_vcpu_id(), iterations, interleaved);
	GUEST_DONE();
}

void guest_spp(std::uint64_t page)
{
	std::uint64_t blocked = page + spp_blocked_subpage * 128;
	std::uint64_t allowed = page + spp_allowed_subpage * 128;

	/* Two ordinary stores; the host decides about the protected one. */
	*(volatile std::uint64_t *)blocked = spp_blocked_value;
	*(volatile std::uint64_t *)allowed = spp_allowed_value;
	/* What the guest itself reads back afterwards. */
	GUEST_SYNC(*(volatile std::uint64_t *)allowed, *(volatile std::uint64_t *)blocked);
	GUEST_DONE();
}

/* Spin until the host (or a tool) sets the flag; the vCPU stays in the guest. */
static inline __attribute__((always_inline)) void wait_flag(std::uint64_t addr)
{
	while (!__atomic_load_n((std::uint64_t *)addr, __ATOMIC_ACQUIRE))
		guest_pause();
}

void guest_introspect_watched(std::uint64_t msr, std::uint64_t page, std::uint64_t ctl)
{
	auto *p = (volatile std::uint64_t *)page;

	/* The tool pauses this vCPU while it waits here, then writes "go". */
	wait_flag(ctl + intro_go);
	std::uint64_t before = guest_rdmsr(msr);
	guest_wrmsr(msr, intro_denied_value);
	std::uint64_t after_denied = guest_rdmsr(msr);
	guest_wrmsr(msr, intro_allowed_value);
	std::uint64_t after_allowed = guest_rdmsr(msr);
	p[0] = intro_page_value;
	GUEST_SYNC(before, after_denied, after_allowed, p[0]);

	/* The tool has gone: the same kinds of writes, unobserved. */
	wait_flag(ctl + intro_released);
	guest_wrmsr(msr, intro_after_value);
	p[1] = intro_page_value + 1;
	GUEST_SYNC(guest_rdmsr(msr), p[1]);
}

void guest_introspect_writes(std::uint64_t msr, std::uint64_t ctl)
{
	std::uint64_t i;

	wait_flag(ctl + intro_go);
	/* GUEST_SYNC between the writes: port I/O, where the host looks in. */
	for (i = 0; i < intro_max_writes && !*(volatile std::uint64_t *)(ctl + intro_released);
	     i++) {
		std::uint64_t v = intro_loop_base + i * 0x1000;
		guest_wrmsr(msr, v);
		GUEST_SYNC(i, v, guest_rdmsr(msr));
	}
	*(volatile std::uint64_t *)(ctl + intro_writes_done) = 1;
	wait_flag(ctl + intro_released);
	guest_wrmsr(msr, intro_after_value);
	GUEST_SYNC(i, intro_after_value, guest_rdmsr(msr));
}

void guest_introspect_idle(std::uint64_t ctl)
{
	/* Running, so that a tool can pause it, until the tool has gone. */
	wait_flag(ctl + intro_released);
}

void guest_introspect_late(void)
{
	/* Added while a tool is attached: its first entry is a CREATE_VCPU event. */
	GUEST_SYNC(intro_late_value);
}

void guest_bench_pio(std::uint64_t n)
{
	for (std::uint64_t i = 0; i < n; i++)
		guest_outb(port_bench, (std::uint8_t)i);
	GUEST_DONE();
}

void guest_bench_mmio(std::uint64_t n)
{
	std::uint64_t sum = 0;

	for (std::uint64_t i = 0; i < n; i++)
		sum += mmio_read32(mmio_id);
	GUEST_SYNC(sum);
	GUEST_DONE();
}

/* Shared by the guest and the host. */

std::uint64_t fibonacci(std::uint64_t n)
{
	std::uint64_t a = 0, b = 1;

	for (std::uint64_t i = 0; i < n; i++) {
		std::uint64_t t = a + b;
		a = b;
		b = t;
	}
	return a;
}

std::uint64_t fnv1a(const std::uint8_t *p, std::uint64_t size)
{
	std::uint64_t h = 0xcbf29ce484222325ull;

	for (std::uint64_t i = 0; i < size; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

void fill_pattern(std::uint8_t *p, std::uint64_t size, std::uint64_t seed)
{
	std::uint64_t x = seed;

	for (std::uint64_t i = 0; i < size; i++) {
		/* xorshift64 */
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		p[i] = (std::uint8_t)x;
	}
}

} // namespace virtkit::tool::demo

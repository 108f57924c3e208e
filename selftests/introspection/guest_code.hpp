// SPDX-License-Identifier: MIT
/*
 * Guest code shared by the introspection selftests. It runs inside the
 * guest (see virtkit/x86/guest.h): no libc, general registers only. Each
 * function reports through GUEST_SYNC(tag, ...) so that the host can tell
 * the steps apart.
 */
#pragma once

#include <virtkit/x86/guest.h>

#include <cstdint>

namespace kvmi_guest {

/* Values a spinning guest keeps in callee-saved registers. */
constexpr std::uint64_t magic_r12 = 0x1212121212121212ull;
constexpr std::uint64_t magic_r13 = 0x1313131313131313ull;

/*
 * Keep r12/r13 at known values and count in r14 until *stop is non-zero,
 * then report r13 (which the tool may have changed) and the count. `counter`
 * is also incremented in memory, so that a paused vCPU is visible there.
 */
static inline void spin_with_registers(std::uint64_t stop, std::uint64_t counter)
{
	std::uint64_t r13_out, r14_out;
	__asm__ volatile("mov %[m12], %%r12\n\t"
			 "mov %[m13], %%r13\n\t"
			 "xor %%r14, %%r14\n\t"
			 "1: inc %%r14\n\t"
			 "incq (%[counter])\n\t"
			 "pause\n\t"
			 "cmpq $0, (%[stop])\n\t"
			 "je 1b\n\t"
			 "mov %%r13, %[o13]\n\t"
			 "mov %%r14, %[o14]\n\t"
			 : [o13] "=&r"(r13_out), [o14] "=&r"(r14_out)
			 : [stop] "r"(stop), [counter] "r"(counter), [m12] "r"(magic_r12),
			   [m13] "r"(magic_r13)
			 : "r12", "r13", "r14", "memory", "cc");
	GUEST_SYNC(1, r13_out, r14_out);
}

/* Spin until *stop is non-zero, counting in memory; then report. */
static inline void spin_until(std::uint64_t stop, std::uint64_t counter)
{
	while (!*(volatile std::uint64_t *)stop) {
		auto *c = (volatile std::uint64_t *)counter;
		*c = *c + 1;
		guest_pause();
	}
	GUEST_SYNC(1, *(volatile std::uint64_t *)counter);
}

/* Spin until *stop is non-zero, with nothing else touched. */
static inline void wait_for(std::uint64_t stop)
{
	while (!*(volatile std::uint64_t *)stop)
		guest_pause();
}

static inline void cpuid(std::uint32_t leaf, std::uint32_t sub, std::uint32_t r[4])
{
	__asm__ volatile("cpuid"
			 : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
			 : "a"(leaf), "c"(sub));
}

static inline std::uint64_t xgetbv(std::uint32_t index)
{
	std::uint32_t lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(index));
	return lo | (std::uint64_t)hi << 32;
}

static inline void write64(std::uint64_t gva, std::uint64_t v)
{
	*(volatile std::uint64_t *)gva = v;
}

static inline std::uint64_t read64(std::uint64_t gva)
{
	return *(volatile std::uint64_t *)gva;
}

} // namespace kvmi_guest

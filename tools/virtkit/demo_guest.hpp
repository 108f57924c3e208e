// SPDX-License-Identifier: MIT
/*
 * The guest side of `virtkit demo`: entry points (in demo_guest.cpp, which is
 * compiled as guest code: freestanding, general registers only) and the
 * ports and addresses the guest and the host agree on.
 */
#pragma once

#include <cstdint>

namespace virtkit::tool::demo {

/* Port I/O "devices" the host emulates in its run loop. */
inline constexpr std::uint16_t port_ask = 0x5000;	/* IN: the host answers a number */
inline constexpr std::uint16_t port_answer = 0x5004;	/* OUT: the guest reports a result */
inline constexpr std::uint16_t port_console = 0x5008;	/* OUTB: one character */
inline constexpr std::uint16_t port_bench = 0x5010;	/* OUTB: exit round-trip benchmark */

/* A guest-physical page with no memory behind it: every access exits as MMIO. */
inline constexpr std::uint64_t mmio_base = 0xd0000000;
inline constexpr std::uint64_t mmio_id = mmio_base + 0x0;	/* read: device id */
inline constexpr std::uint64_t mmio_doorbell = mmio_base + 0x8;	/* write: value printed */

/*
 * Sub-page protection: the guest writes 8 bytes into two 128-byte sub-pages
 * of one page; the host write-protects the second.
 */
inline constexpr std::uint32_t spp_allowed_subpage = 1;
inline constexpr std::uint32_t spp_blocked_subpage = 2;
inline constexpr std::uint64_t spp_allowed_value = 0x1111222233334444ull;
inline constexpr std::uint64_t spp_blocked_value = 0xbad0bad0bad0bad0ull;

/*
 * Introspection: the MSR a tool hooks (harmless here: the guest never uses
 * SWAPGS), the values the guest writes to it, and the offsets in a control
 * page of the flags that let the guest go on.
 */
inline constexpr std::uint32_t msr_kernel_gs_base = 0xc0000102;
inline constexpr std::uint64_t intro_denied_value = 0xbad000;
inline constexpr std::uint64_t intro_allowed_value = 0x600d000;
inline constexpr std::uint64_t intro_after_value = 0xa11000;
inline constexpr std::uint64_t intro_page_value = 0x7001700170017001ull;
inline constexpr std::uint64_t intro_loop_base = 0x1000000;	/* + 0x1000 per write */
inline constexpr std::uint64_t intro_max_writes = 20;
inline constexpr std::uint64_t intro_go = 0;		/* set: start writing */
inline constexpr std::uint64_t intro_released = 8;	/* set: the tool has gone */
inline constexpr std::uint64_t intro_writes_done = 16;	/* set by the guest */
inline constexpr std::uint64_t intro_late_value = 0x1a7e;	/* the late vCPU's report */

/* Values the steps check. */
inline constexpr std::uint64_t fib_n = 90;
inline constexpr std::uint64_t pattern_seed = 0x9e3779b97f4a7c15ull;

/* Guest entry points; each ends with GUEST_DONE (returning is the same). */
void guest_hello(void);
void guest_compute(std::uint64_t n, std::uint64_t buf, std::uint64_t size, std::uint64_t seed);
void guest_ports(void);
void guest_mmio(void);
void guest_exceptions(std::uint64_t unmapped);
void guest_worker(std::uint64_t shared, std::uint64_t iterations);
void guest_spp(std::uint64_t page);
void guest_introspect_watched(std::uint64_t msr, std::uint64_t page, std::uint64_t ctl);
void guest_introspect_writes(std::uint64_t msr, std::uint64_t ctl);
void guest_introspect_idle(std::uint64_t ctl);
void guest_introspect_late(void);
void guest_bench_pio(std::uint64_t n);
void guest_bench_mmio(std::uint64_t n);

/* Where guest_exceptions raises #UD (for the host to name the faulting function). */
void guest_raise_ud(void *);

/* The string guest_compute writes after its pattern. */
extern const char guest_message[];

/* The same computations on the host, to check the guest's answers. */
std::uint64_t fibonacci(std::uint64_t n);
std::uint64_t fnv1a(const std::uint8_t *p, std::uint64_t size);
void fill_pattern(std::uint8_t *p, std::uint64_t size, std::uint64_t seed);

} // namespace virtkit::tool::demo

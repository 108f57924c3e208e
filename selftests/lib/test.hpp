// SPDX-License-Identifier: MIT
/*
 * virtkit selftest harness, in the style of the kernel's kselftest_harness:
 * every VK_TEST in a binary is run in its own forked child, results are
 * printed as KTAP, and the exit code is kselftest's (0 pass, 1 fail, 4 skip).
 *
 *   VK_TEST(vm_create) {
 *           TEST_REQUIRE(vkt::kvm().has(KVM_CAP_READONLY_MEM), "KVM_CAP_READONLY_MEM");
 *           TEST_ASSERT_EQ(x, 1);
 *   }
 *
 * Options: -l lists the tests, -t NAME runs only NAME (repeatable).
 */
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <virtkit/virtkit.hpp>

namespace vkt {

using TestFn = void (*)();

struct Registrar {
	Registrar(const char *name, TestFn fn);
};

/* Thrown by TEST_REQUIRE: the test is skipped with this reason. */
struct Skip {
	std::string reason;
};

/* Thrown by failed assertions. */
struct Failure {
	std::string message;
};

[[noreturn]] void fail(const char *file, int line, const std::string &what);
[[noreturn]] void fail_cond(const char *file, int line, const char *cond);
[[noreturn]] void fail_cond(const char *file, int line, const char *cond, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
std::string format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * A pseudo-random generator with a printable seed (splitmix64), for the
 * seeded, replayable tests (kmod_fuzz, kvmi_fuzz and randomized cases).
 */
struct Rng {
	std::uint64_t s;
	explicit Rng(std::uint64_t seed) : s(seed) {}
	std::uint64_t next()
	{
		std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
		return z ^ (z >> 31);
	}
	std::uint64_t below(std::uint64_t n) { return n ? next() % n : 0; }
	bool chance(unsigned percent) { return below(100) < percent; }
	template <class T> const T &pick(const std::vector<T> &v) { return v[below(v.size())]; }
};

/* An environment variable as a number (strtoull base 0), or dflt if unset or empty. */
std::uint64_t env_u64(const char *name, std::uint64_t dflt);

/* /dev/kvm, opened once per test. */
virtkit::System &kvm();

/* Resource accounting for "nothing leaked" checks. */
int open_fd_count();
int mapping_count();
/*
 * The lines of /proc/self/maps that mapping_count() counts: no [heap]; in a
 * sanitizer build (make check-asan, check-tsan) only named ones, since the
 * runtime's own anonymous mappings come and go (harness.cpp).
 */
std::vector<std::string> mappings();

/*
 * Whether this binary was built with AddressSanitizer or ThreadSanitizer
 * (make check-asan, check-tsan; the harness is instrumented there, the
 * tests' own files are not, so they ask at run time).
 */
bool sanitizer_build();

/* Whether two regions, or region lists (GuestMemory::regions()), are identical. */
bool same_region(const virtkit::RegionInfo &a, const virtkit::RegionInfo &b);
bool same_layout(const std::vector<virtkit::RegionInfo> &a,
		 const std::vector<virtkit::RegionInfo> &b);

/*
 * Give the running test seconds from now instead of the harness's 300 s
 * limit (for tests that boot a real kernel, say).
 */
void set_timeout(unsigned seconds);

/* A KTAP diagnostic line ("# ..."). */
void diag(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

} // namespace vkt

#define VK_TEST(name)                                                          \
	static void vk_test_##name();                                          \
	static const ::vkt::Registrar vk_reg_##name(#name, vk_test_##name);    \
	static void vk_test_##name()

#define TEST_REQUIRE(cond, what)                                               \
	do {                                                                   \
		if (!(cond))                                                   \
			throw ::vkt::Skip{std::string("requires ") + (what)};  \
	} while (0)

/*
 * Skip unless a platform probe (virtkit/platform.hpp) found the capability:
 * the skip names it and what the probe's tiny guest did.
 */
#define TEST_REQUIRE_PROBE(probe, what)                                        \
	do {                                                                   \
		const ::virtkit::Probe &vk_p_ = (probe);                       \
		if (!vk_p_)                                                    \
			throw ::vkt::Skip{std::string("requires ") + (what) +  \
					  " (platform probe: " +               \
					  vk_p_.describe() + ")"};             \
	} while (0)

#define TEST_ASSERT(cond, ...)                                                 \
	do {                                                                   \
		if (!(cond))                                                   \
			::vkt::fail_cond(__FILE__, __LINE__, #cond,            \
					 ##__VA_ARGS__);                       \
	} while (0)

#define TEST_ASSERT_EQ(a, b)                                                   \
	do {                                                                   \
		auto vk_a_ = (a);                                              \
		auto vk_b_ = (b);                                              \
		if ((unsigned long long)vk_a_ != (unsigned long long)vk_b_)    \
			::vkt::fail(__FILE__, __LINE__,                        \
				    ::vkt::format("%s == %s: 0x%llx != 0x%llx", \
						  #a, #b,                      \
						  (unsigned long long)vk_a_,   \
						  (unsigned long long)vk_b_)); \
	} while (0)

/*
 * Evaluate expr, which must throw virtkit::Error with errno err. Returns the
 * error's message for further checks.
 */
#define TEST_EXPECT_ERROR(expr, want_errno)                                           \
	([&]() -> std::string {                                                \
		try {                                                          \
			(void)(expr);                                          \
		} catch (const ::virtkit::Error &vk_e_) {                      \
			if (vk_e_.err() != (want_errno))                              \
				::vkt::fail(__FILE__, __LINE__,                \
					    std::string(#expr) +               \
						    ": expected " +            \
						    ::virtkit::errno_name(want_errno) + \
						    ", got: " + vk_e_.what()); \
			return vk_e_.what();                                   \
		}                                                              \
		::vkt::fail(__FILE__, __LINE__,                                \
			    std::string(#expr) + ": expected " +               \
				    ::virtkit::errno_name(want_errno) +               \
				    ", but it succeeded");                     \
	}())

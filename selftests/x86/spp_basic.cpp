// SPDX-License-Identifier: MIT
/*
 * Sub-page protection: the API contract (enable, SET/GET, defaults, every
 * bad argument) and the basic enforcement path - a blocked write is not
 * performed and is reported with its GPA, an allowed write to the same page
 * is, reads never exit.
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <fcntl.h>
#include <linux/virtkit.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t spp_gpa = 0x40000000; /* 1 GiB */
static constexpr std::uint64_t spp_pages = 16;
static constexpr std::uint64_t spp_gfn = spp_gpa / 4096;

/* Write `value` (8 bytes) at each address, then sync with the count. */
static void guest_write_qwords(std::uint64_t a0, std::uint64_t a1, std::uint64_t value)
{
	*(volatile std::uint64_t *)a0 = value;
	*(volatile std::uint64_t *)a1 = value;
	GUEST_SYNC(2);
}

static void guest_read(std::uint64_t base, std::uint64_t bytes)
{
	std::uint64_t sum = 0;
	for (std::uint64_t a = base; a < base + bytes; a += 8)
		sum += *(volatile std::uint64_t *)a;
	GUEST_SYNC(sum);
}

struct SppGuest {
	GuestVm g{vkt::kvm()};
	RegionId region = g.memory().add(spp_gpa, spp_pages * 4096, {.name = "spp"});

	SppGuest() { g.identity_map(spp_gpa, spp_pages * 4096); }
};

static bool kmod_present()
{
	struct stat st;
	return ::stat("/dev/virtkit", &st) == 0;
}

/* What `automatic` must pick here (Documentation/spp.rst). */
static SppBackendKind automatic_backend()
{
	const char *env = std::getenv("VIRTKIT_SPP_BACKEND");
	if (env && *env)
		return std::strcmp(env, "kmod") ? SppBackendKind::user : SppBackendKind::kmod;
	return kmod_present() ? SppBackendKind::kmod : SppBackendKind::user;
}

static const char *backend_name(SppBackendKind k)
{
	return k == SppBackendKind::kmod ? "kmod" : k == SppBackendKind::user ? "user" : "automatic";
}

VK_TEST(spp_enable_is_idempotent)
{
	SppGuest t;
	TEST_ASSERT(SubpageProtection::of(t.g.vm()) == nullptr);
	SubpageProtection &a = SubpageProtection::enable(t.g.vm());
	SubpageProtection &b = SubpageProtection::enable(t.g.vm());
	TEST_ASSERT(&a == &b);
	TEST_ASSERT(SubpageProtection::of(t.g.vm()) == &a);
	const SppBackendKind want = automatic_backend();
	vkt::diag("spp backend: %s", backend_name(a.backend()));
	TEST_ASSERT(a.backend() == want, "automatic chose %s, expected %s",
		    backend_name(a.backend()), backend_name(want));
	const SppBackendKind other =
		want == SppBackendKind::user ? SppBackendKind::kmod : SppBackendKind::user;
	TEST_ASSERT(&SubpageProtection::enable(t.g.vm(), {.backend = want}) == &a);
	TEST_EXPECT_ERROR(SubpageProtection::enable(t.g.vm(), {.backend = other}), EINVAL);
}

/* Each backend asked for explicitly: user everywhere, kmod where virtkit.ko is loaded. */
VK_TEST(spp_explicit_backends)
{
	SppGuest u;
	auto &user = SubpageProtection::enable(u.g.vm(), {.backend = SppBackendKind::user});
	TEST_ASSERT(user.backend() == SppBackendKind::user);

	SppGuest k;
	if (!kmod_present()) {
		try {
			SubpageProtection::enable(k.g.vm(), {.backend = SppBackendKind::kmod});
			TEST_ASSERT(false, "enable(kmod) succeeded without /dev/virtkit");
		} catch (const Error &e) {
			TEST_ASSERT(e.err() == ENOENT || e.err() == ENODEV, "%s", e.what());
		}
		TEST_ASSERT(SubpageProtection::of(k.g.vm()) == nullptr);
		return;
	}
	auto &spp = SubpageProtection::enable(k.g.vm(), {.backend = SppBackendKind::kmod});
	TEST_ASSERT(spp.backend() == SppBackendKind::kmod);
	spp.set_access(spp_gfn + 1, {0x0000ffffu});
	TEST_ASSERT(spp.get_access(spp_gfn + 1, 1) == std::vector<std::uint32_t>{0x0000ffffu});

	/*
	 * One SET larger than the module takes in one call is set in pieces:
	 * its first and last page (in different pieces) are protected after
	 * it, and a range that is not all RAM still changes nothing.
	 */
	int dev = ::open("/dev/virtkit", O_RDWR | O_CLOEXEC);
	TEST_ASSERT(dev >= 0);
	long max = ::ioctl(dev, VIRTKIT_CHECK_EXTENSION, VIRTKIT_CAP_SPP_MAX_PAGES);
	::close(dev);
	TEST_ASSERT(max > 0);
	const std::uint64_t big_gpa = 1ull << 36, big_pages = max + 1;
	k.g.memory().add(big_gpa, big_pages * 4096, {.name = "beyond one module call"});
	std::vector<std::uint32_t> big(big_pages, SubpageProtection::all_writable);
	big.front() = big.back() = 0x0000ffffu;
	spp.set_access(big_gpa / 4096, big);
	TEST_ASSERT(spp.get_access(big_gpa / 4096, 1)[0] == 0x0000ffffu);
	TEST_ASSERT(spp.get_access(big_gpa / 4096 + big_pages - 1, 1)[0] == 0x0000ffffu);
	TEST_ASSERT_EQ(spp.stats().protected_pages, 3u);
	std::size_t slots = k.g.memory().slot_count();
	big.push_back(0u); /* one page past the region */
	TEST_EXPECT_ERROR(spp.set_access(big_gpa / 4096, big), EFAULT);
	TEST_ASSERT_EQ(k.g.memory().slot_count(), slots);
	TEST_ASSERT_EQ(spp.stats().protected_pages, 3u);
}

/* Sets an environment variable for a scope. */
struct ScopedEnv {
	const char *name;
	std::optional<std::string> old;
	ScopedEnv(const char *n, const char *value) : name(n)
	{
		if (const char *v = std::getenv(n))
			old = v;
		::setenv(n, value, 1);
	}
	~ScopedEnv() { old ? ::setenv(name, old->c_str(), 1) : ::unsetenv(name); }
};

/* VIRTKIT_SPP_BACKEND overrides `automatic` only; a bad value is refused. */
VK_TEST(spp_backend_environment)
{
	{
		ScopedEnv env("VIRTKIT_SPP_BACKEND", "userspace");
		SppGuest t;
		std::string msg = TEST_EXPECT_ERROR(SubpageProtection::enable(t.g.vm()), EINVAL);
		TEST_ASSERT(msg.find("VIRTKIT_SPP_BACKEND=userspace") != std::string::npos, "%s",
			    msg.c_str());
		TEST_ASSERT(SubpageProtection::of(t.g.vm()) == nullptr);
		/* An explicit choice does not read it. */
		auto &user = SubpageProtection::enable(t.g.vm(), {.backend = SppBackendKind::user});
		TEST_ASSERT(user.backend() == SppBackendKind::user);
	}
	ScopedEnv env("VIRTKIT_SPP_BACKEND", "user");
	SppGuest t;
	TEST_ASSERT(SubpageProtection::enable(t.g.vm()).backend() == SppBackendKind::user);
}

VK_TEST(spp_get_default_and_round_trip)
{
	SppGuest t;
	auto &spp = SubpageProtection::enable(t.g.vm());
	auto maps = spp.get_access(spp_gfn, spp_pages);
	TEST_ASSERT_EQ(maps.size(), spp_pages);
	for (auto m : maps)
		TEST_ASSERT_EQ(m, SubpageProtection::all_writable);

	std::vector<std::uint32_t> want(spp_pages);
	for (std::uint64_t i = 0; i < spp_pages; i++)
		want[i] = i % 3 == 0 ? SubpageProtection::all_writable
				     : 0x9e3779b9u * static_cast<std::uint32_t>(i + 1);
	spp.set_access(spp_gfn, want);
	TEST_ASSERT(spp.get_access(spp_gfn, spp_pages) == want);
	TEST_ASSERT_EQ(spp.stats().protected_pages, 10u);
	/* A sub-range reads the same values. */
	auto mid = spp.get_access(spp_gfn + 5, 3);
	TEST_ASSERT(mid == std::vector<std::uint32_t>(want.begin() + 5, want.begin() + 8));

	/* Setting all-ones again removes every protection and every trap. */
	std::size_t slots_protected = t.g.memory().slot_count();
	spp.set_access(spp_gfn, std::vector<std::uint32_t>(spp_pages, SubpageProtection::all_writable));
	TEST_ASSERT_EQ(spp.stats().protected_pages, 0u);
	TEST_ASSERT(t.g.memory().slot_count() < slots_protected);
	for (auto m : spp.get_access(spp_gfn, spp_pages))
		TEST_ASSERT_EQ(m, SubpageProtection::all_writable);
	/* npages == 0 is a no-op, wherever it points. */
	spp.set_access(~0ull, std::span<const std::uint32_t>{});
	TEST_ASSERT(spp.get_access(~0ull, 0).empty());
}

VK_TEST(spp_bad_arguments_change_nothing)
{
	SppGuest t;
	auto &spp = SubpageProtection::enable(t.g.vm());
	spp.set_access(spp_gfn + 2, {0x0000ffffu});
	auto before = spp.get_access(spp_gfn, spp_pages);
	std::size_t slots = t.g.memory().slot_count();
	const std::uint32_t two[2] = {0, 0};

	TEST_EXPECT_ERROR(spp.set_access(spp_gfn, {0u}, 1), EINVAL);
	TEST_EXPECT_ERROR(spp.get_access(spp_gfn, 1, 0x80000000u), EINVAL);
	/* Ranges that wrap. */
	TEST_EXPECT_ERROR(spp.set_access(~0ull, two), EINVAL);
	TEST_EXPECT_ERROR(spp.get_access(~0ull - 2, 4), EINVAL);
	/* Outside guest memory, wholly or partly (the last page sticks out). */
	TEST_EXPECT_ERROR(spp.set_access(0x7ffff000, {0u}), EFAULT);
	TEST_EXPECT_ERROR(spp.set_access(spp_gfn + spp_pages - 1, two), EFAULT);
	TEST_EXPECT_ERROR(spp.get_access(spp_gfn + spp_pages - 1, 2), EFAULT);
	TEST_EXPECT_ERROR(spp.set_access(spp_gfn - 1, two), EFAULT);
	/* Beyond what a 4-level table can describe, and absurd sizes. */
	TEST_EXPECT_ERROR(spp.set_access(1ull << 40, {0u}), EFAULT);
	TEST_EXPECT_ERROR(spp.get_access(0, 1ull << 40), EFAULT);
	/* Checked before anything is allocated for the answer (128 GiB here). */
	TEST_EXPECT_ERROR(spp.get_access(spp_gfn, 1ull << 35), EFAULT);
	/* A read-only region cannot be protected further. */
	t.g.memory().add(0x50000000, 4096, {.readonly = true, .name = "rom"});
	TEST_EXPECT_ERROR(spp.set_access(0x50000, {0u}), EFAULT);

	TEST_ASSERT(spp.get_access(spp_gfn, spp_pages) == before);
	TEST_ASSERT_EQ(t.g.memory().slot_count(), slots + 1); /* + the rom */
	TEST_ASSERT_EQ(spp.stats().protected_pages, 1u);
}

VK_TEST(spp_blocks_protected_and_allows_writable_subpage)
{
	SppGuest t;
	auto &spp = SubpageProtection::enable(t.g.vm());
	std::vector<SppViolation> seen;
	spp.on_violation([&](Vcpu &, const SppViolation &v) {
		seen.push_back(v);
		return SppDecision::drop;
	});
	/* Page 3: sub-page 5 protected, everything else writable. */
	spp.set_access(spp_gfn + 3, {~(1u << 5)});
	const std::uint64_t page3 = spp_gpa + 3 * 4096;
	const std::uint64_t blocked = page3 + 5 * 128 + 8, allowed = page3 + 6 * 128;
	Vcpu &v = t.g.add_vcpu(guest_write_qwords, blocked, allowed, 0x1122334455667788ull);
	TEST_ASSERT_EQ(t.g.run(v).args[0], 2u);

	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(blocked), 0u);
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(allowed), 0x1122334455667788ull);
	TEST_ASSERT_EQ(seen.size(), 1u);
	TEST_ASSERT_EQ(seen[0].gpa, blocked);
	TEST_ASSERT_EQ(seen[0].write_gpa, blocked);
	TEST_ASSERT_EQ(seen[0].size, 8u);
	TEST_ASSERT_EQ(seen[0].vcpu, 0u);
	std::uint64_t data;
	std::memcpy(&data, seen[0].data().data(), 8);
	TEST_ASSERT_EQ(data, 0x1122334455667788ull);
	auto st = spp.stats();
	TEST_ASSERT_EQ(st.violations, 1u);
	TEST_ASSERT_EQ(st.allowed_writes, 1u);
	TEST_ASSERT_EQ(st.checked_writes, 2u);
}

VK_TEST(spp_stop_returns_to_caller_and_allow_once_writes)
{
	SppGuest t;
	auto &spp = SubpageProtection::enable(t.g.vm());
	spp.set_access(spp_gfn, {0u});
	int calls = 0;
	spp.on_violation([&](Vcpu &, const SppViolation &) {
		return ++calls == 1 ? SppDecision::stop : SppDecision::allow_once;
	});
	Vcpu &v = t.g.add_vcpu(guest_write_qwords, spp_gpa, spp_gpa + 8, 42);
	Exit e = v.run();
	auto *sv = std::get_if<SppViolationExit>(&e);
	TEST_ASSERT(sv, "got %s", describe(e).c_str());
	TEST_ASSERT_EQ(sv->violation.gpa, spp_gpa);
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(spp_gpa), 0u);
	/* The stopped write stays dropped; the next one is allowed once. */
	TEST_ASSERT_EQ(t.g.run(v).args[0], 2u);
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(spp_gpa), 0u);
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(spp_gpa + 8), 42u);
	TEST_ASSERT(spp.get_access(spp_gfn, 1) == std::vector<std::uint32_t>{0u});
}

VK_TEST(spp_vmm_writes_are_never_restricted)
{
	SppGuest t;
	auto &spp = SubpageProtection::enable(t.g.vm());
	spp.set_access(spp_gfn, {0u});
	t.g.memory().write_obj<std::uint64_t>(spp_gpa + 16, 7);
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(spp_gpa + 16), 7u);
	std::memset(t.g.memory().host_ptr(spp_gpa, 4096), 0xaa, 4096);
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint8_t>(spp_gpa + 4095), 0xaau);
	TEST_ASSERT_EQ(spp.stats().checked_writes, 0u);
}

VK_TEST(spp_reads_of_protected_pages_do_not_exit)
{
	SppGuest t;
	auto &spp = SubpageProtection::enable(t.g.vm());
	t.g.memory().fill(spp_gpa, std::byte{1}, spp_pages * 4096);
	std::vector<std::uint32_t> none(spp_pages, 0u);
	spp.set_access(spp_gfn, none);
	int mmio = 0;
	auto reg = t.g.vm().add_exit_handler([&](Vcpu &, Exit &e) {
		mmio += std::holds_alternative<MmioExit>(e);
		return ExitAction::pass;
	});
	Vcpu &v = t.g.add_vcpu(guest_read, spp_gpa, spp_pages * 4096);
	TEST_ASSERT_EQ(t.g.run(v).args[0], spp_pages * 4096 / 8 * 0x0101010101010101ull);
	TEST_ASSERT_EQ(mmio, 0);
	TEST_ASSERT_EQ(spp.stats().checked_writes, 0u);
}


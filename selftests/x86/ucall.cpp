// SPDX-License-Identifier: MIT
/*
 * ucalls: SYNC with up to six values, guest assertions with file, line and a
 * formatted message, GUEST_PRINTF, DONE on return, unhandled exceptions.
 */
#include "test.hpp"

#include <virtkit/x86/guest_vm.hpp>

#include <string>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static bool ends_with(const std::string &s, const std::string &tail)
{
	return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

/* Run and expect a GuestFailure; return its ucall. */
static Ucall expect_failure(GuestVm &g, Vcpu &v)
{
	try {
		g.run(v);
	} catch (const GuestFailure &f) {
		TEST_ASSERT(f.ucall().has_value(), "failure without a ucall: %s", f.what());
		return *f.ucall();
	}
	vkt::fail(__FILE__, __LINE__, "the guest did not fail");
}

static void guest_six_args(void)
{
	GUEST_SYNC();
	GUEST_SYNC(1, 2, 3, 4, 5, 0xffffffffffffffffull);
}

VK_TEST(sync_zero_to_six_values)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_six_args);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync);
	TEST_ASSERT_EQ(uc.args.size(), 0);
	uc = g.run(v);
	TEST_ASSERT_EQ(uc.args.size(), 6);
	for (unsigned i = 0; i < 5; i++)
		TEST_ASSERT_EQ(uc.args[i], i + 1);
	TEST_ASSERT_EQ(uc.args[5], ~0ull);
	g.run_to_done(v);
}

static int assert_line;

static void guest_assert_eq(std::uint64_t x)
{
	assert_line = __LINE__ + 1;
	GUEST_ASSERT_EQ(x * 2, 42);
	GUEST_DONE();
}

VK_TEST(assert_reports_file_line_and_values)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_assert_eq, 7);
	Ucall uc = expect_failure(g, v);
	TEST_ASSERT(uc.kind == Ucall::Kind::assert_failed);
	TEST_ASSERT(ends_with(uc.file, "selftests/x86/ucall.cpp"), "file '%s'", uc.file.c_str());
	/* The guest recorded its own line in guest memory: read it back. */
	g.sync_from_guest(assert_line);
	TEST_ASSERT(assert_line > 0);
	TEST_ASSERT_EQ(uc.line, assert_line);
	TEST_ASSERT(uc.message == "x * 2 == 42: 0xe != 0x2a", "message '%s'", uc.message.c_str());
	/* What a test log shows. */
	std::string d = uc.describe();
	TEST_ASSERT(d.find("ucall.cpp:" + std::to_string(assert_line) + ": x * 2 == 42") !=
			    std::string::npos,
		    "describe() = '%s'", d.c_str());
}

static void guest_assert_msg(void)
{
	GUEST_ASSERT_MSG(guest_vcpu_id() == 99, "vcpu %u: %s %d 0x%08x %c%%", guest_vcpu_id(),
			 "want", -5, 0xbeefu, 'z');
}

VK_TEST(assert_formats_message)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_assert_msg);
	Ucall uc = expect_failure(g, v);
	TEST_ASSERT(uc.kind == Ucall::Kind::assert_failed);
	TEST_ASSERT(uc.message == "vcpu 0: want -5 0x0000beef z%", "message '%s'", uc.message.c_str());
}

static void guest_long_message(void)
{
	/* Longer than the ucall's message buffer: truncated, never overrun. */
	GUEST_FAIL("%s%s%s%s%s", "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		   "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		   "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		   "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "tail");
}

VK_TEST(assert_message_truncated_safely)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_long_message);
	Ucall uc = expect_failure(g, v);
	TEST_ASSERT_EQ(uc.message.size(), sizeof(virtkit_ucall{}.message) - 1);
	TEST_ASSERT(uc.message.compare(0, 16, "0123456789abcdef") == 0);
}

static void guest_print(std::uint64_t n)
{
	for (std::uint64_t i = 0; i < n; i++)
		GUEST_PRINTF("line %llu of %llu", (unsigned long long)i, (unsigned long long)n);
	GUEST_SYNC(n);
}

VK_TEST(printf_reaches_host_and_guest_continues)
{
	std::vector<std::string> lines;
	GuestOptions o;
	o.print = [&](std::uint32_t vcpu, std::string_view text) {
		lines.push_back(std::to_string(vcpu) + ":" + std::string(text));
	};
	GuestVm g(vkt::kvm(), o);
	Vcpu &v = g.add_vcpu(guest_print, 3);
	TEST_ASSERT_EQ(g.run(v).args[0], 3);
	TEST_ASSERT_EQ(lines.size(), 3);
	TEST_ASSERT(lines[2] == "0:line 2 of 3", "got '%s'", lines[2].c_str());
	g.run_to_done(v);
}

static void guest_returns(void) {}

VK_TEST(return_from_entry_is_done)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_returns);
	g.run_to_done(v);
	/* A finished vCPU can be restarted at another entry point. */
	g.set_entry(v, guest_six_args);
	TEST_ASSERT_EQ(g.run(v).args.size(), 0);
}

static void guest_unhandled_ud(void)
{
	__asm__ volatile("ud2");
}

VK_TEST(unhandled_exception_reported)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_unhandled_ud);
	Ucall uc = expect_failure(g, v);
	TEST_ASSERT(uc.kind == Ucall::Kind::unhandled_exception);
	TEST_ASSERT_EQ(uc.args[0], UD_VECTOR);
	/* RIP of the ud2, inside the entry function. */
	auto fn = reinterpret_cast<std::uint64_t>(guest_unhandled_ud);
	TEST_ASSERT(uc.args[2] >= fn && uc.args[2] < fn + 64, "rip=0x%llx fn=0x%llx",
		    (unsigned long long)uc.args[2], (unsigned long long)fn);
	TEST_ASSERT(uc.describe().find("#UD") != std::string::npos);
}

static void guest_unhandled_pf(std::uint64_t addr)
{
	*(volatile std::uint32_t *)addr = 5;
}

VK_TEST(unhandled_page_fault_reports_cr2)
{
	GuestVm g(vkt::kvm());
	const std::uint64_t addr = 0x50000000123ull;
	Vcpu &v = g.add_vcpu(guest_unhandled_pf, addr);
	Ucall uc = expect_failure(g, v);
	TEST_ASSERT(uc.kind == Ucall::Kind::unhandled_exception);
	TEST_ASSERT_EQ(uc.args[0], PF_VECTOR);
	TEST_ASSERT_EQ(uc.args[1], PFERR_WRITE);
	TEST_ASSERT_EQ(uc.args[3], addr);
}

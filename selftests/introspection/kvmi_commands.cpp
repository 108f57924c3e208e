// SPDX-License-Identifier: MIT
/*
 * KVMI commands on real KVM, each checked against ground truth: what the
 * guest itself sees (reported through ucalls), the VMM's view of its vCPUs
 * and memory, and the guest's page tables. Also the handshake and the VMM's
 * command/event policy.
 */
#include "guest_code.hpp"
#include "kvmi_util.hpp"

#include <linux/virtkit_kvmi.h>
#include <virtkit/x86/guest_probes.hpp>
#include <sys/ioctl.h>

#include <algorithm>
#include <ctime>

using namespace virtkit;
using namespace virtkit::x86;
using namespace vkt;
namespace g_ = kvmi_guest;

static constexpr std::uint64_t stop_gpa = data_gpa;	    /* the guest's stop flag */
static constexpr std::uint64_t counter_gpa = data_gpa + 8; /* its loop counter */

static std::vector<std::byte> pattern(std::size_t n, unsigned seed)
{
	std::vector<std::byte> v(n);
	std::uint32_t x = 0x9e3779b9u * (seed + 1);
	for (auto &b : v) {
		x = x * 1664525u + 1013904223u;
		b = std::byte(x >> 24);
	}
	return v;
}

static void stop_guest(intro::Session &s)
{
	std::uint64_t one = 1;
	s.write_physical(stop_gpa, std::as_bytes(std::span(&one, 1)));
}

/* --- handshake --- */

static void guest_write_and_msr(std::uint64_t gva)
{
	g_::write64(gva, 0x5151515151515151ull);
	guest_wrmsr(0x174 /* SYSENTER_CS */, 0x33);
	GUEST_SYNC(1, guest_rdmsr(0x174));
}

VK_TEST(handshake_reports_vm_identity)
{
	KvmiTest t;
	t.add_vcpu(guest_write_and_msr, data_gpa);
	auto o = t.default_options();
	t.attach(o);
	const auto &info = t.t().info();
	TEST_ASSERT(info.struct_size >= 104, "struct_size %u", info.struct_size);
	TEST_ASSERT(info.uuid == o.uuid);
	TEST_ASSERT(info.name == o.name, "name '%s'", info.name.c_str());
	TEST_ASSERT_EQ(info.start_time, o.start_time);
	std::uint64_t end = 0;
	for (auto &r : t.g.memory().regions())
		end = std::max(end, r.gpa + r.size);
	TEST_ASSERT(info.max_gpa.has_value());
	/* The end of guest-physical memory: the first address after it. */
	TEST_ASSERT_EQ(*info.max_gpa, end);
	TEST_ASSERT(t.vmm->connected());
	TEST_ASSERT(t.t().connected());
	TEST_ASSERT_EQ(t.t().get_guest_info(), 1u);
	/* The guest runs normally while attached (no event is enabled). */
	auto r = t.runner(0).run();
	TEST_ASSERT_EQ(r.args[1], 0x33u);
	t.expect_no_event(50ms);
}

VK_TEST(handshake_start_time_defaults_to_now)
{
	KvmiTest t;
	auto o = t.default_options();
	o.start_time = 0;
	o.name = std::string(63, 'n');
	/* In milliseconds, as QEMU's kvmi sends it (libkvmi's tools expect that). */
	auto now_ms = [] {
		return std::int64_t(std::chrono::duration_cast<std::chrono::milliseconds>(
					    std::chrono::system_clock::now().time_since_epoch())
					    .count());
	};
	std::int64_t before = now_ms();
	t.attach(o);
	std::int64_t after = now_ms();
	TEST_ASSERT(t.t().info().start_time >= before && t.t().info().start_time <= after,
		    "start_time %lld not in [%lld, %lld]", (long long)t.t().info().start_time,
		    (long long)before, (long long)after);
	TEST_ASSERT(t.t().info().name == o.name);
}

VK_TEST(handshake_wrong_secret_is_refused)
{
	KvmiTest t;
	auto &r = t.add_vcpu(guest_write_and_msr, data_gpa);
	auto o = t.default_options();
	try {
		t.attach(o, "not the secret");
		fail(__FILE__, __LINE__, "connect succeeded with a wrong secret");
	} catch (const Error &e) {
		/* The VMM's error: the cookie hash did not match. */
		TEST_ASSERT(e.err() == EACCES, "%s", e.what());
	}
	TEST_ASSERT(!t.vmm.has_value());
	TEST_ASSERT(SubpageProtection::of(t.g.vm()) == nullptr);
	/* Nothing was installed: the guest writes memory and the MSR unhindered. */
	auto uc = r.run();
	TEST_ASSERT_EQ(uc.args[1], 0x33u);
	TEST_ASSERT_EQ(t.peek(data_gpa), 0x5151515151515151ull);
	TEST_ASSERT_EQ(r.vcpu().msr(0x174), 0x33u);
	/* The right secret still works afterwards. */
	t.attach(o);
	TEST_ASSERT_EQ(t.t().get_version().version, (std::uint32_t)KVMI_VERSION);
}

VK_TEST(handshake_times_out_when_tool_is_silent)
{
	KvmiTest t;
	auto o = t.default_options();
	o.handshake_timeout = 300ms;
	auto start = std::chrono::steady_clock::now();
	auto fut = std::async(std::launch::async,
			      [&] { return Introspection::connect(t.g.vm(), o); });
	/* Accept the connection and say nothing. */
	FileDesc conn = t.listener.accept(5000ms);
	TEST_ASSERT(fut.wait_for(5s) == std::future_status::ready, "connect() hangs");
	try {
		fut.get();
		fail(__FILE__, __LINE__, "connect succeeded without a handshake answer");
	} catch (const Error &e) {
		TEST_ASSERT(e.err() == ETIMEDOUT, "%s", e.what());
	}
	auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
			  std::chrono::steady_clock::now() - start)
			  .count();
	TEST_ASSERT(ms >= 250 && ms < 4000, "connect took %lld ms", (long long)ms);
}

/*
 * A VMM shutting down must not wait out the handshake timeout: stop
 * requested on IntrospectionOptions::stop ends connect() with ECANCELED.
 */
VK_TEST(connect_is_cancelled_by_stop_token)
{
	KvmiTest t;
	auto o = t.default_options();
	o.handshake_timeout = 20000ms;
	std::stop_source src;
	o.stop = src.get_token();
	auto fut = std::async(std::launch::async,
			      [&] { return Introspection::connect(t.g.vm(), o); });
	/* Accept the connection and say nothing; then stop. */
	FileDesc conn = t.listener.accept(5000ms);
	std::this_thread::sleep_for(100ms);
	TEST_ASSERT(fut.wait_for(0ms) == std::future_status::timeout, "connect() returned early");
	auto start = std::chrono::steady_clock::now();
	src.request_stop();
	TEST_ASSERT(fut.wait_for(5s) == std::future_status::ready, "connect() ignores the stop");
	auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
			  std::chrono::steady_clock::now() - start)
			  .count();
	TEST_ASSERT(ms < 1000, "connect took %lld ms after the stop", (long long)ms);
	TEST_EXPECT_ERROR(fut.get(), ECANCELED);
	/* Stopped before it starts: nothing is even connected. */
	TEST_EXPECT_ERROR(Introspection::connect(t.g.vm(), o), ECANCELED);
	/* Nothing was left behind: a connect without the stop works. */
	t.attach();
	TEST_ASSERT(t.vmm->connected());
}

VK_TEST(connect_without_tool_fails)
{
	KvmiTest t;
	auto o = t.default_options();
	o.address = "unix:" + t.dir.path() + "/nobody.sock";
	try {
		Introspection::connect(t.g.vm(), o);
		fail(__FILE__, __LINE__, "connected to nobody");
	} catch (const Error &e) {
		TEST_ASSERT(e.err() == ENOENT || e.err() == ECONNREFUSED, "%s", e.what());
	}
	o.address = "tcp:1.2.3.4";
	TEST_EXPECT_ERROR(Introspection::connect(t.g.vm(), o), EINVAL);
	o = t.default_options();
	o.name = std::string(64, 'x');
	TEST_EXPECT_ERROR(Introspection::connect(t.g.vm(), o), EINVAL);
	o = t.default_options();
	o.allowed_commands = std::vector<std::uint16_t>{KVMI_GET_GUEST_INFO, 30};
	TEST_EXPECT_ERROR(Introspection::connect(t.g.vm(), o), EINVAL);
	o = t.default_options();
	o.allowed_events = std::vector<std::uint16_t>{KVMI_EVENT_PF, 200};
	TEST_EXPECT_ERROR(Introspection::connect(t.g.vm(), o), EINVAL);
	o = t.default_options();
	o.reply_poll = std::chrono::microseconds(-1);
	TEST_EXPECT_ERROR(Introspection::connect(t.g.vm(), o), EINVAL);
	o.reply_poll = std::chrono::microseconds(1000001);
	TEST_EXPECT_ERROR(Introspection::connect(t.g.vm(), o), EINVAL);
	/* None of it left anything behind: a good connect works. */
	t.attach();
	TEST_ASSERT(t.vmm->connected());
}

/* --- VM commands --- */

VK_TEST(version_and_supported_commands_and_events)
{
	KvmiTest t;
	t.attach();
	auto v = t.t().get_version();
	TEST_ASSERT_EQ(v.version, (std::uint32_t)KVMI_VERSION);
	TEST_ASSERT(v.spp, "the SPP feature must be offered");
	TEST_ASSERT(!v.vmfunc && !v.eptp && !v.ve);

	auto cmds = Introspection::supported_commands();
	const std::uint16_t required[] = {
		KVMI_GET_VERSION, KVMI_CHECK_COMMAND, KVMI_CHECK_EVENT, KVMI_GET_GUEST_INFO,
		KVMI_GET_VCPU_INFO, KVMI_PAUSE_VCPU, KVMI_CONTROL_VM_EVENTS, KVMI_CONTROL_EVENTS,
		KVMI_CONTROL_MSR, KVMI_GET_REGISTERS, KVMI_SET_REGISTERS, KVMI_GET_CPUID,
		KVMI_GET_XSAVE, KVMI_VCPU_SET_XSAVE, KVMI_VCPU_GET_XCR, KVMI_READ_PHYSICAL,
		KVMI_WRITE_PHYSICAL, KVMI_INJECT_EXCEPTION, KVMI_SET_PAGE_ACCESS,
		KVMI_CONTROL_SPP, KVMI_SET_PAGE_WRITE_BITMAP, KVMI_GET_MTRR_TYPE,
		KVMI_GET_MAX_GFN, KVMI_VCPU_TRANSLATE_GVA, KVMI_QUERY_PHYSICAL,
		KVMI_VCPU_CONTROL_SINGLESTEP, KVMI_CONTROL_CMD_RESPONSE,
	};
	for (auto id : required)
		TEST_ASSERT(std::count(cmds.begin(), cmds.end(), id) == 1, "%s not supported",
			    intro::command_name(id).c_str());
	for (std::uint16_t id = 0; id < 80; id++) {
		int err = t.t().check_command(id);
		bool sup = std::count(cmds.begin(), cmds.end(), id) > 0;
		if (sup)
			TEST_ASSERT(err == 0, "CHECK_COMMAND(%s): %d", intro::command_name(id).c_str(),
				    err);
		else
			TEST_ASSERT(err != 0, "CHECK_COMMAND(%s) accepted an unsupported command",
				    intro::command_name(id).c_str());
	}
	/* What this backend cannot provide answers "not supported". */
	for (auto id : {KVMI_CONTROL_CR, KVMI_CONTROL_VE, KVMI_GET_PAGE_ACCESS,
			KVMI_SWITCH_EPT_VIEW, KVMI_CREATE_EPT_VIEW})
		TEST_ASSERT(std::count(cmds.begin(), cmds.end(), id) == 0, "%s claimed",
			    intro::command_name(id).c_str());
	TEST_ASSERT(t.t().check_command(200) != 0);

	auto evs = Introspection::supported_events();
	for (auto id : {KVMI_EVENT_UNHOOK, KVMI_EVENT_MSR, KVMI_EVENT_PF, KVMI_EVENT_TRAP,
			KVMI_EVENT_CREATE_VCPU, KVMI_EVENT_PAUSE_VCPU})
		TEST_ASSERT(std::count(evs.begin(), evs.end(), id) == 1, "event %d not supported",
			    id);
	for (auto id : {KVMI_EVENT_UNHOOK, KVMI_EVENT_MSR, KVMI_EVENT_PF, KVMI_EVENT_TRAP,
			KVMI_EVENT_CREATE_VCPU, KVMI_EVENT_PAUSE_VCPU})
		TEST_ASSERT_EQ(t.t().check_event(intro::EventId(id)), 0);
	for (auto id : {KVMI_EVENT_CR, KVMI_EVENT_XSETBV, KVMI_EVENT_DESCRIPTOR,
			KVMI_EVENT_HYPERCALL, KVMI_EVENT_CPUID}) {
		TEST_ASSERT(std::count(evs.begin(), evs.end(), id) == 0);
		TEST_ASSERT_EQ(t.t().check_event(intro::EventId(id)), EOPNOTSUPP);
	}
	TEST_ASSERT(t.t().check_event(intro::EventId(99)) != 0);
	TEST_ASSERT(t.vmm->stats().commands >= 80 + 12, "stats: %llu commands",
		    (unsigned long long)t.vmm->stats().commands);
}

VK_TEST(control_events_error_paths)
{
	KvmiTest t;
	t.add_vcpu(g_::wait_for, stop_gpa);
	t.attach();
	auto &s = t.t();
	/* Events this backend cannot raise, and the commands behind them. */
	EXPECT_KVMI_ERROR(s.control_events(0, intro::EventId::cr, true), KVMI_EOPNOTSUPP);
	EXPECT_KVMI_ERROR(s.control_events(0, intro::EventId::xsetbv, true), KVMI_EOPNOTSUPP);
	EXPECT_KVMI_ERROR(s.control_events(0, intro::EventId::descriptor, true), KVMI_EOPNOTSUPP);
	EXPECT_KVMI_ERROR(s.control_events(0, intro::EventId::hypercall, true), KVMI_EOPNOTSUPP);
	EXPECT_KVMI_ERROR(s.control_events(0, intro::EventId::cpuid, true), KVMI_EOPNOTSUPP);
	EXPECT_KVMI_ERROR(s.control_cr(0, 4, true), KVMI_EOPNOTSUPP);
	/* Unknown ids; VM events through CONTROL_EVENTS and vCPU events through CONTROL_VM_EVENTS. */
	EXPECT_KVMI_ERROR(s.control_events(0, intro::EventId(99), true), KVMI_EINVAL);
	EXPECT_KVMI_ERROR(s.control_events(0, intro::EventId::unhook, true), KVMI_EINVAL);
	EXPECT_KVMI_ERROR(s.control_vm_events(intro::EventId::pf, true), KVMI_EINVAL);
	EXPECT_KVMI_ERROR(s.control_vm_events(intro::EventId(99), true), KVMI_EINVAL);
	EXPECT_KVMI_ERROR(s.control_events(1, intro::EventId::pf, true), KVMI_EINVAL);
	/* enable must be 0 or 1. */
	kvmi_control_events ce{KVMI_EVENT_PF, 2, 0, 0};
	EXPECT_RAW_ERROR(s.request_raw(KVMI_CONTROL_EVENTS, bytes_of(vcpu_hdr(0), ce)), KVMI_EINVAL);
	kvmi_control_vm_events cve{KVMI_EVENT_UNHOOK, 2, 0, 0};
	EXPECT_RAW_ERROR(s.request_raw(KVMI_CONTROL_VM_EVENTS, bytes_of(cve)), KVMI_EINVAL);
	/* Wrong sizes: one byte short, one byte long. */
	auto p = bytes_of(vcpu_hdr(0), kvmi_control_events{KVMI_EVENT_PF, 1, 0, 0});
	p.pop_back();
	EXPECT_RAW_ERROR(s.request_raw(KVMI_CONTROL_EVENTS, p), KVMI_EINVAL);
	p.resize(p.size() + 2);
	EXPECT_RAW_ERROR(s.request_raw(KVMI_CONTROL_EVENTS, p), KVMI_EINVAL);
	/* And the valid ones work. */
	s.control_events(0, intro::EventId::pf, true);
	s.control_events(0, intro::EventId::pf, false);
	s.control_vm_events(intro::EventId::unhook, true);
	TEST_ASSERT(s.connected());
}

static void guest_idle(std::uint64_t stop) { g_::wait_for(stop); }

VK_TEST(guest_info_and_tsc_speed)
{
	KvmiTest t;
	for (int i = 0; i < 3; i++)
		t.add_vcpu(guest_idle, stop_gpa);
	t.attach();
	TEST_ASSERT_EQ(t.t().get_guest_info(), 3u);
	for (std::uint16_t i = 0; i < 3; i++) {
		long khz = ::ioctl(t.runner(i).vcpu().fd(), KVM_GET_TSC_KHZ);
		std::uint64_t hz = t.t().get_tsc_speed(i);
		if (khz > 0)
			TEST_ASSERT_EQ(hz, (std::uint64_t)khz * 1000);
		else
			TEST_ASSERT_EQ(hz, 0u);
	}
	EXPECT_KVMI_ERROR(t.t().get_tsc_speed(3), KVMI_EINVAL);
	EXPECT_KVMI_ERROR(t.t().get_tsc_speed(0xffff), KVMI_EINVAL);
}

static void guest_fill_page(std::uint64_t gva, std::uint64_t seed)
{
	for (std::uint64_t i = 0; i < 512; i++)
		g_::write64(gva + i * 8, seed * 0x100000001ull + i);
	GUEST_SYNC(1);
	/* Then read what the tool wrote into the next page. */
	std::uint64_t sum = 0, x = 0;
	for (std::uint64_t i = 0; i < 512; i++) {
		std::uint64_t v = g_::read64(gva + 4096 + i * 8);
		sum += v;
		x ^= v * (i + 1);
	}
	GUEST_SYNC(2, sum, x, g_::read64(gva + 4096), g_::read64(gva + 8192 - 8));
}

VK_TEST(read_write_physical_match_guest)
{
	KvmiTest t;
	const std::uint64_t page = data_gpa + 4096;
	auto &r = t.add_vcpu(guest_fill_page, page, 77);
	t.attach();
	r.run_sync(1);
	auto got = t.t().read_physical(page, 4096);
	for (std::uint64_t i = 0; i < 512; i++) {
		std::uint64_t v;
		std::memcpy(&v, got.data() + i * 8, 8);
		TEST_ASSERT_EQ(v, 77 * 0x100000001ull + i);
	}
	/* A read that crosses pages (the client splits it) equals the VMM's view. */
	auto cross = t.t().read_physical(page + 100, 6000);
	std::vector<std::byte> truth(6000);
	t.g.memory().read(page + 100, truth);
	TEST_ASSERT(cross == truth);

	auto w = pattern(4096, 1);
	t.t().write_physical(page + 4096, w);
	std::uint64_t sum = 0, x = 0;
	for (std::uint64_t i = 0; i < 512; i++) {
		std::uint64_t v;
		std::memcpy(&v, w.data() + i * 8, 8);
		sum += v;
		x ^= v * (i + 1);
	}
	auto a = r.run();
	TEST_ASSERT_EQ(a.args[0], 2u);
	TEST_ASSERT_EQ(a.args[1], sum);
	TEST_ASSERT_EQ(a.args[2], x);
	std::vector<std::byte> back(4096);
	t.g.memory().read(page + 4096, back);
	TEST_ASSERT(back == w);
	r.run_done();

	/* A write that crosses pages (the client splits it). */
	auto w2 = pattern(5000, 2);
	t.t().write_physical(page + 2 * 4096 - 100, w2);
	std::vector<std::byte> back2(5000);
	t.g.memory().read(page + 2 * 4096 - 100, back2);
	TEST_ASSERT(back2 == w2);
}

VK_TEST(read_write_physical_error_paths)
{
	KvmiTest t;
	t.attach();
	auto &s = t.t();
	auto rd = [&](std::uint64_t gpa, std::uint64_t size) {
		kvmi_read_physical c{gpa, size};
		return s.request_raw(KVMI_READ_PHYSICAL, bytes_of(c));
	};
	/* One page at most, never crossing a page, never empty. */
	auto ok = rd(data_gpa + 4000, 96);
	TEST_ASSERT_EQ(ok.err, 0);
	TEST_ASSERT_EQ(ok.data.size(), 96u);
	EXPECT_RAW_ERROR(rd(data_gpa + 4000, 97), KVMI_EINVAL);
	EXPECT_RAW_ERROR(rd(data_gpa, 4097), KVMI_EINVAL);
	EXPECT_RAW_ERROR(rd(data_gpa, 0), KVMI_EINVAL);
	EXPECT_RAW_ERROR(rd(data_gpa, ~0ull), KVMI_EINVAL);
	EXPECT_RAW_ERROR(rd(~0ull - 7, 8), KVMI_ENOENT);
	/* Outside guest RAM: ENOENT, as the kernel answers for a gpa without a memslot. */
	EXPECT_RAW_ERROR(rd(hole_gpa, 8), KVMI_ENOENT);
	EXPECT_RAW_ERROR(rd(data_gpa + data_size, 8), KVMI_ENOENT);
	/* Through the typed call too. */
	try {
		(void)s.read_physical(hole_gpa, 16);
		fail(__FILE__, __LINE__, "read_physical of a hole succeeded");
	} catch (const intro::CommandError &) {
	}
	/*
	 * A read running off the end of RAM: its page commands go out
	 * together; the refusal of the last one is thrown once every reply is
	 * read, and the session goes on in step.
	 */
	try {
		(void)s.read_physical(data_gpa + data_size - 3 * 4096 - 8, 4 * 4096);
		fail(__FILE__, __LINE__, "read_physical past the end of RAM succeeded");
	} catch (const intro::CommandError &e) {
		TEST_ASSERT(e.kvmi_error() == KVMI_ENOENT, "%s", e.what());
	}
	TEST_ASSERT(s.connected());
	TEST_ASSERT_EQ(s.read_physical(data_gpa, 8).size(), 8u);

	/* WRITE_PHYSICAL: size must match the data, one page at most. */
	t.poke(data_gpa + 4096 - 8, 0);
	auto wr = [&](std::uint64_t gpa, std::uint64_t size, std::size_t n) {
		kvmi_write_physical c{gpa, size};
		auto p = bytes_of(c);
		p.resize(p.size() + n, std::byte{0xee});
		return s.request_raw(KVMI_WRITE_PHYSICAL, p);
	};
	EXPECT_RAW_ERROR(wr(data_gpa + 4096 - 8, 16, 16), KVMI_EINVAL); /* crosses a page */
	EXPECT_RAW_ERROR(wr(data_gpa + 4096 - 8, 8, 16), KVMI_EINVAL);	/* size != data */
	EXPECT_RAW_ERROR(wr(data_gpa + 4096 - 8, 16, 8), KVMI_EINVAL);
	EXPECT_RAW_ERROR(wr(data_gpa, 0, 0), KVMI_EINVAL);
	EXPECT_RAW_ERROR(wr(hole_gpa, 8, 8), KVMI_ENOENT);
	EXPECT_RAW_ERROR(wr(data_gpa + data_size, 8, 8), KVMI_ENOENT);
	TEST_ASSERT_EQ(t.peek(data_gpa + 4096 - 8), 0u);
	TEST_ASSERT_EQ(t.peek(data_gpa + 4096), 0u);
	TEST_ASSERT_EQ(wr(data_gpa + 4096 - 8, 8, 8).err, 0);
	TEST_ASSERT_EQ(t.peek(data_gpa + 4096 - 8), 0xeeeeeeeeeeeeeeeeull);
	TEST_ASSERT(s.connected());
}

/* Present when a sanitizer's runtime is linked in (make check-asan, check-tsan). */
extern "C" void __asan_init() __attribute__((weak));
extern "C" void __tsan_init() __attribute__((weak));

VK_TEST(tool_read_physical_too_large_is_an_error)
{
	TEST_REQUIRE(!__asan_init && !__tsan_init,
		     "an allocator that fails a 1 TiB allocation (a sanitizer's allocator ends "
		     "the process instead)");
	KvmiTest t;
	t.attach();
	auto &s = t.t();
	try {
		(void)s.read_physical(data_gpa, std::size_t(1) << 40);
		fail(__FILE__, __LINE__, "a read of 1 TiB succeeded");
	} catch (const intro::CommandError &e) {
		fail(__FILE__, __LINE__, std::string("sent to the VMM: ") + e.what());
	} catch (const Error &e) {
		TEST_ASSERT(e.err() == ENOMEM, "%s", e.what());
	} catch (const std::exception &e) {
		fail(__FILE__, __LINE__, std::string("not a virtkit::Error: ") + e.what());
	}
	/* Nothing was sent: the session goes on. */
	TEST_ASSERT(s.connected());
	TEST_ASSERT_EQ(s.get_guest_info(), 0u);
}

/*
 * The VMM answers an unknown id with a reply of the same id; for id 1 that
 * reads as KVMI_EVENT. The tool refuses to send it rather than take the
 * reply for a malformed event and drop the session.
 */
VK_TEST(tool_refuses_raw_commands_with_event_ids)
{
	KvmiTest t;
	t.attach();
	auto &s = t.t();
	TEST_EXPECT_ERROR(s.request_raw(KVMI_EVENT, {}), EINVAL);
	TEST_EXPECT_ERROR(s.send_raw(KVMI_EVENT, {}), EINVAL);
	TEST_EXPECT_ERROR(s.request_raw(KVMI_EVENT_REPLY, {}), EINVAL);
	TEST_ASSERT(s.connected());
	TEST_ASSERT_EQ(s.get_version().version, (std::uint32_t)KVMI_VERSION);
	EXPECT_RAW_ERROR(s.request_raw(2000, {}), KVMI_ENOSYS);
}

VK_TEST(max_gfn_and_query_physical_match_regions)
{
	KvmiTest t;
	t.attach();
	auto &s = t.t();
	std::uint64_t end = 0;
	for (auto &r : t.g.memory().regions())
		end = std::max(end, r.gpa + r.size);
	std::uint64_t max_gfn = s.get_max_gfn();
	/* The last gfn of guest memory (kvmi's "maximum gfn"). */
	TEST_ASSERT_EQ(max_gfn, (end - 1) / 4096);
	/* A region added later moves it. */
	t.g.memory().add(0x100000000ull, 8 * 4096, {.name = "high"});
	TEST_ASSERT_EQ(s.get_max_gfn(), 0x100000000ull / 4096 + 7);
	for (auto &r : t.g.memory().regions()) {
		auto q = s.query_physical(r.gpa / 4096 + r.size / 4096 / 2);
		TEST_ASSERT_EQ(q.gfn, r.gpa / 4096);
		TEST_ASSERT_EQ(q.size, r.size);
	}
	auto q = s.query_physical(data_gpa / 4096 + data_pages - 1);
	TEST_ASSERT_EQ(q.gfn, data_gpa / 4096);
	TEST_ASSERT_EQ(q.size, data_size);
	/* Restricting a page carves memslots; the RAM range stays one. */
	intro::PageAccess pa{data_gpa + 3 * 4096, intro::access_r | intro::access_x};
	s.set_page_access(std::span(&pa, 1));
	q = s.query_physical(data_gpa / 4096 + 5);
	TEST_ASSERT_EQ(q.gfn, data_gpa / 4096);
	TEST_ASSERT_EQ(q.size, data_size);
	EXPECT_KVMI_ERROR(s.query_physical(hole_gpa / 4096), KVMI_ENOENT);
	EXPECT_KVMI_ERROR(s.query_physical(~0ull), KVMI_EINVAL); /* gfn * 4096 overflows */
}

/* --- vCPU commands --- */

VK_TEST(registers_of_a_paused_vcpu_and_set_registers)
{
	KvmiTest t;
	auto &r = t.add_vcpu(g_::spin_with_registers, stop_gpa, counter_gpa);
	t.attach();
	auto &s = t.t();
	s.control_events(0, intro::EventId::pause_vcpu, true);
	r.resume();
	TEST_ASSERT(wait_until([&] { return t.peek(counter_gpa) > 10; }, 5000ms), "guest not spinning");
	s.pause_vcpu(0);
	auto e = t.event(intro::EventId::pause_vcpu, 0);
	TEST_ASSERT_EQ(e.arch.regs.r12, g_::magic_r12);
	TEST_ASSERT_EQ(e.arch.regs.r13, g_::magic_r13);
	TEST_ASSERT_EQ(e.arch.mode, 8u);

	const std::uint32_t msrs[] = {0x174, 0xc0000080 /* EFER */, 0xc0000101 /* GS_BASE */};
	auto regs = s.get_registers(0, msrs);
	TEST_ASSERT_EQ(regs.mode, 8u);
	TEST_ASSERT_EQ(regs.regs.rip, e.arch.regs.rip);
	TEST_ASSERT_EQ(regs.regs.rsp, e.arch.regs.rsp);
	TEST_ASSERT_EQ(regs.regs.r14, e.arch.regs.r14);
	TEST_ASSERT_EQ(regs.regs.r12, g_::magic_r12);
	/* Against the VMM's own view of the vCPU. */
	auto truth = r.vcpu().regs();
	auto struth = r.vcpu().sregs();
	TEST_ASSERT_EQ(regs.regs.rip, truth.rip);
	TEST_ASSERT_EQ(regs.regs.r14, truth.r14);
	TEST_ASSERT_EQ(regs.sregs.cr3, struth.cr3);
	TEST_ASSERT_EQ(regs.sregs.cr3, t.g.page_tables().root());
	TEST_ASSERT_EQ(regs.sregs.cr0, struth.cr0);
	TEST_ASSERT_EQ(regs.sregs.efer, struth.efer);
	TEST_ASSERT_EQ(e.arch.sregs.cr3, struth.cr3);
	TEST_ASSERT_EQ(regs.msrs.size(), 3u);
	TEST_ASSERT_EQ(regs.msrs[0].index, 0x174u);
	TEST_ASSERT_EQ(regs.msrs[0].value, r.vcpu().msr(0x174));
	TEST_ASSERT_EQ(regs.msrs[1].index, 0xc0000080u);
	TEST_ASSERT_EQ(regs.msrs[1].value, struth.efer);
	TEST_ASSERT_EQ(regs.msrs[2].value, struth.gs.base);
	TEST_ASSERT_EQ(e.arch.msrs.efer, struth.efer);

	/* Frozen while paused: the counter and r14 do not move. */
	std::uint64_t c0 = t.peek(counter_gpa);
	std::this_thread::sleep_for(50ms);
	TEST_ASSERT_EQ(t.peek(counter_gpa), c0);
	TEST_ASSERT_EQ(s.get_registers(0).regs.r14, regs.regs.r14);

	/* SET_REGISTERS while the event waits: applied when the vCPU resumes. */
	kvm_regs nr = regs.regs;
	nr.r13 = 0x600d600d600d600dull;
	s.set_registers(0, nr);
	TEST_ASSERT_EQ(s.get_registers(0).regs.r13, 0x600d600d600d600dull);
	s.reply(e, intro::Action::continue_);
	TEST_ASSERT(wait_until([&] { return t.peek(counter_gpa) > c0 + 10; }, 5000ms),
		    "guest did not resume");
	stop_guest(s);
	auto uc = r.expect_sync(1);
	TEST_ASSERT_EQ(uc[1], 0x600d600d600d600dull);
	TEST_ASSERT(uc[2] > regs.regs.r14);
}

VK_TEST(registers_error_paths)
{
	KvmiTest t;
	t.add_vcpu(guest_idle, stop_gpa);
	t.attach();
	auto &s = t.t();
	EXPECT_KVMI_ERROR(s.get_registers(1), KVMI_EINVAL);
	const std::uint32_t bad_msr[] = {0x4000dead};
	EXPECT_KVMI_ERROR(s.get_registers(0, bad_msr), KVMI_EINVAL);
	/* nmsrs larger than the indexes sent. */
	kvmi_get_registers gr{};
	gr.nmsrs = 2;
	std::uint32_t one = 0x174;
	EXPECT_RAW_ERROR(s.request_raw(KVMI_GET_REGISTERS, bytes_of(vcpu_hdr(0), gr, one)),
			 KVMI_EINVAL);
	gr.nmsrs = 0;
	gr.padding1 = 1;
	EXPECT_RAW_ERROR(s.request_raw(KVMI_GET_REGISTERS, bytes_of(vcpu_hdr(0), gr)), KVMI_EINVAL);
	/* Non-zero padding in the vCPU header. */
	auto h = vcpu_hdr(0);
	h.padding2 = 1;
	EXPECT_RAW_ERROR(s.request_raw(KVMI_GET_REGISTERS, bytes_of(h, kvmi_get_registers{})),
			 KVMI_EINVAL);
	/* SET_REGISTERS: exactly a kvm_regs. */
	kvm_regs regs{};
	auto p = bytes_of(vcpu_hdr(0), regs);
	p.pop_back();
	EXPECT_RAW_ERROR(s.request_raw(KVMI_SET_REGISTERS, p), KVMI_EINVAL);
	EXPECT_KVMI_ERROR(s.set_registers(4, regs), KVMI_EINVAL);
	/* Only during an event (the kvmi rule). */
	EXPECT_KVMI_ERROR(s.set_registers(0, regs), KVMI_EOPNOTSUPP);
	/* More MSRs than one reply can carry. */
	std::vector<std::uint32_t> many(482, 0x174);
	TEST_EXPECT_ERROR(s.get_registers(0, many), E2BIG); /* the client's own check */
	kvmi_get_registers big{};
	big.nmsrs = 482;
	auto bp = bytes_of(vcpu_hdr(0), big);
	for (auto m : many) {
		auto mb = bytes_of(m);
		bp.insert(bp.end(), mb.begin(), mb.end());
	}
	EXPECT_RAW_ERROR(s.request_raw(KVMI_GET_REGISTERS, bp), KVMI_E2BIG);
	many.resize(481);
	TEST_ASSERT_EQ(s.get_registers(0, many).msrs.size(), 481u);
	/* No vCPU header at all. */
	EXPECT_RAW_ERROR(s.request_raw(KVMI_GET_REGISTERS, {}), KVMI_EINVAL);
	TEST_ASSERT(s.connected());
}

static const std::uint32_t cpuid_leaves[][2] = {
	{0, 0}, {1, 0}, {7, 0}, {0xd, 0}, {0xd, 1}, {0x80000000, 0}, {0x80000001, 0}, {0x80000008, 0},
};

static void guest_cpuid(void)
{
	for (auto &l : cpuid_leaves) {
		std::uint32_t r[4];
		g_::cpuid(l[0], l[1], r);
		GUEST_SYNC(l[0], l[1], r[0], r[1], r[2], r[3]);
	}
}

VK_TEST(cpuid_matches_guest_instruction)
{
	KvmiTest t;
	auto &r = t.add_vcpu(guest_cpuid);
	/* Leaves the vCPU's CPUID lacks (a CPU model without leaf 7): ENOENT. */
	const auto vcpu_cpuid = r.vcpu().cpuid();
	auto listed = [&](std::uint32_t fn, std::uint32_t index) {
		for (auto &e : vcpu_cpuid)
			if (e.function == fn &&
			    (e.index == index || !(e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX)))
				return true;
		return false;
	};
	t.attach();
	for (auto &l : cpuid_leaves) {
		auto uc = r.run();
		TEST_ASSERT_EQ(uc.args[0], l[0]);
		if (!listed(l[0], l[1])) {
			vkt::diag("leaf 0x%x.%u: not in the vCPU's CPUID", l[0], l[1]);
			EXPECT_KVMI_ERROR(t.t().get_cpuid(0, l[0], l[1]), KVMI_ENOENT);
			continue;
		}
		auto c = t.t().get_cpuid(0, l[0], l[1]);
		TEST_ASSERT(c.eax == uc.args[2] && c.ebx == uc.args[3] && c.ecx == uc.args[4] &&
				    c.edx == uc.args[5],
			    "leaf 0x%x.%u: tool %08x %08x %08x %08x, guest %08llx %08llx %08llx %08llx",
			    l[0], l[1], c.eax, c.ebx, c.ecx, c.edx, (unsigned long long)uc.args[2],
			    (unsigned long long)uc.args[3], (unsigned long long)uc.args[4],
			    (unsigned long long)uc.args[5]);
	}
	r.run_done();
	EXPECT_KVMI_ERROR(t.t().get_cpuid(0, 0x4fffff00), KVMI_ENOENT);
	EXPECT_KVMI_ERROR(t.t().get_cpuid(2, 0), KVMI_EINVAL);
}

/* The host set CR4.OSXSAVE and XCR0 (KVM_SET_XCRS): the guest reads XCR0. */
static void guest_xcr(void)
{
	GUEST_SYNC(1, g_::xgetbv(0));
}

VK_TEST(xsave_and_xcr_match_vcpu)
{
	KvmiTest t;
	auto &r = t.add_vcpu(guest_xcr);
	bool has_xsave = false;
	for (auto &e : r.vcpu().cpuid())
		if (e.function == 1)
			has_xsave = e.ecx & (1u << 26);
	TEST_REQUIRE(has_xsave, "XSAVE in the guest's CPUID");
	/* Some KVMs send XGETBV to their emulator, which cannot run it (kvm_pvm). */
	TEST_REQUIRE_PROBE(platform::guest_xgetbv(vkt::kvm()), "XGETBV running in a guest");
	/*
	 * XCR0 = x87 | SSE, set by the host: a guest XSETBV is not intercepted
	 * on every host (QEMU's nested SVM), and then KVM would not know it.
	 */
	auto sr = r.vcpu().sregs();
	sr.cr4 |= 1ull << 18; /* OSXSAVE */
	r.vcpu().set_sregs(sr);
	kvm_xcrs xcrs{};
	xcrs.nr_xcrs = 1;
	xcrs.xcrs[0].xcr = 0;
	xcrs.xcrs[0].value = 3;
	TEST_ASSERT(::ioctl(r.vcpu().fd(), KVM_SET_XCRS, &xcrs) == 0, "KVM_SET_XCRS: %m");
	t.attach();
	auto &s = t.t();
	auto uc = r.run();
	TEST_ASSERT_EQ(uc.args[1], 3u);
	TEST_ASSERT_EQ(s.get_xcr(0, 0), 3u);
	EXPECT_KVMI_ERROR(s.get_xcr(0, 1), KVMI_EINVAL);
	EXPECT_KVMI_ERROR(s.get_xcr(1, 0), KVMI_EINVAL);

	auto xs = s.get_xsave(0);
	auto truth = r.vcpu().xsave();
	TEST_ASSERT(xs.size() >= 512 + 64, "xsave of %zu bytes", xs.size());
	TEST_ASSERT(xs.size() <= truth.region.size() * 4);
	TEST_ASSERT(std::memcmp(xs.data(), truth.region.data(), xs.size()) == 0,
		    "GET_XSAVE differs from KVM_GET_XSAVE");
	/* MXCSR (offset 24): round toward zero, all exceptions masked. */
	std::uint32_t mxcsr = 0x7f80;
	std::memcpy(xs.data() + 24, &mxcsr, 4);
	s.set_xsave(0, xs);
	truth = r.vcpu().xsave();
	std::uint32_t got;
	std::memcpy(&got, reinterpret_cast<std::byte *>(truth.region.data()) + 24, 4);
	TEST_ASSERT_EQ(got, 0x7f80u);
	auto again = s.get_xsave(0);
	TEST_ASSERT(again == xs);
	/* Too small to be an XSAVE area. */
	EXPECT_KVMI_ERROR(s.set_xsave(0, std::span(xs.data(), 100)), KVMI_EINVAL);
	/* MXCSR reserved bits: KVM refuses, nothing changes. */
	mxcsr = 0xffffffff;
	std::memcpy(xs.data() + 24, &mxcsr, 4);
	try {
		s.set_xsave(0, xs);
	} catch (const intro::CommandError &) {
	}
	TEST_ASSERT(s.get_xsave(0) == again);
	r.run_done();
}

VK_TEST(mtrr_type_follows_vcpu_mtrrs)
{
	KvmiTest t;
	auto &r = t.add_vcpu(guest_idle, stop_gpa);
	t.attach();
	auto &s = t.t();
	Vcpu &v = r.vcpu();
	/* MTRRs disabled: UC, as KVM answers when the guest's CPUID has MTRR. */
	auto cpuid = v.cpuid();
	bool has_mtrr = false;
	for (auto &e : cpuid)
		if (e.function == 1 && e.index == 0)
			has_mtrr = e.edx >> 12 & 1;
	TEST_ASSERT(has_mtrr, "the guest's CPUID has no MTRR");
	v.set_msr(0x2ff, 6 /* WB, but E clear */);
	TEST_ASSERT_EQ(s.get_mtrr_type(0, 0x1000), 0u);
	/* Enabled, default UC; variable range 0: the data region WC; fixed: off. */
	std::uint32_t phys_bits = 36;
	for (auto &e : v.cpuid())
		if (e.function == 0x80000008)
			phys_bits = e.eax & 0xff;
	std::uint64_t phys_mask = (1ull << phys_bits) - 1;
	v.set_msr(0x200, data_gpa | 1 /* WC */);
	v.set_msr(0x201, (~(data_size - 1) & phys_mask) | (1ull << 11));
	v.set_msr(0x2ff, (1ull << 11) | 0 /* UC */);
	TEST_ASSERT_EQ(s.get_mtrr_type(0, data_gpa + 0x2345), 1u);
	TEST_ASSERT_EQ(s.get_mtrr_type(0, 0x1000), 0u);
	v.set_msr(0x2ff, (1ull << 11) | 6);
	TEST_ASSERT_EQ(s.get_mtrr_type(0, 0x1000), 6u);
	TEST_ASSERT_EQ(s.get_mtrr_type(0, data_gpa), 1u);
	EXPECT_KVMI_ERROR(s.get_mtrr_type(1, 0), KVMI_EINVAL);
	/*
	 * Without MTRR in CPUID the firmware never enables them: disabled is
	 * WB. Some hosts (kvm_pvm) keep MTRR in the guest's CPUID whatever
	 * KVM_SET_CPUID2 says: the answer follows what the vCPU really has
	 * (the unit test covers the WB case everywhere).
	 */
	for (auto &e : cpuid)
		if (e.function == 1 && e.index == 0)
			e.edx &= ~(1u << 12);
	v.set_cpuid(cpuid);
	v.set_msr(0x2ff, 0);
	has_mtrr = false;
	for (auto &e : v.cpuid())
		if (e.function == 1 && e.index == 0)
			has_mtrr = e.edx >> 12 & 1;
	if (has_mtrr)
		diag("this host keeps MTRR in the guest's CPUID: disabled MTRRs stay UC");
	TEST_ASSERT_EQ(s.get_mtrr_type(0, 0x1000), has_mtrr ? 0u : 6u);
}

VK_TEST(translate_gva_matches_page_tables)
{
	KvmiTest t;
	t.add_vcpu(guest_idle, stop_gpa);
	std::uint64_t gva = t.g.alloc_vaddr(3 * 4096);
	t.attach();
	auto &s = t.t();
	for (std::uint64_t off : {0ull, 0x123ull, 4096 + 8ull, 2 * 4096 + 4095ull}) {
		auto want = t.g.gva_to_gpa(gva + off);
		TEST_ASSERT(want.has_value());
		TEST_ASSERT(*want != gva + off, "alloc_vaddr was identity-mapped");
		TEST_ASSERT_EQ(s.translate_gva(0, gva + off), *want);
	}
	TEST_ASSERT_EQ(s.translate_gva(0, data_gpa + 0x42), data_gpa + 0x42);
	/* Not mapped: the protocol's "invalid" (all ones) or an error. */
	try {
		std::uint64_t gpa = s.translate_gva(0, 0x40000000000ull);
		TEST_ASSERT_EQ(gpa, ~0ull);
	} catch (const intro::CommandError &e) {
		diag("unmapped gva: %s", e.what());
	}
	EXPECT_KVMI_ERROR(s.translate_gva(1, gva), KVMI_EINVAL);
}

/* --- the VMM's policy --- */

VK_TEST(policy_forbids_commands_and_events)
{
	KvmiTest t;
	t.add_vcpu(guest_idle, stop_gpa);
	auto o = t.default_options();
	auto cmds = Introspection::supported_commands();
	std::erase(cmds, (std::uint16_t)KVMI_WRITE_PHYSICAL);
	std::erase(cmds, (std::uint16_t)KVMI_SET_REGISTERS);
	o.allowed_commands = cmds;
	auto evs = Introspection::supported_events();
	std::erase(evs, (std::uint16_t)KVMI_EVENT_MSR);
	std::erase(evs, (std::uint16_t)KVMI_EVENT_PAUSE_VCPU);
	o.allowed_events = evs;
	t.attach(o);
	auto &s = t.t();
	TEST_ASSERT_EQ(s.check_command(KVMI_WRITE_PHYSICAL), EPERM);
	TEST_ASSERT_EQ(s.check_command(KVMI_SET_REGISTERS), EPERM);
	TEST_ASSERT_EQ(s.check_command(KVMI_READ_PHYSICAL), 0);
	TEST_ASSERT_EQ(s.check_event(intro::EventId::msr), EPERM);
	TEST_ASSERT_EQ(s.check_event(intro::EventId::pf), 0);
	std::uint64_t v = 42;
	t.poke(data_gpa + 64, 7);
	EXPECT_KVMI_ERROR(s.write_physical(data_gpa + 64, std::as_bytes(std::span(&v, 1))),
			  KVMI_EPERM);
	TEST_ASSERT_EQ(t.peek(data_gpa + 64), 7u);
	EXPECT_KVMI_ERROR(s.set_registers(0, kvm_regs{}), KVMI_EPERM);
	EXPECT_KVMI_ERROR(s.control_events(0, intro::EventId::msr, true), KVMI_EPERM);
	EXPECT_KVMI_ERROR(s.control_msr(0, 0x174, true), KVMI_EPERM);
	TEST_ASSERT_EQ(s.check_event(intro::EventId::pause_vcpu), EPERM);
	EXPECT_KVMI_ERROR(s.pause_vcpu(0), KVMI_EPERM);
	/* What is allowed still works. */
	TEST_ASSERT_EQ(from_bytes<std::uint64_t>(s.read_physical(data_gpa + 64, 8)), 7u);
	s.control_events(0, intro::EventId::pf, true);
	TEST_ASSERT_EQ(s.get_version().version, (std::uint32_t)KVMI_VERSION);
}

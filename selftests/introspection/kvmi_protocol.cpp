// SPDX-License-Identifier: MIT
/*
 * KVMI protocol behaviour around events: replies in order while an event
 * waits, the tool or the VMM disconnecting while vCPUs wait in events, and
 * batched commands (CONTROL_CMD_RESPONSE).
 */
#include "guest_code.hpp"
#include "kvmi_util.hpp"

#include <linux/virtkit_kvmi.h>

#include <set>

using namespace virtkit;
using namespace virtkit::x86;
using namespace vkt;
namespace g_ = kvmi_guest;

static constexpr std::uint64_t stop_gpa = data_gpa;
static constexpr std::uint64_t page_a = data_gpa + 4 * 4096;
static constexpr std::uint32_t msr_sysenter_cs = 0x174;

static void guest_write_twice(std::uint64_t gva)
{
	g_::write64(gva, 0xa1);
	GUEST_SYNC(1, g_::read64(gva));
	g_::write64(gva + 8, 0xa2);
	GUEST_SYNC(2, g_::read64(gva + 8));
}

static void guest_msr_twice(void)
{
	guest_wrmsr(msr_sysenter_cs, 0x51);
	GUEST_SYNC(1, guest_rdmsr(msr_sysenter_cs));
	guest_wrmsr(msr_sysenter_cs, 0x52);
	GUEST_SYNC(2, guest_rdmsr(msr_sysenter_cs));
}

static void restrict_page(intro::Session &s, std::uint64_t gpa)
{
	intro::PageAccess ro{gpa, intro::access_r | intro::access_x};
	s.set_page_access(std::span(&ro, 1));
}

VK_TEST(replies_in_order_while_event_waits)
{
	KvmiTest t;
	auto &r = t.add_vcpu(guest_write_twice, page_a);
	t.attach();
	auto &s = t.t();
	s.control_events(0, intro::EventId::pf, true);
	restrict_page(s, page_a);
	r.resume();
	auto e = t.event(intro::EventId::pf, 0);

	/* Several commands in flight at once, then their replies. */
	kvmi_read_physical rp{page_a, 16};
	kvmi_get_registers gr{};
	kvmi_check_event ce{};
	ce.id = KVMI_EVENT_PF;
	struct Sent {
		std::uint16_t id;
		std::uint32_t seq;
	};
	std::vector<Sent> sent;
	auto send = [&](std::uint16_t id, const std::vector<std::byte> &p) {
		sent.push_back({id, s.send_raw(id, p)});
	};
	send(KVMI_GET_VERSION, {});
	send(KVMI_GET_REGISTERS, bytes_of(vcpu_hdr(0), gr));
	send(KVMI_READ_PHYSICAL, bytes_of(rp));
	send(200, {});
	send(KVMI_GET_GUEST_INFO, {});
	send(KVMI_CHECK_EVENT, bytes_of(ce));
	for (int i = 0; i < 20; i++)
		send(KVMI_GET_VCPU_INFO, bytes_of(vcpu_hdr(0)));
	std::set<std::uint32_t> seqs;
	for (auto &x : sent)
		TEST_ASSERT(seqs.insert(x.seq).second);

	/* receive_raw() takes them strictly in order: anything else is EPROTO. */
	auto ver = s.receive_raw(sent[0].id, sent[0].seq);
	TEST_ASSERT_EQ(ver.err, 0);
	TEST_ASSERT_EQ(from_bytes<kvmi_get_version_reply>(ver.data).version, (unsigned)KVMI_VERSION);
	auto regs = s.receive_raw(sent[1].id, sent[1].seq);
	TEST_ASSERT_EQ(regs.err, 0);
	auto rr = from_bytes<kvmi_get_registers_reply>(regs.data);
	TEST_ASSERT_EQ(rr.regs.rip, e.arch.regs.rip);
	auto mem = s.receive_raw(sent[2].id, sent[2].seq);
	TEST_ASSERT_EQ(mem.err, 0);
	TEST_ASSERT_EQ(from_bytes<std::uint64_t>(mem.data), 0u); /* the write waits */
	TEST_ASSERT_EQ(s.receive_raw(sent[3].id, sent[3].seq).err, -KVMI_ENOSYS);
	auto gi = s.receive_raw(sent[4].id, sent[4].seq);
	TEST_ASSERT_EQ(from_bytes<kvmi_get_guest_info_reply>(gi.data).vcpu_count, 1u);
	TEST_ASSERT_EQ(s.receive_raw(sent[5].id, sent[5].seq).err, 0);
	for (std::size_t i = 6; i < sent.size(); i++)
		TEST_ASSERT_EQ(s.receive_raw(sent[i].id, sent[i].seq).err, 0);
	TEST_ASSERT(s.connected());

	s.reply_pf(e, intro::Action::continue_);
	TEST_ASSERT_EQ(r.expect_sync(1)[1], 0xa1u);
	TEST_ASSERT_EQ(t.peek(page_a), 0xa1u);
}

VK_TEST(tool_disconnect_resumes_waiting_vcpus_and_undoes_everything)
{
	KvmiTest t;
	auto &w = t.add_vcpu(guest_write_twice, page_a);
	auto &m = t.add_vcpu(guest_msr_twice);
	t.attach();
	auto &s = t.t();
	for (std::uint16_t v = 0; v < 2; v++) {
		s.control_events(v, intro::EventId::pf, true);
		s.control_events(v, intro::EventId::msr, true);
		s.control_msr(v, msr_sysenter_cs, true);
	}
	restrict_page(s, page_a);
	w.resume();
	m.resume();
	std::set<std::uint16_t> waiting;
	for (int i = 0; i < 2; i++) {
		auto e = t.event();
		TEST_ASSERT(e.id == (e.vcpu == 0 ? intro::EventId::pf : intro::EventId::msr), "%s",
			    intro::describe(e).c_str());
		waiting.insert(e.vcpu);
	}
	TEST_ASSERT_EQ(waiting.size(), 2u);
	TEST_ASSERT(w.running() && m.running());
	TEST_ASSERT_EQ(t.peek(page_a), 0u);

	s.close();
	TEST_ASSERT(t.vmm->wait_disconnected(5000ms), "the VMM did not notice the close");
	TEST_ASSERT(!t.vmm->connected());
	/* Both resume as if CONTINUE: the write and the MSR write land. */
	TEST_ASSERT_EQ(w.expect_sync(1)[1], 0xa1u);
	TEST_ASSERT_EQ(m.expect_sync(1)[1], 0x51u);
	/* No restriction, no MSR interception left: the next writes just happen. */
	TEST_ASSERT_EQ(w.run_sync(2)[1], 0xa2u);
	TEST_ASSERT_EQ(m.run_sync(2)[1], 0x52u);
	TEST_ASSERT_EQ(t.peek(page_a + 8), 0xa2u);
	w.run_done();
	m.run_done();
	/* The VMM-side SPP engine has no protected page left. */
	if (auto *spp = SubpageProtection::of(t.g.vm()))
		TEST_ASSERT_EQ(spp->stats().protected_pages, 0u);
}

VK_TEST(vmm_disconnect_resumes_waiting_vcpu)
{
	KvmiTest t;
	auto &w = t.add_vcpu(guest_write_twice, page_a);
	t.attach();
	auto &s = t.t();
	s.control_events(0, intro::EventId::pf, true);
	restrict_page(s, page_a);
	w.resume();
	(void)t.event(intro::EventId::pf, 0);
	t.vmm->disconnect();
	TEST_ASSERT(!t.vmm->connected());
	TEST_ASSERT_EQ(w.expect_sync(1)[1], 0xa1u);
	TEST_ASSERT_EQ(w.run_sync(2)[1], 0xa2u);
	TEST_ASSERT(s.wait_closed(2000ms));
	/* A command on the closed session fails, nothing hangs. */
	try {
		(void)s.get_version();
		fail(__FILE__, __LINE__, "a command worked after the VMM disconnected");
	} catch (const Error &e) {
		TEST_ASSERT(!s.connected());
	}
	/* A new tool may connect afterwards. */
	t.tool.reset();
	t.vmm.reset();
	t.attach();
	TEST_ASSERT_EQ(t.t().get_guest_info(), 1u);
}

/* Write, read back; report a write that did not land. */
static void guest_write_and_check(std::uint64_t stop, std::uint64_t slot)
{
	for (std::uint64_t v = 1; !g_::read64(stop); v++) {
		g_::write64(slot, v);
		if (g_::read64(slot) != v)
			GUEST_SYNC(2, v, g_::read64(slot));
	}
	GUEST_SYNC(1);
}

/*
 * Disconnects while vCPUs write to a write-restricted page (PF events off:
 * every write traps and is allowed by the introspection's handler). A write
 * the SPP engine found blocked just before the disconnect lifted the
 * restriction must still be performed, as if the tool had replied CONTINUE.
 * Many disconnects, bounded by count, hit that window.
 */
VK_TEST(disconnect_while_writes_trap_loses_no_write)
{
	KvmiTest t;
	const unsigned n = 2;
	for (unsigned i = 0; i < n; i++)
		t.add_vcpu(guest_write_and_check, stop_gpa, page_a + 8 * i);
	for (unsigned i = 0; i < n; i++)
		t.runner(i).resume();
	auto slot = [&](unsigned i) { return t.peek(page_a + 8 * i); };
	for (int round = 0; round < 300; round++) {
		t.attach();
		restrict_page(t.t(), page_a);
		/* Both vCPUs trap on the page before the disconnect. */
		std::uint64_t from[n];
		for (unsigned i = 0; i < n; i++)
			from[i] = slot(i);
		for (unsigned i = 0; i < n; i++)
			if (!wait_until([&] { return slot(i) > from[i] + 20; }, 5000ms))
				t.runner(i).expect_sync(1, 0ms); /* says what the guest saw */
		t.vmm->disconnect();
		t.tool.reset();
		t.vmm.reset();
	}
	t.poke(stop_gpa, 1);
	for (unsigned i = 0; i < n; i++)
		t.runner(i).expect_sync(1);
}

VK_TEST(second_introspection_is_refused)
{
	KvmiTest t;
	t.attach();
	auto o = t.default_options();
	TEST_EXPECT_ERROR(Introspection::connect(t.g.vm(), o), EBUSY);
	TEST_ASSERT(t.vmm->connected());
	TEST_ASSERT_EQ(t.t().get_guest_info(), 0u);
}

/* --- batches --- */

VK_TEST(batch_applies_every_command)
{
	KvmiTest t;
	auto &w = t.add_vcpu(guest_write_twice, page_a);
	auto &m = t.add_vcpu(guest_msr_twice);
	t.attach();
	auto &s = t.t();
	intro::PageAccess ro{page_a, intro::access_r | intro::access_x};
	intro::Batch b(s);
	b.control_events(0, intro::EventId::pf, true)
		.set_page_access(std::span(&ro, 1))
		.control_events(1, intro::EventId::msr, true)
		.control_msr(1, msr_sysenter_cs, true);
	TEST_ASSERT_EQ(b.size(), 4u);
	b.commit();
	TEST_ASSERT_EQ(b.size(), 0u);
	w.resume();
	auto e = t.event(intro::EventId::pf, 0);
	TEST_ASSERT_EQ(e.get<intro::PfEvent>()->gpa, page_a);
	s.reply_pf(e, intro::Action::continue_);
	w.expect_sync(1);
	m.resume();
	e = t.event(intro::EventId::msr, 1);
	TEST_ASSERT_EQ(e.get<intro::MsrEvent>()->new_value, 0x51u);
	s.reply(e, intro::Action::continue_);
	TEST_ASSERT_EQ(m.expect_sync(1)[1], 0x51u);
	/* An uncommitted batch sends nothing. */
	{
		intro::Batch unused(s);
		unused.control_msr(1, msr_sysenter_cs, false);
	}
	m.resume();
	e = t.event(intro::EventId::msr, 1);
	s.reply(e, intro::Action::continue_);
	m.expect_sync(2);
	TEST_ASSERT(s.connected());
}

VK_TEST(batch_reports_first_error_without_rollback)
{
	KvmiTest t;
	auto &w = t.add_vcpu(guest_write_twice, page_a);
	t.attach();
	auto &s = t.t();
	intro::PageAccess ro{page_a, intro::access_r | intro::access_x};
	intro::Batch b(s);
	b.control_events(0, intro::EventId::pf, true)
		.raw(200, {})
		.control_events(7, intro::EventId::pf, true) /* a second error */
		.set_page_access(std::span(&ro, 1));
	try {
		b.commit();
		fail(__FILE__, __LINE__, "a batch with an unknown command succeeded");
	} catch (const intro::CommandError &e) {
		TEST_ASSERT_EQ(e.kvmi_error(), KVMI_ENOSYS);
	}
	TEST_ASSERT(s.connected());
	/* The commands after the failing one ran. */
	w.resume();
	auto e = t.event(intro::EventId::pf, 0);
	s.reply_pf(e, intro::Action::continue_);
	w.expect_sync(1);
	/* Replies are on again: ordinary commands are answered. */
	TEST_ASSERT_EQ(s.get_guest_info(), 1u);
}

VK_TEST(batch_without_wait_and_raw_cmd_response)
{
	KvmiTest t;
	t.add_vcpu(g_::wait_for, stop_gpa);
	t.attach();
	auto &s = t.t();
	std::uint64_t v = 0x1234;
	intro::Batch b(s);
	b.write_physical(page_a, std::as_bytes(std::span(&v, 1)));
	b.commit(false);
	/* The next command's reply is the next message: no stray reply. */
	TEST_ASSERT_EQ(s.get_guest_info(), 1u);
	TEST_ASSERT_EQ(t.peek(page_a), 0x1234u);

	/* By hand: replies off, two commands, replies on with now=1: one reply. */
	kvmi_control_cmd_response off{0, 1, 0, 0}, on{1, 1, 0, 0};
	kvmi_write_physical wp{page_a + 8, 8};
	std::uint64_t val = 0x5678;
	auto msg = message(KVMI_CONTROL_CMD_RESPONSE, 1000, bytes_of(off));
	auto m2 = message(KVMI_WRITE_PHYSICAL, 1001, bytes_of(wp, val));
	auto m3 = message(KVMI_GET_VERSION, 1002, {});
	s.send_bytes(msg);
	s.send_bytes(m2);
	s.send_bytes(m3);
	auto rep = s.request_raw(KVMI_CONTROL_CMD_RESPONSE, bytes_of(on));
	TEST_ASSERT_EQ(rep.err, 0);
	TEST_ASSERT_EQ(t.peek(page_a + 8), 0x5678u);
	TEST_ASSERT_EQ(s.get_guest_info(), 1u);
	/* Re-enabling without now: no reply to it either. */
	s.send_bytes(message(KVMI_CONTROL_CMD_RESPONSE, 1003, bytes_of(off)));
	on.now = 0;
	s.send_bytes(message(KVMI_CONTROL_CMD_RESPONSE, 1004, bytes_of(on)));
	TEST_ASSERT_EQ(s.get_guest_info(), 1u);
	/* Padding in it is refused like everywhere. */
	on.now = 1;
	on.padding2 = 1;
	EXPECT_RAW_ERROR(s.request_raw(KVMI_CONTROL_CMD_RESPONSE, bytes_of(on)), KVMI_EINVAL);
	TEST_ASSERT(s.connected());
	t.poke(stop_gpa, 1);
}

/* --- the event loop, serving two VMs: io_uring (or whatever the host
 * and VIRTKIT_EVENT_LOOP give), then epoll --- */

static void guest_write_many(std::uint64_t gva, std::uint64_t n)
{
	for (std::uint64_t i = 0; i < n; i++)
		g_::write64(gva + 8 * i, 0x100 + i);
	GUEST_SYNC(1, n);
}

static void event_loop_serves_two_vms(intro::LoopBackend backend)
{
	KvmiTest a, b;
	const std::uint64_t n = 8;
	auto &ra = a.add_vcpu(guest_write_many, page_a, n);
	auto &rb = b.add_vcpu(guest_write_many, page_a, n);
	unsigned sessions = 0, disconnects = 0, events = 0;
	std::set<std::string> names;
	intro::EventLoop loop({
		.on_session =
			[&](intro::Session &s) {
				sessions++;
				names.insert(s.info().name);
				s.control_events(0, intro::EventId::pf, true);
				intro::PageAccess ro{page_a, intro::access_r | intro::access_x};
				s.set_page_access(std::span(&ro, 1));
			},
		.on_event =
			[&](intro::Session &s, intro::Event &e) {
				TEST_ASSERT(e.id == intro::EventId::pf, "%s",
					    intro::describe(e).c_str());
				events++;
				s.reply_pf(e, intro::Action::continue_);
			},
		.on_disconnect = [&](intro::Session &) { disconnects++; },
		.on_error = [&](const Error &e) { fail(__FILE__, __LINE__, e.what()); },
	}, backend);
	diag("event loop: %s", loop.backend().c_str());
	/* Both VMs connect to A's socket. */
	loop.listen(std::move(a.listener), secret);
	auto oa = a.default_options(), ob = a.default_options();
	oa.name = "vm-a";
	ob.name = "vm-b";
	auto fa = std::async(std::launch::async, [&] { return Introspection::connect(a.g.vm(), oa); });
	auto fb = std::async(std::launch::async, [&] { return Introspection::connect(b.g.vm(), ob); });
	auto spin = [&](auto done, const char *what) {
		for (int i = 0; i < 200 && !done(); i++)
			loop.run_for(50ms);
		TEST_ASSERT(done(), "%s", what);
	};
	spin([&] { return sessions == 2; }, "the loop did not accept both VMs");
	TEST_ASSERT(fa.wait_for(5s) == std::future_status::ready);
	TEST_ASSERT(fb.wait_for(5s) == std::future_status::ready);
	a.vmm.emplace(fa.get());
	b.vmm.emplace(fb.get());
	TEST_ASSERT(names == (std::set<std::string>{"vm-a", "vm-b"}));
	TEST_ASSERT_EQ(loop.session_count(), 2u);

	ra.resume();
	rb.resume();
	std::optional<VcpuRunner::Result> da, db;
	spin([&] {
		if (!da)
			da = ra.try_wait(0ms);
		if (!db)
			db = rb.try_wait(0ms);
		return da && db;
	}, "the guests did not finish");
	ra.results_push_front(std::move(*da));
	rb.results_push_front(std::move(*db));
	TEST_ASSERT_EQ(ra.expect_sync(1)[1], n);
	TEST_ASSERT_EQ(rb.expect_sync(1)[1], n);
	/* Every write was one event (the page stays restricted) and landed. */
	TEST_ASSERT_EQ(events, 2 * n);
	for (std::uint64_t i = 0; i < n; i++) {
		TEST_ASSERT_EQ(a.peek(page_a + 8 * i), 0x100 + i);
		TEST_ASSERT_EQ(b.peek(page_a + 8 * i), 0x100 + i);
	}
	/* One VMM goes away: the loop notices, the other session stays. */
	a.vmm->disconnect();
	spin([&] { return disconnects == 1; }, "no on_disconnect");
	TEST_ASSERT_EQ(loop.session_count(), 1u);
	TEST_ASSERT(b.vmm->connected());
	b.vmm->disconnect();
	spin([&] { return disconnects == 2; }, "no second on_disconnect");
}

VK_TEST(event_loop_serves_two_vms)
{
	event_loop_serves_two_vms(intro::LoopBackend::automatic);
}

VK_TEST(event_loop_serves_two_vms_epoll)
{
	event_loop_serves_two_vms(intro::LoopBackend::epoll);
}

/* WRMSR in a loop, counting in memory. */
static void guest_wrmsr_loop(std::uint64_t stop, std::uint64_t counter)
{
	for (std::uint64_t v = 1; !g_::read64(stop); v++) {
		guest_wrmsr(msr_sysenter_cs, v & 0xffff);
		g_::write64(counter, v);
	}
	GUEST_SYNC(1);
}

/*
 * Disconnects while vCPUs write a controlled MSR (MSR events off: every
 * WRMSR is a filter exit the server completes). A filter exit already out
 * of KVM_RUN when the disconnect removes the filter and the server's exit
 * handler was caused by the introspection: it must be completed as the
 * guest's write, never reach the VMM. Many rounds, bounded by count.
 */
VK_TEST(disconnect_while_msr_writes_exit_leaks_no_msr_exit)
{
	KvmiTest t;
	const unsigned n = 2;
	const std::uint64_t counter_gpa = data_gpa + 8;
	for (unsigned i = 0; i < n; i++)
		t.add_vcpu(guest_wrmsr_loop, stop_gpa, counter_gpa + 8 * i);
	for (unsigned i = 0; i < n; i++)
		t.runner(i).resume();
	auto counter = [&](unsigned i) { return t.peek(counter_gpa + 8 * i); };
	for (int round = 0; round < 200; round++) {
		t.attach();
		auto &s = t.t();
		for (std::uint16_t i = 0; i < n; i++)
			s.control_msr(i, msr_sysenter_cs, true);
		for (unsigned i = 0; i < n; i++) {
			std::uint64_t from = counter(i);
			if (!wait_until([&] { return counter(i) > from + 20; }, 5000ms))
				t.runner(i).expect_sync(1, 0ms); /* says what the vCPU got */
		}
		t.vmm->disconnect();
		t.tool.reset();
		t.vmm.reset();
	}
	t.poke(stop_gpa, 1);
	for (unsigned i = 0; i < n; i++)
		t.runner(i).expect_sync(1);
}

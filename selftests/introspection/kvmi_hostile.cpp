// SPDX-License-Identifier: MIT
/*
 * Hostile input from the tool: broken framing, truncated messages, unknown
 * ids, non-zero padding in every struct family, bad event replies, absurd
 * counts, floods and half-invalid requests. The VMM answers with the
 * protocol's error or closes the connection - it never crashes, never
 * leaves a vCPU waiting and never applies half a request. Also the
 * handshake as a hand-made tool sees it, with answers of odd sizes.
 */
#include "guest_code.hpp"
#include "kvmi_util.hpp"
/* The handshake's SHA-1, for the hand-made tool below (libvirtkit-internal). */
#include "kvmi/protocol/handshake.hpp"

#include <linux/virtkit_kvmi.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

using namespace virtkit;
using namespace virtkit::x86;
using namespace vkt;
namespace g_ = kvmi_guest;

static constexpr std::uint64_t stop_gpa = data_gpa;
static constexpr std::uint64_t counter_gpa = data_gpa + 8;
static constexpr std::uint64_t page_a = data_gpa + 4 * 4096;
static constexpr std::uint64_t page_b = data_gpa + 5 * 4096;

static void guest_write_pages(std::uint64_t a, std::uint64_t b)
{
	g_::write64(a, 0xa1);
	GUEST_SYNC(1);
	g_::write64(b, 0xb1);
	GUEST_SYNC(2);
	g_::write64(a + 8, 0xa2);
	GUEST_SYNC(3);
}

/* The VMM closed the connection and cleaned up; its vCPUs are not stuck. */
static void expect_closed(KvmiTest &t)
{
	TEST_ASSERT(t.vmm->wait_disconnected(5000ms), "the VMM kept the connection");
	TEST_ASSERT(!t.vmm->connected());
	TEST_ASSERT(t.t().wait_closed(5000ms), "the tool's side did not see the close");
	TEST_ASSERT(t.vmm->stats().errors >= 1);
}

/* A PF event is waiting on vCPU 0 (guest_write_pages, page_a restricted). */
static intro::Event pf_waiting(KvmiTest &t)
{
	auto &s = t.t();
	s.control_events(0, intro::EventId::pf, true);
	intro::PageAccess ro{page_a, intro::access_r | intro::access_x};
	s.set_page_access(std::span(&ro, 1));
	t.runner(0).resume();
	return t.event(intro::EventId::pf, 0);
}

/* After the close: the waiting write landed, no restriction is left. */
static void expect_guest_completes(KvmiTest &t)
{
	auto &r = t.runner(0);
	r.expect_sync(1);
	TEST_ASSERT_EQ(t.peek(page_a), 0xa1u);
	r.run_sync(2);
	r.run_sync(3);
	TEST_ASSERT_EQ(t.peek(page_a + 8), 0xa2u);
	r.run_done();
}

VK_TEST(oversize_message_closes_connection)
{
	KvmiTest t;
	t.add_vcpu(guest_write_pages, page_a, page_b);
	t.attach();
	pf_waiting(t);
	kvmi_msg_hdr h{KVMI_GET_VERSION, (std::uint16_t)(KVMI_MSG_SIZE + 1), 77};
	t.t().send_bytes(bytes_of(h));
	expect_closed(t);
	expect_guest_completes(t);
}

/*
 * Replies the VMM batches (pipelined READ_PHYSICAL and friends) still all
 * reach the tool, in order, when a malformed message follows them in the
 * same write: the VMM sends what it answered before it closes.
 */
VK_TEST(pipelined_replies_arrive_before_a_malformed_message_closes)
{
	KvmiTest t;
	t.attach();
	for (std::uint64_t i = 0; i < 4; i++)
		t.poke(data_gpa + i * 4096, 0x1000 + i);
	std::vector<std::byte> wire;
	auto add = [&](const std::vector<std::byte> &m) { wire.insert(wire.end(), m.begin(), m.end()); };
	for (std::uint32_t i = 0; i < 4; i++) {
		kvmi_read_physical rp{data_gpa + i * 4096, 8};
		add(message(KVMI_READ_PHYSICAL, 101 + i, bytes_of(rp)));
	}
	kvmi_vcpu_hdr vh{};
	vh.vcpu = 7; /* no such vCPU: its own error, between batched replies */
	add(message(KVMI_GET_VCPU_INFO, 105, bytes_of(vh)));
	kvmi_read_physical hole{hole_gpa, 8};
	add(message(KVMI_READ_PHYSICAL, 106, bytes_of(hole)));
	kvmi_msg_hdr bad{KVMI_GET_VERSION, (std::uint16_t)(KVMI_MSG_SIZE + 1), 107};
	add(bytes_of(bad));
	t.t().send_bytes(wire);
	for (std::uint32_t i = 0; i < 4; i++) {
		auto r = t.t().receive_raw(KVMI_READ_PHYSICAL, 101 + i);
		TEST_ASSERT_EQ(r.err, 0);
		TEST_ASSERT_EQ(from_bytes<std::uint64_t>(r.data), 0x1000u + i);
	}
	EXPECT_RAW_ERROR(t.t().receive_raw(KVMI_GET_VCPU_INFO, 105), KVMI_EINVAL);
	EXPECT_RAW_ERROR(t.t().receive_raw(KVMI_READ_PHYSICAL, 106), KVMI_ENOENT);
	expect_closed(t);
}

VK_TEST(max_size_message_is_framed_correctly)
{
	KvmiTest t;
	t.attach();
	/* KVMI_MSG_SIZE bytes of a command that wants none: its own error, not a close. */
	std::vector<std::byte> big(KVMI_MSG_SIZE);
	EXPECT_RAW_ERROR(t.t().request_raw(KVMI_GET_VERSION, big), KVMI_EINVAL);
	std::vector<std::byte> big_unknown(KVMI_MSG_SIZE, std::byte{0xff});
	EXPECT_RAW_ERROR(t.t().request_raw(201, big_unknown), KVMI_ENOSYS);
	TEST_ASSERT_EQ(t.t().get_version().version, (std::uint32_t)KVMI_VERSION);
}

VK_TEST(truncated_message_then_close)
{
	KvmiTest t;
	t.add_vcpu(guest_write_pages, page_a, page_b);
	t.attach();
	pf_waiting(t);
	kvmi_read_physical rp{data_gpa, 8};
	auto m = message(KVMI_READ_PHYSICAL, 5, bytes_of(rp));
	m.resize(m.size() - 8);
	t.t().send_bytes(m);
	t.t().close();
	TEST_ASSERT(t.vmm->wait_disconnected(5000ms));
	expect_guest_completes(t);
}

VK_TEST(garbage_closes_connection)
{
	KvmiTest t;
	t.add_vcpu(guest_write_pages, page_a, page_b);
	t.attach();
	pf_waiting(t);
	std::vector<std::byte> junk(4000);
	std::uint32_t x = 12345;
	for (auto &b : junk) {
		x = x * 1103515245u + 12345u;
		b = std::byte(x >> 16);
	}
	/* An id that is an event reply with a seq nobody sent, and lots after it. */
	kvmi_msg_hdr h{KVMI_EVENT_REPLY, 0x3000, 0xdeadbeef};
	std::memcpy(junk.data(), &h, sizeof(h));
	t.t().send_bytes(junk);
	expect_closed(t);
	expect_guest_completes(t);
}

VK_TEST(unknown_ids_answer_enosys)
{
	KvmiTest t;
	t.attach();
	auto &s = t.t();
	for (std::uint16_t id : {30, 40, 45, 59, 62, 64, 100, 200, 0x7fff, 0xffff}) {
		EXPECT_RAW_ERROR(s.request_raw(id, {}), KVMI_ENOSYS);
		EXPECT_RAW_ERROR(s.request_raw(id, bytes_of(vcpu_hdr(0))), KVMI_ENOSYS);
	}
	TEST_ASSERT(s.connected());
	TEST_ASSERT_EQ(s.get_version().version, (std::uint32_t)KVMI_VERSION);
}

VK_TEST(nonzero_padding_in_every_struct_family)
{
	KvmiTest t;
	auto &r = t.add_vcpu(g_::wait_for, stop_gpa);
	t.attach();
	auto &s = t.t();
	struct Case {
		const char *what;
		std::uint16_t id;
		std::vector<std::byte> payload;
	};
	std::vector<Case> cases;
	auto vh1 = vcpu_hdr(0);
	vh1.padding1 = 1;
	auto vh2 = vcpu_hdr(0);
	vh2.padding2 = 0x100;
	cases.push_back({"vcpu_hdr.padding1", KVMI_GET_VCPU_INFO, bytes_of(vh1)});
	cases.push_back({"vcpu_hdr.padding2", KVMI_GET_VCPU_INFO, bytes_of(vh2)});
	kvmi_check_command cc{KVMI_GET_VERSION, 1, 0};
	cases.push_back({"check_command.padding1", KVMI_CHECK_COMMAND, bytes_of(cc)});
	cc = {KVMI_GET_VERSION, 0, 1};
	cases.push_back({"check_command.padding2", KVMI_CHECK_COMMAND, bytes_of(cc)});
	kvmi_check_event ce{KVMI_EVENT_PF, 0, 1};
	cases.push_back({"check_event.padding2", KVMI_CHECK_EVENT, bytes_of(ce)});
	kvmi_pause_vcpu pv{1, 1, 0, 0};
	cases.push_back({"pause_vcpu.padding1", KVMI_PAUSE_VCPU, bytes_of(vcpu_hdr(0), pv)});
	pv = {1, 0, 0, 1};
	cases.push_back({"pause_vcpu.padding3", KVMI_PAUSE_VCPU, bytes_of(vcpu_hdr(0), pv)});
	kvmi_control_vm_events cve{KVMI_EVENT_UNHOOK, 1, 1, 0};
	cases.push_back({"control_vm_events.padding1", KVMI_CONTROL_VM_EVENTS, bytes_of(cve)});
	kvmi_control_events cev{KVMI_EVENT_PF, 1, 0, 1};
	cases.push_back({"control_events.padding2", KVMI_CONTROL_EVENTS,
			 bytes_of(vcpu_hdr(0), cev)});
	kvmi_control_msr cm{1, 0, 1, 0x174};
	cases.push_back({"control_msr.padding2", KVMI_CONTROL_MSR, bytes_of(vcpu_hdr(0), cm)});
	kvmi_get_registers gr{};
	gr.padding2 = 1;
	cases.push_back({"get_registers.padding2", KVMI_GET_REGISTERS, bytes_of(vcpu_hdr(0), gr)});
	kvmi_inject_exception ie{UD_VECTOR, 0, 1, 0, 0};
	cases.push_back({"inject_exception.padding2", KVMI_INJECT_EXCEPTION,
			 bytes_of(vcpu_hdr(0), ie)});
	kvmi_set_page_access spa{0, 1, 1};
	kvmi_page_access_entry pae{page_a, KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X, 0, 0, 0};
	cases.push_back({"set_page_access.padding", KVMI_SET_PAGE_ACCESS, bytes_of(spa, pae)});
	spa.padding = 0;
	pae.padding3 = 1;
	cases.push_back({"page_access_entry.padding3", KVMI_SET_PAGE_ACCESS, bytes_of(spa, pae)});
	kvmi_control_spp cs{1, 0, 0, 1};
	cases.push_back({"control_spp.padding3", KVMI_CONTROL_SPP, bytes_of(cs)});
	kvmi_set_page_write_bitmap swb{0, 1, 0};
	kvmi_page_write_bitmap_entry wbe{page_a, 0, 1};
	cases.push_back({"page_write_bitmap_entry.padding", KVMI_SET_PAGE_WRITE_BITMAP,
			 bytes_of(swb, wbe)});
	kvmi_vcpu_get_xcr gx{};
	gx.padding[6] = 1;
	cases.push_back({"vcpu_get_xcr.padding", KVMI_VCPU_GET_XCR, bytes_of(vcpu_hdr(0), gx)});
	kvmi_vcpu_control_singlestep ss{};
	ss.padding[0] = 1;
	cases.push_back({"control_singlestep.padding", KVMI_VCPU_CONTROL_SINGLESTEP,
			 bytes_of(vcpu_hdr(0), ss)});
	kvmi_control_cmd_response cr{1, 1, 1, 0};
	cases.push_back({"control_cmd_response.padding1", KVMI_CONTROL_CMD_RESPONSE, bytes_of(cr)});

	for (auto &c : cases) {
		auto rep = s.request_raw(c.id, c.payload);
		TEST_ASSERT(rep.err == -KVMI_EINVAL, "%s: err %d", c.what, rep.err);
	}
	TEST_ASSERT(s.connected());
	/* Nothing of it took effect: the page is writable, no pause is pending. */
	t.poke(stop_gpa, 1);
	r.run_done();
	t.expect_no_event(50ms);
}

/* Event replies that do not match the waiting event close the connection. */
static void bad_event_reply(void (*mutate)(kvmi_msg_hdr &, kvmi_vcpu_hdr &, kvmi_event_reply &,
					   std::size_t &))
{
	KvmiTest t;
	t.add_vcpu(guest_write_pages, page_a, page_b);
	t.attach();
	auto e = pf_waiting(t);
	kvmi_vcpu_hdr vh = vcpu_hdr(e.vcpu);
	kvmi_event_reply er{KVMI_EVENT_ACTION_CONTINUE, KVMI_EVENT_PF, 0, 0};
	kvmi_event_pf_reply pf{};
	std::size_t pf_size = sizeof(pf);
	kvmi_msg_hdr h{KVMI_EVENT_REPLY, 0, e.seq};
	mutate(h, vh, er, pf_size);
	auto payload = bytes_of(vh, er, pf);
	payload.resize(sizeof(vh) + sizeof(er) + pf_size);
	h.size = static_cast<std::uint16_t>(payload.size());
	auto m = bytes_of(h);
	m.insert(m.end(), payload.begin(), payload.end());
	t.t().send_bytes(m);
	expect_closed(t);
	expect_guest_completes(t);
}

VK_TEST(event_reply_wrong_seq_closes)
{
	bad_event_reply([](kvmi_msg_hdr &h, kvmi_vcpu_hdr &, kvmi_event_reply &, std::size_t &) {
		h.seq += 1000;
	});
}

VK_TEST(event_reply_too_long_closes)
{
	bad_event_reply([](kvmi_msg_hdr &, kvmi_vcpu_hdr &, kvmi_event_reply &, std::size_t &n) {
		n += 8; /* more than kvmi_event_pf_reply: the kernel refuses it too */
	});
}

VK_TEST(event_reply_too_short_for_its_header_closes)
{
	bad_event_reply([](kvmi_msg_hdr &, kvmi_vcpu_hdr &, kvmi_event_reply &, std::size_t &n) {
		n = -std::size_t(4); /* cuts into kvmi_event_reply */
	});
}

VK_TEST(event_reply_wrong_vcpu_closes)
{
	bad_event_reply([](kvmi_msg_hdr &, kvmi_vcpu_hdr &v, kvmi_event_reply &, std::size_t &) {
		v.vcpu = 1;
	});
}

static void guest_msr_write(void)
{
	guest_wrmsr(0x174 /* SYSENTER_CS */, 0x51);
	GUEST_SYNC(1, guest_rdmsr(0x174));
}

/*
 * As the kernel: an event reply whose event-specific part is short is
 * zero-filled (libkvmi's kvmi_reply_event() sends the size its caller
 * passes), and kvmi_event_reply.event is not checked (seq names the event).
 */
VK_TEST(event_reply_short_or_naming_another_event_is_accepted)
{
	{
		KvmiTest t;
		auto &r = t.add_vcpu(guest_write_pages, page_a, page_b);
		t.attach();
		auto e = pf_waiting(t);
		kvmi_event_reply er{KVMI_EVENT_ACTION_CONTINUE, KVMI_EVENT_MSR, 0, 0};
		kvmi_event_pf_reply pf{};
		auto payload = bytes_of(vcpu_hdr(e.vcpu), er, pf);
		payload.resize(sizeof(kvmi_vcpu_hdr) + sizeof(er) + 8);
		t.t().send_bytes(message(KVMI_EVENT_REPLY, e.seq, payload));
		r.expect_sync(1);
		TEST_ASSERT_EQ(t.peek(page_a), 0xa1u);
		TEST_ASSERT(t.vmm->connected());
		TEST_ASSERT_EQ(t.t().get_guest_info(), 1u);
	}
	{
		KvmiTest t;
		auto &r = t.add_vcpu(guest_msr_write);
		t.attach();
		auto &s = t.t();
		s.control_events(0, intro::EventId::msr, true);
		s.control_msr(0, 0x174, true);
		r.resume();
		auto e = t.event(intro::EventId::msr, 0);
		TEST_ASSERT_EQ(e.get<intro::MsrEvent>()->new_value, 0x51u);
		/* No kvmi_event_msr_reply at all: new_val is zero. */
		kvmi_event_reply er{KVMI_EVENT_ACTION_CONTINUE, KVMI_EVENT_MSR, 0, 0};
		s.send_bytes(message(KVMI_EVENT_REPLY, e.seq, bytes_of(vcpu_hdr(0), er)));
		TEST_ASSERT_EQ(r.expect_sync(1)[1], 0u);
		TEST_ASSERT(t.vmm->connected());
		TEST_ASSERT_EQ(s.get_guest_info(), 1u);
	}
}

VK_TEST(event_reply_bad_action_closes)
{
	bad_event_reply([](kvmi_msg_hdr &, kvmi_vcpu_hdr &, kvmi_event_reply &r, std::size_t &) {
		r.action = 7;
	});
}

VK_TEST(event_reply_nonzero_padding_closes)
{
	bad_event_reply([](kvmi_msg_hdr &, kvmi_vcpu_hdr &, kvmi_event_reply &r, std::size_t &) {
		r.padding2 = 1;
	});
}

VK_TEST(event_reply_without_event_closes)
{
	KvmiTest t;
	t.attach();
	kvmi_event_reply er{KVMI_EVENT_ACTION_CONTINUE, KVMI_EVENT_PAUSE_VCPU, 0, 0};
	t.t().send_bytes(message(KVMI_EVENT_REPLY, 1, bytes_of(vcpu_hdr(0), er)));
	expect_closed(t);
}

VK_TEST(set_page_access_absurd_counts)
{
	KvmiTest t;
	auto &r = t.add_vcpu(guest_write_pages, page_a, page_b);
	t.attach();
	auto &s = t.t();
	s.control_events(0, intro::EventId::pf, true);
	kvmi_set_page_access spa{0, 0xffff, 0};
	kvmi_page_access_entry pae{page_a, KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X, 0, 0, 0};
	EXPECT_RAW_ERROR(s.request_raw(KVMI_SET_PAGE_ACCESS, bytes_of(spa, pae)), KVMI_EINVAL);
	spa.count = 2;
	EXPECT_RAW_ERROR(s.request_raw(KVMI_SET_PAGE_ACCESS, bytes_of(spa, pae)), KVMI_EINVAL);
	/* More entries than the count says. */
	spa.count = 1;
	EXPECT_RAW_ERROR(s.request_raw(KVMI_SET_PAGE_ACCESS, bytes_of(spa, pae, pae)), KVMI_EINVAL);
	kvmi_set_page_write_bitmap swb{0, 0xffff, 0};
	kvmi_page_write_bitmap_entry wbe{page_a, 0, 0};
	s.control_spp(true);
	EXPECT_RAW_ERROR(s.request_raw(KVMI_SET_PAGE_WRITE_BITMAP, bytes_of(swb, wbe)), KVMI_EINVAL);
	kvmi_get_registers gr{};
	gr.nmsrs = 0xffff;
	EXPECT_RAW_ERROR(s.request_raw(KVMI_GET_REGISTERS, bytes_of(vcpu_hdr(0), gr)), KVMI_EINVAL);
	TEST_ASSERT(s.connected());
	/* None of it restricted anything. */
	r.run_sync(1);
	r.run_sync(2);
	r.run_sync(3);
	t.expect_no_event(50ms);
	TEST_ASSERT_EQ(t.peek(page_a + 8), 0xa2u);
}

VK_TEST(set_page_access_with_one_bad_entry_changes_nothing)
{
	KvmiTest t;
	auto &r = t.add_vcpu(guest_write_pages, page_a, page_b);
	t.attach();
	auto &s = t.t();
	s.control_events(0, intro::EventId::pf, true);
	const std::uint8_t ro = intro::access_r | intro::access_x;
	std::vector<intro::PageAccess> bad_last = {{page_a, ro}, {page_b, ro}, {hole_gpa, ro}};
	std::vector<intro::PageAccess> bad_first = {{hole_gpa, ro}, {page_a, ro}, {page_b, ro}};
	std::vector<intro::PageAccess> bad_access = {
		{page_a, ro}, {page_b, intro::access_r | intro::access_w} /* no X: unsupported */};
	for (auto *v : {&bad_last, &bad_first, &bad_access}) {
		try {
			s.set_page_access(*v);
			fail(__FILE__, __LINE__, "SET_PAGE_ACCESS with a bad entry succeeded");
		} catch (const intro::CommandError &) {
		}
	}
	/* The same for SPP bitmaps. */
	s.control_spp(true);
	std::vector<intro::PageWriteBitmap> bm = {{page_a, 0}, {page_b, 0}, {hole_gpa, 0}};
	try {
		s.set_page_write_bitmap(bm);
		fail(__FILE__, __LINE__, "SET_PAGE_WRITE_BITMAP with a bad entry succeeded");
	} catch (const intro::CommandError &) {
	}
	/* Both pages are still writable without events. */
	r.run_sync(1);
	r.run_sync(2);
	r.run_sync(3);
	t.expect_no_event(50ms);
	TEST_ASSERT_EQ(t.peek(page_a), 0xa1u);
	TEST_ASSERT_EQ(t.peek(page_b), 0xb1u);
	if (auto *spp = SubpageProtection::of(t.g.vm()))
		TEST_ASSERT_EQ(spp->stats().protected_pages, 0u);
}

VK_TEST(pause_flood_is_bounded)
{
	KvmiTest t;
	auto &r = t.add_vcpu(g_::spin_until, stop_gpa, counter_gpa);
	t.attach();
	auto &s = t.t();
	r.resume();
	TEST_ASSERT(wait_until([&] { return t.peek(counter_gpa) > 0; }, 5000ms));
	/* Pause requests without ever answering the events: the VMM must say EBUSY. */
	unsigned accepted = 0;
	bool busy = false;
	for (unsigned i = 0; i < 20000 && !busy; i++) {
		try {
			s.pause_vcpu(0, false);
			accepted++;
		} catch (const intro::CommandError &e) {
			TEST_ASSERT_EQ(e.kvmi_error(), KVMI_EBUSY);
			busy = true;
		}
	}
	TEST_ASSERT(busy, "%u PAUSE_VCPU commands accepted, never EBUSY", accepted);
	diag("%u pause requests accepted before EBUSY", accepted);
	TEST_ASSERT(accepted >= 1);
	/* Every accepted request gets its event; answering them all lets the vCPU go. */
	for (unsigned i = 0; i < accepted; i++) {
		auto e = t.event(intro::EventId::pause_vcpu, 0);
		s.reply(e, intro::Action::continue_);
	}
	t.expect_no_event(50ms);
	std::uint64_t c = t.peek(counter_gpa);
	TEST_ASSERT(wait_until([&] { return t.peek(counter_gpa) > c; }, 5000ms));
	/* Pausing works again. */
	s.pause_vcpu(0, false);
	s.reply(t.event(intro::EventId::pause_vcpu, 0), intro::Action::continue_);
	t.poke(stop_gpa, 1);
	r.expect_sync(1);
}

VK_TEST(flood_of_commands_while_event_waits)
{
	KvmiTest t;
	t.add_vcpu(guest_write_pages, page_a, page_b);
	t.attach();
	auto e = pf_waiting(t);
	auto &s = t.t();
	/*
	 * Many requests in flight without reading replies: nothing is lost or
	 * reordered. (A window of 100: a tool that never reads would block the
	 * VMM's replies and so its own sends - its own deadlock.)
	 */
	for (int round = 0; round < 20; round++) {
		std::vector<std::uint32_t> seqs;
		for (int i = 0; i < 100; i++)
			seqs.push_back(s.send_raw(i % 2 ? KVMI_GET_GUEST_INFO : KVMI_GET_VERSION, {}));
		for (int i = 0; i < 100; i++) {
			auto rep = s.receive_raw(i % 2 ? KVMI_GET_GUEST_INFO : KVMI_GET_VERSION,
						 seqs[i]);
			TEST_ASSERT_EQ(rep.err, 0);
		}
	}
	intro::PageAccess rwx{page_a, intro::access_r | intro::access_w | intro::access_x};
	s.set_page_access(std::span(&rwx, 1));
	s.reply_pf(e, intro::Action::continue_);
	expect_guest_completes(t);
	t.expect_no_event(50ms);
}

/* --- the handshake, byte by byte, with a hand-made tool --- */

/* Read exactly n bytes from a nonblocking socket within timeout; false on EOF/timeout. */
static bool read_exact(int fd, void *buf, std::size_t n, std::chrono::milliseconds timeout)
{
	auto end = std::chrono::steady_clock::now() + timeout;
	auto *p = static_cast<std::byte *>(buf);
	while (n) {
		ssize_t r = ::recv(fd, p, n, 0);
		if (r > 0) {
			p += r;
			n -= r;
			continue;
		}
		if (r == 0 || (errno != EAGAIN && errno != EINTR))
			return false;
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
			end - std::chrono::steady_clock::now());
		if (left.count() <= 0)
			return false;
		pollfd pfd{fd, POLLIN, 0};
		::poll(&pfd, 1, (int)left.count());
	}
	return true;
}

static void write_all(int fd, const std::vector<std::byte> &b)
{
	TEST_ASSERT(::send(fd, b.data(), b.size(), MSG_NOSIGNAL) == (ssize_t)b.size());
}

/*
 * Connect the VMM to a raw tool that reads the VMM's hello and answers
 * `answer`; returns the VMM's errno (0: connected) and leaves the socket in fd.
 */
static int raw_handshake(KvmiTest &t, const std::vector<std::byte> &answer, FileDesc &fd,
			 kvmi_qemu2introspector *hello_out = nullptr,
			 const IntrospectionOptions *options = nullptr)
{
	auto o = options ? *options : t.default_options();
	o.handshake_timeout = 2000ms;
	auto fut = std::async(std::launch::async,
			      [&] { return Introspection::connect(t.g.vm(), o); });
	fd = t.listener.accept(5000ms);
	kvmi_qemu2introspector hello{};
	TEST_ASSERT(read_exact(fd.get(), &hello, sizeof(hello), 5000ms), "no hello from the VMM");
	TEST_ASSERT_EQ(hello.struct_size, sizeof(hello));
	TEST_ASSERT(std::memcmp(hello.uuid, o.uuid.data(), 16) == 0);
	TEST_ASSERT(std::string(hello.name) == o.name);
	TEST_ASSERT_EQ(hello.start_time, o.start_time);
	TEST_ASSERT_EQ(hello.padding, 0u);
	if (hello_out)
		*hello_out = hello;
	write_all(fd.get(), answer);
	TEST_ASSERT(fut.wait_for(5s) == std::future_status::ready, "connect() hangs");
	try {
		t.vmm.emplace(fut.get());
		return 0;
	} catch (const Error &e) {
		diag("refused: %s", e.what());
		return e.err();
	}
}

static std::vector<std::byte> answer(std::uint32_t struct_size, std::size_t extra,
				     const std::string &secret_text)
{
	kvmi_introspector2qemu a{};
	a.struct_size = struct_size;
	auto h = virtkit::detail::kvmi::cookie_hash(secret_text);
	std::memcpy(a.cookie_hash, h.data(), 20);
	auto b = bytes_of(a);
	b.resize(b.size() + extra, std::byte{0x5a});
	return b;
}

VK_TEST(handshake_raw_answers)
{
	{
		/* Exactly 24 bytes; then the channel works. */
		KvmiTest t;
		FileDesc fd;
		kvmi_qemu2introspector hello;
		TEST_ASSERT_EQ(raw_handshake(t, answer(24, 0, secret), fd, &hello), 0);
		TEST_ASSERT_EQ(hello.max_gpa, data_gpa + data_size);
		write_all(fd.get(), message(KVMI_GET_VERSION, 9, {}));
		kvmi_msg_hdr h{};
		kvmi_error_code ec{};
		kvmi_get_version_reply v{};
		TEST_ASSERT(read_exact(fd.get(), &h, sizeof(h), 5000ms));
		TEST_ASSERT_EQ(h.id, KVMI_GET_VERSION);
		TEST_ASSERT_EQ(h.seq, 9u);
		TEST_ASSERT_EQ(h.size, sizeof(ec) + sizeof(v));
		TEST_ASSERT(read_exact(fd.get(), &ec, sizeof(ec), 5000ms));
		TEST_ASSERT(read_exact(fd.get(), &v, sizeof(v), 5000ms));
		TEST_ASSERT_EQ(ec.err, 0);
		TEST_ASSERT_EQ(v.version, (unsigned)KVMI_VERSION);
	}
	{
		/* A newer tool's bigger answer: the VMM skips what it does not know. */
		KvmiTest t;
		FileDesc fd;
		TEST_ASSERT_EQ(raw_handshake(t, answer(24 + 1000, 1000, secret), fd), 0);
		write_all(fd.get(), message(KVMI_GET_GUEST_INFO, 10, {}));
		kvmi_msg_hdr h{};
		TEST_ASSERT(read_exact(fd.get(), &h, sizeof(h), 5000ms));
		TEST_ASSERT_EQ(h.id, KVMI_GET_GUEST_INFO);
		TEST_ASSERT_EQ(h.seq, 10u);
	}
	{
		KvmiTest t;
		FileDesc fd;
		TEST_ASSERT_EQ(raw_handshake(t, answer(24, 0, "wrong"), fd), EACCES);
	}
	{
		/* Too small to hold the hash. */
		KvmiTest t;
		FileDesc fd;
		auto a = answer(20, 0, secret);
		a.resize(20);
		TEST_ASSERT_EQ(raw_handshake(t, a, fd), EPROTO);
	}
	{
		/* Absurdly big: refused without waiting for the bytes. */
		KvmiTest t;
		FileDesc fd;
		auto start = std::chrono::steady_clock::now();
		TEST_ASSERT_EQ(raw_handshake(t, answer(0x7fffffff, 0, secret), fd), EPROTO);
		TEST_ASSERT(std::chrono::steady_clock::now() - start < 1500ms);
	}
	{
		/* Half an answer, then nothing: the handshake timeout. */
		KvmiTest t;
		FileDesc fd;
		auto a = answer(24, 0, secret);
		a.resize(10);
		TEST_ASSERT_EQ(raw_handshake(t, a, fd), ETIMEDOUT);
	}
}

/* What the process writes to stderr while it lives. */
class StderrCapture {
public:
	StderrCapture()
	{
		file_ = FileDesc::adopt(::memfd_create("stderr", MFD_CLOEXEC), "memfd_create");
		saved_ = FileDesc::adopt(::dup(2), "dup");
		TEST_ASSERT(::dup2(file_.get(), 2) == 2);
	}
	~StderrCapture() { restore(); }
	std::string restore()
	{
		if (saved_.get() >= 0) {
			::dup2(saved_.get(), 2);
			saved_ = FileDesc();
		}
		std::string out(4096, '\0');
		ssize_t n = ::pread(file_.get(), out.data(), out.size(), 0);
		out.resize(n > 0 ? std::size_t(n) : 0);
		return out;
	}

private:
	FileDesc file_, saved_;
};

/*
 * A VMM that retries until a tool listens (virtkit run --introspect) must
 * not repeat the warning at every attempt: it comes with a connection.
 */
VK_TEST(no_secret_warning_without_a_connection)
{
	KvmiTest t;
	auto o = t.default_options();
	o.secret.clear();
	o.address = "unix:" + t.dir.path() + "/nobody-listens.sock";
	StderrCapture err;
	for (int i = 0; i < 3; i++) {
		try {
			Introspection::connect(t.g.vm(), o);
			TEST_ASSERT(false, "connected to a socket nobody listens on");
		} catch (const virtkit::Error &e) {
			TEST_ASSERT_EQ(e.err(), ENOENT);
		}
	}
	std::string out = err.restore();
	TEST_ASSERT(out.find("without a secret") == std::string::npos, "stderr: '%s'", out.c_str());
}

VK_TEST(handshake_without_secret_accepts_any_tool)
{
	/*
	 * As QEMU's kvmi without a key: libkvmi's examples leave cookie_hash
	 * zero, and the VMM must let them in - with a warning.
	 */
	KvmiTest t;
	auto o = t.default_options();
	o.secret.clear();
	FileDesc fd;
	StderrCapture err;
	int rc = raw_handshake(t, answer(24, 0, ""), fd, nullptr, &o);
	std::string warning = err.restore();
	TEST_ASSERT_EQ(rc, 0);
	TEST_ASSERT(warning.find("without a secret") != std::string::npos &&
			    warning.find(o.address) != std::string::npos,
		    "stderr: '%s'", warning.c_str());
	/* A zero cookie_hash, as libkvmi sends it. */
	kvmi_introspector2qemu zero{};
	zero.struct_size = sizeof(zero);
	write_all(fd.get(), message(KVMI_GET_VERSION, 9, {}));
	kvmi_msg_hdr h{};
	TEST_ASSERT(read_exact(fd.get(), &h, sizeof(h), 5000ms));
	TEST_ASSERT_EQ(h.id, KVMI_GET_VERSION);
	TEST_ASSERT_EQ(h.seq, 9u);
	t.vmm.reset();
	{
		KvmiTest u;
		FileDesc fd2;
		auto ou = u.default_options();
		ou.secret.clear();
		TEST_ASSERT_EQ(raw_handshake(u, bytes_of(zero), fd2, nullptr, &ou), 0);
		TEST_ASSERT(u.vmm->connected());
	}
	/* With a secret, a zero cookie is still refused. */
	{
		KvmiTest u;
		FileDesc fd2;
		TEST_ASSERT_EQ(raw_handshake(u, bytes_of(zero), fd2), EACCES);
	}
}

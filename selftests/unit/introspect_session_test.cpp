// SPDX-License-Identifier: MIT
/*
 * virtkit::introspect::Session on the wire: the handshake, message framing,
 * request layouts, reply checks, CommandError, events queued while a
 * command waits, event reply layouts and batches. The VMM side is a peer
 * written in the test (introspect_peer.hpp) on a socketpair.
 */
#include <catch2/catch.hpp>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "introspect_peer.hpp"
#include "kvmi/protocol/handshake.hpp"

using namespace std::chrono_literals;
using namespace introspect_test;
using virtkit::Error;
using virtkit::FileDesc;
using virtkit::introspect::Action;
using virtkit::introspect::Batch;
using virtkit::introspect::CommandError;
using virtkit::introspect::EventId;
using virtkit::introspect::Session;
using virtkit::introspect::SessionOptions;
using Catch::Matchers::Contains;

namespace {

std::array<std::uint8_t, 20> secret_hash(std::string_view s)
{
	return virtkit::detail::kvmi::cookie_hash(s);
}

/* The error a call throws, as Error; FAILs if it throws nothing. */
template <class F> Error error_of(F &&f)
{
	try {
		f();
	} catch (const Error &e) {
		return e;
	}
	FAIL("no exception");
	return Error("none", 0);
}

/* The handshake succeeds on fd with peer having written bytes. */
Session handshake_with(FileDesc fd, Peer &peer, std::string_view secret = "secret")
{
	auto s = Session::handshake(std::move(fd), secret, 5s);
	auto r = peer.read_handshake_reply();
	CHECK(r.struct_size == 24);
	auto h = secret_hash(secret);
	CHECK(std::memcmp(r.cookie_hash, h.data(), 20) == 0);
	return s;
}

} // namespace

/* --- handshake --- */

TEST_CASE("handshake: virtkit's 104 bytes, with max_gpa", "[introspect][handshake]")
{
	auto [fd, peer] = Peer::pair();
	peer.write_all(Peer::handshake_bytes(104, "vm-one", 0x240000000));
	auto s = handshake_with(std::move(fd), peer);
	CHECK(s.connected());
	CHECK(s.info().struct_size == 104);
	CHECK(s.info().name == "vm-one");
	CHECK(s.info().start_time == 1700000000);
	CHECK(s.info().uuid[0] == 0xa0);
	CHECK(s.info().uuid[15] == 0xaf);
	REQUIRE(s.info().max_gpa);
	CHECK(*s.info().max_gpa == 0x240000000);
}

TEST_CASE("handshake: QEMU's 96 bytes, no max_gpa", "[introspect][handshake]")
{
	auto [fd, peer] = Peer::pair();
	peer.write_all(Peer::handshake_bytes(96, "qemu-vm"));
	auto s = handshake_with(std::move(fd), peer, "another secret");
	CHECK(s.info().struct_size == 96);
	CHECK(s.info().name == "qemu-vm");
	CHECK_FALSE(s.info().max_gpa);
}

TEST_CASE("handshake: an older struct down to the name is accepted", "[introspect][handshake]")
{
	auto [fd, peer] = Peer::pair();
	auto b = Peer::handshake_bytes(40, "abcdefgh");
	peer.write_all(b);
	auto s = handshake_with(std::move(fd), peer);
	CHECK(s.info().struct_size == 40);
	CHECK(s.info().name == "abcdefgh");
	CHECK_FALSE(s.info().max_gpa);
}

TEST_CASE("handshake: a bigger struct is skipped and framing starts after it",
	  "[introspect][handshake]")
{
	auto [fd, peer] = Peer::pair();
	/* 300 bytes, the extra ones 0x5a; an event right behind them. */
	peer.write_all(Peer::handshake_bytes(300, "big", 0x1000));
	peer.send_message(KVMI_EVENT, 77, event_payload(3, KVMI_EVENT_PAUSE_VCPU));
	auto s = handshake_with(std::move(fd), peer);
	CHECK(s.info().struct_size == 300);
	CHECK(*s.info().max_gpa == 0x1000);
	auto ev = s.next_event(1s);
	REQUIRE(ev);
	CHECK(ev->seq == 77);
	CHECK(ev->vcpu == 3);
	CHECK(ev->id == EventId::pause_vcpu);
}

TEST_CASE("handshake: bytes arriving one at a time", "[introspect][handshake]")
{
	auto [fd, peer] = Peer::pair();
	auto b = Peer::handshake_bytes(104, "slow", 0x2000);
	PeerThread t([&, &peer = peer] {
		for (auto x : b) {
			peer.write_all(std::span(&x, 1));
			std::this_thread::sleep_for(100us);
		}
	});
	auto s = Session::handshake(std::move(fd), "secret", 5s);
	t.join();
	peer.read_handshake_reply();
	CHECK(s.info().name == "slow");
}

TEST_CASE("handshake: invalid structs are refused", "[introspect][handshake]")
{
	auto [fd, peer] = Peer::pair();
	SECTION("shorter than the start of the name") {
		peer.write_all(Peer::handshake_bytes(31, "x"));
		auto e = error_of([&] { Session::handshake(std::move(fd), "s", 1s); });
		CHECK(e.err() == EPROTO);
		CHECK(e.operation() == "KVMI handshake");
		CHECK_THAT(e.what(), Contains("struct_size 31"));
	}
	SECTION("more than 64 KiB") {
		kvmi_qemu2introspector q{};
		q.struct_size = 65537;
		peer.write_all(bytes_of(q));
		auto e = error_of([&] { Session::handshake(std::move(fd), "s", 1s); });
		CHECK(e.err() == E2BIG);
	}
	SECTION("non-zero padding") {
		auto b = Peer::handshake_bytes(104, "x");
		b[offsetof(kvmi_qemu2introspector, padding)] = std::byte{1};
		peer.write_all(b);
		auto e = error_of([&] { Session::handshake(std::move(fd), "s", 1s); });
		CHECK(e.err() == EPROTO);
		CHECK_THAT(e.what(), Contains("padding"));
	}
	SECTION("the VMM closes in the middle") {
		auto b = Peer::handshake_bytes(104, "x");
		peer.write_all(std::span(b).first(50));
		peer.close();
		auto e = error_of([&] { Session::handshake(std::move(fd), "s", 1s); });
		CHECK(e.err() == ECONNRESET);
	}
	SECTION("nothing within the timeout") {
		auto e = error_of([&] { Session::handshake(std::move(fd), "s", 50ms); });
		CHECK(e.err() == ETIMEDOUT);
	}
}

TEST_CASE("handshake: a name without a terminator keeps 63 bytes", "[introspect][handshake]")
{
	auto [fd, peer] = Peer::pair();
	auto b = Peer::handshake_bytes(104, "");
	for (std::size_t i = 0; i < 64; i++)
		b[offsetof(kvmi_qemu2introspector, name) + i] = std::byte{'n'};
	peer.write_all(b);
	auto s = handshake_with(std::move(fd), peer);
	CHECK(s.info().name == std::string(63, 'n'));
}

/* --- commands and replies --- */

TEST_CASE("command: one message per request, reply decoded", "[introspect][command]")
{
	Peer peer;
	auto s = connect(peer);
	Msg req;
	PeerThread t([&] {
		req = peer.read_message();
		kvmi_get_version_reply r{};
		r.version = KVMI_VERSION;
		r.features.spp = 1;
		peer.reply(req, 0, bytes_of(r));
	});
	auto v = s.get_version();
	t.join();
	CHECK(req.hdr.id == KVMI_GET_VERSION);
	CHECK(req.hdr.size == 0);
	CHECK(req.hdr.seq == 1);
	CHECK(v.version == KVMI_VERSION);
	CHECK(v.spp);
	CHECK_FALSE(v.ve);
}

TEST_CASE("command: vCPU request layouts", "[introspect][command]")
{
	Peer peer;
	auto s = connect(peer);
	std::vector<Msg> reqs;
	/* Answers each request with err 0 and the reply the command expects. */
	auto serve = [&](std::size_t n, std::span<const std::byte> data = {}) {
		return PeerThread([&, n, data] {
			for (std::size_t i = 0; i < n; i++) {
				reqs.push_back(peer.read_message());
				peer.reply(reqs.back(), 0, data);
			}
		});
	};

	SECTION("CONTROL_MSR") {
		auto t = serve(1);
		s.control_msr(2, 0xc0000080, true);
		t.join();
		auto &m = reqs.at(0);
		CHECK(m.hdr.id == KVMI_CONTROL_MSR);
		kvmi_vcpu_hdr h{};
		h.vcpu = 2;
		kvmi_control_msr c{};
		c.enable = 1;
		c.msr = 0xc0000080;
		CHECK(m.payload == pack(h, c));
	}
	SECTION("PAUSE_VCPU and CONTROL_EVENTS") {
		auto t = serve(2);
		s.pause_vcpu(5, true);
		s.control_events(1, EventId::breakpoint, true);
		t.join();
		kvmi_vcpu_hdr h{};
		h.vcpu = 5;
		kvmi_pause_vcpu p{};
		p.wait = 1;
		CHECK(reqs.at(0).hdr.id == KVMI_PAUSE_VCPU);
		CHECK(reqs.at(0).payload == pack(h, p));
		h.vcpu = 1;
		kvmi_control_events c{};
		c.event_id = KVMI_EVENT_BREAKPOINT;
		c.enable = 1;
		CHECK(reqs.at(1).hdr.id == KVMI_CONTROL_EVENTS);
		CHECK(reqs.at(1).payload == pack(h, c));
		CHECK(reqs.at(1).hdr.seq == reqs.at(0).hdr.seq + 1);
	}
	SECTION("GET_REGISTERS with MSRs") {
		kvmi_get_registers_reply r{};
		r.mode = 8;
		r.regs.rip = 0xfff0;
		r.sregs.cr0 = 0x11;
		r.msrs.nmsrs = 2;
		kvm_msr_entry e1{}, e2{};
		e1.index = 0xc0000080;
		e1.data = 0xd01;
		e2.index = 0x10;
		e2.data = 42;
		auto data = pack(r, e1, e2);
		auto t = serve(1, data);
		std::uint32_t msrs[] = {0xc0000080, 0x10};
		auto regs = s.get_registers(0, msrs);
		t.join();
		auto &m = reqs.at(0);
		CHECK(m.hdr.id == KVMI_GET_REGISTERS);
		REQUIRE(m.payload.size() == 8 + 8 + 8);
		CHECK(load<kvmi_get_registers>(m.payload, 8).nmsrs == 2);
		CHECK(load<std::uint32_t>(m.payload, 16) == 0xc0000080);
		CHECK(load<std::uint32_t>(m.payload, 20) == 0x10);
		CHECK(regs.mode == 8);
		CHECK(regs.regs.rip == 0xfff0);
		CHECK(regs.sregs.cr0 == 0x11);
		REQUIRE(regs.msrs.size() == 2);
		CHECK(regs.msrs[0].index == 0xc0000080);
		CHECK(regs.msrs[0].value == 0xd01);
		CHECK(regs.msrs[1].value == 42);
	}
	SECTION("GET_CPUID, GET_XCR, TRANSLATE_GVA, GET_MTRR_TYPE") {
		kvmi_get_cpuid_reply c{1, 2, 3, 4};
		auto t = serve(1, bytes_of(c));
		auto leaf = s.get_cpuid(1, 0x40000000, 7);
		t.join();
		CHECK(leaf.eax == 1);
		CHECK(leaf.edx == 4);
		CHECK(reqs.at(0).payload.size() == 16);
		CHECK(load<kvmi_get_cpuid>(reqs.at(0).payload, 8).function == 0x40000000);
		CHECK(load<kvmi_get_cpuid>(reqs.at(0).payload, 8).index == 7);

		reqs.clear();
		kvmi_vcpu_get_xcr_reply x{7};
		auto t2 = serve(1, bytes_of(x));
		CHECK(s.get_xcr(0, 0) == 7);
		t2.join();
		CHECK(reqs.at(0).hdr.id == KVMI_VCPU_GET_XCR);

		reqs.clear();
		kvmi_vcpu_translate_gva_reply g{0x9000};
		auto t3 = serve(1, bytes_of(g));
		CHECK(s.translate_gva(0, 0xffff800000009000) == 0x9000);
		t3.join();
		CHECK(load<kvmi_vcpu_translate_gva>(reqs.at(0).payload, 8).gva == 0xffff800000009000);

		reqs.clear();
		kvmi_get_mtrr_type_reply mt{};
		mt.type = 6;
		auto t4 = serve(1, bytes_of(mt));
		CHECK(s.get_mtrr_type(0, 0x1000) == 6);
		t4.join();
	}
	SECTION("SET_REGISTERS, INJECT_EXCEPTION, SET_XSAVE, CONTROL_SINGLESTEP") {
		auto t = serve(4);
		kvm_regs regs{};
		regs.rip = 0x4242;
		s.set_registers(3, regs);
		s.inject_exception(3, 14, 2, 0xdead000);
		std::vector<std::byte> xsave(4096, std::byte{0x11});
		s.set_xsave(3, xsave);
		s.control_singlestep(3, true);
		t.join();
		kvmi_vcpu_hdr h{};
		h.vcpu = 3;
		CHECK(reqs.at(0).payload == pack(h, regs));
		kvmi_inject_exception ie{};
		ie.nr = 14;
		ie.error_code = 2;
		ie.address = 0xdead000;
		CHECK(reqs.at(1).payload == pack(h, ie));
		CHECK(reqs.at(2).hdr.id == KVMI_VCPU_SET_XSAVE);
		CHECK(reqs.at(2).payload.size() == 8 + 4096);
		kvmi_vcpu_control_singlestep ss{};
		ss.enable = 1;
		CHECK(reqs.at(3).payload == pack(h, ss));
	}
}

TEST_CASE("command: VM request layouts", "[introspect][command]")
{
	Peer peer;
	auto s = connect(peer);
	std::vector<Msg> reqs;

	SECTION("READ_PHYSICAL in page-bounded requests") {
		/* 0x1f00 .. 0x3064: the rest of one page, a whole page, a piece. */
		std::size_t size = 0x100 + 0x1000 + 100;
		PeerThread t([&] {
			for (int i = 0; i < 3; i++) {
				reqs.push_back(peer.read_message());
				auto r = load<kvmi_read_physical>(reqs.back().payload);
				Bytes data(r.size);
				for (std::size_t k = 0; k < r.size; k++)
					data[k] = std::byte((r.gpa + k) & 0xff);
				peer.reply(reqs.back(), 0, data);
			}
		});
		auto data = s.read_physical(0x1f00, size);
		t.join();
		auto r0 = load<kvmi_read_physical>(reqs.at(0).payload);
		auto r1 = load<kvmi_read_physical>(reqs.at(1).payload);
		auto r2 = load<kvmi_read_physical>(reqs.at(2).payload);
		CHECK(r0.gpa == 0x1f00);
		CHECK(r0.size == 0x100);
		CHECK(r1.gpa == 0x2000);
		CHECK(r1.size == 0x1000);
		CHECK(r2.gpa == 0x3000);
		CHECK(r2.size == 100);
		bool ok = true;
		for (std::size_t k = 0; k < size; k++)
			ok &= data[k] == std::byte((0x1f00 + k) & 0xff);
		CHECK(ok);
	}
	SECTION("WRITE_PHYSICAL across a page boundary: two requests") {
		PeerThread t([&] {
			for (int i = 0; i < 2; i++) {
				reqs.push_back(peer.read_message());
				peer.reply(reqs.back(), 0);
			}
		});
		std::vector<std::byte> data(16, std::byte{0xab});
		s.write_physical(0x2ff8, data);
		t.join();
		auto w0 = load<kvmi_write_physical>(reqs.at(0).payload);
		auto w1 = load<kvmi_write_physical>(reqs.at(1).payload);
		CHECK(w0.gpa == 0x2ff8);
		CHECK(w0.size == 8);
		CHECK(reqs.at(0).payload.size() == sizeof(kvmi_write_physical) + 8);
		CHECK(w1.gpa == 0x3000);
		CHECK(w1.size == 8);
	}
	SECTION("WRITE_PHYSICAL") {
		PeerThread t([&] {
			reqs.push_back(peer.read_message());
			peer.reply(reqs.back(), 0);
		});
		std::byte data[] = {std::byte{0xcc}, std::byte{0x90}};
		s.write_physical(0x2000, data);
		t.join();
		kvmi_write_physical w{};
		w.gpa = 0x2000;
		w.size = 2;
		auto expect = pack(w);
		expect.push_back(std::byte{0xcc});
		expect.push_back(std::byte{0x90});
		CHECK(reqs.at(0).payload == expect);
	}
	SECTION("SET_PAGE_ACCESS, SET_PAGE_WRITE_BITMAP, CONTROL_SPP") {
		PeerThread t([&] {
			for (int i = 0; i < 3; i++) {
				reqs.push_back(peer.read_message());
				peer.reply(reqs.back(), 0);
			}
		});
		virtkit::introspect::PageAccess pages[] = {{0x3000, virtkit::introspect::access_r},
							   {0x5000, 0}};
		s.set_page_access(pages);
		s.control_spp(true);
		virtkit::introspect::PageWriteBitmap bm[] = {{0x3000, 0xffff0000}};
		s.set_page_write_bitmap(bm);
		t.join();
		kvmi_set_page_access h{};
		h.count = 2;
		kvmi_page_access_entry e1{}, e2{};
		e1.gpa = 0x3000;
		e1.access = KVMI_PAGE_ACCESS_R;
		e2.gpa = 0x5000;
		CHECK(reqs.at(0).payload == pack(h, e1, e2));
		kvmi_control_spp c{};
		c.enable = 1;
		CHECK(reqs.at(1).payload == pack(c));
		kvmi_set_page_write_bitmap bh{};
		bh.count = 1;
		kvmi_page_write_bitmap_entry be{};
		be.gpa = 0x3000;
		be.bitmap = 0xffff0000;
		CHECK(reqs.at(2).payload == pack(bh, be));
	}
	SECTION("too many pages for one message: E2BIG, nothing sent") {
		std::vector<virtkit::introspect::PageAccess> pages(Session::max_page_entries + 1);
		auto e = error_of([&] { s.set_page_access(pages); });
		CHECK(e.err() == E2BIG);
		CHECK(e.operation() == "KVMI_SET_PAGE_ACCESS");
		CHECK(s.connected());
	}
	SECTION("GET_GUEST_INFO, GET_MAX_GFN, QUERY_PHYSICAL, CHECK_COMMAND") {
		PeerThread t([&] {
			auto m = peer.read_message();
			kvmi_get_guest_info_reply gi{};
			gi.vcpu_count = 4;
			peer.reply(m, 0, bytes_of(gi));
			m = peer.read_message();
			kvmi_get_max_gfn_reply mg{0x3ffff};
			peer.reply(m, 0, bytes_of(mg));
			m = peer.read_message();
			reqs.push_back(m);
			kvmi_query_physical_reply q{0x100, 0x200000};
			peer.reply(m, 0, bytes_of(q));
			m = peer.read_message();
			reqs.push_back(m);
			peer.reply(m, -KVMI_EOPNOTSUPP);
			m = peer.read_message();
			peer.reply(m, 0);
		});
		CHECK(s.get_guest_info() == 4);
		CHECK(s.get_max_gfn() == 0x3ffff);
		auto r = s.query_physical(0x123);
		CHECK(r.gfn == 0x100);
		CHECK(r.size == 0x200000);
		CHECK(s.check_command(KVMI_CONTROL_CR) == EOPNOTSUPP);
		CHECK(s.check_event(EventId::msr) == 0);
		t.join();
		CHECK(load<kvmi_query_physical>(reqs.at(0).payload).gfn == 0x123);
		CHECK(load<kvmi_check_command>(reqs.at(1).payload).id == KVMI_CONTROL_CR);
	}
}

TEST_CASE("CommandError: the KVMI error and the command's name", "[introspect][error]")
{
	Peer peer;
	auto s = connect(peer);
	auto refuse = [&](std::int32_t err) {
		return PeerThread([&, err] {
			auto m = peer.read_message();
			peer.reply(m, err);
		});
	};

	SECTION("-KVMI_EINVAL") {
		auto t = refuse(-KVMI_EINVAL);
		try {
			s.read_physical(0x1000, 16);
			FAIL("no CommandError");
		} catch (const CommandError &e) {
			CHECK(e.err() == EINVAL);
			CHECK(e.kvmi_error() == 22);
			CHECK(e.command() == KVMI_READ_PHYSICAL);
			CHECK(e.operation() == "KVMI_READ_PHYSICAL");
			CHECK_THAT(e.what(), Contains("gpa=0x1000 size=16"));
			CHECK_THAT(e.what(), Contains("EINVAL"));
		}
		t.join();
		CHECK(s.connected());
	}
	SECTION("-KVMI_ENOSYS") {
		auto t = refuse(-KVMI_ENOSYS);
		try {
			s.control_cr(0, 3, true);
			FAIL("no CommandError");
		} catch (const CommandError &e) {
			CHECK(e.err() == ENOSYS);
			CHECK(e.kvmi_error() == 1000);
			CHECK(e.operation() == "KVMI_CONTROL_CR");
		}
		t.join();
	}
	SECTION("an unknown code is EPROTO, the code kept") {
		auto t = refuse(-4242);
		try {
			s.get_max_gfn();
			FAIL("no CommandError");
		} catch (const CommandError &e) {
			CHECK(e.err() == EPROTO);
			CHECK(e.kvmi_error() == 4242);
		}
		t.join();
		CHECK(s.connected());
	}
	CHECK(virtkit::introspect::kvmi_errno(KVMI_EPERM) == EPERM);
	CHECK(virtkit::introspect::kvmi_errno(KVMI_EOPNOTSUPP) == EOPNOTSUPP);
	CHECK(virtkit::introspect::command_name(KVMI_VCPU_TRANSLATE_GVA) ==
	      "KVMI_VCPU_TRANSLATE_GVA");
	CHECK(virtkit::introspect::command_name(200) == "KVMI command 200");
}

/* --- framing and protocol failures end the session --- */

TEST_CASE("framing: broken replies disconnect the session", "[introspect][framing]")
{
	enum Case {
		too_big,
		other_seq,
		short_reply,
		padding,
		short_data,
		event_reply,
		closes,
		silent,
		err_positive,
		err_min,
	};
	struct {
		Case c;
		int err;
		const char *text;
	} cases[] = {
		{too_big, EMSGSIZE, "KVMI_MSG_SIZE"},
		{other_seq, EPROTO, "unexpected message"},
		{short_reply, EPROTO, "shorter than struct kvmi_error_code"},
		{padding, EPROTO, "padding"},
		{short_data, EPROTO, "expected 8"},
		{event_reply, EPROTO, "unexpected message id 0"},
		{closes, ECONNRESET, "closed"},
		{silent, ETIMEDOUT, "no reply within 200 ms"},
		{err_positive, EPROTO, "error code 22 out of range"},
		{err_min, EPROTO, "error code -2147483648 out of range"},
	};
	auto k = GENERATE(range(0, 10));
	auto &tc = cases[k];
	INFO("case " << k << ": " << tc.text);

	Peer peer;
	SessionOptions opts;
	opts.command_timeout = 200ms;
	auto s = connect(peer, opts);
	PeerThread t([&] {
		auto m = peer.read_message();
		switch (tc.c) {
		case too_big: {
			kvmi_msg_hdr h{};
			h.id = m.hdr.id;
			h.seq = m.hdr.seq;
			h.size = KVMI_MSG_SIZE + 1;
			peer.write_all(bytes_of(h));
			break;
		}
		case other_seq: {
			Msg other = m;
			other.hdr.seq += 5;
			peer.reply(other, 0);
			break;
		}
		case short_reply:
			peer.send_message(m.hdr.id, m.hdr.seq, Bytes(4));
			break;
		case padding: {
			kvmi_error_code ec{};
			ec.padding = 1;
			peer.send_message(m.hdr.id, m.hdr.seq, bytes_of(ec));
			break;
		}
		case short_data:
			peer.reply(m, 0, Bytes(4));
			break;
		case event_reply:
			peer.send_message(KVMI_EVENT_REPLY, 1, Bytes(16));
			break;
		case closes:
			peer.close();
			break;
		case silent:
			break;
		case err_positive:
			peer.reply(m, 22);
			break;
		case err_min:
			peer.reply(m, INT32_MIN);
			break;
		}
	});
	auto e = error_of([&] { s.get_max_gfn(); });
	t.join();
	CHECK(e.err() == tc.err);
	CHECK(e.operation() == "KVMI_GET_MAX_GFN");
	CHECK_THAT(e.what(), Contains(tc.text));
	CHECK_FALSE(s.connected());
	CHECK_THAT(s.disconnect_reason(), Contains(tc.text));
	if (tc.c != closes)
		CHECK(peer.sees_eof());
	/* Nothing more goes out on an ended session. */
	auto again = error_of([&] { s.get_max_gfn(); });
	CHECK(again.err() == ENOTCONN);
}

TEST_CASE("framing: a message split across many reads", "[introspect][framing]")
{
	Peer peer;
	auto s = connect(peer);
	PeerThread t([&] {
		auto m = peer.read_message();
		kvmi_get_max_gfn_reply r{0x777};
		kvmi_error_code ec{};
		auto bytes = Peer::message(m.hdr.id, m.hdr.seq, pack(ec, r));
		for (auto b : bytes) {
			peer.write_all(std::span(&b, 1));
			std::this_thread::sleep_for(200us);
		}
	});
	CHECK(s.get_max_gfn() == 0x777);
	t.join();
}

/* --- events --- */

TEST_CASE("events: queued while a command waits, then replied", "[introspect][event]")
{
	Peer peer;
	auto s = connect(peer);
	Msg reply_msg;
	PeerThread t([&] {
		auto m = peer.read_message();
		/* Two events before the reply, both with the VMM's seq. */
		peer.send_message(KVMI_EVENT, 1000, msr_event_payload(1, 0xc0000080, 0x500, 0xd01));
		peer.send_message(KVMI_EVENT, 1001, event_payload(0, KVMI_EVENT_PAUSE_VCPU));
		kvmi_get_guest_info_reply gi{};
		gi.vcpu_count = 2;
		peer.reply(m, 0, bytes_of(gi));
	});
	CHECK(s.get_guest_info() == 2);
	t.join();
	CHECK(s.pending_events() == 2);

	auto ev = s.next_event(0ms);
	REQUIRE(ev);
	CHECK(ev->seq == 1000);
	CHECK(ev->vcpu == 1);
	CHECK(ev->id == EventId::msr);
	CHECK(ev->arch.mode == 8);
	CHECK(ev->arch.regs.rip == 0x1000);
	CHECK(ev->arch.regs.rax == 0x1234);
	CHECK(ev->arch.sregs.cr3 == 0x5000);
	CHECK(ev->arch.msrs.efer == 0xd01);
	auto *msr = ev->get<virtkit::introspect::MsrEvent>();
	REQUIRE(msr);
	CHECK(msr->msr == 0xc0000080);
	CHECK(msr->old_value == 0x500);
	CHECK(msr->new_value == 0xd01);
	CHECK_THAT(virtkit::introspect::describe(*ev),
		   Contains("vcpu 1 MSR 0xc0000080 0x500 -> 0xd01 rip 0x1000"));

	/* The reply: hdr{EVENT_REPLY, event's seq} vcpu_hdr event_reply msr_reply. */
	s.reply_msr(*ev, Action::continue_, 0x500);
	auto r = peer.read_message();
	CHECK(r.hdr.id == KVMI_EVENT_REPLY);
	CHECK(r.hdr.seq == 1000);
	kvmi_vcpu_hdr h{};
	h.vcpu = 1;
	kvmi_event_reply er{};
	er.action = KVMI_EVENT_ACTION_CONTINUE;
	er.event = KVMI_EVENT_MSR;
	kvmi_event_msr_reply mr{};
	mr.new_val = 0x500;
	CHECK(r.payload == pack(h, er, mr));

	auto pause = s.next_event(0ms);
	REQUIRE(pause);
	CHECK(pause->id == EventId::pause_vcpu);
	CHECK(std::holds_alternative<std::monostate>(pause->data));
	CHECK_FALSE(s.next_event(0ms));
	CHECK(s.pending_events() == 0);
}

TEST_CASE("events: reply layouts", "[introspect][event]")
{
	Peer peer;
	auto s = connect(peer);
	kvmi_vcpu_hdr h{};
	h.vcpu = 2;

	SECTION("no specific data: PAUSE_VCPU, RETRY") {
		peer.send_message(KVMI_EVENT, 9, event_payload(2, KVMI_EVENT_PAUSE_VCPU));
		auto ev = s.next_event(1s);
		REQUIRE(ev);
		s.reply(*ev, Action::retry);
		auto r = peer.read_message();
		kvmi_event_reply er{};
		er.action = KVMI_EVENT_ACTION_RETRY;
		er.event = KVMI_EVENT_PAUSE_VCPU;
		CHECK(r.hdr.seq == 9);
		CHECK(r.hdr.size == 16);
		CHECK(r.payload == pack(h, er));
	}
	SECTION("MSR through reply(): the write goes ahead") {
		peer.send_message(KVMI_EVENT, 10, msr_event_payload(2, 0x174, 1, 2));
		auto ev = s.next_event(1s);
		REQUIRE(ev);
		s.reply(*ev, Action::continue_);
		auto r = peer.read_message();
		REQUIRE(r.payload.size() == 24);
		CHECK(load<kvmi_event_msr_reply>(r.payload, 16).new_val == 2);
	}
	SECTION("PF: a zeroed kvmi_event_pf_reply") {
		kvmi_event_pf pf{};
		pf.gpa = 0x3008;
		pf.gva = 0xffff3008;
		pf.access = KVMI_PAGE_ACCESS_W;
		peer.send_message(KVMI_EVENT, 11, event_payload(2, KVMI_EVENT_PF, bytes_of(pf)));
		auto ev = s.next_event(1s);
		REQUIRE(ev);
		auto *p = ev->get<virtkit::introspect::PfEvent>();
		REQUIRE(p);
		CHECK(p->gpa == 0x3008);
		CHECK(p->access == virtkit::introspect::access_w);
		s.reply_pf(*ev, Action::crash);
		auto r = peer.read_message();
		CHECK(r.hdr.size == 16 + sizeof(kvmi_event_pf_reply));
		auto er = load<kvmi_event_reply>(r.payload, 8);
		CHECK(er.action == KVMI_EVENT_ACTION_CRASH);
		CHECK(er.event == KVMI_EVENT_PF);
		CHECK(all_zero(std::span(r.payload).subspan(16)));
	}
	SECTION("BREAKPOINT, TRAP, SINGLESTEP data") {
		kvmi_event_breakpoint bp{};
		bp.gpa = 0x7c00;
		bp.insn_len = 1;
		kvmi_event_trap tr{};
		tr.vector = 14;
		tr.error_code = 2;
		tr.cr2 = 0xdead;
		kvmi_event_singlestep ss{};
		ss.failed = 1;
		peer.send_message(KVMI_EVENT, 1, event_payload(2, KVMI_EVENT_BREAKPOINT, bytes_of(bp)));
		peer.send_message(KVMI_EVENT, 2, event_payload(2, KVMI_EVENT_TRAP, bytes_of(tr)));
		peer.send_message(KVMI_EVENT, 3, event_payload(2, KVMI_EVENT_SINGLESTEP, bytes_of(ss)));
		auto e1 = s.next_event(1s), e2 = s.next_event(1s), e3 = s.next_event(1s);
		REQUIRE((e1 && e2 && e3));
		REQUIRE(e1->get<virtkit::introspect::BreakpointEvent>());
		CHECK(e1->get<virtkit::introspect::BreakpointEvent>()->gpa == 0x7c00);
		CHECK(e1->get<virtkit::introspect::BreakpointEvent>()->insn_len == 1);
		REQUIRE(e2->get<virtkit::introspect::TrapEvent>());
		CHECK(e2->get<virtkit::introspect::TrapEvent>()->vector == 14);
		CHECK(e2->get<virtkit::introspect::TrapEvent>()->cr2 == 0xdead);
		REQUIRE(e3->get<virtkit::introspect::SinglestepEvent>());
		CHECK(e3->get<virtkit::introspect::SinglestepEvent>()->failed);
		s.reply(*e1, Action::continue_);
		auto r = peer.read_message();
		CHECK(r.hdr.size == 16);
	}
	SECTION("reply_msr / reply_pf to another event: EINVAL, nothing sent") {
		peer.send_message(KVMI_EVENT, 12, event_payload(2, KVMI_EVENT_PAUSE_VCPU));
		auto ev = s.next_event(1s);
		REQUIRE(ev);
		CHECK(error_of([&] { s.reply_msr(*ev, Action::continue_, 0); }).err() == EINVAL);
		CHECK(error_of([&] { s.reply_pf(*ev, Action::continue_); }).err() == EINVAL);
		CHECK(s.connected());
	}
}

TEST_CASE("events: a longer kvmi_event from a newer VMM", "[introspect][event]")
{
	Peer peer;
	auto s = connect(peer);
	kvmi_event e{};
	e.size = sizeof(e) + 16;
	e.vcpu = 1;
	e.event = KVMI_EVENT_MSR;
	kvmi_event_msr m{};
	m.msr = 0x10;
	Bytes payload = pack(e);
	payload.resize(payload.size() + 16, std::byte{0x77});
	auto mb = bytes_of(m);
	payload.insert(payload.end(), mb.begin(), mb.end());
	peer.send_message(KVMI_EVENT, 5, payload);
	auto ev = s.next_event(1s);
	REQUIRE(ev);
	REQUIRE(ev->get<virtkit::introspect::MsrEvent>());
	CHECK(ev->get<virtkit::introspect::MsrEvent>()->msr == 0x10);
}

TEST_CASE("events: malformed events end the session", "[introspect][event]")
{
	Peer peer;
	auto s = connect(peer);
	std::string text;
	SECTION("shorter than kvmi_event") {
		peer.send_message(KVMI_EVENT, 1, Bytes(100));
		text = "shorter than struct kvmi_event";
	}
	SECTION("kvmi_event.size beyond the message") {
		auto p = event_payload(0, KVMI_EVENT_PAUSE_VCPU);
		kvmi_event e = load<kvmi_event>(p);
		e.size = sizeof(e) + 8;
		std::memcpy(p.data(), &e, sizeof(e));
		peer.send_message(KVMI_EVENT, 1, p);
		text = "kvmi_event.size";
	}
	SECTION("non-zero padding in kvmi_event") {
		auto p = event_payload(0, KVMI_EVENT_PAUSE_VCPU);
		p[offsetof(kvmi_event, padding)] = std::byte{1};
		peer.send_message(KVMI_EVENT, 1, p);
		text = "padding";
	}
	SECTION("an MSR event without its data") {
		peer.send_message(KVMI_EVENT, 1, event_payload(0, KVMI_EVENT_MSR));
		text = "MSR event data of 0 bytes";
	}
	SECTION("non-zero padding in kvmi_event_msr") {
		kvmi_event_msr m{};
		m.padding = 3;
		peer.send_message(KVMI_EVENT, 1, event_payload(0, KVMI_EVENT_MSR, bytes_of(m)));
		text = "padding in struct kvmi_event_msr";
	}
	auto e = error_of([&] { s.next_event(1s); });
	CHECK(e.err() == EPROTO);
	CHECK_THAT(e.what(), Contains(text));
	CHECK_FALSE(s.connected());
	CHECK(peer.sees_eof());
}

TEST_CASE("events: the queue is bounded", "[introspect][event]")
{
	Peer peer;
	SessionOptions opts;
	opts.max_queued_events = 2;
	auto s = connect(peer, opts);
	PeerThread t([&] {
		auto m = peer.read_message();
		/* One write: the client gives up at the third event. */
		Bytes all;
		for (std::uint32_t i = 0; i < 3; i++) {
			auto e = Peer::message(KVMI_EVENT, i, event_payload(0, KVMI_EVENT_PAUSE_VCPU));
			all.insert(all.end(), e.begin(), e.end());
		}
		kvmi_error_code ec{};
		auto r = Peer::message(m.hdr.id, m.hdr.seq, pack(ec, std::uint64_t(0)));
		all.insert(all.end(), r.begin(), r.end());
		peer.write_all(all);
	});
	auto e = error_of([&] { s.get_max_gfn(); });
	t.join();
	CHECK(e.err() == ENOBUFS);
	CHECK_FALSE(s.connected());
}

TEST_CASE("events: next_event times out quietly", "[introspect][event]")
{
	Peer peer;
	auto s = connect(peer);
	auto t0 = std::chrono::steady_clock::now();
	CHECK_FALSE(s.next_event(30ms));
	CHECK(std::chrono::steady_clock::now() - t0 >= 30ms);
	CHECK(s.connected());
}

/* --- batches --- */

TEST_CASE("batch: CONTROL_CMD_RESPONSE around the commands, one write", "[introspect][batch]")
{
	Peer peer;
	auto s = connect(peer);
	std::vector<Msg> msgs;
	auto read_n = [&](int n, std::int32_t reply_err) {
		return PeerThread([&, n, reply_err] {
			for (int i = 0; i < n; i++)
				msgs.push_back(peer.read_message());
			if (reply_err != 1)
				peer.reply(msgs.back(), reply_err);
		});
	};
	auto control = [](const Msg &m) { return load<kvmi_control_cmd_response>(m.payload); };

	SECTION("waiting for the reply") {
		auto t = read_n(5, 0);
		Batch b(s);
		b.pause_vcpu(0).pause_vcpu(1).control_msr(0, 0xc0000080, true);
		CHECK(b.size() == 3);
		b.commit();
		t.join();
		CHECK(b.size() == 0);
		REQUIRE(msgs.size() == 5);
		CHECK(msgs[0].hdr.id == KVMI_CONTROL_CMD_RESPONSE);
		CHECK(msgs[0].hdr.size == 8);
		CHECK(control(msgs[0]).enable == 0);
		CHECK(control(msgs[0]).now == 1);
		CHECK(all_zero(std::span(msgs[0].payload).subspan(2)));
		CHECK(msgs[1].hdr.id == KVMI_PAUSE_VCPU);
		CHECK(load<kvmi_vcpu_hdr>(msgs[2].payload).vcpu == 1);
		CHECK(load<kvmi_pause_vcpu>(msgs[2].payload, 8).wait == 1);
		CHECK(msgs[3].hdr.id == KVMI_CONTROL_MSR);
		CHECK(msgs[4].hdr.id == KVMI_CONTROL_CMD_RESPONSE);
		CHECK(control(msgs[4]).enable == 1);
		CHECK(control(msgs[4]).now == 1);
		for (std::size_t i = 1; i < msgs.size(); i++)
			CHECK(msgs[i].hdr.seq == msgs[i - 1].hdr.seq + 1);
	}
	SECTION("the first error, reported by the reply to the suffix") {
		auto t = read_n(3, -KVMI_EINVAL);
		Batch b(s);
		b.control_events(0, EventId::msr, true);
		try {
			b.commit(true);
			FAIL("no CommandError");
		} catch (const CommandError &e) {
			CHECK(e.command() == KVMI_CONTROL_CMD_RESPONSE);
			CHECK(e.err() == EINVAL);
			CHECK_THAT(e.what(), Contains("batch of 1 commands"));
		}
		t.join();
		CHECK(s.connected());
	}
	SECTION("without waiting: now=0 in the suffix") {
		auto t = read_n(3, 1);
		Batch b(s);
		std::byte cc{0xcc};
		b.write_physical(0x1000, std::span(&cc, 1));
		b.commit(false);
		t.join();
		CHECK(msgs[1].hdr.id == KVMI_WRITE_PHYSICAL);
		CHECK(control(msgs[2]).enable == 1);
		CHECK(control(msgs[2]).now == 0);
	}
	SECTION("an empty batch sends nothing") {
		Batch b(s);
		b.commit();
		PeerThread t([&] {
			auto m = peer.read_message();
			msgs.push_back(m);
			peer.reply(m, 0, Bytes(8));
		});
		s.get_max_gfn();
		t.join();
		CHECK(msgs.at(0).hdr.id == KVMI_GET_MAX_GFN);
	}
}

TEST_CASE("pause_all_vcpus: one batch of PAUSE_VCPU wait=1", "[introspect][batch]")
{
	Peer peer;
	auto s = connect(peer);
	std::vector<Msg> msgs;
	PeerThread t([&] {
		for (int i = 0; i < 5; i++)
			msgs.push_back(peer.read_message());
		peer.reply(msgs.back(), 0);
	});
	s.pause_all_vcpus(3);
	t.join();
	for (int v = 0; v < 3; v++) {
		CHECK(msgs[1 + v].hdr.id == KVMI_PAUSE_VCPU);
		CHECK(load<kvmi_vcpu_hdr>(msgs[1 + v].payload).vcpu == v);
		CHECK(load<kvmi_pause_vcpu>(msgs[1 + v].payload, 8).wait == 1);
	}
}

/* --- raw access --- */

TEST_CASE("raw: request_raw, send_bytes, wait_closed", "[introspect][raw]")
{
	Peer peer;
	auto s = connect(peer);

	SECTION("request_raw returns the error as sent") {
		Msg m;
		PeerThread t([&] {
			m = peer.read_message();
			peer.reply(m, -KVMI_ENOSYS);
		});
		std::byte junk[3] = {std::byte{1}, std::byte{2}, std::byte{3}};
		auto r = s.request_raw(99, junk);
		t.join();
		CHECK(m.hdr.id == 99);
		CHECK(m.payload.size() == 3);
		CHECK(r.err == -KVMI_ENOSYS);
		CHECK(r.data.empty());
		CHECK(s.connected());
	}
	SECTION("send_bytes sends them as they are") {
		std::byte raw[] = {std::byte{0xff}, std::byte{0xff}, std::byte{0x00}, std::byte{0x80}};
		s.send_bytes(raw);
		auto got = peer.read_exact(4);
		CHECK(got == Bytes(std::begin(raw), std::end(raw)));
	}
	SECTION("wait_closed: the VMM closes") {
		peer.send_message(KVMI_EVENT, 3, event_payload(0, KVMI_EVENT_PAUSE_VCPU));
		peer.close();
		CHECK(s.wait_closed(1s));
		CHECK_FALSE(s.connected());
		CHECK_THAT(s.disconnect_reason(), Contains("closed"));
	}
	SECTION("wait_closed: still open") {
		CHECK_FALSE(s.wait_closed(20ms));
		CHECK(s.connected());
	}
}

TEST_CASE("session: close, empty sessions", "[introspect][session]")
{
	Peer peer;
	auto s = connect(peer);
	s.close();
	CHECK_FALSE(s.connected());
	CHECK(s.disconnect_reason() == "closed by the tool");
	CHECK(peer.sees_eof());
	CHECK(error_of([&] { s.get_version(); }).err() == ENOTCONN);

	Session moved = std::move(s);
	Session empty;
	CHECK_FALSE(empty.connected());
	CHECK(empty.fd() == -1);
	CHECK(error_of([&] { empty.get_version(); }).err() == ENOTCONN);
}

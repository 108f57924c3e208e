// SPDX-License-Identifier: MIT
/*
 * Session::map_guest_memory() against a VMM peer written in the test
 * (introspect_peer.hpp): what it sends, how it maps what comes back (memfds
 * passed with SCM_RIGHTS), and how it treats a refusal, a hostile reply, a
 * socket that cannot carry descriptors (TCP) and descriptors nobody asked
 * for - with the descriptors of this process counted before and after.
 */
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mman.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "introspect_peer.hpp"

using namespace std::chrono_literals;
using namespace introspect_test;
using virtkit::Error;
using virtkit::FileDesc;
using virtkit::introspect::CommandError;
using virtkit::introspect::GuestMapping;
using virtkit::introspect::Session;
using Catch::Matchers::Contains;

namespace {

int fd_count()
{
	int n = 0;
	DIR *d = ::opendir("/proc/self/fd");
	REQUIRE(d);
	while (auto *e = ::readdir(d))
		if (e->d_name[0] != '.')
			n++;
	::closedir(d);
	return n - 1;
}

/* A memfd of `pages` pages, byte i = i * 7 + seed; returned opened O_RDONLY. */
FileDesc ram_file(std::size_t pages, unsigned seed)
{
	auto rw = FileDesc::adopt(::memfd_create("unit-ram", MFD_CLOEXEC), "memfd_create");
	std::vector<std::uint8_t> b(pages * 4096);
	for (std::size_t i = 0; i < b.size(); i++)
		b[i] = std::uint8_t(i * 7 + seed);
	REQUIRE(::pwrite(rw.get(), b.data(), b.size(), 0) == ssize_t(b.size()));
	std::string path = "/proc/self/fd/" + std::to_string(rw.get());
	return FileDesc::adopt(::open(path.c_str(), O_RDONLY | O_CLOEXEC), "open");
}

/* One message with fds attached (SCM_RIGHTS). */
void send_with_fds(Peer &peer, const Bytes &msg, const std::vector<int> &fds)
{
	iovec iov{const_cast<std::byte *>(msg.data()), msg.size()};
	msghdr m{};
	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8)] = {};
	if (!fds.empty()) {
		m.msg_control = control;
		m.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
		cmsghdr *c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
		std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
	}
	REQUIRE(::sendmsg(peer.fd(), &m, MSG_NOSIGNAL) == ssize_t(msg.size()));
}

/* The reply to the session's first command (seq 1): regions, fds. */
Bytes share_reply(const std::vector<virtkit_kvmi_memory_region> &regions, std::int32_t err = 0,
		  std::uint32_t count_override = ~0u)
{
	kvmi_error_code ec{};
	ec.err = err;
	Bytes payload = pack(ec);
	if (!err) {
		virtkit_kvmi_share_memory_reply h{};
		h.count = count_override != ~0u ? count_override : std::uint32_t(regions.size());
		auto hb = pack(h);
		payload.insert(payload.end(), hb.begin(), hb.end());
		for (auto &r : regions) {
			auto rb = pack(r);
			payload.insert(payload.end(), rb.begin(), rb.end());
		}
	}
	return Peer::message(VIRTKIT_KVMI_SHARE_MEMORY, 1, payload);
}

Session connect(FileDesc fd, Peer &peer)
{
	peer.write_all(Peer::handshake_bytes(104, "vm", 0x10000));
	auto s = Session::handshake(std::move(fd), "secret", 5s);
	(void)peer.read_handshake_reply();
	return s;
}

/* The request the session sent: VIRTKIT_KVMI_SHARE_MEMORY {flags 0}, seq 1. */
void expect_request(Peer &peer)
{
	auto m = peer.read_message();
	CHECK(m.hdr.id == VIRTKIT_KVMI_SHARE_MEMORY);
	CHECK(m.hdr.seq == 1);
	REQUIRE(m.payload.size() == sizeof(virtkit_kvmi_share_memory));
	CHECK(all_zero(m.payload));
}

} // namespace

TEST_CASE("map_guest_memory: maps the passed regions, reads across adjacent ones",
	  "[introspect][mapping]")
{
	const int fds0 = fd_count();
	{
		auto [fd, peer] = Peer::pair();
		auto s = connect(std::move(fd), peer);
		{
			auto a = ram_file(3, 1), b = ram_file(1, 2);
			/* gpa 0x1000..0x3000 = a's pages 1-2, 0x3000..0x4000 = b's page 0. */
			send_with_fds(peer, share_reply({{0x1000, 0x2000, 0x1000}, {0x3000, 0x1000, 0}}),
				      {a.get(), b.get()});
		}
		GuestMapping m = s.map_guest_memory();
		expect_request(peer);
		REQUIRE(m.regions().size() == 2);
		CHECK(m.regions()[0].gpa == 0x1000);
		CHECK(m.regions()[1].size == 0x1000);
		std::vector<std::byte> out(0x200);
		m.read(0x2f00, out); /* the last 0x100 bytes of a, the first of b */
		for (std::size_t i = 0; i < out.size(); i++) {
			std::size_t file_off = i < 0x100 ? 0x2f00 + i : i - 0x100;
			unsigned seed = i < 0x100 ? 1 : 2;
			REQUIRE(out[i] == std::byte(std::uint8_t(file_off * 7 + seed)));
		}
		auto v = m.view(0x1000, 16);
		CHECK(v[0] == std::byte(std::uint8_t(0x1000 * 7 + 1)));
		CHECK_THROWS_AS(m.view(0x2f00, 0x200), Error); /* one region only */
		try {
			m.read(0x3f00, out); /* past the end of b */
			FAIL("no error");
		} catch (const Error &e) {
			CHECK(e.err() == EFAULT);
			CHECK_THROWS_WITH(throw e, Contains("GuestMapping::read") && Contains("0x4000"));
		}
		CHECK(s.connected());
		/* Only the session's socket is open: the descriptors were closed once mapped. */
		CHECK(fd_count() == fds0 + 2);
		GuestMapping moved = std::move(m);
		CHECK(moved.regions().size() == 2);
		CHECK(m.regions().empty());
	}
	CHECK(fd_count() == fds0);
}

TEST_CASE("map_guest_memory: a refusal is a CommandError, the session goes on",
	  "[introspect][mapping]")
{
	auto [fd, peer] = Peer::pair();
	auto s = connect(std::move(fd), peer);
	peer.write_all(share_reply({}, -KVMI_EPERM));
	try {
		(void)s.map_guest_memory();
		FAIL("no error");
	} catch (const CommandError &e) {
		CHECK(e.kvmi_error() == KVMI_EPERM);
		CHECK(e.err() == EPERM);
		CHECK_THROWS_WITH(throw e, Contains("VIRTKIT_KVMI_SHARE_MEMORY") &&
						   Contains("share_memory"));
	}
	expect_request(peer);
	CHECK(s.connected());
}

TEST_CASE("map_guest_memory: refused without sending over a TCP socket", "[introspect][mapping]")
{
	auto lsn = FileDesc::adopt(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket");
	sockaddr_in a{};
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	REQUIRE(::bind(lsn.get(), reinterpret_cast<sockaddr *>(&a), sizeof(a)) == 0);
	REQUIRE(::listen(lsn.get(), 1) == 0);
	socklen_t len = sizeof(a);
	REQUIRE(::getsockname(lsn.get(), reinterpret_cast<sockaddr *>(&a), &len) == 0);
	auto client = FileDesc::adopt(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket");
	REQUIRE(::connect(client.get(), reinterpret_cast<sockaddr *>(&a), sizeof(a)) == 0);
	Peer peer(FileDesc::adopt(::accept4(lsn.get(), nullptr, nullptr, SOCK_CLOEXEC), "accept"));
	auto s = connect(std::move(client), peer);
	try {
		(void)s.map_guest_memory();
		FAIL("no error");
	} catch (const CommandError &) {
		FAIL("a command was sent");
	} catch (const Error &e) {
		CHECK(e.err() == EOPNOTSUPP);
		CHECK_THROWS_WITH(throw e, Contains("VIRTKIT_KVMI_SHARE_MEMORY") &&
						   Contains("not a unix socket"));
	}
	pollfd p{peer.fd(), POLLIN, 0};
	CHECK(::poll(&p, 1, 100) == 0); /* nothing was sent */
	CHECK(s.connected());
}

TEST_CASE("map_guest_memory: a reply without its descriptors ends the session",
	  "[introspect][mapping]")
{
	const int fds0 = fd_count();
	{
		auto [fd, peer] = Peer::pair();
		auto s = connect(std::move(fd), peer);
		peer.write_all(share_reply({{0, 0x1000, 0}}));
		try {
			(void)s.map_guest_memory();
			FAIL("no error");
		} catch (const CommandError &) {
			FAIL("a CommandError");
		} catch (const Error &e) {
			CHECK(e.err() == EPROTO);
			CHECK_THROWS_WITH(throw e, Contains("0 descriptors for 1 regions"));
		}
		CHECK_FALSE(s.connected());
	}
	CHECK(fd_count() == fds0);
}

TEST_CASE("map_guest_memory: hostile layouts end the session, descriptors closed",
	  "[introspect][mapping]")
{
	struct Case {
		const char *what;
		std::vector<virtkit_kvmi_memory_region> regions;
		std::uint32_t count;
		const char *says;
	};
	const Case cases[] = {
		{"file too short", {{0, 0x2000, 0}}, ~0u, "not a file that long"},
		{"unaligned gpa", {{0x10, 0x1000, 0}}, ~0u, "not page aligned"},
		{"empty", {{0, 0, 0}}, ~0u, "empty"},
		{"overlapping", {{0x1000, 0x1000, 0}, {0x1000, 0x1000, 0}}, ~0u, "out of order"},
		{"offset overflows", {{0, 0x1000, ~0ull & ~0xfffull}}, ~0u, "overflowing"},
		{"count larger than the data", {{0, 0x1000, 0}}, 2, "regions in"},
	};
	for (const auto &c : cases) {
		SECTION(c.what)
		{
			const int fds0 = fd_count();
			{
				auto [fd, peer] = Peer::pair();
				auto s = connect(std::move(fd), peer);
				{
					std::vector<FileDesc> files;
					std::vector<int> fds;
					for (std::size_t i = 0; i < c.regions.size(); i++) {
						files.push_back(ram_file(1, 3));
						fds.push_back(files.back().get());
					}
					send_with_fds(peer, share_reply(c.regions, 0, c.count), fds);
				}
				try {
					(void)s.map_guest_memory();
					FAIL("no error");
				} catch (const Error &e) {
					CHECK(e.err() == EPROTO);
					CHECK_THROWS_WITH(throw e, Contains(c.says));
				}
				CHECK_FALSE(s.connected());
			}
			CHECK(fd_count() == fds0);
		}
	}
}

TEST_CASE("descriptors nobody asked for are closed", "[introspect][mapping]")
{
	const int fds0 = fd_count();
	{
		auto [fd, peer] = Peer::pair();
		auto s = connect(std::move(fd), peer);
		{
			auto f = ram_file(1, 4);
			send_with_fds(peer, Peer::message(KVMI_EVENT, 9,
							  event_payload(0, KVMI_EVENT_PAUSE_VCPU)),
				      {f.get(), f.get()});
		}
		auto e = s.next_event(2000ms);
		REQUIRE(e);
		CHECK(fd_count() == fds0 + 2); /* the socket pair only */
	}
	CHECK(fd_count() == fds0);
}

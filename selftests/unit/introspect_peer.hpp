// SPDX-License-Identifier: MIT
/*
 * The VMM end of a KVMI connection, written out by hand for the unit tests
 * of virtkit::introspect: it writes and reads raw protocol bytes on its
 * socket, so the tests see exactly what the client sends and how it treats
 * what it receives. Not a KVM mock: there is no VM behind it.
 *
 * Peer operations throw std::runtime_error on a timeout or an early EOF;
 * PeerThread carries such an exception over to the test's thread.
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <virtkit/fd.hpp>
#include <virtkit/introspect.hpp>

#include "kvmi/protocol/layout.hpp"

namespace introspect_test {

using Bytes = std::vector<std::byte>;

/* The wire helpers of both library ends (kvmi/protocol/layout.hpp, with its layout checks). */
using virtkit::detail::kvmi::all_zero;
using virtkit::detail::kvmi::bytes_of;

template <class... T> Bytes pack(const T &...parts)
{
	Bytes out;
	(out.insert(out.end(), bytes_of(parts).begin(), bytes_of(parts).end()), ...);
	return out;
}

/* kvmi::load, checked: what the client sent may be short. */
template <class T> T load(std::span<const std::byte> b, std::size_t offset = 0)
{
	if (offset + sizeof(T) > b.size())
		throw std::runtime_error("load past the end");
	return virtkit::detail::kvmi::load<T>(b, offset);
}

struct Msg {
	kvmi_msg_hdr hdr{};
	Bytes payload;
};

class Peer {
public:
	Peer() = default;
	explicit Peer(virtkit::FileDesc fd) : fd_(std::move(fd)) {}

	/* A connected pair: the client's end and the peer. */
	static std::pair<virtkit::FileDesc, Peer> pair()
	{
		int sv[2];
		if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
			throw std::runtime_error("socketpair");
		auto a = virtkit::FileDesc::adopt(sv[0], "socketpair");
		auto b = virtkit::FileDesc::adopt(sv[1], "socketpair");
		return {std::move(a), Peer(std::move(b))};
	}

	/* Connect to a tool listening on a unix socket, as a VMM does. */
	static Peer connect_unix(const std::string &path)
	{
		auto fd = virtkit::FileDesc::adopt(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0),
						   "socket");
		sockaddr_un a{};
		a.sun_family = AF_UNIX;
		std::memcpy(a.sun_path, path.data(), path.size());
		if (::connect(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof(a)) < 0)
			throw std::runtime_error("connect " + path + ": " + std::strerror(errno));
		return Peer(std::move(fd));
	}

	int fd() const { return fd_.get(); }
	void close() { fd_.close(); }

	void write_all(std::span<const std::byte> b)
	{
		while (!b.empty()) {
			ssize_t n = ::send(fd_.get(), b.data(), b.size(), MSG_NOSIGNAL);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				throw std::runtime_error(std::string("peer send: ") + std::strerror(errno));
			}
			b = b.subspan(std::size_t(n));
		}
	}

	Bytes read_exact(std::size_t n, std::chrono::milliseconds timeout = std::chrono::seconds(5))
	{
		Bytes out(n);
		std::size_t got = 0;
		while (got < n) {
			pollfd p{fd_.get(), POLLIN, 0};
			int r = ::poll(&p, 1, int(timeout.count()));
			if (r == 0)
				throw std::runtime_error("peer read: timeout");
			if (r < 0) {
				if (errno == EINTR)
					continue;
				throw std::runtime_error("peer poll");
			}
			ssize_t k = ::recv(fd_.get(), out.data() + got, n - got, 0);
			if (k == 0)
				throw std::runtime_error("peer read: EOF");
			if (k < 0) {
				if (errno == EINTR)
					continue;
				throw std::runtime_error(std::string("peer recv: ") + std::strerror(errno));
			}
			got += std::size_t(k);
		}
		return out;
	}

	Msg read_message()
	{
		Msg m;
		m.hdr = load<kvmi_msg_hdr>(read_exact(sizeof(kvmi_msg_hdr)));
		m.payload = read_exact(m.hdr.size);
		return m;
	}

	/* Whether the other side closed (or shut down) within timeout; data
	 * that arrives first is skipped. */
	bool sees_eof(std::chrono::milliseconds timeout = std::chrono::seconds(5))
	{
		auto deadline = std::chrono::steady_clock::now() + timeout;
		for (;;) {
			auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
				deadline - std::chrono::steady_clock::now());
			if (left.count() <= 0)
				return false;
			pollfd p{fd_.get(), POLLIN, 0};
			if (::poll(&p, 1, int(left.count())) <= 0)
				continue;
			char buf[4096];
			ssize_t k = ::recv(fd_.get(), buf, sizeof(buf), MSG_DONTWAIT);
			if (k == 0 || (k < 0 && errno == ECONNRESET))
				return true;
		}
	}

	static Bytes message(std::uint16_t id, std::uint32_t seq, std::span<const std::byte> payload)
	{
		kvmi_msg_hdr h{};
		h.id = id;
		h.size = std::uint16_t(payload.size());
		h.seq = seq;
		Bytes out = pack(h);
		out.insert(out.end(), payload.begin(), payload.end());
		return out;
	}

	void send_message(std::uint16_t id, std::uint32_t seq, std::span<const std::byte> payload)
	{
		write_all(message(id, seq, payload));
	}

	/* A reply to req: kvmi_error_code{err} and, when err is 0, data. */
	void reply(const Msg &req, std::int32_t err, std::span<const std::byte> data = {})
	{
		kvmi_error_code ec{};
		ec.err = err;
		Bytes payload = pack(ec);
		payload.insert(payload.end(), data.begin(), data.end());
		send_message(req.hdr.id, req.hdr.seq, payload);
	}

	static Bytes handshake_bytes(std::uint32_t struct_size, const std::string &name,
				     std::uint64_t max_gpa = 0)
	{
		kvmi_qemu2introspector q{};
		q.struct_size = struct_size;
		for (int i = 0; i < 16; i++)
			q.uuid[i] = std::uint8_t(0xa0 + i);
		q.start_time = 1700000000;
		std::memcpy(q.name, name.data(), std::min(name.size(), sizeof(q.name) - 1));
		q.max_gpa = max_gpa;
		Bytes out = pack(q);
		out.resize(struct_size, std::byte{0x5a}); /* what a newer VMM adds */
		return out;
	}

	kvmi_introspector2qemu read_handshake_reply()
	{
		return load<kvmi_introspector2qemu>(read_exact(sizeof(kvmi_introspector2qemu)));
	}

private:
	virtkit::FileDesc fd_;
};

/* A KVMI_EVENT payload: kvmi_event + specific. */
inline Bytes event_payload(std::uint16_t vcpu, std::uint8_t event,
			   std::span<const std::byte> specific = {}, std::uint64_t rip = 0x1000)
{
	kvmi_event e{};
	e.size = sizeof(e);
	e.vcpu = vcpu;
	e.event = event;
	e.arch.mode = 8;
	e.arch.regs.rip = rip;
	e.arch.regs.rax = 0x1234;
	e.arch.sregs.cr3 = 0x5000;
	e.arch.msrs.efer = 0xd01;
	Bytes out = pack(e);
	out.insert(out.end(), specific.begin(), specific.end());
	return out;
}

inline Bytes msr_event_payload(std::uint16_t vcpu, std::uint32_t msr, std::uint64_t old_value,
			       std::uint64_t new_value)
{
	kvmi_event_msr m{};
	m.msr = msr;
	m.old_value = old_value;
	m.new_value = new_value;
	return event_payload(vcpu, KVMI_EVENT_MSR, bytes_of(m));
}

/* Runs a peer script on its own thread; join() rethrows what it threw. */
class PeerThread {
public:
	template <class F> explicit PeerThread(F f)
		: thread_([this, f = std::move(f)]() mutable {
			  try {
				  f();
			  } catch (...) {
				  error_ = std::current_exception();
			  }
		  })
	{
	}
	PeerThread(const PeerThread &) = delete;
	~PeerThread()
	{
		if (thread_.joinable())
			thread_.join();
	}
	void join()
	{
		thread_.join();
		if (error_)
			std::rethrow_exception(error_);
	}

private:
	std::exception_ptr error_;
	std::thread thread_;
};

/* A Session on a socketpair, after a 104-byte handshake. */
inline virtkit::introspect::Session connect(Peer &peer_out,
					    const virtkit::introspect::SessionOptions &opts = {})
{
	auto [fd, peer] = Peer::pair();
	peer.write_all(Peer::handshake_bytes(104, "unit-vm", 0x100000000));
	auto s = virtkit::introspect::Session::handshake(std::move(fd), "secret",
							 std::chrono::seconds(5), opts);
	peer.read_handshake_reply();
	peer_out = std::move(peer);
	return s;
}

} // namespace introspect_test

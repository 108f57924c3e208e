// SPDX-License-Identifier: MIT
/*
 * Shared set-up of the introspection selftests: a GuestVm with a data
 * region, a tool (virtkit::introspect::Session) listening on a unix socket
 * in a temporary directory, the VMM-side server (virtkit::Introspection)
 * attached to the VM, and one VcpuRunner thread per vCPU. The test's own
 * thread plays the tool.
 *
 * Teardown order matters: the server is disconnected first (every vCPU
 * blocked in an event resumes), then the vCPU threads are stopped.
 */
#pragma once

#include "test.hpp"
#include "vcpu_runner.hpp"

#include <linux/virtkit_kvmi.h>
#include <virtkit/introspect.hpp>
#include <virtkit/introspection.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace vkt {

namespace intro = virtkit::introspect;
using namespace std::chrono_literals;

/* A region of plain data pages, identity-mapped in the guest. */
inline constexpr std::uint64_t data_gpa = 0x40000000; /* 1 GiB */
inline constexpr std::uint64_t data_pages = 16;
inline constexpr std::uint64_t data_size = data_pages * 4096;
/* Nothing is mapped here. */
inline constexpr std::uint64_t hole_gpa = 0x80000000;

inline constexpr const char *secret = "virtkit-selftest-secret";

/* Bounds of every wait on the tool side. */
inline constexpr auto event_timeout = 10s;
inline constexpr auto quiet_time = 200ms;

/* A directory under $TMPDIR (or /tmp), removed with its contents. */
class TempDir {
public:
	TempDir()
	{
		const char *t = std::getenv("TMPDIR");
		std::string tmpl = std::string(t && *t ? t : "/tmp") + "/vkt-kvmi-XXXXXX";
		if (!::mkdtemp(tmpl.data()))
			fail(__FILE__, __LINE__, "mkdtemp failed");
		path_ = tmpl;
	}
	~TempDir()
	{
		std::error_code ec;
		std::filesystem::remove_all(path_, ec);
	}
	TempDir(const TempDir &) = delete;
	TempDir &operator=(const TempDir &) = delete;
	const std::string &path() const noexcept { return path_; }

private:
	std::string path_;
};

/* Bytes of one or more trivially copyable objects, back to back. */
template <class... T> std::vector<std::byte> bytes_of(const T &...parts)
{
	std::vector<std::byte> out;
	(
		[&] {
			auto *p = reinterpret_cast<const std::byte *>(&parts);
			out.insert(out.end(), p, p + sizeof(parts));
		}(),
		...);
	return out;
}

template <class T> T from_bytes(const std::vector<std::byte> &b, std::size_t offset = 0)
{
	T v{};
	if (b.size() < offset + sizeof(T))
		fail(__FILE__, __LINE__,
		     format("reply of %zu bytes, expected at least %zu", b.size(), offset + sizeof(T)));
	std::memcpy(&v, b.data() + offset, sizeof(T));
	return v;
}

/* A whole message: header (id, size = payload's, seq) and payload. */
inline std::vector<std::byte> message(std::uint16_t id, std::uint32_t seq,
				      const std::vector<std::byte> &payload)
{
	kvmi_msg_hdr h{id, static_cast<std::uint16_t>(payload.size()), seq};
	auto m = bytes_of(h);
	m.insert(m.end(), payload.begin(), payload.end());
	return m;
}

inline kvmi_vcpu_hdr vcpu_hdr(std::uint16_t vcpu)
{
	kvmi_vcpu_hdr h{};
	h.vcpu = vcpu;
	return h;
}

/*
 * Evaluate expr, which must fail with a command error carrying the KVMI
 * error kvmi_err (positive: KVMI_EINVAL...).
 */
#define EXPECT_KVMI_ERROR(expr, kvmi_err)                                              \
	do {                                                                           \
		try {                                                                  \
			(void)(expr);                                                  \
			::vkt::fail(__FILE__, __LINE__,                                \
				    std::string(#expr) + ": succeeded, expected error " +  \
					    std::to_string(kvmi_err));                 \
		} catch (const ::virtkit::introspect::CommandError &vk_ce_) {          \
			if (vk_ce_.kvmi_error() != (kvmi_err))                         \
				::vkt::fail(__FILE__, __LINE__,                        \
					    std::string(#expr) + ": expected error " + \
						    std::to_string(kvmi_err) +         \
						    ", got: " + vk_ce_.what());        \
		}                                                                      \
	} while (0)

/* A raw reply's error must be -kvmi_err. */
#define EXPECT_RAW_ERROR(reply_expr, kvmi_err)                                         \
	do {                                                                           \
		auto vk_r_ = (reply_expr);                                             \
		if (vk_r_.err != -(kvmi_err))                                          \
			::vkt::fail(__FILE__, __LINE__,                                \
				    ::vkt::format("%s: err %d, expected %d", #reply_expr, \
						  vk_r_.err, -(kvmi_err)));            \
	} while (0)

class KvmiTest {
public:
	explicit KvmiTest(const virtkit::x86::GuestOptions &guest = {}) : g(kvm(), guest)
	{
		/*
		 * A bug that makes a vCPU or the tool wait forever must fail
		 * this test quickly, not after the harness's 300 s.
		 */
		::alarm(90);
		data = g.memory().add(data_gpa, data_size, {.name = "kvmi-data"});
		g.identity_map(data_gpa, data_size);
		listener = intro::Listener::unix_socket(socket_path());
	}
	KvmiTest(const KvmiTest &) = delete;
	KvmiTest &operator=(const KvmiTest &) = delete;

	~KvmiTest()
	{
		if (vmm)
			vmm->disconnect();
		for (auto &r : runners)
			r->stop();
		runners.clear();
		tool.reset();
		vmm.reset();
	}

	std::string socket_path() const { return dir.path() + "/tool.sock"; }

	virtkit::IntrospectionOptions default_options() const
	{
		virtkit::IntrospectionOptions o;
		o.address = "unix:" + socket_path();
		o.secret = secret;
		for (unsigned i = 0; i < 16; i++)
			o.uuid[i] = static_cast<std::uint8_t>(0xa0 + i);
		o.name = "kvmi-selftest";
		o.start_time = 1700000000123; /* ms */
		o.handshake_timeout = 5000ms;
		return o;
	}

	/*
	 * Connect the VMM to the tool: Introspection::connect() waits for the
	 * tool's half of the handshake, so it runs on a thread while this one
	 * accepts.
	 */
	void attach(const virtkit::IntrospectionOptions &o, const std::string &tool_secret = secret)
	{
		auto fut = std::async(std::launch::async, [&] {
			return virtkit::Introspection::connect(g.vm(), o);
		});
		std::optional<intro::Session> s;
		std::exception_ptr tool_error;
		try {
			intro::SessionOptions so;
			so.command_timeout = 10000ms;
			s = intro::Session::accept(listener, tool_secret, 10000ms, so);
		} catch (...) {
			tool_error = std::current_exception();
		}
		if (fut.wait_for(15s) != std::future_status::ready)
			fail(__FILE__, __LINE__, "Introspection::connect() did not return");
		vmm.emplace(fut.get()); /* rethrows the VMM's error */
		if (tool_error)
			std::rethrow_exception(tool_error);
		tool.emplace(std::move(*s));
	}
	void attach() { attach(default_options()); }

	intro::Session &t() { return *tool; }

	template <class Fn, class... Args> VcpuRunner &add_vcpu(Fn *entry, Args... args)
	{
		auto &v = g.add_vcpu(entry, args...);
		runners.push_back(std::make_unique<VcpuRunner>(g, v));
		return *runners.back();
	}
	VcpuRunner &runner(unsigned i) { return *runners.at(i); }

	/* The next event; fails the test if none comes in time. */
	intro::Event event(std::chrono::milliseconds timeout = event_timeout)
	{
		auto e = tool->next_event(timeout);
		if (!e)
			fail(__FILE__, __LINE__,
			     format("no event within %lld ms", (long long)timeout.count()));
		return std::move(*e);
	}
	intro::Event event(intro::EventId id, std::uint16_t vcpu,
			   std::chrono::milliseconds timeout = event_timeout)
	{
		auto e = event(timeout);
		if (e.id != id || e.vcpu != vcpu)
			fail(__FILE__, __LINE__,
			     format("expected %s on vcpu %u, got %s", intro::event_name(id).c_str(),
				    vcpu, intro::describe(e).c_str()));
		return e;
	}
	void expect_no_event(std::chrono::milliseconds quiet = quiet_time)
	{
		if (auto e = tool->next_event(quiet))
			fail(__FILE__, __LINE__,
			     "unexpected event: " + intro::describe(*e));
	}

	/*
	 * Guest memory as the VMM sees it (ground truth). One aligned 8-byte
	 * access, atomic as the SPP engine's own writes of guest memory are:
	 * vCPU threads may write it meanwhile (ThreadSanitizer sees those).
	 */
	std::uint64_t peek(std::uint64_t gpa) { return guest_u64(gpa).load(std::memory_order_relaxed); }
	void poke(std::uint64_t gpa, std::uint64_t v) { guest_u64(gpa).store(v, std::memory_order_relaxed); }
	std::atomic_ref<std::uint64_t> guest_u64(std::uint64_t gpa)
	{
		TEST_ASSERT(gpa % 8 == 0, "unaligned peek/poke at %#llx", (unsigned long long)gpa);
		return std::atomic_ref<std::uint64_t>(
			*reinterpret_cast<std::uint64_t *>(g.memory().host_ptr(gpa, 8)));
	}

	TempDir dir;
	virtkit::x86::GuestVm g;
	virtkit::RegionId data{};
	intro::Listener listener;
	std::optional<virtkit::Introspection> vmm;
	std::optional<intro::Session> tool;
	std::vector<std::unique_ptr<VcpuRunner>> runners;
};

/* Wait until pred() holds, at most timeout; returns pred(). */
template <class Pred> bool wait_until(Pred pred, std::chrono::milliseconds timeout)
{
	auto end = std::chrono::steady_clock::now() + timeout;
	while (!pred()) {
		if (std::chrono::steady_clock::now() >= end)
			return pred();
		std::this_thread::sleep_for(1ms);
	}
	return true;
}

} // namespace vkt

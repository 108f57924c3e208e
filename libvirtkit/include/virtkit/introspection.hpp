// SPDX-License-Identifier: MIT
/*
 * virtkit::Introspection - serve a VM to an introspection tool over the KVMI
 * protocol (uapi/linux/virtkit_kvmi.h, Documentation/introspection.rst), on
 * stock KVM.
 *
 * The tool listens on a unix or vsock socket; connect() connects to it, runs
 * the QEMU-style handshake (the tool must answer SHA-1 of the shared secret,
 * if one is set) and serves the connection from a thread of its own until disconnect():
 *
 *	auto intro = Introspection::connect(vm, {.address = "unix:/run/tool.sock",
 *						 .secret = "s3cret"});
 *	... run the vCPUs as usual ...
 *	intro.unhook(std::chrono::seconds(2)); // before shutdown or migration
 *
 * Commands that address a vCPU run on the server's thread while that vCPU is
 * kept out of the guest. Events are raised on the vCPU's own thread inside
 * Vcpu::run() (in its exit handling, or before it enters the guest), and that
 * thread waits there for the tool's reply; a CRASH reply makes run() return
 * SystemEventExit{KVM_SYSTEM_EVENT_CRASH}. The VMM needs nothing else: no
 * extra calls in its vCPU loops.
 *
 * While connected, the introspection owns the VM's MSR filter, its vCPUs'
 * guest debugging and the sub-page protection violation handler (see
 * Documentation/introspection.rst). Disconnecting - the tool closes the
 * socket, sends something malformed, or the VMM calls disconnect() or
 * destroys the object - resumes every vCPU waiting for a reply as if the tool
 * had answered CONTINUE and removes everything the tool set: page
 * restrictions, MSR interception, single-stepping, breakpoints.
 *
 * One introspection per VM at a time (EBUSY). All members may be called from
 * any thread.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <vector>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

class Vm;

#pragma GCC visibility push(hidden)
namespace detail {
class IntrospectionServer;
}
#pragma GCC visibility pop

struct IntrospectionOptions {
	/* Where the tool listens: "unix:/path", "unix:@abstract" or "vsock:CID:PORT". */
	std::string address;
	/*
	 * The shared secret; the tool must answer SHA-1(secret). Empty: no
	 * check - any tool that the address reaches is accepted, as with
	 * QEMU's kvmi without a key, and connect() warns on stderr.
	 */
	std::string secret;
	std::array<std::uint8_t, 16> uuid{};
	/* The VM's name for the tool; at most 63 bytes. */
	std::string name;
	/* When the tool is told the VM started, in milliseconds since the
	 * epoch as QEMU sends it; 0 = now. */
	std::int64_t start_time = 0;
	/*
	 * The commands (KVMI_* ids) the tool may use; others answer
	 * -KVMI_EPERM. nullopt: every supported one. GET_VERSION,
	 * CHECK_COMMAND, CHECK_EVENT and CONTROL_CMD_RESPONSE are always allowed.
	 */
	std::optional<std::vector<std::uint16_t>> allowed_commands;
	/* The events (KVMI_EVENT_* ids) the tool may enable; nullopt: every supported one. */
	std::optional<std::vector<std::uint16_t>> allowed_events;
	/*
	 * Let the tool map guest RAM read-only (VIRTKIT_KVMI_SHARE_MEMORY,
	 * virtkit's own command: virtkit::introspect's
	 * Session::map_guest_memory()): the VMM passes each RAM region's
	 * memfd, opened O_RDONLY, over the unix socket. The tool then reads
	 * any guest memory at any time without a command - including pages
	 * whose reads the tool itself hid from the guest - so only for a
	 * trusted tool. Off: the command answers -KVMI_EPERM. Over vsock it
	 * answers -KVMI_EOPNOTSUPP (descriptors cannot be passed).
	 */
	bool share_memory = false;
	/*
	 * How long, at most, a vCPU that raised an event polls for the reply
	 * before it sleeps, as KVM's halt_poll_ns does for a halted vCPU:
	 * polling spends the vCPU thread's CPU time to save the wake-up of
	 * a sleeping thread. The window adapts per vCPU - it grows while
	 * replies come just after it and shrinks to nothing while they come
	 * later than this - so a slow tool costs no polling. 0: never poll.
	 * At most 1 s.
	 */
	std::chrono::microseconds reply_poll{200};
	/* Limit for connecting and the handshake. */
	std::chrono::milliseconds handshake_timeout{5000};
	/*
	 * Cancels connect() while it connects or runs the handshake (a VMM
	 * shutting down need not wait out handshake_timeout): once stop is
	 * requested, connect() throws Error(..., ECANCELED). Later requests
	 * do nothing; disconnect() ends a connection.
	 */
	std::stop_token stop;
};

struct IntrospectionStats {
	std::uint64_t commands;	/* commands received */
	std::uint64_t events;	/* events sent */
	std::uint64_t errors;	/* commands answered with an error, protocol errors */
	/* event replies a vCPU received itself while polling (reply_poll), not through the reader */
	std::uint64_t polled_replies;
};

class Introspection {
public:
	/*
	 * Connect to the tool and run the handshake; throws Error: EINVAL for
	 * bad options (the message says which), EBUSY when the VM already has
	 * an introspection, and Error("KVMI handshake", errno, why) when the
	 * connection or the handshake fails (ETIMEDOUT, EACCES for a wrong
	 * cookie hash, EPROTO for a malformed answer, ECANCELED when
	 * options.stop was requested, the socket's errno).
	 */
	static Introspection connect(Vm &vm, const IntrospectionOptions &options);

	/* Not connected to anything. */
	Introspection() noexcept;
	Introspection(Introspection &&) noexcept;
	/* Disconnects the connection this object held, if any. */
	Introspection &operator=(Introspection &&) noexcept;
	Introspection(const Introspection &) = delete;
	Introspection &operator=(const Introspection &) = delete;
	/* disconnect() */
	~Introspection();

	/* Whether the connection is up (the tool has not closed it, no error). */
	bool connected() const noexcept;
	/*
	 * Ask the tool to let go, as before a shutdown or migration: if it
	 * enabled KVMI_EVENT_UNHOOK, the event is raised (on vCPU 0's thread
	 * when that vCPU runs, otherwise from this thread with vCPU 0 held
	 * outside the guest) and the tool gets until timeout to close the
	 * connection. Disconnects in every case before returning. true if the
	 * tool closed the connection itself (within timeout, or before the
	 * call); false if the tool did not enable UNHOOK, did not close in
	 * time, or the connection ended for another reason.
	 */
	bool unhook(std::chrono::milliseconds timeout);
	/* Close the connection and undo everything the tool set (see above). */
	void disconnect() noexcept;
	/* Wait until the connection is closed and cleaned up; false on timeout. */
	bool wait_disconnected(std::chrono::milliseconds timeout) const;
	IntrospectionStats stats() const;

	/* The commands and events this backend serves (CHECK_* answer 0 for them). */
	static std::vector<std::uint16_t> supported_commands();
	/* BREAKPOINT is listed only where an INT3 in a guest reaches the VMM (probed once). */
	static std::vector<std::uint16_t> supported_events();

private:
	explicit Introspection(std::shared_ptr<detail::IntrospectionServer> server) noexcept;
	std::shared_ptr<detail::IntrospectionServer> server_;
};

} // namespace virtkit

#pragma GCC visibility pop

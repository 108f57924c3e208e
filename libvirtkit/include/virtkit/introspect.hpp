// SPDX-License-Identifier: MIT
/*
 * virtkit::introspect - the introspector side of the KVMI protocol.
 *
 * A tool listens (Listener); a VMM (virtkit's Introspection, or QEMU with
 * KVMI) connects to it. Each connection is a Session: after the handshake
 * the tool issues commands to the VM and its vCPUs and answers the events
 * they raise. A vCPU that raised an event waits until the tool replies.
 * EventLoop serves many Sessions (many VMs) from one thread with io_uring.
 * The wire protocol is <linux/virtkit_kvmi.h>; Documentation/introspection.rst
 * describes every command.
 *
 * Errors: a command the VMM refused throws CommandError (the KVMI error and
 * the command's name). Everything else - a timeout, a malformed or
 * unexpected message, the VMM closing the connection - throws Error naming
 * the operation, and the Session is disconnected from then on (every later
 * call throws Error with ENOTCONN).
 *
 * Threads: a Session is used by one thread at a time (commands, replies and
 * event reads share its socket and its receive buffer). Sessions do not
 * share state, so different Sessions may be used from different threads.
 * An EventLoop and the Sessions it owns belong to the thread that runs it;
 * only EventLoop::stop() may be called from any thread (and from a signal
 * handler).
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <virtkit/kvm.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <virtkit/error.hpp>
#include <virtkit/fd.hpp>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit::introspect {

#pragma GCC visibility push(hidden)
namespace detail {
struct SessionState;
struct LoopState;
struct MappingState;
} // namespace detail
#pragma GCC visibility pop

/* Event ids, kvmi_event.event (KVMI_EVENT_* of <linux/virtkit_kvmi.h>). */
enum class EventId : std::uint8_t {
	unhook = 0,
	cr = 1,
	msr = 2,
	xsetbv = 3,
	breakpoint = 4,
	hypercall = 5,
	pf = 6,
	trap = 7,
	descriptor = 8,
	create_vcpu = 9,
	pause_vcpu = 10,
	singlestep = 11,
	cpuid = 13,
};

/* Page access bits (KVMI_PAGE_ACCESS_*): set_page_access, PfEvent::access. */
inline constexpr std::uint8_t access_r = 1, access_w = 2, access_x = 4;

/* "KVMI_READ_PHYSICAL"; "KVMI command 77" for an id without a name. */
std::string command_name(std::uint16_t id);
/* "BREAKPOINT"; "event 77" for an id without a name. */
std::string event_name(EventId id);

/* errno for a KVMI error code (positive): KVMI_ENOSYS (1000) -> ENOSYS, the
 * others are errno values already; an unknown code -> EPROTO. */
int kvmi_errno(int kvmi_error) noexcept;

/* The VMM refused a command: its reply carried err != 0. */
class CommandError : public Error {
public:
	/* wire_error: kvmi_error_code.err as received (negative). */
	CommandError(std::uint16_t command, std::int32_t wire_error, std::string detail = {});
	std::uint16_t command() const noexcept { return command_; }
	/* The KVMI error code, positive: 22 (KVMI_EINVAL), 1000 (KVMI_ENOSYS). */
	int kvmi_error() const noexcept { return kvmi_error_; }

private:
	std::uint16_t command_;
	int kvmi_error_;
};

/* What the VMM said about itself in the handshake. */
struct HandshakeInfo {
	std::uint32_t struct_size = 0; /* as sent: 96 (QEMU), 104 (virtkit), more */
	std::array<std::uint8_t, 16> uuid{};
	std::string name;
	std::int64_t start_time = 0; /* milliseconds since the epoch (QEMU, virtkit) */
	/* End of guest-physical memory; virtkit's extension (struct_size >= 104). */
	std::optional<std::uint64_t> max_gpa;
};

struct SessionOptions {
	/* Used by EventLoop for the handshakes of the connections it accepts. */
	std::chrono::milliseconds handshake_timeout{5000};
	/* How long a command waits for its reply before the Session gives up. */
	std::chrono::milliseconds command_timeout{30000};
	/* Events received while the tool is busy; more is an error. Each vCPU
	 * has at most one event waiting, so this bounds a misbehaving VMM. */
	std::size_t max_queued_events = 4096;
};

/* A listening socket the VMMs connect to. Move-only. */
class Listener {
public:
	/*
	 * A unix socket at path, mode 0600. A stale socket there (nobody
	 * listening) is replaced; a live one is EADDRINUSE (found by
	 * connecting: its owner sees a connection that closes at once); any
	 * other kind of file is EEXIST and left alone. The socket file is
	 * removed when the Listener is destroyed, if it is still ours.
	 */
	static Listener unix_socket(const std::string &path, int backlog = 16);
	/* AF_VSOCK on port, any CID (VMADDR_CID_ANY). */
	static Listener vsock(std::uint32_t port, int backlog = 16);
	/* "unix:/path" or "vsock:PORT"; EINVAL for anything else. */
	static Listener parse(std::string_view address, int backlog = 16);

	Listener() noexcept = default;
	Listener(Listener &&other) noexcept;
	Listener &operator=(Listener &&other) noexcept;
	~Listener();

	int fd() const noexcept { return fd_.get(); }
	/* "unix:/path" or "vsock:PORT". */
	const std::string &address() const noexcept { return address_; }
	/* One connection (nonblocking, close-on-exec); ETIMEDOUT after timeout. */
	FileDesc accept(std::chrono::milliseconds timeout);

private:
	void unlink_socket() noexcept;

	FileDesc fd_;
	std::string address_;
	std::string path_; /* unix socket to remove */
	dev_t dev_ = 0;
	ino_t ino_ = 0;
};

/* --- command data --- */

struct Version {
	std::uint32_t version = 0;
	bool spp = false, vmfunc = false, eptp = false, ve = false;
};

struct MsrValue {
	std::uint32_t index = 0;
	std::uint64_t value = 0;
};

struct Registers {
	std::uint32_t mode = 0; /* 2, 4 or 8 (bytes of a pointer) */
	kvm_regs regs{};
	kvm_sregs sregs{};
	std::vector<MsrValue> msrs; /* in the order asked for */
};

struct Cpuid {
	std::uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
};

struct PageAccess {
	std::uint64_t gpa = 0;
	std::uint8_t access = 0; /* access_r | access_w | access_x */
};

struct PageWriteBitmap {
	std::uint64_t gpa = 0;
	std::uint32_t bitmap = 0; /* bit i: the 128-byte sub-page i is writable */
};

struct PhysicalRange {
	std::uint64_t gfn = 0;  /* first page of the RAM range */
	std::uint64_t size = 0; /* bytes */
};

/* A reply as received: err (0 or -KVMI_E*, as on the wire) and the bytes
 * after struct kvmi_error_code. */
struct RawReply {
	std::int32_t err = 0;
	std::vector<std::byte> data;
};

/* --- events --- */

struct EventMsrs {
	std::uint64_t sysenter_cs = 0, sysenter_esp = 0, sysenter_eip = 0, efer = 0, star = 0,
		      lstar = 0, cstar = 0, pat = 0, shadow_gs = 0;
};

/* The vCPU's state, sent with every event. */
struct EventArch {
	std::uint8_t mode = 0;
	std::uint16_t view = 0;
	kvm_regs regs{};
	kvm_sregs sregs{};
	EventMsrs msrs;
};

struct MsrEvent {
	std::uint32_t msr = 0;
	std::uint64_t old_value = 0, new_value = 0;
};
struct PfEvent {
	std::uint64_t gva = 0, gpa = 0;
	std::uint8_t access = 0;
	std::uint16_t view = 0;
};
struct BreakpointEvent {
	std::uint64_t gpa = 0;
	std::uint8_t insn_len = 0;
};
struct TrapEvent {
	std::uint8_t vector = 0;
	std::uint32_t error_code = 0;
	std::uint64_t cr2 = 0;
};
struct SinglestepEvent {
	bool failed = false;
};

/* Event-specific data; monostate for events without any (PAUSE_VCPU...). */
using EventData = std::variant<std::monostate, MsrEvent, PfEvent, BreakpointEvent, TrapEvent,
			       SinglestepEvent>;

struct Event {
	std::uint32_t seq = 0; /* the VMM's; the reply carries it */
	std::uint16_t vcpu = 0;
	EventId id{};
	EventArch arch;
	EventData data;

	template <class T> const T *get() const noexcept { return std::get_if<T>(&data); }
};

/* One line for logs: "vcpu 1 MSR 0xc0000080 0x500 -> 0xd01 rip 0x...". */
std::string describe(const Event &event);

enum class Action : std::uint8_t { continue_ = 0, retry = 1, crash = 2 };

/* --- one VM --- */

/*
 * Guest RAM mapped read-only into this process (Session::map_guest_memory()):
 * each RAM region of the VM as the VMM had it at the call, an mmap
 * (PROT_READ, MAP_SHARED) of the region's memfd. Reads see the guest's
 * bytes as they are now, without a command; writes through the mapping
 * fault (the files are opened read-only: PROT_WRITE is refused). Regions the
 * VMM adds later are not in it (map again); one it removes stays readable
 * here, as it was. Move-only; the destructor unmaps. May be used from any
 * thread, also after the session ended.
 */
class GuestMapping {
public:
	struct Region {
		std::uint64_t gpa;
		std::uint64_t size;
	};

	/* Maps nothing. */
	GuestMapping() noexcept;
	GuestMapping(GuestMapping &&) noexcept;
	GuestMapping &operator=(GuestMapping &&) noexcept;
	GuestMapping(const GuestMapping &) = delete;
	GuestMapping &operator=(const GuestMapping &) = delete;
	~GuestMapping();

	/* The mapped regions, sorted by gpa. */
	std::span<const Region> regions() const noexcept;
	/*
	 * Copy guest-physical [gpa, gpa + out.size()) into out; the range may
	 * cross from one region into an adjacent one. Error("GuestMapping::read",
	 * EFAULT, which address) when any byte of it is not mapped; nothing
	 * is copied then.
	 */
	void read(std::uint64_t gpa, std::span<std::byte> out) const;
	/*
	 * The mapped bytes of [gpa, gpa + size) themselves, which must lie in
	 * one region (Error("GuestMapping::view", EFAULT) otherwise); valid
	 * while this object lives.
	 */
	std::span<const std::byte> view(std::uint64_t gpa, std::size_t size) const;

private:
	friend class Session;
	explicit GuestMapping(std::unique_ptr<detail::MappingState> state) noexcept;
	std::unique_ptr<detail::MappingState> state_;
};

class Session {
public:
	/* Wait for a VMM to connect to listener (ETIMEDOUT) and run the handshake;
	 * timeout covers both. */
	static Session accept(Listener &listener, std::string_view secret,
			      std::chrono::milliseconds timeout, const SessionOptions &options = {});
	/* Run the handshake on a connected socket. */
	static Session handshake(FileDesc socket, std::string_view secret,
				 std::chrono::milliseconds timeout,
				 const SessionOptions &options = {});

	Session() noexcept;
	Session(Session &&other) noexcept;
	Session &operator=(Session &&other) noexcept;
	~Session();

	const HandshakeInfo &info() const;
	bool connected() const noexcept;
	/* Why the session ended: the Error's message, or "closed by the tool". */
	const std::string &disconnect_reason() const;
	int fd() const noexcept;
	/* Close the connection: the VMM resumes every waiting vCPU. */
	void close() noexcept;

	/* VM commands. */
	Version get_version();
	/* 0 if the VMM lets this tool use the command (the event), else the
	 * errno of its answer (EPERM, EOPNOTSUPP, ENOSYS...). Command ids are
	 * the KVMI_* message ids of <linux/virtkit_kvmi.h>. */
	int check_command(std::uint16_t id);
	int check_event(EventId id);
	std::uint32_t get_guest_info(); /* the number of vCPUs */
	void control_vm_events(EventId id, bool enable);
	/* Any size: split into page-bounded requests (the VMM serves one
	 * page per READ_PHYSICAL / WRITE_PHYSICAL). */
	void read_physical(std::uint64_t gpa, std::span<std::byte> out);
	/* Error ENOMEM (nothing sent, still connected) for a size no buffer
	 * can hold. */
	std::vector<std::byte> read_physical(std::uint64_t gpa, std::size_t size);
	void write_physical(std::uint64_t gpa, std::span<const std::byte> data);
	/* At most max_page_entries pages per call (one message). */
	void set_page_access(std::span<const PageAccess> pages, std::uint16_t view = 0);
	void control_spp(bool enable);
	void set_page_write_bitmap(std::span<const PageWriteBitmap> pages, std::uint16_t view = 0);
	std::uint64_t get_max_gfn();
	PhysicalRange query_physical(std::uint64_t gfn);
	/*
	 * Map guest RAM read-only (VIRTKIT_KVMI_SHARE_MEMORY, virtkit's own
	 * command): the VMM passes its regions' memfds over the unix socket.
	 * CommandError KVMI_EPERM when the VMM did not opt in (virtkit:
	 * IntrospectionOptions::share_memory), KVMI_EOPNOTSUPP when it cannot
	 * pass descriptors, KVMI_ENOSYS from a VMM that is not virtkit (the
	 * session stays usable after each); Error EOPNOTSUPP, with nothing
	 * sent, when this session's socket is not a unix socket (TCP, vsock);
	 * Error("mmap", errno) when mapping fails. A reply that does not match
	 * the layout ends the session (EPROTO). No descriptor stays open.
	 */
	GuestMapping map_guest_memory();

	/* vCPU commands. */
	std::uint64_t get_tsc_speed(std::uint16_t vcpu); /* GET_VCPU_INFO; Hz, 0 unknown */
	/* The vCPU raises a PAUSE_VCPU event before it next enters the guest;
	 * wait: the reply comes once it has left the guest. */
	void pause_vcpu(std::uint16_t vcpu, bool wait = true);
	/* pause_vcpu(v, true) for v < count, in one batch. */
	void pause_all_vcpus(std::uint32_t count);
	void control_events(std::uint16_t vcpu, EventId id, bool enable);
	void control_cr(std::uint16_t vcpu, std::uint32_t cr, bool enable);
	void control_msr(std::uint16_t vcpu, std::uint32_t msr, bool enable);
	Registers get_registers(std::uint16_t vcpu, std::span<const std::uint32_t> msrs = {});
	void set_registers(std::uint16_t vcpu, const kvm_regs &regs);
	Cpuid get_cpuid(std::uint16_t vcpu, std::uint32_t function, std::uint32_t index = 0);
	std::vector<std::byte> get_xsave(std::uint16_t vcpu);
	void set_xsave(std::uint16_t vcpu, std::span<const std::byte> xsave);
	std::uint64_t get_xcr(std::uint16_t vcpu, std::uint8_t xcr);
	void inject_exception(std::uint16_t vcpu, std::uint8_t vector,
			      std::uint32_t error_code = 0, std::uint64_t address = 0);
	std::uint8_t get_mtrr_type(std::uint16_t vcpu, std::uint64_t gpa);
	std::uint64_t translate_gva(std::uint16_t vcpu, std::uint64_t gva);
	void control_singlestep(std::uint16_t vcpu, bool enable);

	/* Events: those received while a command waited come first. nullopt if
	 * none arrives within timeout. */
	std::optional<Event> next_event(std::chrono::milliseconds timeout);
	std::size_t pending_events() const noexcept;
	/* Answer an event; the vCPU resumes. For MSR events the write goes
	 * ahead (new_val = the event's new_value); use reply_msr to change it. */
	void reply(const Event &event, Action action);
	void reply_msr(const Event &event, Action action, std::uint64_t new_value);
	void reply_pf(const Event &event, Action action);

	/* Raw access, for tests of the VMM's handling of hostile input.
	 * Error EINVAL, with nothing sent, for id 1 (KVMI_EVENT: the reply
	 * would read as an event) and, here, id 0 (an event reply gets no
	 * reply). */
	RawReply request_raw(std::uint16_t id, std::span<const std::byte> payload);
	/* A message with the next seq, not waiting for a reply; returns the
	 * seq. Error EINVAL for id 1, as request_raw(). */
	std::uint32_t send_raw(std::uint16_t id, std::span<const std::byte> payload);
	RawReply receive_raw(std::uint16_t id, std::uint32_t seq);
	/* Bytes as they are, in one send. */
	void send_bytes(std::span<const std::byte> bytes);
	/* Wait for the VMM to close the connection; true if it did within
	 * timeout. Events that arrive meanwhile are queued, replies to raw
	 * requests nobody waits for are dropped. */
	bool wait_closed(std::chrono::milliseconds timeout);

	/* Entries of SET_PAGE_ACCESS / SET_PAGE_WRITE_BITMAP in one message. */
	static constexpr std::size_t max_page_entries = 511;

private:
	friend class Batch;
	friend struct detail::LoopState;
	explicit Session(std::unique_ptr<detail::SessionState> state) noexcept;
	detail::SessionState &state() const;

	std::unique_ptr<detail::SessionState> state_;
};

/*
 * Commands sent together in one write, without a reply each, as libkvmi
 * does: CONTROL_CMD_RESPONSE{enable=0} before them, CONTROL_CMD_RESPONSE
 * {enable=1} after. The VMM runs every command; the reply to the last one
 * carries the first error, if any (there is no rollback).
 */
class Batch {
public:
	explicit Batch(Session &session) noexcept : session_(&session) {}

	Batch &pause_vcpu(std::uint16_t vcpu, bool wait = true);
	Batch &control_events(std::uint16_t vcpu, EventId id, bool enable);
	Batch &control_vm_events(EventId id, bool enable);
	Batch &control_cr(std::uint16_t vcpu, std::uint32_t cr, bool enable);
	Batch &control_msr(std::uint16_t vcpu, std::uint32_t msr, bool enable);
	Batch &set_registers(std::uint16_t vcpu, const kvm_regs &regs);
	Batch &inject_exception(std::uint16_t vcpu, std::uint8_t vector,
				std::uint32_t error_code = 0, std::uint64_t address = 0);
	Batch &write_physical(std::uint64_t gpa, std::span<const std::byte> data);
	Batch &set_page_access(std::span<const PageAccess> pages, std::uint16_t view = 0);
	Batch &control_spp(bool enable);
	Batch &set_page_write_bitmap(std::span<const PageWriteBitmap> pages,
				     std::uint16_t view = 0);
	Batch &control_singlestep(std::uint16_t vcpu, bool enable);
	Batch &raw(std::uint16_t id, std::span<const std::byte> payload);

	std::size_t size() const noexcept { return count_; }
	/* Send everything; wait: for the reply, throwing CommandError
	 * ("KVMI_CONTROL_CMD_RESPONSE") with the first error. The batch is
	 * empty afterwards. */
	void commit(bool wait = true);

private:
	Batch &add(std::uint16_t id, std::span<const std::byte> payload);

	Session *session_;
	std::vector<std::byte> messages_;
	std::size_t count_ = 0;
	std::uint32_t prefix_seq_ = 0;
};

/* EventLoop's readiness backend. */
enum class LoopBackend : std::uint8_t {
	/* $VIRTKIT_EVENT_LOOP (epoll, io_uring, auto) if set; else io_uring
	 * where it can be set up, epoll where not (a seccomp filter,
	 * kernel.io_uring_disabled, an old kernel). */
	automatic,
	io_uring, /* only io_uring: Error if it cannot be set up */
	epoll,
};

/*
 * Many VMs from one thread: accepts connections on Listeners, runs their
 * handshakes without blocking, watches every Session's socket (io_uring
 * multishot poll and accept, or epoll: see LoopBackend) and hands each
 * event to on_event. Callbacks run on
 * the loop's thread and may issue synchronous commands on any Session.
 * A Session whose connection ends (the VMM closed it, an error, or the tool
 * called close()) gets on_disconnect - called with the same Session object
 * that on_session and on_event got - and is destroyed right after.
 */
class EventLoop {
public:
	struct Handlers {
		std::function<void(Session &)> on_session;
		/* The vCPU waits until the tool replies (now or later). Without
		 * on_event every event is answered CONTINUE. */
		std::function<void(Session &, Event &)> on_event;
		std::function<void(Session &)> on_disconnect;
		/* A failed accept or handshake; the loop goes on. */
		std::function<void(const Error &)> on_error;
	};

	explicit EventLoop(Handlers handlers, unsigned ring_entries = 64);
	/* Error EINVAL for a VIRTKIT_EVENT_LOOP that names no backend. */
	EventLoop(Handlers handlers, LoopBackend backend, unsigned ring_entries = 64);
	EventLoop(const EventLoop &) = delete;
	EventLoop &operator=(const EventLoop &) = delete;
	~EventLoop();

	void listen(Listener listener, std::string secret, SessionOptions options = {});
	/* A Session made elsewhere; the loop owns it from now on. */
	Session &add(Session session);
	std::size_t session_count() const noexcept;
	/* The backend in use, for logs: "io_uring (multishot poll, multishot
	 * accept, defer_taskrun)", "epoll (io_uring: io_uring_setup
	 * (kernel.io_uring_disabled=2): EPERM (Operation not permitted))". */
	const std::string &backend() const noexcept;
	LoopBackend backend_kind() const noexcept;

	/* Until stop(), or until there is nothing left to wait for (no
	 * listener, no session). An exception from a callback propagates,
	 * unless it is an Error that ended that callback's Session. */
	void run();
	/* Like run(), at most timeout; true if it ended by stop() or for lack
	 * of work, false on timeout. */
	bool run_for(std::chrono::milliseconds timeout);
	/* Make run() return soon. Any thread, async-signal-safe. */
	void stop() noexcept;

private:
	std::unique_ptr<detail::LoopState> state_;
};

} // namespace virtkit::introspect

#pragma GCC visibility pop

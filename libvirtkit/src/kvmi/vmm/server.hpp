// SPDX-License-Identifier: MIT
/*
 * Internal: the KVMI server behind virtkit::Introspection (user backend).
 *
 * Threads:
 *  - the thread that holds the read role (read_mu_) reads the tool's
 *    messages and executes commands: VM commands directly, vCPU commands
 *    under a VcpuHold of that vCPU (it stays out of the guest meanwhile);
 *    it also completes event replies. That is the reader thread, or a vCPU
 *    thread while it polls for its own event's reply;
 *  - vCPU threads raise events (raise()) from the VcpuWork before_entry()
 *    (PAUSE_VCPU, CREATE_VCPU, TRAP, UNHOOK) and from exit handlers (MSR,
 *    BREAKPOINT, SINGLESTEP, PF: writes through the SPP violation handler,
 *    reads of hidden pages through MMIO exits) and wait for the reply or
 *    the disconnect: polling for a while (reply_poll.hpp), taking the read
 *    role when it is free, then asleep;
 *  - any thread may disconnect (request_stop()); the reader then undoes
 *    every change (teardown()) and exits.
 *
 * Locks (never two at once, except restr_mu_ -> mu_):
 *  - mu_: the per-vCPU records, waiting events, policy and connection
 *    state; cv_ signals replies and the disconnect. Not held across KVM
 *    ioctls of a vCPU that could be in the guest.
 *  - restr_mu_: the page restrictions; held across SubpageProtection calls
 *    (which the SPP violation path never holds when it calls us) and the
 *    memory map's lock (restr_mu_ -> memory lock, never the reverse).
 *  - Connection: its own send lock.
 *
 * Lifetime: shared_ptr. The Introspection handle, the reader thread, the
 * VcpuWork slot of the VM and the exit handler (weakly) refer to it; the
 * VM's slots are cleared by teardown(), which breaks the VmState <-> server
 * cycle.
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <thread>
#include <vector>

#include <virtkit/introspection.hpp>
#include <virtkit/spp.hpp>
#include <virtkit/vcpu.hpp>
#include <virtkit/vm.hpp>

#include "core/memory_map.hpp"
#include "core/run_control.hpp"
#include "kvmi/vmm/connection.hpp"
#include "kvmi/vmm/reply_poll.hpp"

namespace virtkit::detail {

/* One event a vCPU thread waits in (on its stack). Under mu_. */
struct KvmiWaiter {
	std::uint32_t seq;
	std::uint16_t vcpu;
	std::uint8_t event;
	bool done = false;
	std::uint8_t action = KVMI_EVENT_ACTION_CONTINUE;
	/* The event-specific reply (MSR: new_val; PF: ignored beyond validation). */
	std::array<std::byte, sizeof(kvmi_event_pf_reply)> reply{};
	/* The event's registers: GET_REGISTERS shows them, SET_REGISTERS changes them. */
	kvm_regs regs{};
	bool regs_set = false;
};

/* The introspection state of one vCPU. Under mu_. */
struct KvmiVcpu {
	std::uint16_t id;
	std::uint32_t events = 0;		/* bit n: KVMI_EVENT n enabled */
	std::set<std::uint32_t> msrs;		/* CONTROL_MSR */
	unsigned pauses = 0;			/* PAUSE_VCPU events still to raise */
	std::optional<kvmi_inject_exception> inject; /* INJECT_EXCEPTION pending */
	bool singlestep = false;		/* CONTROL_SINGLESTEP */
	std::uint32_t debug_control = 0;	/* what KVM_SET_GUEST_DEBUG last got from us */
	bool create_pending = false, create_sent = false;
	bool crash = false;			/* a CRASH reply: run() returns the crash exit */
	KvmiWaiter *waiting = nullptr;		/* the event this vCPU waits in */
	kvmi::ReplyPoll reply_poll;		/* how long its next wait polls */

	bool enabled(std::uint16_t event) const { return events >> event & 1; }
};

/* What a tool's restriction of one page is. Under restr_mu_. */
struct KvmiPage {
	std::uint8_t access = KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_W | KVMI_PAGE_ACCESS_X;
	std::uint32_t bitmap = SubpageProtection::all_writable; /* SET_PAGE_WRITE_BITMAP */

	/* The SPP map that enforces it: no W blocks the page, else the bitmap. */
	std::uint32_t map() const
	{
		return (access & KVMI_PAGE_ACCESS_W) ? bitmap : 0;
	}
	bool unrestricted() const { return map() == SubpageProtection::all_writable; }
	/*
	 * No R: the page is taken out of every memslot, so guest reads exit
	 * as MMIO (on_mmio_read). It has no W either (validated), so its map
	 * is 0 and guest writes stay the SPP engine's: one path each.
	 */
	bool hidden() const { return !(access & KVMI_PAGE_ACCESS_R); }
};

class IntrospectionServer final : public VcpuWork,
				  public std::enable_shared_from_this<IntrospectionServer> {
public:
	IntrospectionServer(Vm vm, const IntrospectionOptions &options);
	~IntrospectionServer() override;

	/* After the handshake: install the exit handler, start the reader. */
	void start(std::unique_ptr<kvmi::Connection> conn);
	/* Give the VM's VcpuWork slot back (connect failed before start()). */
	void release_vm() noexcept;

	bool connected() const noexcept;
	void request_stop() noexcept;
	/* request_stop(), then wait for the teardown (not on the reader thread). */
	void disconnect() noexcept;
	bool wait_disconnected(std::chrono::milliseconds timeout) const;
	bool unhook(std::chrono::milliseconds timeout);
	IntrospectionStats stats() const;

	/* VcpuWork: PAUSE_VCPU, CREATE_VCPU, injection + TRAP, UNHOOK, CRASH. */
	std::optional<Exit> before_entry(Vcpu &vcpu) override;

	/* Whether an INT3 in a guest reaches the VMM on this host (probed once). */
	static bool int3_exits();

private:
	/* --- server.cpp: reader, dispatch, policy, teardown --- */
	void reader_main();
	/* Run the messages the connection has; under read_mu_ (server.cpp). */
	bool drain_locked(bool may_block);
	void teardown() noexcept;
	bool handle_command(const kvmi_msg_hdr &hdr, std::span<const std::byte> payload);
	/* VIRTKIT_KVMI_SHARE_MEMORY: the reply carries descriptors (vm_commands.cpp). */
	bool share_memory(const kvmi_msg_hdr &hdr, std::span<const std::byte> payload);
	/* 0, or why VIRTKIT_KVMI_SHARE_MEMORY is refused on this connection. */
	int share_memory_refusal() const;
	int execute(std::uint16_t id, std::span<const std::byte> payload, std::vector<std::byte> &out);
	bool command_allowed(std::uint16_t id) const;
	bool event_allowed(std::uint16_t id) const;
	/* The record of vCPU id (created on first use). Under mu_. */
	KvmiVcpu &record_locked(std::uint16_t id);

	/* --- vm_commands.cpp --- */
	int vm_command(std::uint16_t id, std::span<const std::byte> p, std::vector<std::byte> &out);
	int check_command(std::span<const std::byte> p);
	int check_event(std::span<const std::byte> p);
	int control_vm_events(std::span<const std::byte> p);
	int read_physical(std::span<const std::byte> p, std::vector<std::byte> &out);
	int write_physical(std::span<const std::byte> p);
	int max_gfn(std::vector<std::byte> &out);
	int query_physical(std::span<const std::byte> p, std::vector<std::byte> &out);

	/* --- vcpu_commands.cpp (the vCPU is held) --- */
	int vcpu_command(std::uint16_t id, Vcpu &vcpu, std::span<const std::byte> p,
			 std::vector<std::byte> &out);
	int control_events(Vcpu &vcpu, std::span<const std::byte> p);
	int get_registers(Vcpu &vcpu, std::span<const std::byte> p, std::vector<std::byte> &out);
	int set_registers(Vcpu &vcpu, std::span<const std::byte> p);
	int get_cpuid(Vcpu &vcpu, std::span<const std::byte> p, std::vector<std::byte> &out);
	int get_xsave(Vcpu &vcpu, std::vector<std::byte> &out);
	int set_xsave(Vcpu &vcpu, std::span<const std::byte> p);
	int get_xcr(Vcpu &vcpu, std::span<const std::byte> p, std::vector<std::byte> &out);
	int inject_exception(Vcpu &vcpu, std::span<const std::byte> p);
	int get_mtrr_type(Vcpu &vcpu, std::span<const std::byte> p, std::vector<std::byte> &out);
	int translate_gva(Vcpu &vcpu, std::span<const std::byte> p, std::vector<std::byte> &out);

	/* --- events.cpp --- */
	struct Outcome {
		std::uint8_t action = KVMI_EVENT_ACTION_CONTINUE;
		bool replied = false;	/* false: disconnected (or deadline) */
		std::array<std::byte, sizeof(kvmi_event_pf_reply)> reply{};
	};
	/*
	 * Send event `event` of vcpu with its specific data and wait for the
	 * reply (or the disconnect, or deadline: CONTINUE). Applies registers
	 * the tool set meanwhile; a CRASH reply marks the vCPU (before_entry
	 * turns that into the crash exit). vcpu == nullptr: no vCPU exists (an
	 * UNHOOK from the VMM's thread): zero registers.
	 */
	Outcome raise(std::uint16_t vcpu_id, Vcpu *vcpu, std::uint8_t event,
		      std::span<const std::byte> data,
		      std::optional<kvmi::Clock::time_point> deadline = std::nullopt,
		      const kvmi_event_arch *arch = nullptr);
	/*
	 * The vCPU state every event carries (registers, segments, the nine
	 * MSRs), reading the MSRs of `extra` (up to 4) in the same
	 * KVM_GET_MSRS; one the vCPU lacks reads as 0.
	 */
	static kvmi_event_arch event_arch(Vcpu &vcpu, std::span<kvm_msr_entry> extra = {});
	/* raise(): poll for w's reply until poll_end; settled_ read before the event went out. */
	void poll_for_reply(const KvmiWaiter &w, std::uint64_t settled, kvmi::Clock::time_point poll_end);
	/* An event reply from the tool; false: malformed, close the connection. */
	bool complete_event(const kvmi_msg_hdr &hdr, std::span<const std::byte> p);
	/* Whether vcpu has `event` enabled and the connection is up. */
	bool wants(std::uint16_t vcpu, std::uint16_t event);
	int pause_vcpu(Vcpu &vcpu, std::span<const std::byte> p);
	/* Inject e at the next entry; returns what the guest gets (for TRAP). */
	kvmi_event_trap apply_injection(Vcpu &vcpu, const kvmi_inject_exception &e);

	/* --- restrictions.cpp --- */
	int set_page_access(std::span<const std::byte> p);
	int control_spp(std::span<const std::byte> p);
	int enable_spp_locked(); /* under restr_mu_ */
	int set_page_write_bitmap(std::span<const std::byte> p);
	/* Apply new page states all or nothing; 0 or -KVMI_E*. Under restr_mu_. */
	int apply_pages_locked(const std::map<std::uint64_t, KvmiPage> &changes);
	/* Hide or show pages as `hidden` says, all or nothing. Under restr_mu_. */
	void set_hidden_locked(const std::map<std::uint64_t, bool> &hidden);
	SppDecision on_spp_violation(Vcpu &vcpu, const SppViolation &v);
	/*
	 * PF events for one blocked guest access until the tool lets it
	 * happen: true for CONTINUE, for RETRY once allowed() holds, and when
	 * nobody is asked (PF not enabled, disconnected); false for CRASH.
	 */
	bool pf_allows(Vcpu &vcpu, const kvmi_event_pf &pf, const std::function<bool()> &allowed);
	/* Whether the guest may not read the page holding gpa now. */
	bool read_blocked(std::uint64_t gpa);
	/* A guest read of a hidden page (an MMIO read exit). */
	ExitAction on_mmio_read(Vcpu &vcpu, const MmioExit &m);
	void remove_restrictions() noexcept;

	/* --- msr_filter.cpp --- */
	int control_msr(Vcpu &vcpu, std::span<const std::byte> p);
	/* Rebuild the VM's MSR filter from every vCPU's controlled MSRs. */
	int update_msr_filter();
	ExitAction on_msr_exit(Vcpu &vcpu, MsrExit &m);
	void remove_msr_filter() noexcept;

	/* --- guest_debug.cpp --- */
	int control_singlestep(Vcpu &vcpu, std::span<const std::byte> p);
	/* KVM_SET_GUEST_DEBUG as the vCPU's BREAKPOINT/singlestep state says. */
	void apply_guest_debug(Vcpu &vcpu);
	ExitAction on_debug_exit(Vcpu &vcpu, DebugExit &d);
	void remove_guest_debug() noexcept;

	ExitAction on_exit(Vcpu &vcpu, Exit &exit);

	Vm vm_;
	std::optional<std::vector<std::uint16_t>> allowed_commands_, allowed_events_;
	const bool share_memory_;
	/* IntrospectionOptions::reply_poll; 0 where only one CPU may run us. */
	const std::chrono::nanoseconds reply_poll_;

	std::unique_ptr<kvmi::Connection> conn_;
	std::thread reader_;
	/*
	 * The read role: receiving and running the tool's messages, by the
	 * reader thread or a vCPU thread polling for its reply. Guards the
	 * connection's receive buffer and reply queue and what follows.
	 */
	std::mutex read_mu_;
	std::vector<std::byte> payload_ = std::vector<std::byte>(KVMI_MSG_SIZE);
	std::vector<std::byte> reply_;		/* reply data, reused */
	bool read_error_ = false;		/* a message broke the protocol */
	bool read_ended_ = false;		/* no more messages are read */
	std::mutex join_mu_;
	ExitHandlerRegistration exit_reg_;

	mutable std::mutex mu_;
	mutable std::condition_variable cv_;
	bool connected_ = false;
	bool stopping_ = false;
	bool closed_by_tool_ = false;
	bool torn_down_ = false;
	std::uint32_t next_seq_ = 0;
	std::map<std::uint32_t, KvmiWaiter *> waiters_;
	std::map<std::uint16_t, std::unique_ptr<KvmiVcpu>> vcpus_;
	std::uint32_t vm_events_ = 0;		/* UNHOOK, CREATE_VCPU enabled */
	enum class Unhook { none, requested, claimed } unhook_ = Unhook::none;
	std::uint16_t unhook_vcpu_ = 0;		/* whose thread raises UNHOOK */
	unsigned pollers_ = 0;			/* vCPUs in poll_for_reply() */
	/* Under the read role (read_mu_), or the reader's teardown once reading ended: */
	bool replies_enabled_ = true;		/* CONTROL_CMD_RESPONSE */
	int batch_error_ = 0;			/* first error while replies are off */
	std::set<std::uint32_t> filtered_msrs_;	/* write-denied by our MSR filter */
	std::atomic<bool> msr_filter_used_{false}; /* FILTER exits are ours from then on */

	std::mutex restr_mu_;
	std::map<std::uint64_t, KvmiPage> pages_;	/* restricted pages by gfn */
	/*
	 * CONTROL_SPP: never sent (the first SET_PAGE_WRITE_BITMAP enables
	 * SPP itself: libkvmi has no call that sends CONTROL_SPP), enabled,
	 * or disabled by the tool (bitmaps refused until it enables again).
	 */
	enum class SppControl { unset, enabled, disabled } spp_control_ = SppControl::unset;
	SubpageProtection *spp_ = nullptr;		/* once we installed our handler */

	std::atomic<std::uint64_t> n_commands_{0}, n_events_{0}, n_errors_{0}, n_polled_replies_{0};
	/*
	 * Moves whenever a waiting vCPU may have to stop waiting (a reply
	 * completed, the disconnect): what a polling vCPU watches instead of
	 * taking mu_ in its loop.
	 */
	std::atomic<std::uint64_t> settled_{0};
};

/* -KVMI_E* for an errno from a failed KVM call. */
int kvmi_error(int err);

/*
 * The gpa a guest-virtual address maps to with the vCPU's current paging, ~0
 * if none (vcpu_commands.cpp: the one place addresses are translated).
 */
std::uint64_t gva_to_gpa(Vcpu &vcpu, std::uint64_t gva);

/* Append a wire struct to reply data. */
template <class T> void append_bytes(std::vector<std::byte> &out, const T &v)
{
	auto b = std::as_bytes(std::span(&v, 1));
	out.insert(out.end(), b.begin(), b.end());
}

/*
 * The per-VM handlers that consume the MSR-filter and guest-debug exits a
 * torn-down setting left in flight (msr_filter.cpp, guest_debug.cpp).
 * Attached when a server starts, not when a setting is dropped: a vCPU
 * calls the handlers of the list it took when its exit arrived, which
 * must already hold them.
 */
void attach_stray_msr_exits(Vm &vm);
void attach_stray_debug_exits(Vm &vm);

} // namespace virtkit::detail

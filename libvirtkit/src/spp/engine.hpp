// SPDX-License-Identifier: MIT
/*
 * Internal: the enforcement engine of sub-page protection, one for both
 * backends; SubpageProtection is its public face and owns it. What varies
 * between the backends is only where the maps live, the store (store.hpp),
 * and the backend's kind is its store's: with the `user` store the maps are
 * in this process; with the `kmod` store they are in virtkit.ko, whose
 * VIRTKIT_VCPU_RUN completes the allowed writes to protected pages in the
 * kernel and hands everything else - violations, guard pages, multi-piece
 * writes it does not own - to this engine unchanged.
 *
 * Pages that are protected, and their neighbours when a write could straddle
 * into a protected sub-page 0 or 31, sit in read-only memslots. A guest
 * write there is not performed by KVM; it is emulated and reported as MMIO,
 * in up to 8 bytes per exit. The exit handler collects every piece of the
 * one write (KVM_RUN with immediate_exit completes a piece without running
 * the guest and yields the next), checks the whole write against the table,
 * and either performs it in the VMM's mapping or reports a violation. So a
 * write is blocked whole or performed whole, never partly. A decision reads
 * each page's map once (one store GET for the at most two pages a write
 * touches).
 *
 * Locking: the store and the layout are guarded by the memory map's lock:
 * set_access holds it exclusively while it re-cuts slots and updates the
 * store, the exit handler holds it shared while it decides and writes.
 */
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>

#include <virtkit/vm.hpp>

#include "core/memory_map.hpp"
#include "core/run_control.hpp"
#include "spp/store.hpp"
#include "spp/system_writes.hpp"
#include "spp/x86_decode.hpp"

namespace virtkit::detail {

class MapWindow;

class SppEngine final : private RegionObserver {
public:
	SppEngine(MemoryMap &mem, std::unique_ptr<SppStore> store);
	~SppEngine();

	/* The exit handler the VM must register (at the highest priority). */
	ExitAction on_exit(Vcpu &vcpu, Exit &exit);
	void keep_registration(ExitHandlerRegistration reg) { reg_ = std::move(reg); }
	/*
	 * Watch vm's vCPUs for instructions KVM restarts for ever on a
	 * trapping page (system_writes.hpp) and complete them.
	 */
	void watch_stalls(Vm &vm);

	/*
	 * What SubpageProtection offers, after it validated what does not
	 * depend on guest memory (flags, wrapping ranges).
	 */
	SppBackendKind kind() const noexcept { return store_->kind(); }
	void set_access(std::uint64_t gfn, std::span<const std::uint32_t> maps);
	/* Checks the range before it allocates the result. */
	std::vector<std::uint32_t> get_access(std::uint64_t gfn, std::uint64_t npages) const;
	void on_violation(SppViolationHandler handler);
	SppStats stats() const;
	/*
	 * KVM_CAP_EXIT_ON_EMULATION_FAILURE is on: KVM reports every
	 * emulation failure, at any CPL, with no #UD of its own queued. The
	 * engine completes what it can and raises #UD for the rest as KVM
	 * does without the capability (resuming at CPL > 0).
	 */
	void set_exit_on_emulation_failure() noexcept
	{
		exit_on_emulation_failure_.store(true, std::memory_order_relaxed);
	}

private:
	void region_moved(std::uint64_t from, std::uint64_t to, std::uint64_t size) override;
	void region_removed(std::uint64_t gpa, std::uint64_t size) noexcept override;
	void region_placed(std::uint64_t gpa, std::uint64_t size) override;
	/* Whether page gfn must trap writes, given its map and its neighbours'. */
	template <class MapAt> static bool needs_trap(std::uint64_t gfn, const MapAt &map_at);
	/* Trap writes to pages gfn - 1 .. gfn + n as needs_trap() says with map_at. */
	template <class MapAt>
	void set_traps_locked(std::uint64_t gfn, std::uint64_t n, const MapAt &map_at);
	void refresh_traps_locked(std::uint64_t gfn, std::uint64_t n);
	/* The first protected byte in [gpa, gpa + len), if any. Under the lock. */
	static std::optional<std::uint64_t> first_blocked(const MapWindow &maps, std::uint64_t gpa,
							  std::uint64_t len);
	/* Store set() of a range of any size, undone as far as it can be on failure. */
	int set_pieces_locked(std::uint64_t gfn, std::span<const std::uint32_t> maps);
	/* Clear the protected pages among gfn .. gfn + maps.size() - 1 (their maps). */
	void clear_locked(std::uint64_t gfn, std::span<const std::uint32_t> maps) noexcept;
	/*
	 * Ask the VMM's violation handler (default: drop). A drop stands only
	 * while blocked_now() (which takes the layout lock) still finds a
	 * blocked byte; allow_once when it finds none.
	 */
	SppDecision report(Vcpu &vcpu, SppViolation &v,
			   const std::function<std::optional<std::uint64_t>()> &blocked_now);
	/* A cmpxchg16b that KVM's emulator refused on a trapping page. */
	ExitAction complete_cmpxchg16b(Vcpu &vcpu, Exit &exit);
	/* An fxsave in 64-bit code that KVM's emulator refused on a trapping page. */
	ExitAction complete_fxsave(Vcpu &vcpu, Exit &exit);
	/* An emulation failure nothing here completes: #UD, as KVM raises it. */
	ExitAction raise_undefined_opcode(Vcpu &vcpu);
	/*
	 * An event (exception, NMI, interrupt) whose delivery KVM could not
	 * complete because its frame lands on a trapping page: delivered
	 * here (64-bit IDT), the frame written through the maps.
	 */
	ExitAction complete_delivery(Vcpu &vcpu, Exit &exit);
	/*
	 * Deliver event `vector` (type 0 interrupt, 2 NMI, 3 exception) with
	 * the vCPU's events as they are: resume when delivered, pass when it
	 * does not concern sub-page protection (exit unchanged) or when its
	 * frame is blocked (exit becomes the violation).
	 */
	ExitAction deliver_event(Vcpu &vcpu, std::uint8_t vector, std::uint8_t type,
				 std::optional<std::uint32_t> error_code, kvm_vcpu_events events,
				 Exit &exit);
	/*
	 * After an allowed element of rep stos/movs at gpa: the registers with
	 * the following elements decided here, and the violation that stopped
	 * them, if its handler said stop.
	 */
	struct RepContinuation {
		kvm_regs regs;
		std::optional<SppViolation> stop;
	};
	std::optional<RepContinuation> continue_rep_string(Vcpu &vcpu, const PrecedingCode &code,
							   const kvm_regs &post, std::uint64_t gpa,
							   std::uint32_t len);
	/* A vCPU that stayed in the guest: complete what KVM cannot (on its thread). */
	std::optional<Exit> complete_stalled(Vcpu &vcpu);
	/*
	 * Decide the writes (find_system_writes) on trapping pages; *decided
	 * says whether any was (performed or reported).
	 */
	std::optional<Exit> complete_system_writes(Vcpu &vcpu, kvm_regs regs,
						   const std::vector<SystemWrite> &writes,
						   bool *decided);
	void count_protected(std::span<const std::uint32_t> old_maps,
			     std::span<const std::uint32_t> new_maps);

	MemoryMap &mem_;
	std::unique_ptr<SppStore> store_; /* used under mem_'s lock */
	std::atomic<bool> exit_on_emulation_failure_{false};
	std::uint64_t protected_pages_ = 0; /* under mem_'s lock */

	mutable std::mutex handler_mu_;
	std::shared_ptr<const SppViolationHandler> handler_;
	std::uint64_t handler_gen_ = 0; /* on_violation() calls; under handler_mu_ */

	std::atomic<std::uint64_t> checked_{0}, allowed_{0}, violations_{0};
	ExitHandlerRegistration reg_;
	RunControl::StallRegistration stall_reg_;
};

} // namespace virtkit::detail

// SPDX-License-Identifier: MIT
/*
 * Internal: the `user` backend of sub-page protection - enforcement in this
 * process on stock KVM.
 *
 * Pages that are protected, and their neighbours when a write could straddle
 * into a protected sub-page 0 or 31, sit in read-only memslots. A guest
 * write there is not performed by KVM; it is emulated and reported as MMIO,
 * in up to 8 bytes per exit. The exit handler collects every piece of the
 * one write (KVM_RUN with immediate_exit completes a piece without running
 * the guest and yields the next), checks the whole write against the table,
 * and either performs it in the VMM's mapping or reports a violation. So a
 * write is blocked whole or performed whole, never partly.
 *
 * Locking: the table and the layout are guarded by the memory map's lock:
 * set_access holds it exclusively while it re-cuts slots and updates the
 * table, the exit handler holds it shared while it decides and writes.
 */
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>

#include <virtkit/vm.hpp>

#include "memory_map.hpp"
#include "spp_backend.hpp"
#include "spp_heap_table.hpp"

namespace virtkit::detail {

struct VmState;

class SppUserBackend final : public SppBackend, private RegionObserver {
public:
	explicit SppUserBackend(VmState &vm);
	~SppUserBackend() override;

	/* The exit handler the VM must register (at the highest priority). */
	ExitAction on_exit(Vcpu &vcpu, Exit &exit);
	void keep_registration(ExitHandlerRegistration reg) { reg_ = std::move(reg); }

	SppBackendKind kind() const noexcept override { return SppBackendKind::user; }
	void set_access(std::uint64_t gfn, std::span<const std::uint32_t> maps) override;
	std::vector<std::uint32_t> get_access(std::uint64_t gfn,
					      std::uint64_t npages) const override;
	void on_violation(SppViolationHandler handler) override;
	SppStats stats() const override;

private:
	void region_moved(std::uint64_t from, std::uint64_t to, std::uint64_t size) override;
	void region_removed(std::uint64_t gpa, std::uint64_t size) noexcept override;
	void region_placed(std::uint64_t gpa, std::uint64_t size) noexcept override;
	/* Whether page gfn must trap writes, given its map and its neighbours'. */
	template <class MapAt> static bool needs_trap(std::uint64_t gfn, const MapAt &map_at);
	void refresh_traps_locked(std::uint64_t gfn, std::uint64_t n);
	/* The first protected byte in [gpa, gpa + len), if any. Under the lock. */
	std::optional<std::uint64_t> first_blocked_locked(std::uint64_t gpa,
							  std::uint64_t len) const;
	/* Ask the VMM's violation handler (default: drop). */
	SppDecision report(Vcpu &vcpu, const SppViolation &v);
	/* A cmpxchg16b that KVM's emulator refused on a trapping page. */
	ExitAction complete_cmpxchg16b(Vcpu &vcpu, Exit &exit);
	void count_protected(std::span<const std::uint32_t> old_maps,
			     std::span<const std::uint32_t> new_maps);

	VmState &vm_;
	MemoryMap &mem_;
	SppTable table_;	/* under mem_'s lock */
	std::uint64_t protected_pages_ = 0; /* under mem_'s lock */

	mutable std::mutex handler_mu_;
	std::shared_ptr<const SppViolationHandler> handler_;

	std::atomic<std::uint64_t> checked_{0}, allowed_{0}, violations_{0};
	ExitHandlerRegistration reg_;
};

} // namespace virtkit::detail

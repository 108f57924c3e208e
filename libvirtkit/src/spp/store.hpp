// SPDX-License-Identifier: MIT
/*
 * Internal: where the access maps of sub-page protection live. The engine
 * (engine.hpp) enforces them the same way whatever the store; the
 * store's kind is the backend's kind:
 *
 *   user  LocalSppStore: the SPP table in this process (heap_table.hpp);
 *   kmod  KmodSppStore:  the SPP table in virtkit.ko, through the per-VM
 *                        file (kmod/kmod_vm.hpp), which the kernel's fast
 *                        path of VIRTKIT_VCPU_RUN reads too.
 *
 * Functions return 0 or an errno value and are all or nothing. Not
 * thread-safe: the engine calls them under the memory map's lock.
 */
#pragma once

#include <cstdint>
#include <span>

#include <virtkit/spp.hpp>

#include "spp/heap_table.hpp"

namespace virtkit::detail {

class KmodVm;

class SppStore {
public:
	virtual ~SppStore() = default;
	virtual SppBackendKind kind() const noexcept = 0;
	/* The operations as errors name them ("VIRTKIT_SPP_SET_ACCESS"), or "". */
	virtual const char *op_name(bool set) const noexcept = 0;
	/* Most pages one set() takes (larger ranges: E2BIG, nothing changed). */
	virtual std::uint64_t max_set_pages() const noexcept = 0;

	/* Maps of pages gfn .. gfn + maps.size() - 1, below VK_SPPT_GFN_LIMIT. */
	virtual int get(std::uint64_t gfn, std::span<std::uint32_t> maps) const noexcept = 0;
	virtual int set(std::uint64_t gfn, std::span<const std::uint32_t> maps) noexcept = 0;
	/*
	 * Every page of the range to one map. Used to clear (all-writable),
	 * which only frees; a store may do it in pieces.
	 */
	virtual int fill(std::uint64_t gfn, std::uint64_t npages, std::uint32_t map) noexcept = 0;
	/* Adds what only the store sees (the writes the kernel completed). */
	virtual void add_stats(SppStats &) const {}
};

/* VK_SPPT_OK / VK_SPPT_E* (common/spp_table.h) as 0 / an errno value. */
int sppt_errno(int sppt_code) noexcept;

class LocalSppStore final : public SppStore {
public:
	SppBackendKind kind() const noexcept override { return SppBackendKind::user; }
	const char *op_name(bool) const noexcept override { return ""; }
	std::uint64_t max_set_pages() const noexcept override { return ~0ull; }
	int get(std::uint64_t gfn, std::span<std::uint32_t> maps) const noexcept override;
	int set(std::uint64_t gfn, std::span<const std::uint32_t> maps) noexcept override;
	int fill(std::uint64_t gfn, std::uint64_t npages, std::uint32_t map) noexcept override;

private:
	SppTable table_;
};

class KmodSppStore final : public SppStore {
public:
	/*
	 * The VM's attachment, which outlives the store: both live in the VM's
	 * feature slots, the attachment attached first (feature_slots.hpp).
	 */
	explicit KmodSppStore(const KmodVm &vm) noexcept : vm_(vm) {}
	SppBackendKind kind() const noexcept override { return SppBackendKind::kmod; }
	const char *op_name(bool set) const noexcept override;
	std::uint64_t max_set_pages() const noexcept override;
	int get(std::uint64_t gfn, std::span<std::uint32_t> maps) const noexcept override;
	int set(std::uint64_t gfn, std::span<const std::uint32_t> maps) noexcept override;
	int fill(std::uint64_t gfn, std::uint64_t npages, std::uint32_t map) noexcept override;
	void add_stats(SppStats &s) const override;

private:
	const KmodVm &vm_;
};

} // namespace virtkit::detail

// SPDX-License-Identifier: MIT
/*
 * virtkit::translate(): the page-walk engine (common/page_walk.c) over a
 * VM's guest memory, with the public types of virtkit/page_walk.hpp.
 */
#include <virtkit/page_walk.hpp>

#include <cerrno>
#include <string>

#include <virtkit/error.hpp>
#include <virtkit/memory.hpp>

#include "core/ioctl.hpp"
#include "core/memory_map.hpp"
#include "page_walk.h"

namespace virtkit {

using detail::hex;

/* The public constants are the engine's. */
static_assert(pfec::present == VK_WALK_PFEC_P && pfec::write == VK_WALK_PFEC_W &&
	      pfec::user == VK_WALK_PFEC_U && pfec::rsvd == VK_WALK_PFEC_RSVD &&
	      pfec::fetch == VK_WALK_PFEC_ID && pfec::pk == VK_WALK_PFEC_PK);
static_assert(Walk::right_write == VK_WALK_RIGHT_W && Walk::right_user == VK_WALK_RIGHT_U &&
	      Walk::right_exec == VK_WALK_RIGHT_X);
static_assert(Walk::allow_read == VK_WALK_ALLOW_READ &&
	      Walk::allow_write == VK_WALK_ALLOW_WRITE &&
	      Walk::allow_fetch == VK_WALK_ALLOW_FETCH);
static_assert(paging_feature::nx == VK_WALK_FEAT_NX &&
	      paging_feature::page1gb == VK_WALK_FEAT_PAGE1GB &&
	      paging_feature::smep == VK_WALK_FEAT_SMEP && paging_feature::smap == VK_WALK_FEAT_SMAP &&
	      paging_feature::pku == VK_WALK_FEAT_PKU && paging_feature::la57 == VK_WALK_FEAT_LA57 &&
	      paging_feature::pks == VK_WALK_FEAT_PKS && paging_feature::all == VK_WALK_FEAT_ALL);
static_assert(std::tuple_size_v<decltype(Walk::entry)> == std::size(vk_walk{}.entry));

static unsigned int engine_access(Access a)
{
	switch (a) {
	case Access::read: return VK_WALK_READ;
	case Access::write: return VK_WALK_WRITE;
	case Access::fetch: return VK_WALK_FETCH;
	case Access::implicit_read: return VK_WALK_READ | VK_WALK_IMPLICIT;
	case Access::implicit_write: return VK_WALK_WRITE | VK_WALK_IMPLICIT;
	}
	throw Error("page walk", EINVAL, "access " + std::to_string(static_cast<int>(a)));
}

/*
 * An 8-byte entry from the VMM's mapping of guest RAM, as one load (the
 * guest may be changing it). The caller holds the map's lock shared.
 */
static int read_entry(void *ctx, __u64 gpa, __u64 *val)
{
	const auto &map = *static_cast<const detail::MemoryMap *>(ctx);
	const std::byte *p = map.host_ptr_locked(gpa, sizeof(*val));
	if (!p)
		return -1;
	*val = __atomic_load_n(reinterpret_cast<const std::uint64_t *>(p), __ATOMIC_RELAXED);
	return 0;
}

Walk translate(const GuestMemory &memory, const PagingState &state, std::uint64_t gva,
	       Access access)
{
	const vk_walk_state s{
		.cr0 = state.cr0,
		.cr3 = state.cr3,
		.cr4 = state.cr4,
		.efer = state.efer,
		.rflags = state.rflags,
		.pkru = state.pkru,
		.pkrs = state.pkrs,
		.cpl = state.cpl,
		.maxphyaddr = state.maxphyaddr,
		.quirks = 0,
		.features = state.features,
	};
	const auto &map = detail::GuestMemoryAccess::map(memory);
	const vk_walk_mem mem{read_entry, const_cast<detail::MemoryMap *>(&map)};
	const unsigned int a = engine_access(access);
	vk_walk w;
	{
		auto lock = map.lock_shared();
		vk_walk_translate(&s, &mem, gva, a, &w);
	}

	Walk r;
	switch (w.result) {
	case VK_WALK_OK:
		r.outcome = Walk::Outcome::ok;
		break;
	case VK_WALK_PF:
		r.outcome = Walk::Outcome::page_fault;
		break;
	case VK_WALK_GP:
		r.outcome = Walk::Outcome::general_protection;
		break;
	case VK_WALK_EREAD:
		throw Error("page walk", EFAULT,
			    "gva=" + hex(gva) + ": the level-" + std::to_string(w.level) +
				    " paging-structure entry at gpa " + hex(w.read_gpa) +
				    " is not in guest memory (cr3=" + hex(state.cr3) + ")");
	case VK_WALK_UNSUPPORTED:
		throw Error("page walk", ENOTSUP,
			    "gva=" + hex(gva) + ": legacy or PAE paging (cr0=" + hex(state.cr0) +
				    " efer=" + hex(state.efer) +
				    "); only IA-32e paging and no paging are walked");
	default:
		throw Error("page walk", EINVAL,
			    "gva=" + hex(gva) + ": cpl=" + std::to_string(state.cpl) +
				    " maxphyaddr=" + std::to_string(state.maxphyaddr) +
				    " cr4=" + hex(state.cr4) + " efer=" + hex(state.efer) +
				    " features=" + hex(state.features) +
				    " (need cpl <= 3, maxphyaddr 32..52, and no CR4/EFER bit"
				    " of a feature the CPU lacks)");
	}
	r.error_code = w.error_code;
	r.gpa = w.gpa;
	r.page_size = w.page_size;
	r.rights = w.rights;
	r.key = w.key;
	r.allowed = w.allowed;
	r.level = w.level;
	for (std::size_t l = 0; l < r.entry.size(); l++) {
		r.entry[l] = w.entry[l];
		r.entry_gpa[l] = w.entry_gpa[l];
	}
	return r;
}

} // namespace virtkit

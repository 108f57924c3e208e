// SPDX-License-Identifier: MIT
#include "spp/store.hpp"

#include <algorithm>
#include <cerrno>
#include <new>
#include <vector>

#include "kmod/kmod_vm.hpp"

namespace virtkit::detail {

int sppt_errno(int sppt_code) noexcept
{
	switch (sppt_code) {
	case VK_SPPT_OK:
		return 0;
	case VK_SPPT_ENOMEM:
		return ENOMEM;
	case VK_SPPT_ERANGE:
		return EINVAL;
	default: /* VK_SPPT_EMISCONFIG: the table is corrupt */
		return EIO;
	}
}

int LocalSppStore::get(std::uint64_t gfn, std::span<std::uint32_t> maps) const noexcept
{
	return sppt_errno(table_.get(gfn, maps));
}

int LocalSppStore::set(std::uint64_t gfn, std::span<const std::uint32_t> maps) noexcept
{
	return sppt_errno(table_.set(gfn, maps));
}

int LocalSppStore::fill(std::uint64_t gfn, std::uint64_t npages, std::uint32_t map) noexcept
{
	return sppt_errno(table_.fill(gfn, npages, map));
}

const char *KmodSppStore::op_name(bool set) const noexcept
{
	return set ? "VIRTKIT_SPP_SET_ACCESS" : "VIRTKIT_SPP_GET_ACCESS";
}

std::uint64_t KmodSppStore::max_set_pages() const noexcept { return vm_.spp_max_pages(); }

int KmodSppStore::get(std::uint64_t gfn, std::span<std::uint32_t> maps) const noexcept
{
	return vm_.spp_get(gfn, maps);
}

int KmodSppStore::set(std::uint64_t gfn, std::span<const std::uint32_t> maps) noexcept
{
	return vm_.spp_set(gfn, maps);
}

int KmodSppStore::fill(std::uint64_t gfn, std::uint64_t npages, std::uint32_t map) noexcept
{
	try {
		std::vector<std::uint32_t> chunk(std::min(npages, vm_.spp_max_pages()), map);
		for (std::uint64_t done = 0; done < npages && !chunk.empty();) {
			std::uint64_t n = std::min<std::uint64_t>(npages - done, chunk.size());
			if (int r = vm_.spp_set(gfn + done, std::span(chunk.data(), n)))
				return r;
			done += n;
		}
		return 0;
	} catch (const std::bad_alloc &) {
		return ENOMEM;
	}
}

void KmodSppStore::add_stats(SppStats &s) const
{
	virtkit_spp_stats k = vm_.spp_stats();
	s.checked_writes += k.fast_writes;
	s.allowed_writes += k.fast_writes;
}

} // namespace virtkit::detail

// SPDX-License-Identifier: MIT
/*
 * MemoryMap: completing guest accesses from the host mapping - the writes
 * and reads a feature decided about (sub-page protection, hidden pages), and
 * MMIO exits on RAM that only a racing layout change caused.
 */
#include "core/memory_map.hpp"

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>

#include <virtkit/error.hpp>

namespace virtkit::detail {

/*
 * A naturally aligned 1, 2, 4 or 8-byte guest access is one load or store
 * on the processor: call access(T{}) with its unsigned type T and return
 * true; false for any other size or alignment.
 */
template <class Access>
static bool single_access(std::uint64_t gpa, std::uint32_t len, Access &&access)
{
	if (len == 0 || (gpa & (len - 1)))
		return false;
	switch (len) {
	case 1: access(std::uint8_t{}); return true;
	case 2: access(std::uint16_t{}); return true;
	case 4: access(std::uint32_t{}); return true;
	case 8: access(std::uint64_t{}); return true;
	default: return false;
	}
}

void MemoryMap::guest_write_locked(std::uint64_t gpa, const std::byte *data, std::uint32_t len)
{
	auto *r = const_cast<Region *>(find_gpa(gpa));
	if (!r || r->opts.readonly || len > r->gpa + r->size - gpa)
		throw Error("GuestMemory", EFAULT, gpa_range(gpa, len) + " is not writable RAM");
	std::byte *host = r->map.data() + (gpa - r->gpa);
	/* Other vCPUs read this memory directly: do not tear aligned stores. */
	if (!single_access(gpa, len, [&](auto v) {
		    std::memcpy(&v, data, sizeof(v));
		    __atomic_store_n(reinterpret_cast<decltype(v) *>(host), v, __ATOMIC_RELAXED);
	    }))
		std::memcpy(host, data, len);
	mark_dirty_locked(*r, gpa - r->gpa, len);
}

void MemoryMap::guest_read_locked(std::uint64_t gpa, std::byte *data, std::uint32_t len) const
{
	const Region *r = find_gpa(gpa);
	if (!r || len > r->gpa + r->size - gpa)
		throw Error("GuestMemory", EFAULT, gpa_range(gpa, len) + " is not RAM");
	const std::byte *host = r->map.data() + (gpa - r->gpa);
	/* Other vCPUs write this memory directly: do not tear aligned loads. */
	if (!single_access(gpa, len, [&](auto v) {
		    v = __atomic_load_n(reinterpret_cast<const decltype(v) *>(host),
					__ATOMIC_RELAXED);
		    std::memcpy(data, &v, sizeof(v));
	    }))
		std::memcpy(data, host, len);
}

bool MemoryMap::guest_cmpxchg16b_locked(std::uint64_t gpa, std::uint64_t expected[2],
					const std::uint64_t desired[2])
{
	auto *r = const_cast<Region *>(find_gpa(gpa));
	if (!r || r->opts.readonly || gpa % 16 || 16 > r->gpa + r->size - gpa)
		throw Error("GuestMemory", EFAULT, gpa_range(gpa, 16) + " is not aligned writable RAM");
	std::byte *host = r->map.data() + (gpa - r->gpa);
	bool equal;
	asm volatile("lock cmpxchg16b %1"
		     : "=@ccz"(equal), "+m"(*reinterpret_cast<unsigned __int128 *>(host)),
		       "+a"(expected[0]), "+d"(expected[1])
		     : "b"(desired[0]), "c"(desired[1])
		     : "memory");
	if (equal && (desired[0] != expected[0] || desired[1] != expected[1]))
		mark_dirty_locked(*r, gpa - r->gpa, 16);
	return equal;
}

bool MemoryMap::guest_rmw_locked(std::uint64_t gpa, std::uint32_t len,
				 const std::function<void(std::byte *host)> &rmw)
{
	auto *r = const_cast<Region *>(find_gpa(gpa));
	if (!r || r->opts.readonly || len > r->gpa + r->size - gpa)
		return false;
	rmw(r->map.data() + (gpa - r->gpa));
	mark_dirty_locked(*r, gpa - r->gpa, len);
	return true;
}

bool MemoryMap::complete_mmio(const MmioExit &exit)
{
	std::shared_lock lock(mu_);
	auto *r = const_cast<Region *>(find_gpa(exit.gpa));
	if (!r || exit.data.size() > r->gpa + r->size - exit.gpa)
		return false;
	if (exit.is_write() && r->opts.readonly)
		return false;
	/* Pages a feature took from the guest are that feature's to complete. */
	std::uint64_t last = exit.gpa + (exit.data.empty() ? 0 : exit.data.size() - 1);
	if (hidden_locked(exit.gpa) || hidden_locked(last))
		return false;
	std::byte *host = r->map.data() + (exit.gpa - r->gpa);
	if (exit.is_write()) {
		std::memcpy(host, exit.data.data(), exit.data.size());
		mark_dirty_locked(*r, exit.gpa - r->gpa, exit.data.size());
	} else {
		std::memcpy(exit.data.data(), host, exit.data.size());
	}
	return true;
}

} // namespace virtkit::detail

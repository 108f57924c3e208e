// SPDX-License-Identifier: MIT
/* GuestMemory: the public face of detail::MemoryMap. */
#include <virtkit/memory.hpp>

#include <bit>

#include "core/memory_map.hpp"

namespace virtkit {

std::uint64_t DirtyBitmap::count() const noexcept
{
	std::uint64_t n = 0;
	for (auto w : bits)
		n += std::popcount(w);
	return n;
}

RegionId GuestMemory::add(std::uint64_t gpa, std::uint64_t size, const RegionOptions &o)
{
	return map_.add(gpa, size, o);
}
void GuestMemory::move(RegionId id, std::uint64_t gpa) { map_.move(id, gpa); }
void GuestMemory::remove(RegionId id) { map_.remove(id); }
RegionInfo GuestMemory::info(RegionId id) const { return map_.info(id); }
std::vector<RegionInfo> GuestMemory::regions() const { return map_.regions(); }
RegionInfo GuestMemory::region_at(std::uint64_t gpa) const { return map_.region_at(gpa); }
std::optional<RegionInfo> GuestMemory::try_region_at(std::uint64_t gpa) const
{
	return map_.try_region_at(gpa);
}
bool GuestMemory::contains(std::uint64_t gpa, std::uint64_t size) const
{
	return map_.contains(gpa, size);
}
std::byte *GuestMemory::host_ptr(std::uint64_t gpa, std::uint64_t size) const
{
	return map_.host_ptr(gpa, size);
}
void GuestMemory::read(std::uint64_t gpa, std::span<std::byte> out) const
{
	map_.read(gpa, out);
}
void GuestMemory::write(std::uint64_t gpa, std::span<const std::byte> in)
{
	map_.write(gpa, in);
}
void GuestMemory::copy(std::uint64_t dst, std::uint64_t src, std::uint64_t size)
{
	map_.copy(dst, src, size);
}
void GuestMemory::fill(std::uint64_t gpa, std::byte v, std::uint64_t size)
{
	map_.fill(gpa, v, size);
}
void GuestMemory::set_dirty_log(RegionId id, bool on) { map_.set_dirty_log(id, on); }
DirtyBitmap GuestMemory::dirty_log(RegionId id) { return map_.dirty_log(id); }
std::size_t GuestMemory::slot_count() const { return map_.slot_count(); }

} // namespace virtkit

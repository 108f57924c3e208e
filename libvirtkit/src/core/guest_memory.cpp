// SPDX-License-Identifier: MIT
/*
 * GuestMemory: the VMM's side of guest memory - adding, moving and removing
 * regions, and reading and writing them through the host mappings -
 * implemented directly over the region table (detail::MemoryMap).
 */
#include <virtkit/memory.hpp>

#include <linux/memfd.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include <virtkit/error.hpp>

#include "core/ioctl.hpp"
#include "core/memory_map.hpp"

namespace virtkit {

using detail::gpa_range;
using detail::hex;
using detail::MemoryMap;
using detail::plan_slots;
using detail::range_wraps;

static constexpr std::uint64_t page = GuestMemory::page_size;
static constexpr std::uint64_t huge_page = 2ull << 20;

std::uint64_t DirtyBitmap::count() const noexcept
{
	std::uint64_t n = 0;
	for (auto w : bits)
		n += std::popcount(w);
	return n;
}

RegionId GuestMemory::add(std::uint64_t gpa, std::uint64_t size, const RegionOptions &opts)
{
	if (!size || gpa % page || size % page || range_wraps(gpa, size))
		throw Error("GuestMemory::add", EINVAL,
			    gpa_range(gpa, size) + ": must be non-empty, page aligned and not wrap");
	if (opts.dirty_log && opts.readonly)
		throw Error("GuestMemory::add", EINVAL,
			    "dirty logging of a read-only region");
	if (opts.huge_pages && (gpa % huge_page || size % huge_page))
		throw Error("GuestMemory::add", EINVAL,
			    gpa_range(gpa, size) + ": huge-page regions must be 2 MiB aligned");
	/* Checked here: memfd_create's EINVAL would quote the whole name. */
	if (opts.name.size() > RegionOptions::max_name)
		throw Error("GuestMemory::add", EINVAL,
			    "region name \"" + opts.name.substr(0, 32) + "...\" is " +
				    std::to_string(opts.name.size()) + " bytes long, at most " +
				    std::to_string(RegionOptions::max_name) + " are allowed");

	std::unique_lock lock(map_.mu_);
	map_.check_free(gpa, size, nullptr, "GuestMemory::add");
	map_.regions_changing_locked();

	auto r = std::make_unique<MemoryMap::Region>();
	r->id = map_.next_id_;
	r->gpa = gpa;
	r->size = size;
	r->opts = opts;
	std::string name = opts.name.empty() ? "virtkit-ram" : "virtkit-" + opts.name;
	r->memfd = FileDesc::memfd(name.c_str(), opts.huge_pages ? MFD_HUGETLB | MFD_HUGE_2MB : 0);
	if (::ftruncate(r->memfd.get(), static_cast<off_t>(size)) < 0)
		throw Error("ftruncate", errno, name + " " + gpa_range(gpa, size));
	r->map = Mapping::map(size, PROT_READ | PROT_WRITE, MAP_SHARED,
			      r->memfd.get(), 0, name.c_str());
	/* hugetlbfs reserves at mmap; touching proves the pages exist (no SIGBUS later). */
	if (opts.huge_pages && ::madvise(r->map.data(), size, MADV_POPULATE_WRITE) < 0)
		throw Error("madvise(MADV_POPULATE_WRITE)", errno,
			    name + " " + gpa_range(gpa, size) + ": not enough free huge pages");
	r->dirty.assign((size / page + 63) / 64, 0);
	map_.apply_plan(*r, plan_slots(gpa, size, opts.readonly, r->traps));

	map_.next_id_++;
	RegionId id = r->id;
	bool writable = !opts.readonly;
	map_.regions_.emplace(gpa, std::move(r));
	if (map_.observer_ && writable) {
		try {
			map_.observer_->region_placed(gpa, size);
		} catch (...) {
			auto node = map_.regions_.extract(gpa);
			map_.remove_slots(*node.mapped());
			throw;
		}
	}
	return id;
}

void GuestMemory::move(RegionId id, std::uint64_t new_gpa)
{
	std::unique_lock lock(map_.mu_);
	MemoryMap::Region &r = map_.find(id, "GuestMemory::move");
	map_.regions_changing_locked();
	if (new_gpa % page || range_wraps(new_gpa, r.size))
		throw Error("GuestMemory::move", EINVAL,
			    "region " + std::to_string(id) + " to " + gpa_range(new_gpa, r.size));
	map_.check_free(new_gpa, r.size, &r, "GuestMemory::move");
	if (new_gpa == r.gpa)
		return;
	if (map_.observer_ && !r.opts.readonly)
		map_.observer_->region_moved(r.gpa, new_gpa, r.size);

	auto node = map_.regions_.extract(r.gpa);
	std::uint64_t old_gpa = r.gpa;
	map_.remove_slots(r);
	r.gpa = new_gpa;
	try {
		map_.apply_plan(r, plan_slots(r.gpa, r.size, r.opts.readonly, r.traps));
		node.key() = new_gpa;
		map_.regions_.insert(std::move(node));
		if (map_.observer_ && !r.opts.readonly)
			map_.observer_->region_placed(new_gpa, r.size);
	} catch (...) {
		if (node.empty()) {
			node = map_.regions_.extract(new_gpa);
			map_.remove_slots(r);
		}
		r.gpa = old_gpa;
		map_.apply_plan(r, plan_slots(r.gpa, r.size, r.opts.readonly, r.traps));
		node.key() = old_gpa;
		map_.regions_.insert(std::move(node));
		if (map_.observer_ && !r.opts.readonly) {
			map_.observer_->region_moved(new_gpa, old_gpa, r.size);
			try {
				/* Its old place had its slots: this only re-cuts them. */
				map_.observer_->region_placed(old_gpa, r.size);
			} catch (...) {
			}
		}
		throw;
	}
}

void GuestMemory::remove(RegionId id)
{
	std::unique_lock lock(map_.mu_);
	MemoryMap::Region &r = map_.find(id, "GuestMemory::remove");
	map_.regions_changing_locked();
	if (map_.observer_ && !r.opts.readonly)
		map_.observer_->region_removed(r.gpa, r.size);
	for (auto &[first, s] : r.slots) {
		map_.set_slot(s.id, s.spec.gpa, 0, r.map.data() + s.spec.offset, 0);
		map_.free_slots_.push_back(s.id);
		map_.used_slots_--;
	}
	r.slots.clear();
	map_.regions_.erase(r.gpa);
}

static RegionInfo info_of(const RegionId id, std::uint64_t gpa, std::uint64_t size,
			  const RegionOptions &o, std::byte *host)
{
	return RegionInfo{id, gpa, size, o, host};
}

RegionFile GuestMemory::region_fd(RegionId id, FileAccess access) const
{
	std::shared_lock lock(map_.mu_);
	MemoryMap::Region &r = map_.find(id, "GuestMemory::region_fd");
	int fd = r.memfd.get();
	std::string what = "region " + std::to_string(id);
	if (access == FileAccess::read_write)
		return {FileDesc::adopt(::fcntl(fd, F_DUPFD_CLOEXEC, 0), "fcntl(F_DUPFD_CLOEXEC)",
					what.c_str()),
			0, r.size};
	/* memfds are created 0777: keep other users from reopening it read-write. */
	if (::fchmod(fd, 0600) < 0)
		throw Error("fchmod", errno, what);
	/* A dup would share the library's O_RDWR open file description. */
	std::string path = "/proc/self/fd/" + std::to_string(fd);
	return {FileDesc::open(path.c_str(), O_RDONLY), 0, r.size};
}

RegionInfo GuestMemory::info(RegionId id) const
{
	std::shared_lock lock(map_.mu_);
	MemoryMap::Region &r = map_.find(id, "GuestMemory::info");
	return info_of(r.id, r.gpa, r.size, r.opts, r.map.data());
}

std::vector<RegionInfo> GuestMemory::regions() const
{
	std::shared_lock lock(map_.mu_);
	std::vector<RegionInfo> v;
	for (auto &[gpa, r] : map_.regions_)
		v.push_back(info_of(r->id, r->gpa, r->size, r->opts, r->map.data()));
	return v;
}

std::optional<RegionInfo> GuestMemory::try_region_at(std::uint64_t gpa) const
{
	std::shared_lock lock(map_.mu_);
	const MemoryMap::Region *r = map_.find_gpa(gpa);
	if (!r)
		return std::nullopt;
	return info_of(r->id, r->gpa, r->size, r->opts, r->map.data());
}

RegionInfo GuestMemory::region_at(std::uint64_t gpa) const
{
	if (auto r = try_region_at(gpa))
		return std::move(*r);
	throw Error("GuestMemory::region_at", ENOENT, "gpa=" + hex(gpa));
}

bool GuestMemory::contains(std::uint64_t gpa, std::uint64_t size) const
{
	if (range_wraps(gpa, size))
		return false;
	std::shared_lock lock(map_.mu_);
	while (size) {
		const MemoryMap::Region *r = map_.find_gpa(gpa);
		if (!r)
			return false;
		std::uint64_t n = std::min(size, r->gpa + r->size - gpa);
		gpa += n;
		size -= n;
	}
	return true;
}

std::byte *GuestMemory::host_ptr(std::uint64_t gpa, std::uint64_t size) const
{
	std::shared_lock lock(map_.mu_);
	/* The regions' mappings are writable; the const is map_.host_ptr_locked()'s. */
	if (auto *p = map_.host_ptr_locked(gpa, size))
		return const_cast<std::byte *>(p);
	throw Error("GuestMemory::host_ptr", EFAULT,
		    gpa_range(gpa, size) + " is not inside one region");
}

namespace {

/*
 * gpa in the VMM's mapping (MemoryMap::host_extent_locked), or EFAULT naming
 * op and [first, first + size) when it is no guest memory. The caller holds
 * the map's lock.
 */
MemoryMap::HostExtent host_at(const MemoryMap &map, const char *op, std::uint64_t gpa,
			      std::uint64_t first, std::uint64_t size)
{
	const MemoryMap::HostExtent e = map.host_extent_locked(gpa);
	if (!e.host)
		throw Error(op, EFAULT, gpa_range(first, size) + ": no guest memory at " + hex(gpa));
	return e;
}

/* EFAULT naming op unless [gpa, gpa + size) is all guest memory. */
void check_guest_range(const MemoryMap &map, const char *op, std::uint64_t gpa, std::uint64_t size)
{
	if (range_wraps(gpa, size))
		throw Error(op, EFAULT, gpa_range(gpa, size));
	for (std::uint64_t a = gpa, left = size; left;) {
		const std::uint64_t n = std::min(left, host_at(map, op, a, gpa, size).after);
		a += n;
		left -= n;
	}
}

/*
 * fn(host, offset, n) for each region's piece of [gpa, gpa + size) in the
 * VMM's mapping, after checking the whole range: all or nothing.
 */
template <class Fn>
void for_each_host_piece(const MemoryMap &map, const char *op, std::uint64_t gpa,
			 std::uint64_t size, Fn &&fn)
{
	check_guest_range(map, op, gpa, size);
	for (std::uint64_t done = 0; done < size;) {
		const MemoryMap::HostExtent e = host_at(map, op, gpa + done, gpa, size);
		const std::uint64_t n = std::min(size - done, e.after);
		fn(e.host, done, n);
		done += n;
	}
}

} // namespace

void GuestMemory::read(std::uint64_t gpa, std::span<std::byte> out) const
{
	std::shared_lock lock(map_.mu_);
	for_each_host_piece(map_, "GuestMemory::read", gpa, out.size(),
			    [&](std::byte *host, std::uint64_t done, std::uint64_t n) {
				    std::memcpy(out.data() + done, host, n);
			    });
}

void GuestMemory::write(std::uint64_t gpa, std::span<const std::byte> in)
{
	std::shared_lock lock(map_.mu_);
	for_each_host_piece(map_, "GuestMemory::write", gpa, in.size(),
			    [&](std::byte *host, std::uint64_t done, std::uint64_t n) {
				    std::memcpy(host, in.data() + done, n);
			    });
}

/* Region by region, in the VMM's mapping: no buffer the size of the copy. */
void GuestMemory::copy(std::uint64_t dst, std::uint64_t src, std::uint64_t size)
{
	const char *op = "GuestMemory::copy";
	std::shared_lock lock(map_.mu_);
	check_guest_range(map_, op, src, size);
	check_guest_range(map_, op, dst, size);
	/*
	 * As memmove: front to back when the destination is below the source,
	 * else back to front, one piece within one source and one destination
	 * region at a time.
	 */
	const bool forward = dst <= src;
	for (std::uint64_t done = 0; done < size;) {
		const std::uint64_t left = size - done;
		std::uint64_t n, d, s;
		if (forward) {
			d = dst + done;
			s = src + done;
			n = std::min({left, host_at(map_, op, d, dst, size).after,
				      host_at(map_, op, s, src, size).after});
		} else {
			/* The last byte not copied yet, and the piece of its regions before it. */
			const std::uint64_t dl = dst + left - 1, sl = src + left - 1;
			n = std::min({left, host_at(map_, op, dl, dst, size).before + 1,
				      host_at(map_, op, sl, src, size).before + 1});
			d = dl + 1 - n;
			s = sl + 1 - n;
		}
		std::memmove(host_at(map_, op, d, dst, size).host, host_at(map_, op, s, src, size).host,
			     n);
		done += n;
	}
}

void GuestMemory::fill(std::uint64_t gpa, std::byte value, std::uint64_t size)
{
	std::shared_lock lock(map_.mu_);
	for_each_host_piece(map_, "GuestMemory::fill", gpa, size,
			    [&](std::byte *host, std::uint64_t, std::uint64_t n) {
				    std::memset(host, static_cast<int>(value), n);
			    });
}

void GuestMemory::set_dirty_log(RegionId id, bool enable)
{
	std::unique_lock lock(map_.mu_);
	MemoryMap::Region &r = map_.find(id, "GuestMemory::set_dirty_log");
	if (enable && r.opts.readonly)
		throw Error("GuestMemory::set_dirty_log", EINVAL,
			    "region " + std::to_string(id) + " is read-only");
	if (r.opts.dirty_log == enable)
		return;
	r.opts.dirty_log = enable;
	try {
		for (auto &[first, s] : r.slots)
			map_.set_slot(s.id, s.spec.gpa, s.spec.size, r.map.data() + s.spec.offset,
				 map_.slot_flags(r, s.spec));
	} catch (...) {
		r.opts.dirty_log = !enable;
		for (auto &[first, s] : r.slots)
			map_.set_slot(s.id, s.spec.gpa, s.spec.size, r.map.data() + s.spec.offset,
				 map_.slot_flags(r, s.spec));
		throw;
	}
	std::fill(r.dirty.begin(), r.dirty.end(), 0);
}

DirtyBitmap GuestMemory::dirty_log(RegionId id)
{
	std::unique_lock lock(map_.mu_);
	MemoryMap::Region &r = map_.find(id, "GuestMemory::dirty_log");
	if (!r.opts.dirty_log)
		throw Error("GuestMemory::dirty_log", EINVAL,
			    "dirty logging is off for region " + std::to_string(id));
	if (map_.dirty_ring_)
		throw Error("GuestMemory::dirty_log", EINVAL,
			    "the VM uses the dirty ring; use Vcpu::harvest_dirty_ring");
	for (auto &[first, s] : r.slots)
		map_.harvest(r, s);
	DirtyBitmap bm{r.gpa, r.size / page, r.dirty};
	std::fill(r.dirty.begin(), r.dirty.end(), 0);
	return bm;
}

std::size_t GuestMemory::slot_count() const
{
	std::shared_lock lock(map_.mu_);
	return map_.used_slots_;
}

} // namespace virtkit

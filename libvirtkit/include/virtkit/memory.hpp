// SPDX-License-Identifier: MIT
/*
 * virtkit::GuestMemory - the guest-physical address space of one VM.
 *
 * The VMM adds regions of guest RAM; each region is a memfd mapped once into
 * the VMM and owned by the library. How regions become KVM memslots is an
 * internal detail: the library may split a region into several slots (for
 * example to make single pages read-only for sub-page protection) and merge
 * them back, without the VMM noticing. The VMM always reads and writes guest
 * memory through its own mapping (host_view, read, write), which is never
 * restricted.
 *
 * Thread safety: all calls may be made from any thread. A host pointer or
 * view stays valid until its region is removed or moved.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <virtkit/fd.hpp>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

#pragma GCC visibility push(hidden)
namespace detail {
class MemoryMap;
struct VmState;
struct GuestMemoryAccess;
}
#pragma GCC visibility pop

using RegionId = std::uint32_t;

struct RegionOptions {
	/* Guest writes exit as MMIO writes; reads and fetches are served. */
	bool readonly = false;
	/* Track guest writes in a dirty bitmap (see GuestMemory::dirty_log). */
	bool dirty_log = false;
	/*
	 * Name used in errors and `virtkit info`; at most max_name bytes (it
	 * names the region's memfd, "virtkit-<name>", which the kernel limits
	 * to 249 bytes), else add() fails with EINVAL.
	 */
	std::string name = {};
	static constexpr std::size_t max_name = 241;
	/*
	 * Back the region with 2 MiB hugetlbfs pages (gpa and size must be
	 * 2 MiB aligned; the host needs free pages in
	 * /proc/sys/vm/nr_hugepages, else ENOMEM), so that KVM can map it with
	 * large pages.
	 */
	bool huge_pages = false;
};

struct RegionInfo {
	RegionId id;
	std::uint64_t gpa;
	std::uint64_t size;
	RegionOptions options;
	std::byte *host; /* the VMM's mapping of the region */
};

/*
 * A region's RAM as a file, to share with a device back-end (another thread
 * or process maps it, or passes it on with SCM_RIGHTS): bytes [offset,
 * offset + size) of fd are the region, the same pages the guest sees.
 */
struct RegionFile {
	FileDesc fd;
	std::uint64_t offset;
	std::uint64_t size;
};

enum class FileAccess { read_write, read_only };

/* One bit per 4 KiB page of a region; bit i = page i was written. */
struct DirtyBitmap {
	std::uint64_t gpa;	/* guest-physical address of page 0 */
	std::uint64_t pages;
	std::vector<std::uint64_t> bits;

	bool test(std::uint64_t page) const noexcept
	{
		return bits[page / 64] >> (page % 64) & 1;
	}
	std::uint64_t count() const noexcept;
};

class GuestMemory {
public:
	static constexpr std::uint64_t page_size = 4096;

	/*
	 * Add size bytes of zeroed RAM at gpa. gpa and size must be page
	 * aligned, size non-zero, and the range must not overlap another
	 * region (EEXIST) or wrap (EINVAL).
	 */
	RegionId add(std::uint64_t gpa, std::uint64_t size,
		     const RegionOptions &options = {});
	/* Move a region to another gpa, keeping its contents. */
	void move(RegionId id, std::uint64_t new_gpa);
	/* Remove a region; its host mapping goes away. */
	void remove(RegionId id);

	RegionInfo info(RegionId id) const;
	std::vector<RegionInfo> regions() const;
	/* The region containing gpa (ENOENT when none). */
	RegionInfo region_at(std::uint64_t gpa) const;
	/* The same for callers that expect none: empty when no region has gpa. */
	std::optional<RegionInfo> try_region_at(std::uint64_t gpa) const;

	/* Whether [gpa, gpa+size) is backed by regions without gaps. */
	bool contains(std::uint64_t gpa, std::uint64_t size) const;
	/* Host address of [gpa, gpa+size), which must lie inside one region. */
	std::byte *host_ptr(std::uint64_t gpa, std::uint64_t size) const;

	/* Copy between the VMM and guest memory; may cross adjacent regions. */
	void read(std::uint64_t gpa, std::span<std::byte> out) const;
	void write(std::uint64_t gpa, std::span<const std::byte> in);
	void copy(std::uint64_t dst_gpa, std::uint64_t src_gpa, std::uint64_t size);
	void fill(std::uint64_t gpa, std::byte value, std::uint64_t size);

	template <class T> T read_obj(std::uint64_t gpa) const
	{
		static_assert(std::is_trivially_copyable_v<T>);
		T v;
		read(gpa, std::as_writable_bytes(std::span(&v, 1)));
		return v;
	}
	template <class T> void write_obj(std::uint64_t gpa, const T &v)
	{
		static_assert(std::is_trivially_copyable_v<T>);
		write(gpa, std::as_bytes(std::span(&v, 1)));
	}

	/*
	 * The memfd behind a region (see RegionFile). read_write: a duplicate
	 * of the library's descriptor. read_only: a new open file description
	 * with O_RDONLY (reopened through /proc/self/fd), so its holder cannot
	 * write(2) it or map it writable and shared (EACCES), and the memfd is
	 * made mode 0600 so that another user cannot reopen it read-write
	 * through /proc either; a holder running as the VMM's own user can
	 * (fchmod), so confine back-ends that must not write. Writes of the
	 * guest through a read-write holder bypass SPP and dirty tracking.
	 */
	RegionFile region_fd(RegionId id, FileAccess access = FileAccess::read_write) const;

	/* Turn dirty logging of a region on or off. */
	void set_dirty_log(RegionId id, bool enable);
	/*
	 * Pages of the region the guest wrote since the previous call (or since
	 * logging was enabled); the log is cleared. Requires dirty_log on and
	 * the dirty ring off.
	 */
	DirtyBitmap dirty_log(RegionId id);

	/* Number of KVM memslots in use (the internal layout, for diagnostics). */
	std::size_t slot_count() const;

	GuestMemory(const GuestMemory &) = delete;
	GuestMemory &operator=(const GuestMemory &) = delete;

private:
	friend struct detail::VmState;
	friend struct detail::GuestMemoryAccess;
	explicit GuestMemory(detail::MemoryMap &map) : map_(map) {}
	detail::MemoryMap &map_;
};

} // namespace virtkit

#pragma GCC visibility pop

// SPDX-License-Identifier: MIT
/*
 * virtkit::SubpageProtection - sub-page write protection (SPP) of guest
 * memory at 128-byte granularity (Documentation/spp.rst).
 *
 * Each 4 KiB guest page has a 32-bit access map: bit i set means the guest
 * may write bytes [128 * i, 128 * i + 127] of the page. all_writable
 * (0xFFFFFFFF) is the default and means "not protected". A guest write that
 * touches any protected byte is not performed - not even partly - and is
 * reported as an SppViolation; writes that touch only writable sub-pages
 * complete exactly as on unprotected memory. Reads and instruction fetches
 * never exit. The VMM's own accesses (GuestMemory::write, host views) are
 * never restricted.
 *
 * Usage:
 *
 *	auto &spp = SubpageProtection::enable(vm);
 *	spp.set_access(gpa / 4096, {0xFFFF0000u});  // protect bytes 0..2047
 *	spp.on_violation([](Vcpu &, const SppViolation &v) {
 *		log(v.gpa, v.size);
 *		return SppDecision::drop;
 *	});
 *
 * Backends: `user` enforces the maps in this process through read-only
 * memslots (works on any KVM); `kmod` keeps them in virtkit.ko, which
 * completes allowed writes in the kernel. Both give the same semantics.
 * `automatic` (the default) is kmod when /dev/virtkit exists, else user, or
 * what the environment variable VIRTKIT_SPP_BACKEND=user|kmod says; it
 * throws rather than fall back when the module exists but cannot be used.
 *
 * Thread safety: every call may be made from any thread, also while vCPUs
 * run and from inside on_violation handlers. When set_access returns, every
 * guest write that completes afterwards was checked against the new maps.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <span>
#include <vector>

#include <virtkit/spp_violation.hpp>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

class Vcpu;
class Vm;

#pragma GCC visibility push(hidden)
namespace detail {
class SppEngine;
}
#pragma GCC visibility pop

/* What happens to a write that an SppViolation reports. */
enum class SppDecision {
	/*
	 * Not performed; the instruction completes (as on ROM). Only while
	 * the maps still block the write when the handler returns: a write
	 * they stopped blocking meanwhile is performed, and one decided by a
	 * handler that was replaced meanwhile goes to the current handler.
	 */
	drop,
	allow_once,	/* performed this once; the maps are unchanged */
	stop,		/* not performed; Vcpu::run() returns SppViolationExit */
};

using SppViolationHandler = std::function<SppDecision(Vcpu &, const SppViolation &)>;

enum class SppBackendKind { automatic, user, kmod };

struct SppOptions {
	SppBackendKind backend = SppBackendKind::automatic;
};

/* Counters since enable (all backends). */
struct SppStats {
	std::uint64_t checked_writes;	/* guest writes to protected pages checked */
	std::uint64_t allowed_writes;	/* ... that touched only writable sub-pages */
	std::uint64_t violations;	/* ... reported as SppViolation */
	std::uint64_t protected_pages;	/* pages whose map is not all_writable */
};

class SubpageProtection {
public:
	static constexpr std::uint32_t all_writable = 0xFFFFFFFFu;
	static constexpr std::uint64_t subpage_size = 128;
	static constexpr std::uint32_t subpages = 32;

	/*
	 * Enable sub-page write protection of the VM. Idempotent: later calls
	 * return the same object (EINVAL if they ask for another backend).
	 * The object lives as long as the VM's state (the last Vm or Vcpu
	 * handle of the VM).
	 */
	static SubpageProtection &enable(Vm &vm, const SppOptions &options = {});
	/* The SubpageProtection of the VM, nullptr until enable(). */
	static SubpageProtection *of(Vm &vm) noexcept;

	SubpageProtection(const SubpageProtection &) = delete;
	SubpageProtection &operator=(const SubpageProtection &) = delete;
	~SubpageProtection();

	/*
	 * Set the access maps of pages gfn .. gfn + maps.size() - 1. All or
	 * nothing: every page must be writable guest RAM (EFAULT otherwise),
	 * the range must not wrap (EINVAL), flags must be 0 (EINVAL); on any
	 * error nothing changed. There is no limit on the number of pages (the
	 * kmod backend sets large ranges in pieces, see Documentation/spp.rst).
	 * An empty span does nothing.
	 */
	void set_access(std::uint64_t gfn, std::span<const std::uint32_t> maps,
			std::uint32_t flags = 0);
	void set_access(std::uint64_t gfn, std::initializer_list<std::uint32_t> maps,
			std::uint32_t flags = 0)
	{
		set_access(gfn, std::span(maps.begin(), maps.size()), flags);
	}
	/* Access maps of pages gfn .. gfn + npages - 1; same errors. O(npages). */
	std::vector<std::uint32_t> get_access(std::uint64_t gfn, std::uint64_t npages,
					      std::uint32_t flags = 0) const;

	/*
	 * Decide about violations (default: drop). The handler runs on the
	 * vCPU's thread while that vCPU waits; it may call set_access.
	 */
	void on_violation(SppViolationHandler handler);

	SppBackendKind backend() const noexcept;
	SppStats stats() const;

private:
	explicit SubpageProtection(std::unique_ptr<detail::SppEngine> engine);
	std::unique_ptr<detail::SppEngine> engine_;
};

} // namespace virtkit

#pragma GCC visibility pop

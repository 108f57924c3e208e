// SPDX-License-Identifier: MIT
/*
 * --protect and --protect-gpa of `virtkit run`: sub-page write protection
 * (virtkit/spp.hpp) of guest kernel data, as a security agent would guard
 * a kernel's tables. A range is a kernel symbol with an offset and a
 * length, resolved in the booted image (its exported symbols, or the
 * System.map given), or a guest-physical range. Protection starts before
 * the guest's first instruction. A guest write that touches a protected
 * byte is not performed, not even partly, and is reported on the console;
 * the guest runs on (the writing instruction completes, as on ROM). SPP
 * traps every write to the 128-byte sub-pages a range touches: those that
 * touch only bytes beside the ranges are performed.
 */
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <virtkit/virtkit.hpp>

#include "boot_loader.hpp"

namespace virtkit::tool::run {

/* One --protect or --protect-gpa option. */
struct ProtectRequest {
	std::string symbol;		/* empty for --protect-gpa */
	std::uint64_t offset = 0;	/* from the symbol; the address for --protect-gpa */
	std::uint64_t length = 0;
	std::string text;		/* the option as given, for messages */
};

/*
 * "SYMBOL[+OFF]:LEN" (--protect) or "GPA:LEN" (--protect-gpa; gpa true).
 * Numbers are decimal or 0x hex; LEN is at least 1 and the range must not
 * wrap. nullopt if malformed.
 */
std::optional<ProtectRequest> parse_protect(std::string_view spec, bool gpa);

/* A resolved range of guest-physical memory to protect. */
struct ProtectedRange {
	std::string name;	/* "panic_timeout", or the GPA as given */
	std::uint64_t gpa = 0;
	std::uint64_t length = 0;
};

/*
 * The guest-physical ranges of requests, for the kernel the VMM loaded
 * (kernel.vmlinux, at its physical addresses) with symbols from its
 * exported-symbol table or system_map (a System.map's text). Throws
 * BootError naming the option: a symbol that neither has, a per-CPU
 * symbol (each CPU has its own copy), a range outside the image, symbols
 * with --decompress guest (the guest's decompressor chooses where the
 * kernel goes).
 */
std::vector<ProtectedRange> resolve_protection(const std::vector<ProtectRequest> &requests,
					       const LoadedKernel &kernel,
					       const std::optional<std::string> &system_map);

/*
 * The ranges protected in a VM: enables SubpageProtection, sets the maps
 * and reports each range on stderr; then reports every blocked write (the
 * first max_reported of them) while the VM runs. Must outlive the vCPUs'
 * runs. Throws virtkit::Error naming the range that is not guest RAM.
 */
class KernelDataProtection {
public:
	static constexpr std::uint64_t max_reported = 100;

	KernelDataProtection(Vm &vm, std::vector<ProtectedRange> ranges);
	KernelDataProtection(const KernelDataProtection &) = delete;
	KernelDataProtection &operator=(const KernelDataProtection &) = delete;

	/* Writes not performed, and writes beside the ranges performed. */
	std::uint64_t blocked() const noexcept { return blocked_; }
	std::uint64_t beside() const noexcept { return beside_; }
	SppBackendKind backend() const noexcept { return backend_; }

private:
	SppDecision on_violation(Vcpu &vcpu, const SppViolation &v);
	/* Whether the write touches a range (not only the rest of its sub-pages). */
	bool touches_ranges(const SppViolation &v) const;
	/* The name of the (first) range on page gfn. */
	const std::string &range_on(std::uint64_t gfn) const;
	/* "panic_timeout+0x4", or "" outside the ranges. */
	std::string where(std::uint64_t gpa) const;

	std::vector<ProtectedRange> ranges_;
	std::atomic<std::uint64_t> blocked_{0}, beside_{0};
	SppBackendKind backend_ = SppBackendKind::automatic;
};

} // namespace virtkit::tool::run

// SPDX-License-Identifier: MIT
/*
 * Internal: what a sub-page protection backend implements. The facade
 * (SubpageProtection) validates arguments that do not depend on the
 * backend (flags, wrapping ranges); backends check guest memory and enforce.
 */
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include <virtkit/spp.hpp>

namespace virtkit::detail {

class SppBackend {
public:
	virtual ~SppBackend() = default;
	virtual SppBackendKind kind() const noexcept = 0;
	virtual void set_access(std::uint64_t gfn, std::span<const std::uint32_t> maps) = 0;
	/* Checks the range before it allocates the result. */
	virtual std::vector<std::uint32_t> get_access(std::uint64_t gfn,
						      std::uint64_t npages) const = 0;
	virtual void on_violation(SppViolationHandler handler) = 0;
	virtual SppStats stats() const = 0;
};

} // namespace virtkit::detail

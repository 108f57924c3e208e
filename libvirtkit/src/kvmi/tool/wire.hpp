// SPDX-License-Identifier: MIT
/*
 * Internal: KVMI wire helpers of virtkit::introspect - the protocol header,
 * byte views of wire structs, and the checks every received message gets.
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>

#include "kvmi/protocol/layout.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace virtkit::introspect::detail {

inline constexpr std::size_t msg_hdr_size = sizeof(kvmi_msg_hdr);
inline constexpr std::size_t max_payload = KVMI_MSG_SIZE;
inline constexpr std::size_t max_message = msg_hdr_size + max_payload;

static_assert(max_message == 8192);

using virtkit::detail::kvmi::all_zero;
using virtkit::detail::kvmi::bytes_of;
using virtkit::detail::kvmi::load;
using virtkit::detail::kvmi::zero;

inline kvmi_vcpu_hdr vcpu_hdr(std::uint16_t vcpu) noexcept
{
	kvmi_vcpu_hdr h{};
	h.vcpu = vcpu;
	return h;
}

/* The object representations of parts, one after the other. */
template <class... T> std::vector<std::byte> pack(const T &...parts)
{
	std::vector<std::byte> out;
	out.reserve((sizeof(T) + ... + 0));
	(out.insert(out.end(), bytes_of(parts).begin(), bytes_of(parts).end()), ...);
	return out;
}

inline void append(std::vector<std::byte> &out, std::span<const std::byte> b)
{
	out.insert(out.end(), b.begin(), b.end());
}

std::string hex(std::uint64_t v);

} // namespace virtkit::introspect::detail

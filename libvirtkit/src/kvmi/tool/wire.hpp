// SPDX-License-Identifier: MIT
/*
 * Internal: KVMI wire helpers of virtkit::introspect - the protocol module
 * (kvmi/protocol/, as kvmi::) and the byte helpers the tool side builds
 * its requests with.
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>

#include "kvmi/protocol/layout.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace virtkit::introspect::detail {

namespace kvmi = virtkit::detail::kvmi;

using kvmi::all_zero;
using kvmi::bytes_of;
using kvmi::load;
using kvmi::max_message;
using kvmi::max_payload;
using kvmi::msg_hdr_size;
using kvmi::zero;

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

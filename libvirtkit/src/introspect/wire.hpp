// SPDX-License-Identifier: MIT
/*
 * Internal: KVMI wire helpers of virtkit::introspect - the protocol header,
 * byte views of wire structs, and the checks every received message gets.
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>

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

static_assert(msg_hdr_size == 8 && max_message == 8192);
static_assert(sizeof(kvmi_qemu2introspector) == 104 && sizeof(kvmi_introspector2qemu) == 24);
static_assert(sizeof(kvmi_event) == 544 && sizeof(kvmi_event_arch) == 536);
static_assert(sizeof(kvmi_get_registers_reply) == 8 + sizeof(kvm_regs) + sizeof(kvm_sregs) + 8);
static_assert(sizeof(kvmi_event_pf_reply) == 272);

template <class T> std::span<const std::byte> bytes_of(const T &v) noexcept
{
	static_assert(std::is_trivially_copyable_v<T>);
	return std::as_bytes(std::span<const T, 1>(&v, 1));
}

/* A T from bytes at offset; the caller has checked the size. */
template <class T> T load(std::span<const std::byte> b, std::size_t offset = 0) noexcept
{
	static_assert(std::is_trivially_copyable_v<T>);
	T v;
	std::memcpy(&v, b.data() + offset, sizeof(v));
	return v;
}

inline bool all_zero(std::span<const std::byte> b) noexcept
{
	return std::all_of(b.begin(), b.end(), [](std::byte x) { return x == std::byte{0}; });
}

/* A padding field of a received struct is zero. */
template <class T> bool zero(const T &field) noexcept { return all_zero(bytes_of(field)); }

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

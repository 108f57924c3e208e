// SPDX-License-Identifier: MIT
/*
 * Internal: the KVMI wire layouts (uapi/linux/virtkit_kvmi.h) checked
 * against the protocol's sizes, the limits that follow from them, and the
 * byte helpers both ends of the protocol use - the VMM's server
 * (kvmi/vmm/) and the tool's client library (kvmi/tool/).
 *
 * The protocol module (kvmi/protocol/: this file, messages.hpp,
 * framing.hpp, handshake.hpp, sha1.hpp) lives in virtkit::detail::kvmi.
 * detail: it is library-internal in both libraries (hidden symbols in
 * libvirtkit, a hidden copy in libvirtkit-introspect.so), never part of a
 * public header. kvmi: the VMM side has always been in that namespace and
 * uses the protocol unqualified; the tool side (virtkit::introspect::detail)
 * reaches it as kvmi:: (kvmi/tool/wire.hpp). A namespace of its own
 * (virtkit::kvmi::protocol) would suggest a public API that there is not.
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>

namespace virtkit::detail::kvmi {

/* The kvmi-v7 sizes (libkvmi master, x86_64). */
static_assert(sizeof(kvmi_msg_hdr) == 8);
static_assert(sizeof(kvmi_error_code) == 8);
static_assert(sizeof(kvmi_vcpu_hdr) == 8);
static_assert(sizeof(kvmi_qemu2introspector) == 104);
static_assert(offsetof(kvmi_qemu2introspector, name) == 32);
static_assert(sizeof(kvmi_introspector2qemu) == 24);
static_assert(sizeof(kvmi_features) == 8);
static_assert(sizeof(kvmi_get_version_reply) == 16);
static_assert(sizeof(kvmi_get_guest_info_reply) == 16);
static_assert(sizeof(kvmi_get_registers) == 8);
static_assert(sizeof(kvm_regs) == 144 && sizeof(kvm_sregs) == 312 && sizeof(kvm_msrs) == 8);
static_assert(sizeof(kvmi_get_registers_reply) == 8 + 144 + 312 + 8);
static_assert(sizeof(kvmi_event_arch) == 536);
static_assert(offsetof(kvmi_event_arch, regs) == 8);
static_assert(offsetof(kvmi_event_arch, msrs) == 464);
static_assert(sizeof(kvmi_event) == 544);
static_assert(offsetof(kvmi_event, arch) == 8);
static_assert(sizeof(kvmi_event_reply) == 8);
static_assert(sizeof(kvmi_event_msr) == 24 && sizeof(kvmi_event_msr_reply) == 8);
static_assert(sizeof(kvmi_event_pf) == 24 && sizeof(kvmi_event_pf_reply) == 272);
static_assert(sizeof(kvmi_event_breakpoint) == 16 && sizeof(kvmi_event_trap) == 16);
static_assert(sizeof(kvmi_event_singlestep) == 8);
static_assert(sizeof(kvmi_page_access_entry) == 16 && sizeof(kvmi_set_page_access) == 8);
static_assert(sizeof(kvmi_page_write_bitmap_entry) == 16 && sizeof(kvmi_set_page_write_bitmap) == 8);
static_assert(sizeof(kvmi_inject_exception) == 16 && sizeof(kvmi_read_physical) == 16);
static_assert(sizeof(kvmi_write_physical) == 16 && sizeof(kvmi_query_physical_reply) == 16);
static_assert(sizeof(kvmi_control_cmd_response) == 8 && sizeof(kvmi_pause_vcpu) == 8);
static_assert(KVMI_MSG_SIZE == 8184);

/* A message: the header and at most KVMI_MSG_SIZE bytes of payload. */
inline constexpr std::size_t msg_hdr_size = sizeof(kvmi_msg_hdr);
inline constexpr std::size_t max_payload = KVMI_MSG_SIZE;
inline constexpr std::size_t max_message = msg_hdr_size + max_payload;
static_assert(max_message == 8192);

/* Largest reply data (after kvmi_error_code) one message can carry. */
inline constexpr std::size_t max_reply_data = max_payload - sizeof(kvmi_error_code);
/* GET_REGISTERS: the most MSRs whose reply fits one message. */
inline constexpr std::size_t max_get_registers_msrs =
	(max_reply_data - sizeof(kvmi_get_registers_reply)) / sizeof(kvm_msr_entry);
/* READ_PHYSICAL and WRITE_PHYSICAL move at most one page, within a page. */
inline constexpr std::uint64_t page_size = 4096;
/* A page of data fits one request and one reply. */
static_assert(page_size + sizeof(kvmi_write_physical) <= max_payload &&
	      page_size <= max_reply_data);

/* The bytes of a wire struct. */
template <class T> std::span<const std::byte> bytes_of(const T &v) noexcept
{
	static_assert(std::is_trivially_copyable_v<T>);
	return std::as_bytes(std::span<const T, 1>(&v, 1));
}

/* A wire struct from a (possibly unaligned) buffer; the caller checked the size. */
template <class T> T load(std::span<const std::byte> p, std::size_t offset = 0) noexcept
{
	static_assert(std::is_trivially_copyable_v<T>);
	T v;
	std::memcpy(&v, p.data() + offset, sizeof(T));
	return v;
}

inline bool all_zero(std::span<const std::byte> b) noexcept
{
	return std::all_of(b.begin(), b.end(), [](std::byte x) { return x == std::byte{0}; });
}

/* A padding field of a received struct is zero. */
template <class T> bool zero(const T &field) noexcept { return all_zero(bytes_of(field)); }

} // namespace virtkit::detail::kvmi

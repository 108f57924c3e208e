// SPDX-License-Identifier: MIT
/*
 * Internal: what both ends of the KVMI handshake agree on.
 *
 * The handshake has no message header: the VMM sends struct
 * kvmi_qemu2introspector, the tool answers struct kvmi_introspector2qemu
 * with SHA-1 of the shared secret, and the VMM compares that with its own.
 * Each struct starts with its own size, so a newer peer can send a longer
 * one (the reader skips what it does not know) and the tool accepts an
 * older VMM's struct down to the start of the name, as libkvmi does.
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace virtkit::detail::kvmi {

/* struct_size bounds: the VMM's struct, the tool's answer, either's largest. */
inline constexpr std::size_t min_hello_size = offsetof(kvmi_qemu2introspector, name);
inline constexpr std::size_t min_answer_size = sizeof(kvmi_introspector2qemu);
inline constexpr std::size_t max_handshake_size = 64 * 1024;

using CookieHash = std::array<std::uint8_t, sizeof(kvmi_introspector2qemu::cookie_hash)>;

/* SHA-1 of the secret: what the tool sends and the VMM expects. */
CookieHash cookie_hash(std::string_view secret);

/* The tool's answer: struct_size 24 and the cookie hash. */
kvmi_introspector2qemu handshake_answer(std::string_view secret);

/* Constant-time comparison of two equally long byte strings (false for
 * different lengths). */
bool equal_ct(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b);

} // namespace virtkit::detail::kvmi

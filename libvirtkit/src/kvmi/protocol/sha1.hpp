// SPDX-License-Identifier: MIT
/*
 * Internal: SHA-1 (FIPS 180-4), for the KVMI handshake's cookie hash.
 *
 * The protocol fixes the hash: the introspector proves it knows the shared
 * secret by sending SHA-1(secret), and the VMM compares. SHA-1 is not used
 * for anything else, so a small implementation beats a crypto dependency.
 * Both ends use it through handshake.hpp (cookie_hash()).
 */
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

namespace virtkit::detail::kvmi {

std::array<std::uint8_t, 20> sha1(std::span<const std::byte> data);

} // namespace virtkit::detail::kvmi

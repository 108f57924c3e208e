// SPDX-License-Identifier: MIT
/*
 * Internal: the KVMI handshake, tool side (the rules both ends share are
 * kvmi/protocol/handshake.hpp).
 *
 * The VMM speaks first: struct kvmi_qemu2introspector, whose first field
 * counts the whole struct. The reader keeps the fields it knows (104 bytes
 * with virtkit's max_gpa), skips what a newer VMM adds, and accepts an
 * older, shorter struct down to the start of the name (as libkvmi does).
 * It is fed bytes as they arrive, so an event loop can run many handshakes
 * at once without blocking on any.
 */
#pragma once

#include <array>
#include <cstddef>
#include <span>

#include <virtkit/introspect.hpp>

#include "kvmi/protocol/handshake.hpp"
#include "kvmi/tool/wire.hpp"

namespace virtkit::introspect::detail {

class HandshakeReader {
public:
	/* Takes bytes from the front of data; returns how many it used (it
	 * never reads past the struct). Throws Error("KVMI handshake", ...). */
	std::size_t feed(std::span<const std::byte> data);
	bool done() const noexcept { return size_ != 0 && received_ == size_; }
	/* Valid once done(). */
	HandshakeInfo info() const;

private:
	std::array<std::byte, sizeof(kvmi_qemu2introspector)> known_{};
	std::size_t received_ = 0;
	std::size_t size_ = 0; /* 0 until struct_size has arrived */
};

} // namespace virtkit::introspect::detail

// SPDX-License-Identifier: MIT
/* Internal: names of KVMI commands, for errors and logs (from kvmi/protocol/messages.hpp). */
#pragma once

#include <cstdint>

namespace virtkit::introspect::detail {

/* "KVMI_READ_PHYSICAL", or "KVMI command" for an id without a name. */
const char *command_cstr(std::uint16_t id) noexcept;

} // namespace virtkit::introspect::detail

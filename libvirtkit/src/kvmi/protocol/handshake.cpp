// SPDX-License-Identifier: MIT
#include "kvmi/protocol/handshake.hpp"

#include <cstring>

#include "kvmi/protocol/sha1.hpp"

namespace virtkit::detail::kvmi {

static_assert(std::tuple_size_v<CookieHash> == 20);

CookieHash cookie_hash(std::string_view secret)
{
	return sha1(std::as_bytes(std::span(secret.data(), secret.size())));
}

kvmi_introspector2qemu handshake_answer(std::string_view secret)
{
	kvmi_introspector2qemu a{};
	a.struct_size = sizeof(a);
	auto hash = cookie_hash(secret);
	std::memcpy(a.cookie_hash, hash.data(), sizeof(a.cookie_hash));
	return a;
}

bool equal_ct(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b)
{
	if (a.size() != b.size())
		return false;
	volatile std::uint8_t diff = 0;
	for (std::size_t i = 0; i < a.size(); i++)
		diff = diff | (a[i] ^ b[i]);
	return diff == 0;
}

} // namespace virtkit::detail::kvmi

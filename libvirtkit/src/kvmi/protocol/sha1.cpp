// SPDX-License-Identifier: MIT
#include "kvmi/protocol/sha1.hpp"

#include <bit>
#include <cstring>

namespace virtkit::detail::kvmi {
namespace {

std::uint32_t load_be32(const std::uint8_t *p)
{
	return std::uint32_t(p[0]) << 24 | std::uint32_t(p[1]) << 16 |
	       std::uint32_t(p[2]) << 8 | std::uint32_t(p[3]);
}

void compress(std::array<std::uint32_t, 5> &h, const std::uint8_t *block)
{
	std::uint32_t w[80];

	for (int t = 0; t < 16; t++)
		w[t] = load_be32(block + 4 * t);
	for (int t = 16; t < 80; t++)
		w[t] = std::rotl(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1);

	std::uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
	for (int t = 0; t < 80; t++) {
		std::uint32_t f, k;
		if (t < 20) {
			f = (b & c) | (~b & d);
			k = 0x5a827999;
		} else if (t < 40) {
			f = b ^ c ^ d;
			k = 0x6ed9eba1;
		} else if (t < 60) {
			f = (b & c) | (b & d) | (c & d);
			k = 0x8f1bbcdc;
		} else {
			f = b ^ c ^ d;
			k = 0xca62c1d6;
		}
		std::uint32_t tmp = std::rotl(a, 5) + f + e + k + w[t];
		e = d;
		d = c;
		c = std::rotl(b, 30);
		b = a;
		a = tmp;
	}
	h[0] += a;
	h[1] += b;
	h[2] += c;
	h[3] += d;
	h[4] += e;
}

} // namespace

std::array<std::uint8_t, 20> sha1(std::span<const std::byte> data)
{
	std::array<std::uint32_t, 5> h{0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476,
				       0xc3d2e1f0};
	auto *p = reinterpret_cast<const std::uint8_t *>(data.data());
	std::size_t n = data.size();

	for (; n >= 64; p += 64, n -= 64)
		compress(h, p);

	/* The tail, 0x80, zeros and the bit length fill one or two blocks. */
	std::uint8_t tail[128] = {};
	std::memcpy(tail, p, n);
	tail[n] = 0x80;
	std::size_t blocks = n + 1 + 8 <= 64 ? 1 : 2;
	std::uint64_t bits = std::uint64_t(data.size()) * 8;
	for (int i = 0; i < 8; i++)
		tail[blocks * 64 - 1 - i] = std::uint8_t(bits >> (8 * i));
	for (std::size_t i = 0; i < blocks; i++)
		compress(h, tail + 64 * i);

	std::array<std::uint8_t, 20> out;
	for (int i = 0; i < 5; i++)
		for (int j = 0; j < 4; j++)
			out[4 * i + j] = std::uint8_t(h[i] >> (24 - 8 * j));
	return out;
}

} // namespace virtkit::detail::kvmi

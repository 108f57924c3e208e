// SPDX-License-Identifier: MIT
/* SHA-1 of the KVMI handshake (kvmi/protocol/sha1.cpp): FIPS 180 test vectors. */
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "kvmi/protocol/sha1.hpp"

namespace {

std::string hex(const std::array<std::uint8_t, 20> &h)
{
	std::string s;
	char buf[3];
	for (auto b : h) {
		std::snprintf(buf, sizeof(buf), "%02x", b);
		s += buf;
	}
	return s;
}

std::string sha1_hex(std::string_view text)
{
	return hex(virtkit::detail::kvmi::sha1(std::as_bytes(std::span(text.data(), text.size()))));
}

} // namespace

TEST_CASE("SHA-1: FIPS 180 example messages", "[introspect][sha1]")
{
	CHECK(sha1_hex("abc") == "a9993e364706816aba3e25717850c26c9cd0d89d");
	CHECK(sha1_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
	      "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
	CHECK(sha1_hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmno"
		       "ijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu") ==
	      "a49b2446a02c645bf419f995b67091253a04a259");
}

TEST_CASE("SHA-1: the empty message", "[introspect][sha1]")
{
	CHECK(sha1_hex("") == "da39a3ee5e6b4b0d3255bfef95601890afd80709");
}

TEST_CASE("SHA-1: one million 'a'", "[introspect][sha1]")
{
	std::string a(1000000, 'a');
	CHECK(sha1_hex(a) == "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
}

TEST_CASE("SHA-1: lengths around the padding boundaries", "[introspect][sha1]")
{
	/* Bytes (7 i + 3) mod 256; digests from an independent implementation. */
	struct {
		std::size_t n;
		const char *digest;
	} vectors[] = {
		{55, "ddf57317ef34bfee3b6df83d359098930eb278bc"},
		{56, "a0d492bb0fc889d0eca3bc137066ab6f4f74f369"},
		{63, "c55856749bef509bdfe6bfebfc7bf4e793e82132"},
		{64, "bede92be29c3874e1b54ddc77988d606fc857a8e"},
		{65, "b05a80522b053d6dc7e0a517d0e70212c7dad11f"},
		{119, "504e27376a6e0f0dba8295b85cb25dc4dfa17d23"},
		{120, "82134b02fb3f702491be9bed581eeab59334acb2"},
		{128, "a09133e6730ffe899efb70204cb5646cd5dc24ee"},
	};
	for (auto &v : vectors) {
		std::vector<std::byte> data(v.n);
		for (std::size_t i = 0; i < v.n; i++)
			data[i] = std::byte((i * 7 + 3) & 0xff);
		INFO("length " << v.n);
		CHECK(hex(virtkit::detail::kvmi::sha1(data)) == v.digest);
	}
}

TEST_CASE("SHA-1: the cookie hash of a secret", "[introspect][sha1]")
{
	CHECK(sha1_hex("secret") == "e5e9fa1ba31ecd1ae84f75caaa474f3a663f05f4");
}

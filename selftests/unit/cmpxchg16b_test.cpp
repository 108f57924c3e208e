// SPDX-License-Identifier: MIT
/* virtkit::detail::decode_cmpxchg16b: the one store SPP completes itself. */
#include <catch2/catch.hpp>

#include <vector>

#include "spp/cmpxchg16b.hpp"

using virtkit::detail::decode_cmpxchg16b;

namespace {

struct Cpu {
	kvm_regs regs{};
	kvm_sregs sregs{};

	Cpu()
	{
		sregs.efer = 1u << 10 | 1u << 8; /* LMA, LME */
		sregs.cs.l = 1;
		regs.rax = 0x1000;
		regs.rsp = 0x7000;
		regs.rsi = 0x3000;
		regs.rdi = 0x4000;
		regs.r8 = 0x80000;
		regs.r13 = 0xd000;
		regs.rip = 0x400000;
		sregs.gs.base = 0xffff880000000000ull;
		sregs.fs.base = 0x10000000;
	}
	auto decode(std::vector<std::uint8_t> b) const { return decode_cmpxchg16b(b, regs, sregs); }
};

} // namespace

TEST_CASE("cmpxchg16b: addressing forms", "[cmpxchg16b]")
{
	Cpu c;
	auto d = c.decode({0xf0, 0x48, 0x0f, 0xc7, 0x0f}); /* lock cmpxchg16b (%rdi) */
	REQUIRE(d);
	CHECK(d->gva == 0x4000);
	CHECK(d->length == 5);

	d = c.decode({0x48, 0x0f, 0xc7, 0x4c, 0x24, 0x08}); /* 8(%rsp) */
	REQUIRE(d);
	CHECK(d->gva == 0x7008);
	CHECK(d->length == 6);

	d = c.decode({0x49, 0x0f, 0xc7, 0x0c, 0xc0}); /* (%r8,%rax,8) */
	REQUIRE(d);
	CHECK(d->gva == 0x80000 + 0x1000 * 8);
	CHECK(d->length == 5);

	d = c.decode({0x49, 0x0f, 0xc7, 0x8d, 0xf0, 0xff, 0xff, 0xff}); /* -16(%r13), disp32 */
	REQUIRE(d);
	CHECK(d->gva == 0xd000 - 16);
	CHECK(d->length == 8);

	d = c.decode({0x48, 0x0f, 0xc7, 0x0d, 0x10, 0x00, 0x00, 0x00}); /* 0x10(%rip) */
	REQUIRE(d);
	CHECK(d->gva == 0x400000 + 8 + 0x10);
	CHECK(d->length == 8);

	d = c.decode({0x48, 0x0f, 0xc7, 0x0c, 0x25, 0x00, 0x20, 0x00, 0x00}); /* absolute 0x2000 */
	REQUIRE(d);
	CHECK(d->gva == 0x2000);
	CHECK(d->length == 9);

	d = c.decode({0x65, 0xf0, 0x48, 0x0f, 0xc7, 0x0e}); /* lock cmpxchg16b %gs:(%rsi) */
	REQUIRE(d);
	CHECK(d->gva == 0xffff880000000000ull + 0x3000);
	CHECK(d->length == 6);

	d = c.decode({0x64, 0x48, 0x0f, 0xc7, 0x0e}); /* %fs:(%rsi) */
	REQUIRE(d);
	CHECK(d->gva == 0x10000000 + 0x3000);
}

TEST_CASE("cmpxchg16b: other instructions and modes are not it", "[cmpxchg16b]")
{
	Cpu c;
	CHECK_FALSE(c.decode({0x0f, 0xc7, 0x0f}));	     /* cmpxchg8b: no REX.W */
	CHECK_FALSE(c.decode({0x48, 0x0f, 0xc7, 0xc8}));  /* register operand */
	CHECK_FALSE(c.decode({0x48, 0x0f, 0xc7, 0x37}));  /* /6: vmptrld-like */
	CHECK_FALSE(c.decode({0x67, 0x48, 0x0f, 0xc7, 0x0f})); /* 32-bit address */
	CHECK_FALSE(c.decode({0x48, 0x0f, 0xb1, 0x0f}));  /* cmpxchg */
	CHECK_FALSE(c.decode({0x48, 0x0f, 0xc7}));	     /* truncated */
	CHECK_FALSE(c.decode({0x48, 0x0f, 0xc7, 0x0d, 0x10})); /* truncated disp */
	CHECK_FALSE(c.decode({}));
	Cpu compat;
	compat.sregs.cs.l = 0;
	CHECK_FALSE(compat.decode({0x48, 0x0f, 0xc7, 0x0f}));
	/* 15 prefixes leave no room for the instruction. */
	std::vector<std::uint8_t> longest;
	for (int i = 0; i < 15; i++)
		longest.push_back(0x3e);
	for (std::uint8_t b : {0x48, 0x0f, 0xc7, 0x0f})
		longest.push_back(b);
	CHECK_FALSE(c.decode(longest));
}

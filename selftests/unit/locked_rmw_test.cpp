// SPDX-License-Identifier: MIT
/* virtkit::detail::decode_rmw: the lockable read-modify-writes SPP performs atomically. */
#include <catch2/catch.hpp>

#include <vector>

#include "spp/locked_rmw.hpp"

using virtkit::detail::decode_rmw;
using virtkit::detail::RmwOp;

static auto decode(std::vector<std::uint8_t> code, bool long64 = true)
{
	return decode_rmw(code, long64);
}

TEST_CASE("decode_rmw: ALU forms, sizes and immediates", "[spp][rmw]")
{
	auto d = decode({0xf0, 0x48, 0x01, 0x07}); /* lock add %rax, (%rdi) */
	REQUIRE(d);
	CHECK(d->op == RmwOp::add);
	CHECK(d->size == 8);
	CHECK(d->length == 4);
	CHECK(d->mem.base == 7);
	CHECK(d->src_reg == 0);
	CHECK(!d->src_imm);

	d = decode({0x66, 0xf0, 0x83, 0x04, 0x25, 0x40, 0x01, 0x00, 0x40, 0xfd}); /* lock addw $-3 */
	REQUIRE(d);
	CHECK(d->op == RmwOp::add);
	CHECK(d->size == 2);
	CHECK(d->length == 10);
	CHECK(d->mem.base == -1);
	CHECK(d->mem.index == -1);
	CHECK(d->mem.disp == 0x40000140);
	CHECK(d->src_imm);
	CHECK(d->imm == 0xfffd); /* sign-extended to the operand, masked to it */

	d = decode({0xf0, 0x81, 0x30, 0x78, 0x56, 0x34, 0x12}); /* lock xorl $0x12345678, (%rax) */
	REQUIRE(d);
	CHECK(d->op == RmwOp::xor_);
	CHECK(d->size == 4);
	CHECK(d->imm == 0x12345678);
	CHECK(d->length == 7);

	d = decode({0xf0, 0x20, 0x26}); /* lock and %ah, (%rsi) */
	REQUIRE(d);
	CHECK(d->op == RmwOp::and_);
	CHECK(d->size == 1);
	CHECK(d->high8);
	CHECK(d->src_reg == 0);

	d = decode({0xf0, 0x40, 0x20, 0x26}); /* with a REX: %spl, not %ah */
	REQUIRE(d);
	CHECK(!d->high8);
	CHECK(d->src_reg == 4);

	/* cmp writes nothing; a register destination is not memory. */
	CHECK(!decode({0xf0, 0x83, 0x38, 0x01}));
	CHECK(!decode({0x48, 0x39, 0x07}));
	CHECK(!decode({0xf0, 0x48, 0x01, 0xc7}));
	/* A plain store is not one of them. */
	CHECK(!decode({0x48, 0x89, 0x07}));
}

TEST_CASE("decode_rmw: addressing", "[spp][rmw]")
{
	/* lock incq 0x10(%r8,%r13,4), with a gs override. */
	auto d = decode({0x65, 0xf0, 0x4b, 0xff, 0x44, 0xa8, 0x10});
	REQUIRE(d);
	CHECK(d->op == RmwOp::inc);
	CHECK(d->mem.seg == 5);
	CHECK(d->mem.base == 8);
	CHECK(d->mem.index == 13);
	CHECK(d->mem.scale == 2);
	CHECK(d->mem.disp == 0x10);
	CHECK(d->length == 7);

	/* lock decl 0x100(%rip) */
	d = decode({0xf0, 0xff, 0x0d, 0x00, 0x01, 0x00, 0x00});
	REQUIRE(d);
	CHECK(d->op == RmwOp::dec);
	CHECK(d->mem.rip_relative);
	CHECK(d->mem.disp == 0x100);

	/* 32-bit code: disp32 is absolute; 16-bit addressing is refused. */
	d = decode({0xf0, 0xff, 0x05, 0x00, 0x10, 0x00, 0x00}, false);
	REQUIRE(d);
	CHECK(!d->mem.rip_relative);
	CHECK(d->mem.addr_bytes == 4);
	CHECK(!decode({0x67, 0xf0, 0xff, 0x07}, false));

	/* A truncated instruction is not decoded. */
	CHECK(!decode({0xf0, 0xff, 0x05, 0x00, 0x10}));
}

TEST_CASE("decode_rmw: exchange, bit and compare-exchange forms", "[spp][rmw]")
{
	auto d = decode({0x48, 0x87, 0x07}); /* xchg %rax, (%rdi): locked without a prefix */
	REQUIRE(d);
	CHECK(d->op == RmwOp::xchg);
	CHECK(d->size == 8);

	d = decode({0xf0, 0x0f, 0xc1, 0x0e}); /* lock xadd %ecx, (%rsi) */
	REQUIRE(d);
	CHECK(d->op == RmwOp::xadd);
	CHECK(d->src_reg == 1);

	d = decode({0xf0, 0x4c, 0x0f, 0xb1, 0x0f}); /* lock cmpxchg %r9, (%rdi) */
	REQUIRE(d);
	CHECK(d->op == RmwOp::cmpxchg);
	CHECK(d->src_reg == 9);

	d = decode({0xf0, 0x0f, 0xc7, 0x0f}); /* lock cmpxchg8b (%rdi) */
	REQUIRE(d);
	CHECK(d->op == RmwOp::cmpxchg8b);
	CHECK(d->size == 8);
	CHECK(!decode({0xf0, 0x48, 0x0f, 0xc7, 0x0f})); /* cmpxchg16b: completed elsewhere */

	d = decode({0xf0, 0x48, 0x0f, 0xba, 0x2f, 0x47}); /* lock btsq $0x47, (%rdi) */
	REQUIRE(d);
	CHECK(d->op == RmwOp::bts);
	CHECK(d->imm == 0x47);
	CHECK(!decode({0x0f, 0xba, 0x27, 0x01})); /* bt: reads only */

	d = decode({0xf0, 0x0f, 0xb3, 0x07}); /* lock btr %eax, (%rdi) */
	REQUIRE(d);
	CHECK(d->op == RmwOp::btr);

	d = decode({0xf0, 0xf6, 0x17}); /* lock notb (%rdi) */
	REQUIRE(d);
	CHECK(d->op == RmwOp::not_);
	CHECK(d->size == 1);
	d = decode({0xf0, 0x66, 0xf7, 0x1f}); /* lock negw (%rdi) */
	REQUIRE(d);
	CHECK(d->op == RmwOp::neg);
	CHECK(d->size == 2);
}

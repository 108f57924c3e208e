// SPDX-License-Identifier: MIT
/* GET_MTRR_TYPE's computation (libvirtkit/src/kvmi/vmm/mtrr.hpp). */
#include <catch2/catch.hpp>

#include "kvmi/vmm/mtrr.hpp"

using namespace virtkit::detail::kvmi;

namespace {

constexpr std::uint64_t def_e = 1u << 11, def_fe = 1u << 10, cap_fix = 1u << 8;
constexpr std::uint64_t valid = 1u << 11;

/* A variable range [base, base + size) of type t (size a power of two). */
MtrrState::Var range(std::uint64_t base, std::uint64_t size, std::uint8_t t)
{
	return {base | t, (~(size - 1) & ((1ull << 52) - 1)) | valid};
}

} // namespace

TEST_CASE("disabled MTRRs answer UC, WB without MTRR in CPUID (KVM's mtrr_disabled_type)",
	  "[kvmi][mtrr]")
{
	MtrrState m;
	CHECK(mtrr_type(m, 0) == mtrr_uc);
	m.def_type = mtrr_wb; /* E clear: the default type does not apply */
	CHECK(mtrr_type(m, 0x12345000) == mtrr_uc);
	m.cpuid_mtrr = false;
	CHECK(mtrr_type(m, 0) == mtrr_wb);
	m.def_type = mtrr_uc;
	CHECK(mtrr_type(m, 0x12345000) == mtrr_wb);
}

TEST_CASE("no range matches: the default type", "[kvmi][mtrr]")
{
	MtrrState m;
	m.def_type = def_e | mtrr_uc;
	m.cap = 8;
	CHECK(mtrr_type(m, 0x100000) == mtrr_uc);
	m.def_type = def_e | mtrr_wb;
	CHECK(mtrr_type(m, 0x100000) == mtrr_wb);
}

TEST_CASE("fixed ranges below 1 MiB when FE and the FIX capability are set", "[kvmi][mtrr]")
{
	MtrrState m;
	m.def_type = def_e | def_fe | mtrr_uc;
	m.cap = cap_fix | 8;
	m.fixed[0] = 0x0606060606060606ull;	/* 0..512K WB */
	m.fixed[1] = 0x0000000000000001ull;	/* 0x80000: WC, rest UC */
	m.fixed[2] = 0x0500000000000000ull;	/* 0xBC000..0xBFFFF: WP */
	m.fixed[10] = 0x0400000000000000ull;	/* 0xFF000: WT */
	CHECK(mtrr_type(m, 0x0) == mtrr_wb);
	CHECK(mtrr_type(m, 0x7ffff) == mtrr_wb);
	CHECK(mtrr_type(m, 0x80000) == mtrr_wc);
	CHECK(mtrr_type(m, 0x84000) == mtrr_uc);
	CHECK(mtrr_type(m, 0xbc000) == mtrr_wp);
	CHECK(mtrr_type(m, 0xff000) == mtrr_wt);
	CHECK(mtrr_type(m, 0xfe000) == mtrr_uc);
	/* FE clear: the fixed ranges do not apply (default). */
	m.def_type = def_e | mtrr_wb;
	CHECK(mtrr_type(m, 0x80000) == mtrr_wb);
	/* No FIX capability: neither. */
	m.def_type = def_e | def_fe | mtrr_wb;
	m.cap = 8;
	CHECK(mtrr_type(m, 0x80000) == mtrr_wb);
}

TEST_CASE("variable ranges and their precedence", "[kvmi][mtrr]")
{
	MtrrState m;
	m.def_type = def_e | mtrr_uc;
	m.cap = 4;
	m.var[0] = range(0, 1ull << 30, mtrr_wb);		/* 0..1G WB */
	m.var[1] = range(0x20000000, 0x10000000, mtrr_wt);	/* 512M..768M WT */
	m.var[2] = range(0x30000000, 0x1000000, mtrr_uc);	/* 768M..784M UC */
	CHECK(mtrr_type(m, 0x1000000) == mtrr_wb);
	CHECK(mtrr_type(m, 0x20000000) == mtrr_wt);	/* WT + WB = WT */
	CHECK(mtrr_type(m, 0x30000000) == mtrr_uc);	/* UC wins */
	CHECK(mtrr_type(m, 0x40000000) == mtrr_uc);	/* default */
	m.var[3] = range(0x38000000, 0x1000000, mtrr_wc);	/* WB + WC: undefined -> UC */
	CHECK(mtrr_type(m, 0x38000000) == mtrr_uc);
	/* A range without V does not match; ranges beyond VCNT do not count. */
	m.var[0].mask &= ~valid;
	CHECK(mtrr_type(m, 0x1000000) == mtrr_uc);
	m.cap = 0;
	CHECK(mtrr_type(m, 0x20000000) == mtrr_uc);
}

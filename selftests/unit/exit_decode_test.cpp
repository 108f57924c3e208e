// SPDX-License-Identifier: MIT
/*
 * virtkit::detail::decode_exit, exit_reason_name and describe. Each test lays
 * out a kvm_run in a zeroed, page-aligned two-page buffer - the shape of the
 * vCPU mapping KVM hands out - and decodes it.
 */
#include <catch2/catch.hpp>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <variant>

#include <virtkit/kvm.h>

#include <virtkit/exit.hpp>

#include "core/exit_decode.hpp"
#include "core/kvm_compat.h"

using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;
using namespace virtkit;
using virtkit::detail::decode_exit;

namespace {

constexpr std::size_t page = 4096;

/* A zeroed, page-aligned buffer of two pages holding a kvm_run. */
struct RunBuffer {
	static constexpr std::size_t size = 2 * page;

	RunBuffer()
	{
		mem = static_cast<std::byte *>(std::aligned_alloc(page, size));
		if (!mem)
			throw std::bad_alloc();
		std::memset(mem, 0, size);
	}
	~RunBuffer() { std::free(mem); }
	RunBuffer(const RunBuffer &) = delete;
	RunBuffer &operator=(const RunBuffer &) = delete;

	kvm_run &run() { return *reinterpret_cast<kvm_run *>(mem); }
	Exit decode(bool interrupted = false) { return decode_exit(run(), size, interrupted); }

	std::byte *mem;
};

template <class T>
const T &as(const Exit &e)
{
	REQUIRE(std::holds_alternative<T>(e));
	return std::get<T>(e);
}
/* The alternative would dangle: name the Exit first. */
template <class T>
const T &as(const Exit &&e) = delete;

} // namespace

TEST_CASE("decode IO out", "[exit][io]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_IO;
	run.io.direction = KVM_EXIT_IO_OUT;
	run.io.port = 0x3f8;
	run.io.size = 1;
	run.io.count = 1;
	run.io.data_offset = page;
	b.mem[page] = std::byte{'A'};

	Exit e = b.decode();
	const auto &io = as<IoExit>(e);
	CHECK(io.is_out());
	CHECK_FALSE(io.is_in());
	CHECK(io.direction == IoExit::Direction::out);
	CHECK(io.port == 0x3f8);
	CHECK(io.size == 1);
	CHECK(io.count == 1);
	CHECK(io.data.data() == b.mem + page);
	CHECK(io.data.size() == 1);
	CHECK(io.value() == 'A');
	CHECK(describe(e) == "I/O out port=0x3f8 size=1 count=1 data=0x41");
}

TEST_CASE("decode IO in: set() fills kvm_run", "[exit][io]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_IO;
	run.io.direction = KVM_EXIT_IO_IN;
	run.io.port = 0x71;
	run.io.size = 4;
	run.io.count = 1;
	run.io.data_offset = page + 8;

	Exit e = b.decode();
	const auto &io = as<IoExit>(e);
	CHECK(io.is_in());
	CHECK(io.port == 0x71);
	CHECK(io.data.data() == b.mem + page + 8);
	CHECK(io.data.size() == 4);
	CHECK(io.value() == 0);

	io.set(0xdeadbeef);
	CHECK(io.value() == 0xdeadbeef);
	std::uint32_t raw;
	std::memcpy(&raw, b.mem + page + 8, 4);
	CHECK(raw == 0xdeadbeef);

	SECTION("set() keeps only the low size bytes") {
		io.set(0x1122334455667788ull);
		CHECK(io.value() == 0x55667788);
		CHECK(b.mem[page + 12] == std::byte{0});
	}
	SECTION("out-of-range element index is ignored") {
		io.set(0x12345678, 1);
		CHECK(io.value(1) == 0);
		CHECK(b.mem[page + 12] == std::byte{0});
		CHECK(io.value() == 0xdeadbeef);
	}

	std::string d = describe(e);
	CHECK_THAT(d, StartsWith("I/O in port=0x71 size=4 count=1"));
	CHECK_THAT(d, !Contains("data="));
}

TEST_CASE("decode IO rep: count > 1 elements", "[exit][io]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_IO;
	run.io.direction = KVM_EXIT_IO_OUT;
	run.io.port = 0x1f0;
	run.io.size = 2;
	run.io.count = 4;
	run.io.data_offset = page;
	const std::uint16_t words[4] = {0x1111, 0x2222, 0x3333, 0xffff};
	std::memcpy(b.mem + page, words, sizeof(words));

	Exit e = b.decode();
	const auto &io = as<IoExit>(e);
	CHECK(io.count == 4);
	CHECK(io.data.size() == 8);
	CHECK(io.value(0) == 0x1111);
	CHECK(io.value(1) == 0x2222);
	CHECK(io.value(2) == 0x3333);
	CHECK(io.value(3) == 0xffff);
	CHECK(io.value(4) == 0); /* past count */

	io.set(0xabcd, 2);
	std::uint16_t w;
	std::memcpy(&w, b.mem + page + 4, 2);
	CHECK(w == 0xabcd);
	CHECK(io.value(1) == 0x2222);
	CHECK(io.value(3) == 0xffff);
	CHECK_THAT(describe(e), Contains("count=4"));
}

TEST_CASE("decode IO with data outside the mapping is UnknownExit", "[exit][io]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_IO;
	run.io.direction = KVM_EXIT_IO_IN;
	run.io.size = 4;
	run.io.count = 1;

	SECTION("offset past the end") {
		run.io.data_offset = RunBuffer::size + page;
		Exit e = b.decode();
		CHECK(as<UnknownExit>(e).reason == KVM_EXIT_IO);
	}
	SECTION("offset at the end") {
		run.io.data_offset = RunBuffer::size;
		Exit e = b.decode();
		CHECK(as<UnknownExit>(e).reason == KVM_EXIT_IO);
	}
	SECTION("data straddles the end") {
		run.io.data_offset = RunBuffer::size - 2;
		Exit e = b.decode();
		CHECK(as<UnknownExit>(e).reason == KVM_EXIT_IO);
	}
	SECTION("rep data straddles the end") {
		run.io.count = 3;
		run.io.data_offset = RunBuffer::size - 8;
		Exit e = b.decode();
		CHECK(as<UnknownExit>(e).reason == KVM_EXIT_IO);
	}
	SECTION("huge offset does not wrap") {
		run.io.data_offset = ~0ull - 1;
		Exit e = b.decode();
		CHECK(as<UnknownExit>(e).reason == KVM_EXIT_IO);
	}
	SECTION("data ending exactly at the end is fine") {
		run.io.data_offset = RunBuffer::size - 4;
		Exit e = b.decode();
		const auto &io = as<IoExit>(e);
		CHECK(io.data.data() == b.mem + RunBuffer::size - 4);
		CHECK(io.data.size() == 4);
	}
}

TEST_CASE("decode MMIO write", "[exit][mmio]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_MMIO;
	run.mmio.phys_addr = 0x1000;
	run.mmio.is_write = 1;
	run.mmio.len = 4;
	const std::uint32_t v = 0x2a;
	std::memcpy(run.mmio.data, &v, 4);

	Exit e = b.decode();
	const auto &m = as<MmioExit>(e);
	CHECK(m.gpa == 0x1000);
	CHECK(m.is_write());
	CHECK_FALSE(m.is_read());
	CHECK(m.direction == MmioExit::Direction::write);
	CHECK(m.data.size() == 4);
	CHECK(m.data.data() == reinterpret_cast<std::byte *>(run.mmio.data));
	CHECK(m.value() == 0x2a);

	std::string d = describe(e);
	CHECK_THAT(d, Contains("MMIO write"));
	CHECK_THAT(d, Contains("gpa=0x1000"));
	CHECK_THAT(d, Contains("len=4"));
	CHECK_THAT(d, Contains("data=0x2a"));
	CHECK(d == "MMIO write gpa=0x1000 len=4 data=0x2a");
}

TEST_CASE("decode MMIO read: set() writes run.mmio.data", "[exit][mmio]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_MMIO;
	run.mmio.phys_addr = 0xfee00030;
	run.mmio.is_write = 0;
	run.mmio.len = 2;

	Exit e = b.decode();
	const auto &m = as<MmioExit>(e);
	CHECK_FALSE(m.is_write());
	CHECK(m.is_read());
	CHECK(m.direction == MmioExit::Direction::read);
	CHECK(m.gpa == 0xfee00030);
	CHECK(m.data.size() == 2);

	m.set(0xbeef);
	std::uint16_t w;
	std::memcpy(&w, run.mmio.data, 2);
	CHECK(w == 0xbeef);
	CHECK(m.value() == 0xbeef);

	m.set(0x123456); /* only len bytes are written */
	CHECK(m.value() == 0x3456);
	CHECK(run.mmio.data[2] == 0);

	std::string d = describe(e);
	CHECK_THAT(d, Contains("MMIO read"));
	CHECK_THAT(d, Contains("gpa=0xfee00030"));
	CHECK_THAT(d, !Contains("data="));
}

TEST_CASE("decode MMIO len is clamped to the data array", "[exit][mmio]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_MMIO;
	run.mmio.is_write = 0;
	run.mmio.len = 200;
	Exit e = b.decode();
	const auto &m = as<MmioExit>(e);
	CHECK(m.data.size() == sizeof(run.mmio.data));
	m.set(~0ull);
	CHECK(m.value() == ~0ull);
}

TEST_CASE("decode HLT and SHUTDOWN", "[exit]")
{
	RunBuffer b;
	b.run().exit_reason = KVM_EXIT_HLT;
	Exit hlt = b.decode();
	CHECK(std::holds_alternative<HltExit>(hlt));
	CHECK(describe(hlt) == "HLT");

	b.run().exit_reason = KVM_EXIT_SHUTDOWN;
	Exit sd = b.decode();
	CHECK(std::holds_alternative<ShutdownExit>(sd));
	CHECK_THAT(describe(sd), StartsWith("SHUTDOWN"));
}

TEST_CASE("decode DEBUG", "[exit]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_DEBUG;
	run.debug.arch.exception = 1;
	run.debug.arch.pc = 0x401000;
	run.debug.arch.dr6 = 0xffff4ff0;
	run.debug.arch.dr7 = 0x400;

	Exit e = b.decode();
	const auto &d = as<DebugExit>(e);
	CHECK(d.exception == 1);
	CHECK(d.pc == 0x401000);
	CHECK(d.dr6 == 0xffff4ff0);
	CHECK(d.dr7 == 0x400);

	std::string s = describe(e);
	CHECK_THAT(s, StartsWith("DEBUG"));
	CHECK_THAT(s, Contains("exception=1"));
	CHECK_THAT(s, Contains("pc=0x401000"));
	CHECK_THAT(s, Contains("dr6=0xffff4ff0"));
	CHECK_THAT(s, Contains("dr7=0x400"));
}

TEST_CASE("decode RDMSR: set() and fail() write kvm_run", "[exit][msr]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_X86_RDMSR;
	run.msr.index = 0xc0000080;
	run.msr.reason = KVM_MSR_EXIT_REASON_UNKNOWN;

	Exit e = b.decode();
	const auto &m = as<MsrExit>(e);
	CHECK_FALSE(m.is_write());
	CHECK(m.is_read());
	CHECK(m.direction == MsrExit::Direction::read);
	CHECK(m.index == 0xc0000080);
	CHECK(m.reason == KVM_MSR_EXIT_REASON_UNKNOWN);
	/* Views of kvm_run's msr.data and msr.error, as the other exits' data. */
	CHECK(m.data.data() == reinterpret_cast<std::byte *>(&run.msr.data));
	CHECK(m.data.size() == 8);
	CHECK(m.error.data() == reinterpret_cast<std::byte *>(&run.msr.error));
	CHECK(m.error.size() == 1);
	CHECK_FALSE(m.failed());

	m.set(0xd01);
	CHECK(run.msr.data == 0xd01);
	CHECK(m.value() == 0xd01);
	CHECK(run.msr.error == 0);

	m.fail();
	CHECK(run.msr.error != 0);
	CHECK(m.failed());
	CHECK(run.msr.pad[0] == 0); /* only the error byte */

	std::string s = describe(e);
	CHECK_THAT(s, StartsWith("RDMSR"));
	CHECK_THAT(s, Contains("index=0xc0000080"));
	CHECK_THAT(s, Contains("reason=0x2"));
	CHECK_THAT(s, !Contains("data="));
}

TEST_CASE("decode WRMSR", "[exit][msr]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_X86_WRMSR;
	run.msr.index = 0x10;
	run.msr.reason = KVM_MSR_EXIT_REASON_FILTER;
	run.msr.data = 0x123456789abcdef0ull;

	Exit e = b.decode();
	const auto &m = as<MsrExit>(e);
	CHECK(m.is_write());
	CHECK_FALSE(m.is_read());
	CHECK(m.direction == MsrExit::Direction::write);
	CHECK(m.index == 0x10);
	CHECK(m.reason == KVM_MSR_EXIT_REASON_FILTER);
	CHECK(m.value() == 0x123456789abcdef0ull);

	m.fail();
	CHECK(run.msr.error == 1);

	std::string s = describe(e);
	CHECK_THAT(s, StartsWith("WRMSR"));
	CHECK_THAT(s, Contains("data=0x123456789abcdef0"));
}

TEST_CASE("decode FAIL_ENTRY", "[exit]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_FAIL_ENTRY;
	run.fail_entry.hardware_entry_failure_reason = 0x80000021;
	run.fail_entry.cpu = 3;

	Exit e = b.decode();
	const auto &f = as<FailEntryExit>(e);
	CHECK(f.hardware_entry_failure_reason == 0x80000021);
	CHECK(f.cpu == 3);
	CHECK_THAT(describe(e), Contains("FAIL_ENTRY"));
	CHECK_THAT(describe(e), Contains("hardware_entry_failure_reason=0x80000021"));
	CHECK_THAT(describe(e), Contains("cpu=3"));
}

TEST_CASE("decode INTERNAL_ERROR", "[exit]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_INTERNAL_ERROR;
	run.internal.suberror = KVM_INTERNAL_ERROR_EMULATION;
	for (std::size_t i = 0; i < std::size(run.internal.data); i++)
		run.internal.data[i] = 0x100 + i;

	SECTION("ndata within the array") {
		run.internal.ndata = 3;
		Exit e = b.decode();
		const auto &ie = as<InternalErrorExit>(e);
		CHECK(ie.suberror == KVM_INTERNAL_ERROR_EMULATION);
		REQUIRE(ie.data.size() == 3);
		CHECK(ie.data.data() == reinterpret_cast<const std::uint64_t *>(run.internal.data));
		CHECK(ie.data[0] == 0x100);
		CHECK(ie.data[2] == 0x102);
		std::string s = describe(e);
		CHECK_THAT(s, StartsWith("INTERNAL_ERROR suberror=1"));
		CHECK_THAT(s, Contains("emulation failure"));
		CHECK_THAT(s, Contains("0x102"));
		CHECK_THAT(s, !Contains("0x103"));
	}
	SECTION("ndata clamped to the array size") {
		run.internal.ndata = 1000;
		Exit e = b.decode();
		const auto &ie = as<InternalErrorExit>(e);
		CHECK(ie.data.size() == std::size(run.internal.data));
		CHECK(ie.data.back() == 0x10f);
	}
	SECTION("ndata zero") {
		run.internal.suberror = KVM_INTERNAL_ERROR_DELIVERY_EV;
		run.internal.ndata = 0;
		Exit e = b.decode();
		CHECK(as<InternalErrorExit>(e).data.empty());
		CHECK(describe(e) == "INTERNAL_ERROR suberror=3");
	}
}

TEST_CASE("decode SYSTEM_EVENT", "[exit]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_SYSTEM_EVENT;
	run.system_event.type = KVM_SYSTEM_EVENT_RESET;
	run.system_event.ndata = 2;
	run.system_event.data[0] = 7;
	run.system_event.data[1] = 8;

	Exit e = b.decode();
	const auto &se = as<SystemEventExit>(e);
	CHECK(se.type == KVM_SYSTEM_EVENT_RESET);
	REQUIRE(se.data.size() == 2);
	CHECK(se.data[0] == 7);
	CHECK(se.data[1] == 8);
	CHECK(describe(e) == "SYSTEM_EVENT type=2");

	run.system_event.ndata = 99;
	Exit clamped = b.decode();
	CHECK(as<SystemEventExit>(clamped).data.size() == std::size(run.system_event.data));
}

TEST_CASE("decode MEMORY_FAULT from the exit union", "[exit]")
{
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = 39;
	STATIC_REQUIRE(KVM_EXIT_MEMORY_FAULT == 39);
	const virtkit_kvm_memory_fault f{0x8 /* KVM_MEMORY_EXIT_FLAG_PRIVATE */, 0x200000, 0x1000};
	std::memcpy(&run.hw, &f, sizeof(f));

	Exit e = b.decode();
	const auto &mf = as<MemoryFaultExit>(e);
	CHECK(mf.flags == 0x8);
	CHECK(mf.gpa == 0x200000);
	CHECK(mf.size == 0x1000);

	std::string s = describe(e);
	CHECK_THAT(s, StartsWith("MEMORY_FAULT"));
	CHECK_THAT(s, Contains("gpa=0x200000"));
	CHECK_THAT(s, Contains("size=0x1000"));
	CHECK_THAT(s, Contains("flags=0x8"));
}

TEST_CASE("a KVM_RUN failing with EFAULT reports MEMORY_FAULT, nothing else", "[exit]")
{
	using virtkit::detail::failed_run_reports_exit;
	RunBuffer b;
	auto &run = b.run();
	run.exit_reason = KVM_EXIT_MEMORY_FAULT;
	CHECK(failed_run_reports_exit(run, EFAULT));
	/* Other errors are errors even if exit_reason says MEMORY_FAULT. */
	CHECK_FALSE(failed_run_reports_exit(run, EINTR));
	CHECK_FALSE(failed_run_reports_exit(run, EINVAL));
	/* Vcpu::run() clears exit_reason before KVM_RUN: a plain EFAULT. */
	run.exit_reason = KVM_EXIT_UNKNOWN;
	CHECK_FALSE(failed_run_reports_exit(run, EFAULT));
	run.exit_reason = KVM_EXIT_MMIO;
	CHECK_FALSE(failed_run_reports_exit(run, EFAULT));
}

TEST_CASE("decode interruptions", "[exit]")
{
	RunBuffer b;

	SECTION("KVM_EXIT_INTR") {
		b.run().exit_reason = KVM_EXIT_INTR;
		Exit e = b.decode();
		CHECK(std::holds_alternative<InterruptedExit>(e));
		CHECK_THAT(describe(e), StartsWith("INTERRUPTED"));
	}
	SECTION("interrupted wins over a stale exit reason") {
		b.run().exit_reason = KVM_EXIT_IO;
		b.run().io.data_offset = ~0ull; /* would otherwise be UnknownExit */
		CHECK(std::holds_alternative<InterruptedExit>(b.decode(true)));
		b.run().exit_reason = KVM_EXIT_HLT;
		CHECK(std::holds_alternative<InterruptedExit>(b.decode(true)));
	}
}

TEST_CASE("decode unknown exit reasons", "[exit]")
{
	RunBuffer b;
	b.run().exit_reason = 9999;
	Exit e = b.decode();
	CHECK(as<UnknownExit>(e).reason == 9999);
	CHECK(describe(e) == "unhandled exit KVM_EXIT_9999");

	b.run().exit_reason = KVM_EXIT_IRQ_WINDOW_OPEN; /* known to KVM, not decoded */
	Exit w = b.decode();
	CHECK(as<UnknownExit>(w).reason == KVM_EXIT_IRQ_WINDOW_OPEN);
	CHECK(describe(w) == "unhandled exit KVM_EXIT_IRQ_WINDOW_OPEN");
}

TEST_CASE("exit_reason_name", "[exit]")
{
	CHECK(exit_reason_name(KVM_EXIT_UNKNOWN) == "KVM_EXIT_UNKNOWN");
	CHECK(exit_reason_name(KVM_EXIT_IO) == "KVM_EXIT_IO");
	CHECK(exit_reason_name(KVM_EXIT_HLT) == "KVM_EXIT_HLT");
	CHECK(exit_reason_name(6) == "KVM_EXIT_MMIO");
	CHECK(exit_reason_name(KVM_EXIT_SHUTDOWN) == "KVM_EXIT_SHUTDOWN");
	CHECK(exit_reason_name(KVM_EXIT_INTERNAL_ERROR) == "KVM_EXIT_INTERNAL_ERROR");
	CHECK(exit_reason_name(KVM_EXIT_X86_RDMSR) == "KVM_EXIT_X86_RDMSR");
	CHECK(exit_reason_name(KVM_EXIT_X86_WRMSR) == "KVM_EXIT_X86_WRMSR");
	CHECK(exit_reason_name(39) == "KVM_EXIT_MEMORY_FAULT");
	CHECK(exit_reason_name(9999) == "KVM_EXIT_9999");
}

// SPDX-License-Identifier: MIT
#include <virtkit/exit.hpp>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "core/exit_decode.hpp"
#include "core/kvm_compat.h"

namespace virtkit {

static std::uint64_t load_le(const std::byte *p, std::size_t n)
{
	std::uint64_t v = 0;
	std::memcpy(&v, p, n < 8 ? n : 8);
	return v;
}

static void store_le(std::byte *p, std::size_t n, std::uint64_t v)
{
	std::memcpy(p, &v, n < 8 ? n : 8);
}

std::uint64_t IoExit::value(std::uint32_t i) const noexcept
{
	if (i >= count)
		return 0;
	return load_le(data.data() + std::size_t(i) * size, size);
}

void IoExit::set(std::uint64_t v, std::uint32_t i) const noexcept
{
	if (i < count)
		store_le(data.data() + std::size_t(i) * size, size, v);
}

std::uint64_t MmioExit::value() const noexcept
{
	return load_le(data.data(), data.size());
}

void MmioExit::set(std::uint64_t v) const noexcept
{
	store_le(data.data(), data.size(), v);
}

std::uint64_t MsrExit::value() const noexcept
{
	return load_le(data.data(), data.size());
}

void MsrExit::set(std::uint64_t v) const noexcept
{
	store_le(data.data(), data.size(), v);
}

void MsrExit::fail() const noexcept
{
	if (!error.empty())
		error[0] = std::byte{1};
}

bool MsrExit::failed() const noexcept
{
	return !error.empty() && error[0] != std::byte{0};
}

std::string exit_reason_name(std::uint32_t reason)
{
	switch (reason) {
#define N(x)            \
	case KVM_EXIT_##x: \
		return "KVM_EXIT_" #x;
		N(UNKNOWN) N(EXCEPTION) N(IO) N(HYPERCALL) N(DEBUG) N(HLT)
		N(MMIO) N(IRQ_WINDOW_OPEN) N(SHUTDOWN) N(FAIL_ENTRY) N(INTR)
		N(SET_TPR) N(TPR_ACCESS) N(NMI) N(INTERNAL_ERROR)
		N(SYSTEM_EVENT) N(IOAPIC_EOI) N(HYPERV) N(X86_RDMSR)
		N(X86_WRMSR) N(DIRTY_RING_FULL) N(AP_RESET_HOLD)
		N(X86_BUS_LOCK) N(XEN) N(NOTIFY) N(MEMORY_FAULT)
#undef N
	}
	return "KVM_EXIT_" + std::to_string(reason);
}

namespace {

std::string hexs(std::uint64_t v)
{
	char b[24];
	std::snprintf(b, sizeof(b), "0x%llx", (unsigned long long)v);
	return b;
}

struct Describer {
	std::string operator()(const IoExit &e) const
	{
		std::string s = std::string("I/O ") + (e.is_in() ? "in" : "out") +
				" port=" + hexs(e.port) + " size=" + std::to_string(e.size) +
				" count=" + std::to_string(e.count);
		if (e.is_out())
			s += " data=" + hexs(e.value());
		return s;
	}
	std::string operator()(const MmioExit &e) const
	{
		std::string s = std::string("MMIO ") + (e.is_write() ? "write" : "read") +
				" gpa=" + hexs(e.gpa) + " len=" + std::to_string(e.data.size());
		if (e.is_write())
			s += " data=" + hexs(e.value());
		return s;
	}
	std::string operator()(const HltExit &) const { return "HLT"; }
	std::string operator()(const DebugExit &e) const
	{
		return "DEBUG exception=" + std::to_string(e.exception) + " pc=" + hexs(e.pc) +
		       " dr6=" + hexs(e.dr6) + " dr7=" + hexs(e.dr7);
	}
	std::string operator()(const MsrExit &e) const
	{
		std::string s = std::string(e.is_write() ? "WRMSR" : "RDMSR") +
				" index=" + hexs(e.index) + " reason=" + hexs(e.reason);
		if (e.is_write())
			s += " data=" + hexs(e.value());
		return s;
	}
	std::string operator()(const ShutdownExit &) const
	{
		return "SHUTDOWN (triple fault)";
	}
	std::string operator()(const FailEntryExit &e) const
	{
		return "FAIL_ENTRY hardware_entry_failure_reason=" +
		       hexs(e.hardware_entry_failure_reason) + " cpu=" + std::to_string(e.cpu);
	}
	std::string operator()(const InternalErrorExit &e) const
	{
		std::string s = "INTERNAL_ERROR suberror=" + std::to_string(e.suberror);
		if (e.suberror == KVM_INTERNAL_ERROR_EMULATION)
			s += " (emulation failure)";
		for (auto d : e.data)
			s += " " + hexs(d);
		return s;
	}
	std::string operator()(const SystemEventExit &e) const
	{
		return "SYSTEM_EVENT type=" + std::to_string(e.type);
	}
	std::string operator()(const MemoryFaultExit &e) const
	{
		return "MEMORY_FAULT gpa=" + hexs(e.gpa) + " size=" + hexs(e.size) +
		       " flags=" + hexs(e.flags);
	}
	std::string operator()(const InterruptedExit &) const
	{
		return "INTERRUPTED (kick or signal)";
	}
	std::string operator()(const UnknownExit &e) const
	{
		return "unhandled exit " + exit_reason_name(e.reason);
	}
	std::string operator()(const SppViolationExit &e) const
	{
		const SppViolation &v = e.violation;
		return "SPP violation vcpu " + std::to_string(v.vcpu) + " gpa=" + hexs(v.gpa) +
		       " write gpa=" + hexs(v.write_gpa) + " len=" + std::to_string(v.write_size) +
		       " rip=" + hexs(v.rip);
	}
};

} // namespace

std::string describe(const Exit &exit)
{
	return std::visit(Describer{}, exit);
}

namespace detail {

bool failed_run_reports_exit(const kvm_run &run, int err)
{
	return err == EFAULT && run.exit_reason == KVM_EXIT_MEMORY_FAULT;
}

Exit decode_exit(kvm_run &run, std::size_t run_size, bool interrupted)
{
	if (interrupted)
		return InterruptedExit{};

	auto *base = reinterpret_cast<std::byte *>(&run);
	switch (run.exit_reason) {
	case KVM_EXIT_IO: {
		auto &io = run.io;
		std::size_t len = std::size_t(io.size) * io.count;
		if (io.data_offset > run_size || len > run_size - io.data_offset)
			return UnknownExit{run.exit_reason}; /* never from a sane KVM */
		return IoExit{
			io.direction == KVM_EXIT_IO_IN ? IoExit::Direction::in
						       : IoExit::Direction::out,
			io.port, io.size, io.count,
			std::span(base + io.data_offset, len)};
	}
	case KVM_EXIT_MMIO: {
		auto &m = run.mmio;
		std::size_t len = m.len <= sizeof(m.data) ? m.len : sizeof(m.data);
		return MmioExit{m.is_write ? MmioExit::Direction::write : MmioExit::Direction::read,
				m.phys_addr, std::span(reinterpret_cast<std::byte *>(m.data), len)};
	}
	case KVM_EXIT_HLT:
		return HltExit{};
	case KVM_EXIT_DEBUG:
		return DebugExit{run.debug.arch.exception, run.debug.arch.pc,
				 run.debug.arch.dr6, run.debug.arch.dr7};
	case KVM_EXIT_X86_RDMSR:
	case KVM_EXIT_X86_WRMSR:
		return MsrExit{run.exit_reason == KVM_EXIT_X86_WRMSR ? MsrExit::Direction::write
								      : MsrExit::Direction::read,
			       run.msr.index, run.msr.reason,
			       std::span(reinterpret_cast<std::byte *>(&run.msr.data),
					 sizeof(run.msr.data)),
			       std::span(reinterpret_cast<std::byte *>(&run.msr.error),
					 sizeof(run.msr.error))};
	case KVM_EXIT_SHUTDOWN:
		return ShutdownExit{};
	case KVM_EXIT_FAIL_ENTRY:
		return FailEntryExit{run.fail_entry.hardware_entry_failure_reason,
				     run.fail_entry.cpu};
	case KVM_EXIT_INTERNAL_ERROR: {
		std::uint32_t n = run.internal.ndata;
		if (n > std::size(run.internal.data))
			n = std::size(run.internal.data);
		return InternalErrorExit{run.internal.suberror,
					 std::span<const std::uint64_t>(
						 reinterpret_cast<const std::uint64_t *>(run.internal.data), n)};
	}
	case KVM_EXIT_SYSTEM_EVENT: {
		std::uint32_t n = run.system_event.ndata;
		if (n > std::size(run.system_event.data))
			n = std::size(run.system_event.data);
		return SystemEventExit{run.system_event.type,
				       std::span<const std::uint64_t>(
					       reinterpret_cast<const std::uint64_t *>(run.system_event.data), n)};
	}
	case KVM_EXIT_MEMORY_FAULT: {
		virtkit_kvm_memory_fault f;
		std::memcpy(&f, &run.hw, sizeof(f));
		return MemoryFaultExit{f.flags, f.gpa, f.size};
	}
	case KVM_EXIT_INTR:
		return InterruptedExit{};
	default:
		return UnknownExit{run.exit_reason};
	}
}

} // namespace detail
} // namespace virtkit

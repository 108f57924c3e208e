// SPDX-License-Identifier: MIT
/*
 * Internal: the request of every KVMI command the tool side sends, built in
 * one place for Session (which sends one and waits for its reply) and
 * Batch (which queues many, without replies).
 *
 * A Request is a command's id and its payload in two pieces, as sendmsg()
 * takes them: a head built here (kvmi_vcpu_hdr and the command's struct,
 * or a page list with its entries) and a tail borrowed from the caller
 * (WRITE_PHYSICAL's data, GET_REGISTERS' MSR indices, VCPU_SET_XSAVE's
 * area), which must outlive the Request.
 */
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include <virtkit/introspect.hpp>

#include "kvmi/tool/wire.hpp"

namespace virtkit::introspect::detail {

class Request {
public:
	/* The head: parts one after the other. */
	template <class... T> static Request of(std::uint16_t id, const T &...parts) noexcept
	{
		static_assert((sizeof(T) + ... + 0) <= inline_capacity);
		Request r(id);
		((void)r.put(bytes_of(parts)), ...);
		return r;
	}
	/* A head built elsewhere (a page list). */
	static Request of_bytes(std::uint16_t id, std::vector<std::byte> head) noexcept;

	/* The same request with tail after its head. */
	Request &&with_tail(std::span<const std::byte> tail) && noexcept
	{
		tail_ = tail;
		return std::move(*this);
	}

	std::uint16_t id() const noexcept { return id_; }
	std::span<const std::byte> head() const noexcept
	{
		if (!heap_.empty())
			return heap_;
		return {inline_.data(), inline_size_};
	}
	std::span<const std::byte> tail() const noexcept { return tail_; }
	std::size_t size() const noexcept { return head().size() + tail_.size(); }

private:
	/* kvmi_vcpu_hdr and kvm_regs (SET_REGISTERS), the largest fixed head. */
	static constexpr std::size_t inline_capacity = sizeof(kvmi_vcpu_hdr) + sizeof(kvm_regs);

	explicit Request(std::uint16_t id) noexcept : id_(id) {}
	void put(std::span<const std::byte> b) noexcept;

	std::uint16_t id_;
	std::array<std::byte, inline_capacity> inline_{};
	std::size_t inline_size_ = 0;
	std::vector<std::byte> heap_;
	std::span<const std::byte> tail_;
};

/*
 * f(gpa, offset, n) for each piece of [gpa, gpa + size) that stays within
 * one page, in order: READ_PHYSICAL and WRITE_PHYSICAL move one page at
 * most (the protocol's rule).
 */
template <class F> void for_each_page(std::uint64_t gpa, std::size_t size, F &&f)
{
	for (std::size_t done = 0; done < size;) {
		std::uint64_t at = gpa + done;
		std::size_t n =
			std::min<std::uint64_t>(size - done, kvmi::page_size - at % kvmi::page_size);
		f(at, done, n);
		done += n;
	}
}

/* One function per command, named like Session's. Those that check a
 * size throw Error(command name, E2BIG) for more than one message holds. */
namespace request {

/* VM commands */
Request get_version();
Request check_command(std::uint16_t id);
Request check_event(EventId id);
Request get_guest_info();
Request control_vm_events(EventId id, bool enable);
/* At most one page, within one page (for_each_page()). */
Request read_physical(std::uint64_t gpa, std::size_t size);
Request write_physical(std::uint64_t gpa, std::span<const std::byte> data);
/* At most Session::max_page_entries pages. */
Request set_page_access(std::span<const PageAccess> pages, std::uint16_t view);
Request control_spp(bool enable);
Request set_page_write_bitmap(std::span<const PageWriteBitmap> pages, std::uint16_t view);
Request get_max_gfn();
Request query_physical(std::uint64_t gfn);

/* vCPU commands */
Request get_vcpu_info(std::uint16_t vcpu);
Request pause_vcpu(std::uint16_t vcpu, bool wait);
Request control_events(std::uint16_t vcpu, EventId id, bool enable);
Request control_cr(std::uint16_t vcpu, std::uint32_t cr, bool enable);
Request control_msr(std::uint16_t vcpu, std::uint32_t msr, bool enable);
/* At most as many MSRs as one reply holds. */
Request get_registers(std::uint16_t vcpu, std::span<const std::uint32_t> msrs);
Request set_registers(std::uint16_t vcpu, const kvm_regs &regs);
Request get_cpuid(std::uint16_t vcpu, std::uint32_t function, std::uint32_t index);
Request get_xsave(std::uint16_t vcpu);
Request set_xsave(std::uint16_t vcpu, std::span<const std::byte> xsave);
Request get_xcr(std::uint16_t vcpu, std::uint8_t xcr);
Request inject_exception(std::uint16_t vcpu, std::uint8_t vector, std::uint32_t error_code,
			 std::uint64_t address);
Request get_mtrr_type(std::uint16_t vcpu, std::uint64_t gpa);
Request translate_gva(std::uint16_t vcpu, std::uint64_t gva);
Request control_singlestep(std::uint16_t vcpu, bool enable);

} // namespace request

} // namespace virtkit::introspect::detail

// SPDX-License-Identifier: MIT
/* Protection of guest kernel data (protect.hpp). */
#include "protect.hpp"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <map>

#include "../../common/hex.hpp"
#include "../../common/kernel_image.hpp"
#include "../../common/kernel_symbols.hpp"

namespace virtkit::tool::run {
namespace {

/* Where the x86-64 kernel image is mapped; per-CPU symbols lie far below. */
constexpr std::uint64_t start_kernel_map = 0xffffffff80000000ull;

constexpr std::uint64_t page_size = GuestMemory::page_size;
constexpr std::uint64_t subpage = SubpageProtection::subpage_size;

bool parse_number(std::string_view s, std::uint64_t &out)
{
	if (s.empty() || s[0] < '0' || s[0] > '9')
		return false;
	std::string str(s);
	char *end = nullptr;
	errno = 0;
	out = std::strtoull(str.c_str(), &end, 0);
	return !errno && *end == '\0';
}

const char *backend_name(SppBackendKind k)
{
	return k == SppBackendKind::kmod ? "kmod" : "user";
}

} // namespace

std::optional<ProtectRequest> parse_protect(std::string_view spec, bool gpa)
{
	ProtectRequest r;
	r.text = std::string(spec);
	auto colon = spec.rfind(':');
	if (colon == spec.npos || !parse_number(spec.substr(colon + 1), r.length) || !r.length)
		return std::nullopt;
	std::string_view where = spec.substr(0, colon);
	if (gpa) {
		if (!parse_number(where, r.offset))
			return std::nullopt;
	} else {
		auto plus = where.find('+');
		r.symbol = std::string(where.substr(0, plus));
		if (r.symbol.empty() || r.symbol.find_first_of(" \t") != r.symbol.npos ||
		    (plus != where.npos && !parse_number(where.substr(plus + 1), r.offset)))
			return std::nullopt;
	}
	if (r.offset + r.length < r.offset)
		return std::nullopt;
	return r;
}

std::vector<ProtectedRange> resolve_protection(const std::vector<ProtectRequest> &requests,
					       const LoadedKernel &kernel,
					       const std::optional<std::string> &system_map)
{
	std::vector<ProtectedRange> ranges;
	std::optional<KernelSymbols> symbols;
	for (const ProtectRequest &r : requests) {
		if (r.symbol.empty()) {
			ranges.push_back({"gpa " + hex(r.offset), r.offset, r.length});
			continue;
		}
		const std::string option = "--protect " + r.text + ": ";
		if (kernel.vmlinux.empty())
			throw BootError(option + "kernel symbols need --decompress vmm (the guest's "
						 "decompressor may place the kernel anywhere); give "
						 "--protect-gpa");
		try {
			if (!symbols)
				symbols = kernel_symbols(kernel.vmlinux, system_map);
		} catch (const KernelImageError &e) {
			throw BootError(option + e.what());
		}
		auto it = symbols->address.find(r.symbol);
		if (it == symbols->address.end())
			throw BootError(option + "no symbol " + r.symbol + " in " + symbols->from +
					(system_map ? "" : " (give the kernel's System.map with --system-map)"));
		const std::uint64_t va = it->second + r.offset;
		if (va < it->second)
			throw BootError(option + "the offset runs past the end of the address space");
		if (it->second < start_kernel_map)
			throw BootError(option + r.symbol + " (" + hex(it->second) +
					") is a per-CPU variable: each CPU has its own copy, "
					"at an address the guest chooses");
		std::optional<std::uint64_t> gpa;
		for (const ElfSegment &seg : elf_load_segments(kernel.vmlinux))
			if (va >= seg.vaddr && va - seg.vaddr < seg.memsz &&
			    r.length <= seg.memsz - (va - seg.vaddr))
				gpa = seg.paddr + (va - seg.vaddr);
		if (!gpa)
			throw BootError(option + "the range " + hex(va) + "+" + hex(r.length) +
					" is not inside one segment of the kernel image");
		ranges.push_back({r.offset ? r.symbol + "+" + hex(r.offset) : r.symbol, *gpa, r.length});
	}
	return ranges;
}

KernelDataProtection::KernelDataProtection(Vm &vm, std::vector<ProtectedRange> ranges)
	: ranges_(std::move(ranges))
{
	/* Each page's map: a sub-page any range touches is not writable. */
	std::map<std::uint64_t, std::uint32_t> maps;
	for (const ProtectedRange &r : ranges_) {
		std::uint64_t first = r.gpa & ~(subpage - 1);
		std::uint64_t last = (r.gpa + r.length - 1) & ~(subpage - 1);
		for (std::uint64_t s = first;; s += subpage) {
			auto [it, fresh] = maps.try_emplace(s / page_size, SubpageProtection::all_writable);
			it->second &= ~(1u << (s % page_size / subpage));
			if (s == last)
				break;
		}
	}
	auto &spp = SubpageProtection::enable(vm);
	backend_ = spp.backend();
	spp.on_violation([this](Vcpu &v, const SppViolation &s) { return on_violation(v, s); });
	/* One call per run of consecutive pages. */
	for (auto it = maps.begin(); it != maps.end();) {
		const std::uint64_t gfn = it->first;
		std::vector<std::uint32_t> run;
		for (; it != maps.end() && it->first == gfn + run.size(); ++it)
			run.push_back(it->second);
		try {
			spp.set_access(gfn, run);
		} catch (const Error &e) {
			throw Error(e.operation(), e.err(),
				    "--protect: pages " + hex(gfn * page_size) + "-" +
					    hex((gfn + run.size()) * page_size - 1) + " of " + range_on(gfn) +
					    (e.err() == EFAULT ? ": not guest RAM" : ""));
		}
	}
	for (const ProtectedRange &r : ranges_) {
		std::uint64_t first = r.gpa & ~(subpage - 1);
		std::uint64_t end = (r.gpa + r.length + subpage - 1) & ~(subpage - 1);
		std::fprintf(stderr,
			     "virtkit run: protecting %s: %llu bytes at guest-physical %s "
			     "(sub-pages %s-%s, %s backend)\n",
			     r.name.c_str(), static_cast<unsigned long long>(r.length),
			     hex(r.gpa).c_str(), hex(first).c_str(), hex(end - 1).c_str(),
			     backend_name(backend_));
	}
}

const std::string &KernelDataProtection::range_on(std::uint64_t gfn) const
{
	for (const ProtectedRange &r : ranges_)
		if (r.gpa / page_size <= gfn && (r.gpa + r.length - 1) / page_size >= gfn)
			return r.name;
	return ranges_.front().name; /* not reached: every page is some range's */
}

std::string KernelDataProtection::where(std::uint64_t gpa) const
{
	for (const ProtectedRange &r : ranges_)
		if (gpa >= r.gpa && gpa - r.gpa < r.length)
			return r.name + "+" + hex(gpa - r.gpa);
	return "";
}

bool KernelDataProtection::touches_ranges(const SppViolation &v) const
{
	/* A store split across guest-physical pages: its bytes are not one range here. */
	if (v.performed || v.gva)
		return true;
	for (const ProtectedRange &r : ranges_)
		if (v.write_gpa < r.gpa + r.length && r.gpa < v.write_gpa + v.write_size)
			return true;
	return false;
}

/*
 * Runs on the vCPU's thread while the terminal is raw: lines end in \r\n.
 * SPP protects whole sub-pages; a write to the rest of one (a neighbour of
 * the variable) is performed, so that only the ranges asked for are
 * read-only to the guest.
 */
SppDecision KernelDataProtection::on_violation(Vcpu &, const SppViolation &v)
{
	if (!touches_ranges(v)) {
		beside_++;
		return SppDecision::allow_once;
	}
	std::uint64_t n = ++blocked_;
	if (n > max_reported)
		return SppDecision::drop;
	std::string at = where(v.write_gpa);
	if (at.empty())
		at = where(v.gpa);
	if (at.empty())
		at = "a protected sub-page";
	std::string bytes;
	for (std::size_t i = 0; i < v.size && i < 16; i++) {
		char b[4];
		std::snprintf(b, sizeof(b), " %02x", unsigned(v.bytes[i]));
		bytes += b;
	}
	if (v.write_size > 16)
		bytes += " ...";
	std::fprintf(stderr,
		     "\r\nvirtkit run: blocked a guest write: vcpu %u, %u bytes at %s (%s), "
		     "next rip %s:%s\r\n",
		     v.vcpu, v.write_size, hex(v.write_gpa).c_str(), at.c_str(), hex(v.rip).c_str(),
		     bytes.c_str());
	if (n == max_reported)
		std::fprintf(stderr, "virtkit run: more blocked writes are counted, not shown\r\n");
	return SppDecision::drop;
}

} // namespace virtkit::tool::run

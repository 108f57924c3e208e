// SPDX-License-Identifier: MIT
/* Symbol addresses of a Linux kernel image (kernel_symbols.hpp). */
#include "kernel_symbols.hpp"

#include <cstring>
#include <sstream>

#include "hex.hpp"
#include "kernel_image.hpp"

namespace virtkit::tool {
namespace {

/*
 * The exported-symbol table: struct kernel_symbol as x86-64 lays it out
 * (CONFIG_HAVE_ARCH_PREL32_RELOCATIONS): three 32-bit offsets, each
 * relative to its own field - value, name, namespace.
 */
std::map<std::string, std::uint64_t> exported_symbols(std::span<const std::byte> vmlinux)
{
	std::map<std::string, std::uint64_t> syms;
	auto strings = elf_section(vmlinux, "__ksymtab_strings");
	if (!strings)
		return syms;
	for (const char *name : {"__ksymtab", "__ksymtab_gpl"}) {
		auto tab = elf_section(vmlinux, name);
		if (!tab)
			continue;
		for (std::size_t off = 0; off + 12 <= tab->bytes.size(); off += 12) {
			std::uint64_t at = tab->addr + off;
			std::int32_t value, name_rel;
			std::memcpy(&value, tab->bytes.data() + off, 4);
			std::memcpy(&name_rel, tab->bytes.data() + off + 4, 4);
			std::uint64_t s = at + 4 + std::uint64_t(std::int64_t(name_rel));
			if (s < strings->addr || s - strings->addr >= strings->bytes.size())
				throw KernelImageError(std::string(name) +
						       ": a name lies outside __ksymtab_strings "
						       "(not an x86-64 kernel with relative symbol entries?)");
			auto *p = reinterpret_cast<const char *>(strings->bytes.data()) + (s - strings->addr);
			std::size_t max = strings->bytes.size() - (s - strings->addr);
			syms.emplace(std::string(p, strnlen(p, max)),
				     at + std::uint64_t(std::int64_t(value)));
		}
	}
	return syms;
}

/* "ADDRESS TYPE NAME" lines: System.map, /proc/kallsyms (module symbols ignored). */
std::map<std::string, std::uint64_t> system_map_symbols(const std::string &text)
{
	std::map<std::string, std::uint64_t> syms;
	std::istringstream in(text);
	std::string line;
	while (std::getline(in, line)) {
		std::istringstream l(line);
		std::string addr, type, name, module;
		if (!(l >> addr >> type >> name) || (l >> module))
			continue;
		char *end = nullptr;
		unsigned long long v = std::strtoull(addr.c_str(), &end, 16);
		if (*end || addr.empty())
			continue;
		syms.emplace(name, v);
	}
	return syms;
}

} // namespace

KernelSymbols kernel_symbols(std::span<const std::byte> vmlinux,
			     const std::optional<std::string> &system_map)
{
	auto exported = exported_symbols(vmlinux);
	if (!system_map)
		return {std::move(exported), "the image's exported symbols"};
	KernelSymbols k{system_map_symbols(*system_map), "System.map"};
	auto map_init = k.address.find("init_task");
	if (map_init == k.address.end())
		throw KernelImageError("the System.map has no init_task (Debian's /boot/System.map-* is a "
				       "placeholder: the real one is in the linux-image-*-dbg package; "
				       "without --system-map the image's exported symbols are used)");
	auto e = exported.find("init_task");
	if (e != exported.end() && e->second != map_init->second)
		throw KernelImageError("the System.map puts init_task at " + hex(map_init->second) +
				       ", the image's symbol table at " + hex(e->second) +
				       ": they belong to different builds");
	return k;
}

} // namespace virtkit::tool

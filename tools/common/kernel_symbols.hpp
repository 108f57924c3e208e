// SPDX-License-Identifier: MIT
/*
 * Where a Linux kernel's variables are, for the tools: the addresses of its
 * symbols as linked. Two sources:
 *
 *   the image  its exported-symbol table (__ksymtab, __ksymtab_gpl), which
 *              every x86-64 kernel has: init_task, init_uts_ns,
 *              panic_timeout are exported, linux_banner or sys_call_table
 *              are not;
 *   System.map the full list (or /proc/kallsyms with KASLR off). Debian's
 *              /boot/System.map-* is a placeholder (the real one is in
 *              linux-image-*-dbg), so the image is what a Debian user has.
 *
 * A guest running with KASLR has every address shifted.
 */
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>

namespace virtkit::tool {

struct KernelSymbols {
	std::map<std::string, std::uint64_t> address; /* guest-virtual, by name */
	std::string from;			       /* "System.map" or the image, for reports */
};

/*
 * The symbols of vmlinux (an ELF vmlinux, kernel_image.hpp), or of
 * system_map (the text of a System.map) when given. Throws
 * KernelImageError: a malformed symbol table, a System.map without
 * init_task (Debian's placeholder) or whose init_task differs from the
 * image's (it belongs to another build).
 */
KernelSymbols kernel_symbols(std::span<const std::byte> vmlinux,
			     const std::optional<std::string> &system_map);

} // namespace virtkit::tool

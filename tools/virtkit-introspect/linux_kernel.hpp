// SPDX-License-Identifier: MIT
/*
 * What an introspection tool must know of a Linux guest kernel to read its
 * state from outside: where its variables are (symbols) and how its
 * structures are laid out (member offsets). Both come from the kernel the
 * guest booted:
 *
 *   symbols  from its System.map, else from the image's exported-symbol
 *            table (tools/common/kernel_symbols.hpp).
 *   offsets  from the image's BTF (.BTF, CONFIG_DEBUG_INFO_BTF, which
 *            distribution kernels enable for BPF CO-RE).
 *
 * Addresses are as linked: a guest running with KASLR has them shifted, and
 * the reader (processes.hpp) notices because init_task is not "swapper".
 */
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace virtkit::tool {

struct LinuxKernelLayout {
	/* Guest-virtual addresses. */
	std::uint64_t init_task = 0;
	std::optional<std::uint64_t> linux_banner; /* System.map only */
	std::optional<std::uint64_t> init_uts_ns;
	/* Byte offsets in struct task_struct, and comm's size. */
	std::uint32_t task_tasks = 0, task_pid = 0, task_tgid = 0, task_comm = 0;
	std::uint32_t comm_size = 0;
	/* Offset of struct new_utsname name in struct uts_namespace. */
	std::uint32_t uts_name = 0;
	/* Where the symbols came from, for the report. */
	std::string symbols_from;
};

/*
 * The layout of the kernel in vmlinux (an ELF vmlinux, kernel_image.hpp),
 * with symbols from system_map (the text of a System.map) when given.
 * Throws KernelImageError naming what is missing: no BTF, a structure or
 * member BTF does not describe, a symbol neither source has, a System.map
 * whose init_task differs from the image's (it belongs to another build).
 */
LinuxKernelLayout linux_kernel_layout(std::span<const std::byte> vmlinux,
				      const std::optional<std::string> &system_map);

} // namespace virtkit::tool

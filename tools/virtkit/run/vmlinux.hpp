// SPDX-License-Identifier: MIT
/*
 * The kernel inside a bzImage: its payload (payload_offset/payload_length
 * of the setup header, boot protocol 2.08+) is the ELF vmlinux, compressed
 * as the kernel was configured. `virtkit run` decompresses it itself by
 * default, as the bzImage's own decompressor would, and loads the ELF
 * segments at their physical addresses: on hosts whose KVM emulates guest
 * supervisor code instruction by instruction (kvm_pvm), the in-guest
 * decompression alone takes many minutes. Documentation/virtkit-run.rst.
 */
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include <virtkit/virtkit.hpp>

namespace virtkit::tool::run {

/* The decompressed payload (an ELF vmlinux, tools/common/kernel_image.hpp).
 * Throws BootError: no payload, or a compression other than xz or zstd. */
std::vector<std::byte> vmlinux_for_boot(std::span<const std::byte> bzimage);

/* A loaded ELF vmlinux. */
struct VmlinuxImage {
	std::uint64_t entry;	/* physical address of startup_64 */
	std::uint64_t start;	/* lowest physical address of a segment */
	std::uint64_t end;	/* end of the highest segment (p_paddr + p_memsz) */
};

/* The range vmlinux's PT_LOAD segments occupy (checked, nothing written). Throws BootError. */
VmlinuxImage vmlinux_layout(std::span<const std::byte> elf);

/* Copy the PT_LOAD segments to their p_paddr (memsz beyond filesz zeroed). */
void load_vmlinux(GuestMemory &mem, std::span<const std::byte> elf);

} // namespace virtkit::tool::run

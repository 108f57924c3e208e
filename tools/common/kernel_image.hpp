// SPDX-License-Identifier: MIT
/*
 * A Linux kernel image on disk, for the tools: the ELF vmlinux inside a
 * bzImage (its setup header's payload_offset/payload_length, boot protocol
 * 2.08+, compressed as the kernel was configured: xz or zstd, as Debian
 * builds its kernels)
 * and the ELF sections a tool reads from it. `virtkit run` loads the
 * vmlinux into its guest; `virtkit-introspect --processes` reads the
 * kernel's exported-symbol table and BTF from it.
 */
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace virtkit::tool {

/* An image that is not what it should be; what() says why. */
struct KernelImageError : std::runtime_error {
	using std::runtime_error::runtime_error;
};

/* The whole file; throws virtkit::Error naming option and path (open, read, not a regular file). */
std::vector<std::byte> read_whole_file(const std::string &path, const std::string &option);

/* The bzImage's decompressed payload (an ELF vmlinux). Throws KernelImageError:
 * no payload, a compression other than xz or zstd, corrupt data. */
std::vector<std::byte> extract_vmlinux(std::span<const std::byte> bzimage);

/* Whether data starts like an x86-64 ELF file. */
bool is_elf(std::span<const std::byte> data);

/* data itself when it is an ELF vmlinux, else extract_vmlinux(data). */
std::vector<std::byte> vmlinux_of(std::vector<std::byte> data);

/* The ELF header of an x86-64 vmlinux, checked (program and section
 * header tables inside the file). Throws KernelImageError. */
struct ElfLayout {
	std::uint64_t entry;
	std::uint64_t phoff, shoff;
	unsigned phnum, shnum, shstrndx;
};
ElfLayout elf_layout(std::span<const std::byte> elf);

/* A PT_LOAD segment, checked: its file bytes lie inside the file, filesz <= memsz. */
struct ElfSegment {
	std::uint64_t offset, filesz;	/* its bytes in the file */
	std::uint64_t vaddr, paddr, memsz;
};
/* The PT_LOAD segments. Throws KernelImageError for one outside the file. */
std::vector<ElfSegment> elf_load_segments(std::span<const std::byte> elf);

/* A section of the file (SHT_NOBITS sections have no bytes and are not found). */
struct ElfSection {
	std::uint64_t addr;		/* its virtual address */
	std::span<const std::byte> bytes;
};
/* The section called name; nullopt if there is none. Throws KernelImageError for a malformed table. */
std::optional<ElfSection> elf_section(std::span<const std::byte> elf, std::string_view name);

} // namespace virtkit::tool

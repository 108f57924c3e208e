// SPDX-License-Identifier: MIT
/*
 * Internal: the loadable pages of an ELF image.
 *
 * GuestVm loads the running executable into the guest at its own addresses.
 * parse_program_headers() validates an ELF64 x86-64 file image and returns
 * its program headers; load_pages() turns PT_LOAD headers (plus the load
 * bias of a PIE) into the page ranges to map, merging segments that share a
 * page. Both are pure and bounds-checked.
 */
#pragma once

#include <elf.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace virtkit::x86::detail {

struct LoadRange {
	std::uint64_t vaddr; /* page aligned */
	std::uint64_t size;  /* page multiple */
	bool writable;
	bool executable;

	bool operator==(const LoadRange &) const = default;
};

/* Throws Error(EINVAL/ENOEXEC) for anything but a sane ELF64 x86-64 image. */
std::vector<Elf64_Phdr> parse_program_headers(std::span<const std::byte> image);

/* Page ranges of the PT_LOAD headers, sorted, overlapping pages merged. */
std::vector<LoadRange> load_pages(std::span<const Elf64_Phdr> phdrs, std::uint64_t bias);

/* The program headers and load bias of the running executable. */
struct RunningImage {
	std::vector<Elf64_Phdr> phdrs;
	std::uint64_t bias;
};
RunningImage running_executable();

} // namespace virtkit::x86::detail

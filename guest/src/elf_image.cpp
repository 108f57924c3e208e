// SPDX-License-Identifier: MIT
#include "elf_image.hpp"

#include <link.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <virtkit/error.hpp>

namespace virtkit::x86::detail {

static constexpr std::uint64_t page = 4096;

std::vector<Elf64_Phdr> parse_program_headers(std::span<const std::byte> image)
{
	Elf64_Ehdr eh;
	if (image.size() < sizeof(eh))
		throw Error("ELF", ENOEXEC, "image of " + std::to_string(image.size()) +
						    " bytes is shorter than an ELF header");
	std::memcpy(&eh, image.data(), sizeof(eh));
	if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0)
		throw Error("ELF", ENOEXEC, "bad magic");
	if (eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_ident[EI_DATA] != ELFDATA2LSB ||
	    eh.e_machine != EM_X86_64)
		throw Error("ELF", ENOEXEC, "not an ELF64 little-endian x86-64 image");
	if (eh.e_phentsize != sizeof(Elf64_Phdr))
		throw Error("ELF", ENOEXEC, "e_phentsize=" + std::to_string(eh.e_phentsize));
	std::uint64_t need = std::uint64_t(eh.e_phnum) * sizeof(Elf64_Phdr);
	if (eh.e_phoff > image.size() || need > image.size() - eh.e_phoff)
		throw Error("ELF", ENOEXEC, "program headers outside the image");

	std::vector<Elf64_Phdr> out(eh.e_phnum);
	std::memcpy(out.data(), image.data() + eh.e_phoff, need);
	for (auto &ph : out) {
		if (ph.p_type != PT_LOAD)
			continue;
		if (ph.p_filesz > ph.p_memsz || ph.p_vaddr + ph.p_memsz < ph.p_vaddr ||
		    ph.p_offset > image.size() || ph.p_filesz > image.size() - ph.p_offset)
			throw Error("ELF", ENOEXEC, "PT_LOAD segment out of bounds");
	}
	return out;
}

std::vector<LoadRange> load_pages(std::span<const Elf64_Phdr> phdrs, std::uint64_t bias)
{
	std::vector<LoadRange> r;
	for (auto &ph : phdrs) {
		if (ph.p_type != PT_LOAD || !ph.p_memsz)
			continue;
		std::uint64_t start = (bias + ph.p_vaddr) & ~(page - 1);
		std::uint64_t end = (bias + ph.p_vaddr + ph.p_memsz + page - 1) & ~(page - 1);
		if (end <= start)
			throw Error("ELF", EINVAL, "segment wraps the address space");
		r.push_back({start, end - start, (ph.p_flags & PF_W) != 0,
			     (ph.p_flags & PF_X) != 0});
	}
	std::sort(r.begin(), r.end(),
		  [](const LoadRange &a, const LoadRange &b) { return a.vaddr < b.vaddr; });
	std::vector<LoadRange> merged;
	for (auto &x : r) {
		if (!merged.empty() && x.vaddr < merged.back().vaddr + merged.back().size) {
			auto &m = merged.back();
			std::uint64_t end = std::max(m.vaddr + m.size, x.vaddr + x.size);
			m.size = end - m.vaddr;
			m.writable |= x.writable;
			m.executable |= x.executable;
		} else {
			merged.push_back(x);
		}
	}
	return merged;
}

RunningImage running_executable()
{
	RunningImage img{};
	/* The first object dl_iterate_phdr reports is the main program. */
	dl_iterate_phdr(
		[](dl_phdr_info *info, std::size_t, void *data) -> int {
			auto *out = static_cast<RunningImage *>(data);
			out->phdrs.assign(info->dlpi_phdr, info->dlpi_phdr + info->dlpi_phnum);
			out->bias = info->dlpi_addr;
			return 1;
		},
		&img);
	if (img.phdrs.empty())
		throw Error("dl_iterate_phdr", ENOEXEC, "no program headers for the executable");
	return img;
}

} // namespace virtkit::x86::detail

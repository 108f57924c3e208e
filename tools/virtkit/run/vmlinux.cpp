// SPDX-License-Identifier: MIT
/* The bzImage's payload, decompressed and loaded (vmlinux.hpp). */
#include "vmlinux.hpp"

#include <elf.h>

#include <cstring>
#include <string>

#include "../../common/kernel_image.hpp"
#include "boot_loader.hpp"

namespace virtkit::tool::run {
namespace {

template <class F> void for_each_load(std::span<const std::byte> elf, F f)
{
	ElfLayout l = elf_layout(elf);
	for (unsigned i = 0; i < l.phnum; i++) {
		Elf64_Phdr ph;
		std::memcpy(&ph, elf.data() + l.phoff + i * sizeof(ph), sizeof(ph));
		if (ph.p_type != PT_LOAD)
			continue;
		if (ph.p_offset > elf.size() || ph.p_filesz > elf.size() - ph.p_offset ||
		    ph.p_filesz > ph.p_memsz)
			throw BootError("vmlinux: segment " + std::to_string(i) + " lies outside the file");
		f(ph);
	}
}

} // namespace

std::vector<std::byte> vmlinux_for_boot(std::span<const std::byte> bzimage)
{
	try {
		return extract_vmlinux(bzimage);
	} catch (const KernelImageError &e) {
		throw BootError(std::string(e.what()) + " (use --decompress guest)");
	}
}

VmlinuxImage vmlinux_layout(std::span<const std::byte> elf)
{
	VmlinuxImage img{0, UINT64_MAX, 0};
	try {
		img.entry = elf_layout(elf).entry;
	} catch (const KernelImageError &e) {
		throw BootError("the bzImage's payload: " + std::string(e.what()));
	}
	for_each_load(elf, [&](const Elf64_Phdr &ph) {
		img.start = std::min(img.start, ph.p_paddr);
		img.end = std::max(img.end, ph.p_paddr + ph.p_memsz);
	});
	if (img.start == UINT64_MAX || img.entry < img.start || img.entry >= img.end)
		throw BootError("vmlinux: no loadable segment holds the entry point");
	return img;
}

void load_vmlinux(GuestMemory &mem, std::span<const std::byte> elf)
{
	for_each_load(elf, [&](const Elf64_Phdr &ph) {
		mem.write(ph.p_paddr, elf.subspan(ph.p_offset, ph.p_filesz));
		mem.fill(ph.p_paddr + ph.p_filesz, std::byte{0}, ph.p_memsz - ph.p_filesz);
	});
}

} // namespace virtkit::tool::run

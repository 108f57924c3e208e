// SPDX-License-Identifier: MIT
/* The bzImage's payload, decompressed and loaded (vmlinux.hpp). */
#include "vmlinux.hpp"

#include <cstring>
#include <string>

#include "../../common/kernel_image.hpp"
#include "boot_loader.hpp"

namespace virtkit::tool::run {
namespace {

/* The PT_LOAD segments; BootError for a malformed ELF file. */
std::vector<ElfSegment> load_segments(std::span<const std::byte> elf)
{
	try {
		return elf_load_segments(elf);
	} catch (const KernelImageError &e) {
		throw BootError("the bzImage's payload: " + std::string(e.what()));
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
	for (const ElfSegment &seg : load_segments(elf)) {
		img.start = std::min(img.start, seg.paddr);
		img.end = std::max(img.end, seg.paddr + seg.memsz);
	}
	if (img.start == UINT64_MAX || img.entry < img.start || img.entry >= img.end)
		throw BootError("vmlinux: no loadable segment holds the entry point");
	return img;
}

void load_vmlinux(GuestMemory &mem, std::span<const std::byte> elf)
{
	for (const ElfSegment &seg : load_segments(elf)) {
		mem.write(seg.paddr, elf.subspan(seg.offset, seg.filesz));
		mem.fill(seg.paddr + seg.filesz, std::byte{0}, seg.memsz - seg.filesz);
	}
}

} // namespace virtkit::tool::run

// SPDX-License-Identifier: MIT
/*
 * Loading a Linux bzImage with the x86 boot protocol
 * (Documentation/arch/x86/boot.rst of the kernel) and entering it at its
 * 64-bit entry point: the setup header is checked and copied into a
 * boot_params "zero page", the e820 map, command line and initrd are placed
 * in guest RAM, and the boot vCPU starts in long mode at a startup_64 -
 * the bzImage's (code32_start + 0x200) or, by default, that of the vmlinux
 * the VMM decompressed from it (vmlinux.hpp) - with identity-mapped page
 * tables, a flat GDT and RSI = boot_params. Documentation/virtkit-run.rst has the memory map.
 */
#pragma once

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <virtkit/virtkit.hpp>

namespace virtkit::tool::run {

/* A bzImage, initrd or memory size the boot protocol cannot work with. */
struct BootError : std::runtime_error {
	using std::runtime_error::runtime_error;
};

/* Guest-physical layout of what the loader writes below 1 MiB. */
namespace layout {
inline constexpr std::uint64_t gdt = 0x500;
inline constexpr std::uint64_t boot_params = 0x7000;
inline constexpr std::uint64_t pml4 = 0x9000;	/* then the PDPT and 4 PDs */
inline constexpr std::uint64_t cmdline = 0x20000;
inline constexpr std::uint64_t cmdline_max = 0x10000;
inline constexpr std::uint64_t ebda = 0x9fc00;	/* reserved up to 1 MiB; the MP table */
inline constexpr std::uint64_t kernel = 0x100000; /* the protected-mode kernel */
/* RAM above 3 GiB moves to 4 GiB: the hole keeps the LAPIC and IOAPIC pages. */
inline constexpr std::uint64_t pci_hole = 0xc0000000;
inline constexpr std::uint64_t high_ram = 0x100000000;
} // namespace layout

struct E820Entry {
	std::uint64_t addr;
	std::uint64_t size;
	std::uint32_t type;	/* 1 RAM, 2 reserved */
};

/* What the loader found in the image and where it put things. */
struct LoadedKernel {
	std::uint16_t protocol;		/* boot protocol version, e.g. 0x20f */
	std::uint64_t entry;		/* startup_64 */
	std::uint64_t kernel_size;	/* bytes of kernel loaded */
	std::uint64_t initrd_gpa = 0;
	std::uint64_t initrd_size = 0;
	std::uint64_t needed_ram;	/* where the kernel ends (decompressed, with its bss) */
	/* The ELF vmlinux the VMM decompressed and loaded; empty if the guest decompresses. */
	std::vector<std::byte> vmlinux;
};

/*
 * The e820 map of guest RAM of ram_bytes: low RAM up to the EBDA, the EBDA
 * and BIOS area reserved, RAM from 1 MiB to 3 GiB, the rest from 4 GiB.
 */
std::vector<E820Entry> e820_map(std::uint64_t ram_bytes);

/*
 * Who decompresses the kernel: the VMM (the bzImage's xz payload, the ELF
 * vmlinux, is loaded at its physical addresses and entered at its
 * startup_64; no KASLR) or the guest (the bzImage's protected-mode code is
 * loaded at 1 MiB and entered at code32_start + 0x200, its startup_64,
 * which decompresses and relocates the kernel).
 */
enum class Decompress { vmm, guest };

/*
 * Load kernel (the bzImage's bytes) and initrd into mem, write boot_params,
 * the command line and the e820 map. Throws BootError naming what is wrong
 * (not a bzImage, too old a protocol, no 64-bit entry, a command line longer
 * than the kernel takes, too little memory for the kernel and initrd).
 */
LoadedKernel load_linux(GuestMemory &mem, std::uint64_t ram_bytes,
			std::span<const std::byte> kernel, std::span<const std::byte> initrd,
			const std::string &cmdline, Decompress decompress);

/*
 * Page tables identity-mapping the first 4 GiB with 2 MiB pages, and a GDT
 * with the boot protocol's __BOOT_CS (0x10) and __BOOT_DS (0x18).
 */
void write_boot_page_tables(GuestMemory &mem);

/*
 * Put the boot vCPU at the kernel's 64-bit entry: long mode with the
 * identity map, flat segments, interrupts off, RSI = boot_params, and an
 * initialized FPU.
 */
void enter_kernel(Vcpu &vcpu, const LoadedKernel &kernel);

} // namespace virtkit::tool::run

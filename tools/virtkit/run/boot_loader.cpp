// SPDX-License-Identifier: MIT
/*
 * The x86 Linux boot protocol, 64-bit entry (boot_loader.hpp). Offsets are
 * those of struct boot_params and struct setup_header
 * (arch/x86/include/uapi/asm/bootparam.h), named here rather than taken
 * from kernel headers, which a host need not have.
 */
#include "boot_loader.hpp"

#include "../../common/hex.hpp"
#include "vmlinux.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace virtkit::tool::run {
namespace {

/* struct setup_header, at these offsets of the image and of boot_params. */
constexpr std::size_t hdr_start = 0x1f1;	/* setup_sects */
constexpr std::size_t hdr_boot_flag = 0x1fe;	/* 0xaa55 */
constexpr std::size_t hdr_jump = 0x200;		/* its byte at 0x201 ends the header */
constexpr std::size_t hdr_magic = 0x202;	/* "HdrS" */
constexpr std::size_t hdr_version = 0x206;
constexpr std::size_t hdr_type_of_loader = 0x210;
constexpr std::size_t hdr_loadflags = 0x211;
constexpr std::size_t hdr_code32_start = 0x214;
constexpr std::size_t hdr_ramdisk_image = 0x218;
constexpr std::size_t hdr_ramdisk_size = 0x21c;
constexpr std::size_t hdr_heap_end_ptr = 0x224;
constexpr std::size_t hdr_cmd_line_ptr = 0x228;
constexpr std::size_t hdr_initrd_addr_max = 0x22c;
constexpr std::size_t hdr_relocatable = 0x234;
constexpr std::size_t hdr_xloadflags = 0x236;
constexpr std::size_t hdr_cmdline_size = 0x238;
constexpr std::size_t hdr_pref_address = 0x258;
constexpr std::size_t hdr_init_size = 0x260;
/* Outside the setup header. */
constexpr std::size_t bp_ext_ramdisk_image = 0x0c0;
constexpr std::size_t bp_ext_ramdisk_size = 0x0c4;
constexpr std::size_t bp_ext_cmd_line_ptr = 0x0c8;
constexpr std::size_t bp_e820_entries = 0x1e8;
constexpr std::size_t bp_e820_table = 0x2d0;
constexpr std::size_t e820_max = 128;

constexpr std::uint8_t loadflags_loaded_high = 0x01;
constexpr std::uint8_t loadflags_can_use_heap = 0x80;
constexpr std::uint16_t xlf_kernel_64 = 0x01;
/* Protocol 2.12 brought xloadflags, which says whether startup_64 exists. */
constexpr std::uint16_t min_protocol = 0x020c;

constexpr std::uint64_t MiB = 1ull << 20;

template <class T> T get(std::span<const std::byte> b, std::size_t off)
{
	T v;
	std::memcpy(&v, b.data() + off, sizeof(T));
	return v;
}

template <class T> void put(std::span<std::byte> b, std::size_t off, T v)
{
	std::memcpy(b.data() + off, &v, sizeof(T));
}


std::string mib(std::uint64_t bytes)
{
	return std::to_string((bytes + MiB - 1) / MiB) + " MiB";
}

} // namespace

std::vector<E820Entry> e820_map(std::uint64_t ram_bytes)
{
	std::uint64_t low = std::min(ram_bytes, layout::pci_hole);
	std::vector<E820Entry> map = {
		{0, layout::ebda, 1},
		/* EBDA (our MP table), VGA hole and BIOS area: never RAM to the guest. */
		{layout::ebda, layout::kernel - layout::ebda, 2},
		{layout::kernel, low - layout::kernel, 1},
	};
	if (ram_bytes > low)
		map.push_back({layout::high_ram, ram_bytes - low, 1});
	return map;
}

LoadedKernel load_linux(GuestMemory &mem, std::uint64_t ram_bytes,
			std::span<const std::byte> kernel, std::span<const std::byte> initrd,
			const std::string &cmdline, Decompress decompress)
{
	if (kernel.size() < 0x1000 || get<std::uint16_t>(kernel, hdr_boot_flag) != 0xaa55 ||
	    std::memcmp(kernel.data() + hdr_magic, "HdrS", 4) != 0)
		throw BootError("not a bzImage: no Linux boot protocol header (\"HdrS\" at 0x202)");
	LoadedKernel k{};
	k.protocol = get<std::uint16_t>(kernel, hdr_version);
	if (k.protocol < min_protocol)
		throw BootError("boot protocol " + std::to_string(k.protocol >> 8) + "." +
				std::to_string(k.protocol & 0xff) +
				" is too old: the 64-bit entry needs 2.12 (Linux 3.8) or later");
	if (!(get<std::uint8_t>(kernel, hdr_loadflags) & loadflags_loaded_high))
		throw BootError("not a bzImage: a zImage loads at 0x10000, which is not supported");
	if (!(get<std::uint16_t>(kernel, hdr_xloadflags) & xlf_kernel_64))
		throw BootError("the kernel has no 64-bit entry point (xloadflags bit 0 clear): "
				"a 32-bit kernel?");

	/* The setup code (setup_sects + the boot sector) precedes the kernel proper. */
	std::size_t setup_sects = get<std::uint8_t>(kernel, hdr_start);
	if (!setup_sects)
		setup_sects = 4;
	std::size_t setup_bytes = (setup_sects + 1) * 512;
	std::size_t hdr_end = hdr_jump + 2 + get<std::uint8_t>(kernel, hdr_jump + 1);
	if (setup_bytes >= kernel.size() || hdr_end > setup_bytes)
		throw BootError("not a bzImage: the setup header says " +
				std::to_string(setup_sects) + " setup sectors in a file of " +
				std::to_string(kernel.size()) + " bytes");
	k.kernel_size = kernel.size() - setup_bytes;
	std::uint64_t low_end = std::min(ram_bytes, layout::pci_hole);
	if (decompress == Decompress::vmm) {
		/* The decompressor's job done here: vmlinux at its physical addresses. */
		k.vmlinux = vmlinux_for_boot(kernel);
		VmlinuxImage img = vmlinux_layout(k.vmlinux);
		if (img.start < layout::kernel)
			throw BootError("vmlinux loads at " + hex(img.start) + ", below 1 MiB");
		k.entry = img.entry;
		k.kernel_size = img.end - img.start;
		k.needed_ram = img.end;
		if (k.needed_ram > low_end)
			throw BootError("too little memory: vmlinux occupies up to " +
					hex(k.needed_ram) + ", the guest has " + mib(ram_bytes) +
					"; give at least " + mib(k.needed_ram + 32 * MiB));
	} else {
		/*
		 * A relocatable kernel decompresses itself to pref_address (or
		 * above) and needs init_size bytes there; an old fixed one
		 * decompresses at its load address.
		 */
		k.entry = layout::kernel + 0x200;
		std::uint64_t pref = get<std::uint64_t>(kernel, hdr_pref_address);
		std::uint64_t init_size = get<std::uint32_t>(kernel, hdr_init_size);
		std::uint64_t base = get<std::uint8_t>(kernel, hdr_relocatable)
					     ? std::max(pref, layout::kernel)
					     : layout::kernel;
		k.needed_ram = std::max(base + init_size, layout::kernel + k.kernel_size);
		if (k.needed_ram > low_end)
			throw BootError("too little memory: the kernel decompresses up to " +
					hex(k.needed_ram) + " (pref_address " + hex(pref) +
					" + init_size " + hex(init_size) + "), the guest has " +
					mib(ram_bytes) + "; give at least " +
					mib(k.needed_ram + 32 * MiB));
	}

	std::uint64_t cmdline_size = k.protocol >= 0x0206 ? get<std::uint32_t>(kernel, hdr_cmdline_size)
							 : 255;
	cmdline_size = std::min(cmdline_size, layout::cmdline_max - 1);
	if (cmdline.size() > cmdline_size)
		throw BootError("the command line is " + std::to_string(cmdline.size()) +
				" bytes; this kernel takes at most " + std::to_string(cmdline_size));

	/* The zero page: the image's setup header, then what the loader fills in. */
	std::vector<std::byte> bp(4096);
	std::span<std::byte> b(bp);
	std::memcpy(bp.data() + hdr_start, kernel.data() + hdr_start, hdr_end - hdr_start);
	put<std::uint8_t>(b, hdr_type_of_loader, 0xff);	/* "undefined" loader */
	std::uint8_t loadflags = get<std::uint8_t>(kernel, hdr_loadflags);
	put<std::uint8_t>(b, hdr_loadflags, loadflags | loadflags_can_use_heap);
	put<std::uint16_t>(b, hdr_heap_end_ptr, 0xfe00);
	put<std::uint32_t>(b, hdr_code32_start, layout::kernel);
	put<std::uint32_t>(b, hdr_cmd_line_ptr, layout::cmdline);
	put<std::uint32_t>(b, bp_ext_cmd_line_ptr, 0);

	if (!initrd.empty()) {
		/* As high as initrd_addr_max and low RAM allow, above the decompressed kernel. */
		std::uint64_t max = std::uint64_t(get<std::uint32_t>(kernel, hdr_initrd_addr_max)) + 1;
		std::uint64_t top = std::min(max, low_end);
		std::uint64_t size = initrd.size();
		if (size > top || ((top - size) & ~(GuestMemory::page_size - 1)) < k.needed_ram)
			throw BootError("too little memory: the initrd (" + mib(size) +
					") must fit below " + hex(top) + " above the kernel's " +
					hex(k.needed_ram) + "; give at least " +
					mib(k.needed_ram + size + 32 * MiB));
		k.initrd_gpa = (top - size) & ~(GuestMemory::page_size - 1);
		k.initrd_size = size;
		put<std::uint32_t>(b, hdr_ramdisk_image, std::uint32_t(k.initrd_gpa));
		put<std::uint32_t>(b, hdr_ramdisk_size, std::uint32_t(size));
		put<std::uint32_t>(b, bp_ext_ramdisk_image, std::uint32_t(k.initrd_gpa >> 32));
		put<std::uint32_t>(b, bp_ext_ramdisk_size, std::uint32_t(size >> 32));
		mem.write(k.initrd_gpa, initrd);
	}

	auto map = e820_map(ram_bytes);
	put<std::uint8_t>(b, bp_e820_entries, std::uint8_t(map.size()));
	static_assert(e820_max >= 4);
	for (std::size_t i = 0; i < map.size(); i++) {
		std::size_t off = bp_e820_table + i * 20;
		put(b, off, map[i].addr);
		put(b, off + 8, map[i].size);
		put(b, off + 16, map[i].type);
	}

	mem.write(layout::boot_params, b);
	std::vector<std::byte> line(cmdline.size() + 1);
	std::memcpy(line.data(), cmdline.data(), cmdline.size());
	mem.write(layout::cmdline, line);
	if (decompress == Decompress::vmm)
		load_vmlinux(mem, k.vmlinux);
	else
		mem.write(layout::kernel, kernel.subspan(setup_bytes));
	return k;
}

void write_boot_page_tables(GuestMemory &mem)
{
	constexpr std::uint64_t present_rw = 0x3, huge = 0x80;
	std::uint64_t pdpt = layout::pml4 + 0x1000, pd = pdpt + 0x1000;
	mem.write_obj<std::uint64_t>(layout::pml4, pdpt | present_rw);
	for (std::uint64_t g = 0; g < 4; g++) {
		mem.write_obj<std::uint64_t>(pdpt + g * 8, (pd + g * 0x1000) | present_rw);
		for (std::uint64_t i = 0; i < 512; i++)
			mem.write_obj<std::uint64_t>(pd + g * 0x1000 + i * 8,
						     (g << 30 | i << 21) | present_rw | huge);
	}
	/* null, null, __BOOT_CS (64-bit code), __BOOT_DS (flat data), TSS */
	const std::uint64_t gdt[] = {0, 0, 0x00af9b000000ffff, 0x00cf93000000ffff,
				     0x00808b0000000fff};
	mem.write(layout::gdt, std::as_bytes(std::span(gdt)));
}

void enter_kernel(Vcpu &vcpu, const LoadedKernel &kernel)
{
	auto seg = [](std::uint16_t sel, std::uint8_t type, bool code) {
		kvm_segment s{};
		s.base = 0;
		s.limit = 0xffffffff;
		s.selector = sel;
		s.type = type;
		s.present = 1;
		s.dpl = 0;
		s.db = code ? 0 : 1;
		s.s = 1;
		s.l = code ? 1 : 0;
		s.g = 1;
		return s;
	};
	kvm_sregs sr = vcpu.sregs();
	sr.cs = seg(0x10, 0xb, true);
	sr.ds = sr.es = sr.fs = sr.gs = sr.ss = seg(0x18, 0x3, false);
	sr.tr = {};
	sr.tr.selector = 0x20;
	sr.tr.limit = 0xfff;
	sr.tr.type = 0xb;	/* busy 64-bit TSS: VMX checks it even when unused */
	sr.tr.present = 1;
	sr.ldt = {};
	sr.ldt.type = 0x2;
	sr.ldt.unusable = 1;
	sr.gdt.base = layout::gdt;
	sr.gdt.limit = 5 * 8 - 1;
	sr.idt.base = 0;
	sr.idt.limit = 0;
	sr.cr0 = 0x80000011;	/* PG | ET | PE */
	sr.cr3 = layout::pml4;
	sr.cr4 = 0x20;		/* PAE */
	sr.efer = 0x500;	/* LMA | LME */
	vcpu.set_sregs(sr);

	kvm_regs r{};
	r.rip = kernel.entry;
	r.rsi = layout::boot_params;
	r.rflags = 0x2;
	vcpu.set_regs(r);

	kvm_fpu fpu{};
	fpu.fcw = 0x37f;	/* the FNINIT state */
	fpu.mxcsr = 0x1f80;
	vcpu.set_fpu(fpu);
}

} // namespace virtkit::tool::run

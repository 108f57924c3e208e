// SPDX-License-Identifier: MIT
/*
 * linux-boot: boot a Linux bzImage to its serial console with libvirtkit's
 * public API alone - what `virtkit run` does (Documentation/virtkit-run.rst),
 * cut down to one file a VMM author can start from:
 *
 *   linux-boot BZIMAGE [INITRD [CMDLINE]]
 *
 * The VM: 256 MiB of RAM, one vCPU, KVM's in-kernel interrupt controllers
 * and PIT, and a 16550 UART at 0x3f8 that only sends (its output is this
 * program's stdout) and raises IRQ 4 when its transmitter is empty, as
 * Linux's 8250 driver expects. The kernel is started at its 32-bit entry
 * (the Linux x86 boot protocol, Documentation/arch/x86/boot.rst of the
 * kernel): its protected-mode code at 1 MiB, flat 32-bit segments, paging
 * off, ESI = the boot_params "zero page"; it decompresses itself.
 *
 * The command line (default "console=ttyS0 reboot=t panic=-1 tsc=reliable") gets
 * tsc_early_khz= with the TSC rate KVM gives the vCPU: the kernel then
 * skips calibrating the TSC against the PIT, which fails under nested KVM
 * on an emulator (QEMU's TCG) and leaves a clock that stalls the guest.
 *
 * Exit status 0 when the guest reboots (reboot=t makes that a triple fault;
 * reboot=k the i8042's reset line), 1 on an error, which names the failing
 * operation.
 */
#include <virtkit/virtkit.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr std::uint64_t ram_size = 256ull << 20;
/* Guest-physical layout below 1 MiB, and the kernel at 1 MiB. */
constexpr std::uint64_t gdt_gpa = 0x500, boot_params_gpa = 0x7000, cmdline_gpa = 0x20000,
			ebda_gpa = 0x9fc00, kernel_gpa = 0x100000;

/* Setup header fields (offsets in the bzImage and in boot_params). */
constexpr std::size_t hdr_setup_sects = 0x1f1, hdr_jump = 0x200, hdr_magic = 0x202,
		      hdr_version = 0x206, hdr_type_of_loader = 0x210, hdr_loadflags = 0x211,
		      hdr_ramdisk_image = 0x218, hdr_ramdisk_size = 0x21c,
		      hdr_heap_end_ptr = 0x224, hdr_cmd_line_ptr = 0x228,
		      hdr_initrd_addr_max = 0x22c, hdr_cmdline_size = 0x238;
constexpr std::size_t bp_e820_entries = 0x1e8, bp_e820_table = 0x2d0;

std::vector<std::byte> read_file(const char *path)
{
	std::ifstream in(path, std::ios::binary);
	if (!in)
		throw std::runtime_error(std::string("cannot open ") + path);
	std::vector<char> bytes{std::istreambuf_iterator<char>(in), {}};
	std::vector<std::byte> out(bytes.size());
	std::memcpy(out.data(), bytes.data(), bytes.size());
	return out;
}

template <class T> T get(const std::vector<std::byte> &b, std::size_t off)
{
	T v;
	if (off + sizeof(T) > b.size())
		throw std::runtime_error("not a bzImage: too short");
	std::memcpy(&v, b.data() + off, sizeof(T));
	return v;
}

template <class T> void put(std::vector<std::byte> &b, std::size_t off, T v)
{
	std::memcpy(b.data() + off, &v, sizeof(T));
}

/* The zero page, command line, kernel and initrd in guest memory. */
void load_linux(virtkit::GuestMemory &mem, const std::vector<std::byte> &kernel,
		const std::vector<std::byte> &initrd, const std::string &cmdline)
{
	if (kernel.size() < 0x1000 || std::memcmp(kernel.data() + hdr_magic, "HdrS", 4) != 0)
		throw std::runtime_error("not a bzImage (no \"HdrS\" at 0x202)");
	const auto version = get<std::uint16_t>(kernel, hdr_version);
	if (version < 0x0206)
		throw std::runtime_error("boot protocol older than 2.06");
	const std::size_t setup_sects = std::max<std::size_t>(get<std::uint8_t>(kernel, hdr_setup_sects), 4);
	const std::size_t setup_bytes = (setup_sects + 1) * 512;
	if (setup_bytes >= kernel.size())
		throw std::runtime_error("not a bzImage: setup larger than the file");
	if (cmdline.size() > get<std::uint32_t>(kernel, hdr_cmdline_size))
		throw std::runtime_error("command line too long for this kernel");

	/* boot_params: the image's setup header, then what the loader fills in. */
	std::vector<std::byte> bp(4096);
	const std::size_t hdr_end = hdr_jump + 2 + get<std::uint8_t>(kernel, hdr_jump + 1);
	std::memcpy(bp.data() + hdr_setup_sects, kernel.data() + hdr_setup_sects,
		    hdr_end - hdr_setup_sects);
	put<std::uint8_t>(bp, hdr_type_of_loader, 0xff);
	put<std::uint8_t>(bp, hdr_loadflags, get<std::uint8_t>(kernel, hdr_loadflags) | 0x80);
	put<std::uint16_t>(bp, hdr_heap_end_ptr, 0xfe00);
	put<std::uint32_t>(bp, hdr_cmd_line_ptr, cmdline_gpa);
	if (!initrd.empty()) {
		/* As high as the kernel allows, page-aligned. */
		std::uint64_t top = std::min<std::uint64_t>(get<std::uint32_t>(kernel, hdr_initrd_addr_max) + 1ull,
							    ram_size);
		std::uint64_t at = (top - initrd.size()) & ~0xfffull;
		mem.write(at, initrd);
		put<std::uint32_t>(bp, hdr_ramdisk_image, std::uint32_t(at));
		put<std::uint32_t>(bp, hdr_ramdisk_size, std::uint32_t(initrd.size()));
	}
	/* e820: low RAM, the EBDA and BIOS area reserved, RAM from 1 MiB. */
	const struct {
		std::uint64_t addr, size;
		std::uint32_t type;
	} e820[] = {{0, ebda_gpa, 1}, {ebda_gpa, kernel_gpa - ebda_gpa, 2},
		    {kernel_gpa, ram_size - kernel_gpa, 1}};
	put<std::uint8_t>(bp, bp_e820_entries, std::size(e820));
	for (std::size_t i = 0; i < std::size(e820); i++) {
		put(bp, bp_e820_table + i * 20, e820[i].addr);
		put(bp, bp_e820_table + i * 20 + 8, e820[i].size);
		put(bp, bp_e820_table + i * 20 + 16, e820[i].type);
	}
	mem.write(boot_params_gpa, bp);
	std::vector<std::byte> line(cmdline.size() + 1);
	std::memcpy(line.data(), cmdline.data(), cmdline.size());
	mem.write(cmdline_gpa, line);
	mem.write(kernel_gpa, std::span(kernel).subspan(setup_bytes));

	/* The boot protocol's GDT: __BOOT_CS (0x10) and __BOOT_DS (0x18), flat. */
	const std::uint64_t gdt[] = {0, 0, 0x00cf9b000000ffffull, 0x00cf93000000ffffull};
	mem.write(gdt_gpa, std::as_bytes(std::span(gdt)));
}

/* Flat 32-bit protected mode at the kernel's 32-bit entry, ESI = boot_params. */
void enter_kernel(virtkit::Vcpu &vcpu)
{
	kvm_sregs s = vcpu.sregs();
	auto flat = [](kvm_segment &seg, std::uint16_t selector, std::uint8_t type) {
		seg = {};
		seg.limit = 0xffffffff;
		seg.selector = selector;
		seg.type = type;
		seg.present = 1;
		seg.s = 1;
		seg.db = 1;
		seg.g = 1;
	};
	flat(s.cs, 0x10, 0xb);
	for (kvm_segment *seg : {&s.ds, &s.es, &s.fs, &s.gs, &s.ss})
		flat(*seg, 0x18, 0x3);
	s.gdt.base = gdt_gpa;
	s.gdt.limit = 4 * 8 - 1;
	s.cr0 = (s.cr0 | 1) & ~(1ull << 31); /* PE, no paging */
	vcpu.set_sregs(s);
	kvm_regs r{};
	r.rip = kernel_gpa;
	r.rsi = boot_params_gpa;
	r.rflags = 2;
	vcpu.set_regs(r);
}

/*
 * A 16550 that sends at once: the line status always says "transmitter
 * empty", and with IER's THR-empty bit set, a sent byte raises IRQ 4 until
 * the guest reads IIR. The guest's other registers are kept and read back.
 */
class Uart {
public:
	explicit Uart(virtkit::Vm &vm) : vm_(vm) {}

	std::uint8_t read(unsigned reg)
	{
		switch (reg) {
		case 1: /* IER */
			return regs_[1];
		case 2: { /* IIR: 0x02 THR empty, 0x01 nothing pending */
			std::uint8_t iir = pending() ? 0x02 : 0x01;
			thr_empty_ = false;
			update_irq();
			return iir;
		}
		case 5: /* LSR: THR and transmitter empty */
			return 0x60;
		case 6: /* MSR: carrier, DSR, CTS */
			return 0xb0;
		default:
			return regs_[reg];
		}
	}

	void write(unsigned reg, std::uint8_t v)
	{
		if (reg == 0 && !(regs_[3] & 0x80)) { /* THR, unless DLAB */
			std::fputc(v, stdout);
			if (v == '\n')
				std::fflush(stdout);
			thr_empty_ = true;
		} else {
			if (reg == 1 && !(regs_[3] & 0x80))
				thr_empty_ = (v & 0x02) != 0;
			regs_[reg] = v;
		}
		update_irq();
	}

private:
	bool pending() const { return thr_empty_ && (regs_[1] & 0x02); }
	void update_irq()
	{
		/* OUT2 (MCR bit 3) gates the line to the interrupt controller. */
		bool level = pending() && (regs_[4] & 0x08);
		if (level != irq_)
			vm_.set_irq_line(4, irq_ = level);
	}

	virtkit::Vm &vm_;
	std::uint8_t regs_[8] = {};
	bool thr_empty_ = false, irq_ = false;
};

/* Masked PICs, as firmware leaves them (KVM resets them unmasked). */
void mask_pics(virtkit::Vm &vm)
{
	for (auto chip : {virtkit::Irqchip::pic_master, virtkit::Irqchip::pic_slave}) {
		kvm_irqchip state = vm.irqchip(chip);
		state.chip.pic.imr = 0xff;
		vm.set_irqchip(state);
	}
}

int boot(const char *kernel_path, const char *initrd_path, std::string cmdline)
{
	auto kernel = read_file(kernel_path);
	auto initrd = initrd_path ? read_file(initrd_path) : std::vector<std::byte>{};

	auto sys = virtkit::System::open();
	auto vm = sys.create_vm();
	vm.create_irqchip(); /* before the vCPU: KVM gives it a LAPIC */
	vm.create_pit({.speaker_dummy = true});
	mask_pics(vm);
	vm.memory().add(0, ram_size);
	auto vcpu = vm.create_vcpu(0);
	vcpu.set_cpuid(sys.supported_cpuid());
	cmdline += " tsc_early_khz=" + std::to_string(vcpu.tsc_khz());
	std::printf("linux-boot: %s, command line \"%s\"\n", kernel_path, cmdline.c_str());
	load_linux(vm.memory(), kernel, initrd, cmdline);
	enter_kernel(vcpu);

	Uart uart(vm);
	for (std::uint64_t exits = 1;; exits++) {
		virtkit::Exit e = vcpu.run();
		if (auto *io = std::get_if<virtkit::IoExit>(&e)) {
			for (std::uint32_t i = 0; i < io->count; i++) {
				bool uart_port = io->port >= 0x3f8 && io->port < 0x400 && io->size == 1;
				if (uart_port && io->is_in())
					io->set(uart.read(io->port - 0x3f8), i);
				else if (uart_port)
					uart.write(io->port - 0x3f8, std::uint8_t(io->value(i)));
				else if (io->is_in())
					io->set(~0ull, i); /* no device */
				else if (io->port == 0x64 && io->value(i) == 0xfe) {
					std::printf("\nlinux-boot: the guest rebooted (i8042 reset) after %llu exits\n",
						    static_cast<unsigned long long>(exits));
					return 0;
				}
			}
		} else if (auto *m = std::get_if<virtkit::MmioExit>(&e)) {
			if (m->is_read())
				m->set(~0ull); /* no device */
		} else if (std::holds_alternative<virtkit::HltExit>(e) ||
			   std::holds_alternative<virtkit::InterruptedExit>(e)) {
			continue; /* the in-kernel LAPIC wakes a halted vCPU */
		} else if (std::holds_alternative<virtkit::ShutdownExit>(e)) {
			std::printf("\nlinux-boot: the guest stopped (a triple fault: reboot=t) after %llu exits\n",
				    static_cast<unsigned long long>(exits));
			return 0;
		} else {
			std::fprintf(stderr, "\nlinux-boot: unexpected exit: %s\n",
				     virtkit::describe(e).c_str());
			return 1;
		}
	}
}

} // namespace

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 4) {
		std::fprintf(stderr, "usage: linux-boot BZIMAGE [INITRD [CMDLINE]]\n");
		return 2;
	}
	try {
		return boot(argv[1], argc > 2 ? argv[2] : nullptr,
			    argc > 3 ? argv[3] : "console=ttyS0 reboot=t panic=-1 tsc=reliable");
	} catch (const virtkit::Error &e) {
		std::fprintf(stderr, "linux-boot: %s\n", e.what());
	} catch (const std::exception &e) {
		std::fprintf(stderr, "linux-boot: %s\n", e.what());
	}
	return 1;
}

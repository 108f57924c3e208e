// SPDX-License-Identifier: MIT
/*
 * The machine of `virtkit run` (machine.hpp): builds the VM with libvirtkit
 * alone, loads the kernel, runs one thread per vCPU and answers their port
 * I/O and MMIO exits until the guest stops, the user quits or a signal
 * comes.
 */
#include "machine.hpp"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <stop_token>
#include <thread>
#include <vector>

#include <virtkit/introspection.hpp>
#include <virtkit/virtkit.hpp>

#include "../../common/kernel_image.hpp"
#include "boot_loader.hpp"
#include "cmos.hpp"
#include "console.hpp"
#include "cpuid.hpp"
#include "mptable.hpp"
#include "uart.hpp"

namespace virtkit::tool::run {
namespace {

/* The i8042's command port: 0xfe pulses the CPU reset line (Linux's reboot=k). */
constexpr std::uint16_t i8042_data = 0x60, i8042_command = 0x64;
constexpr std::uint8_t i8042_reset = 0xfe;
/* The PCI reset control register: bit 2 resets (Linux's reboot=p). */
constexpr std::uint16_t reset_control = 0xcf9;

/*
 * Leave the PICs as firmware does, every IRQ masked until the guest
 * programs them. KVM resets them unmasked with the BSP's LINT0 in ExtINT
 * mode, so the PIT's first IRQ 0 would wait at the BSP, vector 0x08, for
 * the moment the guest enables interrupts.
 */
void mask_pic(Vm &vm)
{
	for (Irqchip chip : {Irqchip::pic_master, Irqchip::pic_slave}) {
		kvm_irqchip state = vm.irqchip(chip);
		state.chip.pic.imr = 0xff;
		vm.set_irqchip(state);
	}
}

class Machine {
public:
	explicit Machine(const RunOptions &o) : o_(o) {}
	int run();

private:
	void vcpu_thread(Vcpu &vcpu);
	void port_io(const IoExit &io);
	void mmio(const MmioExit &m);
	void stop(int status, std::string why);
	void summary() const;
	/* --introspect: connect to the tool whenever it listens, until stop. */
	void serve_introspection(std::stop_token token);

	const RunOptions &o_;
	std::mutex lock_;
	std::condition_variable stopped_cv_;
	bool stopped_ = false;
	int status_ = exit_error;
	std::string why_;
	std::atomic<bool> stopping_{false};
	/* Accesses to nothing, per port or MMIO page, for --verbose. */
	std::mutex counts_lock_;
	std::map<std::uint16_t, std::uint64_t> unknown_pio_;
	std::map<std::uint64_t, std::uint64_t> unknown_mmio_;
	std::atomic<std::uint64_t> exits_{0};
	std::atomic<std::uint64_t> completed_{0};

	/* Before vm_: the VM's SPP calls into it until the VM is gone. */
	std::optional<KernelDataProtection> protection_;
	std::optional<Vm> vm_;
	std::optional<Uart> uart_;
	Cmos cmos_;
};

void Machine::stop(int status, std::string why)
{
	{
		std::lock_guard g(lock_);
		if (stopped_)
			return;
		stopped_ = true;
		status_ = status;
		why_ = std::move(why);
	}
	stopping_ = true;
	stopped_cv_.notify_all();
}

void Machine::port_io(const IoExit &io)
{
	std::uint16_t p = io.port;
	if (io.size == 1 && p >= Uart::com1_port && p < Uart::com1_port + 8) {
		for (std::uint32_t i = 0; i < io.count; i++) {
			if (io.is_in())
				io.set(uart_->read(p - Uart::com1_port), i);
			else
				uart_->write(p - Uart::com1_port, std::uint8_t(io.value(i)));
		}
		return;
	}
	if (io.size == 1 && (p == Cmos::index_port || p == Cmos::data_port)) {
		for (std::uint32_t i = 0; i < io.count; i++) {
			if (io.is_in())
				io.set(cmos_.read(p), i);
			else
				cmos_.write(p, std::uint8_t(io.value(i)));
		}
		return;
	}
	if (p == i8042_data || p == i8042_command) {
		/* No keyboard: status and data read 0, so reset waits find it idle. */
		if (io.is_in()) {
			for (std::uint32_t i = 0; i < io.count; i++)
				io.set(0, i);
		} else if (p == i8042_command && io.value() == i8042_reset) {
			stop(exit_guest_stopped, "the guest rebooted (i8042 reset)");
		}
		return;
	}
	if (p == reset_control && io.size == 1 && io.is_out() && (io.value() & 0x04)) {
		stop(exit_guest_stopped, "the guest rebooted (reset control register 0xcf9)");
		return;
	}
	if (io.is_in())
		for (std::uint32_t i = 0; i < io.count; i++)
			io.set(~0ull, i);
	std::lock_guard g(counts_lock_);
	unknown_pio_[p] += io.count;
}

void Machine::mmio(const MmioExit &m)
{
	if (m.is_read())
		m.set(~0ull);
	std::lock_guard g(counts_lock_);
	unknown_mmio_[m.gpa & ~(GuestMemory::page_size - 1)]++;
}

/*
 * kvm_pvm runs the guest kernel through KVM's instruction emulator, which
 * fails (KVM_EXIT_INTERNAL_ERROR, emulation failure) on some instructions
 * hardware runs. The VMM does what the CPU would for the two Linux executes
 * whatever the CPUID says: INT3 (alternatives' self-test at boot, live
 * patching) raises #BP, a trap, after it; FWAIT (FPU state switches) does
 * nothing unless an unmasked x87 exception is pending (FSW.ES), when it
 * raises #MF. Returns the instruction, or 0 when it was none of them.
 */
std::uint8_t complete_unemulated(Vcpu &vcpu, const InternalErrorExit &e)
{
	kvm_regs r = vcpu.regs();
	kvm_translation t = vcpu.translate(r.rip);
	std::byte insn{};
	if (!t.valid || !vcpu.memory().contains(t.physical_address, 1))
		return 0;
	vcpu.memory().read(t.physical_address, std::span(&insn, 1));
	/*
	 * Another vCPU may have rewritten the instruction since KVM fetched it
	 * (Linux's text_poke_bp() puts an INT3 there, then the new bytes):
	 * then run it again, as the CPU would run the new one.
	 */
	if (e.data.size() >= 2 && (e.data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) &&
	    (e.data[1] & 0xff) && std::byte(e.data[1] >> 8) != insn &&
	    (std::byte(e.data[1] >> 8) == std::byte{0xcc} || std::byte(e.data[1] >> 8) == std::byte{0x9b}))
		return std::uint8_t(e.data[1] >> 8);
	int vector;
	if (insn == std::byte{0xcc})
		vector = 3;	/* #BP */
	else if (insn == std::byte{0x9b})
		vector = (vcpu.fpu().fsw & 0x80) ? 16 : -1;	/* #MF, or nothing */
	else
		return 0;
	if (vector != 16)
		r.rip += 1;	/* #BP is a trap; a FWAIT without exception completes */
	vcpu.set_regs(r);
	if (vector >= 0) {
		kvm_vcpu_events ev = vcpu.events();
		ev.exception.injected = 1;
		ev.exception.nr = std::uint8_t(vector);
		ev.exception.has_error_code = 0;
		ev.flags = 0;
		vcpu.set_events(ev);
	}
	return std::uint8_t(insn);
}

void Machine::vcpu_thread(Vcpu &vcpu)
{
	std::string who = "vcpu " + std::to_string(vcpu.id());
	try {
		while (!stopping_) {
			Exit e = vcpu.run();
			exits_++;
			if (auto *io = std::get_if<IoExit>(&e)) {
				port_io(*io);
			} else if (auto *m = std::get_if<MmioExit>(&e)) {
				mmio(*m);
			} else if (std::holds_alternative<InterruptedExit>(e) ||
				   std::holds_alternative<HltExit>(e)) {
				continue;
			} else if (auto *ie = std::get_if<InternalErrorExit>(&e);
				   ie && ie->suberror == KVM_INTERNAL_ERROR_EMULATION &&
				   complete_unemulated(vcpu, *ie)) {
				completed_++;
			} else if (std::holds_alternative<ShutdownExit>(e)) {
				/* A triple fault: how Linux reboots with reboot=t, or a crash. */
				stop(exit_guest_stopped,
				     "the guest stopped (" + who + ": KVM_EXIT_SHUTDOWN, a triple fault)");
			} else if (auto *s = std::get_if<SystemEventExit>(&e)) {
				if (s->type == KVM_SYSTEM_EVENT_SHUTDOWN || s->type == KVM_SYSTEM_EVENT_RESET)
					stop(exit_guest_stopped, "the guest stopped (" + describe(e) + ")");
				else
					stop(exit_error, who + ": " + describe(e));
			} else {
				char rip[32];
				std::snprintf(rip, sizeof(rip), " at rip %#llx",
					      static_cast<unsigned long long>(vcpu.regs().rip));
				stop(exit_error, who + ": unexpected exit: " + describe(e) + rip);
			}
		}
	} catch (const std::exception &ex) {
		stop(exit_error, who + ": " + ex.what());
	}
}

void Machine::serve_introspection(std::stop_token token)
{
	IntrospectionOptions o;
	o.address = o_.introspect;
	o.secret = o_.secret;
	o.name = "virtkit-run";
	o.stop = token;
	std::string last_error;
	auto pause = [&](std::chrono::milliseconds d) {
		std::mutex m;
		std::condition_variable_any cv;
		std::unique_lock g(m);
		cv.wait_for(g, token, d, [] { return false; });
	};
	std::fprintf(stderr, "virtkit run: serving introspection: the VM connects to %s whenever a tool listens there\r\n",
		     o_.introspect.c_str());
	while (!token.stop_requested()) {
		Introspection intro;
		try {
			intro = Introspection::connect(*vm_, o);
		} catch (const Error &e) {
			if (e.err() == EINVAL) { /* a malformed address: no retry helps */
				stop(exit_error, std::string("--introspect: ") + e.what());
				return;
			}
			/* Nobody listens (yet): try again; say other failures once. */
			bool absent = e.err() == ENOENT || e.err() == ECONNREFUSED ||
				      e.err() == ECONNRESET || e.err() == ECANCELED;
			if (!absent && e.what() != last_error)
				std::fprintf(stderr, "\r\nvirtkit run: introspection: %s\r\n", e.what());
			last_error = absent ? "" : e.what();
			pause(std::chrono::milliseconds(absent ? 200 : 1000));
			continue;
		}
		last_error.clear();
		std::fprintf(stderr, "\r\nvirtkit run: an introspection tool connected on %s\r\n",
			     o_.introspect.c_str());
		while (!token.stop_requested() && !intro.wait_disconnected(std::chrono::milliseconds(100)))
			;
		if (token.stop_requested()) {
			/* Shutting down: ask the tool to let go, as before a migration. */
			intro.unhook(std::chrono::milliseconds(500));
			return;
		}
		std::fprintf(stderr, "\r\nvirtkit run: the introspection tool disconnected\r\n");
	}
}

void Machine::summary() const
{
	std::fprintf(stderr, "virtkit run: %llu exits to the VMM\n",
		     static_cast<unsigned long long>(exits_.load()));
	if (completed_)
		std::fprintf(stderr,
			     "virtkit run: %llu INT3/FWAIT instructions KVM could not emulate, "
			     "completed by the VMM\n",
			     static_cast<unsigned long long>(completed_.load()));
	for (auto [port, n] : unknown_pio_)
		std::fprintf(stderr, "virtkit run: port %#06x: %llu accesses to no device\n", port,
			     static_cast<unsigned long long>(n));
	for (auto [page, n] : unknown_mmio_)
		std::fprintf(stderr, "virtkit run: MMIO page %#llx: %llu accesses to no device\n",
			     static_cast<unsigned long long>(page), static_cast<unsigned long long>(n));
}

int Machine::run()
{
	auto start = std::chrono::steady_clock::now();
	auto kernel = read_whole_file(o_.kernel, "--kernel");
	std::vector<std::byte> initrd;
	if (!o_.initrd.empty())
		initrd = read_whole_file(o_.initrd, "--initrd");

	System kvm = System::open(o_.device.c_str());
	vm_.emplace(kvm.create_vm());
	Vm &vm = *vm_;
	/* The interrupt controllers before any vCPU: KVM creates each LAPIC with its vCPU. */
	vm.create_irqchip();
	vm.create_pit({.speaker_dummy = true});
	mask_pic(vm);

	std::uint64_t low = std::min(o_.memory, layout::pci_hole);
	vm.memory().add(0, low, {.name = "ram"});
	if (o_.memory > low)
		vm.memory().add(layout::high_ram, o_.memory - low, {.name = "ram-high"});
	LoadedKernel k = load_linux(vm.memory(), o_.memory, kernel, initrd, o_.cmdline, o_.decompress);
	write_boot_page_tables(vm.memory());
	write_mptable(vm.memory(), layout::ebda, o_.cpus);
	if (!o_.protect.empty())
		protection_.emplace(vm, resolve_protection(o_.protect, k, o_.system_map));
	if (o_.verbose)
		std::fprintf(stderr,
			     "virtkit run: boot protocol %u.%02u, %s, %llu KiB of kernel, "
			     "entry %#llx, kernel below %#llx; initrd %llu KiB at %#llx\n",
			     k.protocol >> 8, k.protocol & 0xff,
			     o_.decompress == Decompress::vmm ? "vmlinux decompressed by the VMM"
							      : "decompressed by the guest",
			     static_cast<unsigned long long>(k.kernel_size >> 10),
			     static_cast<unsigned long long>(k.entry),
			     static_cast<unsigned long long>(k.needed_ram),
			     static_cast<unsigned long long>(k.initrd_size >> 10),
			     static_cast<unsigned long long>(k.initrd_gpa));

	auto supported = kvm.supported_cpuid();
	std::vector<Vcpu> vcpus;
	for (std::uint32_t i = 0; i < o_.cpus; i++) {
		Vcpu &v = vcpus.emplace_back(vm.create_vcpu(i));
		v.set_cpuid(vcpu_cpuid(supported, i));
		/* vCPU 0 boots; the others wait in KVM until the guest's INIT/SIPI. */
		kvm_mp_state mp{std::uint32_t(i == 0 ? KVM_MP_STATE_RUNNABLE : KVM_MP_STATE_UNINITIALIZED)};
		v.set_mp_state(mp);
	}
	enter_kernel(vcpus[0], k);

	uart_.emplace(
		[&vm](bool level) { vm.set_irq_line(Uart::com1_irq, level); },
		[](std::uint8_t byte) { Console::output(byte); });

	Console console;
	console.start(*uart_, [this](ConsoleStop why, int sig) {
		if (why == ConsoleStop::escape)
			stop(exit_escape, "quit (Ctrl-A x)");
		else
			stop(128 + sig, std::string("stopped by signal ") + strsignal(sig));
	});
	std::vector<std::thread> threads;
	std::jthread introspection;
	try {
		for (auto &v : vcpus)
			threads.emplace_back([this, &v] { vcpu_thread(v); });
		if (!o_.introspect.empty())
			introspection = std::jthread([this](std::stop_token st) {
				try {
					serve_introspection(st);
				} catch (const std::exception &e) {
					stop(exit_error, std::string("introspection: ") + e.what());
				}
			});
	} catch (const std::exception &e) {
		stop(exit_error, std::string("starting the vCPU threads: ") + e.what());
	}
	{
		std::unique_lock g(lock_);
		stopped_cv_.wait(g, [this] { return stopped_; });
	}
	/* First the tool lets go: a vCPU waiting for its reply resumes. */
	if (introspection.joinable()) {
		introspection.request_stop();
		introspection.join();
	}
	for (auto &v : vcpus)
		v.kick();
	for (auto &t : threads)
		t.join();
	console.close();

	double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
	std::fprintf(stderr, "\nvirtkit run: %s after %.2f s\n", why_.c_str(), secs);
	if (protection_) {
		std::uint64_t n = protection_->blocked();
		std::fprintf(stderr,
			     "virtkit run: %llu guest write%s to protected memory blocked; "
			     "%llu beside it in the same sub-pages performed\n",
			     static_cast<unsigned long long>(n), n == 1 ? "" : "s",
			     static_cast<unsigned long long>(protection_->beside()));
	}
	if (o_.verbose) {
		summary();
		/* Where each vCPU stopped and what it waits for: what a hang
		 * or a crash needs first. */
		for (auto &v : vcpus) {
			kvm_regs r = v.regs();
			kvm_sregs sr = v.sregs();
			kvm_vcpu_events ev = v.events();
			std::fprintf(stderr,
				     "virtkit run: vcpu %u: mp_state %u rip %#llx rsp %#llx rflags %#llx "
				     "cr0 %#llx cr3 %#llx cr4 %#llx efer %#llx; interrupt %s%u, "
				     "shadow %u, nmi %s, exception %s%u; interrupt bitmap %#llx\n",
				     v.id(), v.mp_state().mp_state,
				     static_cast<unsigned long long>(r.rip),
				     static_cast<unsigned long long>(r.rsp),
				     static_cast<unsigned long long>(r.rflags),
				     static_cast<unsigned long long>(sr.cr0),
				     static_cast<unsigned long long>(sr.cr3),
				     static_cast<unsigned long long>(sr.cr4),
				     static_cast<unsigned long long>(sr.efer),
				     ev.interrupt.injected ? "injected " : "none ", ev.interrupt.nr,
				     ev.interrupt.shadow,
				     ev.nmi.injected ? "injected" : ev.nmi.pending ? "pending" : "none",
				     ev.exception.injected	 ? "injected "
				     : ev.exception.pending ? "pending "
							     : "none ",
				     ev.exception.nr,
				     static_cast<unsigned long long>(sr.interrupt_bitmap[0]));
		}
		/* The console's interrupt path: the UART, then the IOAPIC pin and
		 * the PIC's view of IRQ 4. */
		std::fprintf(stderr, "virtkit run: uart: %s\n", uart_->describe().c_str());
		kvm_irqchip io = vm.irqchip(Irqchip::ioapic);
		auto &pin = io.chip.ioapic.redirtbl[Uart::com1_irq].fields;
		kvm_irqchip pic = vm.irqchip(Irqchip::pic_master);
		std::fprintf(stderr,
			     "virtkit run: ioapic pin %u: vector %#x %s%s%s, dest %#x, irr %#x; "
			     "pic: irr %#x imr %#x isr %#x\n",
			     Uart::com1_irq, pin.vector, pin.mask ? "masked" : "unmasked",
			     pin.trig_mode ? " level" : " edge", pin.remote_irr ? " remote-irr" : "",
			     pin.dest_id, io.chip.ioapic.irr, pic.chip.pic.irr, pic.chip.pic.imr,
			     pic.chip.pic.isr);
	}
	return status_;
}

} // namespace

int run_machine(const RunOptions &options)
{
	Machine m(options);
	return m.run();
}

} // namespace virtkit::tool::run

// SPDX-License-Identifier: MIT
/*
 * The VMM primitives on real KVM (Documentation/vmm-primitives.rst): the
 * in-kernel irqchip and PIT, IRQ lines, GSI routing and MSIs, irqfd and
 * ioeventfd, the kvmclock and TSC frequency, CPUID edits and region files.
 * Interrupts are checked end to end: a 64-bit guest with its LAPIC enabled
 * counts the vectors it receives.
 */
#include "exit_util.hpp"
#include "test.hpp"

#include <virtkit/x86/guest_vm.hpp>

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

using namespace virtkit;
using namespace virtkit::x86;
using namespace std::chrono_literals;

static void require_cap(long cap, const char *name)
{
	TEST_REQUIRE(vkt::kvm().has(cap), name);
}

static std::uint64_t expect_sync(GuestVm &g, Vcpu &v)
{
	Ucall uc = g.run(v);
	if (uc.kind != Ucall::Kind::sync || uc.args.empty())
		vkt::fail(__FILE__, __LINE__, "expected GUEST_SYNC, got " + uc.describe());
	return uc.args[0];
}

/* --- irqchip, PIT ------------------------------------------------------- */

VK_TEST(irqchip_and_pit_then_vcpu)
{
	require_cap(KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP");
	require_cap(KVM_CAP_PIT2, "KVM_CAP_PIT2");
	Vm vm = vkt::kvm().create_vm();
	vm.create_irqchip();
	vm.create_pit({.speaker_dummy = true});
	Vcpu v = vm.create_vcpu(0);
	/* Both chips answer, and the routing is KVM's default one. */
	TEST_ASSERT_EQ(vm.irqchip(Irqchip::ioapic).chip_id, KVM_IRQCHIP_IOAPIC);
	TEST_ASSERT_EQ(vm.irqchip(Irqchip::pic_master).chip_id, KVM_IRQCHIP_PIC_MASTER);
	TEST_ASSERT_EQ(vm.gsi_routing().size(), default_gsi_routing().size());
	TEST_ASSERT_EQ(default_gsi_routing().size(), 24u + 16u);
	auto m = TEST_EXPECT_ERROR(vm.create_irqchip(), EEXIST);
	TEST_ASSERT(m.find("already has the full irqchip") != std::string::npos, "%s", m.c_str());
	TEST_EXPECT_ERROR(vm.create_pit(), EEXIST);
	/* KVM's own answer: the PIT exists (a second KVM_CREATE_PIT2 is EEXIST too). */
	kvm_pit_config cfg{};
	TEST_ASSERT(::ioctl(vm.fd(), KVM_CREATE_PIT2, &cfg) < 0 && errno == EEXIST);
}

VK_TEST(irqchip_after_vcpu_fails_clearly)
{
	require_cap(KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP");
	Vm vm = vkt::kvm().create_vm();
	Vcpu v = vm.create_vcpu(0);
	auto m = TEST_EXPECT_ERROR(vm.create_irqchip(), EINVAL);
	TEST_ASSERT(m.find("KVM_CREATE_IRQCHIP") != std::string::npos &&
			    m.find("before the first vCPU") != std::string::npos,
		    "%s", m.c_str());
	TEST_EXPECT_ERROR(vm.create_split_irqchip(24), EINVAL);
	TEST_EXPECT_ERROR(vm.enable_cap(KVM_CAP_SPLIT_IRQCHIP, {24}), EINVAL);
	/* Nothing was created: everything that needs an irqchip says so. */
	m = TEST_EXPECT_ERROR(vm.create_pit(), ENOENT);
	TEST_ASSERT(m.find("no irqchip") != std::string::npos, "%s", m.c_str());
	TEST_EXPECT_ERROR(vm.set_irq_line(0, true), ENXIO);
	TEST_EXPECT_ERROR(vm.signal_msi({0xfee00000, 0x40}), ENXIO);
	TEST_EXPECT_ERROR(vm.irqchip(Irqchip::pic_master), ENXIO);
	EventFd e = EventFd::create();
	TEST_EXPECT_ERROR(vm.add_irqfd(4, e), ENXIO);
	/* KVM agrees: it has no irqchip. */
	kvm_irq_level l{};
	TEST_ASSERT(::ioctl(vm.fd(), KVM_IRQ_LINE_STATUS, &l) < 0 && errno == ENXIO);
}

/*
 * With the irqchip, vCPU 0 starts runnable and the others wait for INIT and
 * SIPI; set_mp_state() changes that, and without the irqchip KVM takes
 * RUNNABLE only.
 */
VK_TEST(mp_state_bsp_runnable_aps_wait_for_sipi)
{
	require_cap(KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP");
	TEST_REQUIRE(vkt::kvm().has(KVM_CAP_MP_STATE), "KVM_CAP_MP_STATE");
	Vm vm = vkt::kvm().create_vm();
	vm.create_irqchip();
	Vcpu bsp = vm.create_vcpu(0), ap = vm.create_vcpu(1);
	TEST_ASSERT_EQ(bsp.mp_state().mp_state, KVM_MP_STATE_RUNNABLE);
	TEST_ASSERT_EQ(ap.mp_state().mp_state, KVM_MP_STATE_UNINITIALIZED);
	ap.set_mp_state({KVM_MP_STATE_RUNNABLE});
	TEST_ASSERT_EQ(ap.mp_state().mp_state, KVM_MP_STATE_RUNNABLE);
	ap.set_mp_state({KVM_MP_STATE_UNINITIALIZED});
	TEST_ASSERT_EQ(ap.mp_state().mp_state, KVM_MP_STATE_UNINITIALIZED);

	Vm plain = vkt::kvm().create_vm();
	Vcpu v = plain.create_vcpu(0);
	TEST_ASSERT_EQ(v.mp_state().mp_state, KVM_MP_STATE_RUNNABLE);
	auto m = TEST_EXPECT_ERROR(v.set_mp_state({KVM_MP_STATE_UNINITIALIZED}), EINVAL);
	TEST_ASSERT(m.find("KVM_SET_MP_STATE") != std::string::npos, "%s", m.c_str());
}

VK_TEST(split_irqchip_takes_msi_routes_only)
{
	require_cap(KVM_CAP_SPLIT_IRQCHIP, "KVM_CAP_SPLIT_IRQCHIP");
	Vm bad = vkt::kvm().create_vm();
	TEST_EXPECT_ERROR(bad.create_split_irqchip(0), EINVAL);
	TEST_EXPECT_ERROR(bad.create_split_irqchip(1u << 20), EINVAL);
	TEST_EXPECT_ERROR(bad.enable_cap(KVM_CAP_SPLIT_IRQCHIP, {24}, 1), EINVAL);

	Vm vm = vkt::kvm().create_vm();
	vm.enable_cap(KVM_CAP_SPLIT_IRQCHIP, {24});
	/* Recorded: the VM knows it has the split irqchip. */
	auto m = TEST_EXPECT_ERROR(vm.create_irqchip(), EEXIST);
	TEST_ASSERT(m.find("split") != std::string::npos, "%s", m.c_str());
	TEST_EXPECT_ERROR(vm.create_pit(), ENOENT);
	TEST_ASSERT(vm.gsi_routing().empty());
	GsiRoute pin{3, IrqchipPin{Irqchip::ioapic, 3}};
	TEST_EXPECT_ERROR(vm.set_gsi_routing({&pin, 1}), EINVAL);
	GsiRoute msi{3, MsiMessage{0xfee00000, 0x45}};
	vm.set_gsi_routing({&msi, 1});
	TEST_ASSERT_EQ(vm.gsi_routing().size(), 1u);
	Vcpu v = vm.create_vcpu(0);
}

/* --- arguments ---------------------------------------------------------- */

VK_TEST(bad_interrupt_arguments_change_nothing)
{
	require_cap(KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP");
	require_cap(KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING");
	require_cap(KVM_CAP_IRQFD, "KVM_CAP_IRQFD");
	Vm vm = vkt::kvm().create_vm();
	vm.create_irqchip();
	Vcpu v = vm.create_vcpu(0);
	int fds = vkt::open_fd_count();
	auto before = vm.gsi_routing();
	auto max = static_cast<std::uint32_t>(vm.check_extension(KVM_CAP_IRQ_ROUTING));

	/* A GSI without a route: KVM would report "ignored", the library refuses. */
	auto m = TEST_EXPECT_ERROR(vm.set_irq_line(99, true), EINVAL);
	TEST_ASSERT(m.find("gsi 99 has no route") != std::string::npos, "%s", m.c_str());

	auto bad_table = [&](std::vector<GsiRoute> t) {
		TEST_EXPECT_ERROR(vm.set_gsi_routing(t), EINVAL);
	};
	bad_table({{1, IrqchipPin{Irqchip::ioapic, 24}}});
	bad_table({{1, IrqchipPin{Irqchip::pic_slave, 8}}});
	bad_table({{1, IrqchipPin{static_cast<Irqchip>(3), 0}}});
	bad_table({{max, IrqchipPin{Irqchip::ioapic, 1}}});
	bad_table({{1, IrqchipPin{Irqchip::ioapic, 1}}, {1, IrqchipPin{Irqchip::ioapic, 2}}});
	bad_table({{1, IrqchipPin{Irqchip::ioapic, 1}}, {1, MsiMessage{0xfee00000, 0x40}}});
	bad_table({{1, MsiMessage{0xfee00000, 0x40}}, {1, MsiMessage{0xfee00000, 0x41}}});
	/* The valid routes before a bad one were not applied either. */
	bad_table({{30, MsiMessage{0xfee00000, 0x40}}, {31, IrqchipPin{Irqchip::ioapic, 99}}});
	TEST_ASSERT_EQ(vm.gsi_routing().size(), before.size());
	TEST_EXPECT_ERROR(vm.set_irq_line(30, true), EINVAL);
	/* KVM's table is still the default: GSI 4 reaches PIC pin 4. */
	TEST_ASSERT(vm.set_irq_line(4, true).delivered());
	vm.set_irq_line(4, false);

	EventFd e = EventFd::create();
	TEST_EXPECT_ERROR(vm.add_irqfd(max, e), EINVAL);
	EventFd empty;
	TEST_EXPECT_ERROR(vm.add_irqfd(4, empty), EBADF);
	TEST_EXPECT_ERROR(EventFd::create(0, EFD_NONBLOCK), EINVAL);

	/* ioeventfd: sizes, datamatch that cannot match, ranges. */
	TEST_EXPECT_ERROR(vm.add_ioeventfd(0x2000, 3, e, IoSpace::pio), EINVAL);
	TEST_EXPECT_ERROR(vm.add_ioeventfd(0x2000, 0, e, IoSpace::pio), EINVAL);
	TEST_EXPECT_ERROR(vm.add_ioeventfd(0xd0000000, 0, e, IoSpace::mmio, 1), EINVAL);
	TEST_EXPECT_ERROR(vm.add_ioeventfd(0xd0000000, 1, e, IoSpace::mmio, 0x100), EINVAL);
	TEST_EXPECT_ERROR(vm.add_ioeventfd(0xffff, 2, e, IoSpace::pio), EINVAL);
	TEST_EXPECT_ERROR(vm.add_ioeventfd(~0ull - 1, 4, e, IoSpace::mmio), EINVAL);
	TEST_EXPECT_ERROR(vm.add_ioeventfd(0x2000, 1, empty, IoSpace::pio), EBADF);
	/* The same binding twice: KVM's EEXIST, the first one stays. */
	auto reg = vm.add_ioeventfd(0xd0000000, 4, e, IoSpace::mmio, 7);
	TEST_EXPECT_ERROR(vm.add_ioeventfd(0xd0000000, 4, e, IoSpace::mmio, 7), EEXIST);
	reg.reset();

	kvm_irqchip chip = vm.irqchip(Irqchip::pic_master);
	chip.pad = 1;
	TEST_EXPECT_ERROR(vm.set_irqchip(chip), EINVAL);
	TEST_EXPECT_ERROR(vm.set_clock({.ns = 1, .flags = 1u << 8}), EINVAL);
	TEST_EXPECT_ERROR(v.set_tsc_khz(0), EINVAL);
	/* No descriptor was left behind by the failures (or the reset registration). */
	TEST_ASSERT_EQ(vkt::open_fd_count(), fds + 1);
}

VK_TEST(irq_line_status_reports_delivery_and_coalescing)
{
	require_cap(KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP");
	require_cap(KVM_CAP_IRQ_INJECT_STATUS, "KVM_CAP_IRQ_INJECT_STATUS");
	Vm vm = vkt::kvm().create_vm();
	vm.create_irqchip();
	Vcpu v = vm.create_vcpu(0);
	/* The PIC takes GSI 3 (unmasked after reset); the IOAPIC pin is masked. */
	IrqStatus s = vm.set_irq_line(3, true);
	TEST_ASSERT(s.delivered(), "kind %d", int(s.kind));
	vm.set_irq_line(3, false);
	TEST_ASSERT(vm.irqchip(Irqchip::pic_master).chip.pic.irr & (1u << 3));
	/* Not acknowledged yet: the second edge merges with the first. */
	TEST_ASSERT(vm.set_irq_line(3, true).coalesced());
	vm.set_irq_line(3, false);
	/* Mask it at the PIC too (set_irqchip): nothing takes it. */
	kvm_irqchip pic = vm.irqchip(Irqchip::pic_master);
	pic.chip.pic.imr = 0xff;
	pic.chip.pic.irr = 0;
	vm.set_irqchip(pic);
	TEST_ASSERT(vm.set_irq_line(3, true).kind == IrqStatus::Kind::ignored);
	vm.set_irq_line(3, false);
}

/* --- ioeventfd ------------------------------------------------------------ */

static constexpr std::uint16_t event_port = 0x2000;
static constexpr std::uint64_t event_mmio = 0xd0000000;

static void guest_ioevents(std::uint64_t port, std::uint64_t mmio)
{
	volatile std::uint32_t *p = reinterpret_cast<volatile std::uint32_t *>(mmio);
	/* 1: both handled inside KVM. */
	guest_outb(static_cast<std::uint16_t>(port), 0x5a);
	p[0] = 0x1234;
	GUEST_SYNC(1);
	/* 2: a value the datamatch does not take exits; the right one does not. */
	p[0] = 0x1111;
	p[0] = 0x1234;
	GUEST_SYNC(2);
	/* 3: after the registrations are gone, both exit again. */
	guest_outb(static_cast<std::uint16_t>(port), 0x5a);
	p[0] = 0x1234;
	GUEST_SYNC(3);
}

VK_TEST(ioeventfd_pio_and_mmio_signal_without_exits)
{
	require_cap(KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD");
	GuestVm g(vkt::kvm());
	g.identity_map(event_mmio, 4096);
	Vcpu &v = g.add_vcpu(guest_ioevents, event_port, event_mmio);
	EventFd pio = EventFd::create(), mmio = EventFd::create();
	auto rp = g.vm().add_ioeventfd(event_port, 1, pio, IoSpace::pio);
	auto rm = g.vm().add_ioeventfd(event_mmio, 4, mmio, IoSpace::mmio, 0x1234);
	TEST_ASSERT(!pio.consume() && !mmio.consume());

	/* Straight to the sync: neither write left KVM. */
	TEST_ASSERT_EQ(expect_sync(g, v), 1);
	TEST_ASSERT_EQ(pio.consume().value_or(0), 1);
	TEST_ASSERT_EQ(mmio.consume().value_or(0), 1);

	Exit e = next_exit(g, v);
	auto &w = expect<MmioExit>(e);
	TEST_ASSERT(w.is_write());
	TEST_ASSERT_EQ(w.gpa, event_mmio);
	TEST_ASSERT_EQ(w.value(), 0x1111);
	TEST_ASSERT(!mmio.consume());
	TEST_ASSERT_EQ(expect_sync(g, v), 2);
	TEST_ASSERT_EQ(mmio.consume().value_or(0), 1);

	rp.reset();
	{
		/* Moved-from and moved-to: one deassign, by the owner. */
		EventFdRegistration moved = std::move(rm);
		TEST_ASSERT(!rm && moved);
	}
	Exit o = next_exit(g, v);
	auto &io = expect<IoExit>(o);
	TEST_ASSERT(io.is_out());
	TEST_ASSERT_EQ(io.port, event_port);
	TEST_ASSERT_EQ(io.value(), 0x5a);
	Exit e2 = next_exit(g, v);
	auto &w2 = expect<MmioExit>(e2);
	TEST_ASSERT_EQ(w2.value(), 0x1234);
	TEST_ASSERT_EQ(expect_sync(g, v), 3);
	TEST_ASSERT(!pio.consume() && !mmio.consume());
	g.run_to_done(v);
}

/* --- interrupts in a guest ------------------------------------------------ */

static constexpr std::uint64_t lapic_base = 0xfee00000;
static constexpr std::uint64_t ioapic_base = 0xfec00000;
static constexpr std::uint8_t first_vector = 0x40;

/* Interrupts the guest received, per vector from first_vector. */
static volatile std::uint64_t guest_irqs[4];

static void lapic_write(std::uint32_t reg, std::uint32_t v)
{
	*reinterpret_cast<volatile std::uint32_t *>(lapic_base + reg) = v;
}

static void guest_irq_handler(struct virtkit_ex_frame *f)
{
	guest_irqs[f->vector - first_vector] = guest_irqs[f->vector - first_vector] + 1;
	lapic_write(0xb0, 0); /* EOI */
}

static void ioapic_write(std::uint32_t reg, std::uint32_t v)
{
	*reinterpret_cast<volatile std::uint32_t *>(ioapic_base) = reg;
	*reinterpret_cast<volatile std::uint32_t *>(ioapic_base + 0x10) = v;
}

/* Wait with interrupts enabled until a vector's count reaches want, at most spins pauses. */
static std::uint64_t wait_irq(unsigned idx, std::uint64_t want, std::uint64_t spins)
{
	__asm__ volatile("sti" ::: "memory");
	for (std::uint64_t i = 0; i < spins && guest_irqs[idx] < want; i++)
		guest_pause();
	__asm__ volatile("cli" ::: "memory");
	return guest_irqs[idx];
}

static void guest_interrupts(std::uint64_t ioapic_pin)
{
	/* LAPIC on (SVR), all priorities, LINT0 masked (no ExtINT from the PIC). */
	lapic_write(0x80, 0);
	lapic_write(0x350, 1u << 16);
	lapic_write(0xf0, 0x1ff);
	/* IOAPIC pin: edge, fixed, to APIC 0, vector first_vector + 1. */
	ioapic_write(0x11 + 2 * static_cast<std::uint32_t>(ioapic_pin), 0);
	ioapic_write(0x10 + 2 * static_cast<std::uint32_t>(ioapic_pin), first_vector + 1);
	GUEST_SYNC(0);
	for (unsigned idx = 0; idx < 4; idx++)
		GUEST_SYNC(wait_irq(idx, 1, 200000000));
	/* Nothing arrives once the irqfd is gone. */
	GUEST_SYNC(wait_irq(0, 2, 2000000));
}

VK_TEST(interrupts_reach_the_guest_via_irqfd_msi_and_ioapic)
{
	require_cap(KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP");
	require_cap(KVM_CAP_IRQFD, "KVM_CAP_IRQFD");
	require_cap(KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING");
	require_cap(KVM_CAP_SIGNAL_MSI, "KVM_CAP_SIGNAL_MSI");
	constexpr std::uint32_t msi_gsi = 24, ioapic_gsi = 10, line_gsi = 11;
	GuestVm g(vkt::kvm());
	g.vm().create_irqchip();
	g.identity_map(lapic_base, 4096);
	g.identity_map(ioapic_base, 4096);
	for (unsigned i = 0; i < 4; i++)
		g.install_exception_handler(first_vector + i, guest_irq_handler);
	Vcpu &v = g.add_vcpu(guest_interrupts, ioapic_gsi);

	/* GSI 24: an MSI to APIC 0, vector 0x40; the default routes stay. */
	auto routes = g.vm().gsi_routing();
	routes.push_back({msi_gsi, MsiMessage{lapic_base, first_vector}});
	g.vm().set_gsi_routing(routes);
	EventFd msi = EventFd::create(), pin = EventFd::create();
	auto rmsi = g.vm().add_irqfd(msi_gsi, msi);
	auto rpin = g.vm().add_irqfd(ioapic_gsi, pin);

	TEST_ASSERT_EQ(expect_sync(g, v), 0);
	msi.notify();
	TEST_ASSERT_EQ(expect_sync(g, v), 1); /* 0x40: irqfd -> MSI route */
	pin.notify();
	TEST_ASSERT_EQ(expect_sync(g, v), 1); /* 0x41: irqfd -> IOAPIC pin */
	IrqStatus s = g.vm().signal_msi({lapic_base, first_vector + 2u});
	TEST_ASSERT(s.delivered(), "KVM_SIGNAL_MSI status kind %d", int(s.kind));
	TEST_ASSERT_EQ(expect_sync(g, v), 1); /* 0x42: KVM_SIGNAL_MSI */
	/* 0x43: an IOAPIC pin the guest left masked, unmasked here by the VMM. */
	kvm_irqchip io = g.vm().irqchip(Irqchip::ioapic);
	io.chip.ioapic.redirtbl[line_gsi].bits = first_vector + 3u;
	g.vm().set_irqchip(io);
	g.vm().set_irq_line(line_gsi, true);
	g.vm().set_irq_line(line_gsi, false);
	TEST_ASSERT_EQ(expect_sync(g, v), 1);

	/* Deassigned: the eventfd no longer reaches the guest. */
	rmsi.reset();
	msi.notify();
	TEST_ASSERT_EQ(expect_sync(g, v), 1);
	g.run_to_done(v);
}

VK_TEST(irqfd_registration_outlives_eventfd_and_vm)
{
	require_cap(KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP");
	require_cap(KVM_CAP_IRQFD, "KVM_CAP_IRQFD");
	int fds = vkt::open_fd_count();
	EventFdRegistration outlives;
	{
		Vm vm = vkt::kvm().create_vm();
		vm.create_irqchip();
		Vcpu v = vm.create_vcpu(0);
		/* The PIC's IRR shows the edge (the injection is asynchronous). */
		auto irr = [&] { return vm.irqchip(Irqchip::pic_master).chip.pic.irr; };
		{
			EventFd e = EventFd::create();
			outlives = vm.add_irqfd(5, e);
			e.notify();
		}
		/* The registration's own copy keeps the binding after the EventFd closed. */
		auto until = std::chrono::steady_clock::now() + 2s;
		while (!(irr() & (1u << 5)) && std::chrono::steady_clock::now() < until)
			std::this_thread::sleep_for(1ms);
		TEST_ASSERT(irr() & (1u << 5), "irr 0x%x", irr());

		/* A deassigned irqfd raises nothing. */
		EventFd e2 = EventFd::create();
		auto r2 = vm.add_irqfd(6, e2);
		r2.reset();
		e2.notify();
		std::this_thread::sleep_for(50ms);
		TEST_ASSERT(!(irr() & (1u << 6)), "irr 0x%x", irr());
	}
	/* The VM and its vCPU are gone: destroying the registration is harmless. */
	outlives.reset();
	TEST_ASSERT_EQ(vkt::open_fd_count(), fds);
}

/* --- clock, TSC, CPUID ------------------------------------------------------ */

VK_TEST(clock_round_trip)
{
	require_cap(KVM_CAP_ADJUST_CLOCK, "KVM_CAP_ADJUST_CLOCK");
	Vm vm = vkt::kvm().create_vm();
	VmClock c = vm.clock();
	vkt::diag("kvmclock %llu ns, flags 0x%x", (unsigned long long)c.ns, c.flags);
	constexpr std::uint64_t ahead = 1000ull * 1000 * 1000 * 1000; /* 1000 s */
	vm.set_clock({.ns = c.ns + ahead});
	VmClock d = vm.clock();
	TEST_ASSERT(d.ns >= c.ns + ahead && d.ns < c.ns + ahead + 10ull * 1000 * 1000 * 1000,
		    "%llu -> %llu", (unsigned long long)c.ns, (unsigned long long)d.ns);
	/* KVM reports a realtime stamp with the clock where it can. */
	if (d.flags & KVM_CLOCK_REALTIME)
		TEST_ASSERT(d.realtime != 0);
	/* Back to the first reading: the clock follows. */
	vm.set_clock({.ns = c.ns});
	TEST_ASSERT(vm.clock().ns < c.ns + ahead);
}

VK_TEST(tsc_khz_readable_and_set_where_controllable)
{
	require_cap(KVM_CAP_GET_TSC_KHZ, "KVM_CAP_GET_TSC_KHZ");
	Vm vm = vkt::kvm().create_vm();
	Vcpu v = vm.create_vcpu(0);
	std::uint32_t khz = v.tsc_khz();
	vkt::diag("vCPU TSC %u kHz, KVM_CAP_TSC_CONTROL %d", khz,
		  vkt::kvm().check_extension(KVM_CAP_TSC_CONTROL));
	TEST_ASSERT(khz > 100000, "%u kHz", khz);
	v.set_tsc_khz(khz); /* its own rate: always fine */
	TEST_ASSERT_EQ(v.tsc_khz(), khz);
	if (vm.check_extension(KVM_CAP_TSC_CONTROL) > 0) {
		v.set_tsc_khz(khz / 2);
		TEST_ASSERT_EQ(v.tsc_khz(), khz / 2);
	} else {
		auto m = TEST_EXPECT_ERROR(v.set_tsc_khz(khz / 2), ENOTSUP);
		TEST_ASSERT(m.find("KVM_CAP_TSC_CONTROL") != std::string::npos, "%s", m.c_str());
		TEST_ASSERT_EQ(v.tsc_khz(), khz);
	}
}

/* Leaf 1: SSE3 (ECX[0]) off, HYPERVISOR (ECX[31]) on. */
static const CpuidEdit leaf1_edits[] = {
	{.function = 1, .reg = CpuidReg::ecx, .clear = 1u << 0},
	{.function = 1, .reg = CpuidReg::ecx, .set = 1u << 31},
};

VK_TEST(cpuid_edits_all_or_nothing_and_set_on_the_vcpu)
{
	Vm vm = vkt::kvm().create_vm();
	Vcpu v = vm.create_vcpu(0);
	auto cpuid = vkt::kvm().supported_cpuid();
	TEST_ASSERT(cpuid_find(cpuid, 1));
	std::uint32_t edx = cpuid_find(cpuid, 1)->edx;
	apply_cpuid_edits(cpuid, leaf1_edits);
	TEST_ASSERT_EQ(cpuid_find(cpuid, 1)->ecx & 1, 0);
	TEST_ASSERT_EQ(cpuid_find(cpuid, 1)->ecx >> 31, 1);
	TEST_ASSERT_EQ(cpuid_find(cpuid, 1)->edx, edx);
	/* A missing leaf throws and leaves the table alone, earlier edits included. */
	auto copy = cpuid;
	const CpuidEdit missing[] = {{.function = 1, .reg = CpuidReg::edx, .clear = ~0u},
				     {.function = 0x4fff0000, .reg = CpuidReg::eax}};
	auto m = TEST_EXPECT_ERROR(apply_cpuid_edits(cpuid, missing), ENOENT);
	TEST_ASSERT(m.find("0x4fff0000") != std::string::npos, "%s", m.c_str());
	TEST_ASSERT(std::memcmp(copy.data(), cpuid.data(), cpuid.size() * sizeof(cpuid[0])) == 0);
	/* Sub-leaves: (7, 0) and (0xd, 1) are distinct entries where KVM has them. */
	if (auto *e = cpuid_find(cpuid, 0xd, 1))
		TEST_ASSERT_EQ(e->index, 1);
	/*
	 * Set on the vCPU, KVM keeps the VMM's choice. Checked on KVM's own
	 * leaf (0x40000001, KVM_CPUID_FEATURES): kvm_pvm replaces leaf 1 with
	 * the host's, which its guests read natively.
	 */
	const CpuidEdit pv[] = {{.function = 0x40000001, .reg = CpuidReg::eax,
				 .clear = 1u << 3 /* KVM_FEATURE_CLOCKSOURCE2 */}};
	TEST_REQUIRE(cpuid_find(cpuid, 0x40000001), "KVM_GET_SUPPORTED_CPUID leaf 0x40000001");
	apply_cpuid_edits(cpuid, pv);
	v.set_cpuid(cpuid);
	auto back = v.cpuid();
	TEST_ASSERT(cpuid_find(back, 0x40000001));
	TEST_ASSERT_EQ(cpuid_find(back, 0x40000001)->eax, cpuid_find(cpuid, 0x40000001)->eax);
}

static void guest_cpuid(void)
{
	std::uint32_t a = 1, b, c = 0, d;
	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	GUEST_SYNC(c, d);
}

/* Leaf 1's ECX and EDX as a guest reads them, its vCPU's CPUID set to cpuid. */
static std::pair<std::uint32_t, std::uint32_t>
guest_leaf1(const std::vector<kvm_cpuid_entry2> &cpuid)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_cpuid);
	v.set_cpuid(cpuid);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.size() == 2);
	g.run_to_done(v);
	return {static_cast<std::uint32_t>(uc.args[0]), static_cast<std::uint32_t>(uc.args[1])};
}

VK_TEST(cpuid_edits_reach_the_guest)
{
	auto cpuid = vkt::kvm().supported_cpuid();
	apply_cpuid_edits(cpuid, leaf1_edits);
	std::uint32_t ecx = cpuid_find(cpuid, 1)->ecx, edx = cpuid_find(cpuid, 1)->edx;
	auto [guest_ecx, guest_edx] = guest_leaf1(cpuid);
	/*
	 * Probe: the same with SSE3 (ECX[0]) set instead of cleared. Where the
	 * guest reads the same leaf 1 either way, KVM does not give it the
	 * vCPU's leaf 1 at all (kvm_pvm runs CPUID natively: the host's leaf,
	 * with a few bits of its own).
	 */
	auto with_sse3 = cpuid;
	const CpuidEdit sse3[] = {{.function = 1, .reg = CpuidReg::ecx, .set = 1u << 0}};
	apply_cpuid_edits(with_sse3, sse3);
	auto [other_ecx, other_edx] = guest_leaf1(with_sse3);
	TEST_REQUIRE(other_ecx != guest_ecx || other_edx != guest_edx,
		     vkt::format("the guest's leaf 1 to follow KVM_SET_CPUID2 (it reads ECX 0x%x, "
				 "EDX 0x%x whether the vCPU's ECX is 0x%x or 0x%x)",
				 guest_ecx, guest_edx, ecx, ecx | 1));
	/* KVM adds runtime bits to leaf 1: OSXSAVE (ECX[27]), APIC (EDX[9]). */
	constexpr std::uint32_t runtime_ecx = 1u << 27, runtime_edx = 1u << 9;
	TEST_ASSERT_EQ(guest_ecx & ~runtime_ecx, ecx & ~runtime_ecx);
	TEST_ASSERT_EQ(guest_edx & ~runtime_edx, edx & ~runtime_edx);
	TEST_ASSERT_EQ(other_ecx & ~runtime_ecx, (ecx | 1) & ~runtime_ecx);
}

/* --- region files ---------------------------------------------------------- */

static constexpr std::uint64_t shared_gpa = 0x40000000;

static void guest_fill(std::uint64_t gva)
{
	auto *p = reinterpret_cast<volatile std::uint64_t *>(gva);
	for (std::uint64_t i = 0; i < 8192 / 8; i++)
		p[i] = 0xa5a5000000000000ull | i;
	GUEST_SYNC(0);
	/* What the back-end wrote through its read-write file. */
	GUEST_SYNC(p[1024]);
}

VK_TEST(region_fd_shares_guest_ram_read_only_where_asked)
{
	GuestVm g(vkt::kvm());
	RegionId id = g.memory().add(shared_gpa, 0x10000, {.name = "shared"});
	g.identity_map(shared_gpa, 0x10000);
	Vcpu &v = g.add_vcpu(guest_fill, shared_gpa + 0x1000);
	TEST_ASSERT_EQ(expect_sync(g, v), 0);

	RegionFile ro = g.memory().region_fd(id, FileAccess::read_only);
	TEST_ASSERT_EQ(ro.offset, 0);
	TEST_ASSERT_EQ(ro.size, 0x10000);
	TEST_ASSERT_EQ(::fcntl(ro.fd.get(), F_GETFL) & O_ACCMODE, O_RDONLY);
	TEST_ASSERT(::fcntl(ro.fd.get(), F_GETFD) & FD_CLOEXEC);
	Mapping view = Mapping::map(ro.size, PROT_READ, MAP_SHARED, ro.fd.get(),
				    static_cast<off_t>(ro.offset), "region view");
	auto *words = reinterpret_cast<const std::uint64_t *>(view.data() + 0x1000);
	for (std::uint64_t i = 0; i < 8192 / 8; i++)
		if (words[i] != (0xa5a5000000000000ull | i))
			vkt::fail(__FILE__, __LINE__,
				  vkt::format("word %llu: 0x%llx", (unsigned long long)i,
					      (unsigned long long)words[i]));
	/* The holder of the read-only file cannot write the guest's RAM. */
	TEST_EXPECT_ERROR(Mapping::map(ro.size, PROT_READ | PROT_WRITE, MAP_SHARED, ro.fd.get(), 0,
				       "writable view"),
			  EACCES);
	std::uint64_t junk = 0;
	TEST_ASSERT(::pwrite(ro.fd.get(), &junk, sizeof(junk), 0x1000) < 0 && errno == EBADF);
	TEST_ASSERT(::ftruncate(ro.fd.get(), 0) < 0);
	TEST_ASSERT(::mprotect(view.data(), 4096, PROT_READ | PROT_WRITE) < 0 && errno == EACCES);
	TEST_ASSERT_EQ(words[0], 0xa5a5000000000000ull);

	/* A read-write file is the same RAM: the guest sees what the back-end writes. */
	RegionFile rw = g.memory().region_fd(id);
	TEST_ASSERT_EQ(::fcntl(rw.fd.get(), F_GETFL) & O_ACCMODE, O_RDWR);
	std::uint64_t value = 0x600dcafe;
	TEST_ASSERT(::pwrite(rw.fd.get(), &value, sizeof(value), 0x1000 + 1024 * 8) == 8);
	TEST_ASSERT_EQ(expect_sync(g, v), value);
	TEST_ASSERT_EQ(words[1024], value);

	TEST_EXPECT_ERROR(g.memory().region_fd(9999), ENOENT);
	g.run_to_done(v);
}

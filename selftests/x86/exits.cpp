// SPDX-License-Identifier: MIT
/*
 * Typed exits on real KVM: port I/O and MMIO in both directions (single and
 * rep string), HLT, user-space MSR exits, KVM_EXIT_MEMORY_FAULT, and the
 * exit-handler chain.
 */
#include "exit_util.hpp"
#include "test.hpp"

#include <virtkit/x86/guest_vm.hpp>

#include <sys/ioctl.h>

#include <cerrno>
#include <cstring>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint16_t test_port = 0x80;
/* A guest-physical address no region backs: accesses exit as MMIO. */
static constexpr std::uint64_t mmio_gpa = 0xd0000000;

static void guest_pio_out(void)
{
	__asm__ volatile("outb %b0, %w1" ::"a"(0x12), "Nd"(test_port));
	__asm__ volatile("outw %w0, %w1" ::"a"(0x3456), "Nd"(test_port));
	__asm__ volatile("outl %0, %w1" ::"a"(0x789abcdeu), "Nd"(test_port));
}

VK_TEST(pio_out_sizes)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_pio_out);
	const std::uint64_t want[] = {0x12, 0x3456, 0x789abcde};
	for (unsigned i = 0; i < 3; i++) {
		Exit e = next_exit(g, v);
		auto &io = expect<IoExit>(e);
		TEST_ASSERT(io.is_out());
		TEST_ASSERT_EQ(io.port, test_port);
		TEST_ASSERT_EQ(io.size, 1u << i);
		TEST_ASSERT_EQ(io.count, 1);
		TEST_ASSERT_EQ(io.data.size(), io.size);
		TEST_ASSERT_EQ(io.value(), want[i]);
	}
	g.run_to_done(v);
}

static void guest_pio_in(void)
{
	std::uint8_t b;
	std::uint32_t l;
	__asm__ volatile("inb %w1, %b0" : "=a"(b) : "Nd"(test_port));
	__asm__ volatile("inl %w1, %0" : "=a"(l) : "Nd"(test_port));
	GUEST_SYNC(b, l);
}

VK_TEST(pio_in_completed_by_host)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_pio_in);
	Exit e = next_exit(g, v);
	auto &in8 = expect<IoExit>(e);
	TEST_ASSERT(in8.is_in());
	TEST_ASSERT_EQ(in8.size, 1);
	in8.set(0xa5);
	e = next_exit(g, v);
	auto &in32 = expect<IoExit>(e);
	TEST_ASSERT(in32.is_in());
	TEST_ASSERT_EQ(in32.size, 4);
	in32.set(0xfeedf00d);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync);
	TEST_ASSERT_EQ(uc.args[0], 0xa5);
	TEST_ASSERT_EQ(uc.args[1], 0xfeedf00d);
	g.run_to_done(v);
}

static const char rep_out_data[] = "virtkit!";
static char rep_in_buf[8];

static void guest_pio_rep(void)
{
	const char *src = rep_out_data;
	char *dst = rep_in_buf;
	std::uint64_t n = 8;
	__asm__ volatile("rep outsb" : "+S"(src), "+c"(n) : "d"(test_port) : "memory");
	n = 8;
	__asm__ volatile("rep insb" : "+D"(dst), "+c"(n) : "d"(test_port) : "memory");
	std::uint64_t got = 0;
	for (int i = 7; i >= 0; i--)
		got = got << 8 | (std::uint8_t)rep_in_buf[i];
	GUEST_SYNC(got);
}

VK_TEST(pio_rep_string_both_directions)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_pio_rep);
	/* KVM may split a rep string into several exits; collect them all. */
	std::string out;
	Exit e;
	for (;;) {
		e = next_exit(g, v);
		auto &io = expect<IoExit>(e);
		TEST_ASSERT_EQ(io.port, test_port);
		if (io.is_in())
			break;
		for (std::uint32_t i = 0; i < io.count; i++)
			out += char(io.value(i));
	}
	TEST_ASSERT(out == "virtkit!", "rep outsb delivered '%s'", out.c_str());
	std::uint32_t filled = 0;
	for (;;) {
		auto &io = expect<IoExit>(e);
		TEST_ASSERT(io.is_in());
		for (std::uint32_t i = 0; i < io.count; i++, filled++)
			io.set(0x40 + filled, i);
		if (filled >= 8)
			break;
		e = next_exit(g, v);
	}
	TEST_ASSERT_EQ(filled, 8);
	Ucall uc = g.run(v);
	TEST_ASSERT_EQ(uc.args[0], 0x4746454443424140ull);
	g.run_to_done(v);
}

static void guest_mmio_write(std::uint64_t gva)
{
	*(volatile std::uint8_t *)gva = 0x11;
	*(volatile std::uint16_t *)(gva + 2) = 0x2233;
	*(volatile std::uint32_t *)(gva + 4) = 0x44556677;
	*(volatile std::uint64_t *)(gva + 8) = 0x8899aabbccddeeffull;
}

VK_TEST(mmio_write_sizes)
{
	GuestVm g(vkt::kvm());
	g.identity_map(mmio_gpa, 4096);
	Vcpu &v = g.add_vcpu(guest_mmio_write, mmio_gpa);
	const struct {
		std::uint64_t off, len, val;
	} want[] = {{0, 1, 0x11}, {2, 2, 0x2233}, {4, 4, 0x44556677},
		    {8, 8, 0x8899aabbccddeeffull}};
	for (auto &w : want) {
		Exit e = next_exit(g, v);
		auto &m = expect<MmioExit>(e);
		TEST_ASSERT(m.is_write());
		TEST_ASSERT_EQ(m.gpa, mmio_gpa + w.off);
		TEST_ASSERT_EQ(m.data.size(), w.len);
		TEST_ASSERT_EQ(m.value(), w.val);
	}
	g.run_to_done(v);
}

static void guest_mmio_read(std::uint64_t gva)
{
	std::uint32_t a = *(volatile std::uint32_t *)gva;
	std::uint64_t b = *(volatile std::uint64_t *)(gva + 0x18);
	GUEST_SYNC(a, b);
}

VK_TEST(mmio_read_completed_by_host)
{
	GuestVm g(vkt::kvm());
	g.identity_map(mmio_gpa, 4096);
	Vcpu &v = g.add_vcpu(guest_mmio_read, mmio_gpa);
	Exit e = next_exit(g, v);
	auto &r4 = expect<MmioExit>(e);
	TEST_ASSERT(r4.is_read());
	TEST_ASSERT_EQ(r4.gpa, mmio_gpa);
	TEST_ASSERT_EQ(r4.data.size(), 4);
	r4.set(0xcafe1234);
	e = next_exit(g, v);
	auto &r8 = expect<MmioExit>(e);
	TEST_ASSERT_EQ(r8.gpa, mmio_gpa + 0x18);
	TEST_ASSERT_EQ(r8.data.size(), 8);
	r8.set(0x0123456789abcdefull);
	Ucall uc = g.run(v);
	TEST_ASSERT_EQ(uc.args[0], 0xcafe1234);
	TEST_ASSERT_EQ(uc.args[1], 0x0123456789abcdefull);
	g.run_to_done(v);
}

static void guest_hlt(void)
{
	guest_halt();
	GUEST_SYNC(1);
}

VK_TEST(hlt_exit)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_hlt);
	Exit e = next_exit(g, v);
	expect<HltExit>(e);
	TEST_ASSERT_EQ(g.run(v).args[0], 1);
	g.run_to_done(v);
}

/* An MSR index no hardware or KVM implements. */
static constexpr std::uint32_t fake_msr = 0x4000dead;

static void guest_msr(void)
{
	GUEST_SYNC(guest_rdmsr(fake_msr));
	guest_wrmsr(fake_msr, 0x1122334455667788ull);
	struct virtkit_exception ex = {};
	auto rd = [](void *) { (void)guest_rdmsr(fake_msr); };
	GUEST_ASSERT_EQ(guest_catch(rd, 0, &ex), GP_VECTOR + 1);
	GUEST_ASSERT_EQ(ex.error_code, 0);
}

VK_TEST(msr_exits_to_user_space)
{
	TEST_REQUIRE(vkt::kvm().has(KVM_CAP_X86_USER_SPACE_MSR), "KVM_CAP_X86_USER_SPACE_MSR");
	GuestVm g(vkt::kvm());
	g.vm().enable_cap(KVM_CAP_X86_USER_SPACE_MSR, {KVM_MSR_EXIT_REASON_UNKNOWN});
	Vcpu &v = g.add_vcpu(guest_msr);

	Exit e = next_exit(g, v);
	auto &rd = expect<MsrExit>(e);
	TEST_ASSERT(rd.is_read());
	TEST_ASSERT_EQ(rd.index, fake_msr);
	TEST_ASSERT_EQ(rd.reason, KVM_MSR_EXIT_REASON_UNKNOWN);
	rd.set(0xabcdef0123456789ull);
	TEST_ASSERT_EQ(g.run(v).args[0], 0xabcdef0123456789ull);

	e = next_exit(g, v);
	auto &wr = expect<MsrExit>(e);
	TEST_ASSERT(wr.is_write());
	TEST_ASSERT_EQ(wr.index, fake_msr);
	TEST_ASSERT_EQ(wr.value(), 0x1122334455667788ull);

	/* A failed RDMSR raises #GP in the guest. */
	e = next_exit(g, v);
	expect<MsrExit>(e).fail();
	g.run_to_done(v);
}

static void guest_many_outs(std::uint64_t n)
{
	for (std::uint64_t i = 0; i < n; i++)
		guest_outl(test_port, (std::uint32_t)i);
	GUEST_SYNC(n);
}

VK_TEST(exit_handlers_consume_in_priority_order)
{
	GuestVm g(vkt::kvm());
	std::vector<int> order;
	std::uint64_t consumed = 0, next_value = 0;
	bool values_in_order = true;
	/* Registered first but with a later priority: sees only what passes. */
	auto late = g.vm().add_exit_handler(
		[&](Vcpu &, Exit &) {
			order.push_back(2);
			return ExitAction::pass;
		},
		10);
	auto early = g.vm().add_exit_handler(
		[&](Vcpu &, Exit &e) {
			order.push_back(1);
			auto *io = std::get_if<IoExit>(&e);
			if (!io || io->port != test_port)
				return ExitAction::pass;
			values_in_order &= io->value() == next_value++;
			consumed++;
			return ExitAction::resume;
		},
		-10);
	Vcpu &v = g.add_vcpu(guest_many_outs, 20);
	Ucall uc = g.run(v);
	TEST_ASSERT_EQ(uc.args[0], 20);
	TEST_ASSERT_EQ(consumed, 20);
	TEST_ASSERT(values_in_order);
	/* 20 consumed port writes (1 only), then the ucall seen by 1 and 2. */
	TEST_ASSERT_EQ(order.size(), 22);
	for (int i = 0; i < 20; i++)
		TEST_ASSERT_EQ(order[i], 1);
	TEST_ASSERT_EQ(order[20], 1);
	TEST_ASSERT_EQ(order[21], 2);

	/* Unregistered: the caller sees the exits again. */
	early.reset();
	g.set_entry(v, guest_many_outs, 1);
	Exit e = next_exit(g, v);
	TEST_ASSERT_EQ(expect<IoExit>(e).port, test_port);
	TEST_ASSERT_EQ(consumed, 20);
	TEST_ASSERT_EQ(g.run(v).args[0], 1);
}

static void guest_triple_fault(void)
{
	/* No IDT: the #UD cannot be delivered, nor the #DF: a triple fault. */
	struct {
		std::uint16_t limit;
		std::uint64_t base;
	} __attribute__((packed)) no_idt = {0, 0};
	__asm__ volatile("lidt %0; ud2" ::"m"(no_idt));
}

VK_TEST(shutdown_on_triple_fault)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_triple_fault);
	Exit e = v.run();
	TEST_ASSERT(std::holds_alternative<ShutdownExit>(e), "got %s", describe(e).c_str());
}

/*
 * KVM UAPI of Linux 6.8 (private memory), absent from older headers. Values
 * are ABI.
 */
static constexpr long cap_memory_fault_info = 232;	/* KVM_CAP_MEMORY_FAULT_INFO */
static constexpr long cap_memory_attributes = 233;	/* KVM_CAP_MEMORY_ATTRIBUTES */
static constexpr long cap_vm_types = 235;		/* KVM_CAP_VM_TYPES */
static constexpr unsigned long sw_protected_vm = 1;	/* KVM_X86_SW_PROTECTED_VM */
static constexpr std::uint64_t attribute_private = 1ull << 3; /* KVM_MEMORY_ATTRIBUTE_PRIVATE */
static constexpr std::uint64_t memory_exit_flag_private = 1ull << 3; /* KVM_MEMORY_EXIT_FLAG_PRIVATE */
struct memory_attributes {
	std::uint64_t address, size, attributes, flags;
};
#define SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct memory_attributes)

static void set_private(Vm &vm, std::uint64_t gpa, std::uint64_t size, bool priv)
{
	memory_attributes a{gpa, size, priv ? attribute_private : 0, 0};
	TEST_ASSERT(ioctl(vm.fd(), SET_MEMORY_ATTRIBUTES, &a) == 0,
		    "KVM_SET_MEMORY_ATTRIBUTES: %s", strerror(errno));
}

/* A page of guest RAM that the guest reads. */
static constexpr std::uint64_t fault_gpa = 0xc0000000;

static void guest_read_page(std::uint64_t gva)
{
	GUEST_SYNC(*(volatile std::uint64_t *)gva);
}

/*
 * KVM reports KVM_EXIT_MEMORY_FAULT by failing KVM_RUN with EFAULT; run()
 * returns it as MemoryFaultExit instead of throwing. The way to provoke one
 * from user space is private memory (Linux 6.8+): a guest access to a page
 * marked private whose memslot has no guest_memfd, as the kernel's
 * private_mem_kvm_exits_test does. That needs a KVM_X86_SW_PROTECTED_VM
 * (TDP only: not on shadow paging).
 */
VK_TEST(memory_fault_exit_from_private_page)
{
	TEST_REQUIRE(vkt::kvm().has(cap_memory_fault_info), "KVM_CAP_MEMORY_FAULT_INFO");
	const int types = vkt::kvm().check_extension(cap_vm_types);
	TEST_REQUIRE(types > 0 && (types & (1 << sw_protected_vm)),
		     "KVM_X86_SW_PROTECTED_VM in KVM_CAP_VM_TYPES (it is " +
			     std::to_string(types) + ")");
	GuestVm g(vkt::kvm(), {.vm = {.type = sw_protected_vm}});
	const int attrs = g.vm().check_extension(cap_memory_attributes);
	TEST_REQUIRE(attrs > 0 && (attrs & attribute_private),
		     "KVM_MEMORY_ATTRIBUTE_PRIVATE in KVM_CAP_MEMORY_ATTRIBUTES (it is " +
			     std::to_string(attrs) + ")");

	g.vm().memory().add(fault_gpa, 4096, {.name = "private"});
	g.vm().memory().write_obj<std::uint64_t>(fault_gpa, 0x5eedf00d);
	g.identity_map(fault_gpa, 4096);
	set_private(g.vm(), fault_gpa, 4096, true);
	Vcpu &v = g.add_vcpu(guest_read_page, fault_gpa);

	Exit e = next_exit(g, v);
	auto &mf = expect<MemoryFaultExit>(e);
	TEST_ASSERT_EQ(mf.gpa, fault_gpa);
	TEST_ASSERT_EQ(mf.size, 4096u);
	TEST_ASSERT_EQ(mf.flags, memory_exit_flag_private);
	TEST_ASSERT(describe(e).find("MEMORY_FAULT gpa=0xc0000000") == 0, "%s",
		    describe(e).c_str());

	/* The VMM converts the page back to shared; the access completes. */
	set_private(g.vm(), fault_gpa, 4096, false);
	TEST_ASSERT_EQ(g.run(v).args[0], 0x5eedf00d);
	g.run_to_done(v);
}

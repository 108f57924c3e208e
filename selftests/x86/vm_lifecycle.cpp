// SPDX-License-Identifier: MIT
/*
 * VM and vCPU lifecycle on real KVM: the system handle, creating and
 * destroying VMs and vCPUs in any order without leaking descriptors or
 * mappings, moving handles, and a raw real-mode guest built without the
 * guest environment.
 */
#include "test.hpp"

#include <optional>
#include <utility>
#include <vector>

using namespace virtkit;

VK_TEST(system_reports_api_and_cpuid)
{
	System &sys = vkt::kvm();
	TEST_ASSERT_EQ(sys.api_version(), KVM_API_VERSION);
	TEST_ASSERT(sys.vcpu_mmap_size() >= sizeof(kvm_run));
	TEST_ASSERT(sys.has(KVM_CAP_USER_MEMORY));
	TEST_ASSERT_EQ(sys.check_extension(0x7fffffff), 0);
	auto cpuid = sys.supported_cpuid();
	bool leaf0 = false, long_mode = false;
	for (auto &e : cpuid) {
		leaf0 |= e.function == 0 && e.eax >= 1;
		long_mode |= e.function == 0x80000001 && (e.edx >> 29 & 1);
	}
	TEST_ASSERT(leaf0 && long_mode, "supported CPUID lacks leaf 0 or long mode");
	auto msrs = sys.msr_index_list();
	TEST_ASSERT(!msrs.empty());
	bool star = false;
	for (auto m : msrs)
		star |= m == 0xc0000081;
	TEST_ASSERT(star, "MSR_STAR is not in KVM_GET_MSR_INDEX_LIST");
}

VK_TEST(create_and_destroy_leaks_nothing)
{
	vkt::kvm();
	const int fds = vkt::open_fd_count(), maps = vkt::mapping_count();
	for (int round = 0; round < 3; round++) {
		Vm vm = vkt::kvm().create_vm();
		vm.memory().add(0, 1 << 20);
		vm.memory().add(1 << 20, 1 << 20, {.readonly = true});
		std::vector<Vcpu> vcpus;
		for (std::uint32_t i = 0; i < 4; i++)
			vcpus.push_back(vm.create_vcpu(i));
		TEST_ASSERT(vkt::open_fd_count() > fds);
		TEST_ASSERT(!vm.is_dead());
	}
	TEST_ASSERT_EQ(vkt::open_fd_count(), fds);
	TEST_ASSERT_EQ(vkt::mapping_count(), maps);
}

VK_TEST(vcpu_outlives_vm_handle)
{
	vkt::kvm();
	const int fds = vkt::open_fd_count();
	std::optional<Vcpu> vcpu;
	{
		Vm vm = vkt::kvm().create_vm();
		vm.memory().add(0x10000, 0x10000);
		vcpu.emplace(vm.create_vcpu(0));
	}
	/* The VM lives on through the vCPU, memory included. */
	vcpu->memory().write_obj<std::uint32_t>(0x10000, 0x1234);
	TEST_ASSERT_EQ(vcpu->memory().read_obj<std::uint32_t>(0x10000), 0x1234);
	TEST_ASSERT_EQ(vcpu->regs().rip, 0xfff0);
	vcpu.reset();
	TEST_ASSERT_EQ(vkt::open_fd_count(), fds);
}

VK_TEST(handles_move)
{
	Vm a = vkt::kvm().create_vm();
	int fd = a.fd();
	Vm b = std::move(a);
	TEST_ASSERT_EQ(b.fd(), fd);
	Vcpu v = b.create_vcpu(3);
	int vfd = v.fd();
	Vcpu w = std::move(v);
	TEST_ASSERT_EQ(w.fd(), vfd);
	TEST_ASSERT_EQ(w.id(), 3);
	std::vector<Vcpu> many;
	many.push_back(std::move(w));
	many.push_back(b.create_vcpu(4));
	TEST_ASSERT_EQ(many[0].fd(), vfd);

	FileDesc f = FileDesc::eventfd(0);
	int raw = f.get();
	FileDesc g = std::move(f);
	TEST_ASSERT(!f);
	TEST_ASSERT_EQ(g.get(), raw);
	g.close();
	TEST_ASSERT(!g);
}

/*
 * 16-bit real-mode code at 0x1000: out %al, $0x10 (al = 0x42); add 1 to the
 * word at 0x2000; hlt. No page tables, no GDT: the smallest real guest.
 */
static const std::uint8_t real_mode_code[] = {
	0xb0, 0x42,		/* mov $0x42, %al */
	0xe6, 0x10,		/* out %al, $0x10 */
	0xff, 0x06, 0x00, 0x20, /* incw 0x2000 */
	0xf4,			/* hlt */
};

VK_TEST(raw_real_mode_guest)
{
	Vm vm = vkt::kvm().create_vm();
	vm.memory().add(0, 0x10000);
	vm.memory().write(0x1000, std::as_bytes(std::span(real_mode_code)));
	vm.memory().write_obj<std::uint16_t>(0x2000, 41);
	Vcpu v = vm.create_vcpu(0);
	kvm_sregs s = v.sregs();
	s.cs.base = 0;
	s.cs.selector = 0;
	v.set_sregs(s);
	kvm_regs r{};
	r.rip = 0x1000;
	r.rflags = 2;
	v.set_regs(r);

	Exit e = v.run();
	auto *io = std::get_if<IoExit>(&e);
	TEST_ASSERT(io, "got %s", describe(e).c_str());
	TEST_ASSERT(io->is_out());
	TEST_ASSERT_EQ(io->port, 0x10);
	TEST_ASSERT_EQ(io->value(), 0x42);
	e = v.run();
	TEST_ASSERT(std::holds_alternative<HltExit>(e), "got %s", describe(e).c_str());
	TEST_ASSERT_EQ(vm.memory().read_obj<std::uint16_t>(0x2000), 42);
	TEST_ASSERT_EQ(v.regs().rip, 0x1000 + sizeof(real_mode_code));
}

VK_TEST(register_state_round_trips)
{
	Vm vm = vkt::kvm().create_vm();
	Vcpu v = vm.create_vcpu(0);
	v.set_cpuid(vkt::kvm().supported_cpuid());
	TEST_ASSERT(!v.cpuid().empty());

	kvm_regs r = v.regs();
	r.rax = 0x1111;
	r.r15 = 0xf0f0f0f0f0f0f0f0ull;
	v.set_regs(r);
	TEST_ASSERT_EQ(v.regs().r15, 0xf0f0f0f0f0f0f0f0ull);

	kvm_sregs s = v.sregs();
	s.cr2 = 0xabc000;
	v.set_sregs(s);
	TEST_ASSERT_EQ(v.sregs().cr2, 0xabc000);

	/* The SYSENTER MSRs: plain MSRs every x86 KVM handles. */
	v.set_msr(0x175, 0x12345000);
	TEST_ASSERT_EQ(v.msr(0x175), 0x12345000);
	kvm_msr_entry e[2] = {{.index = 0x174, .reserved = 0, .data = 0x10},
			      {.index = 0x176, .reserved = 0, .data = 0xfeed}};
	v.set_msrs(e);
	e[0].data = e[1].data = 0;
	v.get_msrs(e);
	TEST_ASSERT_EQ(e[0].data, 0x10);
	TEST_ASSERT_EQ(e[1].data, 0xfeed);

	kvm_debugregs d = v.debugregs();
	d.db[0] = 0x4000;
	v.set_debugregs(d);
	TEST_ASSERT_EQ(v.debugregs().db[0], 0x4000);

	kvm_vcpu_events ev = v.events();
	v.set_events(ev);

	kvm_fpu f = v.fpu();
	f.fcw = 0x37e;
	v.set_fpu(f);
	TEST_ASSERT_EQ(v.fpu().fcw, 0x37e);

	Xsave x = v.xsave();
	TEST_ASSERT(x.region.size() * 4 >= 4096);
	v.set_xsave(x);

	kvm_translation t = v.translate(0x1000);
	TEST_ASSERT_EQ(t.physical_address, 0x1000); /* paging off: identity */
	TEST_ASSERT(t.valid);
}

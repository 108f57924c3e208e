// SPDX-License-Identifier: MIT
/*
 * Bad arguments to the public calls: each fails with the right errno and a
 * message naming the operation, and changes nothing - no descriptor or
 * mapping leaked, no memory layout, register state or allocation changed.
 */
#include "test.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <virtkit/x86/guest_vm.hpp>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t KiB = 1ull << 10;
static constexpr std::uint64_t MiB = 1ull << 20;
static constexpr std::uint64_t GiB = 1ull << 30;
static constexpr std::uint64_t FREE_GVA = 0x500000000000ull; /* unused by GuestVm */

/*
 * Run a block of failing calls and check that it leaked no descriptor and no
 * mapping. /dev/kvm is opened first so its descriptor is not counted.
 */
template <class F> static void no_leaks(const char *what, F &&block)
{
	vkt::kvm();
	int fds = vkt::open_fd_count(), maps = vkt::mapping_count();
	auto lines = vkt::mappings();
	block();
	int fds2 = vkt::open_fd_count(), maps2 = vkt::mapping_count();
	TEST_ASSERT(fds2 == fds, "%s: %d descriptors open before, %d after", what, fds, fds2);
	if (maps2 != maps) {
		auto now = vkt::mappings();
		for (auto &l : lines)
			if (std::find(now.begin(), now.end(), l) == now.end())
				vkt::diag("before only: %s", l.c_str());
		for (auto &l : now)
			if (std::find(lines.begin(), lines.end(), l) == lines.end())
				vkt::diag("after only:  %s", l.c_str());
	}
	TEST_ASSERT(maps2 == maps, "%s: %d mappings before, %d after", what, maps, maps2);
}

/* expr throws Error(err) whose message contains `name`. */
#define EXPECT_ERROR_NAMING(expr, err, name)                                   \
	do {                                                                   \
		std::string m_ = TEST_EXPECT_ERROR(expr, err);                 \
		TEST_ASSERT(m_.find(name) != std::string::npos,                \
			    "\"%s\" does not name %s", m_.c_str(), name);      \
	} while (0)

/* ---- System ---- */

VK_TEST(system_open_nonexistent)
{
	no_leaks("System::open", [] {
		std::string m = TEST_EXPECT_ERROR(System::open("/nonexistent/kvm"), ENOENT);
		TEST_ASSERT(m.find("open") != std::string::npos, "%s", m.c_str());
		TEST_ASSERT(m.find("/nonexistent/kvm") != std::string::npos, "%s", m.c_str());
		/* Not a KVM device: KVM_GET_API_VERSION is refused. */
		EXPECT_ERROR_NAMING(System::open("/dev/null"), ENOTTY, "KVM_GET_API_VERSION");
	});
}

VK_TEST(create_vm_bad_dirty_ring)
{
	System &kvm = vkt::kvm();
	int max = kvm.check_extension(KVM_CAP_DIRTY_LOG_RING);
	no_leaks("create_vm(dirty_ring_bytes)", [&] {
		const std::uint32_t bad[] = {4096 + 4096 / 2, 12345, 2048, 64, 1};
		for (std::uint32_t b : bad) {
			VmOptions o{.dirty_ring_bytes = b};
			if (max > 0)
				EXPECT_ERROR_NAMING(kvm.create_vm(o), EINVAL, "System::create_vm");
			else
				EXPECT_ERROR_NAMING(kvm.create_vm(o), ENOTSUP, "KVM_CAP_DIRTY_LOG_RING");
		}
		if (max > 0 && max < (1 << 30)) {
			/* A power of two beyond what KVM offers. */
			VmOptions o{.dirty_ring_bytes = static_cast<std::uint32_t>(max) * 2};
			EXPECT_ERROR_NAMING(kvm.create_vm(o), EINVAL, "System::create_vm");
		}
	});
}

VK_TEST(create_vm_bad_type)
{
	no_leaks("create_vm(type)", [] {
		EXPECT_ERROR_NAMING(vkt::kvm().create_vm({.type = 0x7f}), EINVAL, "KVM_CREATE_VM");
		EXPECT_ERROR_NAMING(vkt::kvm().create_vm({.type = ~0ul}), EINVAL, "KVM_CREATE_VM");
	});
	/* The system is still usable. */
	Vm vm = vkt::kvm().create_vm();
	TEST_ASSERT(vm.fd() >= 0);
}

/* ---- Vm ---- */

VK_TEST(create_vcpu_bad_id)
{
	Vm vm = vkt::kvm().create_vm();
	Vcpu v0 = vm.create_vcpu(0);
	int max_id = vkt::kvm().check_extension(KVM_CAP_MAX_VCPU_ID);
	if (max_id <= 0)
		max_id = vkt::kvm().check_extension(KVM_CAP_MAX_VCPUS);
	TEST_ASSERT(max_id > 1, "KVM_CAP_MAX_VCPU_ID = %d", max_id);
	no_leaks("create_vcpu", [&] {
		EXPECT_ERROR_NAMING(vm.create_vcpu(0), EEXIST, "KVM_CREATE_VCPU");
		EXPECT_ERROR_NAMING(vm.create_vcpu(static_cast<std::uint32_t>(max_id)), EINVAL,
				    "KVM_CREATE_VCPU");
		EXPECT_ERROR_NAMING(vm.create_vcpu(~0u), EINVAL, "KVM_CREATE_VCPU");
	});
	/* The id that failed as a duplicate stays taken; others still work. */
	Vcpu v1 = vm.create_vcpu(1);
	TEST_ASSERT_EQ(v1.id(), 1u);
	Vcpu vmax = vm.create_vcpu(static_cast<std::uint32_t>(max_id - 1));
	TEST_ASSERT_EQ(vmax.id(), static_cast<std::uint32_t>(max_id - 1));
}

VK_TEST(vm_enable_cap_and_handler)
{
	Vm vm = vkt::kvm().create_vm();
	no_leaks("enable_cap / add_exit_handler", [&] {
		EXPECT_ERROR_NAMING(vm.enable_cap(0xfffff), EINVAL, "KVM_ENABLE_CAP");
		/* Unknown capabilities are absent, not an error. */
		TEST_ASSERT_EQ(vm.check_extension(0xfffff), 0);
		EXPECT_ERROR_NAMING(vm.add_exit_handler(ExitHandler{}), EINVAL,
				    "Vm::add_exit_handler");
	});
}

VK_TEST(dirty_ring_absent)
{
	Vm vm = vkt::kvm().create_vm();
	Vcpu v = vm.create_vcpu(0);
	TEST_ASSERT_EQ(vm.dirty_ring_bytes(), 0u);
	no_leaks("dirty ring", [&] {
		EXPECT_ERROR_NAMING(v.harvest_dirty_ring(), EINVAL, "Vcpu::harvest_dirty_ring");
		EXPECT_ERROR_NAMING(vm.reset_dirty_rings(), EINVAL, "KVM_RESET_DIRTY_RINGS");
	});
}

/* ---- GuestMemory ---- */

VK_TEST(memory_add_invalid)
{
	Vm vm = vkt::kvm().create_vm();
	GuestMemory &mem = vm.memory();
	RegionId id = mem.add(GiB, 64 * KiB, {.name = "base"});
	auto before = mem.regions();
	std::size_t slots = mem.slot_count();

	no_leaks("GuestMemory::add", [&] {
		struct {
			std::uint64_t gpa, size;
			RegionOptions o;
			int err;
		} cases[] = {
			{2 * GiB, 0, {}, EINVAL},			  /* empty */
			{2 * GiB + 1, 4096, {}, EINVAL},		  /* unaligned gpa */
			{2 * GiB + 2048, 4096, {}, EINVAL},		  /* unaligned gpa */
			{2 * GiB, 4097, {}, EINVAL},			  /* unaligned size */
			{2 * GiB, 100, {}, EINVAL},			  /* unaligned size */
			{~0ull - 4095, 8192, {}, EINVAL},		  /* wraps */
			{2 * GiB, 4096, {.readonly = true, .dirty_log = true}, EINVAL},
			{GiB, 64 * KiB, {}, EEXIST},			  /* same range */
			{GiB - 4096, 8192, {}, EEXIST},		  /* first page */
			{GiB + 60 * KiB, 8192, {}, EEXIST},		  /* last page */
			{0, 4 * GiB, {}, EEXIST},			  /* around it */
		};
		for (auto &c : cases) {
			EXPECT_ERROR_NAMING(mem.add(c.gpa, c.size, c.o), c.err, "GuestMemory::add");
			TEST_ASSERT(vkt::same_layout(mem.regions(), before));
			TEST_ASSERT_EQ(mem.slot_count(), slots);
		}
	});
	/* Failed adds left no slot in use: the next add takes exactly one. */
	RegionId next = mem.add(2 * GiB, 4096);
	TEST_ASSERT(next != id);
	TEST_ASSERT_EQ(mem.slot_count(), slots + 1);
}

VK_TEST(memory_add_name_too_long)
{
	Vm vm = vkt::kvm().create_vm();
	GuestMemory &mem = vm.memory();
	/* The longest name works (it names the memfd "virtkit-<name>"). */
	std::string longest(RegionOptions::max_name, 'n');
	RegionId id = mem.add(GiB, 4096, {.name = longest});
	TEST_ASSERT(mem.info(id).options.name == longest);
	auto before = mem.regions();
	std::size_t slots = mem.slot_count();
	no_leaks("GuestMemory::add with a long name", [&] {
		for (std::size_t len : {RegionOptions::max_name + 1, std::size_t(300), std::size_t(5000)}) {
			std::string name(len, 'x');
			std::string m = TEST_EXPECT_ERROR(mem.add(2 * GiB, 4096, {.name = name}), EINVAL);
			TEST_ASSERT(m.find("GuestMemory::add") != std::string::npos, "%s", m.c_str());
			TEST_ASSERT(m.find(std::to_string(len) + " bytes") != std::string::npos,
				    "\"%s\" does not give the length %zu", m.c_str(), len);
			TEST_ASSERT(m.find(std::to_string(RegionOptions::max_name)) != std::string::npos,
				    "\"%s\" does not give the limit", m.c_str());
			/* A short prefix of the name at most, never all of it. */
			TEST_ASSERT(m.find(std::string(64, 'x')) == std::string::npos,
				    "\"%s\" quotes the name", m.c_str());
			TEST_ASSERT(vkt::same_layout(mem.regions(), before));
			TEST_ASSERT_EQ(mem.slot_count(), slots);
		}
	});
}

VK_TEST(memory_add_fails_late)
{
	/*
	 * Arguments the library accepts but a later step refuses: the memfd
	 * and the mapping made for the region must not leak.
	 */
	Vm vm = vkt::kvm().create_vm();
	GuestMemory &mem = vm.memory();
	mem.add(GiB, 64 * KiB);
	auto before = mem.regions();
	std::size_t slots = mem.slot_count();
	no_leaks("GuestMemory::add (late failure)", [&] {
		/* Beyond any guest physical address: KVM refuses the memslot. */
		EXPECT_ERROR_NAMING(mem.add(1ull << 60, 4096), EINVAL, "KVM_SET_USER_MEMORY_REGION");
		EXPECT_ERROR_NAMING(mem.add(~0ull - 4095, 4096), EINVAL,
				    "KVM_SET_USER_MEMORY_REGION");
		/* Larger than the address space: mmap fails after memfd_create. */
		EXPECT_ERROR_NAMING(mem.add(4 * GiB, 1ull << 50), ENOMEM, "mmap");
		/* Up to 2^64 - 1 does not wrap, but no memfd is 2^63 bytes long. */
		EXPECT_ERROR_NAMING(mem.add(1ull << 63, 1ull << 63), EINVAL, "ftruncate");
		TEST_ASSERT(vkt::same_layout(mem.regions(), before));
		TEST_ASSERT_EQ(mem.slot_count(), slots);
	});
	/* The slot ids given back are reused: still one slot per region. */
	mem.add(2 * GiB, 4096);
	TEST_ASSERT_EQ(mem.slot_count(), slots + 1);
}

VK_TEST(memory_unknown_region)
{
	Vm vm = vkt::kvm().create_vm();
	GuestMemory &mem = vm.memory();
	RegionId id = mem.add(GiB, 16 * KiB, {.dirty_log = true});
	RegionId gone = mem.add(2 * GiB, 4096);
	mem.remove(gone);
	auto before = mem.regions();
	std::size_t slots = mem.slot_count();
	no_leaks("unknown RegionId", [&] {
		for (RegionId bad : {gone, id + 100, RegionId(0), ~RegionId(0)}) {
			EXPECT_ERROR_NAMING(mem.move(bad, 3 * GiB), ENOENT, "GuestMemory::move");
			EXPECT_ERROR_NAMING(mem.remove(bad), ENOENT, "GuestMemory::remove");
			EXPECT_ERROR_NAMING(mem.info(bad), ENOENT, "GuestMemory::info");
			EXPECT_ERROR_NAMING(mem.set_dirty_log(bad, true), ENOENT,
					    "GuestMemory::set_dirty_log");
			EXPECT_ERROR_NAMING(mem.set_dirty_log(bad, false), ENOENT,
					    "GuestMemory::set_dirty_log");
			EXPECT_ERROR_NAMING(mem.dirty_log(bad), ENOENT, "GuestMemory::dirty_log");
		}
		TEST_ASSERT(vkt::same_layout(mem.regions(), before));
		TEST_ASSERT_EQ(mem.slot_count(), slots);
	});
}

VK_TEST(memory_move_invalid)
{
	Vm vm = vkt::kvm().create_vm();
	GuestMemory &mem = vm.memory();
	RegionId id = mem.add(GiB, 16 * KiB, {.name = "a"});
	mem.add(GiB + MiB, 16 * KiB, {.name = "b"});
	mem.write_obj<std::uint64_t>(GiB + 8, 0xabcdef);
	auto before = mem.regions();
	std::size_t slots = mem.slot_count();
	no_leaks("GuestMemory::move", [&] {
		EXPECT_ERROR_NAMING(mem.move(id, 2 * GiB + 1), EINVAL, "GuestMemory::move");
		EXPECT_ERROR_NAMING(mem.move(id, 2 * GiB + 2048), EINVAL, "GuestMemory::move");
		EXPECT_ERROR_NAMING(mem.move(id, ~0ull - 4095), EINVAL, "GuestMemory::move");
		EXPECT_ERROR_NAMING(mem.move(id, GiB + MiB + 4096), EEXIST, "GuestMemory::move");
		EXPECT_ERROR_NAMING(mem.move(id, GiB + MiB - 4096), EEXIST, "GuestMemory::move");
		TEST_ASSERT(vkt::same_layout(mem.regions(), before));
		TEST_ASSERT_EQ(mem.slot_count(), slots);
		/*
		 * Accepted by the library, refused by KVM: the region goes back
		 * to where it was, with its contents.
		 */
		EXPECT_ERROR_NAMING(mem.move(id, 1ull << 60), EINVAL, "KVM_SET_USER_MEMORY_REGION");
		TEST_ASSERT(vkt::same_layout(mem.regions(), before));
		TEST_ASSERT_EQ(mem.slot_count(), slots);
	});
	TEST_ASSERT_EQ(mem.region_at(GiB).id, id);
	TEST_ASSERT_EQ(mem.read_obj<std::uint64_t>(GiB + 8), 0xabcdefu);
	/* And it still moves. */
	mem.move(id, 2 * GiB);
	TEST_ASSERT_EQ(mem.read_obj<std::uint64_t>(2 * GiB + 8), 0xabcdefu);
}

VK_TEST(memory_dirty_log_misuse)
{
	Vm vm = vkt::kvm().create_vm();
	GuestMemory &mem = vm.memory();
	RegionId plain = mem.add(GiB, 16 * KiB);
	RegionId rom = mem.add(2 * GiB, 16 * KiB, {.readonly = true});
	auto before = mem.regions();
	no_leaks("dirty log", [&] {
		EXPECT_ERROR_NAMING(mem.dirty_log(plain), EINVAL, "GuestMemory::dirty_log");
		EXPECT_ERROR_NAMING(mem.dirty_log(rom), EINVAL, "GuestMemory::dirty_log");
		EXPECT_ERROR_NAMING(mem.set_dirty_log(rom, true), EINVAL,
				    "GuestMemory::set_dirty_log");
		TEST_ASSERT(vkt::same_layout(mem.regions(), before));
	});
	/* Turning it off where it is off is a no-op, not an error. */
	mem.set_dirty_log(plain, false);
	mem.set_dirty_log(rom, false);
	TEST_ASSERT(vkt::same_layout(mem.regions(), before));
}

VK_TEST(memory_dirty_log_with_ring)
{
	int max = vkt::kvm().check_extension(KVM_CAP_DIRTY_LOG_RING);
	TEST_REQUIRE(max >= 4096, "KVM_CAP_DIRTY_LOG_RING");
	Vm vm = vkt::kvm().create_vm({.dirty_ring_bytes = 4096});
	RegionId id = vm.memory().add(GiB, 16 * KiB, {.dirty_log = true});
	no_leaks("dirty_log with a ring", [&] {
		EXPECT_ERROR_NAMING(vm.memory().dirty_log(id), EINVAL, "GuestMemory::dirty_log");
	});
}

VK_TEST(memory_access_out_of_bounds)
{
	Vm vm = vkt::kvm().create_vm();
	GuestMemory &mem = vm.memory();
	const std::uint64_t a = GiB, size = 16 * KiB, far = 2 * GiB;
	RegionId ra = mem.add(a, size);
	RegionId rf = mem.add(far, size); /* gap between a and far */
	(void)rf;
	std::byte *ha = mem.info(ra).host;
	for (std::uint64_t i = 0; i < size; i++)
		ha[i] = std::byte(i * 7 + 1);
	std::vector<std::byte> snapshot(ha, ha + size);

	std::vector<std::byte> buf(64, std::byte(0xee));
	std::vector<std::byte> out(64, std::byte(0x11));
	no_leaks("GuestMemory read/write", [&] {
		/* Nowhere near guest memory. */
		EXPECT_ERROR_NAMING(mem.read(3 * GiB, out), EFAULT, "GuestMemory::read");
		EXPECT_ERROR_NAMING(mem.write(3 * GiB, buf), EFAULT, "GuestMemory::write");
		EXPECT_ERROR_NAMING(mem.read(0, out), EFAULT, "GuestMemory::read");
		/* Wrapping around 2^64. */
		EXPECT_ERROR_NAMING(mem.read(~0ull - 7, out), EFAULT, "GuestMemory::read");
		EXPECT_ERROR_NAMING(mem.write(~0ull - 7, buf), EFAULT, "GuestMemory::write");
		/* Starting inside a, running into the gap: all or nothing. */
		EXPECT_ERROR_NAMING(mem.write(a + size - 32, buf), EFAULT, "GuestMemory::write");
		EXPECT_ERROR_NAMING(mem.read(a + size - 32, out), EFAULT, "GuestMemory::read");
		/* Starting in the gap, running into a. */
		EXPECT_ERROR_NAMING(mem.write(a - 32, buf), EFAULT, "GuestMemory::write");
		EXPECT_ERROR_NAMING(mem.fill(a + size - 8, std::byte(0), 16), EFAULT,
				    "GuestMemory::fill");
		/* copy: valid source, destination past the end, and the reverse. */
		EXPECT_ERROR_NAMING(mem.copy(a + size - 8, a, 16), EFAULT, "GuestMemory::copy");
		EXPECT_ERROR_NAMING(mem.copy(a, a + size - 8, 16), EFAULT, "GuestMemory::copy");
		EXPECT_ERROR_NAMING(mem.read_obj<std::uint64_t>(a + size - 4), EFAULT,
				    "GuestMemory::read");
		EXPECT_ERROR_NAMING(mem.write_obj<std::uint64_t>(a + size - 4, 0), EFAULT,
				    "GuestMemory::write");
	});
	TEST_ASSERT(std::memcmp(ha, snapshot.data(), size) == 0,
		    "a failed write changed the region's bytes");
	for (auto b : out)
		TEST_ASSERT_EQ(std::to_integer<int>(b), 0x11); /* a failed read wrote nothing */

	no_leaks("GuestMemory host_ptr/region_at", [&] {
		EXPECT_ERROR_NAMING(mem.host_ptr(a + size - 8, 16), EFAULT, "GuestMemory::host_ptr");
		EXPECT_ERROR_NAMING(mem.host_ptr(a - 8, 16), EFAULT, "GuestMemory::host_ptr");
		EXPECT_ERROR_NAMING(mem.host_ptr(3 * GiB, 1), EFAULT, "GuestMemory::host_ptr");
		EXPECT_ERROR_NAMING(mem.host_ptr(a, ~0ull), EFAULT, "GuestMemory::host_ptr");
		EXPECT_ERROR_NAMING(mem.region_at(a + size), ENOENT, "GuestMemory::region_at");
		EXPECT_ERROR_NAMING(mem.region_at(a - 1), ENOENT, "GuestMemory::region_at");
		EXPECT_ERROR_NAMING(mem.region_at(~0ull), ENOENT, "GuestMemory::region_at");
		/* The non-throwing lookup: no region is an answer. */
		TEST_ASSERT(!mem.try_region_at(a + size));
		TEST_ASSERT(!mem.try_region_at(a - 1));
		TEST_ASSERT(!mem.try_region_at(~0ull));
		TEST_ASSERT(vkt::same_region(*mem.try_region_at(a), mem.region_at(a)));
		TEST_ASSERT(vkt::same_region(*mem.try_region_at(a + size - 1), mem.region_at(a)));
		TEST_ASSERT(!mem.contains(a + size - 8, 16));
		TEST_ASSERT(!mem.contains(~0ull - 7, 16));
	});
	/* The edges themselves are fine. */
	TEST_ASSERT(mem.host_ptr(a + size - 8, 8) == ha + size - 8);
	mem.write(a + size - 64, buf);
	TEST_ASSERT_EQ(std::to_integer<int>(ha[size - 1]), 0xee);
}

/* ---- Vcpu ---- */

VK_TEST(vcpu_bad_msr)
{
	Vm vm = vkt::kvm().create_vm();
	Vcpu v = vm.create_vcpu(0);
	/* An MSR KVM does handle works: one KVM keeps as written... */
	v.set_msr(0xc0000102 /* IA32_KERNEL_GS_BASE */, 0xffff800012345000ull);
	TEST_ASSERT_EQ(v.msr(0xc0000102), 0xffff800012345000ull);
	/*
	 * ... and the TSC, accepted and readable: what a read gives after a
	 * host write is the KVM's (some take the value, kvm_pvm keeps the
	 * guest TSC near 0, and on a host whose TSC is not stable nested KVM
	 * can read it going backwards).
	 */
	v.set_msr(0x10 /* IA32_TSC */, 1ull << 40);
	(void)v.msr(0x10);
	no_leaks("MSRs", [&] {
		EXPECT_ERROR_NAMING(v.set_msr(0xdeadbeef, 1), EINVAL, "KVM_SET_MSRS");
		EXPECT_ERROR_NAMING(v.msr(0xdeadbeef), EINVAL, "KVM_GET_MSRS");
		std::string m = TEST_EXPECT_ERROR(v.msr(0xdeadbeef), EINVAL);
		TEST_ASSERT(m.find("0xdeadbeef") != std::string::npos, "%s", m.c_str());
		/* All or nothing: the valid entry before the refused one is undone. */
		v.set_msr(0x174 /* SYSENTER_CS */, 0x10);
		kvm_msr_entry e[2] = {{.index = 0x174, .reserved = 0, .data = 0x20},
				      {.index = 0xdeadbeef, .reserved = 0, .data = 1}};
		m = TEST_EXPECT_ERROR(v.set_msrs(e), EINVAL);
		TEST_ASSERT(m.find("nothing was changed") != std::string::npos, "%s", m.c_str());
		TEST_ASSERT_EQ(v.msr(0x174), 0x10);
	});
	/* The non-throwing tier: KVM's refusal is an answer. */
	no_leaks("try_ MSRs", [&] {
		TEST_ASSERT(v.try_msr(0xc0000102) == std::optional(0xffff800012345000ull));
		TEST_ASSERT(!v.try_msr(0xdeadbeef));
		TEST_ASSERT(!v.try_set_msr(0xdeadbeef, 1));
		TEST_ASSERT(v.try_set_msr(0x174, 0x30));
		TEST_ASSERT_EQ(v.msr(0x174), 0x30);
		/* Read in order up to the first refused entry; the rest untouched. */
		kvm_msr_entry e[3] = {{.index = 0x174, .reserved = 0, .data = 1},
				      {.index = 0xdeadbeef, .reserved = 0, .data = 2},
				      {.index = 0xc0000102, .reserved = 0, .data = 3}};
		TEST_ASSERT_EQ(v.try_get_msrs(e), 1u);
		TEST_ASSERT_EQ(e[0].data, 0x30);
		TEST_ASSERT_EQ(e[1].data, 2);
		TEST_ASSERT_EQ(e[2].data, 3);
		TEST_ASSERT_EQ(v.try_get_msrs(std::span(e).first(1)), 1u);
		TEST_ASSERT_EQ(v.try_get_msrs(std::span(e).subspan(1)), 0u);
	});
}

VK_TEST(vcpu_bad_cpuid)
{
	Vm vm = vkt::kvm().create_vm();
	Vcpu v = vm.create_vcpu(0);
	auto supported = vkt::kvm().supported_cpuid();
	v.set_cpuid(supported);
	auto before = v.cpuid();
	no_leaks("KVM_SET_CPUID2", [&] {
		std::vector<kvm_cpuid_entry2> many(300);
		for (std::size_t i = 0; i < many.size(); i++)
			many[i].function = static_cast<std::uint32_t>(0x40000100 + i);
		EXPECT_ERROR_NAMING(v.set_cpuid(many), E2BIG, "KVM_SET_CPUID2");
	});
	auto after = v.cpuid();
	TEST_ASSERT_EQ(after.size(), before.size());
	TEST_ASSERT(std::memcmp(after.data(), before.data(),
				before.size() * sizeof(kvm_cpuid_entry2)) == 0);
}

VK_TEST(vcpu_bad_xsave)
{
	Vm vm = vkt::kvm().create_vm();
	Vcpu v = vm.create_vcpu(0);
	Xsave x = v.xsave();
	TEST_ASSERT(x.region.size() * 4 >= 4096);
	no_leaks("set_xsave", [&] {
		Xsave small;
		small.region.resize(x.region.size() - 1);
		EXPECT_ERROR_NAMING(v.set_xsave(small), EINVAL, "KVM_SET_XSAVE");
		EXPECT_ERROR_NAMING(v.set_xsave(Xsave{}), EINVAL, "KVM_SET_XSAVE");
	});
	v.set_xsave(x);
}

VK_TEST(vcpu_bad_sregs)
{
	Vm vm = vkt::kvm().create_vm();
	Vcpu v = vm.create_vcpu(0);
	const kvm_sregs good = v.sregs();
	no_leaks("KVM_SET_SREGS", [&] {
		kvm_sregs s = good;
		/* EFER.LMA without paging or LME: not in 64-bit mode, yet LMA. */
		s.efer |= 0x400;
		EXPECT_ERROR_NAMING(v.set_sregs(s), EINVAL, "KVM_SET_SREGS");
		/* A 64-bit code segment outside long mode. */
		s = good;
		s.cs.l = 1;
		EXPECT_ERROR_NAMING(v.set_sregs(s), EINVAL, "KVM_SET_SREGS");
		/* CR0.PG without CR0.PE. */
		s = good;
		s.cr0 = (s.cr0 | 0x80000000u) & ~1ull;
		EXPECT_ERROR_NAMING(v.set_sregs(s), EINVAL, "KVM_SET_SREGS");
		/* A reserved CR4 bit. */
		s = good;
		s.cr4 |= 1ull << 63;
		EXPECT_ERROR_NAMING(v.set_sregs(s), EINVAL, "KVM_SET_SREGS");
	});
	kvm_sregs now = v.sregs();
	TEST_ASSERT_EQ(now.cr0, good.cr0);
	TEST_ASSERT_EQ(now.cr4, good.cr4);
	TEST_ASSERT_EQ(now.efer, good.efer);
	TEST_ASSERT_EQ(now.cs.l, good.cs.l);
}

VK_TEST(vcpu_bad_state)
{
	Vm vm = vkt::kvm().create_vm();
	Vcpu v = vm.create_vcpu(0);
	no_leaks("vcpu state", [&] {
		kvm_vcpu_events ev = v.events();
		ev.flags = 0x80000000u;
		EXPECT_ERROR_NAMING(v.set_events(ev), EINVAL, "KVM_SET_VCPU_EVENTS");
		ev = v.events();
		ev.exception.injected = 1;
		ev.exception.nr = 32;
		EXPECT_ERROR_NAMING(v.set_events(ev), EINVAL, "KVM_SET_VCPU_EVENTS");

		kvm_debugregs dr = v.debugregs();
		dr.flags = 1;
		EXPECT_ERROR_NAMING(v.set_debugregs(dr), EINVAL, "KVM_SET_DEBUGREGS");
		dr = v.debugregs();
		dr.dr7 |= 1ull << 40;
		EXPECT_ERROR_NAMING(v.set_debugregs(dr), EINVAL, "KVM_SET_DEBUGREGS");

	});
	TEST_ASSERT_EQ(v.events().exception.injected, 0);
	TEST_ASSERT_EQ(v.debugregs().dr7 >> 32, 0u);
}

static void guest_spin(void) {}

VK_TEST(vcpu_translate_noncanonical)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_spin);
	const std::uint64_t code = reinterpret_cast<std::uint64_t>(&guest_spin);
	kvm_translation t = v.translate(code);
	TEST_ASSERT_EQ(t.valid, 1);
	TEST_ASSERT_EQ(t.physical_address, *g.gva_to_gpa(code));

	/*
	 * Not an error in KVM: KVM_TRANSLATE reports what the 4-level page walk
	 * finds, which indexes bits 47:12 only - so a non-canonical address is
	 * "valid" exactly when its canonical twin is mapped.
	 */
	no_leaks("KVM_TRANSLATE", [&] {
		kvm_translation n = v.translate(0x8000000000000000ull);
		TEST_ASSERT_EQ(n.valid, 0);
		n = v.translate(0x0000800000000000ull | FREE_GVA);
		TEST_ASSERT_EQ(n.valid, 0);
		kvm_translation alias = v.translate(code | 0x8000000000000000ull);
		TEST_ASSERT_EQ(alias.valid, 1);
		TEST_ASSERT_EQ(alias.physical_address, t.physical_address);
	});
}

/* ---- GuestVm ---- */

VK_TEST(guestvm_bad_options)
{
	no_leaks("GuestVm options", [] {
		EXPECT_ERROR_NAMING(GuestVm(vkt::kvm(), {.memory_size = 2 * MiB}), EINVAL, "GuestVm");
		EXPECT_ERROR_NAMING(GuestVm(vkt::kvm(), {.memory_size = 4 * MiB - 4096}), EINVAL,
				    "GuestVm");
		EXPECT_ERROR_NAMING(GuestVm(vkt::kvm(), {.memory_size = 8 * MiB + 1}), EINVAL,
				    "GuestVm");
		EXPECT_ERROR_NAMING(GuestVm(vkt::kvm(), {.stack_size = 4096 + 8}), EINVAL, "GuestVm");
		EXPECT_ERROR_NAMING(GuestVm(vkt::kvm(), {.stack_size = 0}), EINVAL, "GuestVm");
		EXPECT_ERROR_NAMING(GuestVm(vkt::kvm(), {.vm = {.type = 0x7f}}), EINVAL,
				    "KVM_CREATE_VM");
	});
	/*
	 * The smallest valid configuration works, for an executable whose
	 * pages fit in it. A sanitizer build's executable may not (ASan's:
	 * about 5 MiB): there 4 MiB must pass the options' checks and fail only
	 * loading the executable, for want of memory, and the smallest stack
	 * runs in 8 MiB.
	 */
	std::uint64_t memory = 4 * MiB;
	if (vkt::sanitizer_build()) {
		try {
			GuestVm small(vkt::kvm(), {.memory_size = memory, .stack_size = 4096});
		} catch (const Error &e) {
			std::string m = e.what();
			TEST_ASSERT(e.err() == ENOMEM && m.find("GuestVm::alloc_pages") != std::string::npos,
				    "4 MiB, 4 KiB stack: %s", m.c_str());
			vkt::diag("sanitizer build: the executable does not fit in 4 MiB (%s); using 8 MiB",
				  m.c_str());
			memory = 8 * MiB;
		}
	}
	GuestVm g(vkt::kvm(), {.memory_size = memory, .stack_size = 4096});
	g.run_to_done(g.add_vcpu(guest_spin));
}

static void guest_add(uint64_t a, uint64_t b) { GUEST_SYNC(a + b); }

VK_TEST(guestvm_bad_entry)
{
	GuestVm g(vkt::kvm());
	Vm other_vm = vkt::kvm().create_vm();
	Vcpu other = other_vm.create_vcpu(0);
	no_leaks("GuestVm::add_vcpu", [&] {
		EXPECT_ERROR_NAMING(g.add_vcpu_raw(FREE_GVA, {}), EFAULT, "GuestVm::add_vcpu");
		EXPECT_ERROR_NAMING(g.add_vcpu_raw(0, {}), EFAULT, "GuestVm::add_vcpu");
		EXPECT_ERROR_NAMING(
			g.add_vcpu_raw(reinterpret_cast<std::uint64_t>(&guest_add), {1, 2, 3, 4, 5, 6, 7}),
			EINVAL, "GuestVm::add_vcpu");
	});
	TEST_ASSERT_EQ(g.vcpu_count(), 0u);
	/* Failed adds did not use up vCPU id 0. */
	Vcpu &v = g.add_vcpu(guest_add, 40, 2);
	TEST_ASSERT_EQ(v.id(), 0u);
	TEST_ASSERT_EQ(g.vcpu_count(), 1u);

	const kvm_regs before = v.regs();
	no_leaks("GuestVm::set_entry", [&] {
		EXPECT_ERROR_NAMING(g.set_entry_raw(v, FREE_GVA, {}), EFAULT, "GuestVm::set_entry");
		EXPECT_ERROR_NAMING(g.set_entry_raw(v, 0, {}), EFAULT, "GuestVm::set_entry");
		EXPECT_ERROR_NAMING(g.set_entry_raw(v, before.rip, {1, 2, 3, 4, 5, 6, 7}), EINVAL,
				    "GuestVm::set_entry");
		EXPECT_ERROR_NAMING(g.set_entry(other, guest_add, 1, 2), EINVAL,
				    "GuestVm::set_entry");
	});
	const kvm_regs after = v.regs();
	TEST_ASSERT_EQ(after.rip, before.rip);
	TEST_ASSERT_EQ(after.rsp, before.rsp);
	TEST_ASSERT_EQ(after.rdi, before.rdi);
	/* The vCPU still starts where it was told to. */
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
	TEST_ASSERT_EQ(uc.args[0], 42u);

	no_leaks("GuestVm lookups", [&] {
		EXPECT_ERROR_NAMING(g.vcpu(1), ENOENT, "GuestVm::vcpu");
		EXPECT_ERROR_NAMING(g.percpu_gpa(1), ENOENT, "GuestVm::percpu_gpa");
	});
}

VK_TEST(guestvm_alloc)
{
	GuestVm g(vkt::kvm(), {.memory_size = 8 * MiB});
	std::uint64_t first = g.alloc_pages(1);
	no_leaks("GuestVm::alloc_pages", [&] {
		/* Zero pages is refused as an allocation failure (ENOMEM). */
		EXPECT_ERROR_NAMING(g.alloc_pages(0), ENOMEM, "GuestVm::alloc_pages");
		EXPECT_ERROR_NAMING(g.alloc_pages(8 * MiB / 4096), ENOMEM, "GuestVm::alloc_pages");
		EXPECT_ERROR_NAMING(g.alloc_pages(~0ull), ENOMEM, "GuestVm::alloc_pages");
		EXPECT_ERROR_NAMING(g.alloc_vaddr(0), EINVAL, "GuestVm::alloc_vaddr");
		EXPECT_ERROR_NAMING(g.alloc_vaddr(8 * MiB), ENOMEM, "GuestVm::alloc_pages");
	});
	/* Failed allocations took nothing. */
	TEST_ASSERT_EQ(g.alloc_pages(1), first + 4096);
}

VK_TEST(guestvm_bad_access)
{
	GuestVm g(vkt::kvm());
	std::uint64_t gva = g.alloc_vaddr(4096);
	std::byte *host = g.gva_host(gva);
	std::memset(host, 0x5a, 4096);
	std::vector<std::byte> buf(64, std::byte(0x11));
	no_leaks("GuestVm gva access", [&] {
		EXPECT_ERROR_NAMING(g.gva_host(FREE_GVA), EFAULT, "GuestVm::gva_host");
		EXPECT_ERROR_NAMING(g.read_gva(FREE_GVA, buf.data(), 8), EFAULT, "GuestVm::read_gva");
		/* The page after an alloc_vaddr allocation is a guard page. */
		EXPECT_ERROR_NAMING(g.write_gva(gva + 4096 - 32, buf.data(), 64), EFAULT,
				    "GuestVm::write_gva");
		EXPECT_ERROR_NAMING(g.read_gva(gva + 4096 - 32, buf.data(), 64), EFAULT,
				    "GuestVm::read_gva");
	});
	for (int i = 0; i < 4096; i++)
		TEST_ASSERT_EQ(std::to_integer<int>(host[i]), 0x5a);
	for (auto b : buf)
		TEST_ASSERT_EQ(std::to_integer<int>(b), 0x11);
}

/* ---- PageTables ---- */

VK_TEST(page_tables_bad_map)
{
	GuestVm g(vkt::kvm());
	PageTables &pt = g.page_tables();
	std::uint64_t gpa = g.alloc_pages(4);
	std::uint64_t next = g.alloc_pages(1);
	no_leaks("PageTables::map", [&] {
		struct {
			std::uint64_t gva, gpa, size;
			PageFlags f;
			PageSize ps;
		} cases[] = {
			{FREE_GVA + 1, gpa, 4096, {}, PageSize::k4},	     /* unaligned gva */
			{FREE_GVA, gpa + 8, 4096, {}, PageSize::k4},	     /* unaligned gpa */
			{FREE_GVA, gpa, 4095, {}, PageSize::k4},	     /* unaligned size */
			{FREE_GVA, gpa, 0, {}, PageSize::k4},		     /* empty */
			{0x0000800000000000ull, gpa, 4096, {}, PageSize::k4}, /* non-canonical */
			{0xffff7ffffffff000ull, gpa, 4096, {}, PageSize::k4}, /* non-canonical */
			{0x00007ffffffff000ull, gpa, 8192, {}, PageSize::k4}, /* runs off the half */
			{0xfffffffffffff000ull, gpa, 8192, {}, PageSize::k4}, /* wraps */
			{FREE_GVA, 1ull << 52, 4096, {}, PageSize::k4},	     /* gpa too wide */
			{FREE_GVA, ~0ull - 4095, 8192, {}, PageSize::k4},     /* gpa wraps */
			{FREE_GVA, gpa, 4096, {.pkey = 16}, PageSize::k4},    /* pkey */
			{FREE_GVA + 4096, 0, 2 * MiB, {}, PageSize::m2},      /* gva not 2M aligned */
			{FREE_GVA, 4096, 2 * MiB, {}, PageSize::m2},	     /* gpa not 2M aligned */
			{FREE_GVA, 0, 4096, {}, PageSize::m2},		     /* size not 2M */
			{FREE_GVA, 0, 3 * MiB, {}, PageSize::g1},	     /* size not 1G */
		};
		for (auto &c : cases) {
			EXPECT_ERROR_NAMING(pt.map(c.gva, c.gpa, c.size, c.f, c.ps), EINVAL,
					    "PageTables::map");
			TEST_ASSERT(!pt.any_mapped(c.gva & ~4095ull, 4096));
		}
	});
	TEST_ASSERT(!pt.any_mapped(FREE_GVA, 2 * MiB));
	/* Nothing was allocated for page tables by the failed calls. */
	TEST_ASSERT_EQ(g.alloc_pages(1), next + 4096);
}

VK_TEST(page_tables_overlap)
{
	GuestVm g(vkt::kvm());
	PageTables &pt = g.page_tables();
	std::uint64_t gpa = g.alloc_pages(8);
	pt.map(FREE_GVA + 4 * 4096, gpa, 2 * 4096);
	pt.map(FREE_GVA + 2 * MiB, 0, 2 * MiB, {}, PageSize::m2);
	std::uint64_t leaf = *pt.leaf(FREE_GVA + 4 * 4096);
	std::uint64_t next = g.alloc_pages(1);
	no_leaks("PageTables::map overlap", [&] {
		/* [0, 5) pages overlaps page 4; [5, 8) overlaps page 5. */
		EXPECT_ERROR_NAMING(pt.map(FREE_GVA, gpa, 5 * 4096), EEXIST, "PageTables::map");
		EXPECT_ERROR_NAMING(pt.map(FREE_GVA + 5 * 4096, gpa, 3 * 4096), EEXIST,
				    "PageTables::map");
		EXPECT_ERROR_NAMING(pt.map(FREE_GVA + 4 * 4096, gpa + 4096, 4096), EEXIST,
				    "PageTables::map");
		/* A 2 MiB page over the 4 KiB ones, and 4 KiB pages inside the 2 MiB one. */
		EXPECT_ERROR_NAMING(pt.map(FREE_GVA, 0, 2 * MiB, {}, PageSize::m2), EEXIST,
				    "PageTables::map");
		EXPECT_ERROR_NAMING(pt.map(FREE_GVA + 3 * MiB, gpa, 4096), EEXIST, "PageTables::map");
		EXPECT_ERROR_NAMING(g.map(FREE_GVA + 2 * MiB - 4096, gpa, 8192), EEXIST,
				    "PageTables::map");
		/* A 1 GiB page over all of it. */
		EXPECT_ERROR_NAMING(pt.map(FREE_GVA, 0, GiB, {}, PageSize::g1), EEXIST,
				    "PageTables::map");
	});
	/* Nothing changed: the same pages mapped, nothing else, no tables allocated. */
	TEST_ASSERT(!pt.any_mapped(FREE_GVA, 4 * 4096));
	TEST_ASSERT(!pt.any_mapped(FREE_GVA + 6 * 4096, 2 * MiB - 6 * 4096));
	TEST_ASSERT_EQ(*pt.leaf(FREE_GVA + 4 * 4096), leaf);
	TEST_ASSERT_EQ(pt.translate(FREE_GVA + 5 * 4096 + 12)->gpa, gpa + 4096 + 12);
	TEST_ASSERT(pt.translate(FREE_GVA + 2 * MiB + 5)->size == PageSize::m2);
	TEST_ASSERT_EQ(pt.translate(FREE_GVA + 3 * MiB + 5)->gpa, MiB + 5);
	TEST_ASSERT(!pt.any_mapped(FREE_GVA + 4 * MiB, 4096));
	TEST_ASSERT_EQ(g.alloc_pages(1), next + 4096);
}

/* ---- Sub-page protection ---- */

VK_TEST(spp_backend_out_of_range)
{
	Vm vm = vkt::kvm().create_vm();
	no_leaks("SubpageProtection::enable with a bad backend", [&] {
		for (int k : {3, 7, -1}) {
			std::string m = TEST_EXPECT_ERROR(
				SubpageProtection::enable(
					vm, {.backend = static_cast<SppBackendKind>(k)}),
				EINVAL);
			TEST_ASSERT(m.find("SubpageProtection::enable") != std::string::npos, "%s",
				    m.c_str());
			TEST_ASSERT(!SubpageProtection::of(vm), "a refused enable() left SPP enabled");
			TEST_ASSERT(m.find("backend = " + std::to_string(k)) != std::string::npos,
				    "\"%s\" does not name the value %d", m.c_str(), k);
		}
	});
}

// SPDX-License-Identifier: MIT
/*
 * Guest PKS (protection keys for supervisor pages) on a host whose KVM
 * virtualizes it: the seven scenarios of kvm-unit-tests' x86/pks.c, under
 * their names, as guest code - one data page mapped twice with key 2, as a
 * user page and as a supervisor page, a #PF handler that counts the fault,
 * saves the data and clears IA32_PKRS so that the access is retried and
 * completes - each checked against the page-walk engine's prediction too;
 * then IA32_PKRS itself: bits 63:32 are rejected (WRMSR #GP, KVM_SET_MSRS
 * refuses), RESET clears it, INIT keeps it.
 *
 * Mainline KVM offers no PKS: every test here SKIPs there, naming what the
 * host lacks (System::pks_support()).
 */
#include "test.hpp"

#include <sys/ioctl.h>

#include <cerrno>
#include <string>

#include <virtkit/x86/guest_vm.hpp>

#include "paging_util.hpp"

using namespace virtkit;
using namespace virtkit::x86;
using namespace paging;

/* The data page, mapped twice: pks.c's `test` and SUPER_VAR(test). */
static constexpr std::uint64_t USER_GVA = 0x520000000000ull;
static constexpr std::uint64_t SUPER_GVA = 0x520000200000ull;
static constexpr std::uint8_t PKEY = 2;
static constexpr std::uint32_t PKRS_AD = pkr_ad(PKEY); /* pks.c: 0x10 */
static constexpr std::uint32_t PKRS_WD = pkr_wd(PKEY); /* pks.c: 0x20 */
static_assert(PKRS_AD == 0x10 && PKRS_WD == 0x20);

static void require_pks()
{
	const PksSupport p = vkt::kvm().pks_support();
	TEST_REQUIRE(p.available(), "guest PKS; host KVM does not offer PKS: " + p.missing());
}

/* A GuestVm whose vCPUs see PKS in CPUID (it gives them what KVM supports). */
static void check_guest_cpuid(Vcpu &v)
{
	TEST_ASSERT(features(v.cpuid()).pks, "the guest's CPUID (7,0):ECX[31] is clear");
}

/* ---- the pks.c scenarios ---- */

struct Scenario {
	const char *name;
	std::uint8_t wp;	/* CR0.WP during the access */
	std::uint32_t pkrs;	/* IA32_PKRS during the access */
	std::uint8_t super;	/* through the supervisor alias (else the user page) */
	std::uint8_t write;	/* write `value` (else read) */
	std::uint32_t before;	/* `test` before the access (pks.c: the previous scenario's) */
	std::uint32_t value;
	std::uint8_t faults;	/* pks.c's expected pf_count */
};

static const Scenario scenarios[] = {
	{"write to supervisor page when pkrs is ad and wp == 1", 1, PKRS_AD, 1, 1, 0, 21, 1},
	{"write to supervisor page when pkrs is ad and wp == 0", 0, PKRS_AD, 1, 1, 21, 22, 1},
	{"write to supervisor page when pkrs is wd and wp == 1", 1, PKRS_WD, 1, 1, 22, 23, 1},
	{"write to supervisor page when pkrs is wd and wp == 0", 0, PKRS_WD, 1, 1, 23, 24, 0},
	{"write to user page when pkrs is wd and wp == 0", 0, PKRS_WD, 0, 1, 24, 25, 0},
	{"write to user page when pkrs is wd and wp == 1", 1, PKRS_WD, 0, 1, 25, 26, 0},
	{"read from user page when pkrs is ad", 0, PKRS_AD, 0, 0, 26, 26, 0},
};

/* Written by the guest's #PF handler. */
static volatile std::uint64_t pf_count, pf_error, pf_save;
static volatile std::uint64_t user_gva;

static void set_wp(bool on)
{
	const std::uint64_t cr0 = guest_read_cr0();
	guest_write_cr0(on ? cr0 | CR0_WP : cr0 & ~CR0_WP);
}

/* pks.c's do_pf_tss(): count, save `test`, clear PKRS; the access is retried. */
static void pks_pf_handler(struct virtkit_ex_frame *f)
{
	pf_count = pf_count + 1;
	pf_error = f->error_code;
	pf_save = *(volatile std::uint32_t *)user_gva;
	guest_wrmsr(MSR_IA32_PKRS, 0);
}

static void guest_scenario(std::uint64_t index)
{
	const Scenario *s = &scenarios[index];
	volatile std::uint32_t *test = (volatile std::uint32_t *)USER_GVA;
	volatile std::uint32_t *super = (volatile std::uint32_t *)SUPER_GVA;

	user_gva = USER_GVA;
	guest_write_cr4(guest_read_cr4() | CR4_PKS);
	/* pks.c's init_test() */
	pf_count = 0;
	guest_invlpg(USER_GVA);
	guest_invlpg(SUPER_GVA);
	guest_wrmsr(MSR_IA32_PKRS, 0);
	set_wp(false);
	*test = s->before;
	pf_save = ~0ull;

	set_wp(s->wp);
	guest_wrmsr(MSR_IA32_PKRS, s->pkrs);
	/* The host asks the engine now, with exactly this state. */
	GUEST_SYNC(0);
	volatile std::uint32_t *p = s->super ? super : test;
	std::uint32_t read = 0;
	if (s->write)
		*p = s->value;
	else
		read = *p;
	GUEST_SYNC(1, pf_count, *test, pf_save, pf_error, read);
}

static void run_scenario(std::size_t index)
{
	require_pks();
	const Scenario &s = scenarios[index];
	GuestVm g(vkt::kvm());
	const std::uint64_t gpa = g.alloc_pages(1);
	g.map(USER_GVA, gpa, 4096, {.user = true, .pkey = PKEY});
	g.map(SUPER_GVA, gpa, 4096, {.pkey = PKEY});
	g.install_exception_handler(PF_VECTOR, pks_pf_handler);
	Vcpu &v = g.add_vcpu(guest_scenario, index);
	check_guest_cpuid(v);

	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.size() == 1 && uc.args[0] == 0, "%s",
		    uc.describe().c_str());
	const std::uint64_t gva = s.super ? SUPER_GVA : USER_GVA;
	const PagingState ps = v.paging_state();
	TEST_ASSERT_EQ(ps.pkrs, s.pkrs);
	TEST_ASSERT(ps.cr4 & CR4_PKS, "CR4.PKS is clear: cr4=%#llx", (unsigned long long)ps.cr4);
	const Walk w = v.translate(gva, s.write ? Access::write : Access::read);

	uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.size() == 6 && uc.args[0] == 1, "%s",
		    uc.describe().c_str());
	const std::uint64_t count = uc.args[1], test = uc.args[2], save = uc.args[3];
	const std::uint64_t error = uc.args[4], read = uc.args[5];
	vkt::diag("%s: pf_count=%llu test=%llu save=%#llx error_code=%#llx; engine: %s %#x",
		  s.name, (unsigned long long)count, (unsigned long long)test,
		  (unsigned long long)save, (unsigned long long)error,
		  w.ok() ? "no fault" : "#PF", w.error_code);
	/* pks.c's report() conditions. */
	TEST_ASSERT_EQ(count, s.faults);
	TEST_ASSERT_EQ(test, s.value);
	if (s.faults) {
		TEST_ASSERT_EQ(save, s.before);
		TEST_ASSERT_EQ(error, pfec::present | pfec::write | pfec::pk);
	}
	if (!s.write)
		TEST_ASSERT_EQ(read, s.before);
	/* The engine predicted it. */
	TEST_ASSERT(w.page_fault() == (count != 0) && (!count || w.error_code == error),
		    "%s: the engine predicted %s error_code %#x", s.name,
		    w.ok() ? "no fault" : "#PF", w.error_code);
	TEST_ASSERT(w.mapped() && w.key == PKEY, "the walk reached key %u", w.key);
	g.run_to_done(v);
}

/* One test per scenario, named as in pks.c. */
#define PKS_SCENARIO(n)                                                        \
	static void vk_pks_scenario_##n() { run_scenario(n); }                 \
	static const ::vkt::Registrar vk_pks_reg_##n(scenarios[n].name,        \
						      vk_pks_scenario_##n)

PKS_SCENARIO(0);
PKS_SCENARIO(1);
PKS_SCENARIO(2);
PKS_SCENARIO(3);
PKS_SCENARIO(4);
PKS_SCENARIO(5);
PKS_SCENARIO(6);
static_assert(std::size(scenarios) == 7);

/* ---- IA32_PKRS ---- */

static void wrmsr_pkrs(void *value) { guest_wrmsr(MSR_IA32_PKRS, (std::uint64_t)value); }

static void guest_pkrs_reserved(void)
{
	struct virtkit_exception ex = {};

	GUEST_ASSERT_EQ(guest_rdmsr(MSR_IA32_PKRS), 0);	/* RESET */
	guest_wrmsr(MSR_IA32_PKRS, 0x55555554);
	GUEST_ASSERT_EQ(guest_rdmsr(MSR_IA32_PKRS), 0x55555554);
	GUEST_ASSERT_EQ(guest_catch(wrmsr_pkrs, (void *)(1ull << 32 | PKRS_AD), &ex), GP_VECTOR + 1);
	GUEST_ASSERT_EQ(ex.error_code, 0);
	GUEST_ASSERT_EQ(guest_catch(wrmsr_pkrs, (void *)(1ull << 63), &ex), GP_VECTOR + 1);
	GUEST_ASSERT_EQ(guest_rdmsr(MSR_IA32_PKRS), 0x55555554);
	GUEST_ASSERT_EQ(guest_catch(wrmsr_pkrs, (void *)0xffffffffull, &ex), 0);
	GUEST_ASSERT_EQ(guest_rdmsr(MSR_IA32_PKRS), 0xffffffffull);
	GUEST_DONE();
}

/* WRMSR with bits 63:32 set is a #GP in the guest; KVM_SET_MSRS refuses it. */
VK_TEST(pkrs_reserved_bits_rejected)
{
	require_pks();
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_pkrs_reserved);
	check_guest_cpuid(v);
	g.run_to_done(v);
	TEST_ASSERT_EQ(v.msr(MSR_IA32_PKRS), 0xffffffffull);

	std::string m = TEST_EXPECT_ERROR(v.set_msr(MSR_IA32_PKRS, 1ull << 32), EINVAL);
	TEST_ASSERT(m.find("KVM_SET_MSRS") != std::string::npos, "%s", m.c_str());
	TEST_EXPECT_ERROR(v.set_msr(MSR_IA32_PKRS, ~0ull), EINVAL);
	TEST_ASSERT_EQ(v.msr(MSR_IA32_PKRS), 0xffffffffull);
	v.set_msr(MSR_IA32_PKRS, PKRS_WD);
	TEST_ASSERT_EQ(v.msr(MSR_IA32_PKRS), PKRS_WD);
	TEST_ASSERT_EQ(v.paging_state().pkrs, PKRS_WD);
}

static void guest_read_pkrs(void) { GUEST_SYNC(guest_rdmsr(MSR_IA32_PKRS)); }

/*
 * RESET (KVM resets a vCPU when it creates it) clears IA32_PKRS: a new vCPU
 * reads 0, on the host and in the guest, whatever another vCPU holds.
 */
VK_TEST(pkrs_cleared_by_reset)
{
	require_pks();
	GuestVm g(vkt::kvm());
	Vcpu &v0 = g.add_vcpu(guest_read_pkrs);
	TEST_ASSERT_EQ(v0.msr(MSR_IA32_PKRS), 0);
	v0.set_msr(MSR_IA32_PKRS, 0x12345678);
	Vcpu &v1 = g.add_vcpu(guest_read_pkrs);
	TEST_ASSERT_EQ(v1.msr(MSR_IA32_PKRS), 0);
	Ucall uc = g.run(v1);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync);
	TEST_ASSERT_EQ(uc.args[0], 0);
	uc = g.run(v0);
	TEST_ASSERT_EQ(uc.args[0], 0x12345678);
	g.run_to_done(v0);
	g.run_to_done(v1);
}

/* xAPIC registers, at the default base, identity-mapped for the guest. */
static constexpr std::uint64_t APIC_BASE_GPA = 0xfee00000ull;
static constexpr std::uint32_t APIC_ICR_LOW = 0x300, APIC_ICR_HIGH = 0x310;
static constexpr std::uint32_t APIC_DM_INIT = 0x500, APIC_LEVEL_ASSERT = 0x4000;

static void guest_set_pkrs(std::uint64_t value)
{
	guest_wrmsr(MSR_IA32_PKRS, value);
	GUEST_SYNC(guest_rdmsr(MSR_IA32_PKRS));
}

/* Send INIT to the local APIC with ID dest (vCPU ids are APIC ids in KVM). */
static void guest_send_init(std::uint64_t dest)
{
	volatile std::uint32_t *apic = (volatile std::uint32_t *)APIC_BASE_GPA;

	apic[APIC_ICR_HIGH / 4] = (std::uint32_t)(dest << 24);
	apic[APIC_ICR_LOW / 4] = APIC_DM_INIT | APIC_LEVEL_ASSERT;
	GUEST_DONE();
}

static std::uint32_t mp_state(Vcpu &v)
{
	kvm_mp_state mp{};
	TEST_ASSERT(::ioctl(v.fd(), KVM_GET_MP_STATE, &mp) == 0, "KVM_GET_MP_STATE: errno %d", errno);
	return mp.mp_state;
}

/*
 * INIT keeps IA32_PKRS. vCPU 1 sets it and stops; vCPU 0 sends it INIT
 * through the in-kernel local APIC; KVM_GET_MP_STATE makes KVM take the
 * INIT (kvm_apic_accept_events(): the INIT reset, then wait-for-SIPI).
 */
VK_TEST(pkrs_kept_across_init)
{
	require_pks();
	System &kvm = vkt::kvm();
	TEST_REQUIRE(kvm.has(KVM_CAP_IRQCHIP), "KVM_CAP_IRQCHIP (an in-kernel local APIC delivers INIT)");
	GuestVm g(kvm);
	/* Before any vCPU exists. */
	TEST_ASSERT(::ioctl(g.vm().fd(), KVM_CREATE_IRQCHIP, 0) == 0, "KVM_CREATE_IRQCHIP: errno %d",
		    errno);
	g.identity_map(APIC_BASE_GPA, 4096);
	Vcpu &v0 = g.add_vcpu(guest_send_init, 1);
	Vcpu &v1 = g.add_vcpu(guest_set_pkrs, 0x5555aaaa);
	check_guest_cpuid(v1);
	/*
	 * KVM builds its map of APIC ids when an APIC changes, and a vCPU's
	 * first reset comes before the vCPU is online: without a
	 * KVM_SET_LAPIC (which VMMs do anyway) the map lacks vCPU 1 and the
	 * INIT goes nowhere.
	 */
	kvm_lapic_state lapic{};
	TEST_ASSERT(::ioctl(v1.fd(), KVM_GET_LAPIC, &lapic) == 0, "KVM_GET_LAPIC: errno %d", errno);
	TEST_ASSERT(::ioctl(v1.fd(), KVM_SET_LAPIC, &lapic) == 0, "KVM_SET_LAPIC: errno %d", errno);
	/* With an in-kernel APIC, vCPUs other than the BSP wait for INIT/SIPI. */
	kvm_mp_state runnable{KVM_MP_STATE_RUNNABLE};
	TEST_ASSERT(::ioctl(v1.fd(), KVM_SET_MP_STATE, &runnable) == 0,
		    "KVM_SET_MP_STATE: errno %d", errno);
	Ucall uc = g.run(v1);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync);
	TEST_ASSERT_EQ(uc.args[0], 0x5555aaaa);

	g.run_to_done(v0);
	TEST_ASSERT_EQ(mp_state(v1), KVM_MP_STATE_INIT_RECEIVED);
	/* The INIT reset happened (real mode at the reset vector)... */
	TEST_ASSERT_EQ(v1.sregs().cr0 & 0x80000001, 0);
	TEST_ASSERT_EQ(v1.regs().rip, 0xfff0);
	/* ... and left IA32_PKRS alone. */
	TEST_ASSERT_EQ(v1.msr(MSR_IA32_PKRS), 0x5555aaaa);
}

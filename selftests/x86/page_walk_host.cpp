// SPDX-License-Identifier: MIT
/*
 * The page-walk engine against this host's CPU through /dev/kvm: the access
 * matrix's cases that do not need PKS (selftests/page_walk/access_matrix.cpp)
 * run in a KVM guest by the same access-probe image the QEMU oracle boots,
 * and every fault the guest took must be the one the engine predicts.
 *
 * Where the CPU behind /dev/kvm is QEMU's TCG (nested KVM in a TCG guest,
 * as on our CI machines) and walks the guest's tables itself (nested
 * paging; without it KVM's own walker decides the faults), reserved-bit
 * faults are compared with QEMU's P=0
 * (VK_WALK_QUIRK_RSVD_NO_P) and implicit accesses with QEMU's SMAP rule
 * (VK_WALK_QUIRK_IMPLICIT_SMAP_AC); on hardware as the SDM says.
 */
#include <cpuid.h>

#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <variant>

#include "paging_util.hpp"
#include "test.hpp"

#include "../page_walk/access_matrix.hpp"
#include "page_walk.h"

using namespace virtkit;
namespace pwm = virtkit::page_walk_matrix;

extern "C" const unsigned char pw_probe_image[], pw_probe_image_end[];

namespace {

/* Whether the CPU this process runs on is QEMU's TCG (its hypervisor leaf). */
bool cpu_is_qemu_tcg()
{
	unsigned int a, b, c, d;
	__cpuid(1, a, b, c, d);
	if (!(c & 1u << 31))
		return false;
	__cpuid(0x40000000, a, b, c, d);
	char vendor[13];
	std::memcpy(vendor, &b, 4);
	std::memcpy(vendor + 4, &c, 4);
	std::memcpy(vendor + 8, &d, 4);
	vendor[12] = 0;
	return std::string(vendor) == "TCGTCGTCGTCG";
}

/* The 32-bit entry point in the probe image's multiboot header. */
std::uint32_t probe_entry(std::span<const unsigned char> image)
{
	for (std::size_t off = 0; off + 32 <= image.size() && off < 8192; off += 4) {
		std::uint32_t w[8];
		std::memcpy(w, &image[off], sizeof(w));
		if (w[0] == 0x1badb002 && w[0] + w[1] + w[2] == 0 && (w[1] & 0x10000))
			return w[7];
	}
	TEST_ASSERT(false, "the probe image has no multiboot header");
	return 0;
}

/* Run the matrix in a KVM guest and compare; the report's figures as diag lines. */
/*
 * without_page1gb: the vCPU's CPUID has Page1GB (0x80000001:EDX[26])
 * cleared, so that PS in a PDPTE is a reserved bit - where KVM's own walker
 * decides the guest's faults (it shadows the guest's tables) and the guest
 * reads its CPUID from KVM; elsewhere the test skips naming what is missing.
 */
void run_matrix(bool la57, bool without_page1gb = false)
{
	const paging::Features cpu = paging::features(vkt::kvm().supported_cpuid());
	TEST_REQUIRE(cpu.nx, "NX in KVM_GET_SUPPORTED_CPUID (80000001H):EDX[20]");
	/*
	 * Without SMEP or SMAP the cases that set CR4.SMEP or CR4.SMAP cannot
	 * run (the image marks them not run); every other case does.
	 */
	if (la57)
		TEST_REQUIRE(cpu.la57, "5-level paging: LA57 in KVM_GET_SUPPORTED_CPUID (7,0):ECX[16]");
	if (without_page1gb)
		TEST_REQUIRE(!platform::tdp_enabled(),
			     "KVM shadowing the guest's page tables (with NPT/EPT the processor maps "
			     "1 GiB pages whatever the vCPU's CPUID says)");

	pwm::Options o;
	o.la57 = la57;
	o.sets = {pwm::Set::paging, pwm::Set::reserved, pwm::Set::noncanonical};
	/* Keys for user pages where KVM offers PKU; never PKS (no KVM has it). */
	if (cpu.pku && !without_page1gb) {
		o.sets.push_back(pwm::Set::keys);
		o.sets.push_back(pwm::Set::keys_large);
		o.pks = false;
	}
	const pwm::Matrix m = pwm::build_matrix(o);

	const std::span<const unsigned char> probe(pw_probe_image, pw_probe_image_end);
	const std::uint64_t ram = (PW_CASES_BASE + m.image.size() + (4ull << 20)) & ~((2ull << 20) - 1);
	Vm vm = vkt::kvm().create_vm();
	GuestMemory &mem = vm.memory();
	mem.add(0, ram, {.name = "page-walk probe"});
	mem.write(PW_IMAGE_BASE, std::as_bytes(probe));
	mem.write(PW_CASES_BASE, m.image);

	Vcpu v = vm.create_vcpu(0);
	auto cpuid = vkt::kvm().supported_cpuid();
	if (without_page1gb)
		for (auto &e : cpuid)
			if (e.function == 0x80000001)
				e.edx &= ~(1u << 26);
	v.set_cpuid(cpuid);
	/* Flat 32-bit protected mode, paging off: what a multiboot loader leaves. */
	kvm_sregs s = v.sregs();
	kvm_segment code{};
	code.base = 0;
	code.limit = 0xffffffff;
	code.selector = PW_SEL_KERNEL_CS;
	code.type = 0xb;
	code.present = 1;
	code.db = 1;
	code.s = 1;
	code.g = 1;
	kvm_segment data = code;
	data.selector = PW_SEL_KERNEL_DS;
	data.type = 0x3;
	s.cs = code;
	s.ds = s.es = s.fs = s.gs = s.ss = data;
	s.cr0 = 0x11;	/* PE, ET */
	s.cr4 = 0;
	s.efer = 0;
	v.set_sregs(s);
	kvm_regs r{};
	r.rip = probe_entry(probe);
	r.rflags = 2;
	v.set_regs(r);

	for (;;) {
		Exit e = v.run();
		auto *io = std::get_if<IoExit>(&e);
		/* The image's status is in the header too: compare() explains it. */
		if (io && io->is_out() && io->port == PW_EXIT_PORT)
			break;
		TEST_ASSERT(false, "the probe image stopped with %s", describe(e).c_str());
	}

	std::vector<std::byte> after(m.image.size());
	mem.read(PW_CASES_BASE, after);
	const bool tcg = cpu_is_qemu_tcg() && platform::tdp_enabled();
	const pwm::Report rep = pwm::compare(m, after, tcg ? VK_WALK_QUIRK_RSVD_NO_P | VK_WALK_QUIRK_IMPLICIT_SMAP_AC : 0);
	if (tcg)
		vkt::diag("the CPU behind /dev/kvm is QEMU's TCG (CPUID 40000000H "
			  "\"TCGTCGTCGTCG\") walking the guest's tables (nested paging): faults "
			  "compared with QEMU's rules (reserved bits with P=0, SMAP)");
	else if (cpu_is_qemu_tcg())
		vkt::diag("QEMU's TCG behind /dev/kvm, but KVM shadows the guest's tables (no "
			  "NPT/EPT): KVM's walker decides the faults, by the SDM's rules");
	if (without_page1gb)
		TEST_REQUIRE(!(rep.features & PW_FEAT_PAGE1GB),
			     "the guest reading the vCPU's CPUID (it read Page1GB set, the vCPU's "
			     "CPUID has it clear: this KVM does not intercept CPUID)");
	vkt::diag("%s-level paging: %zu cases, %zu mismatches, %zu not run; guest MAXPHYADDR %u",
		  la57 ? "5" : "4", rep.cases, rep.mismatches, rep.not_run, rep.maxphyaddr);
	for (const auto &sr : rep.sets)
		vkt::diag("  %s: %zu cases, %zu mismatches", pwm::set_name(sr.set), sr.cases,
			  sr.mismatches);
	for (const auto &line : pwm::outcome_summary(rep))
		vkt::diag("  %s", line.c_str());
	for (const auto &mm : rep.first_mismatches)
		vkt::diag("mismatch: %s", mm.c_str());
	/*
	 * Not run: exactly the cases that need SMEP or SMAP where the guest's
	 * CPU lacks them (as the image saw CPUID: some KVMs do not intercept
	 * CPUID and the guest sees the host's features whatever
	 * KVM_GET_SUPPORTED_CPUID says).
	 */
	const bool smep = rep.features & PW_FEAT_SMEP, smap = rep.features & PW_FEAT_SMAP;
	std::size_t need_missing = 0;
	const auto &h = *reinterpret_cast<const pw_header *>(m.image.data());
	for (std::size_t i = 0; i < m.ncases(); i++) {
		pw_case c;
		std::memcpy(&c, &m.image[h.cases - PW_CASES_BASE + i * sizeof(c)], sizeof(c));
		if (((c.ctl & PW_CTL_SMEP) && !smep) || ((c.ctl & PW_CTL_SMAP) && !smap))
			need_missing++;
	}
	vkt::diag("guest CPUID (in the guest): SMEP %s, SMAP %s; KVM_GET_SUPPORTED_CPUID: SMEP %s, "
		  "SMAP %s",
		  smep ? "yes" : "no", smap ? "yes" : "no", cpu.smep ? "yes" : "no",
		  cpu.smap ? "yes" : "no");
	if (need_missing)
		vkt::diag("not run: %zu cases that set CR4.SMEP or CR4.SMAP, which this guest CPU lacks",
			  need_missing);
	TEST_ASSERT(rep.not_run == need_missing,
		    "%zu cases did not run, %zu need SMEP or SMAP that the guest lacks", rep.not_run,
		    need_missing);
	TEST_ASSERT(rep.cases > rep.not_run, "no case ran");
	TEST_ASSERT(rep.mismatches == 0, "%zu of %zu cases differ from the engine", rep.mismatches,
		    rep.cases);
}

} // namespace

VK_TEST(page_walk_matches_cpu_4level)
{
	run_matrix(false);
}

VK_TEST(page_walk_matches_cpu_5level)
{
	run_matrix(true);
}

/* 1 GiB pages on a vCPU without Page1GB: every PDPTE with PS faults RSVD. */
VK_TEST(page_walk_matches_cpu_without_page1gb)
{
	run_matrix(false, true);
}

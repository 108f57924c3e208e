// SPDX-License-Identifier: MIT
/*
 * page_walk_bench - translations per second of virtkit's page-walk engine
 * against KVM_TRANSLATE, on the same addresses, in one run.
 *
 * Not a test: no thresholds, a plain table on stdout. One guest with 4-level
 * paging maps n_addresses distinct addresses, half in 4 KiB pages (each in
 * a 2 MiB region of its own, so every walk goes through a page table of its
 * own), half in 2 MiB pages; the vCPU runs to its first GUEST_SYNC and stays
 * there. Over the same address list, each in alternating rounds against the
 * baseline (bench_rounds.hpp: median, spread, ratio of medians):
 *   KVM_TRANSLATE            the baseline: a raw KVM_TRANSLATE ioctl on the
 *                            vCPU's fd per address, KVM's own walk of the
 *                            guest tables, no libvirtkit in the loop;
 *   Vcpu::translate(read)    Vcpu::translate(gva, Access::read): the vCPU's
 *                            state from KVM (KVM_GET_SREGS, KVM_GET_REGS)
 *                            and the engine's walk, per address;
 *   translate(snapshot)      virtkit::translate(memory, state, gva, read)
 *                            with a PagingState taken once: the engine and
 *                            the guest-memory lookups, no ioctl (a TLB-less
 *                            walk with guest memory in cache);
 *   engine alone             vk_walk_translate() reading the one RAM region
 *                            through a flat pointer: the walk itself.
 * Every method must give KVM_TRANSLATE's gpa for every address (checked on
 * the first pass), so a wrong answer cannot pass for a fast one.
 *
 * Like the selftests, this file is guest code (-mgeneral-regs-only): the
 * host side computes and prints in integer arithmetic.
 */
#include <virtkit/virtkit.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include "bench_rounds.hpp"
#include "bench_util.hpp"
#include "page_walk.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t MiB = 1ull << 20;
static constexpr std::uint64_t n_addresses = 4096;
static constexpr std::uint64_t base_4k = 0x500000000000ull;
static constexpr std::uint64_t base_2m = 0x600000000000ull;
static constexpr std::uint64_t n_large_pages = 64;
static constexpr std::uint64_t guest_memory = 256 * MiB;

static void guest_wait(void)
{
	GUEST_SYNC(0);
}

/* The guest's address list: distinct gvas over 4 KiB and 2 MiB pages. */
static std::vector<std::uint64_t> map_addresses(GuestVm &g)
{
	std::vector<std::uint64_t> gvas;
	const std::uint64_t data = g.alloc_pages(64);
	/* 4 KiB pages, one per 2 MiB region: a page table each. */
	for (std::uint64_t i = 0; i < n_addresses / 2; i++) {
		const std::uint64_t gva = base_4k + i * (2 * MiB + 4096);
		g.map(gva & ~0xfffull, data + (i % 64) * 4096, 4096);
		gvas.push_back(gva + (i * 8) % 4096);
	}
	/* 2 MiB pages, 1 GiB apart, with addresses spread inside them. */
	std::uint64_t gpa = g.alloc_pages(2 * MiB / 4096 * 2);
	gpa = (gpa + 2 * MiB - 1) & ~(2 * MiB - 1);
	for (std::uint64_t j = 0; j < n_large_pages; j++)
		g.map(base_2m + (j << 30), gpa, 2 * MiB, {}, PageSize::m2);
	for (std::uint64_t i = 0; gvas.size() < n_addresses; i++)
		gvas.push_back(base_2m + ((i % n_large_pages) << 30) + (i * 4104) % (2 * MiB));
	return gvas;
}

/* The engine over one flat region: guest RAM at gpa 0. */
struct FlatMemory {
	const std::byte *ram;
	std::uint64_t size;

	static int read(void *ctx, __u64 gpa, __u64 *val)
	{
		auto *m = static_cast<FlatMemory *>(ctx);
		if (gpa > m->size - 8)
			return -1;
		std::memcpy(val, m->ram + gpa, 8);
		return 0;
	}
};

int main()
{
	auto start = Clock::now();
	try {
		System sys = System::open();
		GuestVm g(sys, {.memory_size = guest_memory});
		const std::vector<std::uint64_t> gvas = map_addresses(g);
		Vcpu &v = g.add_vcpu(guest_wait);
		Ucall uc = g.run(v);
		check(uc.kind == Ucall::Kind::sync, "expected SYNC(0), got %s", uc.describe().c_str());
		const PagingState ps = v.paging_state();
		check((ps.cr4 & (1ull << 12)) == 0, "the guest uses 5-level paging");

		const std::uint64_t n = gvas.size();
		std::printf("page_walk_bench: libvirtkit %s, %llu addresses (%llu in 4 KiB pages, "
			    "%llu in 2 MiB pages), 4-level paging\n\n",
			    VIRTKIT_VERSION_STRING, (unsigned long long)n,
			    (unsigned long long)(n_addresses / 2),
			    (unsigned long long)(n - n_addresses / 2));

		/* The reference answers. */
		std::vector<std::uint64_t> want(n);
		for (std::uint64_t i = 0; i < n; i++) {
			kvm_translation t = v.translate(gvas[i]);
			check(t.valid, "KVM_TRANSLATE: gva %#llx is not mapped",
			      (unsigned long long)gvas[i]);
			want[i] = t.physical_address;
		}
		/* The baseline: the raw ioctl, on the vCPU's fd. */
		auto raw_translate = [&](std::uint64_t gva) {
			kvm_translation t{};
			t.linear_address = gva;
			rounds::xioctl(v.fd(), KVM_TRANSLATE, &t, "KVM_TRANSLATE");
			return t.valid ? t.physical_address : ~0ull;
		};
		/* Check a method's answers; return a timed loop of n translations over the list. */
		auto method = [&](const char *name, auto gpa_of) {
			for (std::uint64_t i = 0; i < n; i++) {
				std::uint64_t gpa = gpa_of(gvas[i]);
				check(gpa == want[i], "%s: gva %#llx gives gpa %#llx, KVM_TRANSLATE %#llx",
				      name, (unsigned long long)gvas[i], (unsigned long long)gpa,
				      (unsigned long long)want[i]);
			}
			return [&gvas, n, gpa_of](std::uint64_t count) {
				std::uint64_t sum = 0;
				auto t0 = Clock::now();
				for (std::uint64_t i = 0; i < count; i++)
					sum += gpa_of(gvas[i % n]);
				std::uint64_t ns = ns_since(t0);
				__asm__ volatile("" ::"r"(sum));
				return ns;
			};
		};
		auto kvm = method("KVM_TRANSLATE", raw_translate);
		auto vcpu = method("Vcpu::translate(read)", [&](std::uint64_t gva) {
			Walk w = v.translate(gva, Access::read);
			return w.ok() ? w.gpa : ~0ull;
		});
		const GuestMemory &gm = g.memory();
		auto snap = method("translate(snapshot)", [&gm, ps](std::uint64_t gva) {
			Walk w = translate(gm, ps, gva, Access::read);
			return w.ok() ? w.gpa : ~0ull;
		});
		FlatMemory flat{g.memory().host_ptr(0, guest_memory), guest_memory};
		const vk_walk_state s{.cr0 = ps.cr0, .cr3 = ps.cr3, .cr4 = ps.cr4, .efer = ps.efer,
				      .rflags = ps.rflags, .pkru = ps.pkru, .pkrs = ps.pkrs,
				      .cpl = ps.cpl, .maxphyaddr = ps.maxphyaddr, .quirks = 0,
				      .features = ps.features};
		const vk_walk_mem mem{FlatMemory::read, &flat};
		auto bare = method("engine alone", [&s, &mem](std::uint64_t gva) {
			vk_walk w;
			return vk_walk_translate(&s, &mem, gva, VK_WALK_READ, &w) == VK_WALK_OK
				       ? w.gpa
				       : ~0ull;
		});

		/* Each against the raw ioctl, in alternating rounds of one pass. */
		const char *base = "raw KVM_TRANSLATE ioctl";
		rounds::compare("Vcpu::translate(read): KVM_GET_SREGS/REGS + the engine", "translation",
				7, n, base, kvm, "Vcpu::translate(read)", vcpu);
		rounds::compare("translate(snapshot): the engine on a PagingState", "translation", 7,
				n, base, kvm, "translate(snapshot)", snap);
		rounds::compare("engine alone: vk_walk_translate over a flat pointer", "translation",
				7, n, base, kvm, "engine alone", bare);
	} catch (const std::exception &e) {
		std::fflush(stdout);
		std::fprintf(stderr, "page_walk_bench: FAILED: %s\n", e.what());
		return 1;
	}
	std::printf("\npage_walk_bench: done in %s s\n",
		    fixed(ns_since(start), 1000000000ull, 1).c_str());
	return 0;
}

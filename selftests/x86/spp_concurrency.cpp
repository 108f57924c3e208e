// SPDX-License-Identifier: MIT
/*
 * Sub-page protection under concurrency: vCPUs on their own threads write
 * while other threads change the maps, write guest memory as the VMM and kick
 * vCPUs. Checks the promise of set_access (once it returns, no guest write to
 * a sub-page it protected lands: every one is a violation), that violation
 * handlers may call set_access themselves, that VMM writes are never
 * blocked, and that the library's internal pauses (it holds the vCPUs out of
 * the guest while it re-cuts memslots) never show up as InterruptedExit while
 * real kicks still do.
 *
 * The guests write sequence numbers and report progress in an unprotected
 * control page; the host waits for progress (never for time) before it
 * checks guest memory.
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t PAGE = 4096;
static constexpr std::uint64_t SUB = SubpageProtection::subpage_size;
static constexpr std::uint32_t ALL = SubpageProtection::all_writable;

/* The test region: shared pages first, the control page at CTRL_PAGE. */
static constexpr std::uint64_t BASE = 0x40000000; /* 1 GiB */
static constexpr std::uint64_t BASE_GFN = BASE / PAGE;
static constexpr std::uint64_t REGION_PAGES = 16;
static constexpr std::uint64_t CTRL_PAGE = 12;
static constexpr std::uint64_t CTRL = BASE + CTRL_PAGE * PAGE;
/* Control page layout: the stop flag, then one progress word per vCPU (own cache line). */
static constexpr std::uint64_t STOP = CTRL;
static constexpr std::uint64_t progress_gpa(std::uint64_t vcpu)
{
	return CTRL + 64 * (1 + vcpu);
}
/* Where each vCPU echoes the VMM's mailbox (guest_hammer). */
static constexpr std::uint64_t echo_gpa(std::uint64_t vcpu)
{
	return CTRL + 1024 + 64 * vcpu;
}
/* How far a vCPU may count (guest_seq_writer); the host raises it. */
static constexpr std::uint64_t budget_gpa(std::uint64_t vcpu)
{
	return CTRL + 2048 + 64 * vcpu;
}
/* Writes a vCPU read back with another value (guest_page_rounds). */
static constexpr std::uint64_t lost_gpa(std::uint64_t vcpu)
{
	return CTRL + 3072 + 64 * vcpu;
}

/* ---- guest code ---- */

/*
 * Writer for the soundness test: round after round, write the next sequence
 * number (tagged with the vCPU id in bits 63:56) to offset 0 of each of this
 * vCPU's sub-pages - sub-pages 8 * me .. 8 * me + 7 of each of `pages`
 * pages - then publish the last number as progress. So the write with
 * number seq goes to slot (seq - 1) % (8 * pages). A round starts only
 * while the host's budget allows it; otherwise the vCPU spins on reads.
 */
static void guest_seq_writer(std::uint64_t me, std::uint64_t pages)
{
	volatile std::uint64_t *stop = (volatile std::uint64_t *)STOP;
	volatile std::uint64_t *progress = (volatile std::uint64_t *)progress_gpa(me);
	volatile std::uint64_t *budget = (volatile std::uint64_t *)budget_gpa(me);
	std::uint64_t seq = 0;

	while (!*stop) {
		if (seq + 8 * pages > *budget) {
			guest_pause();
			continue;
		}
		for (std::uint64_t p = 0; p < pages; p++)
			for (std::uint64_t j = 0; j < 8; j++) {
				seq++;
				*(volatile std::uint64_t *)(BASE + p * 4096 + (me * 8 + j) * 128) =
					me << 56 | seq;
			}
		*progress = seq;
	}
	GUEST_SYNC(seq);
}

/*
 * Round r: write (me << 56 | r << 16 | k) to every qword k of page `me` and
 * read it back (only this vCPU writes the page: a write not performed is
 * counted as lost), then publish r as progress. Ends after the round in
 * which stop was seen.
 */
static void guest_page_rounds(std::uint64_t me)
{
	volatile std::uint64_t *stop = (volatile std::uint64_t *)STOP;
	volatile std::uint64_t *progress = (volatile std::uint64_t *)progress_gpa(me);
	volatile std::uint64_t *lost = (volatile std::uint64_t *)lost_gpa(me);
	std::uint64_t r = 0;

	while (!*stop) {
		r++;
		for (std::uint64_t k = 0; k < 512; k++) {
			volatile std::uint64_t *q = (volatile std::uint64_t *)(BASE + me * 4096 + k * 8);
			std::uint64_t v = me << 56 | r << 16 | k;
			*q = v;
			if (*q != v)
				*lost = *lost + 1;
		}
		*progress = r;
	}
	GUEST_SYNC(r);
}

/*
 * Whenever the mailbox (page 0, qword 0, written by the VMM) changes: try to
 * overwrite words of pages 0 and 1 (which stay fully protected), write page
 * 4 (whose protection the host toggles), copy the mailbox to this vCPU's
 * echo word and publish progress.
 */
static void guest_hammer(std::uint64_t me)
{
	volatile std::uint64_t *stop = (volatile std::uint64_t *)STOP;
	volatile std::uint64_t *progress = (volatile std::uint64_t *)progress_gpa(me);
	volatile std::uint64_t *echo = (volatile std::uint64_t *)echo_gpa(me);
	volatile std::uint64_t *mailbox = (volatile std::uint64_t *)BASE;
	std::uint64_t n = 0, seen = 0;

	while (!*stop) {
		std::uint64_t m = *mailbox;
		if (m == seen) {
			guest_pause();
			continue;
		}
		seen = m;
		n++;
		for (std::uint64_t p = 0; p < 2; p++)
			for (std::uint64_t k = 0; k < 8; k++)
				*(volatile std::uint64_t *)(BASE + p * 4096 + k * 512 + me * 8) =
					0xbad0000000000000ull | me << 48 | n;
		/* Page 4 has its protection toggled by the host. */
		*(volatile std::uint64_t *)(BASE + 4 * 4096 + me * 8) = n;
		*echo = m;
		*progress = n;
	}
	GUEST_SYNC(n);
}

/*
 * Spin until stop: each iteration tries the protected sub-page 4 of page 0
 * (blocked), writes sub-page 5 of the same page (allowed) and, with
 * `straddle`, an 8-byte store across the end of page 1 into page 2; then
 * counts. Stop is cleared on the way out so the guest can be run again.
 */
static void guest_spin(std::uint64_t straddle)
{
	volatile std::uint64_t *stop = (volatile std::uint64_t *)STOP;
	volatile std::uint64_t *progress = (volatile std::uint64_t *)progress_gpa(0);

	for (;;) {
		while (!*stop) {
			std::uint64_t n = *progress + 1;
			*(volatile std::uint64_t *)(BASE + 4 * 128) = n;
			*(volatile std::uint64_t *)(BASE + 5 * 128) = n;
			if (straddle)
				__asm__ volatile("movq %1, (%0)" ::"r"(BASE + 2 * 4096 - 4), "r"(n)
						 : "memory");
			*progress = n;
		}
		*stop = 0;
		GUEST_SYNC(*progress);
	}
}

/* ---- host side ---- */

/* xorshift64: reproducible pseudo-random choices. */
static std::uint64_t next_rand(std::uint64_t &s)
{
	s ^= s << 13;
	s ^= s >> 7;
	s ^= s << 17;
	return s;
}

/*
 * Host threads (vCPU runners and helpers). A failure on a thread is kept
 * and rethrown on the test's thread by check() or finish(); the destructor
 * sets the guests' stop flag and quit() for helper loops and joins, so a
 * failing test still ends.
 */
class Threads {
public:
	explicit Threads(GuestMemory &mem) : mem_(mem) {}
	~Threads()
	{
		try {
			stop_guests();
		} catch (...) {
		}
		join();
	}

	void start(std::function<void()> fn)
	{
		running_++;
		threads_.emplace_back([this, fn = std::move(fn)] {
			try {
				fn();
			} catch (...) {
				std::lock_guard lock(mu_);
				if (!first_)
					first_ = std::current_exception();
				failed_ = true;
			}
			running_--;
		});
	}

	/* Rethrow the first failure of a thread, if any. */
	void check()
	{
		if (!failed_)
			return;
		stop_guests();
		join();
		std::rethrow_exception(first_);
	}

	/* Set the guests' stop flag and quit() for the helper threads. */
	void stop_guests()
	{
		quit_ = true;
		mem_.write_obj<std::uint64_t>(STOP, 1);
	}
	/* Whether helper threads (not vCPUs) should end their loops. */
	bool quit() const { return quit_; }
	void join()
	{
		for (auto &t : threads_)
			if (t.joinable())
				t.join();
	}
	/* Stop the guests, join every thread, rethrow the first failure. */
	void finish()
	{
		stop_guests();
		join();
		if (first_)
			std::rethrow_exception(first_);
	}
	int running() const { return running_; }

private:
	GuestMemory &mem_;
	std::vector<std::thread> threads_;
	std::mutex mu_;
	std::exception_ptr first_;
	std::atomic<bool> failed_{false}, quit_{false};
	std::atomic<int> running_{0};
};

/* Wait until the word at gpa reaches target; the threads must keep running. */
static void wait_for(GuestMemory &mem, Threads &threads, std::uint64_t gpa, std::uint64_t target)
{
	while (mem.read_obj<std::uint64_t>(gpa) < target) {
		threads.check();
		TEST_ASSERT(threads.running() > 0, "all threads ended before 0x%llx reached %llu",
			    (unsigned long long)gpa, (unsigned long long)target);
		std::this_thread::sleep_for(std::chrono::microseconds(200));
	}
}

/* A GuestVm with a 16-page region at BASE (identity-mapped) and SPP enabled. */
struct ConcGuest {
	GuestVm g{vkt::kvm()};
	GuestMemory &mem = g.memory();
	RegionId region = mem.add(BASE, REGION_PAGES * PAGE, {.name = "spp-conc"});
	SubpageProtection &spp = SubpageProtection::enable(g.vm());

	ConcGuest() { g.identity_map(BASE, REGION_PAGES * PAGE); }

	/* Run v until its GUEST_SYNC; the sync's first argument. */
	std::uint64_t run_to_sync(Vcpu &v)
	{
		Ucall uc = g.run(v);
		TEST_ASSERT(uc.kind == Ucall::Kind::sync, "vcpu %u: %s", v.id(),
			    uc.describe().c_str());
		return uc.args.at(0);
	}
};

VK_TEST(spp_set_access_is_sound_while_vcpus_write)
{
	/*
	 * Sized to keep the MMIO exits of the run in the low tens of thousands:
	 * nested KVM under QEMU TCG (scripts/vmtest) occasionally triple-faults
	 * a guest whose vCPUs take many MMIO exits concurrently.
	 */
	constexpr unsigned nvcpus = 3, npages = 2, slots = 8 * npages;
	constexpr int iterations = 100;
	ConcGuest t;

	/* Violations per (page, sub-page): count, highest sequence number. */
	struct Seen {
		std::uint64_t count = 0, max_seq = 0;
	};
	std::mutex mu;
	std::vector<Seen> seen(npages * 32);
	std::string bad; /* the first malformed violation */
	t.spp.on_violation([&](Vcpu &v, const SppViolation &x) {
		std::uint64_t data = 0;
		std::memcpy(&data, x.data().data(), std::min<std::size_t>(x.size, 8));
		std::uint64_t off = x.gpa - BASE, page = off / PAGE, sub = off % PAGE / SUB;
		std::uint64_t seq = data & ((1ull << 56) - 1);
		std::lock_guard lock(mu);
		bool ok = x.size == 8 && x.write_gpa == x.gpa && x.vcpu == v.id() &&
			  off % SUB == 0 && page < npages && sub / 8 == x.vcpu &&
			  data >> 56 == x.vcpu && seq > 0 &&
			  (seq - 1) % slots == page * 8 + sub % 8;
		if (!ok) {
			if (bad.empty())
				bad = vkt::format("vcpu %u: gpa 0x%llx write_gpa 0x%llx size %u data 0x%llx",
						  v.id(), (unsigned long long)x.gpa,
						  (unsigned long long)x.write_gpa, x.size,
						  (unsigned long long)data);
			return SppDecision::drop;
		}
		Seen &s = seen[page * 32 + sub];
		s.count++;
		s.max_seq = std::max(s.max_seq, seq);
		return SppDecision::drop;
	});

	for (unsigned i = 0; i < nvcpus; i++)
		t.g.add_vcpu(guest_seq_writer, i, npages);
	/*
	 * The vCPUs write only as far as their budget allows: a few rounds
	 * around each set_access (bounding the MMIO exits), then they spin.
	 */
	auto allow = [&](unsigned i, std::uint64_t upto) {
		if (upto > t.mem.read_obj<std::uint64_t>(budget_gpa(i)))
			t.mem.write_obj<std::uint64_t>(budget_gpa(i), upto);
	};
	for (unsigned i = 0; i < nvcpus; i++)
		allow(i, 2 * slots);
	std::vector<std::uint64_t> last_seq(nvcpus);
	Threads threads(t.mem);
	for (unsigned i = 0; i < nvcpus; i++)
		threads.start([&, i] { last_seq[i] = t.run_to_sync(t.g.vcpu(i)); });
	for (unsigned i = 0; i < nvcpus; i++)
		wait_for(t.mem, threads, progress_gpa(i), 1);

	auto addr = [](std::uint64_t page, std::uint64_t sub) { return BASE + page * PAGE + sub * SUB; };
	auto value = [&](std::uint64_t page, std::uint64_t sub) {
		return t.mem.read_obj<std::uint64_t>(addr(page, sub));
	};
	/*
	 * Every vCPU completes two more rounds. The round after the one that
	 * published "now" may have begun before; the one after that began
	 * after "now" was read, so it wrote each slot after set_access returned.
	 */
	auto two_rounds = [&] {
		std::uint64_t now[nvcpus];
		for (unsigned i = 0; i < nvcpus; i++) {
			now[i] = t.mem.read_obj<std::uint64_t>(progress_gpa(i));
			allow(i, now[i] + 2 * slots);
		}
		for (unsigned i = 0; i < nvcpus; i++)
			wait_for(t.mem, threads, progress_gpa(i), now[i] + 2 * slots);
	};

	std::vector<std::uint32_t> maps(npages, ALL);
	/* Value of a protected sub-page when set_access protected it. */
	std::vector<std::optional<std::uint64_t>> snap(npages * 32);
	std::uint64_t rng = 0x2545f4914f6cdd1dull, protections = 0, violations_checked = 0;
	for (int it = 0; it < iterations; it++) {
		std::uint64_t p = next_rand(rng) % npages;
		std::uint64_t n = it % 5 == 4 && p + 1 < npages ? 2 : 1;
		std::uint32_t map;
		switch (next_rand(rng) % 5) {
		case 0: map = ALL; break;
		case 1: map = 0; break;
		case 2: map = ~(1u << (next_rand(rng) % 24)); break;
		default:
			map = static_cast<std::uint32_t>(next_rand(rng) | next_rand(rng));
			break;
		}
		/* The vCPUs are writing while the maps change. */
		for (unsigned i = 0; i < nvcpus; i++)
			allow(i, t.mem.read_obj<std::uint64_t>(progress_gpa(i)) + 4 * slots);
		t.spp.set_access(BASE_GFN + p, std::vector<std::uint32_t>(n, map));
		for (std::uint64_t q = p; q < p + n; q++)
			maps[q] = map;

		/* From here on, no write to a protected sub-page may land. */
		std::vector<std::uint64_t> before(npages * 32);
		for (std::uint64_t q = 0; q < npages; q++)
			for (std::uint64_t s = 0; s < 8 * nvcpus; s++) {
				std::uint64_t i = q * 32 + s;
				before[i] = value(q, s);
				bool prot = !(maps[q] >> s & 1);
				if (!prot)
					snap[i].reset();
				else if (!snap[i]) {
					snap[i] = before[i];
					protections++;
				} else {
					TEST_ASSERT(before[i] == *snap[i],
						    "iteration %d: protected sub-page %llu of page %llu "
						    "changed from 0x%llx to 0x%llx",
						    it, (unsigned long long)s, (unsigned long long)q,
						    (unsigned long long)*snap[i],
						    (unsigned long long)before[i]);
				}
			}
		std::vector<Seen> seen_before;
		{
			std::lock_guard lock(mu);
			seen_before = seen;
		}

		two_rounds();

		std::lock_guard lock(mu);
		TEST_ASSERT(bad.empty(), "malformed violation: %s", bad.c_str());
		/* First: every write landed where the guest aimed it, whole. */
		for (std::uint64_t q = 0; q < npages; q++)
			for (std::uint64_t s = 0; s < 8 * nvcpus; s++) {
				std::uint64_t now = value(q, s), seq = now & ((1ull << 56) - 1);
				TEST_ASSERT(now == 0 || (now >> 56 == s / 8 && seq > 0 &&
							 (seq - 1) % slots == q * 8 + s % 8),
					    "iteration %d: sub-page %llu of page %llu holds 0x%llx, "
					    "which its writer (vCPU %llu) stores elsewhere",
					    it, (unsigned long long)s, (unsigned long long)q,
					    (unsigned long long)now, (unsigned long long)(s / 8));
			}
		for (std::uint64_t q = 0; q < npages; q++)
			for (std::uint64_t s = 0; s < 8 * nvcpus; s++) {
				std::uint64_t i = q * 32 + s, now = value(q, s);
				if (snap[i]) {
					/* Unchanged, and the writes since were all reported. */
					TEST_ASSERT(now == *snap[i],
						    "iteration %d: a guest write landed in protected "
						    "sub-page %llu of page %llu (map 0x%08x): 0x%llx, "
						    "was 0x%llx when set_access returned",
						    it, (unsigned long long)s, (unsigned long long)q,
						    maps[q], (unsigned long long)now,
						    (unsigned long long)*snap[i]);
					TEST_ASSERT(seen[i].count > seen_before[i].count,
						    "iteration %d: no violation for sub-page %llu of page %llu",
						    it, (unsigned long long)s, (unsigned long long)q);
					TEST_ASSERT(seen[i].max_seq > (*snap[i] & ((1ull << 56) - 1)));
					violations_checked++;
				} else {
					/*
					 * Writable: the owner's writes land again. On
					 * failure, what the backend says: the map it
					 * holds now and the violations it reported.
					 */
					TEST_ASSERT(now > before[i],
						    "iteration %d: writable sub-page %llu of page %llu "
						    "(map 0x%08x; the backend's now 0x%08x) stuck at "
						    "0x%llx (0x%llx after set_access); %llu violations "
						    "reported for it since, highest 0x%llx",
						    it, (unsigned long long)s, (unsigned long long)q,
						    maps[q], t.spp.get_access(BASE_GFN + q, 1).at(0),
						    (unsigned long long)now, (unsigned long long)before[i],
						    (unsigned long long)(seen[i].count -
									 seen_before[i].count),
						    (unsigned long long)seen[i].max_seq);
					TEST_ASSERT_EQ(now >> 56, s / 8);
				}
			}
	}
	threads.finish();
	vkt::diag("%d set_access calls, %llu sub-page protections, %llu protected-slot checks, "
		  "%llu violations; vCPUs wrote %llu, %llu, %llu times",
		  iterations, (unsigned long long)protections,
		  (unsigned long long)violations_checked,
		  (unsigned long long)t.spp.stats().violations, (unsigned long long)last_seq[0],
		  (unsigned long long)last_seq[1], (unsigned long long)last_seq[2]);
	TEST_ASSERT(protections > 0 && violations_checked > 0);
}

VK_TEST(spp_handler_may_call_set_access)
{
	constexpr unsigned nvcpus = 3;
	ConcGuest t;
	std::atomic<std::uint64_t> handled{0}, reprotected{0};
	std::mutex mu;
	std::string bad;
	/*
	 * Unprotect the written page and let the write through; re-protect
	 * the next vCPU's page (a while), so that handlers keep racing each
	 * other and the host's own set_access calls.
	 */
	t.spp.on_violation([&](Vcpu &v, const SppViolation &x) {
		std::uint64_t gfn = x.gpa / PAGE;
		if (gfn != BASE_GFN + v.id()) {
			std::lock_guard lock(mu);
			if (bad.empty())
				bad = vkt::format("vcpu %u wrote 0x%llx", v.id(),
						  (unsigned long long)x.gpa);
		}
		t.spp.set_access(gfn, {ALL});
		if (reprotected < 300) {
			reprotected++;
			t.spp.set_access(BASE_GFN + (v.id() + 1) % nvcpus, {0u});
		}
		handled++;
		return SppDecision::allow_once;
	});
	t.spp.set_access(BASE_GFN, std::vector<std::uint32_t>(nvcpus, 0u));

	for (unsigned i = 0; i < nvcpus; i++)
		t.g.add_vcpu(guest_page_rounds, i);
	std::vector<std::uint64_t> rounds(nvcpus);
	Threads threads(t.mem);
	for (unsigned i = 0; i < nvcpus; i++)
		threads.start([&, i] { rounds[i] = t.run_to_sync(t.g.vcpu(i)); });

	/* The host protects pages too, while the handlers unprotect them. */
	std::uint64_t rng = 0x853c49e6748fea9bull;
	for (int it = 0; it < 100; it++) {
		std::uint64_t p = next_rand(rng) % nvcpus;
		std::uint32_t map = it % 2 ? 0u : static_cast<std::uint32_t>(next_rand(rng));
		t.spp.set_access(BASE_GFN + p, {map});
		std::uint64_t r = t.mem.read_obj<std::uint64_t>(progress_gpa(p));
		wait_for(t.mem, threads, progress_gpa(p), r + 1);
	}
	/* Once more with everything protected, then a full round each. */
	t.spp.set_access(BASE_GFN, std::vector<std::uint32_t>(nvcpus, 0u));
	for (unsigned i = 0; i < nvcpus; i++)
		wait_for(t.mem, threads, progress_gpa(i),
			 t.mem.read_obj<std::uint64_t>(progress_gpa(i)) + 2);
	threads.finish();

	TEST_ASSERT(bad.empty(), "%s", bad.c_str());
	TEST_ASSERT(handled >= nvcpus, "only %llu violations", (unsigned long long)handled.load());
	/* allow_once performed every blocked write: none lost, the last round whole. */
	for (unsigned i = 0; i < nvcpus; i++)
		TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(lost_gpa(i)), 0u);
	for (unsigned i = 0; i < nvcpus; i++)
		for (std::uint64_t k = 0; k < 512; k++)
			TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(BASE + i * PAGE + k * 8),
				       std::uint64_t{i} << 56 | rounds[i] << 16 | k);
	vkt::diag("%llu violations handled, %llu re-protections; rounds %llu, %llu, %llu",
		  (unsigned long long)handled.load(), (unsigned long long)reprotected.load(),
		  (unsigned long long)rounds[0], (unsigned long long)rounds[1],
		  (unsigned long long)rounds[2]);
}

VK_TEST(spp_vmm_writes_are_never_blocked_while_vcpus_run)
{
	constexpr unsigned nvcpus = 2;
	ConcGuest t;
	/* Pages 0 and 1 fully protected for the whole test. */
	t.spp.set_access(BASE_GFN, {0u, 0u});
	for (unsigned i = 0; i < nvcpus; i++)
		t.g.add_vcpu(guest_hammer, i);
	std::atomic<bool> done{false};
	std::atomic<std::uint64_t> toggles{0};
	Threads threads(t.mem);
	for (unsigned i = 0; i < nvcpus; i++)
		threads.start([&, i] { t.run_to_sync(t.g.vcpu(i)); });

	/* Another thread re-cuts slots next door all the time. */
	threads.start([&] {
		for (std::uint64_t n = 0; !done && !threads.quit(); n++) {
			t.spp.set_access(BASE_GFN + 4, {n % 2 ? ALL : 0x0000ffffu});
			toggles++;
		}
	});

	/* The VMM rewrites both protected pages; the guests must see it. */
	auto pattern = [](std::uint64_t gen, std::uint64_t k) {
		return gen << 32 | k * 0x9e3779b9ull >> 8;
	};
	std::vector<std::uint64_t> buf(1024), back(1024);
	const std::uint64_t violations_before = t.spp.stats().violations;
	const int generations = 60;
	for (std::uint64_t gen = 1; gen <= generations; gen++) {
		for (std::uint64_t k = 0; k < 1024; k++)
			buf[k] = pattern(gen, k);
		buf[0] = gen; /* the mailbox */
		t.mem.write(BASE, std::as_bytes(std::span(buf)));
		t.mem.read(BASE, std::as_writable_bytes(std::span(back)));
		TEST_ASSERT(back == buf, "generation %llu: a VMM write did not stick",
			    (unsigned long long)gen);
		/*
		 * Each guest saw the new mailbox, then tried to overwrite the
		 * pages, then echoed it.
		 */
		for (unsigned i = 0; i < nvcpus; i++)
			wait_for(t.mem, threads, echo_gpa(i), gen);
		t.mem.read(BASE, std::as_writable_bytes(std::span(back)));
		TEST_ASSERT(back == buf, "generation %llu: a guest write landed",
			    (unsigned long long)gen);
	}
	done = true;
	threads.finish();
	t.mem.read(BASE, std::as_writable_bytes(std::span(back)));
	TEST_ASSERT(back == buf);
	TEST_ASSERT(t.spp.stats().violations > violations_before);
	vkt::diag("%d VMM generations, %llu toggles, %llu violations", generations,
		  (unsigned long long)toggles.load(),
		  (unsigned long long)(t.spp.stats().violations - violations_before));
}

/*
 * Run v (guest_spin) from this thread; with `kick`, another thread kicks it
 * once the guest's progress passed `from`. The run must end soon after the
 * kick (or by itself, without): should the guest make 1000 more iterations
 * instead, the watcher sets the stop flag, so run() returns the guest's SYNC
 * - which the test reports - instead of hanging.
 */
static Exit run_watched(ConcGuest &t, Vcpu &v, std::uint64_t from, bool kick)
{
	std::atomic<bool> returned{false};
	auto progress = [&] { return t.mem.read_obj<std::uint64_t>(progress_gpa(0)); };
	std::thread watcher([&] {
		if (kick) {
			while (progress() <= from && !returned)
				std::this_thread::sleep_for(std::chrono::microseconds(200));
			v.kick();
		}
		std::uint64_t at = progress();
		while (!returned) {
			if (progress() > at + 1000) {
				t.mem.write_obj<std::uint64_t>(STOP, 1);
				break;
			}
			std::this_thread::sleep_for(std::chrono::microseconds(200));
		}
	});
	Exit e;
	try {
		e = v.run();
	} catch (...) {
		returned = true;
		watcher.join();
		throw;
	}
	returned = true;
	watcher.join();
	return e;
}

VK_TEST(spp_kick_interrupts_guest)
{
	ConcGuest t;
	t.spp.set_access(BASE_GFN, {~(1u << 4)});
	std::atomic<std::uint64_t> violations{0};
	/* Violations of sub-page 4 before the handler kicks (-1: never). */
	std::atomic<int> countdown{-1};
	/* Violations of sub-page 4 after the handler kicked (-1: no kick yet). */
	std::atomic<int> after_kick{-1};
	Vcpu *vp = nullptr;
	/* Sub-page 4 of page 0; the straddling store is blocked while page 2 is protected. */
	t.spp.on_violation([&](Vcpu &, const SppViolation &x) {
		if (x.gpa != BASE + 4 * SUB)
			return SppDecision::drop;
		violations++;
		/* A lost kick: end the run with a SYNC rather than hang. */
		if (after_kick >= 0 && ++after_kick > 1000)
			t.mem.write_obj<std::uint64_t>(STOP, 1);
		if (countdown >= 0 && countdown-- == 0) {
			vp->kick();
			after_kick = 0;
		}
		return SppDecision::drop;
	});
	Vcpu &v = t.g.add_vcpu(guest_spin, 1);
	vp = &v;

	/* A toggler keeps pausing the VM for slot changes meanwhile. */
	std::atomic<bool> done{false};
	std::atomic<std::uint64_t> toggles{0};
	Threads threads(t.mem);
	threads.start([&] {
		for (std::uint64_t n = 0; !done && !threads.quit(); n++) {
			t.spp.set_access(BASE_GFN + 2, {n % 2 ? ALL : ~1u});
			toggles++;
			std::this_thread::sleep_for(std::chrono::microseconds(500));
		}
	});

	std::uint64_t progress = 0;
	for (int round = 0; round < 20; round++) {
		Exit e = run_watched(t, v, progress, true);
		TEST_ASSERT(std::holds_alternative<InterruptedExit>(e), "round %d: %s", round,
			    describe(e).c_str());
		std::uint64_t now = t.mem.read_obj<std::uint64_t>(progress_gpa(0));
		TEST_ASSERT(now > progress, "round %d: the guest did not run", round);
		progress = now;
	}

	/* A kick from the vCPU's own violation handler is not lost either. */
	for (int round = 0; round < 5; round++) {
		std::uint64_t before = violations;
		after_kick = -1;
		countdown = 3;
		Exit e = run_watched(t, v, 0, false);
		TEST_ASSERT(std::holds_alternative<InterruptedExit>(e), "handler round %d: %s",
			    round, describe(e).c_str());
		/* It kicked in the 4th violation and the guest did not go on. */
		TEST_ASSERT_EQ(violations.load() - before, 4u);
		TEST_ASSERT_EQ(after_kick.load(), 0);
	}

	done = true;
	threads.check();
	/* And then the guest ends normally. */
	t.mem.write_obj<std::uint64_t>(STOP, 1);
	Ucall uc = t.g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
	threads.finish();
	TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(BASE + 4 * SUB), 0u);
	TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(BASE + 5 * SUB), uc.args.at(0));
	vkt::diag("%llu toggles, %llu violations", (unsigned long long)toggles.load(),
		  (unsigned long long)violations.load());
}

VK_TEST(spp_internal_pauses_are_not_interrupted_exits)
{
	ConcGuest t;
	t.spp.set_access(BASE_GFN, {~(1u << 4)});
	Vcpu &v = t.g.add_vcpu(guest_spin, 1);

	std::atomic<std::uint64_t> interrupted{0};
	std::optional<Ucall> result;
	std::string other;
	Threads threads(t.mem); /* joined before the above go away */
	threads.start([&] {
		for (;;) {
			Exit e = v.run();
			if (std::holds_alternative<InterruptedExit>(e)) {
				interrupted++;
				continue;
			}
			result = t.g.ucall(v, e);
			if (!result)
				other = describe(e);
			return;
		}
	});
	wait_for(t.mem, threads, progress_gpa(0), 1);

	/*
	 * 200 changes that re-cut slots around the pages the guest writes,
	 * each after the guest made progress (so each pause finds it running).
	 */
	const std::uint32_t maps[] = {0u, ~1u, ALL, ~(1u << 31), 0x0f0f0f0fu, ALL};
	for (int it = 0; it < 200; it++) {
		std::uint64_t p = it % 3;
		t.spp.set_access(BASE_GFN + p, {p == 0 ? maps[it % 6] & ~(1u << 4) : maps[it % 6]});
		std::uint64_t now = t.mem.read_obj<std::uint64_t>(progress_gpa(0));
		wait_for(t.mem, threads, progress_gpa(0), now + 1);
	}
	threads.finish();
	TEST_ASSERT_EQ(interrupted.load(), 0u);
	TEST_ASSERT(result.has_value(), "run() returned %s", other.c_str());
	TEST_ASSERT(result->kind == Ucall::Kind::sync, "%s", result->describe().c_str());
	TEST_ASSERT(result->args.at(0) >= 200u);
	/* Sub-page 4 of page 0 stayed protected throughout. */
	TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(BASE + 4 * SUB), 0u);
}

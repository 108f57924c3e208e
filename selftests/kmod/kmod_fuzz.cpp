// SPDX-License-Identifier: MIT
/*
 * Hostile calls to /dev/virtkit and the per-VM file, from a seeded PRNG
 * (the seed is printed; VIRTKIT_FUZZ_SEED=N repeats a run,
 * VIRTKIT_FUZZ_ITERS=N sets its length): random ioctl numbers in the 0xE7
 * range and outside it, random struct contents, bad and foreign
 * descriptors, overflowing ranges, bad pointers, non-zero reserved fields.
 * Every call must return success or one of the errnos the ABI documents
 * for exactly that call; a model of the successful SETs must match every
 * GET and the statistics; and everything is released afterwards.
 */
#include "kmod_util.hpp"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <ctime>
#include <map>
#include <set>

using namespace kmt;
using virtkit::FileDesc;
using virtkit::Mapping;

namespace {

constexpr u64 LIMIT = VIRTKIT_SPP_GFN_LIMIT;
constexpr u64 buf_maps = 4096; /* maps the valid buffer holds */

/* Where a pointer argument points. */
enum class Ptr { valid, tail, ro, null, low, kernel, noncanon, guard, count };

struct Fuzzer {
	Rng rng;
	FileDesc dev = open_dev();
	RawVm vm{1}, spare{0};
	FileDesc vk = attach_ok(dev.get(), vm.vm.get());
	Mapping run = map_run(vm.vcpus[0].get());
	FileDesc null = FileDesc::open("/dev/null", O_RDWR | O_CLOEXEC);
	FileDesc evfd = FileDesc::eventfd(0);
	FileDesc memfd = FileDesc::memfd("kmod_fuzz");
	/* Buffers, each followed by a PROT_NONE page. */
	Mapping maps_buf = guarded(buf_maps * 4);
	Mapping ro_buf = guarded(4096);
	Mapping arg_buf = guarded(4096);
	long max_pages;
	long guest_wrmsr; /* VIRTKIT_CAP_GUEST_WRMSR */
	bool enabled = false;
	std::map<u64, u32> model; /* gfn -> map, protected pages only */
	std::map<std::string, u64> outcomes;
	std::vector<u64> bases;

	static Mapping guarded(std::size_t size)
	{
		auto m = Mapping::anonymous(size + 4096, "fuzz buffer");
		TEST_ASSERT(mprotect(m.data() + size, 4096, PROT_NONE) == 0);
		return m;
	}

	explicit Fuzzer(u64 seed) : rng(seed)
	{
		TEST_ASSERT(mprotect(ro_buf.data(), 4096, PROT_READ) == 0);
		run.as<kvm_run>()->immediate_exit = 1; /* VCPU_RUN of the vCPU: EINTR */
		max_pages = sys_ioctl(dev.get(), VIRTKIT_CHECK_EXTENSION,
				      (unsigned long)VIRTKIT_CAP_SPP_MAX_PAGES);
		TEST_ASSERT(max_pages > 0);
		guest_wrmsr = sys_ioctl(dev.get(), VIRTKIT_CHECK_EXTENSION,
					(unsigned long)VIRTKIT_CAP_GUEST_WRMSR);
		TEST_ASSERT(guest_wrmsr == 0 || guest_wrmsr == 1);
		bases = {0, 0x3ff80, 1ull << 18, LIMIT - 64, 0x123456789ull & (LIMIT - 1),
			 0x7fffe00};
	}

	u64 fuzz_u64()
	{
		switch (rng.below(6)) {
		case 0: return 0;
		case 1: return rng.below(16);
		case 2: return ~u64(0) - rng.below(4);
		case 3: return u64(1) << rng.below(64);
		default: return rng.next();
		}
	}

	/* A pointer of the given kind; `tail` leaves `tail_bytes` before the guard. */
	std::byte *ptr(Ptr kind, Mapping &valid, std::size_t valid_size, std::size_t tail_bytes)
	{
		switch (kind) {
		case Ptr::valid: return valid.data();
		case Ptr::tail: return valid.data() + valid_size - tail_bytes;
		case Ptr::ro: return ro_buf.data();
		case Ptr::null: return nullptr;
		case Ptr::low: return reinterpret_cast<std::byte *>(0x1000 + rng.below(0x1000));
		case Ptr::kernel: return reinterpret_cast<std::byte *>(0xffff888000000000ull +
								      rng.below(1 << 20));
		case Ptr::noncanon: return reinterpret_cast<std::byte *>(0x8000000000000000ull);
		default: return valid.data() + valid_size;
		}
	}
	/* Whether [p, p + bytes) is readable (or writable) user memory here. */
	bool ok(Ptr kind, std::size_t valid_size, std::size_t tail_bytes, u64 bytes, bool write)
	{
		if (bytes == 0)
			return true;
		switch (kind) {
		case Ptr::valid: return bytes <= valid_size;
		case Ptr::tail: return bytes <= tail_bytes;
		case Ptr::ro: return !write && bytes <= 4096;
		default: return false;
		}
	}
	Ptr pick_ptr()
	{
		if (rng.chance(70))
			return Ptr::valid;
		return static_cast<Ptr>(rng.below(static_cast<u64>(Ptr::count)));
	}

	/* A struct argument: valid (maybe read-only) memory, or a bad pointer. */
	struct StructArg {
		std::byte *p;
		bool readable, writable;
	};
	StructArg struct_arg(const void *content, std::size_t size)
	{
		Ptr k = pick_ptr();
		if (k == Ptr::ro)
			k = Ptr::valid; /* (its content would be zeros, not the struct) */
		std::size_t tail = rng.below(size); /* a struct running into the guard */
		std::byte *p = ptr(k, arg_buf, 4096, tail);
		if (k == Ptr::valid || k == Ptr::tail)
			std::memcpy(p, content, std::min(size, k == Ptr::tail ? tail : size));
		return {p, ok(k, 4096, tail, size, false), ok(k, 4096, tail, size, true)};
	}

	/* fds for vm_fd/vcpu_fd fields: good, foreign, closed, absurd. */
	int pick_fd(std::string &what)
	{
		static const char *names[] = {"vm", "spare vm", "vcpu", "/dev/null", "eventfd",
					      "memfd", "/dev/kvm", "/dev/virtkit", "per-VM fd",
					      "closed", "-1", "random"};
		unsigned i = rng.below(12);
		what = names[i];
		switch (i) {
		case 0: return vm.vm.get();
		case 1: return spare.vm.get();
		case 2: return vm.vcpus[0].get();
		case 3: return null.get();
		case 4: return evfd.get();
		case 5: return memfd.get();
		case 6: return vkt::kvm().fd().get();
		case 7: return dev.get();
		case 8: return vk.get();
		case 9: return closed_fd();
		case 10: return -1;
		default: return static_cast<int>(rng.next());
		}
	}
	static bool is_open(int fd) { return fd >= 0 && fcntl(fd, F_GETFD) >= 0; }

	void expect(const char *call, long r, std::set<long> allowed)
	{
		std::string key = std::string(call) + " -> " + result_name(r > 0 ? 1 : r);
		outcomes[key]++;
		if (allowed.count(r))
			return;
		std::string want;
		for (long a : allowed)
			want += (want.empty() ? "" : "|") + result_name(a);
		vkt::fail(__FILE__, __LINE__,
			  vkt::format("%s returned %s, expected %s", call, result_name(r).c_str(),
				      want.c_str()));
	}

	/* ---- one call ---- */

	void version_or_cap(int fd, bool version)
	{
		unsigned long arg = rng.chance(30) ? 0 : fuzz_u64();
		long r = sys_ioctl(fd, version ? VIRTKIT_GET_API_VERSION : VIRTKIT_CHECK_EXTENSION, arg);
		if (version) {
			expect("GET_API_VERSION", r, {arg ? -EINVAL : 1});
			return;
		}
		long want = arg == VIRTKIT_CAP_SPP || arg == VIRTKIT_CAP_SPP_FAST_WRITE ? 1
			    : arg == VIRTKIT_CAP_SPP_MAX_PAGES				? max_pages
			    : arg == VIRTKIT_CAP_GUEST_WRMSR				? guest_wrmsr
											: 0;
		expect("CHECK_EXTENSION", r, {want});
	}

	void attach_call()
	{
		virtkit_attach_vm a{};
		std::string what;
		a.vm_fd = pick_fd(what);
		if (rng.chance(10))
			a.flags = static_cast<u32>(fuzz_u64());
		if (rng.chance(10))
			a.reserved[rng.below(3)] = fuzz_u64();
		auto s = struct_arg(&a, sizeof(a));
		long r = sys_ioctl(dev.get(), VIRTKIT_ATTACH_VM, s.p);
		std::set<long> want;
		if (!s.readable)
			want = {-EFAULT};
		else if (a.flags || a.reserved[0] || a.reserved[1] || a.reserved[2])
			want = {-EINVAL};
		else if (!is_open(a.vm_fd))
			want = {-EBADF};
		else if (a.vm_fd == vm.vm.get())
			want = {-EBUSY};
		else if (a.vm_fd == spare.vm.get())
			want = {r >= 0 ? r : 0, -ENOMEM};
		else
			want = {-EINVAL};
		expect(("ATTACH_VM(" + what + ")").c_str(), r, want);
		if (r >= 0)
			close(static_cast<int>(r)); /* detaches the spare VM again */
	}

	void enable_call()
	{
		virtkit_spp_enable e{};
		if (rng.chance(15))
			e.flags = static_cast<u32>(fuzz_u64());
		if (rng.chance(15))
			e.reserved[rng.below(7)] = static_cast<u32>(fuzz_u64());
		auto s = struct_arg(&e, sizeof(e));
		long r = sys_ioctl(vk.get(), VIRTKIT_SPP_ENABLE, s.p);
		bool zero = !e.flags && std::all_of(std::begin(e.reserved), std::end(e.reserved),
						    [](u32 x) { return x == 0; });
		expect("SPP_ENABLE", r, {!s.readable ? -EFAULT : zero ? 0 : -EINVAL});
		if (r == 0)
			enabled = true;
	}

	u64 pick_gfn()
	{
		switch (rng.below(10)) {
		case 0: return LIMIT - rng.below(8);
		case 1: return LIMIT + rng.below(1000);
		case 2: return ~u64(0) - rng.below(100);
		case 3: return rng.next() & (LIMIT - 1);
		case 4: return rng.next();
		default: return bases[rng.below(bases.size())] + rng.below(4096);
		}
	}
	u64 pick_npages()
	{
		switch (rng.below(12)) {
		case 0: return 0;
		case 1: return u64(max_pages) + rng.below(3);
		case 2: return fuzz_u64();
		case 3: return rng.below(buf_maps + 1);
		case 4: return buf_maps + 1 + rng.below(64);
		default: return 1 + rng.below(64);
		}
	}

	void access_call(bool set)
	{
		virtkit_spp_access a{};
		a.gfn = pick_gfn();
		a.npages = pick_npages();
		Ptr mk = pick_ptr();
		std::size_t tail = 4 * rng.below(9);
		std::byte *maps = ptr(mk, maps_buf, buf_maps * 4, tail);
		a.maps = reinterpret_cast<u64>(maps);
		if (rng.chance(8))
			a.flags = static_cast<u32>(fuzz_u64());
		if (rng.chance(8))
			a.pad = static_cast<u32>(fuzz_u64());
		if (rng.chance(8))
			a.reserved[rng.below(4)] = fuzz_u64();
		/* Random maps: often all-writable (unprotect), often 0, else random. */
		u64 fill = std::min<u64>(a.npages, buf_maps);
		auto *m = reinterpret_cast<u32 *>(maps_buf.data());
		if (set && mk == Ptr::valid)
			for (u64 i = 0; i < fill; i++)
				m[i] = rng.chance(35) ? ALL : rng.chance(30) ? 0 : static_cast<u32>(rng.next());
		if (set && mk == Ptr::tail)
			for (u64 i = 0; i < tail / 4; i++)
				reinterpret_cast<u32 *>(maps)[i] = static_cast<u32>(rng.next());
		auto s = struct_arg(&a, sizeof(a));

		long r = sys_ioctl(vk.get(), set ? VIRTKIT_SPP_SET_ACCESS : VIRTKIT_SPP_GET_ACCESS, s.p);
		std::set<long> want;
		bool maps_ok = a.npages <= buf_maps * 2 &&
			       ok(mk, buf_maps * 4, tail, a.npages * 4, !set);
		if (!s.readable)
			want = {-EFAULT};
		else if (a.flags || a.pad || a.reserved[0] || a.reserved[1] || a.reserved[2] ||
			 a.reserved[3])
			want = {-EINVAL};
		else if (a.npages > u64(max_pages))
			want = {-E2BIG};
		else if (a.npages && (a.gfn >= LIMIT || a.npages > LIMIT - a.gfn))
			want = {-EINVAL};
		else if (!enabled)
			want = maps_ok ? std::set<long>{-ENOENT} : std::set<long>{-ENOENT, -EFAULT};
		else if (!maps_ok)
			want = {-EFAULT};
		else
			want = set ? std::set<long>{0, -ENOSPC, -ENOMEM} : std::set<long>{0, -ENOMEM};
		if (!maps_ok && a.npages > u64(max_pages) / 2)
			want.insert(-ENOMEM); /* the kernel's copy of a huge range */
		expect(set ? "SPP_SET_ACCESS" : "SPP_GET_ACCESS", r, want);
		if (r != 0 || a.npages == 0)
			return;
		const u32 *src = reinterpret_cast<const u32 *>(maps);
		for (u64 i = 0; i < a.npages; i++) {
			u64 gfn = a.gfn + i;
			if (set) {
				if (src[i] == ALL)
					model.erase(gfn);
				else
					model[gfn] = src[i];
				continue;
			}
			auto it = model.find(gfn);
			u32 want_map = it == model.end() ? ALL : it->second;
			TEST_ASSERT(src[i] == want_map, "GET gfn 0x%llx: 0x%x, the model says 0x%x",
				    (unsigned long long)gfn, src[i], want_map);
		}
	}

	void stats_call()
	{
		Ptr k = pick_ptr();
		std::size_t tail = rng.below(64);
		std::byte *p = ptr(k, arg_buf, 4096, tail);
		long r = sys_ioctl(vk.get(), VIRTKIT_SPP_GET_STATS, p);
		bool writable = ok(k, 4096, tail, 64, true);
		if (!enabled)
			expect("SPP_GET_STATS", r, writable ? std::set<long>{-ENOENT}
							    : std::set<long>{-ENOENT, -EFAULT});
		else
			expect("SPP_GET_STATS", r, {writable ? 0 : -EFAULT});
		if (r == 0) {
			virtkit_spp_stats s;
			std::memcpy(&s, p, sizeof(s));
			TEST_ASSERT(s.protected_pages == model.size(),
				    "STATS protected_pages %llu, the model has %zu",
				    (unsigned long long)s.protected_pages, model.size());
			TEST_ASSERT(!s.reserved[0] && !s.reserved[1] && !s.reserved[2] && !s.reserved[3]);
			TEST_ASSERT(s.fast_writes == 0 && s.user_exits == 0);
		}
	}

	void run_call()
	{
		virtkit_vcpu_run a{};
		std::string what;
		a.vcpu_fd = pick_fd(what);
		if (rng.chance(10))
			a.flags = static_cast<u32>(fuzz_u64());
		if (rng.chance(10))
			a.reserved[rng.below(3)] = fuzz_u64();
		auto s = struct_arg(&a, sizeof(a));
		long r = sys_ioctl(vk.get(), VIRTKIT_VCPU_RUN, s.p);
		long want;
		if (!s.readable)
			want = -EFAULT;
		else if (a.flags || a.reserved[0] || a.reserved[1] || a.reserved[2])
			want = -EINVAL;
		else if (!is_open(a.vcpu_fd))
			want = -EBADF;
		else if (a.vcpu_fd == vm.vcpus[0].get())
			want = -EINTR; /* immediate_exit */
		else
			want = -EINVAL;
		expect(("VCPU_RUN(" + what + ")").c_str(), r, {want});
	}

	/*
	 * GUEST_WRMSR of MSRs whose write is harmless for the vCPU (which
	 * never runs): SYSENTER_CS (written), MSR_SMI_COUNT (read-only for
	 * the guest) and an MSR that does not exist (#GP, or ignored with
	 * kvm.ignore_msrs).
	 */
	void guest_wrmsr_call()
	{
		static const u32 msrs[] = {0x174, 0x34, 0x4b564dffu};
		virtkit_guest_wrmsr a{};
		std::string what;
		a.vcpu_fd = pick_fd(what);
		const unsigned m = rng.below(3);
		a.index = msrs[m];
		a.data = rng.below(0x10000);
		if (rng.chance(10))
			a.flags = static_cast<u32>(fuzz_u64());
		if (rng.chance(10))
			a.reserved[rng.below(5)] = fuzz_u64();
		auto s = struct_arg(&a, sizeof(a));
		long r = sys_ioctl(vk.get(), VIRTKIT_VCPU_GUEST_WRMSR, s.p);
		long want;
		if (!guest_wrmsr)
			want = -EOPNOTSUPP;
		else if (!s.readable)
			want = -EFAULT;
		else if (a.flags || std::any_of(std::begin(a.reserved), std::end(a.reserved),
						[](u64 v) { return v != 0; }))
			want = -EINVAL;
		else if (!is_open(a.vcpu_fd))
			want = -EBADF;
		else if (a.vcpu_fd == vm.vcpus[0].get())
			want = 0;
		else
			want = -EINVAL;
		expect(("GUEST_WRMSR(" + what + ")").c_str(), r, {want});
		if (r == 0) {
			virtkit_guest_wrmsr out;
			std::memcpy(&out, s.p, sizeof(out));
			std::set<u32> ok = {VIRTKIT_GUEST_WRMSR_GP};
			if (m == 0 || m == 2)
				ok.insert(VIRTKIT_GUEST_WRMSR_WRITTEN);
			TEST_ASSERT(ok.count(out.result), "GUEST_WRMSR of MSR 0x%x: result %u",
				    a.index, out.result);
		}
	}

	/* An ioctl number that is none of the module's. */
	unsigned long unknown_cmd()
	{
		static const unsigned long known[] = {
			VIRTKIT_GET_API_VERSION, VIRTKIT_CHECK_EXTENSION, VIRTKIT_ATTACH_VM,
			VIRTKIT_SPP_ENABLE, VIRTKIT_SPP_SET_ACCESS, VIRTKIT_SPP_GET_ACCESS,
			VIRTKIT_SPP_GET_STATS, VIRTKIT_VCPU_RUN, VIRTKIT_VCPU_GUEST_WRMSR};
		for (;;) {
			unsigned long c;
			if (rng.chance(70)) {
				static const unsigned sizes[] = {0, 4, 8, 16, 32, 64, 128};
				c = _IOC(rng.below(4), VIRTKIT_IO, rng.below(256),
					 rng.chance(70) ? sizes[rng.below(7)] : rng.below(1 << 14));
			} else {
				c = static_cast<u32>(rng.next());
			}
			if (std::find(std::begin(known), std::end(known), c) == std::end(known))
				return c;
		}
	}

	/* One call; SPP_ENABLE only after the first tenth of the run. */
	void step(bool may_enable)
	{
		unsigned what = rng.below(100);
		bool on_dev = rng.chance(30);
		if (what < 4) {
			/* A descriptor that is not open. */
			long r = sys_ioctl(rng.chance(50) ? -1 : closed_fd(), VIRTKIT_CHECK_EXTENSION, 1ul);
			expect("ioctl(closed fd)", r, {-EBADF});
		} else if (what < 14) {
			int fd = on_dev ? dev.get() : vk.get();
			long r = sys_ioctl(fd, unknown_cmd(),
					   rng.chance(50) ? fuzz_u64()
							  : reinterpret_cast<u64>(arg_buf.data()));
			expect(on_dev ? "unknown ioctl(/dev/virtkit)" : "unknown ioctl(per-VM fd)", r,
			       {-ENOTTY});
		} else if (what < 20) {
			version_or_cap(on_dev ? dev.get() : vk.get(), rng.chance(50));
		} else if (what < 27) {
			attach_call();
		} else if (what < 30) {
			/* The per-VM ioctls on /dev/virtkit, ATTACH on the per-VM fd. */
			static const unsigned long vm_only[] = {
				VIRTKIT_SPP_ENABLE, VIRTKIT_SPP_SET_ACCESS, VIRTKIT_SPP_GET_ACCESS,
				VIRTKIT_SPP_GET_STATS, VIRTKIT_VCPU_RUN, VIRTKIT_VCPU_GUEST_WRMSR};
			long r = sys_ioctl(dev.get(), vm_only[rng.below(6)], arg_buf.data());
			expect("per-VM ioctl on /dev/virtkit", r, {-ENOTTY});
			r = sys_ioctl(vk.get(), VIRTKIT_ATTACH_VM, arg_buf.data());
			expect("ATTACH_VM on the per-VM fd", r, {-ENOTTY});
		} else if (what < 33 || (!enabled && what < 35)) {
			if (may_enable)
				enable_call();
			else
				stats_call();
		} else if (what < 63) {
			access_call(true);
		} else if (what < 85) {
			access_call(false);
		} else if (what < 92) {
			stats_call();
		} else if (what < 96) {
			run_call();
		} else {
			guest_wrmsr_call();
		}
	}

	/* GET everything the model knows, and around the bases. */
	void check_final()
	{
		if (!enabled)
			EXPECT_OK(spp_enable(vk.get()));
		for (auto [gfn, map] : model)
			TEST_ASSERT_EQ(get_maps(vk.get(), gfn, 1)[0], map);
		for (u64 b : bases) {
			u64 n = std::min<u64>(8192, LIMIT - b);
			auto maps = get_maps(vk.get(), b, n);
			for (u64 i = 0; i < n; i++) {
				auto it = model.find(b + i);
				TEST_ASSERT_EQ(maps[i], it == model.end() ? ALL : it->second);
			}
		}
		TEST_ASSERT_EQ(stats(vk.get()).protected_pages, model.size());
	}
};

} // namespace

VK_TEST(fuzz_ioctls)
{
	require_module();
	vkt::kvm();
	const u64 seed = env_u64("VIRTKIT_FUZZ_SEED", static_cast<u64>(time(nullptr)) ^
							      (static_cast<u64>(getpid()) << 32));
	const u64 iters = env_u64("VIRTKIT_FUZZ_ITERS", 20000);
	vkt::diag("seed %llu, %llu calls (VIRTKIT_FUZZ_SEED=%llu repeats this run)",
		  (unsigned long long)seed, (unsigned long long)iters, (unsigned long long)seed);
	const long vk0 = module_refcnt("virtkit"), kvm0 = module_refcnt(kvm_vendor_module());
	const int fds0 = vkt::open_fd_count();
	{
		Fuzzer f(seed);
		for (u64 i = 0; i < iters; i++)
			f.step(i >= iters / 10);
		f.check_final();
		std::string summary;
		for (auto &[k, n] : f.outcomes)
			vkt::diag("%6llu  %s", (unsigned long long)n, k.c_str());
		vkt::diag("%zu protected pages at the end", f.model.size());
	}
	TEST_ASSERT_EQ(vkt::open_fd_count(), fds0);
	TEST_ASSERT_EQ(module_refcnt("virtkit"), vk0);
	TEST_ASSERT_EQ(module_refcnt(kvm_vendor_module()), kvm0);
}

/* Random bytes as every argument struct, on both files. */
VK_TEST(fuzz_random_struct_bytes)
{
	require_module();
	vkt::kvm();
	const u64 seed = env_u64("VIRTKIT_FUZZ_SEED", static_cast<u64>(time(nullptr)) + 1);
	vkt::diag("seed %llu", (unsigned long long)seed);
	Rng rng(seed);
	const long vk0 = module_refcnt("virtkit");
	{
		auto dev = open_dev();
		RawVm vm(1);
		auto vk = attach_ok(dev.get(), vm.vm.get());
		EXPECT_OK(spp_enable(vk.get()));
		u32 m = 0x0u;
		EXPECT_OK(spp_set(vk.get(), 5, 1, &m));
		alignas(8) std::byte buf[64];
		const unsigned long cmds[] = {VIRTKIT_ATTACH_VM, VIRTKIT_SPP_ENABLE,
					      VIRTKIT_SPP_SET_ACCESS, VIRTKIT_SPP_GET_ACCESS,
					      VIRTKIT_VCPU_RUN};
		for (int i = 0; i < 5000; i++) {
			for (auto &b : buf)
				b = static_cast<std::byte>(rng.next());
			unsigned long cmd = cmds[rng.below(5)];
			int fd = cmd == VIRTKIT_ATTACH_VM ? dev.get() : vk.get();
			long r = sys_ioctl(fd, cmd, buf);
			/*
			 * Random reserved words are non-zero: EINVAL, unless the
			 * random fd is not open (EBADF, checked after them).
			 */
			TEST_ASSERT(r == -EINVAL || r == -EBADF || (cmd == VIRTKIT_SPP_ENABLE && r == 0),
				    "cmd 0x%lx with random bytes: %s", cmd, result_name(r).c_str());
		}
		TEST_ASSERT_EQ(get_maps(vk.get(), 5, 1)[0], 0u);
		TEST_ASSERT_EQ(stats(vk.get()).protected_pages, 1u);
	}
	TEST_ASSERT_EQ(module_refcnt("virtkit"), vk0);
}

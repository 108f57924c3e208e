// SPDX-License-Identifier: MIT
/*
 * Guest RAM mapped into the tool (VIRTKIT_KVMI_SHARE_MEMORY,
 * Session::map_guest_memory()) on real KVM: the mapping shows what the
 * guest writes, also after it was made; it is read-only (PROT_WRITE is
 * refused, a store faults); it is refused unless the VMM opted in
 * (IntrospectionOptions::share_memory); reads are bounds-checked; no
 * descriptor or mapping is left behind on either side (the tool and the
 * VMM are this process).
 */
#include "guest_code.hpp"
#include "kvmi_util.hpp"

#include <linux/virtkit_kvmi.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>

using namespace virtkit;
using namespace vkt;
namespace g_ = kvmi_guest;

static constexpr std::uint64_t page_gpa = data_gpa + 4096;

static std::uint64_t word(std::uint64_t seed, std::uint64_t i)
{
	return seed * 0x9e3779b97f4a7c15ull + i;
}

/* The guest fills a page with seed 1, syncs, then with seed 2. */
static void guest_fill_twice(std::uint64_t gva)
{
	for (std::uint64_t seed = 1; seed <= 2; seed++) {
		for (std::uint64_t i = 0; i < 512; i++)
			g_::write64(gva + i * 8, seed * 0x9e3779b97f4a7c15ull + i);
		GUEST_SYNC(seed);
	}
}

static void guest_idle(std::uint64_t stop) { g_::wait_for(stop); }

static std::vector<std::byte> payload(const virtkit_kvmi_share_memory &c)
{
	std::vector<std::byte> p(sizeof(c));
	std::memcpy(p.data(), &c, sizeof(c));
	return p;
}

/*
 * The descriptors of this process, once back to `want` (up to 2 s): the
 * VMM's reader closes its own copies right after sendmsg() returns, which
 * may be after the tool (another thread here) has received them.
 */
static int fd_count_settled(int want)
{
	int n = open_fd_count();
	for (int i = 0; i < 200 && n != want; i++) {
		::usleep(10000);
		n = open_fd_count();
	}
	return n;
}

/*
 * Mappings of memfds (guest RAM: the VMM's own and the tool's). Not every
 * mapping: another thread's malloc arena may grow meanwhile (mprotect
 * splits its mapping).
 */
static int memfd_mapping_count()
{
	int n = 0;
	for (const auto &line : mappings())
		n += line.find("memfd:") != std::string::npos;
	return n;
}

static virtkit::IntrospectionOptions sharing(const KvmiTest &t)
{
	auto o = t.default_options();
	o.share_memory = true;
	return o;
}

static void expect_page(const intro::GuestMapping &m, std::uint64_t seed)
{
	std::vector<std::byte> got(4096);
	m.read(page_gpa, got);
	for (std::uint64_t i = 0; i < 512; i++) {
		std::uint64_t v;
		std::memcpy(&v, got.data() + i * 8, 8);
		TEST_ASSERT_EQ(v, word(seed, i));
	}
}

VK_TEST(mapping_shows_what_the_guest_writes)
{
	KvmiTest t;
	auto &r = t.add_vcpu(guest_fill_twice, page_gpa);
	t.attach(sharing(t));
	TEST_ASSERT_EQ(t.t().check_command(VIRTKIT_KVMI_SHARE_MEMORY), 0);
	r.run_sync(1);
	auto m = t.t().map_guest_memory();

	/* The layout is the VMM's. */
	auto regions = t.g.memory().regions();
	TEST_ASSERT_EQ(m.regions().size(), regions.size());
	bool found = false;
	for (const auto &reg : m.regions())
		found |= reg.gpa == data_gpa && reg.size == data_size;
	TEST_ASSERT(found, "the data region is not in the mapping");

	expect_page(m, 1);
	/* Live: the guest's next writes show without mapping again. */
	r.run_sync(2);
	expect_page(m, 2);

	/* The whole data region equals the VMM's view, and view() is the same bytes. */
	std::vector<std::byte> all(data_size), truth(data_size);
	m.read(data_gpa, all);
	t.g.memory().read(data_gpa, truth);
	TEST_ASSERT(all == truth);
	auto v = m.view(page_gpa, 4096);
	TEST_ASSERT(std::equal(v.begin(), v.end(), truth.begin() + 4096));

	/* KVMI reads agree with the mapping. */
	TEST_ASSERT(t.t().read_physical(data_gpa, data_size) == all);
	r.run_done();
}

VK_TEST(mapping_reads_are_bounds_checked)
{
	KvmiTest t;
	t.add_vcpu(guest_idle, data_gpa);
	t.attach(sharing(t));
	auto m = t.t().map_guest_memory();
	std::vector<std::byte> buf(64, std::byte{0x5a});
	auto expect_efault = [&](const char *op, auto &&f) {
		bool threw = false;
		try {
			f();
		} catch (const Error &e) {
			threw = true;
			TEST_ASSERT_EQ(e.err(), EFAULT);
			TEST_ASSERT(std::string(e.what()).find(op) != std::string::npos,
				    "the error does not name %s: %s", op, e.what());
		}
		TEST_ASSERT(threw, "%s: succeeded outside guest RAM", op);
	};
	expect_efault("GuestMapping::read", [&] { m.read(hole_gpa, buf); });
	/* Across the end of the data region (nothing follows it). */
	expect_efault("GuestMapping::read", [&] { m.read(data_gpa + data_size - 32, buf); });
	expect_efault("GuestMapping::read", [&] { m.read(~0ull - 16, buf); });
	expect_efault("GuestMapping::view", [&] { m.view(data_gpa + data_size - 32, 64); });
	expect_efault("GuestMapping::view", [&] { m.view(hole_gpa, 1); });
	/* Nothing was copied by the failed reads. */
	for (auto b : buf)
		TEST_ASSERT_EQ((int)b, 0x5a);
	/* An empty mapping reads nothing. */
	intro::GuestMapping none;
	TEST_ASSERT_EQ(none.regions().size(), 0u);
	expect_efault("GuestMapping::read", [&] { none.read(data_gpa, buf); });
	t.poke(data_gpa, 1);
}

VK_TEST(mapping_is_read_only)
{
	KvmiTest t;
	t.add_vcpu(guest_idle, data_gpa);
	t.attach(sharing(t));
	auto m = t.t().map_guest_memory();
	auto v = m.view(page_gpa, 4096);
	auto *page = const_cast<std::byte *>(v.data());
	/* The file is open read-only: a shared writable mapping is refused. */
	TEST_ASSERT(::mprotect(page, 4096, PROT_READ | PROT_WRITE) < 0,
		    "mprotect(PROT_WRITE) of the guest mapping succeeded");
	TEST_ASSERT_EQ(errno, EACCES);
	/*
	 * A store faults: in a child, whose own SIGSEGV handler exits with
	 * faulted_exit for an access fault at the page (a handler, not death
	 * by the signal: a sanitizer's handler would turn that into an exit).
	 */
	constexpr int faulted_exit = 42;
	pid_t pid = ::fork();
	TEST_ASSERT(pid >= 0, "fork");
	if (pid == 0) {
		static void *volatile expected;
		expected = page;
		struct sigaction sa{};
		sa.sa_flags = SA_SIGINFO;
		sa.sa_sigaction = [](int, siginfo_t *info, void *) {
			::_exit(info->si_code == SEGV_ACCERR && info->si_addr == expected ? faulted_exit : 1);
		};
		::sigaction(SIGSEGV, &sa, nullptr);
		*reinterpret_cast<volatile std::uint8_t *>(page) = 1;
		::_exit(0);
	}
	int status = 0;
	TEST_ASSERT(::waitpid(pid, &status, 0) == pid, "waitpid");
	TEST_ASSERT(WIFEXITED(status) && WEXITSTATUS(status) == faulted_exit,
		    "a store through the mapping did not fault at the page (status 0x%x)", status);
	TEST_ASSERT_EQ(t.peek(page_gpa), 0u);
	t.poke(data_gpa, 1);
}

VK_TEST(refused_without_opt_in)
{
	KvmiTest t;
	t.add_vcpu(guest_idle, data_gpa);
	t.attach(); /* share_memory off: the default */
	const int fds0 = open_fd_count();
	TEST_ASSERT_EQ(t.t().check_command(VIRTKIT_KVMI_SHARE_MEMORY), EPERM);
	EXPECT_KVMI_ERROR(t.t().map_guest_memory(), KVMI_EPERM);
	try {
		(void)t.t().map_guest_memory();
	} catch (const intro::CommandError &e) {
		TEST_ASSERT(std::string(e.what()).find("VIRTKIT_KVMI_SHARE_MEMORY") !=
				    std::string::npos,
			    "the error does not name the command: %s", e.what());
		TEST_ASSERT(std::string(e.what()).find("share_memory") != std::string::npos,
			    "the error does not say why: %s", e.what());
	}
	/* The session goes on. */
	TEST_ASSERT(t.t().connected(), "refusal disconnected");
	TEST_ASSERT_EQ(t.t().get_version().version, (std::uint32_t)KVMI_VERSION);
	TEST_ASSERT_EQ(fd_count_settled(fds0), fds0);
	t.poke(data_gpa, 1);
}

VK_TEST(malformed_requests_are_refused)
{
	KvmiTest t;
	t.add_vcpu(guest_idle, data_gpa);
	t.attach(sharing(t));
	const int fds0 = open_fd_count();
	virtkit_kvmi_share_memory c{};
	c.flags = 1;
	EXPECT_RAW_ERROR(t.t().request_raw(VIRTKIT_KVMI_SHARE_MEMORY, payload(c)), KVMI_EINVAL);
	c.flags = 0;
	c.padding = 1;
	EXPECT_RAW_ERROR(t.t().request_raw(VIRTKIT_KVMI_SHARE_MEMORY, payload(c)), KVMI_EINVAL);
	EXPECT_RAW_ERROR(t.t().request_raw(VIRTKIT_KVMI_SHARE_MEMORY, {}), KVMI_EINVAL);
	/* A valid raw request: the descriptors nobody asked for are closed. */
	c.padding = 0;
	auto r = t.t().request_raw(VIRTKIT_KVMI_SHARE_MEMORY, payload(c));
	TEST_ASSERT_EQ(r.err, 0);
	TEST_ASSERT(t.t().connected(), "disconnected");
	TEST_ASSERT_EQ(fd_count_settled(fds0), fds0);
	t.poke(data_gpa, 1);
}

VK_TEST(no_descriptor_or_mapping_left_behind)
{
	KvmiTest t;
	auto &r = t.add_vcpu(guest_fill_twice, page_gpa);
	t.attach(sharing(t));
	r.run_sync(1);
	const int fds0 = open_fd_count();
	const int maps0 = memfd_mapping_count();
	for (int i = 0; i < 3; i++) {
		auto m = t.t().map_guest_memory();
		expect_page(m, 1);
		TEST_ASSERT_EQ(memfd_mapping_count(), maps0 + (int)m.regions().size());
		/* The descriptors are closed once mapped, on both sides. */
		TEST_ASSERT_EQ(fd_count_settled(fds0), fds0);
		auto moved = std::move(m);
		expect_page(moved, 1);
	}
	TEST_ASSERT_EQ(fd_count_settled(fds0), fds0);
	TEST_ASSERT_EQ(memfd_mapping_count(), maps0);
	r.run_sync(2);
	r.run_done();
}

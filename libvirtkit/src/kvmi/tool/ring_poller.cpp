// SPDX-License-Identifier: MIT
/*
 * The io_uring backend of EventLoop.
 *
 * Setup, tried in order: IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN (6.1:
 * completions are produced only when this thread waits, with no task-work
 * interrupts in between), SINGLE_ISSUER alone (6.0), plain. EINVAL moves
 * to the next; any other failure (ENOSYS from a seccomp filter or a kernel
 * without io_uring, EPERM from kernel.io_uring_disabled, ENOMEM from the
 * memlock limit of old kernels) means no io_uring: RingUnavailable, and
 * the caller uses epoll.
 *
 * With SINGLE_ISSUER the ring is created disabled (IORING_SETUP_R_DISABLED)
 * and enabled by the first wait(), so the submitter is the thread that runs
 * the loop, not the one that constructed it.
 *
 * Sockets are watched with multishot poll (5.13) and listeners with
 * multishot accept (5.19): armed once, a completion per readiness or per
 * connection with IORING_CQE_F_MORE; one without F_MORE ends the request
 * (cancelled, the CQ overflowed, an error) and the loop arms it again. A
 * ring that has SINGLE_ISSUER is 6.0 or later and has both; otherwise
 * IORING_FEAT_RSRC_TAGS (5.13) and IORING_OP_SOCKET (5.19, probed) stand
 * for them. A kernel that still answers a multishot request with EINVAL
 * gets one-shot requests from then on.
 *
 * Receiving through the ring (IORING_OP_RECV, multishot recv with provided
 * buffers) is not done, on purpose: a command issued from a callback reads
 * its reply from the same socket synchronously (channel.hpp). A receive
 * armed in the ring could take those bytes first, into a buffer that only
 * the loop looks at once the callback returns: the command would wait for
 * a reply that already arrived, until its timeout. Readiness is safe with
 * that design - whoever reads, reads from the socket into the channel's one
 * buffer in stream order - and a receive is not.
 */
#include <liburing.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <map>

#include "kvmi/tool/poller.hpp"

namespace virtkit::introspect::detail {

namespace {

/* "kernel.io_uring_disabled=2" when the sysctl forbids io_uring. */
std::string disabled_sysctl()
{
	std::ifstream in("/proc/sys/kernel/io_uring_disabled");
	int v = 0;
	if (in >> v && v != 0)
		return "kernel.io_uring_disabled=" + std::to_string(v);
	return {};
}

class RingPoller final : public Poller {
public:
	RingPoller(unsigned entries, bool multishot);
	~RingPoller() override;
	RingPoller(const RingPoller &) = delete;
	RingPoller &operator=(const RingPoller &) = delete;

	void watch(int fd, std::uint64_t tag, Watch kind) override;
	void unwatch(std::uint64_t tag) override;
	bool watching(std::uint64_t tag) const noexcept override { return watched_.count(tag) != 0; }
	void wait(Clock::time_point deadline, std::vector<Completion> &out) override;
	void drain(std::vector<Completion> &out) override;
	void park(std::vector<Completion> &out) override;
	bool bound_elsewhere() const noexcept override
	{
		/* The kernel's thread id, not std::thread::id: a pthread_t is
		 * reused as soon as its thread has been joined. */
		return single_issuer_ && enabled_ && owner_ != ::gettid();
	}

private:
	struct Entry {
		int fd;
		Watch kind;
		bool multishot;
	};

	io_uring_sqe *sqe();
	void enable();
	void arm(int fd, std::uint64_t tag, const Entry &e);
	void describe();
	void take(std::vector<io_uring_cqe> &cqes);
	void handle(const io_uring_cqe &cqe, std::vector<Completion> &out);

	io_uring ring_{};
	bool single_issuer_ = false, defer_taskrun_ = false;
	bool multishot_poll_ = false, multishot_accept_ = false;
	bool enabled_ = false;
	pid_t owner_ = 0;
	std::map<std::uint64_t, Entry> watched_;
	/* Accepts cancelled whose last completion has not come: a connection
	 * they still bring is closed. */
	std::map<std::uint64_t, bool> cancelled_accepts_;
	/* Accepts park() cancelled: a connection they still bring is the
	 * loop's. */
	std::map<std::uint64_t, bool> parking_;
};

RingPoller::RingPoller(unsigned entries, bool multishot) : Poller(LoopBackend::io_uring, {})
{
	struct Attempt {
		unsigned flags;
		bool single_issuer, defer_taskrun;
	};
	const Attempt attempts[] = {
		{IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_R_DISABLED,
		 true, true},
		{IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_R_DISABLED, true, false},
		{0, false, false},
	};
	io_uring_params params{};
	int ret = -EINVAL;
	for (const auto &a : attempts) {
		params = io_uring_params{};
		params.flags = a.flags;
		ret = io_uring_queue_init_params(entries, &ring_, &params);
		if (ret == 0) {
			single_issuer_ = a.single_issuer;
			defer_taskrun_ = a.defer_taskrun;
			break;
		}
		if (ret != -EINVAL)
			break;
	}
	if (ret < 0) {
		/* EINVAL with plain flags: entries out of range. */
		std::string why = ret == -EINVAL ? std::to_string(entries) + " entries"
						 : disabled_sysctl();
		throw RingUnavailable("io_uring_setup", -ret, why);
	}
	enabled_ = !single_issuer_;

	io_uring_probe *probe = io_uring_get_probe_ring(&ring_);
	bool accept_op = !probe || io_uring_opcode_supported(probe, IORING_OP_ACCEPT);
	bool socket_op = probe && io_uring_opcode_supported(probe, IORING_OP_SOCKET);
	if (probe)
		io_uring_free_probe(probe);
	if (!accept_op) {
		io_uring_queue_exit(&ring_);
		throw RingUnavailable("io_uring", EOPNOTSUPP, "the kernel has no IORING_OP_ACCEPT (5.5)");
	}
	multishot_poll_ = multishot && (single_issuer_ || (params.features & IORING_FEAT_RSRC_TAGS));
	multishot_accept_ = multishot && (single_issuer_ || socket_op);
	describe();
}

RingPoller::~RingPoller()
{
	/* Connections accepted for requests nobody will read: close them. */
	std::vector<io_uring_cqe> cqes;
	take(cqes);
	for (auto &c : cqes) {
		auto w = watched_.find(c.user_data);
		bool accept = (w != watched_.end() && w->second.kind == Watch::accept) ||
			      cancelled_accepts_.count(c.user_data) || parking_.count(c.user_data);
		if (accept && c.res >= 0)
			::close(c.res);
	}
	io_uring_queue_exit(&ring_);
}

void RingPoller::describe()
{
	std::string d = "io_uring (";
	d += multishot_poll_ ? "multishot poll" : "one-shot poll";
	d += multishot_accept_ ? ", multishot accept" : ", one-shot accept";
	if (defer_taskrun_)
		d += ", defer_taskrun";
	else if (single_issuer_)
		d += ", single_issuer";
	description_ = d + ")";
}

void RingPoller::enable()
{
	if (enabled_)
		return;
	/* The system call: liburing 2.3's shared library (Debian 12) does not
	 * export io_uring_enable_rings(). */
	if (::syscall(__NR_io_uring_register, ring_.ring_fd, IORING_REGISTER_ENABLE_RINGS,
		      nullptr, 0) < 0)
		throw Error("io_uring_register", errno, "IORING_REGISTER_ENABLE_RINGS");
	enabled_ = true;
	owner_ = ::gettid();
}

io_uring_sqe *RingPoller::sqe()
{
	io_uring_sqe *s = io_uring_get_sqe(&ring_);
	if (!s) {
		enable();
		int ret = io_uring_submit(&ring_);
		if (ret < 0)
			throw Error("io_uring_submit", -ret);
		s = io_uring_get_sqe(&ring_);
	}
	if (!s)
		throw Error("io_uring_get_sqe", EBUSY, "the submission queue is full");
	return s;
}

void RingPoller::arm(int fd, std::uint64_t tag, const Entry &e)
{
	io_uring_sqe *s = sqe();
	if (e.kind == Watch::readable) {
		if (e.multishot)
			io_uring_prep_poll_multishot(s, fd, POLLIN);
		else
			io_uring_prep_poll_add(s, fd, POLLIN);
	} else {
		if (e.multishot)
			io_uring_prep_multishot_accept(s, fd, nullptr, nullptr,
						       SOCK_NONBLOCK | SOCK_CLOEXEC);
		else
			io_uring_prep_accept(s, fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
	}
	io_uring_sqe_set_data64(s, tag);
}

void RingPoller::watch(int fd, std::uint64_t tag, Watch kind)
{
	if (watched_.count(tag))
		throw Error("io_uring watch", EEXIST, "tag already watched");
	Entry e{fd, kind, kind == Watch::readable ? multishot_poll_ : multishot_accept_};
	arm(fd, tag, e);
	watched_.emplace(tag, e);
}

void RingPoller::unwatch(std::uint64_t tag)
{
	auto it = watched_.find(tag);
	if (it == watched_.end())
		return;
	Watch kind = it->second.kind;
	watched_.erase(it);
	io_uring_sqe *s = sqe();
	if (kind == Watch::readable) {
		io_uring_prep_poll_remove(s, tag);
	} else {
		io_uring_prep_cancel64(s, tag, 0);
		cancelled_accepts_.emplace(tag, true);
	}
	io_uring_sqe_set_data64(s, 0);
}

void RingPoller::take(std::vector<io_uring_cqe> &cqes)
{
	unsigned head;
	unsigned n = 0;
	io_uring_cqe *c;
	io_uring_for_each_cqe(&ring_, head, c)
	{
		n++;
		if (c->user_data != 0 && c->user_data != LIBURING_UDATA_TIMEOUT)
			cqes.push_back(*c);
	}
	io_uring_cq_advance(&ring_, n);
}

void RingPoller::handle(const io_uring_cqe &cqe, std::vector<Completion> &out)
{
	std::uint64_t tag = cqe.user_data;
	bool more = cqe.flags & IORING_CQE_F_MORE;
	if (auto p = parking_.find(tag); p != parking_.end()) {
		if (!more)
			parking_.erase(p);
		if (cqe.res >= 0 || (!more && cqe.res != -ECANCELED))
			out.push_back({tag, cqe.res, false});
		return;
	}
	auto it = watched_.find(tag);
	if (it == watched_.end()) {
		auto c = cancelled_accepts_.find(tag);
		if (c != cancelled_accepts_.end()) {
			if (cqe.res >= 0)
				::close(cqe.res);
			if (!more)
				cancelled_accepts_.erase(c);
		}
		return; /* unwatched: a late completion */
	}
	Entry &e = it->second;
	if (cqe.res == -EINVAL && e.multishot) {
		/* A kernel without this multishot request after all. */
		(e.kind == Watch::readable ? multishot_poll_ : multishot_accept_) = false;
		describe();
		e.multishot = false;
		arm(e.fd, tag, e);
		return;
	}
	if (!more)
		watched_.erase(it);
	out.push_back({tag, cqe.res, more});
}

void RingPoller::wait(Clock::time_point deadline, std::vector<Completion> &out)
{
	enable();
	__kernel_timespec ts{};
	__kernel_timespec *tsp = nullptr;
	if (deadline != Clock::time_point::max()) {
		auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - Clock::now());
		if (ns.count() < 0)
			ns = std::chrono::nanoseconds(0);
		ts.tv_sec = ns.count() / 1000000000;
		ts.tv_nsec = ns.count() % 1000000000;
		tsp = &ts;
	}
	io_uring_cqe *first = nullptr;
	int ret = io_uring_submit_and_wait_timeout(&ring_, &first, 1, tsp, nullptr);
	if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EBUSY && ret != -EAGAIN)
		throw Error("io_uring_submit_and_wait_timeout", -ret);
	drain(out);
}

void RingPoller::park(std::vector<Completion> &out)
{
	/* Only a ring bound to a thread can be replaced; only that thread
	 * may submit (the loop rebinds first thing, so that is this one). */
	if (!single_issuer_ || !enabled_ || bound_elsewhere())
		return;
	for (auto it = watched_.begin(); it != watched_.end();) {
		if (it->second.kind != Watch::accept) {
			++it;
			continue;
		}
		io_uring_sqe *s = sqe();
		io_uring_prep_cancel64(s, it->first, 0);
		io_uring_sqe_set_data64(s, 0);
		parking_.emplace(it->first, true);
		it = watched_.erase(it);
	}
	/* The cancellation runs at submission; a connection the request had
	 * already taken comes first. */
	while (!parking_.empty()) {
		io_uring_cqe *first = nullptr;
		int ret = io_uring_submit_and_wait(&ring_, 1);
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
			throw Error("io_uring_submit_and_wait", -ret, "cancelling accepts");
		(void)first;
		drain(out);
	}
}

void RingPoller::drain(std::vector<Completion> &out)
{
	/* Copied out first: handling one may submit (a re-arm). */
	std::vector<io_uring_cqe> cqes;
	take(cqes);
	for (auto &c : cqes)
		handle(c, out);
}

} // namespace

std::unique_ptr<Poller> make_ring_poller(unsigned entries, bool multishot)
{
	return std::make_unique<RingPoller>(entries, multishot);
}

} // namespace virtkit::introspect::detail

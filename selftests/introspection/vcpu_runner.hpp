// SPDX-License-Identifier: MIT
/*
 * VcpuRunner: runs one GuestVm vCPU on its own thread, one guest ucall at a
 * time, so that the test's thread can play the introspection tool while the
 * vCPU is in the guest or blocked in an event. Every wait is bounded: a vCPU
 * that does not reach its next ucall in time fails the test instead of
 * hanging it.
 */
#pragma once

#include "test.hpp"

#include <virtkit/x86/guest_vm.hpp>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <variant>

namespace vkt {

class VcpuRunner {
public:
	using Ucall = virtkit::x86::Ucall;
	/* What one run of the vCPU ended with. */
	using Result = std::variant<Ucall, virtkit::Exit, std::exception_ptr>;

	VcpuRunner(virtkit::x86::GuestVm &g, virtkit::Vcpu &v) : g_(g), v_(v)
	{
		thread_ = std::thread([this] { loop(); });
	}
	VcpuRunner(const VcpuRunner &) = delete;
	VcpuRunner &operator=(const VcpuRunner &) = delete;
	~VcpuRunner() { stop(); }

	virtkit::Vcpu &vcpu() noexcept { return v_; }

	/* Let the vCPU run to its next ucall (raw: to its next exit, via Vcpu::run()). */
	void resume(bool raw = false)
	{
		std::lock_guard lock(mu_);
		if (busy_ || requests_)
			fail(__FILE__, __LINE__, format("vcpu %u resumed while running", v_.id()));
		requests_++;
		raw_ = raw;
		cv_.notify_all();
	}

	/* The result of the last resume(), waiting at most `timeout`; nullopt on timeout. */
	std::optional<Result> try_wait(std::chrono::milliseconds timeout)
	{
		std::unique_lock lock(mu_);
		if (!cv_.wait_for(lock, timeout, [&] { return !results_.empty(); }))
			return std::nullopt;
		Result r = std::move(results_.front());
		results_.pop_front();
		return r;
	}

	/* Put a result taken with try_wait() back. */
	void results_push_front(Result r)
	{
		std::lock_guard lock(mu_);
		results_.push_front(std::move(r));
	}

	/* The next ucall; guest failures are rethrown, a timeout or a bare exit fails. */
	Ucall wait(std::chrono::milliseconds timeout = std::chrono::seconds(10))
	{
		auto r = try_wait(timeout);
		if (!r)
			fail(__FILE__, __LINE__,
			     format("vcpu %u: no ucall within %lld ms", v_.id(),
				    (long long)timeout.count()));
		if (auto *e = std::get_if<std::exception_ptr>(&*r))
			std::rethrow_exception(*e);
		if (auto *x = std::get_if<virtkit::Exit>(&*r))
			fail(__FILE__, __LINE__,
			     format("vcpu %u: exit %s instead of a ucall", v_.id(),
				    virtkit::describe(*x).c_str()));
		return std::get<Ucall>(*r);
	}

	/* The exit of a raw resume(). */
	virtkit::Exit wait_exit(std::chrono::milliseconds timeout = std::chrono::seconds(10))
	{
		auto r = try_wait(timeout);
		if (!r)
			fail(__FILE__, __LINE__,
			     format("vcpu %u: no exit within %lld ms", v_.id(),
				    (long long)timeout.count()));
		if (auto *e = std::get_if<std::exception_ptr>(&*r))
			std::rethrow_exception(*e);
		if (auto *u = std::get_if<Ucall>(&*r))
			fail(__FILE__, __LINE__,
			     format("vcpu %u: ucall %s instead of a bare exit", v_.id(),
				    u->describe().c_str()));
		return std::get<virtkit::Exit>(*r);
	}

	Ucall run(std::chrono::milliseconds timeout = std::chrono::seconds(10))
	{
		resume();
		return wait(timeout);
	}

	/* Expect a GUEST_SYNC whose first argument is `tag`; returns its arguments. */
	std::vector<std::uint64_t> expect_sync(std::uint64_t tag,
					       std::chrono::milliseconds timeout = std::chrono::seconds(10))
	{
		Ucall uc = wait(timeout);
		if (uc.kind != Ucall::Kind::sync || uc.args.empty() || uc.args[0] != tag)
			fail(__FILE__, __LINE__,
			     format("vcpu %u: expected GUEST_SYNC(%llu, ...), got %s", v_.id(),
				    (unsigned long long)tag, uc.describe().c_str()));
		return uc.args;
	}

	void expect_done(std::chrono::milliseconds timeout = std::chrono::seconds(10))
	{
		Ucall uc = wait(timeout);
		if (uc.kind != Ucall::Kind::done)
			fail(__FILE__, __LINE__,
			     format("vcpu %u: expected GUEST_DONE, got %s", v_.id(),
				    uc.describe().c_str()));
	}

	std::vector<std::uint64_t> run_sync(std::uint64_t tag,
					    std::chrono::milliseconds timeout = std::chrono::seconds(10))
	{
		resume();
		return expect_sync(tag, timeout);
	}
	void run_done(std::chrono::milliseconds timeout = std::chrono::seconds(10))
	{
		resume();
		expect_done(timeout);
	}

	/* Whether the vCPU is inside a run (in the guest, or blocked in an event). */
	bool running()
	{
		std::lock_guard lock(mu_);
		return busy_ || requests_;
	}

	/*
	 * Stop the thread: a vCPU in the guest is kicked out of it. A vCPU
	 * blocked in an introspection event only returns once the event is
	 * answered or the connection is gone, so disconnect before this.
	 */
	void stop()
	{
		if (!thread_.joinable())
			return;
		{
			std::lock_guard lock(mu_);
			stop_ = true;
			cv_.notify_all();
		}
		for (int i = 0; i < 2000; i++) {
			{
				std::lock_guard lock(mu_);
				if (done_)
					break;
			}
			v_.kick();
			std::this_thread::sleep_for(std::chrono::milliseconds(5));
		}
		bool done;
		{
			std::lock_guard lock(mu_);
			done = done_;
		}
		if (!done) {
			/* Cannot throw from here; the vCPU hangs: say so and let the harness fail. */
			diag("vcpu %u does not stop (blocked in an event?)", v_.id());
			std::fflush(stdout);
			_exit(1);
		}
		thread_.join();
	}

private:
	void loop()
	{
		for (;;) {
			bool raw;
			{
				std::unique_lock lock(mu_);
				cv_.wait(lock, [&] { return requests_ || stop_; });
				if (stop_ && !requests_)
					break;
				requests_--;
				busy_ = true;
				raw = raw_;
			}
			Result r;
			try {
				if (raw)
					r = v_.run();
				else
					r = g_.run(v_);
			} catch (...) {
				r = std::current_exception();
			}
			std::lock_guard lock(mu_);
			busy_ = false;
			results_.push_back(std::move(r));
			cv_.notify_all();
		}
		std::lock_guard lock(mu_);
		done_ = true;
	}

	virtkit::x86::GuestVm &g_;
	virtkit::Vcpu &v_;
	std::mutex mu_;
	std::condition_variable cv_;
	unsigned requests_ = 0;
	bool raw_ = false;
	bool busy_ = false;
	bool stop_ = false;
	bool done_ = false;
	std::deque<Result> results_;
	std::thread thread_;
};

} // namespace vkt

// SPDX-License-Identifier: MIT
/* The per-VM feature slots (core/feature_slots.hpp): identity, order, failure. */
#include <catch2/catch.hpp>

#include <atomic>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/feature_slots.hpp"

using virtkit::detail::FeatureSlots;

namespace {

/* Records its destruction in a shared log. */
struct Logged {
	Logged(std::vector<std::string> &log, std::string name) : log_(log), name_(std::move(name)) {}
	~Logged() { log_.push_back(name_); }
	std::vector<std::string> &log_;
	std::string name_;
};
struct Attachment : Logged {
	using Logged::Logged;
};
struct Feature : Logged {
	Feature(std::vector<std::string> &log, Attachment &needs)
		: Logged(log, "feature"), needs_(needs) {}
	Attachment &needs_;
};
struct Other : Logged {
	using Logged::Logged;
};

} // namespace

TEST_CASE("a feature slot holds one object per type, found once attached", "[feature_slots]")
{
	std::vector<std::string> log;
	FeatureSlots slots;
	CHECK(slots.find<Other>() == nullptr);
	int made = 0;
	auto make = [&] {
		made++;
		return std::make_unique<Other>(log, "other");
	};
	Other &a = slots.get_or_attach<Other>(make);
	Other &b = slots.get_or_attach<Other>(make);
	CHECK(&a == &b);
	CHECK(made == 1);
	CHECK(slots.find<Other>() == &a);
	CHECK(slots.find<Attachment>() == nullptr);
}

TEST_CASE("what a feature attaches for itself is destroyed after it", "[feature_slots]")
{
	std::vector<std::string> log;
	{
		FeatureSlots slots;
		slots.get_or_attach<Other>([&] { return std::make_unique<Other>(log, "first"); });
		/* The feature attaches its dependency from inside its own make(). */
		slots.get_or_attach<Feature>([&] {
			auto &att = slots.get_or_attach<Attachment>(
				[&] { return std::make_unique<Attachment>(log, "attachment"); });
			return std::make_unique<Feature>(log, att);
		});
		CHECK(&slots.find<Feature>()->needs_ == slots.find<Attachment>());
		CHECK(log.empty());
	}
	CHECK(log == std::vector<std::string>{"feature", "attachment", "first"});
}

TEST_CASE("a make() that throws attaches nothing", "[feature_slots]")
{
	std::vector<std::string> log;
	FeatureSlots slots;
	CHECK_THROWS_AS(slots.get_or_attach<Other>([&]() -> std::unique_ptr<Other> {
		throw std::runtime_error("refused");
	}),
			std::runtime_error);
	CHECK(slots.find<Other>() == nullptr);
	Other &o = slots.get_or_attach<Other>([&] { return std::make_unique<Other>(log, "o"); });
	CHECK(slots.find<Other>() == &o);
}

TEST_CASE("concurrent attaches of one type make one object", "[feature_slots]")
{
	std::vector<std::string> log;
	FeatureSlots slots;
	std::atomic<int> made{0};
	std::vector<Other *> got(8);
	std::vector<std::thread> threads;
	for (std::size_t i = 0; i < got.size(); i++)
		threads.emplace_back([&, i] {
			got[i] = &slots.get_or_attach<Other>([&] {
				made++;
				return std::make_unique<Other>(log, "once");
			});
		});
	for (auto &t : threads)
		t.join();
	CHECK(made == 1);
	for (auto *p : got)
		CHECK(p == got[0]);
}

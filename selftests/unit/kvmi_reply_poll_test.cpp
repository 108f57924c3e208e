// SPDX-License-Identifier: MIT
/* How long a vCPU polls for an event's reply (kvmi/vmm/reply_poll.hpp): KVM's halt-polling rules. */
#include <catch2/catch.hpp>

#include <chrono>
#include <initializer_list>

#include "kvmi/vmm/reply_poll.hpp"

using virtkit::detail::kvmi::ReplyPoll;
using ns = ReplyPoll::ns;
using namespace std::chrono_literals;

namespace {

/* One wait that took `waited`, and the window it must leave. */
struct Step {
	ns waited, window;
};

/* Feed the waits in order (maximum max), checking the window after each. */
void expect_windows(ReplyPoll &p, ns max, std::initializer_list<Step> steps)
{
	for (const Step &s : steps) {
		p.update(s.waited, max);
		INFO("after a wait of " << s.waited.count() << " ns");
		CHECK(p.window() == s.window);
	}
}

} // namespace

TEST_CASE("reply polling starts off and grows while replies come just after the window", "[kvmi]")
{
	ReplyPoll p;
	CHECK(p.window() == 0ns);
	expect_windows(p, 200us,
		       {{50us, ReplyPoll::start}, /* after the (empty) window, before max: grow */
			{50us, 20us},
			{50us, 40us},
			{50us, 80us},
			{50us, 80us},		  /* caught by polling: kept */
			{190us, 160us},
			{199us, 200us}});	  /* never past max */
}

TEST_CASE("reply polling shrinks to nothing while replies come later than the maximum", "[kvmi]")
{
	ReplyPoll p;
	for (int i = 0; i < 8; i++)
		p.update(190us, 200us);
	REQUIRE(p.window() == 200us);
	expect_windows(p, 200us,
		       {{1ms, 100us},
			{1ms, 50us},
			{1ms, 25us},
			{1ms, 12500ns},
			{1ms, 0ns},		  /* below the start: off */
			{1ms, 0ns}});
}

TEST_CASE("reply polling with a maximum of 0 never polls", "[kvmi]")
{
	ReplyPoll p;
	expect_windows(p, 0ns, {{0us, 0ns}, {5us, 0ns}, {50us, 0ns}, {5000us, 0ns}});
}

TEST_CASE("reply polling with a maximum below the start polls up to the maximum", "[kvmi]")
{
	ReplyPoll p;
	expect_windows(p, 5us,
		       {{6us, 0ns},		  /* past max: stays off */
			{4us, 5us},
			{4us, 5us}});		  /* caught */
}

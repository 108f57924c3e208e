// SPDX-License-Identifier: MIT
/* How long a vCPU polls for an event's reply (kvmi/vmm/reply_poll.hpp): KVM's halt-polling rules. */
#include <catch2/catch.hpp>

#include <chrono>

#include "kvmi/vmm/reply_poll.hpp"

using virtkit::detail::kvmi::ReplyPoll;
using namespace std::chrono_literals;

TEST_CASE("reply polling starts off and grows while replies come just after the window", "[kvmi]")
{
	ReplyPoll p;
	const ReplyPoll::ns max = 200us;
	CHECK(p.window() == 0ns);
	p.update(50us, max);		/* after the (empty) window, before max: grow */
	CHECK(p.window() == ReplyPoll::start);
	p.update(50us, max);
	CHECK(p.window() == 20us);
	p.update(50us, max);
	CHECK(p.window() == 40us);
	p.update(50us, max);
	CHECK(p.window() == 80us);
	p.update(50us, max);		/* caught by polling: kept */
	CHECK(p.window() == 80us);
	p.update(190us, max);
	CHECK(p.window() == 160us);
	p.update(199us, max);		/* never past max */
	CHECK(p.window() == max);
}

TEST_CASE("reply polling shrinks to nothing while replies come later than the maximum", "[kvmi]")
{
	ReplyPoll p;
	const ReplyPoll::ns max = 200us;
	for (int i = 0; i < 8; i++)
		p.update(190us, max);
	REQUIRE(p.window() == max);
	p.update(1ms, max);
	CHECK(p.window() == 100us);
	p.update(1ms, max);
	CHECK(p.window() == 50us);
	p.update(1ms, max);
	CHECK(p.window() == 25us);
	p.update(1ms, max);
	CHECK(p.window() == 12500ns);
	p.update(1ms, max);		/* below the start: off */
	CHECK(p.window() == 0ns);
	p.update(1ms, max);
	CHECK(p.window() == 0ns);
}

TEST_CASE("reply polling with a maximum of 0 never polls", "[kvmi]")
{
	ReplyPoll p;
	for (auto waited : {0us, 5us, 50us, 5000us}) {
		p.update(waited, 0ns);
		CHECK(p.window() == 0ns);
	}
}

TEST_CASE("reply polling with a maximum below the start polls up to the maximum", "[kvmi]")
{
	ReplyPoll p;
	p.update(6us, 5us);		/* past max: stays off */
	CHECK(p.window() == 0ns);
	p.update(4us, 5us);
	CHECK(p.window() == 5us);
	p.update(4us, 5us);		/* caught */
	CHECK(p.window() == 5us);
}

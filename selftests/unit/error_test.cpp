// SPDX-License-Identifier: MIT
/* virtkit::Error, format_error and errno_name. */
#include <catch2/catch.hpp>

#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>

#include <virtkit/error.hpp>

using Catch::Matchers::Contains;
using Catch::Matchers::EndsWith;
using Catch::Matchers::StartsWith;
using virtkit::Error;
using virtkit::errno_name;
using virtkit::format_error;
using VmState = virtkit::Error::VmState;

TEST_CASE("errno_name names known errno values", "[error]")
{
	CHECK(errno_name(EINVAL) == "EINVAL");
	CHECK(errno_name(EIO) == "EIO");
	CHECK(errno_name(ENOENT) == "ENOENT");
	CHECK(errno_name(EEXIST) == "EEXIST");
	CHECK(errno_name(EFAULT) == "EFAULT");
}

TEST_CASE("errno_name formats unknown errno values as numbers", "[error]")
{
	CHECK(errno_name(4242) == "errno 4242");
	CHECK(errno_name(-7) == "errno -7");
}

TEST_CASE("format_error puts operation, detail and errno in the message", "[error]")
{
	std::string s = format_error("KVM_SET_USER_MEMORY_REGION", EINVAL,
				     "slot=2 gpa=0x100000 size=0x1000", VmState::unknown);
	CHECK_THAT(s, StartsWith("KVM_SET_USER_MEMORY_REGION (slot=2 gpa=0x100000 size=0x1000): "));
	CHECK_THAT(s, Contains("EINVAL"));
	CHECK_THAT(s, Contains(std::strerror(EINVAL)));
	CHECK(s == "KVM_SET_USER_MEMORY_REGION (slot=2 gpa=0x100000 size=0x1000): EINVAL (" +
			   std::string(std::strerror(EINVAL)) + ")");
	CHECK_THAT(s, !Contains("dead"));
}

TEST_CASE("format_error without detail has no empty parentheses", "[error]")
{
	std::string s = format_error("GuestMemory::read", EFAULT, "", VmState::unknown);
	CHECK(s == "GuestMemory::read: EFAULT (" + std::string(std::strerror(EFAULT)) + ")");
	CHECK_THAT(s, !Contains("()"));
}

TEST_CASE("format_error says when KVM marked the VM dead", "[error]")
{
	std::string s = format_error("KVM_RUN", EIO, "vcpu 0", VmState::dead);
	CHECK(s == "KVM_RUN (vcpu 0): EIO (" + std::string(std::strerror(EIO)) +
			   "); KVM marked the VM dead");
	CHECK_THAT(s, EndsWith("; KVM marked the VM dead"));
}

TEST_CASE("format_error says when an EIO VM is still alive", "[error]")
{
	std::string s = format_error("KVM_RUN", EIO, "vcpu 1", VmState::alive);
	CHECK_THAT(s, StartsWith("KVM_RUN (vcpu 1): EIO"));
	CHECK_THAT(s, EndsWith("; the VM is not marked dead"));
	CHECK_THAT(s, !Contains("KVM marked the VM dead"));

	SECTION("alive is only worth saying for EIO") {
		std::string t = format_error("KVM_RUN", EINVAL, "vcpu 1", VmState::alive);
		CHECK_THAT(t, !Contains("dead"));
		CHECK_THAT(t, EndsWith(")"));
	}
	SECTION("unknown state says nothing about the VM") {
		std::string t = format_error("KVM_RUN", EIO, "vcpu 1", VmState::unknown);
		CHECK_THAT(t, !Contains("dead"));
		CHECK_THAT(t, EndsWith(")"));
	}
}

TEST_CASE("format_error formats unknown errno values", "[error]")
{
	std::string s = format_error("op", 4242, "x=1", VmState::unknown);
	CHECK_THAT(s, StartsWith("op (x=1): errno 4242 ("));
	CHECK_THAT(s, Contains(std::strerror(4242)));
}

TEST_CASE("Error carries errno, operation, detail and VM state", "[error]")
{
	Error e("KVM_RUN", EIO, "vcpu 0", VmState::dead);

	CHECK(e.code().value() == EIO);
	CHECK(e.code().category() == std::generic_category());
	CHECK(e.code() == std::errc::io_error);
	CHECK(e.err() == EIO);
	CHECK(e.operation() == "KVM_RUN");
	CHECK(e.detail() == "vcpu 0");
	CHECK(e.vm_state() == VmState::dead);
	CHECK(e.vm_dead());
	CHECK(std::string(e.what()) == format_error("KVM_RUN", EIO, "vcpu 0", VmState::dead));
	CHECK_THAT(e.what(), Contains("KVM marked the VM dead"));
}

TEST_CASE("Error defaults: no detail, unknown VM state", "[error]")
{
	Error e("GuestMemory::add", EINVAL);

	CHECK(e.code().value() == EINVAL);
	CHECK(e.err() == EINVAL);
	CHECK(e.operation() == "GuestMemory::add");
	CHECK(e.detail().empty());
	CHECK(e.vm_state() == VmState::unknown);
	CHECK_FALSE(e.vm_dead());
	CHECK(std::string(e.what()) == format_error("GuestMemory::add", EINVAL, "", VmState::unknown));
}

TEST_CASE("Error alive state and unknown errno", "[error]")
{
	Error alive("KVM_RUN", EIO, "vcpu 2", VmState::alive);
	CHECK_FALSE(alive.vm_dead());
	CHECK(alive.vm_state() == VmState::alive);
	CHECK_THAT(alive.what(), Contains("the VM is not marked dead"));

	Error odd("op", 4242, "d");
	CHECK(odd.code().value() == 4242);
	CHECK_THAT(odd.what(), Contains("errno 4242"));
}

TEST_CASE("Error is catchable as std::system_error", "[error]")
{
	try {
		throw Error("KVM_CREATE_VM", ENOMEM, "type=0");
	} catch (const std::system_error &e) {
		CHECK(e.code().value() == ENOMEM);
		CHECK_THAT(e.what(), StartsWith("KVM_CREATE_VM (type=0): ENOMEM"));
		return;
	}
	FAIL("not caught");
}

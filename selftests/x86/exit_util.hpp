// SPDX-License-Identifier: MIT
/*
 * Helpers of the selftests that look at a guest's exits one by one
 * (exits.cpp, vmm_primitives.cpp).
 */
#pragma once

#include <string>
#include <variant>

#include <virtkit/x86/guest_vm.hpp>

#include "test.hpp"

/* Run until the next exit that is not a ucall PRINT; fail on ucall failures. */
inline virtkit::Exit next_exit(virtkit::x86::GuestVm &g, virtkit::Vcpu &v)
{
	using virtkit::x86::Ucall;
	virtkit::Exit e = v.run();
	if (auto uc = g.ucall(v, e);
	    uc && (uc->kind == Ucall::Kind::assert_failed ||
		   uc->kind == Ucall::Kind::unhandled_exception))
		throw virtkit::x86::GuestFailure(uc->describe(), uc);
	return e;
}

/* The exit's payload of type T; fails the test with the exit it was instead. */
template <class T> inline T &expect(virtkit::Exit &e)
{
	auto *p = std::get_if<T>(&e);
	if (!p)
		vkt::fail(__FILE__, __LINE__, "unexpected exit: " + virtkit::describe(e));
	return *p;
}

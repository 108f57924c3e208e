// SPDX-License-Identifier: MIT
/* libvirtkit: everything a VMM needs, in one include. */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <virtkit/cpuid.hpp>
#include <virtkit/error.hpp>
#include <virtkit/exit.hpp>
#include <virtkit/fd.hpp>
#include <virtkit/introspection.hpp>
#include <virtkit/irq.hpp>
#include <virtkit/memory.hpp>
#include <virtkit/page_walk.hpp>
#include <virtkit/platform.hpp>
#include <virtkit/spp.hpp>
#include <virtkit/spp_violation.hpp>
#include <virtkit/system.hpp>
#include <virtkit/vcpu.hpp>
#include <virtkit/version.hpp>
#include <virtkit/vm.hpp>

// SPDX-License-Identifier: MIT
/* libvirtkit: everything a VMM needs, in one include. */
#pragma once

#include <virtkit/cpuid.hpp>
#include <virtkit/error.hpp>
#include <virtkit/exit.hpp>
#include <virtkit/fd.hpp>
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

// SPDX-License-Identifier: MIT
/* Internal: turning a kvm_run after KVM_RUN into a typed Exit. */
#pragma once

#include <virtkit/kvm.h>

#include <cstddef>

#include <virtkit/exit.hpp>

namespace virtkit::detail {

/*
 * Decode the exit KVM left in run, a mapping of run_size bytes. interrupted:
 * KVM_RUN failed with EINTR. Pure: reads and points into run only.
 */
Exit decode_exit(kvm_run &run, std::size_t run_size, bool interrupted);

/*
 * Whether a KVM_RUN that failed with err still reported an exit in run:
 * KVM_EXIT_MEMORY_FAULT comes with KVM_RUN returning -1/EFAULT (as
 * rust-vmm's kvm-ioctls has it). Only meaningful when the caller cleared
 * exit_reason before KVM_RUN, so that an earlier exit cannot be taken for
 * this one.
 */
bool failed_run_reports_exit(const kvm_run &run, int err);

} // namespace virtkit::detail

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

} // namespace virtkit::detail

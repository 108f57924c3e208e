// SPDX-License-Identifier: MIT
/*
 * Internal: the layout of virtkit.ko's ABI (uapi/linux/virtkit.h) as C++
 * sees it - every struct's size and every field's offset, checked at
 * compile time. The module checks the same in C; a mismatch here means the
 * header changed incompatibly.
 */
#pragma once

#include <linux/virtkit.h>

#include <cstddef>

#include "spp_table.h"

namespace virtkit::detail::uapi_layout {

#define VK_UAPI_FIELD(type, field, offset, size)                               \
	static_assert(offsetof(type, field) == (offset), #type "." #field " offset"); \
	static_assert(sizeof(type::field) == (size), #type "." #field " size")

static_assert(sizeof(virtkit_attach_vm) == 32);
VK_UAPI_FIELD(virtkit_attach_vm, vm_fd, 0, 4);
VK_UAPI_FIELD(virtkit_attach_vm, flags, 4, 4);
VK_UAPI_FIELD(virtkit_attach_vm, reserved, 8, 24);

static_assert(sizeof(virtkit_spp_enable) == 32);
VK_UAPI_FIELD(virtkit_spp_enable, flags, 0, 4);
VK_UAPI_FIELD(virtkit_spp_enable, reserved, 4, 28);

static_assert(sizeof(virtkit_spp_access) == 64);
VK_UAPI_FIELD(virtkit_spp_access, gfn, 0, 8);
VK_UAPI_FIELD(virtkit_spp_access, npages, 8, 8);
VK_UAPI_FIELD(virtkit_spp_access, maps, 16, 8);
VK_UAPI_FIELD(virtkit_spp_access, flags, 24, 4);
VK_UAPI_FIELD(virtkit_spp_access, pad, 28, 4);
VK_UAPI_FIELD(virtkit_spp_access, reserved, 32, 32);

static_assert(sizeof(virtkit_spp_stats) == 64);
VK_UAPI_FIELD(virtkit_spp_stats, protected_pages, 0, 8);
VK_UAPI_FIELD(virtkit_spp_stats, table_pages, 8, 8);
VK_UAPI_FIELD(virtkit_spp_stats, fast_writes, 16, 8);
VK_UAPI_FIELD(virtkit_spp_stats, user_exits, 24, 8);
VK_UAPI_FIELD(virtkit_spp_stats, reserved, 32, 32);

static_assert(sizeof(virtkit_vcpu_run) == 32);
VK_UAPI_FIELD(virtkit_vcpu_run, vcpu_fd, 0, 4);
VK_UAPI_FIELD(virtkit_vcpu_run, flags, 4, 4);
VK_UAPI_FIELD(virtkit_vcpu_run, reserved, 8, 24);

static_assert(sizeof(virtkit_guest_wrmsr) == 64);
VK_UAPI_FIELD(virtkit_guest_wrmsr, vcpu_fd, 0, 4);
VK_UAPI_FIELD(virtkit_guest_wrmsr, index, 4, 4);
VK_UAPI_FIELD(virtkit_guest_wrmsr, data, 8, 8);
VK_UAPI_FIELD(virtkit_guest_wrmsr, flags, 16, 4);
VK_UAPI_FIELD(virtkit_guest_wrmsr, result, 20, 4);
VK_UAPI_FIELD(virtkit_guest_wrmsr, reserved, 24, 40);

#undef VK_UAPI_FIELD

/* The ABI's SPP constants are the shared table's (common/spp_table.h). */
static_assert(VIRTKIT_SPP_ALL_WRITABLE == VK_SPP_ALL_WRITABLE);
static_assert(VIRTKIT_SPP_SUBPAGE_SIZE == VK_SPP_SUBPAGE_SIZE);
static_assert(VIRTKIT_SPP_GFN_LIMIT == VK_SPPT_GFN_LIMIT);

} // namespace virtkit::detail::uapi_layout

// SPDX-License-Identifier: MIT
/*
 * The guest page-walk permission engine shared with libvirtkit
 * (common/page_walk.c), built into the module from its one source.
 */
#include "../common/page_walk.c"

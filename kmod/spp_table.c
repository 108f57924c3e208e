// SPDX-License-Identifier: MIT
/*
 * The SPP table model shared with libvirtkit (common/spp_table.c), built
 * into the module from its one source.
 */
#include "../common/spp_table.c"

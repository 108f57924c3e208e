// SPDX-License-Identifier: MIT
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#define VIRTKIT_VERSION_MAJOR 0
#define VIRTKIT_VERSION_MINOR 1
#define VIRTKIT_VERSION_PATCH 0
#define VIRTKIT_VERSION_STRING "0.1.0"

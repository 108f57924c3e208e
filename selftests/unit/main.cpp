// SPDX-License-Identifier: MIT
/* Catch2 entry point for virtkit-unit: unit tests of libvirtkit's pure parts. */
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

// SPDX-License-Identifier: MIT
/*
 * An Intel MultiProcessor Specification 1.4 table: without ACPI it is how
 * Linux learns that there are N processors (LAPIC IDs 0..N-1) and where the
 * IOAPIC is, and how ISA IRQs reach its pins. Without it the guest sees one
 * CPU and falls back to the PIC.
 */
#pragma once

#include <cstdint>

#include <virtkit/virtkit.hpp>

namespace virtkit::tool::run {

/* The IOAPIC's ID in the table: the first one after the CPUs' LAPIC IDs. */
inline std::uint8_t ioapic_id(std::uint32_t cpus)
{
	return static_cast<std::uint8_t>(cpus);
}

/*
 * Write the floating pointer and configuration table at gpa (in the EBDA,
 * where Linux looks): cpus processors (0 the BSP), one ISA bus, the IOAPIC
 * at 0xfec00000 with ISA IRQ n on pin n (KVM's default routing: the PIT
 * raises GSI 0), ExtINT on LINT0 and NMI on LINT1. cpus is 1 to 254.
 */
void write_mptable(GuestMemory &mem, std::uint64_t gpa, std::uint32_t cpus);

/* Bytes write_mptable() writes for cpus processors. */
std::uint64_t mptable_size(std::uint32_t cpus);

} // namespace virtkit::tool::run

// SPDX-License-Identifier: MIT
/*
 * The MP table (mptable.hpp): structures and constants of the MultiProcessor
 * Specification 1.4, chapter 4, as Linux reads them
 * (arch/x86/include/asm/mpspec_def.h).
 */
#include "mptable.hpp"

#include <cstring>
#include <span>
#include <vector>

namespace virtkit::tool::run {
namespace {

#pragma pack(push, 1)
struct FloatingPointer {
	char signature[4];		/* "_MP_" */
	std::uint32_t physptr;		/* the configuration table */
	std::uint8_t length;		/* in 16-byte units: 1 */
	std::uint8_t specification;	/* 4: version 1.4 */
	std::uint8_t checksum;
	std::uint8_t feature[5];	/* 0: a configuration table is present */
};
struct TableHeader {
	char signature[4];		/* "PCMP" */
	std::uint16_t length;		/* header and entries */
	std::uint8_t specification;
	std::uint8_t checksum;
	char oem[8];
	char product[12];
	std::uint32_t oem_table;
	std::uint16_t oem_size;
	std::uint16_t entries;
	std::uint32_t lapic;		/* the LAPICs' physical address */
	std::uint16_t extended_length;
	std::uint8_t extended_checksum;
	std::uint8_t reserved;
};
struct Processor {
	std::uint8_t type;		/* 0 */
	std::uint8_t apic_id;
	std::uint8_t apic_version;
	std::uint8_t flags;		/* 1 enabled, 2 bootstrap processor */
	std::uint32_t signature;	/* family/model/stepping */
	std::uint32_t features;		/* CPUID 1 EDX */
	std::uint32_t reserved[2];
};
struct Bus {
	std::uint8_t type;		/* 1 */
	std::uint8_t id;
	char name[6];
};
struct IoApic {
	std::uint8_t type;		/* 2 */
	std::uint8_t id;
	std::uint8_t version;
	std::uint8_t flags;		/* 1 usable */
	std::uint32_t address;
};
struct Interrupt {
	std::uint8_t type;		/* 3 I/O interrupt, 4 local interrupt */
	std::uint8_t kind;		/* 0 INT, 1 NMI, 2 SMI, 3 ExtINT */
	std::uint16_t flags;		/* 0: polarity and trigger conform to the bus */
	std::uint8_t source_bus;
	std::uint8_t source_irq;
	std::uint8_t dest_apic;		/* 0xff: all LAPICs */
	std::uint8_t dest_pin;
};
#pragma pack(pop)

static_assert(sizeof(FloatingPointer) == 16 && sizeof(TableHeader) == 44 &&
	      sizeof(Processor) == 20 && sizeof(Bus) == 8 && sizeof(IoApic) == 8 &&
	      sizeof(Interrupt) == 8);

constexpr std::uint8_t isa_irqs = 16;
constexpr std::uint8_t bus_isa = 0;

std::uint8_t checksum(std::span<const std::byte> bytes)
{
	std::uint8_t sum = 0;
	for (auto b : bytes)
		sum += std::uint8_t(b);
	return std::uint8_t(-sum);
}

template <class T> void append(std::vector<std::byte> &out, const T &v)
{
	auto b = std::as_bytes(std::span(&v, 1));
	out.insert(out.end(), b.begin(), b.end());
}

} // namespace

std::uint64_t mptable_size(std::uint32_t cpus)
{
	return sizeof(FloatingPointer) + sizeof(TableHeader) + cpus * sizeof(Processor) +
	       sizeof(Bus) + sizeof(IoApic) + (isa_irqs + 2) * sizeof(Interrupt);
}

void write_mptable(GuestMemory &mem, std::uint64_t gpa, std::uint32_t cpus)
{
	std::vector<std::byte> t(sizeof(TableHeader));
	std::uint16_t entries = 0;
	for (std::uint32_t i = 0; i < cpus; i++, entries++)
		append(t, Processor{0, std::uint8_t(i), 0x14, std::uint8_t(i == 0 ? 3 : 1),
				    0x600, 0x201, {}});	/* FPU and APIC */
	append(t, Bus{1, bus_isa, {'I', 'S', 'A', ' ', ' ', ' '}});
	append(t, IoApic{2, ioapic_id(cpus), 0x11, 1, 0xfec00000});
	entries += 2;
	for (std::uint8_t irq = 0; irq < isa_irqs; irq++, entries++)
		append(t, Interrupt{3, 0, 0, bus_isa, irq, ioapic_id(cpus), irq});
	append(t, Interrupt{4, 3, 0, bus_isa, 0, 0, 0});	/* ExtINT on the BSP's LINT0 */
	append(t, Interrupt{4, 1, 0, bus_isa, 0, 0xff, 1});	/* NMI on LINT1 */
	entries += 2;

	TableHeader h{};
	std::memcpy(h.signature, "PCMP", 4);
	h.length = std::uint16_t(t.size());
	h.specification = 4;
	std::memcpy(h.oem, "VIRTKIT ", 8);
	std::memcpy(h.product, "VIRTKIT RUN ", 12);
	h.entries = entries;
	h.lapic = 0xfee00000;
	std::memcpy(t.data(), &h, sizeof(h));
	t[offsetof(TableHeader, checksum)] = std::byte(checksum(t));

	FloatingPointer f{};
	std::memcpy(f.signature, "_MP_", 4);
	f.physptr = std::uint32_t(gpa + sizeof(f));
	f.length = 1;
	f.specification = 4;
	f.checksum = checksum(std::as_bytes(std::span(&f, 1)));

	mem.write_obj(gpa, f);
	mem.write(gpa + sizeof(f), t);
}

} // namespace virtkit::tool::run

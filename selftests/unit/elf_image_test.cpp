// SPDX-License-Identifier: MIT
/*
 * The ELF loader of the guest environment: program header validation on
 * crafted images (every field that could point outside the file), page
 * ranges of PT_LOAD segments, and the running executable itself.
 */
#include <catch2/catch.hpp>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <vector>

#include <virtkit/error.hpp>

#include "elf_image.hpp"

using namespace virtkit::x86::detail;

namespace {

/* A minimal ELF64 x86-64 image: header, n program headers, 4 KiB of data. */
struct Image {
	std::vector<std::byte> bytes;

	explicit Image(unsigned nphdr = 2)
		: bytes(sizeof(Elf64_Ehdr) + nphdr * sizeof(Elf64_Phdr) + 4096)
	{
		Elf64_Ehdr eh{};
		std::memcpy(eh.e_ident, ELFMAG, SELFMAG);
		eh.e_ident[EI_CLASS] = ELFCLASS64;
		eh.e_ident[EI_DATA] = ELFDATA2LSB;
		eh.e_machine = EM_X86_64;
		eh.e_phoff = sizeof(Elf64_Ehdr);
		eh.e_phentsize = sizeof(Elf64_Phdr);
		eh.e_phnum = static_cast<Elf64_Half>(nphdr);
		set_ehdr(eh);
		for (unsigned i = 0; i < nphdr; i++) {
			Elf64_Phdr ph{};
			ph.p_type = PT_LOAD;
			ph.p_offset = 0;
			ph.p_vaddr = 0x400000 + i * 0x10000;
			ph.p_filesz = 0x100;
			ph.p_memsz = 0x2000;
			ph.p_flags = i ? PF_R | PF_W : PF_R | PF_X;
			set_phdr(i, ph);
		}
	}
	Elf64_Ehdr ehdr() const
	{
		Elf64_Ehdr eh;
		std::memcpy(&eh, bytes.data(), sizeof(eh));
		return eh;
	}
	void set_ehdr(const Elf64_Ehdr &eh) { std::memcpy(bytes.data(), &eh, sizeof(eh)); }
	Elf64_Phdr phdr(unsigned i) const
	{
		Elf64_Phdr ph;
		std::memcpy(&ph, bytes.data() + sizeof(Elf64_Ehdr) + i * sizeof(ph), sizeof(ph));
		return ph;
	}
	void set_phdr(unsigned i, const Elf64_Phdr &ph)
	{
		std::memcpy(bytes.data() + sizeof(Elf64_Ehdr) + i * sizeof(ph), &ph, sizeof(ph));
	}
};

int parse_error(const Image &img)
{
	try {
		parse_program_headers(img.bytes);
	} catch (const virtkit::Error &e) {
		return e.err();
	}
	return 0;
}

} // namespace

TEST_CASE("a valid image yields its program headers", "[elf]")
{
	Image img;
	auto ph = parse_program_headers(img.bytes);
	REQUIRE(ph.size() == 2);
	CHECK(ph[0].p_vaddr == 0x400000);
	CHECK(ph[1].p_flags == (PF_R | PF_W));
}

TEST_CASE("malformed images are refused with ENOEXEC", "[elf]")
{
	SECTION("shorter than a header")
	{
		Image img;
		img.bytes.resize(10);
		CHECK(parse_error(img) == ENOEXEC);
	}
	SECTION("bad magic")
	{
		Image img;
		img.bytes[1] = std::byte{'X'};
		CHECK(parse_error(img) == ENOEXEC);
	}
	SECTION("32-bit, big-endian or another machine")
	{
		for (int field = 0; field < 3; field++) {
			Image img;
			auto eh = img.ehdr();
			if (field == 0)
				eh.e_ident[EI_CLASS] = ELFCLASS32;
			else if (field == 1)
				eh.e_ident[EI_DATA] = ELFDATA2MSB;
			else
				eh.e_machine = EM_AARCH64;
			img.set_ehdr(eh);
			CHECK(parse_error(img) == ENOEXEC);
		}
	}
	SECTION("program header size or table outside the file")
	{
		Image a;
		auto eh = a.ehdr();
		eh.e_phentsize = 32;
		a.set_ehdr(eh);
		CHECK(parse_error(a) == ENOEXEC);

		Image b;
		eh = b.ehdr();
		eh.e_phoff = b.bytes.size() - 8;
		b.set_ehdr(eh);
		CHECK(parse_error(b) == ENOEXEC);

		Image c;
		eh = c.ehdr();
		eh.e_phoff = ~0ull - 8; /* offset + size would wrap */
		c.set_ehdr(eh);
		CHECK(parse_error(c) == ENOEXEC);

		Image d;
		eh = d.ehdr();
		eh.e_phnum = 0xffff;
		d.set_ehdr(eh);
		CHECK(parse_error(d) == ENOEXEC);
	}
	SECTION("PT_LOAD segments outside the file or inconsistent")
	{
		auto bad = [](auto mutate) {
			Image img;
			auto ph = img.phdr(1);
			mutate(ph);
			img.set_phdr(1, ph);
			return parse_error(img);
		};
		CHECK(bad([](Elf64_Phdr &p) { p.p_filesz = p.p_memsz + 1; }) == ENOEXEC);
		CHECK(bad([](Elf64_Phdr &p) { p.p_offset = 1ull << 40; }) == ENOEXEC);
		CHECK(bad([](Elf64_Phdr &p) { p.p_filesz = 1ull << 40; p.p_memsz = 1ull << 41; }) == ENOEXEC);
		CHECK(bad([](Elf64_Phdr &p) { p.p_vaddr = ~0ull - 0x10; }) == ENOEXEC);
		/* The same fields in a non-PT_LOAD header are not used, so not checked. */
		CHECK(bad([](Elf64_Phdr &p) { p.p_type = PT_NOTE; p.p_offset = 1ull << 40; }) == 0);
	}
}

TEST_CASE("load_pages rounds to pages, applies the bias and merges shared pages", "[elf]")
{
	std::vector<Elf64_Phdr> ph(4);
	ph[0] = {PT_LOAD, PF_R | PF_X, 0, 0x1000, 0, 0x1800, 0x1800, 0x1000};
	/* Starts in the page where segment 0 ends: merged, rights combined. */
	ph[1] = {PT_LOAD, PF_R | PF_W, 0, 0x2900, 0, 0x100, 0x2000, 0x1000};
	ph[2] = {PT_NOTE, PF_R, 0, 0x9000, 0, 0x100, 0x100, 4};
	ph[3] = {PT_LOAD, PF_R, 0, 0x10000, 0, 0, 0x10, 0x1000};
	auto r = load_pages(ph, 0x555500000000ull);
	REQUIRE(r.size() == 2);
	CHECK(r[0] == LoadRange{0x555500001000ull, 0x4000, true, true});
	CHECK(r[1] == LoadRange{0x555500010000ull, 0x1000, false, false});

	/* An empty PT_LOAD maps nothing. */
	std::vector<Elf64_Phdr> empty(1);
	empty[0] = {PT_LOAD, PF_R, 0, 0x1000, 0, 0, 0, 0x1000};
	CHECK(load_pages(empty, 0).empty());
}

TEST_CASE("the running executable's segments contain its own code and data", "[elf]")
{
	auto img = running_executable();
	auto ranges = load_pages(img.phdrs, img.bias);
	REQUIRE_FALSE(ranges.empty());
	static int some_data = 1;
	auto inside = [&](const void *p, bool want_exec, bool want_write) {
		auto a = reinterpret_cast<std::uint64_t>(p);
		for (auto &r : ranges)
			if (a - r.vaddr < r.size)
				return (!want_exec || r.executable) && (!want_write || r.writable);
		return false;
	};
	CHECK(inside(reinterpret_cast<const void *>(&running_executable), true, false));
	CHECK(inside(&some_data, false, true));
}

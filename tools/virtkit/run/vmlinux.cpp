// SPDX-License-Identifier: MIT
/* The bzImage's payload, decompressed and loaded (vmlinux.hpp). */
#include "vmlinux.hpp"

#include <elf.h>
#include <lzma.h>

#include <cstring>
#include <string>

#include "boot_loader.hpp"

namespace virtkit::tool::run {
namespace {

constexpr std::size_t hdr_setup_sects = 0x1f1, hdr_version = 0x206,
		      hdr_payload_offset = 0x248, hdr_payload_length = 0x24c;

template <class T> T get(std::span<const std::byte> b, std::size_t off)
{
	T v;
	std::memcpy(&v, b.data() + off, sizeof(T));
	return v;
}

std::string magic_name(std::span<const std::byte> p)
{
	auto m = [&](std::initializer_list<unsigned char> bytes) {
		std::size_t i = 0;
		for (auto b : bytes)
			if (i >= p.size() || std::uint8_t(p[i++]) != b)
				return false;
		return true;
	};
	return m({0x1f, 0x8b}) ? "gzip" : m({0x28, 0xb5, 0x2f, 0xfd}) ? "zstd" :
	       m({0x42, 0x5a, 0x68}) ? "bzip2" : m({0x89, 0x4c, 0x5a, 0x4f}) ? "lzo" :
	       m({0x02, 0x21, 0x4c, 0x18}) ? "lz4" : m({0x5d, 0x00}) ? "lzma" : "unknown";
}

std::vector<std::byte> unxz(std::span<const std::byte> in)
{
	lzma_stream s = LZMA_STREAM_INIT;
	if (lzma_stream_decoder(&s, UINT64_MAX, 0) != LZMA_OK)
		throw BootError("cannot start the xz decoder");
	std::vector<std::byte> out(in.size() * 4);
	s.next_in = reinterpret_cast<const std::uint8_t *>(in.data());
	s.avail_in = in.size();
	lzma_ret r;
	do {
		if (s.total_out == out.size())
			out.resize(out.size() * 2);
		s.next_out = reinterpret_cast<std::uint8_t *>(out.data()) + s.total_out;
		s.avail_out = out.size() - s.total_out;
		r = lzma_code(&s, LZMA_FINISH);
	} while (r == LZMA_OK);
	out.resize(s.total_out);
	lzma_end(&s);
	if (r != LZMA_STREAM_END)
		throw BootError("the kernel's xz payload is corrupt (liblzma error " +
				std::to_string(int(r)) + ")");
	return out;
}

const Elf64_Ehdr &elf_header(std::span<const std::byte> elf)
{
	auto *eh = reinterpret_cast<const Elf64_Ehdr *>(elf.data());
	if (elf.size() < sizeof(Elf64_Ehdr) || std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 ||
	    eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_machine != EM_X86_64 ||
	    eh->e_phentsize != sizeof(Elf64_Phdr) ||
	    eh->e_phoff + std::uint64_t(eh->e_phnum) * sizeof(Elf64_Phdr) > elf.size())
		throw BootError("the bzImage's payload is not an x86-64 ELF vmlinux");
	return *eh;
}

template <class F> void for_each_load(std::span<const std::byte> elf, F f)
{
	const Elf64_Ehdr &eh = elf_header(elf);
	for (unsigned i = 0; i < eh.e_phnum; i++) {
		Elf64_Phdr ph;
		std::memcpy(&ph, elf.data() + eh.e_phoff + i * sizeof(ph), sizeof(ph));
		if (ph.p_type != PT_LOAD)
			continue;
		if (ph.p_offset > elf.size() || ph.p_filesz > elf.size() - ph.p_offset ||
		    ph.p_filesz > ph.p_memsz)
			throw BootError("vmlinux: segment " + std::to_string(i) + " lies outside the file");
		f(ph);
	}
}

} // namespace

std::vector<std::byte> extract_vmlinux(std::span<const std::byte> bzimage)
{
	if (get<std::uint16_t>(bzimage, hdr_version) < 0x0208)
		throw BootError("boot protocol before 2.08: the payload cannot be found "
				"(use --decompress guest)");
	std::size_t setup_sects = get<std::uint8_t>(bzimage, hdr_setup_sects);
	std::uint64_t start = (setup_sects ? setup_sects : 4) * 512 + 512 +
			      std::uint64_t(get<std::uint32_t>(bzimage, hdr_payload_offset));
	std::uint64_t len = get<std::uint32_t>(bzimage, hdr_payload_length);
	if (start > bzimage.size() || len > bzimage.size() - start)
		throw BootError("the setup header's payload lies outside the file");
	auto payload = bzimage.subspan(start, len);
	static const unsigned char xz_magic[] = {0xfd, '7', 'z', 'X', 'Z', 0};
	if (len < sizeof(xz_magic) || std::memcmp(payload.data(), xz_magic, sizeof(xz_magic)) != 0)
		throw BootError("the kernel is compressed with " + magic_name(payload) +
				"; virtkit run decompresses xz only (use --decompress guest)");
	return unxz(payload);
}

VmlinuxImage vmlinux_layout(std::span<const std::byte> elf)
{
	VmlinuxImage img{elf_header(elf).e_entry, UINT64_MAX, 0};
	for_each_load(elf, [&](const Elf64_Phdr &ph) {
		img.start = std::min(img.start, ph.p_paddr);
		img.end = std::max(img.end, ph.p_paddr + ph.p_memsz);
	});
	if (img.start == UINT64_MAX || img.entry < img.start || img.entry >= img.end)
		throw BootError("vmlinux: no loadable segment holds the entry point");
	return img;
}

void load_vmlinux(GuestMemory &mem, std::span<const std::byte> elf)
{
	for_each_load(elf, [&](const Elf64_Phdr &ph) {
		mem.write(ph.p_paddr, elf.subspan(ph.p_offset, ph.p_filesz));
		mem.fill(ph.p_paddr + ph.p_filesz, std::byte{0}, ph.p_memsz - ph.p_filesz);
	});
}

} // namespace virtkit::tool::run

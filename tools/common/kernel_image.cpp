// SPDX-License-Identifier: MIT
/* A Linux kernel image: bzImage payload and ELF sections (kernel_image.hpp). */
#include "kernel_image.hpp"

#include <elf.h>
#include <fcntl.h>
#include <lzma.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>
#include <initializer_list>
#include <memory>

#include <virtkit/error.hpp>
#include <virtkit/fd.hpp>

namespace virtkit::tool {
namespace {

constexpr std::size_t hdr_setup_sects = 0x1f1, hdr_boot_flag = 0x1fe, hdr_magic = 0x202,
		      hdr_version = 0x206, hdr_payload_offset = 0x248,
		      hdr_payload_length = 0x24c;

template <class T> T get(std::span<const std::byte> b, std::size_t off)
{
	T v;
	if (off > b.size() || sizeof(T) > b.size() - off)
		throw KernelImageError("the file is too short to be a kernel image");
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
	return m({0xfd, '7', 'z', 'X', 'Z', 0}) ? "xz" :
	       m({0x1f, 0x8b}) ? "gzip" : m({0x28, 0xb5, 0x2f, 0xfd}) ? "zstd" :
	       m({0x42, 0x5a, 0x68}) ? "bzip2" : m({0x89, 0x4c, 0x5a, 0x4f}) ? "lzo" :
	       m({0x02, 0x21, 0x4c, 0x18}) ? "lz4" : m({0x5d, 0x00}) ? "lzma" : "unknown";
}

std::vector<std::byte> unxz(std::span<const std::byte> in)
{
	lzma_stream s = LZMA_STREAM_INIT;
	if (lzma_stream_decoder(&s, UINT64_MAX, 0) != LZMA_OK)
		throw KernelImageError("cannot start the xz decoder");
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
		throw KernelImageError("the kernel's xz payload is corrupt (liblzma error " +
				       std::to_string(int(r)) + ")");
	return out;
}

/* One zstd frame; what follows it (the kernel's 4-byte size) is ignored. */
std::vector<std::byte> unzstd(std::span<const std::byte> in)
{
	std::unique_ptr<ZSTD_DStream, decltype(&ZSTD_freeDStream)> s(ZSTD_createDStream(),
								     ZSTD_freeDStream);
	if (!s)
		throw KernelImageError("cannot start the zstd decoder");
	std::vector<std::byte> out(in.size() * 4);
	ZSTD_inBuffer src{in.data(), in.size(), 0};
	ZSTD_outBuffer dst{out.data(), out.size(), 0};
	for (;;) {
		std::size_t r = ZSTD_decompressStream(s.get(), &dst, &src);
		if (ZSTD_isError(r))
			throw KernelImageError(std::string("the kernel's zstd payload is corrupt (") +
					       ZSTD_getErrorName(r) + ")");
		if (r == 0)
			break; /* the frame is complete */
		if (dst.pos == dst.size) {
			out.resize(out.size() * 2);
			dst.dst = out.data();
			dst.size = out.size();
		} else if (src.pos == src.size) {
			throw KernelImageError("the kernel's zstd payload is truncated");
		}
	}
	out.resize(dst.pos);
	return out;
}

} // namespace

std::vector<std::byte> read_whole_file(const std::string &path, const std::string &option)
{
	std::string what = option + " " + path;
	FileDesc f = FileDesc::open(path.c_str(), O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fstat(f.get(), &st) != 0)
		throw Error("fstat", errno, what);
	if (!S_ISREG(st.st_mode))
		throw Error("open", EINVAL, what + ": not a regular file");
	std::vector<std::byte> data(std::size_t(st.st_size));
	std::size_t done = 0;
	while (done < data.size()) {
		ssize_t n = ::read(f.get(), data.data() + done, data.size() - done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			throw Error("read", errno, what);
		if (n == 0)
			throw Error("read", EIO, what + ": file shrank while read");
		done += std::size_t(n);
	}
	return data;
}

std::vector<std::byte> extract_vmlinux(std::span<const std::byte> bzimage)
{
	if (get<std::uint16_t>(bzimage, hdr_boot_flag) != 0xaa55 ||
	    get<std::uint32_t>(bzimage, hdr_magic) != 0x53726448 /* "HdrS" */)
		throw KernelImageError("not a bzImage (no 0xAA55 boot flag and \"HdrS\" setup header)");
	if (get<std::uint16_t>(bzimage, hdr_version) < 0x0208)
		throw KernelImageError("boot protocol before 2.08: the payload cannot be found");
	std::size_t setup_sects = get<std::uint8_t>(bzimage, hdr_setup_sects);
	std::uint64_t start = (setup_sects ? setup_sects : 4) * 512 + 512 +
			      std::uint64_t(get<std::uint32_t>(bzimage, hdr_payload_offset));
	std::uint64_t len = get<std::uint32_t>(bzimage, hdr_payload_length);
	if (start > bzimage.size() || len > bzimage.size() - start)
		throw KernelImageError("the setup header's payload lies outside the file");
	auto payload = bzimage.subspan(start, len);
	std::string compression = magic_name(payload);
	if (compression == "xz")
		return unxz(payload);
	if (compression == "zstd")
		return unzstd(payload);
	throw KernelImageError("the kernel is compressed with " + compression +
			       "; only xz and zstd are decompressed");
}

bool is_elf(std::span<const std::byte> data)
{
	return data.size() >= SELFMAG && std::memcmp(data.data(), ELFMAG, SELFMAG) == 0;
}

std::vector<std::byte> vmlinux_of(std::vector<std::byte> data)
{
	return is_elf(data) ? std::move(data) : extract_vmlinux(data);
}

ElfLayout elf_layout(std::span<const std::byte> elf)
{
	Elf64_Ehdr eh;
	if (elf.size() < sizeof(eh))
		throw KernelImageError("not an x86-64 ELF vmlinux (too short)");
	std::memcpy(&eh, elf.data(), sizeof(eh));
	if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != ELFCLASS64 ||
	    eh.e_machine != EM_X86_64 || eh.e_phentsize != sizeof(Elf64_Phdr) ||
	    eh.e_phoff > elf.size() ||
	    std::uint64_t(eh.e_phnum) * sizeof(Elf64_Phdr) > elf.size() - eh.e_phoff)
		throw KernelImageError("not an x86-64 ELF vmlinux");
	if (eh.e_shnum && (eh.e_shentsize != sizeof(Elf64_Shdr) || eh.e_shoff > elf.size() ||
			   std::uint64_t(eh.e_shnum) * sizeof(Elf64_Shdr) > elf.size() - eh.e_shoff ||
			   eh.e_shstrndx >= eh.e_shnum))
		throw KernelImageError("vmlinux: the section header table lies outside the file");
	return {eh.e_entry, eh.e_phoff, eh.e_shoff, eh.e_phnum, eh.e_shnum, eh.e_shstrndx};
}

std::vector<ElfSegment> elf_load_segments(std::span<const std::byte> elf)
{
	ElfLayout l = elf_layout(elf);
	std::vector<ElfSegment> segments;
	for (unsigned i = 0; i < l.phnum; i++) {
		Elf64_Phdr ph;
		std::memcpy(&ph, elf.data() + l.phoff + i * sizeof(ph), sizeof(ph));
		if (ph.p_type != PT_LOAD)
			continue;
		if (ph.p_offset > elf.size() || ph.p_filesz > elf.size() - ph.p_offset ||
		    ph.p_filesz > ph.p_memsz)
			throw KernelImageError("vmlinux: segment " + std::to_string(i) +
					       " lies outside the file");
		segments.push_back({ph.p_offset, ph.p_filesz, ph.p_vaddr, ph.p_paddr, ph.p_memsz});
	}
	return segments;
}

std::optional<ElfSection> elf_section(std::span<const std::byte> elf, std::string_view name)
{
	ElfLayout l = elf_layout(elf);
	auto header = [&](unsigned i) {
		Elf64_Shdr sh;
		std::memcpy(&sh, elf.data() + l.shoff + i * sizeof(sh), sizeof(sh));
		if (sh.sh_type != SHT_NOBITS &&
		    (sh.sh_offset > elf.size() || sh.sh_size > elf.size() - sh.sh_offset))
			throw KernelImageError("vmlinux: section " + std::to_string(i) +
					       " lies outside the file");
		return sh;
	};
	if (!l.shnum)
		return std::nullopt;
	Elf64_Shdr names = header(l.shstrndx);
	for (unsigned i = 0; i < l.shnum; i++) {
		Elf64_Shdr sh = header(i);
		if (sh.sh_type == SHT_NOBITS || sh.sh_name >= names.sh_size)
			continue;
		const char *s = reinterpret_cast<const char *>(elf.data() + names.sh_offset + sh.sh_name);
		std::size_t max = names.sh_size - sh.sh_name;
		if (std::string_view(s, strnlen(s, max)) == name)
			return ElfSection{sh.sh_addr, elf.subspan(sh.sh_offset, sh.sh_size)};
	}
	return std::nullopt;
}

} // namespace virtkit::tool

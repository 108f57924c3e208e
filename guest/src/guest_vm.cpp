// SPDX-License-Identifier: MIT
#include <virtkit/x86/guest_vm.hpp>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include <virtkit/error.hpp>

#include "core/ioctl.hpp"
#include "elf_image.hpp"

extern "C" {
extern char virtkit_guest_vectors[];
extern char virtkit_guest_return[];
extern virtkit_ex_handler virtkit_guest_handlers[256];
}

namespace virtkit::x86 {

using virtkit::detail::hex;

static constexpr std::uint64_t page_size = 4096;
/* Guest-virtual area for the environment's own structures: the top of the
 * lower half's mirror, far from any host address of the executable. */
static constexpr std::uint64_t private_gva_base = 0xffffc00000000000ull;
static constexpr std::uint64_t phys_base = 0x10000;

/* Layout of a vCPU's system page. */
static constexpr std::uint64_t gdt_offset = 0x800;
static constexpr std::uint64_t tss_offset = 0xa00;
static constexpr std::uint16_t sel_kernel_cs = VIRTKIT_SEL_KERNEL_CS;
static constexpr std::uint16_t sel_kernel_ds = VIRTKIT_SEL_KERNEL_DS, sel_tss = 0x28;
static_assert(VIRTKIT_SEL_USER_DS == 0x18 + 3 && VIRTKIT_SEL_USER_CS == 0x20 + 3,
	      "the user selectors name GDT entries 3 and 4 with RPL 3");
static_assert(sizeof(virtkit_percpu) <= gdt_offset);
static_assert(offsetof(virtkit_percpu, recover_rip) == 8);
static_assert(offsetof(virtkit_percpu, recover_rsp) == 16);
static_assert(offsetof(virtkit_percpu, catch_info) == 24);

struct GuestVm::VcpuInfo {
	std::uint64_t percpu_gva;
	std::uint64_t percpu_gpa;
	std::uint64_t stack_top;
	std::uint64_t rsp0_top;
};

std::string exception_name(std::uint64_t vector)
{
	static const char *const names[] = {"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD",
					    "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP",
					    "#PF", "15",  "#MF", "#AC", "#MC", "#XM", "#VE",
					    "#CP"};
	if (vector < std::size(names))
		return names[vector];
	return "vector " + std::to_string(vector);
}

std::string Ucall::describe() const
{
	switch (kind) {
	case Kind::sync: {
		std::string s = "GUEST_SYNC(";
		for (std::size_t i = 0; i < args.size(); i++)
			s += (i ? ", " : "") + hex(args[i]);
		return s + ")";
	}
	case Kind::assert_failed:
		return "guest assertion failed at " + file + ":" + std::to_string(line) + ": " +
		       message;
	case Kind::done:
		return "GUEST_DONE";
	case Kind::unhandled_exception:
		return "unhandled guest exception " + exception_name(args[0]) + " (vector " +
		       std::to_string(args[0]) + ") error_code=" + hex(args[1]) +
		       " rip=" + hex(args[2]) + (args[0] == PF_VECTOR ? " cr2=" + hex(args[3]) : "");
	case Kind::print:
		return "GUEST_PRINTF: " + message;
	}
	return "ucall";
}

/* The options, if valid: checked before the VM is created. */
static const GuestOptions &checked(const GuestOptions &o)
{
	if (o.memory_size < (4ull << 20) || o.memory_size % page_size ||
	    o.stack_size < page_size || o.stack_size % page_size)
		throw Error("GuestVm", EINVAL,
			    "memory_size=" + hex(o.memory_size) +
				    " stack_size=" + hex(o.stack_size) +
				    " (need >= 4 MiB of memory, page-multiple sizes)");
	return o;
}

GuestVm::GuestVm(const System &system, const GuestOptions &options)
	: options_(checked(options)), vm_(system.create_vm(options.vm)),
	  cpuid_(system.supported_cpuid())
{
	ram_ = vm_.memory().add(0, options_.memory_size, {.name = "guest-ram"});
	next_phys_ = phys_base;
	next_private_gva_ = private_gva_base;
	tables_ = std::make_unique<PageTables>(static_cast<PhysicalMemory &>(*this), 4);
	load_executable();
	build_idt();
	if (!options_.print)
		options_.print = [](std::uint32_t vcpu, std::string_view text) {
			std::fprintf(stderr, "# vcpu%u: %.*s\n", vcpu, int(text.size()), text.data());
		};
	print_handler_ = vm_.add_exit_handler(
		[this](Vcpu &v, Exit &e) {
			auto *io = std::get_if<IoExit>(&e);
			if (!io || io->port != VIRTKIT_UCALL_PORT || v.id() >= infos_.size())
				return ExitAction::pass;
			auto uc = ucall(v, e);
			if (!uc || uc->kind != Ucall::Kind::print)
				return ExitAction::pass;
			options_.print(v.id(), uc->message);
			return ExitAction::resume;
		},
		1000);
}

GuestVm::~GuestVm() = default;

std::byte *GuestVm::page(std::uint64_t gpa)
{
	return vm_.memory().host_ptr(gpa, page_size);
}

std::uint64_t GuestVm::alloc_table_page() { return alloc_pages(1); }

std::uint64_t GuestVm::alloc_pages(std::uint64_t count)
{
	if (!count || count > (options_.memory_size - next_phys_) / page_size)
		throw Error("GuestVm::alloc_pages", ENOMEM,
			    std::to_string(count) + " pages; guest RAM has " +
				    std::to_string((options_.memory_size - next_phys_) / page_size) +
				    " left (GuestOptions::memory_size)");
	std::uint64_t gpa = next_phys_;
	next_phys_ += count * page_size;
	return gpa;
}

std::uint64_t GuestVm::alloc_private_gva(std::uint64_t size)
{
	std::uint64_t gva = next_private_gva_;
	/* One unmapped guard page after every allocation. */
	next_private_gva_ += (size + page_size - 1) / page_size * page_size + page_size;
	return gva;
}

std::uint64_t GuestVm::alloc_vaddr(std::uint64_t size, const PageFlags &flags)
{
	if (!size)
		throw Error("GuestVm::alloc_vaddr", EINVAL, "size=0");
	std::uint64_t pages = (size + page_size - 1) / page_size;
	std::uint64_t gpa = alloc_pages(pages);
	std::uint64_t gva = alloc_private_gva(pages * page_size);
	tables_->map(gva, gpa, pages * page_size, flags);
	return gva;
}

void GuestVm::map(std::uint64_t gva, std::uint64_t gpa, std::uint64_t size,
		  const PageFlags &flags, PageSize page)
{
	tables_->map(gva, gpa, size, flags, page);
}

void GuestVm::identity_map(std::uint64_t gpa, std::uint64_t size, const PageFlags &flags)
{
	tables_->map(gpa, gpa, size, flags);
}

std::optional<std::uint64_t> GuestVm::gva_to_gpa(std::uint64_t gva) const
{
	auto t = tables_->translate(gva);
	if (!t)
		return std::nullopt;
	return t->gpa;
}

std::byte *GuestVm::gva_host(std::uint64_t gva)
{
	auto gpa = gva_to_gpa(gva);
	if (!gpa)
		throw Error("GuestVm::gva_host", EFAULT, "gva=" + hex(gva) + " is not mapped");
	return vm_.memory().host_ptr(*gpa, page_size - (*gpa % page_size));
}

void GuestVm::write_gva(std::uint64_t gva, const void *src, std::uint64_t size)
{
	/* Validate the whole range first: all or nothing. */
	for (std::uint64_t a = gva & ~(page_size - 1); a < gva + size; a += page_size)
		if (!gva_to_gpa(a))
			throw Error("GuestVm::write_gva", EFAULT,
				    "gva=" + hex(gva) + " size=" + hex(size) + ": " + hex(a) +
					    " is not mapped");
	auto *s = static_cast<const std::byte *>(src);
	while (size) {
		std::uint64_t n = std::min(size, page_size - gva % page_size);
		std::memcpy(gva_host(gva), s, n);
		gva += n;
		s += n;
		size -= n;
	}
}

void GuestVm::read_gva(std::uint64_t gva, void *dst, std::uint64_t size)
{
	for (std::uint64_t a = gva & ~(page_size - 1); a < gva + size; a += page_size)
		if (!gva_to_gpa(a))
			throw Error("GuestVm::read_gva", EFAULT,
				    "gva=" + hex(gva) + " size=" + hex(size) + ": " + hex(a) +
					    " is not mapped");
	auto *d = static_cast<std::byte *>(dst);
	while (size) {
		std::uint64_t n = std::min(size, page_size - gva % page_size);
		std::memcpy(d, gva_host(gva), n);
		gva += n;
		d += n;
		size -= n;
	}
}

/*
 * Copy the executable's pages with REP MOVSB rather than memcpy: they are
 * read whole, the gaps between objects included, and in a sanitizer build
 * (make check-asan) those gaps are the redzones around instrumented
 * globals, which AddressSanitizer's memcpy interceptor reports as
 * global-buffer-overflow reads.
 */
static void copy_image(std::byte *dst, std::uint64_t src, std::uint64_t size)
{
	asm volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(size) : : "memory");
}

void GuestVm::load_executable()
{
	auto img = detail::running_executable();
	auto ranges = detail::load_pages(img.phdrs, img.bias);

	auto inside = [&](const void *p) {
		auto a = reinterpret_cast<std::uint64_t>(p);
		for (auto &r : ranges)
			if (a - r.vaddr < r.size)
				return true;
		return false;
	};
	if (!inside(virtkit_guest_vectors))
		throw Error("GuestVm", ENOTSUP,
			    "the guest runtime is not part of the executable: link libvirtkit "
			    "statically into programs that run guest code");

	for (auto &r : ranges) {
		std::uint64_t pages = r.size / page_size;
		std::uint64_t gpa = alloc_pages(pages);
		/* Live memory: the executable as it is now, relocations applied. */
		copy_image(vm_.memory().host_ptr(gpa, r.size), r.vaddr, r.size);
		tables_->map(r.vaddr, gpa, r.size,
			     {.writable = r.writable, .executable = r.executable});
	}
}

void GuestVm::build_idt()
{
	idt_gva_ = alloc_vaddr(page_size);
	auto *idt = reinterpret_cast<std::uint64_t *>(gva_host(idt_gva_));
	auto base = reinterpret_cast<std::uint64_t>(virtkit_guest_vectors);
	for (std::uint64_t v = 0; v < 256; v++) {
		std::uint64_t handler = base + v * 16;
		/* 64-bit interrupt gate; #BP and #OF may be raised from CPL3. */
		std::uint64_t dpl = (v == BP_VECTOR || v == 4) ? 3 : 0;
		std::uint64_t attr = 0x8e | dpl << 5;
		idt[2 * v] = (handler & 0xffff) | std::uint64_t(sel_kernel_cs) << 16 |
			     attr << 40 | ((handler >> 16) & 0xffff) << 48;
		idt[2 * v + 1] = handler >> 32;
	}
}

void GuestVm::install_exception_handler(std::uint8_t vector, virtkit_ex_handler handler)
{
	write_gva(reinterpret_cast<std::uint64_t>(&virtkit_guest_handlers[vector]), &handler,
		  sizeof(handler));
}

static kvm_segment code64(std::uint16_t sel, std::uint8_t dpl)
{
	kvm_segment s{};
	s.limit = 0xffffffff;
	s.selector = sel;
	s.type = 11;
	s.present = 1;
	s.dpl = dpl;
	s.s = 1;
	s.l = 1;
	s.g = 1;
	return s;
}

static kvm_segment data(std::uint16_t sel, std::uint8_t dpl)
{
	kvm_segment s{};
	s.limit = 0xffffffff;
	s.selector = sel;
	s.type = 3;
	s.present = 1;
	s.dpl = dpl;
	s.db = 1;
	s.s = 1;
	s.g = 1;
	return s;
}

void GuestVm::setup_vcpu(Vcpu &vcpu, VcpuInfo &info)
{
	/* Per-CPU page: percpu struct, GDT, TSS. */
	info.percpu_gva = alloc_vaddr(page_size);
	info.percpu_gpa = *gva_to_gpa(info.percpu_gva);
	auto *pagep = gva_host(info.percpu_gva);
	virtkit_percpu pc{};
	pc.self = info.percpu_gva;
	pc.vcpu_id = vcpu.id();
	std::memcpy(pagep, &pc, sizeof(pc));

	info.stack_top = alloc_vaddr(options_.stack_size) + options_.stack_size;
	info.rsp0_top = alloc_vaddr(16 * page_size) + 16 * page_size;

	std::uint64_t tss_gva = info.percpu_gva + tss_offset;
	auto *gdt = reinterpret_cast<std::uint64_t *>(pagep + gdt_offset);
	gdt[0] = 0;
	gdt[1] = 0x00af9b000000ffffull; /* kernel code64 */
	gdt[2] = 0x00cf93000000ffffull; /* kernel data */
	gdt[3] = 0x00cff3000000ffffull; /* user data, DPL3 */
	gdt[4] = 0x00affb000000ffffull; /* user code64, DPL3 */
	gdt[5] = 0x67 | (tss_gva & 0xffffff) << 16 | 0x8bull << 40 |
		 ((tss_gva >> 24) & 0xff) << 56; /* busy 64-bit TSS */
	gdt[6] = tss_gva >> 32;
	auto *tss = pagep + tss_offset;
	std::memcpy(tss + 4, &info.rsp0_top, 8); /* rsp0 */

	kvm_sregs s = vcpu.sregs();
	s.cr0 = 0x80050033; /* PG AM WP NE ET MP PE */
	s.cr4 = 0x620;	    /* OSXMMEXCPT OSFXSR PAE */
	s.efer = 0xd01;	    /* NXE LMA LME SCE */
	s.cr3 = tables_->root();
	s.cs = code64(sel_kernel_cs, 0);
	s.ds = s.es = s.fs = s.gs = s.ss = data(sel_kernel_ds, 0);
	s.gs.base = info.percpu_gva;
	s.tr = {};
	s.tr.base = tss_gva;
	s.tr.limit = 0x67;
	s.tr.selector = sel_tss;
	s.tr.type = 11;
	s.tr.present = 1;
	s.ldt = {};
	s.ldt.unusable = 1;
	s.gdt.base = info.percpu_gva + gdt_offset;
	s.gdt.limit = 7 * 8 - 1;
	s.idt.base = idt_gva_;
	s.idt.limit = 256 * 16 - 1;
	vcpu.set_sregs(s);
}

Vcpu &GuestVm::add_vcpu_raw(std::uint64_t entry, std::initializer_list<std::uint64_t> args)
{
	/*
	 * Check the arguments before KVM_CREATE_VCPU: KVM cannot destroy a
	 * vCPU, so a vCPU created for a call that then fails would keep its
	 * id and make every later add_vcpu() fail with EEXIST.
	 */
	if (args.size() > 6)
		throw Error("GuestVm::add_vcpu", EINVAL, "more than six guest arguments");
	if (!gva_to_gpa(entry))
		throw Error("GuestVm::add_vcpu", EFAULT,
			    "entry " + hex(entry) + " is not mapped in the guest");
	auto id = static_cast<std::uint32_t>(vcpus_.size());
	Vcpu vcpu = vm_.create_vcpu(id);
	vcpu.set_cpuid(cpuid_);
	auto info = std::make_unique<VcpuInfo>();
	setup_vcpu(vcpu, *info);
	infos_.push_back(std::move(info));
	vcpus_.push_back(std::move(vcpu));
	try {
		set_entry_raw(vcpus_.back(), entry, args);
	} catch (...) {
		vcpus_.pop_back();
		infos_.pop_back();
		throw;
	}
	return vcpus_.back();
}

void GuestVm::set_entry_raw(Vcpu &vcpu, std::uint64_t entry,
			    std::initializer_list<std::uint64_t> args)
{
	if (args.size() > 6)
		throw Error("GuestVm::set_entry", EINVAL, "more than six guest arguments");
	if (vcpu.id() >= infos_.size() || &vcpus_[vcpu.id()] != &vcpu)
		throw Error("GuestVm::set_entry", EINVAL, "vcpu is not one of this GuestVm's");
	if (!gva_to_gpa(entry))
		throw Error("GuestVm::set_entry", EFAULT,
			    "entry " + hex(entry) + " is not mapped in the guest");
	auto &info = *infos_[vcpu.id()];
	std::uint64_t rsp = info.stack_top - 8;
	std::uint64_t ret = reinterpret_cast<std::uint64_t>(virtkit_guest_return);
	write_gva(rsp, &ret, sizeof(ret));

	kvm_regs r{};
	r.rflags = 0x2;
	r.rip = entry;
	r.rsp = rsp;
	__u64 *argregs[] = {&r.rdi, &r.rsi, &r.rdx, &r.rcx, &r.r8, &r.r9};
	std::size_t i = 0;
	for (auto a : args)
		*argregs[i++] = a;
	vcpu.set_regs(r);
}

Vcpu &GuestVm::vcpu(std::size_t index)
{
	if (index >= vcpus_.size())
		throw Error("GuestVm::vcpu", ENOENT, "no vcpu " + std::to_string(index));
	return vcpus_[index];
}

std::uint64_t GuestVm::percpu_gpa(std::uint32_t vcpu_id) const
{
	if (vcpu_id >= infos_.size())
		throw Error("GuestVm::percpu_gpa", ENOENT, "no vcpu " + std::to_string(vcpu_id));
	return infos_[vcpu_id]->percpu_gpa;
}

static std::string bounded(const char *s, std::size_t n)
{
	return std::string(s, strnlen(s, n));
}

std::optional<Ucall> GuestVm::ucall(Vcpu &vcpu, const Exit &exit)
{
	auto *io = std::get_if<IoExit>(&exit);
	if (!io || io->port != VIRTKIT_UCALL_PORT || !io->is_out() || vcpu.id() >= infos_.size())
		return std::nullopt;
	/* The guest wrote it: treat every field as untrusted. */
	auto raw = vm_.memory().read_obj<virtkit_percpu>(infos_[vcpu.id()]->percpu_gpa).ucall;
	Ucall uc;
	switch (raw.cmd) {
	case VIRTKIT_UCALL_SYNC: uc.kind = Ucall::Kind::sync; break;
	case VIRTKIT_UCALL_ASSERT: uc.kind = Ucall::Kind::assert_failed; break;
	case VIRTKIT_UCALL_DONE: uc.kind = Ucall::Kind::done; break;
	case VIRTKIT_UCALL_UNHANDLED: uc.kind = Ucall::Kind::unhandled_exception; break;
	case VIRTKIT_UCALL_PRINT: uc.kind = Ucall::Kind::print; break;
	default:
		throw GuestFailure("vcpu " + std::to_string(vcpu.id()) +
				   ": ucall with unknown command " + std::to_string(raw.cmd));
	}
	std::uint64_t n = raw.nargs < VIRTKIT_UCALL_MAX_ARGS ? raw.nargs : VIRTKIT_UCALL_MAX_ARGS;
	uc.args.assign(raw.args, raw.args + n);
	if (uc.kind == Ucall::Kind::unhandled_exception)
		uc.args.resize(4);
	uc.file = bounded(raw.file, sizeof(raw.file));
	uc.line = static_cast<int>(raw.line);
	uc.message = bounded(raw.message, sizeof(raw.message));
	return uc;
}

Ucall GuestVm::run(Vcpu &vcpu)
{
	Exit exit = vcpu.run();
	auto uc = ucall(vcpu, exit);
	std::string who = "vcpu " + std::to_string(vcpu.id());
	if (!uc) {
		std::string what = who + ": unexpected exit: " + describe(exit);
		if (std::holds_alternative<IoExit>(exit) || std::holds_alternative<ShutdownExit>(exit) ||
		    std::holds_alternative<InternalErrorExit>(exit))
			what += " at rip=" + hex(vcpu.regs().rip);
		throw GuestFailure(what);
	}
	if (uc->kind == Ucall::Kind::assert_failed || uc->kind == Ucall::Kind::unhandled_exception)
		throw GuestFailure(who + ": " + uc->describe(), uc);
	return *uc;
}

void GuestVm::run_to_done(Vcpu &vcpu)
{
	Ucall uc = run(vcpu);
	if (uc.kind != Ucall::Kind::done)
		throw GuestFailure("vcpu " + std::to_string(vcpu.id()) + ": expected GUEST_DONE, got " +
				   uc.describe(), uc);
}

} // namespace virtkit::x86

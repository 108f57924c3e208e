// SPDX-License-Identifier: MIT
/*
 * virtkit::x86::GuestVm - a VM prepared to run guest code written as
 * ordinary functions of the running executable (the model is the kernel's
 * tools/testing/selftests/kvm/lib/x86).
 *
 * The constructor creates the VM and one region of guest RAM at GPA 0, builds
 * 4-level page tables, loads every page of the executable at its host address
 * (so a host function pointer is a guest entry point and string literals are
 * shared), and sets up an IDT whose handlers report exceptions. Each vCPU gets
 * 64-bit mode at CPL0, its own GDT, TSS, stack and per-CPU page (at %gs:0),
 * and starts at an entry function with up to six integer arguments. When the
 * entry function returns, the guest reports DONE. Its CPUID is everything
 * KVM supports (KVM_GET_SUPPORTED_CPUID), so guest code may turn on any
 * feature the host's KVM offers: SMEP, SMAP, PKU, and PKS where KVM
 * virtualizes it (System::pks_support()).
 *
 * Guest code must be linked into the executable (link libvirtkit statically,
 * -no-pie is not required) and must not call libc: see virtkit/x86/guest.h.
 * Global variables are copied at construction; sync_to_guest() and
 * sync_from_guest() copy them again afterwards.
 */
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <virtkit/system.hpp>
#include <virtkit/vcpu.hpp>
#include <virtkit/vm.hpp>
#include <virtkit/x86/guest.h>
#include <virtkit/x86/page_tables.hpp>

namespace virtkit::x86 {

struct GuestOptions {
	/* Guest RAM at GPA 0 for page tables, the executable, stacks and allocations. */
	std::uint64_t memory_size = 64ull << 20;
	/* Per-vCPU stack. */
	std::uint64_t stack_size = 64ull << 10;
	/* Options of the underlying VM. */
	VmOptions vm = {};
	/*
	 * Where GUEST_PRINTF output goes; default: stderr, as "# vcpuN: text"
	 * (a KTAP diagnostic line).
	 */
	std::function<void(std::uint32_t vcpu, std::string_view text)> print = {};
};

/* A decoded ucall. */
struct Ucall {
	enum class Kind { sync, assert_failed, done, unhandled_exception, print };
	Kind kind;
	std::vector<std::uint64_t> args;
	std::string file;
	int line = 0;
	std::string message;

	/* "guest assertion failed at file:line: message", "unhandled #PF ...". */
	std::string describe() const;
};

/* The guest failed: an assertion, an unhandled exception or an unexpected exit. */
class GuestFailure : public std::runtime_error {
public:
	explicit GuestFailure(const std::string &what, std::optional<Ucall> uc = {})
		: std::runtime_error(what), ucall_(std::move(uc)) {}
	const std::optional<Ucall> &ucall() const noexcept { return ucall_; }

private:
	std::optional<Ucall> ucall_;
};

/* "#PF" for 14, "vector 42" for others. */
std::string exception_name(std::uint64_t vector);

class GuestVm : private PhysicalMemory {
public:
	explicit GuestVm(const System &system, const GuestOptions &options = {});
	~GuestVm();
	GuestVm(const GuestVm &) = delete;
	GuestVm &operator=(const GuestVm &) = delete;

	Vm &vm() noexcept { return vm_; }
	GuestMemory &memory() noexcept { return vm_.memory(); }
	PageTables &page_tables() noexcept { return *tables_; }

	/*
	 * Add a vCPU (ids 0, 1, ...) that starts at entry(args...). entry is a
	 * function of this executable taking up to six integer or pointer
	 * arguments.
	 */
	template <class Fn, class... Args>
	Vcpu &add_vcpu(Fn *entry, Args... args)
	{
		static_assert(sizeof...(Args) <= 6, "at most six guest arguments");
		return add_vcpu_raw(reinterpret_cast<std::uint64_t>(entry),
				    {to_arg(args)...});
	}
	Vcpu &add_vcpu_raw(std::uint64_t entry, std::initializer_list<std::uint64_t> args);
	/* Restart a vCPU at entry(args...) with a fresh stack. */
	template <class Fn, class... Args>
	void set_entry(Vcpu &vcpu, Fn *entry, Args... args)
	{
		static_assert(sizeof...(Args) <= 6, "at most six guest arguments");
		set_entry_raw(vcpu, reinterpret_cast<std::uint64_t>(entry), {to_arg(args)...});
	}
	void set_entry_raw(Vcpu &vcpu, std::uint64_t entry,
			   std::initializer_list<std::uint64_t> args);

	Vcpu &vcpu(std::size_t index);
	std::size_t vcpu_count() const noexcept { return vcpus_.size(); }

	/* Zeroed guest-physical pages from the guest RAM region. */
	std::uint64_t alloc_pages(std::uint64_t count);
	/* Zeroed memory mapped at a fresh guest-virtual address; returns the gva. */
	std::uint64_t alloc_vaddr(std::uint64_t size, const PageFlags &flags = {});
	/* Map gva to gpa (see PageTables::map). */
	void map(std::uint64_t gva, std::uint64_t gpa, std::uint64_t size,
		 const PageFlags &flags = {}, PageSize page = PageSize::k4);
	/* Map [gpa, gpa + size) at the same virtual address. */
	void identity_map(std::uint64_t gpa, std::uint64_t size, const PageFlags &flags = {});
	std::optional<std::uint64_t> gva_to_gpa(std::uint64_t gva) const;
	/* Host pointer to the guest memory behind a guest-virtual address (one page). */
	std::byte *gva_host(std::uint64_t gva);

	/* Copy bytes between the host and the guest at the same virtual address. */
	void write_gva(std::uint64_t gva, const void *src, std::uint64_t size);
	void read_gva(std::uint64_t gva, void *dst, std::uint64_t size);
	template <class T> void sync_to_guest(const T &global)
	{
		write_gva(reinterpret_cast<std::uint64_t>(&global), &global, sizeof(T));
	}
	template <class T> void sync_from_guest(T &global)
	{
		read_gva(reinterpret_cast<std::uint64_t>(&global), &global, sizeof(T));
	}

	/* Install a guest function as the handler of an exception vector (0 removes). */
	void install_exception_handler(std::uint8_t vector, virtkit_ex_handler handler);

	/* The ucall behind an exit, if it is one (PRINT is consumed internally). */
	std::optional<Ucall> ucall(Vcpu &vcpu, const Exit &exit);
	/*
	 * Run until the guest's next GUEST_SYNC or GUEST_DONE. Guest assertion
	 * failures, unhandled exceptions and exits that are not ucalls throw
	 * GuestFailure naming what happened.
	 */
	Ucall run(Vcpu &vcpu);
	/* run() and expect DONE. */
	void run_to_done(Vcpu &vcpu);

	/* The per-CPU page (guest-physical) of a vCPU. */
	std::uint64_t percpu_gpa(std::uint32_t vcpu_id) const;

private:
	struct VcpuInfo;

	std::byte *page(std::uint64_t gpa) override;
	std::uint64_t alloc_table_page() override;
	std::uint64_t alloc_private_gva(std::uint64_t size);
	void load_executable();
	void build_idt();
	void setup_vcpu(Vcpu &vcpu, VcpuInfo &info);
	template <class T> static std::uint64_t to_arg(T v)
	{
		if constexpr (std::is_pointer_v<T>)
			return reinterpret_cast<std::uint64_t>(v);
		else
			return static_cast<std::uint64_t>(v);
	}

	GuestOptions options_;
	Vm vm_;
	std::vector<kvm_cpuid_entry2> cpuid_;
	RegionId ram_;
	std::uint64_t next_phys_;
	std::uint64_t next_private_gva_;
	std::unique_ptr<PageTables> tables_;
	std::uint64_t idt_gva_ = 0;
	std::deque<Vcpu> vcpus_;
	std::vector<std::unique_ptr<VcpuInfo>> infos_;
	ExitHandlerRegistration print_handler_;
};

} // namespace virtkit::x86

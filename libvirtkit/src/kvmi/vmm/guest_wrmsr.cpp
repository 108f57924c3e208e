// SPDX-License-Identifier: MIT
/*
 * The guest-only rules of KVM's WRMSR emulation, for the MSRs a tool can
 * control (0-0x1fff, 0xc0000000-0xc0001fff; x2APIC excluded). KVM_SET_MSRS
 * is host-initiated: KVM skips these checks and side effects for it
 * (`host_initiated` in arch/x86/kvm/x86.c kvm_set_msr_common() and
 * __kvm_set_msr(), vmx/vmx.c vmx_set_msr(), svm/svm.c svm_set_msr(),
 * lapic.c kvm_set_apic_base() / kvm_apic_set_base()), read from Linux 6.1,
 * 6.12 and 7.x, where they agree. Rules of the vendor code apply only with
 * that vendor's module (kvm_intel, kvm_amd: probed in /sys/module); with
 * another (kvm_pvm) only the common ones do. Whatever KVM refuses for the
 * host as well is refused by KVM_SET_MSRS itself and becomes #GP too.
 * Documentation/introspection.rst lists what still differs. With virtkit.ko
 * (VIRTKIT_CAP_GUEST_WRMSR) none of this is used: the module performs the
 * write through KVM's own guest write.
 */
#include "kvmi/vmm/guest_wrmsr.hpp"

#include <sys/ioctl.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <virtkit/cpuid.hpp>
#include <virtkit/error.hpp>
#include <virtkit/spp.hpp>
#include <virtkit/vcpu.hpp>
#include <virtkit/vm.hpp>

#include "core/cpu_vendor.hpp"
#include "core/feature_slots.hpp"
#include "core/ioctl.hpp"
#include "core/run_control.hpp"
#include "kmod/kmod_vm.hpp"

namespace virtkit::detail {

namespace {

namespace msr {
constexpr std::uint32_t tsc = 0x10, apic_base = 0x1b, smi_count = 0x34, feat_ctl = 0x3a,
			tsc_adjust = 0x3b, spec_ctrl = 0x48, pred_cmd = 0x49, ucode_rev = 0x8b,
			sgx_hash0 = 0x8c, sgx_hash3 = 0x8f, smbase = 0x9e, perfctr0 = 0xc1,
			perfctr7 = 0xc8, platform_info = 0xce, umwait_control = 0xe1,
			arch_capabilities = 0x10a, flush_cmd = 0x10b, tsx_ctrl = 0x122,
			mcg_cap = 0x179, mcg_ctl = 0x17b, misc_enable = 0x1a0, xfd = 0x1c4,
			xfd_err = 0x1c5, debugctl = 0x1d9, mc0_ctl2 = 0x280, mc31_ctl2 = 0x29f,
			perf_capabilities = 0x345, perf_global_status = 0x38e, mc0_ctl = 0x400,
			mc31_misc = 0x47f, vmx_first = 0x480, vmx_last = 0x491, mcg_ext_ctl = 0x4d0,
			u_cet = 0x6a0, s_cet = 0x6a2, pl0_ssp = 0x6a4, pl3_ssp = 0x6a7,
			int_ssp_tab = 0x6a8, bndcfgs = 0xd90, xss = 0xda0, efer = 0xc0000080,
			tsc_aux = 0xc0000103, tsc_ratio = 0xc0000104,
			amd_perf_global_status = 0xc0000300, hwcr = 0xc0010015;
}

/* A CPUID feature bit, as KVM's guest_cpuid_has() looks it up. */
struct Feature {
	std::uint32_t function, index;
	CpuidReg reg;
	unsigned bit;
};

namespace feature {
using enum CpuidReg;
constexpr Feature tsc_adjust{7, 0, ebx, 1}, rtm{7, 0, ebx, 11}, mpx{7, 0, ebx, 14},
	waitpkg{7, 0, ecx, 5}, shstk{7, 0, ecx, 7}, rdpid{7, 0, ecx, 22},
	bus_lock_detect{7, 0, ecx, 24}, sgx_lc{7, 0, ecx, 30}, ibt{7, 0, edx, 20},
	spec_ctrl{7, 0, edx, 26}, flush_l1d{7, 0, edx, 28}, arch_capabilities{7, 0, edx, 29},
	xsaves{0xd, 1, eax, 3}, xfd{0xd, 1, eax, 4}, svm{0x80000001, 0, ecx, 2},
	nx{0x80000001, 0, edx, 20}, ffxsr{0x80000001, 0, edx, 25},
	rdtscp{0x80000001, 0, edx, 27}, lm{0x80000001, 0, edx, 29},
	amd_ibpb{0x80000008, 0, ebx, 12}, amd_ibrs{0x80000008, 0, ebx, 14},
	amd_stibp{0x80000008, 0, ebx, 15}, amd_ssbd{0x80000008, 0, ebx, 24},
	tscratemsr{0x8000000a, 0, edx, 4},
	autoibrs{0x80000021, 0, eax, 8}, sbpb{0x80000021, 0, eax, 27};
}

enum class KvmVendor { vmx, svm, other };

/* Which vendor module runs the guests: its *_set_msr() has rules of its own. */
KvmVendor kvm_vendor()
{
	static const KvmVendor v = [] {
		std::error_code ec;
		if (std::filesystem::exists("/sys/module/kvm_intel", ec))
			return KvmVendor::vmx;
		if (std::filesystem::exists("/sys/module/kvm_amd", ec))
			return KvmVendor::svm;
		return KvmVendor::other;
	}();
	return v;
}

/*
 * Whether the common code's rules are upstream KVM's: with kvm_intel and
 * kvm_amd. Measured on kvm_pvm's kernel: its guest changes IA32_MISC_ENABLE's
 * PMU bits and writes IA32_PRED_CMD without the CPUID features, so those two
 * rules are left out there.
 */
bool upstream_rules()
{
	return kvm_vendor() != KvmVendor::other;
}

/* The vCPU's CPUID (KVM_GET_CPUID2), read the first time a rule asks. */
class GuestCpuid {
public:
	explicit GuestCpuid(const Vcpu &vcpu) : vcpu_(vcpu) {}

	bool has(const Feature &f)
	{
		auto *e = cpuid_find(entries(), f.function, f.index);
		return e && (cpuid_reg(*e, f.reg) >> f.bit & 1);
	}
	/* KVM's guest_cpuid_is_amd_compatible(). */
	bool amd_compatible()
	{
		auto *e = cpuid_find(entries(), 0);
		return e && vendor_is_amd_compatible(e->ebx, e->ecx, e->edx);
	}

private:
	const std::vector<kvm_cpuid_entry2> &entries()
	{
		if (!entries_)
			entries_ = vcpu_.cpuid();
		return *entries_;
	}

	const Vcpu &vcpu_;
	std::optional<std::vector<kvm_cpuid_entry2>> entries_;
};

constexpr std::uint64_t bit(unsigned n) { return 1ull << n; }

enum class Action { perform, ignore, fault, tsc };

struct Decision {
	Action action;
	std::uint64_t value; /* what to write (perform) */
};

/* EFER bits a guest may set only with their CPUID feature (__kvm_valid_efer()). */
bool efer_bits_valid(GuestCpuid &cpuid, std::uint64_t efer)
{
	constexpr std::uint64_t lme = bit(8), lma = bit(10), nxe = bit(11), svme = bit(12),
				ffxsr = bit(14), autoibrs = bit(21);
	const struct {
		std::uint64_t bits;
		Feature feature;
	} needs[] = {{autoibrs, feature::autoibrs}, {ffxsr, feature::ffxsr},
		     {svme, feature::svm},	    {lme | lma, feature::lm},
		     {nxe, feature::nx}};
	for (auto &n : needs)
		if ((efer & n.bits) && !cpuid.has(n.feature))
			return false;
	return true;
}

/*
 * The APIC base: the guest cannot go from x2APIC to xAPIC mode, nor from
 * disabled to x2APIC (kvm_set_apic_base(), 7.x kvm_apic_set_base()).
 */
bool apic_transition_valid(std::uint64_t old_base, std::uint64_t new_base)
{
	constexpr std::uint64_t enable = bit(11), extd = bit(10);
	auto mode = [](std::uint64_t b) { return b & (enable | extd); };
	if (mode(old_base) == (enable | extd) && mode(new_base) == enable)
		return false;
	return !(mode(old_base) == 0 && mode(new_base) == (enable | extd));
}

/*
 * IA32_PRED_CMD: the MSR needs IBPB (SPEC_CTRL or AMD_IBPB) or SBPB, and
 * each command bit its own feature (kvm_set_msr_common(); before 6.4
 * vmx_set_msr() / svm_set_msr() with guest_has_pred_cmd_msr()).
 */
bool pred_cmd_valid(GuestCpuid &cpuid, std::uint64_t value)
{
	constexpr std::uint64_t ibpb = bit(0), sbpb = bit(7);
	const bool has_ibpb = cpuid.has(feature::spec_ctrl) || cpuid.has(feature::amd_ibpb);
	const bool has_sbpb = cpuid.has(feature::sbpb);
	if (!has_ibpb && !has_sbpb)
		return false;
	return !((value & ibpb) && !has_ibpb) && !((value & sbpb) && !has_sbpb);
}

/* The machine-check MSRs (set_msr_mce()). */
Decision mce_write(Vcpu &vcpu, GuestCpuid &cpuid, std::uint32_t index, std::uint64_t value)
{
	constexpr std::uint64_t mcg_ctl_p = bit(8), mcg_cmci_p = bit(10), mcstatuswren = bit(18);
	const std::uint64_t cap = vcpu.try_msr(msr::mcg_cap).value_or(0);
	if (index == msr::mcg_ctl && !(cap & mcg_ctl_p))
		return {Action::fault, value};
	if (index >= msr::mc0_ctl2 && index <= msr::mc31_ctl2 && !(cap & mcg_cmci_p))
		return {Action::fault, value};
	/* MCi_STATUS: only 0, unless an AMD guest set HWCR.McStatusWrEn. */
	if (index >= msr::mc0_ctl && index <= msr::mc31_misc && (index & 3) == 1 && value &&
	    !(cpuid.amd_compatible() &&
	      (vcpu.try_msr(msr::hwcr).value_or(0) & mcstatuswren)))
		return {Action::fault, value};
	return {Action::perform, value};
}

/* IA32_SPEC_CTRL: guest_has_spec_ctrl_msr() (vmx_set_msr(), svm_set_msr()). */
bool has_spec_ctrl(GuestCpuid &cpuid)
{
	return cpuid.has(feature::spec_ctrl) || cpuid.has(feature::amd_stibp) ||
	       cpuid.has(feature::amd_ibrs) || cpuid.has(feature::amd_ssbd);
}

/* Rules of vmx_set_msr(), with kvm_intel only. */
Decision vmx_write(Vcpu &vcpu, GuestCpuid &cpuid, std::uint32_t index, std::uint64_t value)
{
	constexpr std::uint64_t bus_lock_detect = bit(2), rtm_debug = bit(15),
				feat_ctl_locked = bit(0), feat_ctl_sgx_lc = bit(17),
				feat_ctl_lmce = bit(20), arch_cap_tsx_ctrl = bit(7);
	const Decision perform{Action::perform, value}, fault{Action::fault, value};
	auto unless = [&](bool allowed) { return allowed ? perform : fault; };
	switch (index) {
	case msr::spec_ctrl:
		return unless(has_spec_ctrl(cpuid));
	case msr::bndcfgs:
		return unless(cpuid.has(feature::mpx));
	case msr::umwait_control: /* vmx_has_waitpkg() */
		return unless(cpuid.has(feature::waitpkg));
	case msr::tsx_ctrl: /* the vCPU's ARCH_CAPABILITIES.TSX_CTRL_MSR */
		/* Newer kernels read it as 0 for the host without the CPUID bit. */
		if (!cpuid.has(feature::arch_capabilities))
			return perform;
		return unless(vcpu.try_msr(msr::arch_capabilities).value_or(0) & arch_cap_tsx_ctrl);
	case msr::mcg_ext_ctl: /* FEATURE_CONTROL.LMCE_ON */
		return unless(vcpu.try_msr(msr::feat_ctl).value_or(0) & feat_ctl_lmce);
	case msr::sgx_hash0 ... msr::sgx_hash3: {
		const std::uint64_t fc = vcpu.try_msr(msr::feat_ctl).value_or(0);
		return unless(cpuid.has(feature::sgx_lc) &&
			      (!(fc & feat_ctl_locked) || (fc & feat_ctl_sgx_lc)));
	}
	case msr::debugctl: /* vmx_get_supported_debugctl(): bits of a CPUID feature */
		return unless((!(value & bus_lock_detect) || cpuid.has(feature::bus_lock_detect)) &&
			      (!(value & rtm_debug) || cpuid.has(feature::rtm)));
	case msr::perfctr0 ... msr::perfctr7:
		/* intel_pmu_set_msr(): a legacy-width counter write is sign-extended. */
		return {Action::perform, static_cast<std::uint64_t>(static_cast<std::int64_t>(
						 static_cast<std::int32_t>(value)))};
	}
	return perform;
}

/* Rules of svm_set_msr(), with kvm_amd only. */
Decision svm_write(GuestCpuid &cpuid, std::uint32_t index, std::uint64_t value)
{
	const Decision perform{Action::perform, value}, fault{Action::fault, value};
	auto unless = [&](bool allowed) { return allowed ? perform : fault; };
	switch (index) {
	case msr::spec_ctrl:
		return unless(has_spec_ctrl(cpuid));
	case msr::tsc_ratio: /* tsc_scaling_enabled: TSCRATEMSR */
		return unless(cpuid.has(feature::tscratemsr));
	}
	return perform;
}

Decision guest_rules(Vcpu &vcpu, GuestCpuid &cpuid, std::uint32_t index, std::uint64_t value)
{
	constexpr std::uint64_t feat_ctl_locked = bit(0), misc_emon = bit(7),
				misc_pmu_ro = bit(11) | bit(12), efer_lme = bit(8),
				cr0_pg = bit(31);
	const Decision perform{Action::perform, value}, fault{Action::fault, value};
	auto unless = [&](bool allowed) { return allowed ? perform : fault; };
	switch (index) {
	/* Read-only for the guest (kvm_set_msr_common(), vmx_set_msr()). */
	case msr::arch_capabilities:
	case msr::perf_capabilities:
	case msr::platform_info:
	case msr::smbase:
	case msr::smi_count:
	case msr::vmx_first ... msr::vmx_last:
	/* The PMU's global status (kvm_pmu_set_msr(), intel/amd_pmu_set_msr()). */
	case msr::perf_global_status:
	case msr::amd_perf_global_status:
		return fault;
	case msr::ucode_rev: /* kvm_set_msr_common() keeps only the host's */
		return {Action::ignore, value};
	case msr::tsc:
		return {Action::tsc, value};
	case msr::tsc_adjust:
		/* Without the feature KVM ignores the write, the host's too. */
		return {cpuid.has(feature::tsc_adjust) ? Action::tsc : Action::ignore, value};
	case msr::apic_base: {
		auto old = vcpu.try_msr(msr::apic_base);
		return unless(!old || apic_transition_valid(*old, value));
	}
	case msr::feat_ctl: /* vmx_set_msr(): is_vmx_feature_control_msr_valid() */
		return unless(!(vcpu.try_msr(msr::feat_ctl).value_or(0) & feat_ctl_locked));
	case msr::efer: { /* set_efer() */
		kvm_sregs s = vcpu.sregs();
		if ((s.cr0 & cr0_pg) && ((s.efer ^ value) & efer_lme))
			return fault;
		return unless(efer_bits_valid(cpuid, value));
	}
	case msr::misc_enable: { /* kvm_set_msr_common(): PMU bits read-only, EMON ignored */
		auto old = vcpu.try_msr(msr::misc_enable);
		if (!old || !upstream_rules())
			return perform;
		if ((*old ^ value) & misc_pmu_ro)
			return fault;
		return {Action::perform, (value & ~misc_emon) | (*old & misc_emon)};
	}
	/* MSRs of a CPUID feature: #GP for a guest without it. */
	case msr::tsc_aux: /* __kvm_set_msr() */
		return unless(cpuid.has(feature::rdtscp) || cpuid.has(feature::rdpid));
	case msr::xss: /* kvm_set_msr_common() */
		return unless(cpuid.has(feature::xsaves));
	case msr::xfd:
	case msr::xfd_err:
		return unless(cpuid.has(feature::xfd));
	case msr::flush_cmd:
		return unless(cpuid.has(feature::flush_l1d));
	case msr::pred_cmd:
		return unless(!upstream_rules() || pred_cmd_valid(cpuid, value));
	case msr::u_cet: /* __kvm_set_msr() */
	case msr::s_cet:
		return unless(cpuid.has(feature::shstk) || cpuid.has(feature::ibt));
	case msr::pl0_ssp ... msr::pl3_ssp:
		return unless(cpuid.has(feature::shstk));
	case msr::int_ssp_tab:
		return unless(cpuid.has(feature::shstk) && cpuid.has(feature::lm));
	case msr::mcg_ctl:
	case msr::mc0_ctl2 ... msr::mc31_ctl2:
	case msr::mc0_ctl ... msr::mc31_misc:
		return mce_write(vcpu, cpuid, index, value);
	}
	switch (kvm_vendor()) {
	case KvmVendor::vmx:
		return vmx_write(vcpu, cpuid, index, value);
	case KvmVendor::svm:
		return svm_write(cpuid, index, value);
	case KvmVendor::other:
		break;
	}
	return perform;
}

std::string vcpu_name(const Vcpu &vcpu)
{
	return "vcpu " + std::to_string(vcpu.id());
}

/*
 * A guest's write of IA32_TSC or IA32_TSC_ADJUST moves the TSC offset by the
 * change and keeps the two consistent: IA32_TSC adds the change to
 * TSC_ADJUST, TSC_ADJUST moves the TSC with it (kvm_set_msr_common():
 * adjust_tsc_offset_guest()). A host write of IA32_TSC synchronizes the
 * TSC instead (kvm_synchronize_tsc()) and one of TSC_ADJUST only stores it.
 * The offset is the vCPU's KVM_VCPU_TSC_OFFSET attribute; without it the
 * write stays a host write.
 */
bool write_tsc(Vcpu &vcpu, std::uint32_t index, std::uint64_t value)
{
	std::uint64_t offset = 0;
	kvm_device_attr attr{};
	attr.group = KVM_VCPU_TSC_CTRL;
	attr.attr = KVM_VCPU_TSC_OFFSET;
	attr.addr = reinterpret_cast<std::uint64_t>(&offset);
	if (typed_ioctl<KVM_HAS_DEVICE_ATTR>(vcpu.fd(), &attr) != 0)
		return vcpu.try_set_msr(index, value);
	auto adjust = vcpu.try_msr(msr::tsc_adjust);
	/* The guest's TSC now: what the host reads (the L1 TSC, as the guest's write uses). */
	auto now = index == msr::tsc ? vcpu.try_msr(msr::tsc) : adjust;
	if (!now)
		return false;
	const std::uint64_t change = value - *now;
	VK_IOCTL(vcpu.fd(), KVM_GET_DEVICE_ATTR, &attr, vcpu_name(vcpu) + " TSC offset", -1);
	offset += change;
	VK_IOCTL(vcpu.fd(), KVM_SET_DEVICE_ATTR, &attr, vcpu_name(vcpu) + " TSC offset", -1);
	/* KVM ignores a host write of TSC_ADJUST without the CPUID feature. */
	if (adjust)
		vcpu.try_set_msr(msr::tsc_adjust, index == msr::tsc ? *adjust + change : value);
	return true;
}

/* The module's attachment if CONTINUE is to use it, else nullptr (the rules). */
const KmodVm *decide_path(Vm &vm)
{
	SppBackendKind kind;
	bool forced = false; /* by VIRTKIT_SPP_BACKEND: failing to attach is an error */
	if (auto *spp = SubpageProtection::of(vm)) {
		kind = spp->backend();
		forced = true; /* SPP attached it already */
	} else {
		const char *env = std::getenv("VIRTKIT_SPP_BACKEND");
		forced = env && *env;
		kind = choose_spp_backend(SppBackendKind::automatic);
	}
	if (kind != SppBackendKind::kmod)
		return nullptr;
	try {
		KmodVm &k = attach_kmod(vm);
		return k.check_extension(VIRTKIT_CAP_GUEST_WRMSR) > 0 ? &k : nullptr;
	} catch (const Error &) {
		if (forced)
			throw;
		return nullptr; /* automatic: /dev/virtkit there, but not usable for this VM */
	}
}

} // namespace

const GuestWrmsrPath &guest_wrmsr_path(Vm &vm)
{
	return RunControl::features(vm).get_or_attach<GuestWrmsrPath>(
		[&] { return std::make_unique<GuestWrmsrPath>(GuestWrmsrPath{decide_path(vm)}); });
}

const GuestWrmsrPath *find_guest_wrmsr_path(Vm &vm) noexcept
{
	return RunControl::features(vm).find<GuestWrmsrPath>();
}

bool perform_guest_wrmsr(const GuestWrmsrPath *path, Vcpu &vcpu, std::uint32_t index,
			 std::uint64_t value)
{
	if (path && path->kmod) {
		RunControl::registers_changed(vcpu);
		return path->kmod->guest_wrmsr(vcpu.fd(), index, value);
	}
	GuestCpuid cpuid(vcpu);
	const Decision d = guest_rules(vcpu, cpuid, index, value);
	switch (d.action) {
	case Action::fault:
		return false;
	case Action::ignore:
		return true;
	case Action::tsc:
		return write_tsc(vcpu, index, value);
	case Action::perform:
		break;
	}
	return vcpu.try_set_msr(index, d.value);
}

} // namespace virtkit::detail

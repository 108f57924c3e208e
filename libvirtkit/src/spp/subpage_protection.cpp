// SPDX-License-Identifier: MIT
#include <virtkit/spp.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <virtkit/error.hpp>
#include <virtkit/vcpu.hpp>
#include <virtkit/vm.hpp>

#include "core/ioctl.hpp"
#include "kmod/kmod_vm.hpp"
#include "spp/engine.hpp"
#include "core/feature_slots.hpp"
#include "core/run_control.hpp"

namespace virtkit {

using detail::hex;

SubpageProtection::SubpageProtection(std::unique_ptr<detail::SppEngine> engine)
	: engine_(std::move(engine)) {}

SubpageProtection::~SubpageProtection() = default;

void SubpageProtection::set_access(std::uint64_t gfn, std::span<const std::uint32_t> maps,
				   std::uint32_t flags)
{
	if (flags)
		throw Error("SubpageProtection::set_access", EINVAL,
			    "flags=" + hex(flags) + ": no flags are defined");
	if (maps.empty())
		return;
	if (maps.size() - 1 > ~0ull - gfn)
		throw Error("SubpageProtection::set_access", EINVAL,
			    "gfn=" + hex(gfn) + " npages=" + std::to_string(maps.size()) +
				    ": range wraps");
	engine_->set_access(gfn, maps);
}

std::vector<std::uint32_t> SubpageProtection::get_access(std::uint64_t gfn, std::uint64_t npages,
							 std::uint32_t flags) const
{
	if (flags)
		throw Error("SubpageProtection::get_access", EINVAL,
			    "flags=" + hex(flags) + ": no flags are defined");
	if (!npages)
		return {};
	if (npages - 1 > ~0ull - gfn)
		throw Error("SubpageProtection::get_access", EINVAL,
			    "gfn=" + hex(gfn) + " npages=" + std::to_string(npages) +
				    ": range wraps");
	return engine_->get_access(gfn, npages);
}

void SubpageProtection::on_violation(SppViolationHandler handler)
{
	engine_->on_violation(std::move(handler));
}

SppBackendKind SubpageProtection::backend() const noexcept { return engine_->kind(); }
SppStats SubpageProtection::stats() const { return engine_->stats(); }

static const char *backend_name(SppBackendKind k)
{
	switch (k) {
	case SppBackendKind::automatic:
		return "automatic";
	case SppBackendKind::user:
		return "user";
	case SppBackendKind::kmod:
		return "kmod";
	}
	return "?";
}

SppBackendKind detail::choose_spp_backend(SppBackendKind asked)
{
	if (asked != SppBackendKind::automatic)
		return asked;
	if (const char *env = std::getenv("VIRTKIT_SPP_BACKEND"); env && *env) {
		if (!std::strcmp(env, "user"))
			return SppBackendKind::user;
		if (!std::strcmp(env, "kmod"))
			return SppBackendKind::kmod;
		throw Error("SubpageProtection::enable", EINVAL,
			    std::string("VIRTKIT_SPP_BACKEND=") + env + ": expected user or kmod");
	}
	struct stat st;
	return ::stat(detail::kmod_device_path, &st) == 0 ? SppBackendKind::kmod
							  : SppBackendKind::user;
}

SubpageProtection &SubpageProtection::enable(Vm &vm, const SppOptions &options)
{
	/* An enum class holds any value of its type: refuse what is not one. */
	if (options.backend != SppBackendKind::automatic && options.backend != SppBackendKind::user &&
	    options.backend != SppBackendKind::kmod)
		throw Error("SubpageProtection::enable", EINVAL,
			    "SppOptions::backend = " +
				    std::to_string(static_cast<int>(options.backend)) +
				    ": not automatic, user or kmod");
	using detail::RunControl;
	auto &spp = RunControl::features(vm).get_or_attach<SubpageProtection>([&] {
		const SppBackendKind kind = detail::choose_spp_backend(options.backend);
		std::unique_ptr<detail::SppStore> store;
		detail::KmodVm *kmod = nullptr;
		if (kind == SppBackendKind::kmod) {
			/* Attached before SPP, so destroyed after it (feature_slots.hpp). */
			kmod = &detail::attach_kmod(vm);
			if (kmod->check_extension(VIRTKIT_CAP_SPP) <= 0)
				throw Error("SubpageProtection::enable", EOPNOTSUPP,
					    "this virtkit.ko does not offer sub-page protection "
					    "(VIRTKIT_CAP_SPP = 0)");
			kmod->spp_enable();
			store = std::make_unique<detail::KmodSppStore>(*kmod);
		} else {
			store = std::make_unique<detail::LocalSppStore>();
		}
		auto engine = std::make_unique<detail::SppEngine>(RunControl::memory_map(vm),
								  std::move(store));
		auto *e = engine.get();
		e->watch_stalls(vm);
		/* Its exit handler reads registers on most writes it completes. */
		RunControl::sync_regs(vm);
		/* Library features see exits before any handler of the VMM. */
		e->keep_registration(vm.add_exit_handler(
			[e](Vcpu &v, Exit &exit) { return e->on_exit(v, exit); }, INT_MIN));
		/*
		 * Emulation failures at CPL > 0 reach the engine too (KVM
		 * raises #UD there on its own): a user-mode write it completes
		 * at CPL 0 must not fault (raise_undefined_opcode).
		 */
		if (vm.check_extension(KVM_CAP_EXIT_ON_EMULATION_FAILURE) > 0) {
			e->set_exit_on_emulation_failure();
			vm.enable_cap(KVM_CAP_EXIT_ON_EMULATION_FAILURE, {1});
		}
		std::unique_ptr<SubpageProtection> spp(new SubpageProtection(std::move(engine)));
		/* From their next entry on, vCPUs run through the module's fast path. */
		if (kmod)
			RunControl::set_entry(vm, kmod);
		return spp;
	});
	if (options.backend != SppBackendKind::automatic && options.backend != spp.backend())
		throw Error("SubpageProtection::enable", EINVAL,
			    std::string("already enabled with the ") + backend_name(spp.backend()) +
				    " backend");
	return spp;
}

SubpageProtection *SubpageProtection::of(Vm &vm) noexcept
{
	return detail::RunControl::features(vm).find<SubpageProtection>();
}

} // namespace virtkit

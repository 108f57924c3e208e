// SPDX-License-Identifier: MIT
#include <virtkit/spp.hpp>

#include <unistd.h>

#include <cerrno>
#include <climits>
#include <vector>

#include <virtkit/error.hpp>
#include <virtkit/vcpu.hpp>
#include <virtkit/vm.hpp>

#include "ioctl.hpp"
#include "spp_user.hpp"
#include "state.hpp"

namespace virtkit {

using detail::hex;

SubpageProtection::SubpageProtection(std::unique_ptr<detail::SppBackend> backend)
	: backend_(std::move(backend)) {}

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
	backend_->set_access(gfn, maps);
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
	return backend_->get_access(gfn, npages);
}

void SubpageProtection::on_violation(SppViolationHandler handler)
{
	backend_->on_violation(std::move(handler));
}

SppBackendKind SubpageProtection::backend() const noexcept { return backend_->kind(); }
SppStats SubpageProtection::stats() const { return backend_->stats(); }

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

SubpageProtection &Vm::enable_spp(const SppOptions &options)
{
	auto &st = *state_;
	std::lock_guard lock(st.spp_mu);
	if (st.spp) {
		if (options.backend != SppBackendKind::automatic &&
		    options.backend != st.spp->backend())
			throw Error("Vm::enable_spp", EINVAL,
				    std::string("already enabled with the ") +
					    backend_name(st.spp->backend()) + " backend");
		return *st.spp;
	}
	switch (options.backend) {
	case SppBackendKind::kmod:
		throw Error("Vm::enable_spp", ENODEV,
			    "the kmod backend needs virtkit.ko (/dev/virtkit), which this "
			    "version of libvirtkit does not drive yet");
	case SppBackendKind::automatic:
	case SppBackendKind::user:
		break;
	}
	auto backend = std::make_unique<detail::SppUserBackend>(st);
	auto *b = backend.get();
	/* Library features see exits before any handler of the VMM. */
	b->keep_registration(add_exit_handler(
		[b](Vcpu &v, Exit &e) { return b->on_exit(v, e); }, INT_MIN));
	st.spp.reset(new SubpageProtection(std::move(backend)));
	return *st.spp;
}

SubpageProtection *Vm::spp() noexcept
{
	std::lock_guard lock(state_->spp_mu);
	return state_->spp.get();
}

} // namespace virtkit

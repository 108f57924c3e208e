// SPDX-License-Identifier: MIT
/*
 * The VMM's interrupt primitives: in-kernel irqchip and PIT, IRQ lines, GSI
 * routing, MSIs, irqfd and ioeventfd (Documentation/vmm-primitives.rst).
 *
 * Arguments are checked before the ioctl, so a call that throws has changed
 * nothing, and where KVM would quietly ignore a mistake (a GSI without a
 * route) the library says so.
 */
#include <virtkit/vm.hpp>

#include <fcntl.h>

#include <algorithm>
#include <map>
#include <mutex>

#include <virtkit/error.hpp>

#include "core/ioctl.hpp"
#include "core/vm_state.hpp"

namespace virtkit {

using detail::hex;
using Kind = detail::VmState::IrqchipKind;

/* KVM_IOAPIC_NUM_PINS and the 8 pins of each 8259. */
static constexpr std::uint32_t ioapic_pins = 24;
static constexpr std::uint32_t pic_pins = 8;

std::vector<GsiRoute> default_gsi_routing()
{
	/* arch/x86/kvm/irq_comm.c: default_routing[] */
	std::vector<GsiRoute> r;
	for (std::uint32_t gsi = 0; gsi < ioapic_pins; gsi++) {
		r.push_back({gsi, IrqchipPin{Irqchip::ioapic, gsi}});
		if (gsi < 16)
			r.push_back({gsi, IrqchipPin{gsi < 8 ? Irqchip::pic_master : Irqchip::pic_slave,
						      gsi % 8}});
	}
	return r;
}

static const char *kind_name(Kind k)
{
	return k == Kind::full ? "the full irqchip" : k == Kind::split ? "a split irqchip"
								  : "no irqchip";
}

/* The irqchip comes first: KVM creates each vCPU's LAPIC with the vCPU. */
static void check_can_create_irqchip(const detail::VmState &s, const char *op)
{
	if (s.irqchip != Kind::none)
		throw Error(op, EEXIST, std::string("the VM already has ") + kind_name(s.irqchip));
	if (auto n = s.vcpus_created.load())
		throw Error(op, EINVAL,
			    "the irqchip must be created before the first vCPU; the VM has " +
				    std::to_string(n) + " vCPU(s)");
}

static void check_irqchip(const detail::VmState &s, const char *op)
{
	if (s.irqchip == Kind::none)
		throw Error(op, ENXIO,
			    "the VM has no in-kernel irqchip (Vm::create_irqchip() or "
			    "create_split_irqchip())");
}

/* KVM_CAP_IRQ_ROUTING's value is KVM_MAX_IRQ_ROUTES: GSIs are below it. */
static std::uint32_t max_routes(const Vm &vm)
{
	int n = vm.check_extension(KVM_CAP_IRQ_ROUTING);
	return n > 0 ? static_cast<std::uint32_t>(n) : 0;
}

static void check_gsi(const Vm &vm, std::uint32_t gsi, const char *op)
{
	std::uint32_t max = max_routes(vm);
	if (gsi >= max)
		throw Error(op, EINVAL,
			    "gsi " + std::to_string(gsi) + " >= " + std::to_string(max) +
				    " (KVM_CAP_IRQ_ROUTING)");
}

void Vm::create_irqchip()
{
	std::lock_guard lock(state_->irq_mu);
	check_can_create_irqchip(*state_, "KVM_CREATE_IRQCHIP");
	VK_IOCTL_VAL(fd(), KVM_CREATE_IRQCHIP, 0, "", fd());
	state_->irqchip = Kind::full;
	state_->gsi_routes = default_gsi_routing();
}

void Vm::create_split_irqchip(std::uint32_t ioapic_routes)
{
	const char *op = "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)";
	std::uint32_t max = max_routes(*this);
	std::lock_guard lock(state_->irq_mu);
	check_can_create_irqchip(*state_, op);
	if (!ioapic_routes || ioapic_routes > max)
		throw Error(op, EINVAL,
			    "ioapic_routes=" + std::to_string(ioapic_routes) + " not in [1, " +
				    std::to_string(max) + "] (KVM_CAP_IRQ_ROUTING)");
	kvm_enable_cap c{};
	c.cap = KVM_CAP_SPLIT_IRQCHIP;
	c.args[0] = ioapic_routes;
	VK_IOCTL(fd(), KVM_ENABLE_CAP, &c,
		 "KVM_CAP_SPLIT_IRQCHIP routes=" + std::to_string(ioapic_routes), fd());
	state_->irqchip = Kind::split;
	state_->gsi_routes.clear();
}

void Vm::create_pit(const PitOptions &options)
{
	std::lock_guard lock(state_->irq_mu);
	/* The PIT's output is IRQ0 of the in-kernel PIC and IOAPIC. */
	if (state_->irqchip != Kind::full)
		throw Error("KVM_CREATE_PIT2", ENOENT,
			    std::string("the PIT needs the full in-kernel irqchip "
					"(Vm::create_irqchip()); the VM has ") +
				    kind_name(state_->irqchip));
	if (state_->pit)
		throw Error("KVM_CREATE_PIT2", EEXIST, "the VM already has a PIT");
	kvm_pit_config cfg{};
	cfg.flags = options.speaker_dummy ? KVM_PIT_SPEAKER_DUMMY : 0;
	VK_IOCTL(fd(), KVM_CREATE_PIT2, &cfg, "flags=" + hex(cfg.flags), fd());
	state_->pit = true;
}

static void check_full_irqchip(const detail::VmState &s, const char *op)
{
	if (s.irqchip != Kind::full)
		throw Error(op, ENXIO,
			    std::string("needs the full in-kernel irqchip; the VM has ") +
				    kind_name(s.irqchip));
}

kvm_irqchip Vm::irqchip(Irqchip chip) const
{
	{
		std::lock_guard lock(state_->irq_mu);
		check_full_irqchip(*state_, "KVM_GET_IRQCHIP");
	}
	kvm_irqchip c{};
	c.chip_id = static_cast<std::uint32_t>(chip);
	VK_IOCTL(fd(), KVM_GET_IRQCHIP, &c, "chip " + std::to_string(c.chip_id), fd());
	return c;
}

void Vm::set_irqchip(const kvm_irqchip &state)
{
	{
		std::lock_guard lock(state_->irq_mu);
		check_full_irqchip(*state_, "KVM_SET_IRQCHIP");
	}
	if (state.chip_id > KVM_IRQCHIP_IOAPIC || state.pad)
		throw Error("KVM_SET_IRQCHIP", EINVAL,
			    "chip_id=" + std::to_string(state.chip_id) + " pad=" +
				    std::to_string(state.pad) + " (chip 0-2, pad 0)");
	kvm_irqchip c = state;
	VK_IOCTL(fd(), KVM_SET_IRQCHIP, &c, "chip " + std::to_string(c.chip_id), fd());
}

/* KVM's status: < 0 ignored, 0 coalesced, > 0 delivered to that many. */
static IrqStatus status_of(int s)
{
	if (s < 0)
		return {IrqStatus::Kind::ignored, 0};
	if (s == 0)
		return {IrqStatus::Kind::coalesced, 0};
	return {IrqStatus::Kind::delivered, s};
}

IrqStatus Vm::set_irq_line(std::uint32_t gsi, bool level)
{
	{
		std::lock_guard lock(state_->irq_mu);
		check_irqchip(*state_, "KVM_IRQ_LINE_STATUS");
		bool routed = false;
		for (auto &r : state_->gsi_routes)
			routed |= r.gsi == gsi;
		if (!routed)
			throw Error("KVM_IRQ_LINE_STATUS", EINVAL,
				    "gsi " + std::to_string(gsi) +
					    " has no route (Vm::set_gsi_routing())");
	}
	kvm_irq_level l{};
	l.irq = gsi;
	l.level = level;
	std::string what = "gsi " + std::to_string(gsi) + " level " + std::to_string(level);
	if (check_extension(KVM_CAP_IRQ_INJECT_STATUS) <= 0) {
		VK_IOCTL(fd(), KVM_IRQ_LINE, &l, what, fd());
		return {};
	}
	VK_IOCTL(fd(), KVM_IRQ_LINE_STATUS, &l, what, fd());
	return status_of(l.status);
}

static std::string describe_route(const GsiRoute &r)
{
	std::string s = "gsi " + std::to_string(r.gsi);
	if (auto *p = std::get_if<IrqchipPin>(&r.target))
		return s + " -> chip " + std::to_string(static_cast<std::uint32_t>(p->chip)) +
		       " pin " + std::to_string(p->pin);
	auto &m = std::get<MsiMessage>(r.target);
	return s + " -> msi " + hex(m.address) + "/" + hex(m.data);
}

/* The table KVM_SET_GSI_ROUTING takes, after the checks KVM would make (and one it lacks). */
static std::vector<kvm_irq_routing_entry> routing_entries(std::span<const GsiRoute> routes,
							  Kind chip, std::uint32_t max)
{
	auto bad = [](const GsiRoute &r, const std::string &why) {
		return Error("KVM_SET_GSI_ROUTING", EINVAL, describe_route(r) + ": " + why);
	};
	if (routes.size() > max)
		throw Error("KVM_SET_GSI_ROUTING", EINVAL,
			    std::to_string(routes.size()) + " routes > " + std::to_string(max));
	/* Per GSI: the chips it has a pin on, bit 3 for an MSI. */
	std::map<std::uint32_t, unsigned> used;
	std::vector<kvm_irq_routing_entry> out;
	for (auto &r : routes) {
		if (r.gsi >= max)
			throw bad(r, "gsi >= " + std::to_string(max) + " (KVM_CAP_IRQ_ROUTING)");
		kvm_irq_routing_entry e{};
		e.gsi = r.gsi;
		unsigned bit;
		if (auto *p = std::get_if<IrqchipPin>(&r.target)) {
			auto c = static_cast<std::uint32_t>(p->chip);
			if (c > KVM_IRQCHIP_IOAPIC)
				throw bad(r, "no such chip");
			if (p->pin >= (p->chip == Irqchip::ioapic ? ioapic_pins : pic_pins))
				throw bad(r, "no such pin");
			if (chip != Kind::full)
				throw bad(r, "PIC and IOAPIC pins need the full irqchip");
			e.type = KVM_IRQ_ROUTING_IRQCHIP;
			e.u.irqchip.irqchip = c;
			e.u.irqchip.pin = p->pin;
			bit = 1u << c;
		} else {
			auto &m = std::get<MsiMessage>(r.target);
			e.type = KVM_IRQ_ROUTING_MSI;
			e.u.msi.address_lo = static_cast<std::uint32_t>(m.address);
			e.u.msi.address_hi = static_cast<std::uint32_t>(m.address >> 32);
			e.u.msi.data = m.data;
			bit = 8;
		}
		unsigned &u = used[r.gsi];
		if ((u & bit) || (u && (bit == 8 || (u & 8))))
			throw bad(r, "a GSI has at most one pin per chip, or one MSI alone");
		u |= bit;
		out.push_back(e);
	}
	return out;
}

void Vm::set_gsi_routing(std::span<const GsiRoute> routes)
{
	std::uint32_t max = max_routes(*this);
	std::lock_guard lock(state_->irq_mu);
	check_irqchip(*state_, "KVM_SET_GSI_ROUTING");
	auto entries = routing_entries(routes, state_->irqchip, max);
	std::vector<std::byte> buf(sizeof(kvm_irq_routing) +
				   entries.size() * sizeof(kvm_irq_routing_entry));
	auto *t = reinterpret_cast<kvm_irq_routing *>(buf.data());
	t->nr = static_cast<std::uint32_t>(entries.size());
	std::copy(entries.begin(), entries.end(), t->entries);
	VK_IOCTL(fd(), KVM_SET_GSI_ROUTING, t, std::to_string(t->nr) + " routes", fd());
	state_->gsi_routes.assign(routes.begin(), routes.end());
}

std::vector<GsiRoute> Vm::gsi_routing() const
{
	std::lock_guard lock(state_->irq_mu);
	return state_->gsi_routes;
}

IrqStatus Vm::signal_msi(const MsiMessage &msi)
{
	{
		std::lock_guard lock(state_->irq_mu);
		check_irqchip(*state_, "KVM_SIGNAL_MSI");
	}
	kvm_msi m{};
	m.address_lo = static_cast<std::uint32_t>(msi.address);
	m.address_hi = static_cast<std::uint32_t>(msi.address >> 32);
	m.data = msi.data;
	int r = VK_IOCTL(fd(), KVM_SIGNAL_MSI, &m,
			 "address " + hex(msi.address) + " data " + hex(msi.data), fd());
	return status_of(r);
}

/* The registration's own reference to the eventfd, for the deassign. */
static FileDesc dup_eventfd(const EventFd &e, const char *op)
{
	if (!e)
		throw Error(op, EBADF, "the EventFd is empty");
	return FileDesc::adopt(::fcntl(e.fd(), F_DUPFD_CLOEXEC, 0), "fcntl(F_DUPFD_CLOEXEC)",
			       op);
}

EventFdRegistration Vm::add_irqfd(std::uint32_t gsi, const EventFd &trigger,
				  const EventFd *resample)
{
	check_gsi(*this, gsi, "KVM_IRQFD");
	{
		std::lock_guard lock(state_->irq_mu);
		check_irqchip(*state_, "KVM_IRQFD");
		if (resample && state_->irqchip != Kind::full)
			throw Error("KVM_IRQFD", EINVAL,
				    "a resample eventfd needs the full irqchip");
	}
	if (resample && !*resample)
		throw Error("KVM_IRQFD", EBADF, "the resample EventFd is empty");
	FileDesc fd = dup_eventfd(trigger, "KVM_IRQFD");
	kvm_irqfd k{};
	k.fd = static_cast<std::uint32_t>(fd.get());
	k.gsi = gsi;
	if (resample) {
		/* KVM keeps its own reference to the resample eventfd. */
		k.flags = KVM_IRQFD_FLAG_RESAMPLE;
		k.resamplefd = static_cast<std::uint32_t>(resample->fd());
	}
	VK_IOCTL(this->fd(), KVM_IRQFD, &k, "gsi " + std::to_string(gsi), this->fd());
	return EventFdRegistration(state_, std::move(fd), k);
}

EventFdRegistration Vm::add_ioeventfd(std::uint64_t addr, std::uint32_t len, const EventFd &efd,
				      IoSpace space, std::optional<std::uint64_t> datamatch)
{
	bool pio = space == IoSpace::pio;
	std::string what = std::string(pio ? "pio " : "mmio ") + hex(addr) + " len " +
			   std::to_string(len) +
			   (datamatch ? " datamatch " + hex(*datamatch) : std::string());
	auto bad = [&](const char *why) { return Error("KVM_IOEVENTFD", EINVAL, what + ": " + why); };
	if (len != 0 && len != 1 && len != 2 && len != 4 && len != 8)
		throw bad("len is 1, 2, 4 or 8 (or 0: any length)");
	if (!len && (pio || datamatch))
		throw bad("len 0 (any length) is for MMIO without datamatch");
	if (datamatch && len < 8 && *datamatch >> (8 * len))
		throw bad("datamatch does not fit in len bytes (it would never match)");
	if (addr + len < addr)
		throw bad("the range wraps");
	if (pio && addr + len > 0x10000)
		throw bad("beyond the 64 KiB port space");
	FileDesc fd = dup_eventfd(efd, "KVM_IOEVENTFD");
	kvm_ioeventfd k{};
	k.addr = addr;
	k.len = len;
	k.fd = fd.get();
	k.flags = (pio ? KVM_IOEVENTFD_FLAG_PIO : 0) |
		  (datamatch ? KVM_IOEVENTFD_FLAG_DATAMATCH : 0);
	k.datamatch = datamatch.value_or(0);
	VK_IOCTL(this->fd(), KVM_IOEVENTFD, &k, what, this->fd());
	return EventFdRegistration(state_, std::move(fd), k);
}

EventFdRegistration::EventFdRegistration(EventFdRegistration &&o) noexcept
	: vm_(std::move(o.vm_)), fd_(std::move(o.fd_)), binding_(o.binding_) {}

EventFdRegistration &EventFdRegistration::operator=(EventFdRegistration &&o) noexcept
{
	if (this != &o) {
		try {
			reset();
		} catch (...) {
			/* As in the destructor. */
		}
		vm_ = std::move(o.vm_);
		fd_ = std::move(o.fd_);
		binding_ = o.binding_;
	}
	return *this;
}

EventFdRegistration::~EventFdRegistration()
{
	try {
		reset();
	} catch (...) {
		/*
		 * KVM refused the deassign: only when the VM is dead (EIO),
		 * and then it drops the binding with the VM.
		 */
	}
}

void EventFdRegistration::reset()
{
	if (!fd_)
		return;
	FileDesc fd = std::move(fd_);
	auto vm = vm_.lock();
	vm_.reset();
	/* Gone: the VM's fd is closed and KVM released its bindings with it. */
	if (!vm)
		return;
	int vm_fd = vm->fd.get();
	if (auto *k = std::get_if<kvm_irqfd>(&binding_)) {
		kvm_irqfd d{};
		d.fd = static_cast<std::uint32_t>(fd.get());
		d.gsi = k->gsi;
		d.flags = KVM_IRQFD_FLAG_DEASSIGN;
		VK_IOCTL(vm_fd, KVM_IRQFD, &d, "deassign gsi " + std::to_string(d.gsi), vm_fd);
	} else {
		kvm_ioeventfd d = std::get<kvm_ioeventfd>(binding_);
		d.fd = fd.get();
		d.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
		VK_IOCTL(vm_fd, KVM_IOEVENTFD, &d, "deassign " + hex(d.addr), vm_fd);
	}
}

} // namespace virtkit

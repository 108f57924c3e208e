// SPDX-License-Identifier: MIT
/*
 * Internal: the per-VM slots in which library features (sub-page
 * protection, the virtkit.ko attachment, ...) keep their state, one object
 * per type. The core owns the slots but knows none of the types: a feature
 * attaches itself with get_or_attach<T>() and finds itself with find<T>().
 *
 * Lifetime and order: an attached object lives until the VM's state goes
 * (the last Vm, Vcpu or library handle on it), and objects are destroyed in
 * the reverse order of their attaching. A feature that needs another one
 * attaches it from inside its own make() (attach_mu_ is recursive), so what
 * it depends on is attached first and destroyed after it: SPP's kmod store
 * talks to the virtkit.ko attachment, which therefore outlives it. VmState
 * declares its slots last, so features are destroyed before the memory map,
 * the run gate and the exit-handler list they may still use on the way out.
 *
 * Locking: attach_mu_ serializes attaching and is held across make(), which
 * may attach further features on the same thread; mu_ guards the table and
 * is held only for a lookup or an insertion, never while a feature's code
 * runs, so find<T>() may be called from exit handlers while another thread
 * attaches. Attached objects never move: references stay valid.
 */
#pragma once

#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace virtkit::detail {

class FeatureSlots {
public:
	FeatureSlots() = default;
	FeatureSlots(const FeatureSlots &) = delete;
	FeatureSlots &operator=(const FeatureSlots &) = delete;
	~FeatureSlots()
	{
		/* Last attached, first destroyed (see above). */
		while (!slots_.empty()) {
			Object last = std::move(slots_.back().object);
			slots_.pop_back();
		}
	}

	/* The attached T, or nullptr. */
	template <class T> T *find() const
	{
		std::lock_guard lock(mu_);
		for (const Slot &s : slots_)
			if (s.key == key<T>())
				return static_cast<T *>(s.object.get());
		return nullptr;
	}

	/*
	 * The attached T, or the one make() returns (a std::unique_ptr<T>),
	 * attached now. Throws what make() throws; nothing is attached then.
	 */
	template <class T, class Make> T &get_or_attach(Make &&make)
	{
		std::lock_guard attaching(attach_mu_);
		if (T *t = find<T>())
			return *t;
		std::unique_ptr<T> made = std::forward<Make>(make)();
		T &ref = *made;
		std::lock_guard lock(mu_);
		slots_.push_back(Slot{key<T>(), Object(made.release(), [](void *p) {
					      delete static_cast<T *>(p);
				      })});
		return ref;
	}

private:
	/* One address per type: the key of its slot. */
	template <class T> static const void *key() noexcept
	{
		static const char k = 0;
		return &k;
	}

	using Object = std::unique_ptr<void, void (*)(void *)>;
	struct Slot {
		const void *key;
		Object object;
	};

	std::recursive_mutex attach_mu_;
	mutable std::mutex mu_;
	std::vector<Slot> slots_;
};

} // namespace virtkit::detail

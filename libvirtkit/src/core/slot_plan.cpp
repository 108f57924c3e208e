// SPDX-License-Identifier: MIT
#include "core/slot_plan.hpp"

#include <algorithm>

namespace virtkit::detail {

static constexpr std::uint64_t page = 4096;

std::vector<SlotSpec> plan_span(std::uint64_t gpa, std::uint64_t first, std::uint64_t end,
				const TrappedPages &traps)
{
	/* The trapped pages of the range, in order (few: the sets are sparse). */
	std::vector<std::uint64_t> special;
	for (auto *set : {&traps.write, &traps.all})
		for (auto it = set->lower_bound(first); it != set->end() && *it < end; ++it)
			special.push_back(*it);
	std::sort(special.begin(), special.end());
	special.erase(std::unique(special.begin(), special.end()), special.end());
	auto hidden = [&](std::uint64_t p) { return traps.all.count(p) != 0; };

	std::vector<SlotSpec> out;
	std::uint64_t next = first; /* first page not yet planned */
	for (std::size_t i = 0; i < special.size();) {
		std::uint64_t run_first = special[i], last = run_first;
		bool gap = hidden(run_first);
		while (++i < special.size() && special[i] == last + 1 && hidden(special[i]) == gap)
			last = special[i];
		if (run_first > next)
			out.push_back({gpa + next * page, (run_first - next) * page,
				       next * page, false});
		if (!gap)
			out.push_back({gpa + run_first * page, (last - run_first + 1) * page,
				       run_first * page, true});
		next = last + 1;
	}
	if (next < end)
		out.push_back({gpa + next * page, (end - next) * page, next * page, false});
	return out;
}

std::vector<SlotSpec> plan_slots(std::uint64_t gpa, std::uint64_t size,
				 bool readonly, const TrappedPages &traps)
{
	if (readonly)
		return {{gpa, size, 0, true}};
	return plan_span(gpa, 0, size / page, traps);
}

} // namespace virtkit::detail

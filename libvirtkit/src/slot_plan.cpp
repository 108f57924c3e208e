// SPDX-License-Identifier: MIT
#include "slot_plan.hpp"

namespace virtkit::detail {

static constexpr std::uint64_t page = 4096;

std::vector<SlotSpec> plan_span(std::uint64_t gpa, std::uint64_t first, std::uint64_t end,
				const std::set<std::uint64_t> &wp_pages)
{
	std::vector<SlotSpec> out;
	std::uint64_t next = first; /* first page not yet planned */
	auto it = wp_pages.lower_bound(first);
	while (it != wp_pages.end() && *it < end) {
		std::uint64_t run_first = *it, last = run_first;
		while (++it != wp_pages.end() && *it == last + 1 && *it < end)
			last = *it;
		if (run_first > next)
			out.push_back({gpa + next * page, (run_first - next) * page,
				       next * page, false});
		out.push_back({gpa + run_first * page, (last - run_first + 1) * page,
			       run_first * page, true});
		next = last + 1;
	}
	if (next < end)
		out.push_back({gpa + next * page, (end - next) * page, next * page, false});
	return out;
}

std::vector<SlotSpec> plan_slots(std::uint64_t gpa, std::uint64_t size,
				 bool readonly, const std::set<std::uint64_t> &wp_pages)
{
	if (readonly)
		return {{gpa, size, 0, true}};
	return plan_span(gpa, 0, size / page, wp_pages);
}

} // namespace virtkit::detail

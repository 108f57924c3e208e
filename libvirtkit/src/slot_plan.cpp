// SPDX-License-Identifier: MIT
#include "slot_plan.hpp"

namespace virtkit::detail {

static constexpr std::uint64_t page = 4096;

std::vector<SlotSpec> plan_slots(std::uint64_t gpa, std::uint64_t size,
				 bool readonly, const std::set<std::uint64_t> &wp_pages)
{
	const std::uint64_t pages = size / page;
	std::vector<SlotSpec> out;

	if (readonly || wp_pages.empty()) {
		out.push_back({gpa, size, 0, readonly});
		return out;
	}

	std::uint64_t next = 0; /* first page not yet planned */
	auto it = wp_pages.begin();
	while (it != wp_pages.end() && *it < pages) {
		std::uint64_t first = *it, last = first;
		while (++it != wp_pages.end() && *it == last + 1 && *it < pages)
			last = *it;
		if (first > next)
			out.push_back({gpa + next * page, (first - next) * page,
				       next * page, false});
		out.push_back({gpa + first * page, (last - first + 1) * page,
			       first * page, true});
		next = last + 1;
	}
	if (next < pages)
		out.push_back({gpa + next * page, (pages - next) * page, next * page, false});
	return out;
}

} // namespace virtkit::detail

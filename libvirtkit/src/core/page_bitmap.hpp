// SPDX-License-Identifier: MIT
/*
 * Internal: a set of page indices of one region as one bit per page,
 * allocated up to the highest page ever added. Features mark pages (trapped,
 * hidden) one call of a million pages at a time; a tree node per page made
 * that slow and large, a bit per page keeps both bounded, and runs are found
 * a word at a time.
 */
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <vector>

namespace virtkit::detail {

class PageBitmap {
public:
	PageBitmap() = default;
	/* The pages of a range (tests, and building a set in one go). */
	template <class Range> static PageBitmap of(const Range &pages)
	{
		PageBitmap b;
		for (std::uint64_t p : pages)
			b.assign(p, true);
		return b;
	}

	/* Room for pages [0, pages): assign() below that cannot throw afterwards. */
	void reserve(std::uint64_t pages)
	{
		if ((pages + 63) / 64 > words_.size())
			words_.resize((pages + 63) / 64);
	}

	bool test(std::uint64_t p) const noexcept
	{
		return p / 64 < words_.size() && (words_[p / 64] >> (p % 64) & 1);
	}

	void assign(std::uint64_t p, bool on)
	{
		if (p / 64 >= words_.size()) {
			if (!on)
				return;
			words_.resize(p / 64 + 1);
		}
		if (on)
			words_[p / 64] |= 1ull << (p % 64);
		else
			words_[p / 64] &= ~(1ull << (p % 64));
	}

	/* The first page in [from, end) that is in the set, else end. */
	std::uint64_t next_set(std::uint64_t from, std::uint64_t end) const noexcept
	{
		return next(from, end, 0);
	}
	/* The first page in [from, end) that is not in the set, else end. */
	std::uint64_t next_clear(std::uint64_t from, std::uint64_t end) const noexcept
	{
		return next(from, end, ~0ull);
	}

private:
	/* The first page in [from, end) whose bit differs from `skip`'s. */
	std::uint64_t next(std::uint64_t from, std::uint64_t end, std::uint64_t skip) const noexcept
	{
		for (std::uint64_t p = from; p < end;) {
			const std::uint64_t w = p / 64 < words_.size() ? words_[p / 64] : 0;
			const std::uint64_t hits = (w ^ skip) >> (p % 64);
			if (hits)
				return std::min(end, p + std::countr_zero(hits));
			p = (p / 64 + 1) * 64;
			if (!skip && p / 64 >= words_.size())
				return end; /* nothing set beyond the words */
		}
		return end;
	}

	std::vector<std::uint64_t> words_;
};

} // namespace virtkit::detail

// SPDX-License-Identifier: MIT
/*
 * The tools' JSON output: strings escaped for JSON, and JsonLine, one object
 * on one line (JSON Lines) built member by member. Addresses, registers and
 * MSR values are hex strings ("0x..."): a JSON number loses bits above 2^53
 * in most readers.
 */
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace virtkit::tool {

inline std::string json_string(std::string_view s)
{
	std::string j = "\"";
	for (unsigned char c : s) {
		if (c == '"' || c == '\\') {
			j += '\\';
			j += char(c);
		} else if (c < 0x20) {
			char buf[8];
			std::snprintf(buf, sizeof(buf), "\\u%04x", c);
			j += buf;
		} else {
			j += char(c);
		}
	}
	return j + "\"";
}

class JsonLine {
public:
	/* {"type": TYPE, ...} */
	explicit JsonLine(std::string_view type) : s_("{\"type\":" + json_string(type)) {}

	JsonLine &str(std::string_view key, std::string_view value)
	{
		return raw(key, json_string(value));
	}
	JsonLine &num(std::string_view key, std::uint64_t value)
	{
		return raw(key, std::to_string(value));
	}
	JsonLine &hex(std::string_view key, std::uint64_t value)
	{
		char buf[24];
		std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(value));
		return str(key, buf);
	}
	JsonLine &boolean(std::string_view key, bool value)
	{
		return raw(key, value ? "true" : "false");
	}
	/* value: JSON text already (an array, an object). */
	JsonLine &raw(std::string_view key, std::string_view value)
	{
		s_ += ',';
		s_ += json_string(key);
		s_ += ':';
		s_ += value;
		return *this;
	}
	/* Print the line and flush: a reader sees each record when it happens. */
	void print() const
	{
		std::printf("%s}\n", s_.c_str());
		std::fflush(stdout);
	}

private:
	std::string s_;
};

} // namespace virtkit::tool

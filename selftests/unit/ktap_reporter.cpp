// SPDX-License-Identifier: MIT
/*
 * A Catch2 reporter that prints KTAP, one line per test case, as the
 * selftests do: `virtkit-unit -r ktap` (make test). Catch2's own TAP
 * reporter prints a line per assertion - half a million here. A failing
 * test case's failed assertions come before its "not ok" line as "# "
 * diagnostics; "# Totals:" ends the report, as kselftest's does.
 */
/* The reporter interfaces, outside the file with CATCH_CONFIG_MAIN. */
#define CATCH_CONFIG_EXTERNAL_INTERFACES
#include <catch2/catch.hpp>

namespace {

class KtapReporter : public Catch::StreamingReporterBase<KtapReporter> {
public:
	explicit KtapReporter(const Catch::ReporterConfig &config) : StreamingReporterBase(config)
	{
		m_reporterPrefs.shouldReportAllAssertions = false;
	}

	static std::string getDescription() { return "KTAP, one line per test case (make test)"; }

	void testRunStarting(const Catch::TestRunInfo &info) override
	{
		StreamingReporterBase::testRunStarting(info);
		stream << "KTAP version 1\n# " << info.name << ": Catch2 unit tests\n";
	}

	void assertionStarting(const Catch::AssertionInfo &) override {}

	bool assertionEnded(const Catch::AssertionStats &stats) override
	{
		const Catch::AssertionResult &r = stats.assertionResult;
		if (r.isOk())
			return true;
		stream << "# " << r.getSourceInfo().file << ":" << r.getSourceInfo().line << ": ";
		if (r.hasExpression())
			stream << r.getExpressionInMacro() << " with " << r.getExpandedExpression();
		else
			stream << r.getMessage();
		stream << "\n";
		for (const auto &m : stats.infoMessages)
			if (m.message != r.getMessage())
				stream << "#   " << m.message << "\n";
		return true;
	}

	void testCaseEnded(const Catch::TestCaseStats &stats) override
	{
		++number_;
		bool ok = stats.totals.assertions.allOk();
		(ok ? passed_ : failed_)++;
		stream << (ok ? "ok " : "not ok ") << number_ << " " << stats.testInfo.name << "\n";
		StreamingReporterBase::testCaseEnded(stats);
	}

	void testRunEnded(const Catch::TestRunStats &stats) override
	{
		stream << "1.." << number_ << "\n# Totals: pass:" << passed_ << " fail:" << failed_
		       << " xfail:0 xpass:0 skip:0 error:0" << std::endl;
		StreamingReporterBase::testRunEnded(stats);
	}

private:
	std::size_t number_ = 0, passed_ = 0, failed_ = 0;
};

} // namespace

CATCH_REGISTER_REPORTER("ktap", KtapReporter)

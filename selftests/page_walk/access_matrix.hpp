// SPDX-License-Identifier: MIT
/*
 * The access matrix: page tables, cases and the comparison of what a real
 * implementation of the architecture did (the probe image's results, from
 * QEMU's TCG or from a KVM guest) with what the page-walk engine
 * (common/page_walk.c) predicts for the same tables and state.
 *
 * build_matrix() lays out a case image (probe_abi.h) to be loaded at
 * PW_CASES_BASE: paging structures whose probed pages vary key, U/S, R/W
 * and XD at the leaf and at a non-leaf level, page size and reserved bits,
 * and one case per combination of state and access. compare() reads the
 * results back from the image after the run.
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "probe_abi.h"

namespace virtkit::page_walk_matrix {

/* The sets of cases; a matrix holds those asked for. */
enum class Set {
	keys,		/* 16 keys x AD/WD x WP x access x U/S x CPL x PKE/PKS x SMAP/AC */
	keys_large,	/* keys on 2 MiB and 1 GiB leaves */
	paging,		/* no keys: U/S, R/W, XD x page size x WP, SMEP, SMAP/AC, NXE */
	reserved,	/* reserved bits at each level */
	noncanonical,	/* #GP */
	pks_c,		/* kvm-unit-tests x86/pks.c, by name */
};
const char *set_name(Set s);

struct Options {
	bool la57 = false;
	std::vector<Set> sets;
	/* false: the key sets leave out CR4.PKS (a CPU without PKS). */
	bool pks = true;
};

/* What one case is, for reports (the state is in the case's ctl). */
struct CaseInfo {
	Set set;
	std::uint32_t probe;		/* index in Matrix::probes */
	const char *name = nullptr;	/* pks_c: the scenario's name in x86/pks.c */
	bool expect_fault = false;	/* pks_c: what pks.c expects */
};

struct Matrix {
	bool la57 = false;
	std::vector<std::byte> image;	/* loaded at PW_CASES_BASE */
	std::vector<CaseInfo> info;	/* by case index */
	std::vector<std::string> probes;	/* the probed pages, described */
	std::vector<Set> sets;
	std::size_t ncases() const { return info.size(); }
	/* Case i's page and state, human-readable. */
	std::string describe_case(std::size_t i) const;
};

Matrix build_matrix(const Options &opts);

/* A case's outcome: PW_NO_FAULT or a vector, with the #PF/#GP error code. */
struct Outcome {
	unsigned int vector = PW_NO_FAULT;
	std::uint32_t error_code = 0;
	bool operator==(const Outcome &) const = default;
};
std::string describe(const Outcome &o);

struct SetReport {
	Set set;
	std::size_t cases = 0;
	std::size_t mismatches = 0;
	std::size_t not_run = 0;	/* the CPU lacked a feature the case needs */
};

struct NamedReport {
	std::string name;
	bool engine_ok;		/* the engine agrees with pks.c's expectation */
	bool cpu_ok;		/* the CPU agrees with it */
};

struct Report {
	std::uint32_t features = 0;	/* PW_FEAT_* seen in the guest */
	std::uint32_t maxphyaddr = 0;
	std::vector<SetReport> sets;
	std::vector<NamedReport> named;
	std::vector<std::string> first_mismatches;	/* up to 20, described */
	std::size_t cases = 0, mismatches = 0, not_run = 0;
	std::map<std::string, std::size_t> outcomes;	/* what the CPU did, counted */
};

/* Report::outcomes as lines, most frequent first ("#PF error code 0x7: 1234"). */
std::vector<std::string> outcome_summary(const Report &r);

/*
 * Compare the results in after (the case image as the run left it, at
 * least up to the end of the results) with the engine's prediction for
 * m's tables. quirks: VK_WALK_QUIRK_* of the implementation that ran;
 * implemented: PW_FEAT_* that it implements whatever its CPUID says (QEMU's
 * TCG maps 1 GiB pages on a CPU model without Page1GB: PW_FEAT_PAGE1GB).
 * Throws std::runtime_error when the run did not complete.
 */
Report compare(const Matrix &m, std::span<const std::byte> after, unsigned int quirks,
	       std::uint32_t implemented = 0);

} // namespace virtkit::page_walk_matrix

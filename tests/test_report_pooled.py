"""benchmark/report.py's pooled tests across cells (sign-flip and sign test over the checkpoint-level paired
differences) and what its 3-checkpoint percentile interval can show, against values worked out here by hand or by
enumeration written independently of the report's code."""
import itertools
import json
import math

import numpy as np
import pytest

from conftest import load_script

report = load_script("report", "benchmark")


def brute_force_sign_flip_p(differences):
    """Every sign pattern written out one by one: the share whose |sum of signed |d|| reaches |sum of d|."""
    observed = abs(sum(differences))
    hits = 0
    patterns = list(itertools.product((-1, 1), repeat=len(differences)))
    for signs in patterns:
        total = sum(sign * abs(d) for sign, d in zip(signs, differences))
        hits += abs(total) >= observed - 1e-9
    return hits / len(patterns)


def brute_force_sign_test_p(differences):
    """The binomial probabilities summed term by term: P(count at least as lopsided as the observed one), both
    sides, zeros left out."""
    negative = sum(d < 0 for d in differences)
    positive = sum(d > 0 for d in differences)
    n = negative + positive
    if n == 0:
        return 1.0
    observed = abs(negative - positive)
    return sum(math.comb(n, k) for k in range(n + 1) if abs(2 * k - n) >= observed) / 2 ** n


# --- the two p-values, by hand ---
def test_sign_flip_p_of_three_positive_differences_is_two_patterns_of_eight():
    # +1 +2 +3 = 6; only +++ and --- reach |6|
    assert report.sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    assert report.sign_flip_p([-1.0, -2.0, -3.0]) == 0.25


def test_sign_flip_p_by_hand_for_four_differences():
    # [-1, 2, 3, 4]: sum 8 of |d| total 10; |10 - 2 s| >= 8 for a flipped subset summing to s <= 1 or >= 9:
    # {}, {1}, {2,3,4}, {1,2,3,4}: 4 of 16
    assert report.sign_flip_p([-1.0, 2.0, 3.0, 4.0]) == pytest.approx(4 / 16)
    # [-3, 1, 2, 4]: sum 4 of 10; flipped subsets with s <= 3 ({}, {1}, {2}, {3}, {1,2}) or s >= 7 (their
    # complements): 10 of 16
    assert report.sign_flip_p([-3.0, 1.0, 2.0, 4.0]) == pytest.approx(10 / 16)
    # one difference: either sign reaches it
    assert report.sign_flip_p([-5.0]) == 1.0
    # a mean of exactly 0: every pattern reaches it
    assert report.sign_flip_p([2.0, -2.0, 1.0, -1.0]) == 1.0


def test_a_zero_difference_doubles_the_patterns_but_not_the_p_value():
    # [0, 1, 1]: sum 2; reached by (+-0, +1, +1) and (+-0, -1, -1): 4 of 8
    assert report.sign_flip_p([0.0, 1.0, 1.0]) == 0.5
    assert report.sign_counts([0.0, 1.0, 1.0]) == (0, 2, 1)
    # the sign test leaves the tie out: 2 of 2 positive, 2 * (1/4)
    assert report.sign_test_p(0, 2) == 0.5


def test_sign_test_p_by_hand():
    assert report.sign_test_p(9, 0) == pytest.approx(2 / 512)  # 0.0039: the smallest with 9
    assert report.sign_test_p(0, 9) == pytest.approx(2 / 512)
    assert report.sign_test_p(3, 0) == 0.25
    assert report.sign_test_p(4, 5) == 1.0  # 4 of 9 negative is the middle of the distribution
    assert report.sign_test_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert report.sign_test_p(8, 1) == pytest.approx(2 * (1 + 9) / 512)
    assert report.sign_test_p(0, 0) == 1.0


def test_sign_counts_and_an_empty_list():
    assert report.sign_counts([-1.0, -0.5, 2.0, 0.0, 3.0]) == (2, 2, 1)
    assert math.isnan(report.sign_flip_p([]))
    test = report.pooled_test([])
    assert test["n"] == 0 and math.isnan(test["mean"]) and test["sign_test_p"] == 1.0


# --- the two p-values against enumeration written here ---
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11])
def test_sign_flip_and_sign_test_p_equal_a_brute_force_enumeration(n):
    rng = np.random.default_rng(n)
    for _ in range(4):
        differences = list(np.round(rng.normal(0.7, 2.0, n), 2))
        assert report.sign_flip_p(differences) == pytest.approx(brute_force_sign_flip_p(differences), abs=1e-12)
        negative, positive, _ = report.sign_counts(differences)
        assert report.sign_test_p(negative, positive) == pytest.approx(brute_force_sign_test_p(differences))


def equal_magnitude_sign_flip_p(n, negative):
    """n differences of size 1, `negative` of them below 0: the flipped sum is n - 2B, B ~ Binomial(n, 1/2)."""
    observed = abs(n - 2 * negative)
    return sum(math.comb(n, b) for b in range(n + 1) if abs(n - 2 * b) >= observed) / 2 ** n


def test_exact_enumeration_up_to_20_differences_and_a_seeded_monte_carlo_above():
    at_limit = [1.0] * 14 + [-1.0] * 6  # 20: still enumerated exactly
    assert report.sign_flip_p(at_limit) == pytest.approx(equal_magnitude_sign_flip_p(20, 6), abs=1e-12)
    above = [1.0] * 17 + [-1.0] * 7  # 24: drawn
    exact = equal_magnitude_sign_flip_p(24, 7)
    drawn = report.sign_flip_p(above, seed=3)
    assert drawn == pytest.approx(exact, abs=0.01) and drawn != exact
    assert report.sign_flip_p(above, seed=3) == drawn  # seeded
    # all 24 one way: exact 2 / 2^24; the drawn p cannot go below 1 / (1 + draws)
    assert report.sign_flip_p([1.0] * 24, draws=1000) == pytest.approx(1 / 1001)


# --- what a 3-checkpoint percentile interval can show ---
def test_three_checkpoints_have_ten_distinct_resamples_and_the_smallest_p_is_a_quarter():
    distinct = {tuple(sorted(draw)) for draw in itertools.product(range(3), repeat=3)}
    assert report.distinct_resamples(3) == len(distinct) == 10
    assert report.distinct_resamples(9) == len(list(itertools.combinations_with_replacement(range(9), 9)))
    assert report.smallest_sign_flip_p(3) == brute_force_sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    assert report.smallest_sign_flip_p(9) == pytest.approx(brute_force_sign_flip_p([1.0] * 9))
    assert report.format_p(report.smallest_sign_flip_p(9)) == "0.0039"
    note = report.interval_note(3)
    assert "10 distinct outcomes" in note and "0.25" in note and "0.0039" in note and "same way" in note


def test_with_seeds_that_agree_a_three_checkpoint_interval_is_the_range_of_the_checkpoint_differences():
    # each checkpoint's seeds agree: the bootstrap interval is [lowest, highest] checkpoint difference, so it
    # excludes 0 exactly when all three differences have the same sign
    x = {1: np.array([11.0, 11.0]), 2: np.array([20.5, 20.5]), 3: np.array([33.0, 33.0])}
    y = {1: np.array([10.0, 10.0]), 2: np.array([20.0, 20.0]), 3: np.array([30.0, 30.0])}
    point, low, high, count = report.paired_difference_ci(x, y, reps=2000, seed=0)
    assert (low, high, count) == (0.5, 3.0, 3) and point == pytest.approx(1.5)
    y[2] = np.array([21.0, 21.0])  # checkpoint 2 now points the other way
    _, low, high, _ = report.paired_difference_ci(x, y, reps=2000, seed=0)
    assert (low, high) == (-0.5, 3.0)


# --- the pooled table is built from checkpoint-level means ---
def runs(env_id, method, finals_by_checkpoint, during_shift=0.0):
    """Per-run dicts as report.build_report makes them (one per online seed)."""
    rows = []
    for checkpoint, finals in finals_by_checkpoint.items():
        for index, final in enumerate(finals):
            rows.append({"env_id": env_id, "algo": "td3bc", "method": method, "seed": checkpoint + 3 * index,
                         "checkpoint_seed": checkpoint, "offline": 40.0, "final": final, "dip": final / 2,
                         "during": final + during_shift})
    return rows


def synthetic_cells():
    # cell A: 3 checkpoints, unequal seeds per checkpoint (so the mean over runs is not the mean over checkpoints);
    # cell B: the reference lacks checkpoint 3, so only 2 pairs count there; cell C: `none` only, no pair
    per_run = (runs("A", "samg-static", {1: [10.0, 20.0, 60.0], 2: [30.0], 3: [50.0, 52.0]})
               + runs("A", "none", {1: [31.0, 31.0], 2: [25.0, 27.0, 29.0], 3: [50.0]})
               + runs("B", "samg-static", {1: [5.0, 7.0], 2: [8.0], 3: [100.0]})
               + runs("B", "none", {1: [9.0], 2: [4.0, 6.0]})
               + runs("C", "none", {1: [1.0]}))
    # checkpoint means: A: samg-static 30, 30, 51 against none 31, 27, 50 -> -1, +3, +1; B: 6, 8 against 9, 5 ->
    # -3, +3
    return per_run, [-1.0, 3.0, 1.0, -3.0, 3.0]


def test_pooled_comparisons_pool_the_checkpoint_mean_differences_of_every_cell_where_both_arms_ran():
    per_run, expected = synthetic_cells()
    pooled = report.pooled_comparisons(per_run, seed=0)
    assert [(row["method"], row["reference"]) for row in pooled] == [("samg-static", "none")]
    row = pooled[0]
    final = row["final"]
    assert row["cells"] == 2 and final["n"] == 5
    assert (final["negative"], final["positive"], final["zero"]) == (2, 3, 0)
    assert final["mean"] == pytest.approx(np.mean(expected)) == pytest.approx(0.6)
    assert final["sign_flip_p"] == pytest.approx(brute_force_sign_flip_p(expected))
    assert final["sign_test_p"] == pytest.approx(brute_force_sign_test_p(expected)) == 1.0
    # cell A's runs pooled over its checkpoints would say otherwise: samg-static 37.0 against none 32.2
    assert np.mean([10, 20, 60, 30, 50, 52]) - np.mean([31, 31, 25, 27, 29, 50]) > 4.0
    # the dip (final / 2 here) pools the halves; the mean after warm-up (final + 0) the same differences
    assert row["dip"]["mean"] == pytest.approx(0.3) and row["during"]["mean"] == pytest.approx(0.6)


def test_pooled_tests_reach_the_smallest_p_when_every_checkpoint_of_three_cells_points_one_way():
    per_run = []
    for env_id in ("e1", "e2", "e3"):
        per_run += runs(env_id, "samg-static", {1: [10.0, 12.0], 2: [20.0], 3: [30.0, 31.0, 32.0]})
        per_run += runs(env_id, "none", {1: [13.0], 2: [25.0, 27.0], 3: [33.0]})
        per_run += runs(env_id, "samg", {1: [12.0], 2: [21.0], 3: [31.0]})
    pooled = {(row["method"], row["reference"]): row for row in report.pooled_comparisons(per_run)}
    assert set(pooled) == {("samg", "none"), ("samg", "samg-static"), ("samg-static", "none")}
    static = pooled[("samg-static", "none")]["final"]
    # per cell -2, -6, -2: 9 of 9 below
    assert (static["n"], static["negative"], static["positive"]) == (9, 9, 0)
    assert static["mean"] == pytest.approx(-10 / 3)
    assert static["sign_flip_p"] == pytest.approx(2 / 512) and static["sign_test_p"] == pytest.approx(2 / 512)
    # the shipped default against its frozen variant: +1, +1, +0 per cell
    against_frozen = pooled[("samg", "samg-static")]["final"]
    assert (against_frozen["negative"], against_frozen["positive"], against_frozen["zero"]) == (0, 6, 3)
    assert against_frozen["sign_test_p"] == pytest.approx(2 / 64)
    assert against_frozen["sign_flip_p"] == pytest.approx(brute_force_sign_flip_p([1.0, 1.0, 0.0] * 3))


def test_the_pooled_section_of_the_markdown_shows_counts_means_and_both_p_values():
    per_run, _ = synthetic_cells()
    rows = report.cell_rows(per_run, reps=50, seed=0)
    # no cross-task part (rliable's import alone takes seconds): an aggregate with nothing in it
    agg = {"tasks": [], "left_out": {}, "trimmed": {}, "iqm": {}, "improvement": {}, "matrices": {}}
    body = report.markdown_body(rows, agg, {"samg-static": [], "none": []}, 0.3,
                                report.comparisons(per_run, reps=50, seed=0), report.pooled_comparisons(per_run))
    assert "## Pooled across cells" in body
    p = report.format_p(brute_force_sign_flip_p([-1.0, 3.0, 1.0, -3.0, 3.0]))
    assert f"| samg-static | none | final | 2 | 5 | 2 / 3 / 0 | 0.6 | {p} | 1.00 |" in body
    assert report.format_p(0.0547) == "0.055" and report.format_p(0.61) == "0.61" and report.format_p(1.0) == "1.00"


# --- benchmark/budget_effect.py: the change of an arm's effect between two pretraining budgets ---
def benchmark_script(name: str):
    """A benchmark script that imports report as a sibling module."""
    import sys

    sys.path.insert(0, str(load_script.__globals__["ROOT"] / "benchmark"))
    return load_script(name, "benchmark")


def budget_effect():
    return benchmark_script("budget_effect")


def brute_force_two_sample_p(x, y):
    """Every ordering of the pooled values written out (n! of them, each split counted as often as any other): the
    share whose first len(x) values' mean is at least as far from the rest's as the observed split."""
    pooled, n = list(x) + list(y), len(x)
    observed = abs(sum(x) / n - sum(y) / len(y))
    orders = list(itertools.permutations(pooled))
    hits = sum(abs(sum(o[:n]) / n - sum(o[n:]) / len(y)) >= observed - 1e-9 for o in orders)
    return hits / len(orders)


def test_two_sample_permutation_p_by_hand_and_against_every_ordering():
    module = budget_effect()
    # 1 2 3 against 4 5 6: only this split and its mirror reach |2 - 5| = 3 among the 20 ways to choose three
    assert module.permutation_p([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20)
    # 1 2 against 3 4 5: |1.5 - 4| = 2.5, reached by this split and by 4 5 against 1 2 3, 2 of the 10 ways to choose two
    assert module.permutation_p([1, 2], [3, 4, 5]) == pytest.approx(2 / 10)
    assert module.permutation_p([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert math.isnan(module.permutation_p([], [1.0]))
    rng = np.random.default_rng(3)
    for sizes in ((3, 3), (3, 2), (2, 4)):
        x, y = rng.normal(size=sizes[0]).round(2), (rng.normal(size=sizes[1]) + 1).round(2)
        assert module.permutation_p(x, y) == pytest.approx(brute_force_two_sample_p(x, y))


def test_budget_effect_reads_two_exported_cells_and_pairs_each_arm_with_the_reference_per_checkpoint(tmp_path, capsys):
    """Two synthetic exports: at the short budget the arm ends 4 below `none` on each of 3 checkpoints, at the long
    one 1 below on each of 3; the change is +3 with the smallest p 3 and 3 checkpoints can give (0.1)."""
    module = budget_effect()
    for folder, gap, method in (("short", -4.0, "samg"), ("long", -1.0, "samg-adaptive")):
        directory = tmp_path / folder
        directory.mkdir()
        for checkpoint in (1, 2, 3):
            for seed in (1, 2):
                for arm, end in (("none", 50.0 + checkpoint + seed), (method, 50.0 + checkpoint + seed + gap)):
                    run_id = f"cell__{arm}__{checkpoint}{seed}"
                    (directory / f"{run_id}.csv").write_text(
                        "step,eval/normalized_score\n0,40.0\n5000,30.0\n10000,45.0\n15000,"
                        f"{end}\n20000,{end}\n25000,{end}\n")
                    (directory / f"{run_id}.json").write_text(json.dumps({
                        "env_id": "x/y-v0", "algo": "td3bc", "method": arm, "seed": seed, "checkpoint_seed": checkpoint,
                        "total_timesteps": 25000, "learning_starts": 5000}))
    module.main(module.Args(short=str(tmp_path / "short"), long=str(tmp_path / "long"), env_id="x/y-v0",
                            rename=["samg=samg-adaptive"], out=str(tmp_path / "table.md")))
    row = next(line for line in (tmp_path / "table.md").read_text().splitlines()
               if line.startswith("| samg-adaptive | final |"))
    assert row == ("| samg-adaptive | final | 3, -4.0 (-4.0, -4.0, -4.0) | 3, -1.0 (-1.0, -1.0, -1.0) | +3.0 | 0.10 | "
                   "6 / 0, 0.031 |")  # all 6 below: 2 of the 64 sign patterns
    with pytest.raises(SystemExit):  # a reference arm the cell lacks: one sentence
        module.main(module.Args(short=str(tmp_path / "short"), long=str(tmp_path / "long"), env_id="x/y-v0",
                                reference="offline-0.5"))


def test_p_diagnostics_averages_each_run_over_a_window_then_the_runs(tmp_path, capsys):
    """Two runs of one arm: p_mean 0.1 then 0.3 over steps 1k-2k in one and 0.5 in the other: the window's mean is
    the mean of the runs' means (0.2 and 0.5 -> 0.35); Q_off - Qbar from the two columns; - where not logged."""
    module = benchmark_script("p_diagnostics")
    directory = tmp_path / "scalars"
    directory.mkdir()
    for seed, (first, second) in ((1, (0.1, 0.3)), (2, (0.5, 0.5))):
        (directory / f"run{seed}.csv").write_text(
            "step,samg/p_mean,samg/qoff_values,samg/qbar_values\n"
            f"1000,{first},1.0,3.0\n2000,{second},1.0,5.0\n3000,0.9,0.0,0.0\n")
        (directory / f"run{seed}.json").write_text(json.dumps(
            {"env_id": "x/y-v0", "algo": "td3bc", "method": "samg-static", "seed": seed}))
    module.main(module.Args(from_csv=[str(directory)], env_id="x/y-v0", windows=["1000-2000", "3000-3000"]))
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| samg-static"))
    assert row == "| samg-static | 2 | 0.350 / 0.900 | - | - | - | -3.0 / 0.0 |"

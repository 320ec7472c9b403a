"""The verdicts' statistics (paired_stats.py, study_report.judge): values computed by hand, the false-positive rate
on simulated paired data with no true difference, and the power to detect a planted effect."""

import re

import numpy as np
import pytest

from paired_stats import equivalence_p, holm, paired_t_ci, sign_flip_p
from study_tools import claims, tables

D = np.array([1.0, 2.0, 3.0, -1.0, 4.0])


def test_sign_flip_p_and_paired_ci_equal_values_computed_by_hand():
    # |d| sums to 11 and the observed sum is 9: a sign pattern is as extreme when it flips at most one of the two 1s
    # (3 patterns), or is the mirror image of one of those (3 more): 6 of 2^5
    assert sign_flip_p(D) == pytest.approx(6 / 32)
    assert sign_flip_p(D, "greater") == pytest.approx(3 / 32) and sign_flip_p(D, "less") == pytest.approx(31 / 32)
    assert sign_flip_p(np.full(5, 2.0)) == pytest.approx(2 / 32)  # the floor at 5 seeds: 0.0625
    assert sign_flip_p(np.full(8, 2.0)) == pytest.approx(2 / 256)
    mean, lo, hi = paired_t_ci(D)  # mean 1.8, sd sqrt(14.8 / 4), t(4, 0.975) = 2.776445
    half = 2.776445 * np.sqrt(14.8 / 4) / np.sqrt(5)
    assert (mean, lo, hi) == pytest.approx((1.8, 1.8 - half, 1.8 + half), abs=1e-5)
    # TOST with margin 5: d + 5 and d − 5 are all of one sign, so only the observed pattern is as extreme: 1 / 32
    assert equivalence_p(D, 5.0) == pytest.approx(1 / 32)
    assert equivalence_p(D, 0.5) > 0.5
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_the_minimum_of_seeds_is_the_fewest_at_which_a_verdict_is_possible():
    for alpha, n in ((0.05, 8), (0.0294, 9), (0.01, 10)):
        assert claims.min_seeds(alpha) == n
        assert sign_flip_p(np.ones(n)) <= alpha / len(claims.CLAIMS) < sign_flip_p(np.ones(n - 1))


def test_exact_enumeration_agrees_with_brute_force_beyond_the_first_block():
    rng = np.random.default_rng(3)
    d = rng.normal(0.4, 1.0, 14)  # 14 > the 12-seed block: the tails are enumerated too
    signs = np.array(np.meshgrid(*[[1, -1]] * 14)).reshape(14, -1).T
    brute = np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-9)
    assert sign_flip_p(d) == pytest.approx(brute)


def simulated_p(n_seeds: int, effect: float, draws: int, seed: int) -> np.ndarray:
    """Two-sided sign-flip p-values of paired differences ~ N(effect, 1), one per simulated study."""
    rng = np.random.default_rng(seed)
    return np.array([sign_flip_p(rng.normal(effect, 1.0, n_seeds)) for _ in range(draws)])


@pytest.mark.parametrize("n_seeds,draws", [(5, 1000), (10, 2000), (20, 600)])
def test_the_rule_calls_no_more_than_five_percent_winners_without_a_difference(n_seeds, draws):
    p = simulated_p(n_seeds, 0.0, draws, seed=n_seeds)
    judged = n_seeds >= claims.MIN_SEEDS
    false_positive = np.mean(judged & (p <= claims.ALPHA))
    tolerance = 2.5 * np.sqrt(claims.ALPHA * (1 - claims.ALPHA) / draws)
    assert false_positive <= claims.ALPHA + tolerance
    if n_seeds == 5:  # below the minimum, and an exact test could not pass anyway: its smallest p is 0.0625
        assert p.min() == pytest.approx(0.0625) and false_positive == 0
    else:  # calibrated, not merely conservative
        assert np.mean(p <= claims.ALPHA) >= claims.ALPHA - tolerance


def test_a_planted_effect_of_one_sd_is_detected_at_ten_seeds():
    """The exact test's power at d = 1 SD, 10 seeds, α = 0.05 is 0.796 (`python benchmarks/sign_flip_power.py`: 20,000
    simulated studies; the paired t-test's, the most a calibrated test can have on normal data, is 0.802): at least
    80 % within sampling tolerance."""
    draws = 2000
    power = np.mean(simulated_p(10, 1.0, draws, seed=11) <= claims.ALPHA)
    assert power >= 0.80 - 2.5 * np.sqrt(0.8 * 0.2 / draws)


def judge_simulated(effects: dict, n_seeds: int, rng) -> list:
    """judge() on simulated per-seed endpoint values: every arm N(0, 1) per seed, plus the planted effects."""
    arms = set(claims.ORDER)  # every arm of the study
    values = {}
    for arm in arms:
        for endpoint in ("normal", "random", "robustness", "online_auc"):
            values[("E", arm, endpoint)] = {s: rng.normal() + effects.get((arm, endpoint), 0.0) for s in range(n_seeds)}
    return claims.judge(values, ["E"], 0.95)


def test_holm_keeps_the_family_wise_error_rate_over_the_claims():
    rng = np.random.default_rng(5)
    draws, errors = 300, 0
    for _ in range(draws):
        # no claim is true: every difference is 0, and the equivalence margin is far below the noise
        errors += any(e["verdict"] in ("supported", "contradicted") for e in judge_simulated({}, 10, rng))
    assert errors / draws <= claims.ALPHA + 2.5 * np.sqrt(claims.ALPHA * (1 - claims.ALPHA) / draws)


def test_verdicts_follow_planted_effects_and_need_the_minimum_of_seeds():
    rng = np.random.default_rng(7)
    big = 40.0  # far beyond the noise: every test is as small as 10 seeds allow
    effects = {
        (claims.ADV_FIXED, "robustness"): big,
        (claims.ADAPTIVE, "online_auc"): big,
        (claims.LINEAR, "normal"): big,
    }
    judged = judge_simulated(effects, 10, rng)
    verdicts = {e["claim"].number: e["verdict"] for e in judged}
    assert verdicts[1] == "supported" and verdicts[2] == "supported"
    assert verdicts[4] == "contradicted"  # linear keeps the nominal return better
    assert verdicts[3] == "inconclusive"  # only its robustness column has an effect; the other four are noise
    # the report says which p entered Holm's procedure: claim 4's is its one difference's, tested against the claim
    lines = claim_lines(judged)
    claim4 = judged[3]
    assert claim4["side"] == "against" and claim4["p"] == claim4["results"][0][0]["p"]
    assert f"Tested for a contradiction: claim p = {tables.p_text(claim4['p'])} (" in lines["4"]
    assert "times its 1 difference)" in lines["4"]
    assert "Claim p" not in lines["1"] and "contradiction" not in lines["1"]  # one component: its own p
    few = judge_simulated(effects, claims.MIN_SEEDS - 1, rng)
    assert all(e["verdict"] is None and e["status"].startswith("not judged") for e in few)


def claim_lines(judged: list) -> dict:
    """The report's line per claim ("1. ...") by its number."""
    return {ln[0]: ln for ln in tables.claims_section(judged, 0.95, claims.ALPHA) if re.match(r"[1-4]\. ", ln)}


def test_claim_3_is_supported_when_each_condition_is_won_by_its_own_arm():
    """Intersection-union: every one of the six differences points the claim's way, and the largest p decides."""
    rng = np.random.default_rng(11)
    effects = {
        (claims.NORMAL_FT, "normal"): 40.0,
        (claims.RANDOM_FT, "random"): 40.0,
        (claims.ADV_FIXED, "robustness"): 40.0,
    }
    judged = judge_simulated(effects, 10, rng)
    claim3 = judged[2]
    assert claim3["side"] == "for" and claim3["verdict"] == "supported"
    assert claim3["p"] == max(r["p"] for r, _ in claim3["results"])
    assert f"Claim p = {tables.p_text(claim3['p'])} (the largest of its components')" in claim_lines(judged)["3"]


def test_a_second_look_keeps_the_first_looks_verdicts_and_holm_family():
    """The extension rule: a claim decided on the first look's seeds keeps that verdict (here one the second look's
    data alone would not give), the open claims are judged on every seed, and Holm's step-down runs over all four
    claims with the decided ones' first-look p."""
    rng = np.random.default_rng(3)
    arms = set(claims.ORDER)  # every arm of the study
    first, later = range(10), range(10, 20)
    values = {
        ("E", arm, endpoint): {s: rng.normal() for s in [*first, *later]}
        for arm in arms
        for endpoint in ("normal", "random", "robustness", "online_auc")
    }
    for s in [*first, *later]:  # claim 1 holds on the first ten seeds, and the later ten undo it
        values[("E", claims.ADV_FIXED, "robustness")][s] += 40.0 if s in first else -40.0
    for s in later:  # claim 4's nominal-return component turns against it on the later ten
        values[("E", claims.LINEAR, "normal")][s] += 40.0
    alpha = 0.0294
    looked = claims.judge(claims.on_seeds(values, first), ["E"], 0.95, alpha)
    assert {e["claim"].number: e["verdict"] for e in looked} == {
        1: "supported",
        2: "inconclusive",
        3: "inconclusive",
        4: "inconclusive",
    }
    again = {e["claim"].number: e for e in claims.judge(values, ["E"], 0.95, alpha, looked)}
    alone = {e["claim"].number: e for e in claims.judge(values, ["E"], 0.95, alpha)}
    assert alone[1]["verdict"] == "inconclusive"  # 20 seeds alone no longer support claim 1
    assert again[1]["verdict"] == "supported" and again[1]["results"][0][0]["n"] == 10
    assert again[1]["p_holm"] == looked[0]["p_holm"]
    assert again[4]["verdict"] == "contradicted" and again[4]["results"][0][0]["n"] == 20
    family = [looked[0]["p"], again[2]["p"], again[3]["p"], again[4]["p"]]
    assert [again[c]["p_holm"] for c in (2, 3, 4)] == pytest.approx(list(holm(family)[1:]))
    text = "\n".join(tables.claims_section(list(again.values()), 0.95, alpha, first_look_seeds=tuple(first)))
    assert "This is a second look" in text and "(seeds 0-9)" in text
    assert f"Holm-adjusted p = {looked[0]['p_holm']:.3f} at the first look: **supported**, kept" in text

"""The sentences, chance levels and exercise checks the teaching notebooks (02, 03, 05) print: each
direction word follows the numbers it describes, each chance level is what the world's rules give,
and each check cell refuses a wrong answer with the reason. No model runs here."""
from types import SimpleNamespace

import numpy as np
import pytest

from osa_lib import IsolationConfig
from osa_lib.experiments.exercises import (between_class_variance, check_cv, check_iou, check_lambda_zero,
                                          check_mark_chance, check_otsu)
from osa_lib.claims import (compare, difference_sentence, direction, paired_difference, paper_beside_toy,
                            paper_vs_toy, with_error)
from osa_lib.experiments import (averaging_verdict, identity_chance, lambda_differences, lambda_verdict, pair_probe_verdict, probe_chance,
                                 seed_difference,
                                 switch_variants, trio_verdict, with_errors, worst_scored)
from osa_lib.masks import otsu_threshold
from osa_lib.toy.probes.appearance import _colour_chance


def test_compare_words_follow_the_numbers_and_tolerance():
    assert compare(2, 1) == "higher than" and compare(1, 2) == "lower than" and compare(1, 1) == "equal to"
    assert compare(1.05, 1, tol=0.1) == "equal to" and compare(float("nan"), 1) == "not comparable with"


def test_averaging_verdict_says_what_the_curve_shows():
    worse = averaging_verdict({"steps": [0, 1, 2], "single_step": [0.4, 0.6, 0.7], "running_mean": [0.4, 0.5, 0.6]})
    assert (worse["steps_running_above"], worse["steps_running_below"], worse["last_step_word"]) == (0, 2, "worse than")
    assert "does not help" in worse["sentence"]
    better = averaging_verdict({"steps": [0, 1, 2], "single_step": [0.4, 0.3, 0.5], "running_mean": [0.4, 0.5, 0.6]})
    assert better["last_step_word"] == "better than" and "does not help" not in better["sentence"]
    noisy = averaging_verdict({"steps": [0, 1, 2], "single_step": [0.4, 0.6, 0.7], "running_mean": [0.4, 0.5, 0.69],
                               "single_step_se": [0.01] * 3, "running_mean_se": [0.01] * 3})
    assert noisy["last_step_word"] == "within noise of" and "does not help" in noisy["sentence"]


def test_worst_scored_leaves_out_undrawn_characters_and_sorts_by_iou():
    records = [{"iou": None}, {"iou": 0.7}, {"iou": 0.2}, {"iou": 0.5}]
    assert [r["iou"] for r in worst_scored(records, k=2)] == [0.2, 0.5]


def test_identity_chance_matches_the_worlds_ranges():
    """Uniform details over a range of width equal to their scale score 2/3; marks match 2 times in 9."""
    chance = identity_chance(n=3000, seed=1)
    for detail in ("hue", "brightness", "size"):
        assert abs(chance[detail] - 200 / 3) < 2.5, (detail, chance)
    assert abs(chance["mark"] - 200 / 9) < 2.5
    assert chance["IIS-toy"] == pytest.approx(np.mean([chance[d] for d in ("hue", "brightness", "size", "mark")]))


def test_colour_chance_is_the_product_of_frequencies_not_one_in_five():
    # the model draws yellow 3 of 4 times; references are yellow half the time: chance 3/4·1/2 + 1/4·0 + 0·1/2
    drawn = ["yellow", "yellow", "yellow", "red", None]
    refs = ["yellow", "blue", "yellow", "blue", "green"]
    assert _colour_chance(drawn, refs) == pytest.approx(0.75 * 0.5 + 0.25 * 0.0)
    assert np.isnan(_colour_chance([None], ["red"]))


def test_probe_chance_judges_the_none_row_by_its_standard_error():
    row = {"setting": "none", "colour": 0.53, "drawn": 17 / 24, "n": 24, "colour chance": 0.31}
    pc = probe_chance([row])
    assert pc["drawn"] == 17 and pc["se"] == pytest.approx(np.sqrt(0.53 * 0.47 / 17))
    assert pc["z_uniform"] > 2 and "above the uniform" in pc["sentence"]
    assert abs(pc["z_sample"]) <= 2 and "within noise of the chance for these samples" in pc["sentence"]


def test_lambda_verdict_counts_a_change_only_beyond_two_paired_standard_errors():
    sweep = [{"λ": 0.0, "IIS-toy (single)": 50.0, "TIS-toy (single)": 90.0},
             {"λ": 1.1, "IIS-toy (single)": 60.0, "TIS-toy (single)": 89.0}]
    text = lambda_verdict(sweep, {"IIS-toy": (10.0, 2.0, 4), "TIS-toy": (-1.0, 1.0, 4)})
    assert "IIS-toy is higher at λ = 1.1 than at λ = 0 (+10.0 ± 2.0 points, paired over seeds)" in text
    assert "TIS-toy at λ = 1.1 is within noise" in text and "at λ = 1.1." in text
    assert "IIS-toy at λ = 1.1 is within noise" in lambda_verdict(sweep, {"IIS-toy": (10.0, 8.0, 4), "TIS-toy": (0, 1, 4)})


def test_lambda_differences_pair_the_paper_lambda_with_lambda_zero_by_seed():
    per_seed = {(1.1, 0): 60.0, (1.1, 1): 64.0, (0.0, 0): 50.0, (0.0, 1): 52.0}
    backbone = SimpleNamespace(isolation_config=lambda **o: IsolationConfig(**o))
    scorer = SimpleNamespace(n_seeds=2, backbone=backbone, seed_metrics=lambda story, method, config, k: {
        "IIS-toy": per_seed[(config.lam, k)], "TIS-toy": 90.0})
    diffs = lambda_differences(scorer, None)
    # by hand: differences 10 and 12 -> mean 11, se = sd / sqrt(2) = 1.414 / 1.414 = 1
    assert diffs["IIS-toy"] == pytest.approx((11.0, 1.0, 2)) and diffs["TIS-toy"][:1] == (0.0,)


def test_trio_verdict_direction():
    counts = {"three-character scenes": 12, "isolated mixed": 0, "vanilla mixed": 0}
    assert "mixes not distinguishably more or less often than vanilla" in trio_verdict(counts)
    # 2 of 12 against 0: d = 0.167, se = sqrt(0.167 * 0.833 / 12) = 0.108 -> within two standard errors
    assert "not distinguishably" in trio_verdict({**counts, "isolated mixed": 2}) and "(difference +17 ± 11 points)" in \
        trio_verdict({**counts, "isolated mixed": 2})
    assert "mixes more often than" in trio_verdict({"three-character scenes": 60, "isolated mixed": 10, "vanilla mixed": 0})
    where = trio_verdict({**counts, "isolated mixed": 2, "isolated mixed where vanilla left one out": 2, "vanilla leaves one out": 8})
    assert "Every one of them is a scene where vanilla, from the same noise, left a character out (vanilla left one out in 8 of 12)" in where
    assert "1 of them" in trio_verdict({**counts, "isolated mixed": 2, "isolated mixed where vanilla left one out": 1})


def test_paired_difference_pairs_by_seed_and_difference_sentence_reads_it():
    per_seed = {("a", 0): 10.0, ("a", 1): 12.0, ("a", 2): float("nan"), ("b", 0): 9.0, ("b", 1): 10.0, ("b", 2): 1.0}
    scorer = SimpleNamespace(n_seeds=3, seed_metrics=lambda story, method, config, k: {"IIS-toy": per_seed[(method, k)]})
    mean, se, n = seed_difference(scorer, None, ("a", None), ("b", None))
    assert mean == pytest.approx(1.5) and se == pytest.approx(0.5) and n == 2  # seed 2 left out: NaN
    # by hand: differences 1 and 2, mean 1.5, sd 0.7071, se = sd / sqrt(2) = 0.5
    assert paired_difference([10.0, 12.0], [9.0, 10.0]) == pytest.approx((1.5, 0.5, 2))
    assert paired_difference([1.0], [0.0])[2] == 1 and np.isnan(paired_difference([1.0], [0.0])[1])
    assert direction(1.5, 0.5) == "higher than" and direction(-1.5, 0.5) == "lower than"
    assert direction(0.9, 0.5) == "not distinguishable from" and direction(3.0, float("nan")) == "not distinguishable from"
    assert difference_sentence("x", (mean, se, n)) == "x is higher (+1.5 ± 0.5 points)"
    assert difference_sentence("x", (-3.0, 0.5)) == "x is lower (-3.0 ± 0.5 points)"
    assert difference_sentence("x", (mean, se)) == "x is higher (+1.5 ± 0.5 points)"
    assert difference_sentence("x", (0.8, 0.5)) == "x is within noise (+0.8 ± 0.5 points)"
    assert difference_sentence("x", (3.0, 0.5)) == "x is higher (+3.0 ± 0.5 points)"
    assert "cannot be judged" in difference_sentence("x", (3.0, float("nan")))
    assert difference_sentence("x", (float("nan"), float("nan"))) == "x is not measured in this run"


def test_switch_variants_label_the_paper_and_the_tuned_switches():
    paper_only = SimpleNamespace(isolation_config=lambda **o: IsolationConfig(**o))
    assert list(switch_variants(paper_only)) == ["paper's switches"]
    tuned = SimpleNamespace(isolation_config=lambda **o: IsolationConfig(**{"reweight": 4.0, "warmup": 0.0, **o}))
    labels = list(switch_variants(tuned))
    assert labels[0] == "switches tuned for this model (reweight=4, warmup=0)" and labels[1] == "paper's switches"
    # a model whose default is the paper's and whose tuned switches are a variant
    variant = SimpleNamespace(isolation_config=lambda **o: IsolationConfig(**o), tuned_isolation={"reweight": 4.0})
    configs = switch_variants(variant)
    assert list(configs) == ["paper's switches", "switches tuned for this model (reweight=4)"]
    assert list(configs.values())[1] == IsolationConfig(reweight=4.0)


def test_with_error_cells():
    assert with_error(1.234, 0.5) == "1.2 ± 0.5" and with_error(0.68, 0.0049, 3) == "0.680 ± 0.005"
    assert with_error(2.0, 0.25, signed=True) == "+2.0 ± 0.2" and with_error(-2.0, float("nan"), signed=True) == "-2.0"
    assert with_error(float("nan"), 1.0) == "n/a"


def test_with_errors_and_paper_rows():
    assert with_errors([{"λ": 0.0, "a": 1.234}], [{"λ": 0.0, "a": 0.5}]) == [{"λ": 0.0, "a": "1.2 ± 0.5"}]
    rows = paper_vs_toy({"IIS gain over CSA": (2.0, 1.0)})
    assert rows[0]["paper (SDXL, Table I)"] == "+5.41" and rows[0]["toy"] == "+2.0 ± 1.0"
    assert rows[1]["toy"] == "not measured"
    assert paper_vs_toy({"TIS": (90.0, float("nan"))})[3]["toy"] == "90.0 (one seed)"
    beside = {r["metric (paper)"]: r for r in paper_beside_toy({"isolated": {"IIS-toy": 70.0}, "csa": {"IIS-toy": 65.5}})}
    assert list(beside) == ["TIS", "IIS (%)", "AQ", "DS (%)"]
    assert beside["IIS (%)"]["paper's method"] == "70.28" and beside["IIS (%)"]["StoryDiffusion (paper)"] == "64.87"
    assert beside["TIS"]["StoryDiffusion (paper)"] == "27.35" and beside["AQ"]["StoryDiffusion (paper)"] == "n/a"
    assert beside["IIS (%)"]["isolated (toy)"] == "70.00" and beside["IIS (%)"]["vanilla (toy)"] == "n/a"


# --- the exercises' check cells refuse wrong answers, saying why -------------------------------------

def test_check_otsu_accepts_the_best_cut_and_refuses_the_mean():
    rng = np.random.default_rng(0)
    a_hat = np.concatenate([rng.uniform(0, 0.3, 50), rng.uniform(0.6, 1.0, 14)]).reshape(8, 8)
    library = float(otsu_threshold(__import__("torch").as_tensor(a_hat)[None].float())[0])
    values = np.sort(a_hat.ravel())
    best = max(values[:-1], key=lambda t: between_class_variance(a_hat, t))
    assert "Right" in check_otsu(best, a_hat, library)
    with pytest.raises(AssertionError, match="maximises"):
        check_otsu(0.05, a_hat, library)


def test_check_iou_refuses_a_ratio_of_the_wrong_pixels():
    mask = np.zeros((4, 4), bool); mask[:2, :2] = True  # 4 pixels
    truth = np.zeros((4, 4), bool); truth[:2, :3] = True  # 6 pixels, 4 shared
    assert "Right" in check_iou(4 / 6, mask, truth, 4 / 6)
    with pytest.raises(AssertionError, match="divided by the number in either"):
        check_iou(4 / 4, mask, truth, 4 / 6)  # intersection over the mask, not over the union


def test_check_cv_refuses_normalised_maps_and_the_wrong_winner():
    maps = np.stack([np.full((4, 4), 0.1), np.eye(4) * 0.4 + 0.05])
    cvs = [float(a.std() / a.mean()) for a in maps]
    assert "Right" in check_cv(cvs, "circle", maps, ["circle", "square"])
    with pytest.raises(AssertionError, match="lower CV"):
        check_cv(cvs, "square", maps, ["circle", "square"])
    normalised = [float(((a - a.min()) / (a.max() - a.min() + 1e-8)).std() / 0.3) for a in maps]
    with pytest.raises(AssertionError, match="raw map"):
        check_cv(normalised, "circle", maps, ["circle", "square"])


def test_check_lambda_zero_reads_the_rows():
    sweep = [{"λ": 0.0, "IIS-toy (single)": 40.0, "TIS-toy (single)": 80.0}]
    assert "Right" in check_lambda_zero("same as vanilla", sweep, {"IIS-toy": 40.0, "TIS-toy": 80.0})
    with pytest.raises(AssertionError, match="original branch alone"):
        check_lambda_zero("better than vanilla", sweep, {"IIS-toy": 40.0, "TIS-toy": 80.0})


def test_check_mark_chance():
    assert "Right" in check_mark_chance(100 * 2 / 9, 22.5, n=4000)
    with pytest.raises(AssertionError, match="both are none"):
        check_mark_chance(100 / 3, 22.5, n=4000)


def test_pair_probe_verdict_uses_the_multinomial_error_of_the_difference():
    none = {"setting": "none", "own": 0.2, "swapped": 0.2, "neither": 0.6, "drawn": 1.0, "n": 100}
    # own 0.5, swapped 0.2 of 100 drawn: d = 0.3, se = sqrt((0.7 - 0.09) / 100) = 0.0781 -> beyond 2 se
    verdict = pair_probe_verdict([none, {"setting": "up", "own": 0.5, "swapped": 0.2, "neither": 0.3, "drawn": 1.0, "n": 100}])
    assert verdict["se"] == pytest.approx(np.sqrt(0.61 / 100)) and verdict["word"] == "more often than"
    assert "(with no reference: 20% and 20%)" in verdict["sentence"]
    verdict = pair_probe_verdict([none, {"setting": "up", "own": 0.3, "swapped": 0.29, "neither": 0.41, "drawn": 0.5, "n": 100}])
    assert verdict["drawn"] == 50 and verdict["word"] == "not distinguishably more often than"
    assert "its own colour not distinguishably more often than the other's" in verdict["sentence"]

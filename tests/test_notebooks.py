"""Every notebook: committed without outputs, one parameters cell, a title and a claim, and it
executes under papermill with fast parameters (figures go to a temporary folder). Each notebook
records its key numbers with ``osa_lib.figures.record_claims``; the checks below assert them, so
a claim a notebook prints is a claim the suite tests. Floors are what the quick run reaches
(measured on the shipped toy model), set a little below it."""
import json
import math
import re
from pathlib import Path

import nbformat
import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_exist_in_reading_order():
    names = [p.stem[:2] for p in NOTEBOOKS]
    assert names == [f"{i:02d}" for i in range(1, len(names) + 1)] and len(names) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one papermill parameters cell"
    assert "quick: bool" in tagged[0].source, "a quick switch for the test suite"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert nb.cells[1].cell_type == "markdown" and nb.cells[1].source.startswith("> ")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "strip outputs before committing"
    declared = [line.split(":")[0] for line in tagged[0].source.splitlines() if re.match(r"^\w+\s*:", line)]
    assert list(papermill.inspect_notebook(str(path))) == declared, "papermill parses every parameter"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_quickly(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OSA_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("OSA_CLAIMS_DIR", str(tmp_path))
    papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters={"quick": True},
                               cwd=str(path.parent), kernel_name="python3", progress_bar=False)
    assert list((tmp_path / "figures").glob("*.png")), "the notebook saved its figures"
    claims_file = tmp_path / f"{path.stem}.claims.json"
    assert claims_file.is_file(), "the notebook records its key numbers (osa_lib.figures.record_claims)"
    claims = json.loads(claims_file.read_text())
    for name in claims["figures"]:
        figure = tmp_path / "figures" / f"{name}.png"
        assert figure.is_file() and figure.stat().st_size > 0, f"figure {name} written and non-empty"
    CHECKS[path.stem](claims)


def missing(value):
    """A number that could not be measured (NaN, written to JSON as null)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def in_range(value, lo, hi):
    return value is not None and math.isfinite(value) and lo <= value <= hi


def check_01(c):
    """A word's map marks its character: the best mask-resolution layer's Otsu mask overlaps it;
    the layer grid's rows are labelled uniquely; the early-mask overlap is an IoU."""
    assert c["mask_resolution"] == 8  # the toy's smallest up-block feature map
    assert 0 <= c["map_min"] <= c["map_max"] <= 1  # means of attention probabilities
    assert len(set(c["layer_labels"])) == len(c["layer_labels"]), c["layer_labels"]
    for word, ious in c["mask_layer_iou"].items():
        scored = [v for v in ious if v is not None]
        assert scored and all(in_range(v, 0, 1) for v in scored), word
        assert max(scored) >= 0.5, f"{word!r}: best mask-layer IoU {max(scored)} (quick run reaches 0.67-0.82)"
        assert c["best_iou"][word] == max(scored)
    assert all(in_range(v, 0, 1) for v in c["early_iou"].values()) and set(c["early_iou"]) == set(c["words"])
    assert all(in_range(v, 0, 1) for v in c["size_iou"].values())


def check_02(c):
    """Otsu masks are usable (mean IoU >= the notebook's target 0.5; quick run 0.53), the running mean
    improves over the first step's map, and the sentence about averaging says what the curve shows."""
    assert 0 < c["drawn"] <= c["characters"] == 2 * c["scenes"]
    assert in_range(c["mean_iou"], 0.5, 1) and in_range(c["median_iou"], 0, 1)
    assert in_range(c["share_iou_at_least_0_5"], 0, 1)
    curve, single = c["iou_curve_running_mean"], c["iou_curve_single_step"]
    assert len(curve) == len(single) == c["steps"] and curve[0] == single[0]
    assert all(in_range(v, 0, 1) for v in curve + single)
    assert curve[-1] == c["mean_iou"] and curve[-1] > curve[0] + 0.05
    assert all(missing(v) or v >= 0 for v in c["iou_curve_running_mean_se"] + c["iou_curve_single_step_se"])
    # the averaging sentence says what the curve shows, its words computed from the numbers
    avg, later = c["averaging"], range(1, len(curve))
    assert avg["steps_running_above"] == sum(curve[t] > single[t] for t in later)
    assert avg["steps_running_below"] == sum(curve[t] < single[t] for t in later)
    assert (avg["last_running_mean"], avg["last_single_step"]) == (curve[-1], single[-1])
    tol = avg["last_step_tolerance"]
    assert math.isclose(tol, 2 * math.sqrt(sum(v ** 2 for v in (c["iou_curve_single_step_se"][-1],
                                                               c["iou_curve_running_mean_se"][-1]) if not missing(v))))
    assert avg["last_step_word"] == ("better than" if curve[-1] > single[-1] + tol else "worse than"
                                     if curve[-1] < single[-1] - tol else "within noise of"), avg
    assert ("averaging does not help" in avg["sentence"]) == (avg["steps_running_below"] > avg["steps_running_above"]
                                                              and avg["last_step_word"] != "better than")
    assert c["target_met"] == ("met" if c["mean_iou"] >= 0.5 else "not met")
    # Otsu: the library agrees with scikit-image on the notebook's map; the exercise's default answer passes
    assert abs(c["threshold"] - c["reference_threshold"]) <= 1 / 256
    assert in_range(c["my_threshold"], 0, 1) and c["my_iou"] == c["worst_iou"][0]
    # the failure figure shows drawn characters, worst first
    worst = c["worst_iou"]
    assert len(worst) == min(4, c["drawn"]) and worst == sorted(worst) and all(in_range(v, 0, 1) for v in worst)
    share = c["binding_own_share_up_shape"]
    assert in_range(share, 0, 1)
    # every bar of the binding figure has a standard error over the probe's scenes
    assert c["binding_table"] and all(r["own share SE"] > 0 and r["Otsu IoU SE"] >= 0 for r in c["binding_table"])
    account = c["rendered_vs_generated"]
    assert account["generated"] == c["mean_iou"] and f"reach IoU {account['rendered']:.2f}" in account["sentence"]
    from osa_lib.experiments import BINDING_OWN_SHARE
    assert c["binding_verdict"] == ("so the mask maps do not tell the two characters apart: the overlap rule has "
                                    "nothing to split them by" if share < BINDING_OWN_SHARE
                                    else "so the mask maps do tell the characters apart")


def check_03(c):
    """The overlap verdict is one of its three words, judged on real overlapping scenes."""
    assert c["verdict"] in ("wins", "loses", "ties"), c["verdict_text"]
    assert 2 <= c["overlapping_scenes"] <= c["scenes"]
    assert all(in_range(v, 0, 1) for v in c["mean_iou"].values())
    assert c["mean_iou"][c["best_rule"]] == max(c["mean_iou"].values())
    # the example scene names only characters it shows: every character scored under every rule
    assert all(in_range(v, 0, 1) for ious in c["example_ious"].values() for v in ious), c["example_prompt"]
    assert len(c["my_cvs"]) == 2 and c["my_winner"] in c["example_prompt"]


def check_04(c):
    """Inside the block: the by-hand equations meet the library's outputs, re-weighting raises the
    references' share, the bank holds one token per mask pixel. Then three methods, one image per
    scene each; in a character's first scene alone isolated cross-attention blends its ID
    prompt in, so it is not the model as is; the bank holds every
    character; the toy metrics are percentages; every printed direction is the numbers' own."""
    from osa_lib.claims import direction
    inside = c["inside"]
    assert inside["returning"] and all(gap < 1e-4 for gap in inside["by_hand_gap"].values()), inside["by_hand_gap"]
    share = inside["reference_share"]
    assert share["original branch"] == 0 and all(in_range(v, 0, 1) for v in share.values())
    w = inside["reweight"]
    if w > 0:  # log(1 + w·Â) > 0 on the pixel's references (Â = 1 there): their share must grow
        assert share[f"isolated, w = {w:g}"] > share["isolated, w = 0"] > 0, share
    for name, (lo, hi) in inside["a_hat_range"].items():
        assert lo == 0 and hi in (0, 1) or math.isclose(hi, 1, abs_tol=1e-5), (name, lo, hi)
    assert inside["tokens_match_masks"]
    for name, stored in inside["stored_pixels"].items():
        for key, n in stored.items():
            layer, step = key.rsplit("|", 1)
            assert inside["bank_tokens"][name][layer][step] == n, (name, key)
    assert len(set(c["scenes"].values())) == 1 and set(c["scenes"]) == {"vanilla", "csa", "isolated"}
    assert not c["first_scene_isolated_equals_vanilla"]
    assert c["bank_characters"] == c["story_characters"]
    assert c["fallbacks"] >= 0
    # the comic strip and the attribute test are seed 0 of the metrics table: shared, not generated
    # again (the attribute story's vanilla and isolated runs are extra when the table leaves it out;
    # Table II's ablation draws the strip's story without re-weighting, once per seed)
    if c["metrics"]:
        tabled = {key.split(" / ")[0] for key in c["metrics"]}
        expected = 3 * c["seeds"] * len(tabled) + (0 if c["attribute_story"] in tabled else 2) \
            + (c["seeds"] if c["config"]["reweight"] > 0 else 0)
        assert c["generations"] == expected, (c["generations"], expected)
    assert {key.split(" / ")[1] for key in c["metrics"]} == {"vanilla", "csa", "isolated"}
    # the every-seed figure's colour kept is the metrics table's, for the comic strip's story
    assert set(c["colour_kept"]) == {"vanilla", "csa", "isolated"} and "04_every_seed" in c["figures"]
    for method, value in c["colour_kept"].items():
        tabled = next(v for k, v in c["metrics"].items() if k == f"{c['story']} / {method}")
        assert missing(value) and missing(tabled["colour kept"]) or value == tabled["colour kept"], (method, value)
    # the attribute test's answer is the metrics table's, when the table has its story
    for method, numbers in c["attribute_test"].items():
        tabled = c["metrics"][f"{c['attribute_story']} / {method}"]
        assert all(numbers[k] == tabled[k] for k in ("attribute accuracy", "mixing rate")), (method, numbers)
    mean, sem, n = c["colour_kept_gap"]
    assert n <= c["seeds"] and f"isolated is {direction(mean if mean is not None else float('nan'), sem if sem is not None else float('nan'))} vanilla" in c["colour_kept_sentence"]
    for metric, (mean, sem, n) in c["gaps"].items():
        assert c["verdicts"][metric] == direction(float("nan") if mean is None else mean, float("nan") if sem is None else sem), metric
    for key, metrics in c["metrics"].items():
        for name, value in metrics.items():
            if name in ("mixing rate", "colour kept") and missing(value):
                continue  # nothing to count: a single-character story, or a character drawn once
            assert in_range(value, 0, 100) if name != "seconds per scene" else value >= 0, (key, name, value)


def check_05(c):
    """λ = 0 is the unmodified model: its sweep row equals vanilla's numbers on the same seeds."""
    sweep = c["lambda_sweep"]
    assert sweep[0]["λ"] == 0
    assert sweep[0]["IIS-toy (single)"] == c["vanilla_single"]["IIS-toy"]
    assert sweep[0]["TIS-toy (single)"] == c["vanilla_single"]["TIS-toy"]
    rows = sweep + c["ablation"] + c["prompts_vs_attention"] + c["carry_over"]
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and key != "λ":
                assert in_range(value, 0, 100), (row, key)
    by = {(r["prompts"], r["method"]): r["IIS-toy"] for r in c["prompts_vs_attention"]}
    for label, gain in c["iis_gain"].items():
        assert math.isclose(gain, by[(label, "isolated")] - by[(label, "vanilla")], abs_tol=1e-9)
    assert 0 <= c["trio"]["isolated_mixed"] <= c["trio"]["three_character_scenes"]
    assert [r["setting"] for r in c["probe"]] == ["none", "up, all steps", "up, after a 20 % warm-up"]
    for r in c["probe"]:
        assert in_range(r["drawn"], 0, 1) and r["n"] > 0, r
        assert all(in_range(r[k], 0, 1) or (r["drawn"] == 0 and math.isnan(r[k])) for k in ("colour", "mark", "size")), r
    assert {r["method"] for r in c["uncoloured"]} == {"vanilla", "csa", "isolated"}
    # the two-character probe in the shared view: shares of the drawn characters, and its sentence's word
    pair, verdict = c["pair_probe"], c["pair_verdict"]
    assert [r["setting"] for r in pair] == ["none", "up, all steps, neutral"]
    assert all(abs(r["own"] + r["swapped"] + r["neither"] - 1) < 1e-9 for r in pair if r["drawn"] > 0)
    d, se = pair[1]["own"] - pair[1]["swapped"], verdict["se"]
    said = "more often than" if d > 2 * se else "less often than" if d < -2 * se else "not distinguishably more often than"
    assert verdict["word"] == said and f"its own colour {said} the other's" in verdict["sentence"]
    if len(sweep) == 2 and len(c["ablation"]) == 2:  # the quick run: λ in (0, 0.5), two ablation variants
        # sections share generations: λ sweep 2×2, ablation 2×2 (λ = 1.1 is not in the quick sweep),
        # raw prompts 2, the text options 6 new (CSA on the raw story, three described, isolated cross-attention
        # off on both), vanilla single, carry-over 3 new (CSA single, vanilla and CSA pair), uncoloured single 3
        # = 23 story runs per seed
        assert c["generations"] == 23 * c["seeds"], c["generations"]
    # the same words for every method: each method described, then solo-scene isolated cross-attention on both texts
    options = c["prompt_options"]
    assert [(r["change"], r["prompts"], r["method"]) for r in options] == (
        [("descriptions in the prompts", "stripped -> described", m) for m in ("vanilla", "csa", "isolated")]
        + [("solo-scene isolated cross-attention, off -> on", text, "isolated") for text in ("stripped", "described")])
    for r, sentence in zip(options, c["prompt_option_sentences"], strict=True):
        d, se = r["IIS-toy"], r["IIS-toy se"]
        said = ("cannot be judged" if missing(se) else "is higher" if d > 2 * se else "is lower" if d < -2 * se
                else "is within noise")
        assert said in sentence and f"{d:+.1f}" in sentence, (r, sentence)
    assert [(e["story"], e["method"]) for e in c["carry_over_errors"]] == [(r["story"], r["method"]) for r in c["carry_over"]]
    for story, gains in c["detail_gains"].items():
        by = {r["method"]: r for r in c["carry_over"] if r["story"] == story}
        assert all(math.isclose(g, by["isolated"][d] - by["vanilla"][d], abs_tol=1e-9) for d, g in gains.items())
    # direction words are computed from the numbers they describe
    errors = c["lambda_sweep_errors"]
    assert [e["λ"] for e in errors] == [r["λ"] for r in sweep]
    assert all(missing(v) or v >= 0 for e in errors for k, v in e.items() if k != "λ")
    lams = [r["λ"] for r in sweep]
    if 0 in lams and 1.1 in lams:
        by = dict(zip(lams, sweep))
        for name in ("IIS-toy", "TIS-toy"):
            d, se, n = c["lambda_differences"][name]  # paired by seed: the verdict's error, not the rows'
            assert n == c["seeds"] and math.isclose(d, by[1.1][f"{name} (single)"] - by[0][f"{name} (single)"], abs_tol=1e-6)
            said = "higher" if d > 2 * se else "lower" if d < -2 * se else "within noise"
            assert f"{name} is {said}" in c["lambda_verdict"] or f"{name} at λ = 1.1 is {said}" in c["lambda_verdict"]
    trio = c["trio"]
    n = trio["three_character_scenes"]
    assert n > 0, trio
    p_iso, p_van = trio["isolated_mixed"] / n, trio["vanilla_mixed"] / n
    se = math.sqrt((p_iso * (1 - p_iso) + p_van * (1 - p_van)) / n)
    word = ("more often than" if p_iso - p_van > 2 * se else "less often than" if p_van - p_iso > 2 * se
            else "not distinguishably more or less often than")
    assert f"isolated mixes {word} vanilla" in trio["verdict"], trio
    assert c["my_prediction"] == "same as vanilla"
    # chance: the world's identity details and the probe's "none" row
    chance = c["identity_chance"]
    assert all(abs(chance[d] - 200 / 3) < 2.5 for d in ("hue", "brightness", "size")) and abs(chance["mark"] - 200 / 9) < 2.5
    pc = c["probe_chance"]
    assert pc["none"] == c["probe"][0]["colour"] and pc["uniform"] == 0.2
    assert missing(pc["sample_chance"]) or in_range(pc["sample_chance"], 0, 1)
    assert ("within noise of the uniform" in pc["sentence"]) == (abs(pc["z_uniform"]) <= 2), pc
    # the paper's comparison reuses the sections' paired differences
    assert c["paper_vs_toy"]["IIS gain over vanilla"] == c["prompt_differences"]["refined prompts"]
    assert c["default_switches"] == "paper's switches" or c["default_switches"].startswith("switches tuned for this model")
    assert set(c["ablation_differences"]) == {r["variant"] for r in c["ablation"]} - {c["default_switches"]}
    for r in c["uncoloured"]:
        # NaN only where nothing can be counted: a character drawn once, no multi-character scene
        assert all(in_range(r[k], 0, 100) or missing(r[k]) for k in ("colour kept", "IIS-toy", "mixing rate")), r
        assert r["story"] != "single" or missing(r["mixing rate"]), r


def check_06(c):
    """Three flip-books per prompt and seed; the tables are the rows' means and paired differences; each
    sentence of the answer is made of those numbers, with the verdict its difference gives."""
    from osa_lib.video import LOWER_IS_BETTER, VIDEO_METHODS, verdict
    assert c["methods"] == list(VIDEO_METHODS) and len(c["prompts"]) == 2
    assert len(c["rows"]) == 2 * c["seeds"] * 3 and all(r["frames"] == c["frames"] for r in c["rows"])
    assert c["gif_ms"] == {m: 250 * c["frames"] for m in VIDEO_METHODS}  # every frame shown for 250 ms
    assert c["first_frame_gap"]["vanilla"] == 0 and c["first_frame_gap"]["cross-frame"] < 1e-3  # frame 0 reads itself
    for row in c["summary"]:
        for name, (mean, sem, n) in ((k, v) for k, v in row.items() if isinstance(v, list)):
            if n == 0:
                continue
            assert (mean >= 0 if name in ("motion error", "seconds per frame") else in_range(mean, 0, 100)), (row, name)
    formatted = {"0", "1"}  # "frame 0", "Eq. 1"-style words
    for row in c["summary"]:
        formatted |= {f"{v[0]:.{d}f}" for v in row.values() if isinstance(v, list) and v[2] for d in (0, 1, 2)}
    by = {(r["prompt"], r["seed"], r["method"]): r for r in c["rows"]}
    for row in c["differences"]:
        a, b = row["pair"].split(" − ")
        for name, (mean, sem, n) in ((k, v) for k, v in row.items() if isinstance(v, list)):
            d = [by[row["prompt"], s, a][name] - by[row["prompt"], s, b][name] for s in {r["seed"] for r in c["rows"]}
                 if not missing(by[row["prompt"], s, a][name]) and not missing(by[row["prompt"], s, b][name])]
            assert n == len(d) and (n == 0 or math.isclose(mean, sum(d) / n, abs_tol=1e-9)), (row["pair"], name)
            if n:
                formatted |= {f"{mean:+.1f}", f"{sem:.1f}" if sem is not None else "nan", str(n)}
    seconds = {r["method"]: r["seconds per frame"][0] for r in c["summary"] if r["prompt"] == c["prompts"][0]}
    formatted.add(f"{seconds['isolated'] / seconds['cross-frame']:.2f}")
    for sentence in c["answer"]:
        for number in re.findall(r"[+-]?\d+(?:\.\d+)?", sentence):
            assert number in formatted or number.lstrip("+") in formatted, (number, sentence)
    mixing = next(r for r in c["differences"] if r["prompt"] == c["prompts"][0] and r["pair"] == "isolated − cross-frame")
    assert c["answer"][0].endswith(f"{verdict('mixed', tuple(v if v is not None else float('nan') for v in mixing['mixed']))}).")
    assert "mixed" in LOWER_IS_BETTER and "colour kept" not in LOWER_IS_BETTER


CHECKS = {"01_cross_attention": check_01, "02_otsu_masks": check_02, "03_cv_overlap": check_03,
          "04_story_generation": check_04, "05_open_questions": check_05, "06_video_flipbook": check_06}


def test_every_notebook_has_claim_checks():
    assert sorted(CHECKS) == [p.stem for p in NOTEBOOKS]


STORY_NOTEBOOK = ROOT / "notebooks" / "04_story_generation.ipynb"


def test_story_notebook_executes_on_sdxl_tiny(tmp_path, monkeypatch):
    """Notebook 04 on the SDXL code path (tiny random SDXL, `load_backbone("sdxl-tiny")`), fast parameters."""
    monkeypatch.setenv("OSA_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("OSA_CLAIMS_DIR", str(tmp_path))  # not into build/notebooks of the checkout
    sdxl_story = "../data/stories/sdxl_girl_and_boy.yaml"
    papermill.execute_notebook(str(STORY_NOTEBOOK), str(tmp_path / STORY_NOTEBOOK.name),
                               parameters={"quick": True, "backbone_name": "sdxl-tiny", "story_file": sdxl_story,
                                           "attribute_story_file": sdxl_story},
                               cwd=str(STORY_NOTEBOOK.parent), kernel_name="python3", progress_bar=False)
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} >= {"04_comic_strip", "04_masks", "04_attribute_test"}
    claims = json.loads((tmp_path / f"{STORY_NOTEBOOK.stem}.claims.json").read_text())
    assert claims["backbone"] == "sdxl-tiny" and claims["metrics"] == {}  # toy metrics are for toy images only
    assert len(set(claims["scenes"].values())) == 1 and set(claims["scenes"]) == {"vanilla", "csa", "isolated"}
    assert claims["bank_characters"] == claims["story_characters"]

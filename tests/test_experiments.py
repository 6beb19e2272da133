"""The tables, verdicts and caches the notebooks call (issue 16: notebooks hold no logic). Each
test asserts something a wrong implementation would get wrong; models are faked where only the
bookkeeping is under test."""
import math
from pathlib import Path

import numpy as np
import pytest

import osa_lib.experiments
from osa_lib import IsolationConfig, load_story
from osa_lib.experiments import (BINDING_OWN_SHARE, StoryScorer, binding_table, binding_verdict, content_words,
                                 rendered_vs_generated,
                                 detail_gains, first_overlapping, iis_gain, lowest_iou, mask_iou_summary, mean_and_sem,
                                 pooled_rule_scores, rule_rows, summary_means, summary_rows, trio_summary,
                                 uncoloured_scene_prompts)
from osa_lib.generation import SceneResult, StoryResult
from osa_lib.story import parse_story
from osa_lib.toy.world import COLOURS, parse_caption

STORIES = Path(__file__).resolve().parents[1] / "data" / "stories"


# --- story rewrite through the toy grammar ---------------------------------------------------------

@pytest.mark.parametrize("path", sorted(STORIES.glob("toy_*.yaml")), ids=lambda p: p.stem)
def test_uncoloured_scene_prompts_drop_every_colour_word_of_any_toy_story(path):
    story = load_story(path)
    raw = uncoloured_scene_prompts(story)
    for before, after in zip(story.scenes, raw.scenes):
        assert not set(after.prompt.split()) & set(COLOURS), after.prompt
        old, new = parse_caption(before.prompt), parse_caption(after.prompt)
        assert new["scene"] == old["scene"]
        assert [c["shape"] for c in new["characters"]] == [c["shape"] for c in old["characters"]]
        assert (after.characters, after.seed) == (before.characters, before.seed)
    assert {n: c.id_prompt for n, c in raw.characters.items()} == {n: c.id_prompt for n, c in story.characters.items()}
    assert [s.prompt for s in story.scenes] == [s.prompt for s in load_story(path).scenes], "the original is untouched"


def test_uncoloured_scene_prompts_handle_colours_that_a_string_replace_missed():
    """The notebook's old ``prompt.replace("red ", "")`` left every other colour (and capitals) in."""
    story = parse_story({"characters": [{"name": "Sol", "word": "square", "id_prompt": "a yellow square"},
                                        {"name": "Tri", "word": "triangle", "id_prompt": "a blue triangle"}],
                         "scenes": [{"prompt": "A Yellow square and a blue triangle in the snow",
                                     "characters": ["Sol", "Tri"], "seed": 1}]})
    assert uncoloured_scene_prompts(story).scenes[0].prompt == "a square and a triangle in the snow"


def test_content_words():
    assert content_words("a red circle and a blue square in the snow") == ["red", "circle", "blue", "square", "snow"]


# --- statistics and tables -------------------------------------------------------------------------

def test_mean_and_sem_skips_nan_and_uses_the_sample_deviation():
    out = mean_and_sem([{"x": 1.0, "y": float("nan")}, {"x": 3.0, "y": 2.0}, {"x": 5.0, "y": float("nan")}])
    assert out["x"] == (3.0, pytest.approx(2.0 / math.sqrt(3)))
    assert out["y"][0] == 2.0 and math.isnan(out["y"][1])  # one value: no standard error


def test_summary_rows_and_means_agree():
    summaries = {"../data/stories/toy_a.yaml": {m: {"IIS-toy": (10.0 + i, 1.25)} for i, m in enumerate(("vanilla", "csa", "isolated"))}}
    rows = summary_rows(summaries)
    assert [(r["story"], r["method"], r["IIS-toy"]) for r in rows] == [
        ("toy_a", "vanilla", "10.0 ± 1.2"), ("toy_a", "csa", "11.0 ± 1.2"), ("toy_a", "isolated", "12.0 ± 1.2")]
    assert summary_means(summaries) == {"toy_a / vanilla": {"IIS-toy": 10.0}, "toy_a / csa": {"IIS-toy": 11.0},
                                        "toy_a / isolated": {"IIS-toy": 12.0}}


def test_iis_gain_and_detail_gains_subtract_vanilla_from_isolated():
    rows = [{"prompts": p, "method": m, "IIS-toy": v} for p, m, v in
            (("refined", "vanilla", 50.0), ("refined", "isolated", 58.0), ("raw", "vanilla", 40.0), ("raw", "isolated", 39.0))]
    assert iis_gain(rows) == {"refined": 8.0, "raw": -1.0}
    carry = [{"story": "single", "method": m, "hue": h, "brightness": 1.0, "size": 2.0, "mark": 3.0}
             for m, h in (("vanilla", 60.0), ("csa", 0.0), ("isolated", 75.0))]
    assert detail_gains(carry) == {"single": {"hue": 15.0, "brightness": 0.0, "size": 0.0, "mark": 0.0}}


def test_mask_iou_summary_counts_undrawn_characters_without_scoring_them():
    records = [{"iou": 0.8}, {"iou": 0.4}, {"iou": None}, {"iou": 0.6}]
    s = mask_iou_summary(records, target=0.5)
    assert (s["characters"], s["drawn (scored)"]) == (4, 3)
    assert s["mean IoU"] == pytest.approx(0.6) and s["median IoU"] == pytest.approx(0.6)
    assert s["IoU >= 0.5"] == pytest.approx(2 / 3)
    assert math.isnan(mask_iou_summary([{"iou": None}])["mean IoU"])
    assert [r["iou"] for r in lowest_iou(records, k=3)] == [None, 0.4, 0.6]


def _probe(up8_shape: float) -> list[dict]:
    rows = []
    for t in (200, 800):
        rows += [{"place": "up", "resolution": 8, "word": "shape", "t": t, "own_share": up8_shape, "iou": 0.3},
                 {"place": "up", "resolution": 8, "word": "colour", "t": t, "own_share": 0.9, "iou": 0.5},
                 {"place": "up", "resolution": 16, "word": "shape", "t": t, "own_share": 0.95, "iou": 0.7},
                 {"place": "up", "resolution": 16, "word": "colour", "t": t, "own_share": 0.9, "iou": 0.7}]
    return rows


def test_binding_verdict_reads_shape_words_at_the_mask_resolution_against_the_named_threshold():
    assert 0.5 < BINDING_OWN_SHARE < 1
    share, verdict = binding_verdict(_probe(0.55))
    assert share == pytest.approx(0.55) and "do not tell" in verdict  # the 16x16 layers' 0.95 must not count
    share, verdict = binding_verdict(_probe(BINDING_OWN_SHARE + 0.01))
    assert "do tell" in verdict and "do not" not in verdict
    table = binding_table(_probe(0.55))
    assert [(r["layers"], r["word"]) for r in table] == [("up 8×8", "colour"), ("up 8×8", "shape"),
                                                         ("up 16×16", "colour"), ("up 16×16", "shape")]
    assert table[1]["own share"] == pytest.approx(0.55) and table[1]["Otsu IoU"] == pytest.approx(0.3)
    assert np.isnan(table[1]["own share SE"])  # rows without per-scene values: no error to give


def test_rendered_vs_generated_reads_the_mask_layers_and_splits_the_miss():
    table = binding_table(_probe(0.55))  # up 8x8 shape: IoU 0.3; up 16x16 shape: 0.7 (not the mask layers)
    account = rendered_vs_generated(table, generated_iou=0.2)
    assert account["rendered"] == pytest.approx(0.3)
    assert "reach IoU 0.30" in account["sentence"] and "(0.80), 0.70 is missed even on perfect drawings" in account["sentence"]
    assert "+0.10 comes with the drawings" in account["sentence"]


def test_binding_table_errors_are_over_scenes_after_averaging_the_timesteps():
    # two scenes read at two timesteps: scene means over t are (0.6, 0.8) -> mean 0.7, SE = sd / sqrt(2) = 0.1
    rows = [{"place": "up", "resolution": 8, "word": "shape", "t": t, "own_share": float(np.mean(v)),
             "own_share_scenes": v, "iou": 0.5, "iou_scenes": [0.5, 0.5]} for t, v in ((200, [0.5, 0.9]), (800, [0.7, 0.7]))]
    row = binding_table(rows)[0]
    assert row["own share"] == pytest.approx(0.7) and row["own share SE"] == pytest.approx(0.1)
    assert row["Otsu IoU SE"] == pytest.approx(0.0)


def test_pooled_rule_scores_keep_scenes_paired_and_rule_rows_summarise():
    tables = [{"images": [], "rules": {"lower_cv": {"per_image": []}, "argmax": {"per_image": []}}},
              {"images": [1, 3], "rules": {"lower_cv": {"per_image": [0.5, None]}, "argmax": {"per_image": [0.7, None]}}},
              {"images": [0], "rules": {"lower_cv": {"per_image": [0.9]}, "argmax": {"per_image": [0.1]}}}]
    per_rule = pooled_rule_scores(tables, rules=("lower_cv", "argmax"))
    assert per_rule == {"lower_cv": [0.5, 0.9], "argmax": [0.7, 0.1]}
    rows = rule_rows(per_rule)
    assert rows[0]["scenes scored"] == 2 and rows[0]["mean IoU"] == pytest.approx(0.7) and rows[1]["std"] == pytest.approx(0.3)
    assert first_overlapping(["run0", "run1", "run2"], tables) == ("run1", 1)


def test_trio_summary_counts_only_three_character_scenes():
    scenes = [{"characters": 3, "vanilla left out": ["Tri"], "vanilla mixed": False, "isolated mixed": True},
              {"characters": 3, "vanilla left out": [], "vanilla mixed": True, "isolated mixed": False},
              {"characters": 2, "vanilla left out": ["A"], "vanilla mixed": True, "isolated mixed": True}]
    assert trio_summary(scenes) == {"three-character scenes": 2, "vanilla leaves one out": 1, "vanilla mixed": 1,
                                    "isolated mixed": 1, "isolated mixed where vanilla left one out": 1}


# --- StoryScorer: each generation once -------------------------------------------------------------

@pytest.fixture
def fake_generation(monkeypatch):
    """generate_story and toy_story_metrics replaced by bookkeeping fakes: the metric is a function of
    the method, λ and seed, so a wrong cache key shows up as a wrong number."""
    calls = []

    def generate_story(backbone, story, method, config=None, progress=True, **kwargs):
        calls.append((method, None if config is None else config.lam, story.scenes[0].seed, kwargs))
        lam = (config or IsolationConfig()).lam if method == "isolated" else 0.0
        scenes = [SceneResult(i, s.prompt, s.characters, s.seed, np.full((2, 2, 3), lam), 0.1)
                  for i, s in enumerate(story.scenes)]
        return StoryResult(method, scenes)

    def toy_story_metrics(story, result, details=False):
        value = 10 * result.scenes[0].image[0, 0, 0] + story.scenes[0].seed / 1000 + {"vanilla": 0, "csa": 100, "isolated": 200}[result.method]
        out = {k: value for k in StoryScorer.BASIC}
        if details:
            out["IIS-toy hue"] = value + 1
        return out

    monkeypatch.setattr(osa_lib.experiments.stories, "generate_story", generate_story)
    monkeypatch.setattr(osa_lib.experiments.stories, "toy_story_metrics", toy_story_metrics)
    return calls


def test_story_scorer_generates_each_story_method_config_and_seed_once(fake_generation):
    story = load_story(STORIES / "toy_single_journey.yaml")
    from types import SimpleNamespace
    backbone = SimpleNamespace(isolation_config=IsolationConfig)  # no config given: the backbone's (METHOD.md's)
    scorer = StoryScorer(backbone=backbone, n_seeds=3, num_inference_steps=4)
    first = scorer.score(story, IsolationConfig(lam=1.1), methods=("vanilla", "isolated"))
    assert scorer.generations == 6 and all(c[3] == {"num_inference_steps": 4} for c in fake_generation)
    # the same again, and vanilla under another config: nothing new to generate
    assert scorer.score(story, IsolationConfig(lam=1.1), methods=("vanilla", "isolated")) == first
    assert scorer.score(story, IsolationConfig(lam=0.5), methods=("vanilla",))["vanilla"] == first["vanilla"]
    assert scorer.generations == 6
    # isolated under another λ is a different run
    other = scorer.score(story, IsolationConfig(lam=0.5))["isolated"]
    assert scorer.generations == 9 and other["IIS-toy"] != first["isolated"]["IIS-toy"]
    # seeds shifted by k·1000: the mean is over scenes seeded 1, 1001, 2001
    assert first["vanilla"]["IIS-toy"] == pytest.approx(np.mean([1, 1001, 2001]) / 1000)
    assert first["isolated"]["IIS-toy"] == pytest.approx(200 + 11 + np.mean([1, 1001, 2001]) / 1000)
    assert "IIS-toy hue" not in first["isolated"] and "IIS-toy hue" in scorer.score(story, details=True)["isolated"]
    assert scorer.generations == 9  # details come from the metrics already read
    assert scorer.result(story, "isolated", IsolationConfig(lam=1.1), k=0) is scorer.result(story, "isolated", None, k=0)


# --- figures ---------------------------------------------------------------------------------------

def test_comic_strip_titles_do_not_overlap():
    """04_attribute_test printed long scene prompts over each other (matplotlib's wrap=True wraps at
    the figure's edge, not the column's)."""
    import matplotlib
    matplotlib.use("Agg")
    from osa_lib.figures import comic_strip, wrap_caption
    captions = ["a yellow square and a blue triangle in the beach", "a yellow square and a blue triangle in the night",
                "a blue triangle in the desert", "a yellow square and a blue triangle in the meadow"]
    assert all(len(line) <= 40 for c in captions for line in wrap_caption(c, 1.6).splitlines())
    images = [np.zeros((32, 32, 3))] * len(captions)
    fig = comic_strip({"vanilla": images, "isolated": images}, captions, title="two characters")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes[:len(captions)]]
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 <= right.x0, "neighbouring scene titles overlap"
    assert fig.texts[0].get_window_extent(renderer).y0 >= max(b.y1 for b in boxes) - 1, "the title sits above the captions"


def test_results_files_name_their_command_commit_and_machine(tmp_path):
    from osa_lib.figures import write_results
    path = write_results(tmp_path / "r.md", "Toy model quality", "| a |\n|---|\n| 1 |", "python -m osa_lib.toy.probes.evaluate --md r.md")
    text = path.read_text()
    assert text.startswith("# Toy model quality\n")
    assert "`python -m osa_lib.toy.probes.evaluate --md r.md`" in text and "at commit " in text and "torch " in text
    assert "| 1 |" in text


def test_story_scorer_disk_cache_is_shared_between_scorers_and_keyed_by_the_weights(fake_generation, tmp_path):
    import torch
    from types import SimpleNamespace
    story = load_story(STORIES / "toy_single_journey.yaml")
    backbone = SimpleNamespace(name="toy", unet=torch.nn.Linear(2, 2), isolation_config=IsolationConfig)
    first = StoryScorer(backbone, n_seeds=2, cache_dir=tmp_path, num_inference_steps=4)
    scores = first.score(story, methods=("vanilla", "isolated"))
    assert first.generations == 4 and len(list(tmp_path.glob("*.json"))) == 4
    second = StoryScorer(backbone, n_seeds=2, cache_dir=tmp_path, num_inference_steps=4)  # another notebook
    assert second.score(story, methods=("vanilla", "isolated")) == scores and second.generations == 0
    other_steps = StoryScorer(backbone, n_seeds=2, cache_dir=tmp_path, num_inference_steps=5)
    other_steps.score(story, methods=("vanilla",))
    assert other_steps.generations == 2, "other generation settings must not read the cache"
    with torch.no_grad():
        backbone.unet.weight.add_(1.0)
    retrained = StoryScorer(backbone, n_seeds=2, cache_dir=tmp_path, num_inference_steps=4)
    retrained.score(story, methods=("vanilla",))
    assert retrained.generations == 2, "changed weights must not read the cache"

"""scripts/research/tune_isolation.py: every candidate on the same validation seeds, the winner named."""


def test_validation_seeds_are_not_the_evaluations(load_script):
    tune = load_script("tune_isolation")
    eval_offsets = {k * 1000 for k in range(100)}  # evaluate_stories.py: k * 1000 for k < --seeds
    assert all(tune.VALIDATION_OFFSET + k * 1000 not in eval_offsets for k in range(100))


def test_table_has_every_run_and_names_the_highest_colour_kept(tmp_path, monkeypatch, load_script):
    tune = load_script("tune_isolation")
    monkeypatch.setattr(tune, "CANDIDATES", {"defaults": {}, "lam 0": dict(lam=0.0)})
    picked = []
    real = tune.StoryScorer.seed_metrics

    def spy(self, story, method, config=None, k=0):
        picked.append((method, None if config is None else config.lam, story.scenes[0].seed))
        return real(self, story, method, config, k)

    monkeypatch.setattr(tune.StoryScorer, "seed_metrics", spy)
    tune.main(["--seeds", "1", "--steps", "2", "--threads", "1", "--md", str(tmp_path / "t.md")])
    text = (tmp_path / "t.md").read_text()
    for run in ("| vanilla |", "| defaults |", "| lam 0 |"):
        assert run in text
    kept = {line.split(" | ")[0][2:]: float(line.split(" | ")[1].split(" ")[0])
            for line in text.splitlines() if line.startswith("| defaults |") or line.startswith("| lam 0 |")}
    winner = max(kept, key=lambda name: -1.0 if kept[name] != kept[name] else kept[name])
    assert f"Highest colour kept: **{winner}**" in text
    seeds = {seed for _, _, seed in picked}
    assert len(seeds) == 3 and min(seeds) > tune.VALIDATION_OFFSET  # three stories, shifted seeds, shared by every run
    assert {(m, lam) for m, lam, _ in picked} == {("vanilla", None), ("isolated", 1.1), ("isolated", 0.0)}


def test_weights_flag_tries_each_w_with_no_warm_up_and_every_step(load_script):
    tune = load_script("tune_isolation")
    candidates = tune.weight_candidates([16.0, 64.0])
    assert list(candidates) == ["METHOD.md (w 1, warm-up 20 %, every 3rd step)",
                                "w 16, no warm-up, every step", "w 64, no warm-up, every step"]
    assert candidates["w 64, no warm-up, every step"] == dict(reweight=64.0, warmup=0.0, bank_step_stride=1)
    assert candidates["METHOD.md (w 1, warm-up 20 %, every 3rd step)"] == {}


def test_configs_flag_parses_fields_of_isolation_config_and_refuses_others(load_script):
    import pytest
    tune = load_script("tune_isolation")
    candidates = tune.parse_configs("reweight=16,warmup=0,lam=0.5 ; isolated_cross=false,bank_step_stride=2,"
                                    "mask_resolution=none,overlap_rule=argmax")
    assert candidates == {"reweight=16, warmup=0, lam=0.5": dict(reweight=16.0, warmup=0.0, lam=0.5),
                          "isolated_cross=false, bank_step_stride=2, mask_resolution=none, overlap_rule=argmax":
                              dict(isolated_cross=False, bank_step_stride=2, mask_resolution=None, overlap_rule="argmax")}
    assert type(candidates["isolated_cross=false, bank_step_stride=2, mask_resolution=none, overlap_rule=argmax"]
                ["bank_step_stride"]) is int
    with pytest.raises(SystemExit, match="not field=value"):
        tune.parse_configs("strength=3")
    with pytest.raises(ValueError, match="lam"):
        tune.parse_configs("lam=9")  # out of range: refused before anything runs


def test_pick_best_keeps_named_characters_within_the_tolerance(load_script):
    tune = load_script("tune_isolation")
    summary = {"floods named ones": (95.0, 70.0), "keeps them": (60.0, 86.0), "keeps them less": (40.0, 88.0),
               "nothing drawn later": (float("nan"), 90.0)}
    assert tune.pick_best(summary, vanilla_named=None)[0] == "floods named ones"
    best, note = tune.pick_best(summary, vanilla_named=88.0)  # 88 - 3 = 85: the first run is out
    assert best == "keeps them" and "within 3 points" in note
    best, note = tune.pick_best({"a": (95.0, 70.0), "b": (60.0, 80.0)}, vanilla_named=88.0)
    assert best == "a" and "misses" in note  # none qualifies: the highest colour kept, flagged


def test_named_flag_adds_the_named_stories_columns_on_validation_seeds(tmp_path, monkeypatch, load_script):
    tune = load_script("tune_isolation")
    monkeypatch.setattr(tune, "CANDIDATES", {"defaults": {}})
    monkeypatch.setattr(tune, "NAMED_STORIES", ("toy_newcomer",))
    seen = []
    real = tune.StoryScorer.seed_metrics

    def spy(self, story, method, config=None, k=0):
        seen.append((story.source, story.scenes[0].seed))
        return real(self, story, method, config, k)

    monkeypatch.setattr(tune.StoryScorer, "seed_metrics", spy)
    tune.main(["--seeds", "1", "--steps", "2", "--threads", "1", "--named", "--md", str(tmp_path / "t.md")])
    text = (tmp_path / "t.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert header.endswith("| named: attribute accuracy | named: returning drawn | named: TIS-toy |")
    rows = [line for line in text.splitlines() if line.startswith("| vanilla |") or line.startswith("| defaults |")]
    assert len(rows) == 2 and all(len(r.split(" | ")) == len(header.split(" | ")) for r in rows)
    assert len(seen) == 2 * (3 + 1)  # vanilla and one candidate, three uncoloured stories and one named
    assert all(seed > tune.VALIDATION_OFFSET for _, seed in seen)
    assert sum("toy_newcomer" in source for source, _ in seen) == 2  # the named story, once per run


def test_report_command_quotes_arguments_a_shell_would_split(tmp_path, monkeypatch, load_script):
    import shlex
    tune = load_script("tune_isolation")
    monkeypatch.setattr(tune, "STORIES", ("toy_uncoloured_single",))
    argv = ["--seeds", "1", "--steps", "2", "--threads", "1", "--configs", "lam=0; lam=0.5", "--md", str(tmp_path / "t.md")]
    tune.main(argv)
    line = next(line for line in (tmp_path / "t.md").read_text().splitlines() if "scripts/research/tune_isolation.py" in line)
    command = line.split("`")[1]
    assert shlex.split(command)[2:] == argv  # pasted back into a shell, the same arguments

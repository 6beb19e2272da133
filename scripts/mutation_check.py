"""Plant semantic bugs in the method's core, one at a time, and check that the fast tests catch each.

    python scripts/mutation_check.py            # every mutation (a few minutes on 2 CPU cores)
    python scripts/mutation_check.py --list     # list them
    python scripts/mutation_check.py --check    # only check that every snippet still matches the source
    python scripts/mutation_check.py -k bank    # the mutations whose description contains "bank"

Each mutation is ``(file, exact original snippet, replacement, description)``. The snippet must
occur exactly once in the file; when the source changes so that one no longer matches, the check
stops with an error naming it (update the list: a mutation that silently stops applying would
"survive" nothing and prove nothing). ``tests/test_mutation_list.py`` runs that snippet check in
the ordinary suite.

The repository is copied to a temporary folder once per worker (``-j``, 2 by default); each mutation
is written into a copy, the fast tests run there (``pytest -x -q -p no:cacheprovider``: the test file
nearest to the mutated module first, then, if it passes, the other fast test files), and the
original is put back. A mutation is *caught* when a test fails (or the run
errors or times out), and *survives* when every fast test passes. Exit status 1 if any survives,
2 if the list does not match the source or the unmutated copy fails its tests.
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]

#: The fast tests: together well under a minute on one CPU thread.
FAST_TESTS = ["tests/test_equations.py", "tests/test_masks.py", "tests/test_sdxl_metrics.py",
              "tests/test_attention.py", "tests/test_isolation.py", "tests/test_story.py", "tests/test_bank.py",
              "tests/test_baselines.py"]

#: Which fast test file runs first for a mutated module (the others follow; -x stops at the first failure).
FIRST = {"osa_lib/masks.py": "tests/test_masks.py", "osa_lib/sdxl_metrics.py": "tests/test_sdxl_metrics.py",
         "osa_lib/bank.py": "tests/test_bank.py", "osa_lib/story.py": "tests/test_story.py",
         "osa_lib/generation.py": "tests/test_story.py",
         "osa_lib/baselines.py": "tests/test_baselines.py"}


class Mutation(NamedTuple):
    file: str
    original: str
    replacement: str
    description: str


ISO, ATT, CSA, MASKS, METRICS = ("osa_lib/isolation.py", "osa_lib/attention.py", "osa_lib/baselines.py",
                                  "osa_lib/masks.py", "osa_lib/sdxl_metrics.py")

MUTATIONS = [
    # --- Eq. 6, isolated cross-attention -------------------------------------------------------
    Mutation(ISO, "torch.where(inside, torch.lerp(y_s, y_m, beta), y_blend)",
             "torch.where(inside, y_m, y_blend)", "Eq. 6: β ignored (Y_m inside the mask whatever β)"),
    Mutation(ISO, "torch.where(inside, torch.lerp(y_s, y_m, beta), y_blend)",
             "torch.where(inside, torch.lerp(y_m, y_s, beta), y_blend)", "Eq. 6: β and 1 − β swapped"),
    Mutation(ISO, "y_blend = torch.where(inside, torch.lerp(y_s, y_m, beta), y_blend)",
             "y_blend = y_blend", "Eq. 6: blend removed (Y_S kept inside the masks)"),
    Mutation(ISO, "torch.where(inside, torch.lerp(y_s, y_m, beta), y_blend)",
             "torch.lerp(y_s, y_m, beta)", "Eq. 6: masks ignored (ID features everywhere)"),
    Mutation(ISO, "y_s.lerp_(y_blend, ctrl.config.lam)", "y_s.copy_(y_blend)",
             "cross-attention merge ignores λ"),
    Mutation(ISO, "y_s.lerp_(y_blend, ctrl.config.lam)", "y_s.lerp_(y_s.clone(), ctrl.config.lam)",
             "cross-attention: isolated branch dropped"),
    Mutation(ISO, "project_context(attn, state.id_context[m])", "project_context(attn, state.id_context[0])",
             "every character gets the first character's ID prompt"),
    Mutation(ISO, "q[half:half + 1], *ctrl.id_keys_values(", "q[:1], *ctrl.id_keys_values(",
             "Y_m computed with the negative half's queries"),
    Mutation(ISO, "key = (layer.name, m, state.device, state.dtype)", "key = (layer.name, state.device, state.dtype)",
             "ID prompts' keys/values cached across characters (every character gets the first's)"),
    # --- isolated self-attention ----------------------------------------------------------------
    Mutation(ISO, "ctrl.bank.at_step(c.name, ctrl.step)",
             "ctrl.bank.at_step(c.name, ctrl.step - 1)", "bank read at the previous step"),
    Mutation(ISO, "ctrl.bank.at_step(c.name, ctrl.step)",
             "ctrl.bank.at_step(c.name, min(s for _, s in ctrl.bank.tokens[c.name]))",
             "bank read always at the first stored step"),
    Mutation(ISO, "state.references.get(self.layer.name, ())",
             "state.references.get(next(iter(state.references), self.layer.name), ())",
             "bank read from another layer"),
    Mutation("osa_lib/bank.py", "key=lambda s: (abs(s - int(step)), s))", "key=lambda s: (s, abs(s - int(step))))",
             "bank stride: the first stored step served instead of the nearest"),
    Mutation(ISO, "torch.log1p(self.ctrl.config.reweight * a_hat[m])", "self.ctrl.config.reweight * a_hat[m]",
             "re-weighting adds w·Â instead of log(1 + w·Â)"),
    Mutation(ISO, "torch.log1p(self.ctrl.config.reweight * a_hat[m])", "torch.log1p(a_hat[m])",
             "re-weighting ignores w"),
    Mutation(ISO, "torch.log1p(self.ctrl.config.reweight * a_hat[m])", "torch.log1p(self.ctrl.config.reweight * a_hat[0])",
             "re-weighting uses the first character's Â"),
    Mutation(ISO, 'torch.full_like(a_hat[m], float("-inf"))', "torch.zeros_like(a_hat[m])",
             "queries outside M_m may attend R_m"),
    Mutation(ISO, 'columns.append(torch.full((n, pad), float("-inf")', "columns.append(torch.full((n, pad), 0.0",
             "the zero keys padding the references get weight"),
    Mutation(ISO, "self._widths[key] = -(-most // 16) * 16", "self._widths[key] = most",
             "references not padded to a multiple of 16"),
    Mutation(ISO, "out[half].lerp_(f_iso, ctrl.config.lam)", "out[half].copy_(f_iso)",
             "self-attention merge ignores λ"),
    Mutation(ISO, "self._isolated(attn, q[half], k[half], v[half])",
             "self._isolated(attn, q[half], k[0], v[0])", "F_iso uses the negative half's keys/values"),
    Mutation(ISO, "self._write_references(state, k[half], v[half])",
             "self._write_references(state, k[0], v[0])",
             "bank stores the negative half's tokens"),
    Mutation(ISO, "self._pending.append((name, layer, self.step, keys, values))",
             "self._pending.append((name, layer, self.step + 1, keys, values))",
             "bank written under the next step"),
    Mutation(ISO, "if (self.step - self.warmup_steps) % max(1, self.config.bank_step_stride):", "if False:",
             "bank_step_stride ignored (every step stored)"),
    Mutation(ISO, "self.bank is not None and self.in_window):", "self.bank is not None and self.step < self.end_steps):",
             "warm-up steps stored in the bank"),
    Mutation(ISO, "self.bank is not None and self.in_window):", "self.bank is not None and self.step >= self.warmup_steps):",
             "steps after end stored in the bank"),
    Mutation(ISO, "[l for l in layers if l.kind == \"self\"][::stride]}", "[l for l in layers if l.kind == \"self\"]}",
             "bank_layer_stride ignored (every layer stored)"),
    # --- warm-up and step bookkeeping ----------------------------------------------------------
    Mutation(ISO, "return self.warmup_steps <= self.step < self.end_steps", "return self.step < self.end_steps",
             "warm-up ignored"),
    Mutation(ISO, "return self.warmup_steps <= self.step < self.end_steps", "return self.warmup_steps <= self.step",
             "end ignored (isolation to the last step)"),
    Mutation(ISO, "self.end_steps = math.ceil(self.config.end * self.num_steps)",
             "self.end_steps = int(self.config.end * self.num_steps) + 1", "end rounded past its step"),
    Mutation(ISO, "math.ceil(self.config.warmup * self.num_steps)", "int(self.config.warmup * self.num_steps)",
             "warm-up rounded down"),
    Mutation(ATT, "        self.step = step_index + 1", "        self.step = step_index",
             "controller's step lags one behind the sampler"),
    # --- attention store -------------------------------------------------------------------------
    Mutation(ATT, "store.record_attention(layer, q[half:], k[half:], attn.scale)",
             "store.record_attention(layer, q[:half], k[:half], attn.scale)", "maps recorded from the negative half"),
    Mutation(ATT, "store.record_attention(layer, q[half:], k[half:], attn.scale)",
             "store.record_attention(layer, q[half:], k[half:], 1.0)", "maps: softmax without the 1/√d scale"),
    Mutation(ATT, "maps = per_head.mean(dim=1)[..., :self.n_groups]", "maps = per_head[:, 0][..., :self.n_groups]",
             "maps: first head only"),
    Mutation(ATT, "per_token = probs.mean(dim=1)", "per_token = probs[:, 0]", "maps from probabilities: first head only"),
    Mutation(ATT, "weights[b, m, tokens] = 1.0 / len(tokens)", "weights[b, m, tokens] = 1.0",
             "maps: subject tokens summed, not averaged"),
    Mutation(ATT, "weights[b, m, tokens] = 1.0 / len(tokens)", "weights[b, m, tokens[0]] = 1.0",
             "maps: only the first of a subject's tokens"),
    Mutation(ATT, "self._counts[layer] += 1", "pass", "running mean never counts past the first step"),
    Mutation(ATT, "self._sums[layer] += maps", "self._sums[layer] = maps * self._counts[layer]",
             "running mean keeps only the latest step"),
    Mutation(ATT, "        return min(sizes)", "        return max(sizes)", "masks made at the largest resolution"),
    Mutation(ISO, "height = controller.config.mask_resolution or min(", "height = controller.config.mask_resolution or max(",
             "isolated scenes record their maps at the largest up-block resolution"),
    Mutation(MASKS, "    H = max(a.shape[-2] for a in maps)\n    W = max(a.shape[-1] for a in maps)",
             "    H = min(a.shape[-2] for a in maps)\n    W = min(a.shape[-1] for a in maps)",
             "aggregate resamples to the smallest resolution"),
    # --- CSA baseline (StoryDiffusion's) ---------------------------------------------------------
    Mutation(CSA, "generator=self.generator) < rate", "generator=self.generator) <= 1.0",
             "CSA: rate ignored (every token shared)"),
    Mutation(CSA, "(config.sa32 if hw == sizes[0] else config.sa64)", "(config.sa64 if hw == sizes[0] else config.sa32)",
             "CSA: sa32 and sa64 swapped between resolutions"),
    Mutation(CSA, "if self.calls == 0 and not self.indices:", "if True:",
             "CSA: token sample redrawn in every layer instead of once per step"),
    Mutation(CSA, "p = self.config.skip_early if self.step < self.config.skip_switch_step else self.config.skip_late",
             "p = self.config.skip_late if self.step < self.config.skip_switch_step else self.config.skip_early",
             "CSA: early and late skip probabilities swapped"),
    Mutation(CSA, "use = bool(torch.rand((), generator=self.generator) >= p)",
             "use = bool(torch.rand((), generator=self.generator) < p)",
             "CSA: skip probability used as the pairing probability"),
    Mutation(CSA, "        if self.step < 1:\n            use = False", "        if self.step < 0:\n            use = False",
             "CSA: step 0 pairs too"),
    Mutation(CSA, 'return find_attention_layers(unet, kind="self", places=("up",))',
             'return find_attention_layers(unet, kind="self")', "CSA: down- and mid-block layers replaced too"),
    Mutation(CSA, "extra = [[sampled[j] for j in range(n_img) if j != b] for b in range(n_img)]",
             "extra = [[sampled[j] for j in range(n_img)] for b in range(n_img)]",
             "CSA: an image samples its own tokens too"),
    Mutation(CSA, "values = torch.cat([attn.to_v(extra[b]), values], dim=1)",
             "values = torch.cat([attn.to_k(extra[b]), values], dim=1)", "CSA: sampled keys used as values"),
    # --- masks: Otsu, coefficient-of-variation rule, reliability ---------------------------------
    Mutation(MASKS, "return var12.argmax(dim=1, keepdim=True)", "return var12.argmin(dim=1, keepdim=True)",
             "Otsu: minimum instead of maximum between-class variance"),
    Mutation(MASKS, "    raw = A_hat > thr[..., None, None]  # (B, M, H, W)",
             "    raw = A_hat >= thr[..., None, None]  # (B, M, H, W)", "Otsu mask includes the threshold bin value"),
    Mutation(MASKS, "        raw = raw & top_fraction(A_hat, area_cap)", "        raw = raw",
             "mask area cap ignored"),
    Mutation(MASKS, "    cut = flat.topk(k, dim=-1).values[..., -1:]", "    cut = flat.topk(k, dim=-1).values[..., :1]",
             "mask area cap keeps only the highest pixel"),
    Mutation(MASKS, "    flat, weight = labels.flatten(-2).long(), _as_float(A_hat).flatten(-2)  # (B, M, N)",
             "    flat, weight = labels.flatten(-2).long(), torch.ones_like(A_hat).flatten(-2)",
             "one region: the largest region kept instead of the one with the most Â"),
    Mutation(MASKS, "        neighbours = torch.stack([labels, padded[..., :-2, 1:-1], padded[..., 2:, 1:-1],",
             "        neighbours = torch.stack([labels, padded[..., :-2, :-2], padded[..., 2:, 2:],",
             "one region: diagonal neighbours instead of 4-connected ones"),
    Mutation(MASKS, 'prio = -cv if rule == "lower_cv" else cv', 'prio = cv if rule == "lower_cv" else -cv',
             "overlap rule: higher CV wins for lower_cv"),
    Mutation(MASKS, "    return std / mean.abs().clamp_min(eps)", "    return mean / std.clamp_min(eps)",
             "CV = mean / std"),
    Mutation(MASKS, "    resolved = resolve_overlaps(kept, A, rule, eps)",
             "    resolved = resolve_overlaps(kept, A_hat, rule, eps)", "CV rule ranks the min-max normalised maps"),
    Mutation(MASKS, "    kept = raw & ok[..., None, None]", "    kept = raw", "unreliable characters still claim pixels"),
    Mutation(MASKS, "    ok = ~(constant | small | large)", "    ok = ~(constant | small)", "near-full masks trusted"),
    # --- SDXL metrics ------------------------------------------------------------------------------
    Mutation(METRICS, "(100 * (img * txt).sum(-1).clamp(min=0))", "(100 * (img * txt[:1]).sum(-1).clamp(min=0))",
             "TIS: every image scored against the first prompt"),
    Mutation(METRICS, "(100 * (img * txt).sum(-1).clamp(min=0))", "(100 * (img * txt).sum(-1))",
             "TIS: CLIP score not clamped at 0"),
    Mutation(METRICS, "torch.triu_indices(len(crops), len(crops), offset=1)",
             "torch.triu_indices(len(crops), len(crops), offset=0)", "IIS: a crop paired with itself"),
    Mutation(METRICS, "per_character.append(100 * cos[i, j].mean().item())", "per_character.append(100 * cos.mean().item())",
             "IIS: every ordered pair and the diagonal"),
    Mutation(METRICS, "    return float(np.mean(per_character))", "    return float(per_character[0])",
             "IIS: only the first character counts"),
    Mutation(METRICS, "    return 100 * (1 - np.asarray(out))  # (B,)", "    return 100 - np.asarray(out)  # (B,)",
             "DS: 100 − d instead of 100·(1 − d)"),
    Mutation(METRICS, "side = max(1, int(round(max(y1 - y0, x1 - x0) * (1 + 2 * margin))))",
             "side = max(1, int(round(min(y1 - y0, x1 - x0) * (1 + 2 * margin))))",
             "square crop sized by the box's shorter side (cuts a tall character)"),
    # --- story loop --------------------------------------------------------------------------------
    Mutation("osa_lib/generation.py", "is_new=name not in bank)", "is_new=True)",
             "returning characters treated as new (no references)"),
]


def snippet_problems(root: Path = ROOT, mutations: list[Mutation] = MUTATIONS) -> list[str]:
    """Every mutation whose snippet does not occur exactly once in its file (empty: the list is honest)."""
    problems = []
    for i, m in enumerate(mutations, 1):
        path = root / m.file
        if not path.exists():
            problems.append(f"#{i} {m.description}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.original)
        if count != 1:
            problems.append(f"#{i} {m.description}: snippet occurs {count} times in {m.file} (must be once): "
                            f"{m.original!r}")
        if m.original == m.replacement:
            problems.append(f"#{i} {m.description}: the replacement equals the original")
    return problems


def _copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "__pycache__", ".pytest_cache", "*.png", "notebooks",
                                    ".ipynb_checkpoints", "*_ckpt")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _pytest(repo: Path, files: list[str], timeout: float) -> tuple[str, str]:
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"(no result in {timeout:.0f} s)"
    if proc.returncode == 0:
        return "pass", ""
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    return "fail", match.group(1) if match else f"(pytest exit {proc.returncode}) {proc.stdout[-300:]!r}"


def _run_tests(repo: Path, first: str | None, timeout: float) -> tuple[str, str, float]:
    """('pass' | 'fail' | 'timeout', the first failing test or '', seconds).

    The file nearest to the mutated module runs on its own first (collecting every file costs more
    than most mutations take to fail); only if it passes do the other fast test files run.
    """
    started = time.time()
    phases = [[first], [f for f in FAST_TESTS if f != first]] if first else [FAST_TESTS]
    for files in phases:
        status, detail = _pytest(repo, files, timeout)
        if status != "pass":
            return status, detail, time.time() - started
    return "pass", "", time.time() - started


def _mutant(repo: Path, m: Mutation, timeout: float) -> tuple[str, str, float]:
    path = repo / m.file
    source = path.read_text()
    path.write_text(source.replace(m.original, m.replacement, 1))
    try:
        return _run_tests(repo, FIRST.get(m.file, "tests/test_equations.py"), timeout)
    finally:
        path.write_text(source)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true", help="only check that every snippet matches once")
    parser.add_argument("-k", default="", help="run only mutations whose description contains this text")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per test run")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="mutations tested in parallel (one repo copy each)")
    args = parser.parse_args()
    if args.list:
        for i, m in enumerate(MUTATIONS, 1):
            print(f"{i:3d}  {m.file:24s} {m.description}")
        return 0
    problems = snippet_problems()
    if problems:
        print("The mutation list no longer matches the source; update scripts/mutation_check.py:", file=sys.stderr)
        print("\n".join("  " + p for p in problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"all {len(MUTATIONS)} mutation snippets match their files exactly once")
        return 0
    chosen = [(i, m) for i, m in enumerate(MUTATIONS, 1) if args.k.lower() in m.description.lower()]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="osa-mutation-") as tmp:
        repos = [_copy_repo(Path(tmp) / f"repo{j}") for j in range(max(1, args.jobs))]  # one copy per worker
        status, detail, seconds = _run_tests(repos[0], None, args.timeout)
        print(f"unmutated copy: {status} in {seconds:.0f} s", flush=True)
        if status != "pass":
            print(f"the fast tests fail without any mutation: {detail}", file=sys.stderr)
            return 2
        free: queue.Queue = queue.Queue()
        for repo in repos:
            free.put(repo)

        def run_one(item):
            i, m = item
            repo = free.get()
            try:
                status, detail, seconds = _mutant(repo, m, args.timeout)
            finally:
                free.put(repo)
            verdict = "SURVIVED" if status == "pass" else "caught"
            print(f"#{i:<3d} {verdict:8s} {seconds:5.1f} s  {m.description}  <- {detail or '-'}", flush=True)
            return i, m, verdict, detail

        with ThreadPoolExecutor(len(repos)) as pool:
            rows = list(pool.map(run_one, chosen))
    survived = [r for r in rows if r[2] == "SURVIVED"]
    print(f"\n| # | module | mutation | result | caught by |\n|---|---|---|---|---|")
    for i, m, verdict, detail in rows:
        print(f"| {i} | {Path(m.file).stem} | {m.description} | {verdict} | {detail.splitlines()[0] if detail else ''} |")
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations caught, {len(survived)} survived "
          f"({time.time() - started:.0f} s)")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

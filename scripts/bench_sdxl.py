"""Vanilla, Consistent Self-Attention and isolated attention on the full-size SDXL architecture
(random weights, ``load_backbone("sdxl-random")``), measured side by side in one run.

    python scripts/bench_sdxl.py --device cuda --dtype fp16 --size 1024 --steps 30   # on a GPU
    python scripts/bench_sdxl.py --quick                                              # CPU check

Prints, per method: seconds per scene (whole story / scenes; isolated also over the scenes with
returning characters, where the isolated branch acts), peak memory (CUDA: max allocated; CPU:
peak resident set size of the process, sampled), the bytes each method's bank (isolated: the
reference bank, CSA: its sampled tokens, both CFG halves) holds on the GPU at the story's end (0 on
the host: ``--cpu-offload``, or a CPU run), and for isolated attention the reference bank's
bytes per character measured from the bank saved to disk and loaded back, with the share of the
image the character's tokens cover and the bytes scaled to 25 % coverage. Then the ratios to
vanilla and the bank size at 1024², 50 steps, fp16 estimated from the layer shapes for the bank
options. Writes the same as markdown and JSON to ``<out>/bench_sdxl_<device>[_quick].{md,json}``
with the commit, machine and card, so numbers never need copying by hand.

``--quick`` (CPU, bf16, 128², 2 steps, 3 scenes) checks that the full-size layer structure runs end to end
in a few minutes; its times say nothing about a GPU. The weights are random: the images are
noise, and masks cover whatever the random cross-attention picks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from osa_lib import IsolationConfig, generate_story, load_backbone
from osa_lib.attention import find_attention_layers
from osa_lib.bank import ReferenceBank, estimate_bank_bytes
from osa_lib.figures import markdown_table
from osa_lib.story import parse_story

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# two characters, the words of the tiny local tokenizer; the last scenes bring both back
SCENES = [("a girl with blonde hair in the park", ["Lily"]),
          ("a boy with black hair on the beach", ["Tom"]),
          ("a girl and a boy in the snow", ["Lily", "Tom"]),
          ("a girl reading a book on the beach", ["Lily"]),
          ("a boy and a girl with a dog in the park", ["Lily", "Tom"]),
          ("a boy with a cat in the snow", ["Tom"])]


def story(n_scenes: int):
    return parse_story({
        "title": "bench", "characters": [
            {"name": "Lily", "word": "girl", "id_prompt": "a girl with blonde hair and a red dress"},
            {"name": "Tom", "word": "boy", "id_prompt": "a boy with black hair"}],
        "scenes": [{"prompt": p, "characters": c, "seed": i} for i, (p, c) in enumerate(SCENES[:n_scenes])]},
        "bench story")


class PeakMemory:
    """Peak memory during a block: CUDA max allocated, or the CPU process's sampled peak RSS."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.02)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def environment(device: torch.device) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - a tarball without git still benchmarks
            return ""
    import diffusers
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except Exception:  # noqa: BLE001
        pass
    return {"commit": git("rev-parse", "HEAD") + (" (uncommitted changes)" if git("status", "--porcelain", "-uno") else ""),
            "machine": platform.node(), "cpu": cpu, "threads": torch.get_num_threads(),
            "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)",
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def bank_coverage(bank: ReferenceBank, name: str, unet, latent_hw) -> float:
    """Mean share of a layer's image tokens a character's stored references cover."""
    n_tokens = {l.name: l.resolution(latent_hw)[0] * l.resolution(latent_hw)[1]
                for l in find_attention_layers(unet, kind="self", places=("up",), latent_hw=latent_hw)}
    shares = [k.shape[0] / n_tokens[layer] for (layer, _), (k, _) in bank.tokens[name].items()]
    return float(np.mean(shares)) if shares else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--backbone", default="sdxl-random", choices=("sdxl-random", "sdxl-tiny"),
                        help="sdxl-tiny: the tests' tiny SDXL, to check this script in seconds")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp16 on cuda, bf16 on cpu")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--scenes", type=int, default=4, help=f"scenes of the two-character story (<= {len(SCENES)})")
    parser.add_argument("--quick", action="store_true", help="CPU structure check: bf16, 128², 2 steps, 3 scenes")
    parser.add_argument("--methods", default="vanilla,csa,isolated")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="each model on the GPU only while it runs, reference banks on the host (12-16 GB cards)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every method, in rotating order; times are medians over rounds and each "
                             "ratio the median of the rounds' ratios, so a host whose speed drifts between runs "
                             "(the H200 VM's: vanilla 1.8-3.1 s per scene) moves both sides of a ratio")
    parser.add_argument("--bank-step-stride", type=int, default=IsolationConfig.bank_step_stride,
                        help="IsolationConfig.bank_step_stride (default %(default)s)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one vanilla and one isolated run of the story's last scene with "
                             "torch.profiler; top operators to <out>/profile_<device>.txt")
    parser.add_argument("--out", default=str(ROOT / "results"), help="folder for the .md and .json results")
    args = parser.parse_args()
    if args.quick:
        args.device, args.dtype = args.device or "cpu", args.dtype or "bf16"
        args.size, args.steps, args.scenes = 128, 2, 3
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "bf16")]
    if args.size % 64:
        parser.error("--size must be a multiple of 64 (the U-Net halves the 1/8 latent twice)")
    methods = args.methods.split(",")
    env = environment(device)
    print(f"# bench_sdxl: {args.backbone} on {device} ({env['card']}), {args.dtype or dtype}, {args.size}², "
          f"{args.steps} steps, {args.scenes} scenes; commit {env['commit'][:12]}", flush=True)

    started = time.perf_counter()
    backbone = load_backbone(args.backbone, device=str(device), dtype=dtype, cpu_offload=args.cpu_offload)
    backbone.latent_shape = (backbone.latent_shape[0], args.size // 8, args.size // 8)
    build_s = time.perf_counter() - started
    n_params = sum(p.numel() for p in backbone.unet.parameters())
    print(f"built in {build_s:.1f} s: U-Net {n_params / 1e9:.3f} B parameters", flush=True)
    nonfinite = {"count": 0}
    decode = backbone.decode

    def decode_counting(latents, check_finite=True):  # random weights: count NaN images, don't stop
        images = decode(latents, check_finite=False)
        nonfinite["count"] += int((~np.isfinite(images)).reshape(len(images), -1).any(1).sum())
        return images
    backbone.decode = decode_counting
    the_story = story(args.scenes)
    config = IsolationConfig(bank_step_stride=args.bank_step_stride)
    generate_story(backbone, story(1), "vanilla", num_inference_steps=1, progress=False)  # warm-up (kernels, caches)

    rows, raw, isolated_bank = [], {}, None
    latent_hw = tuple(backbone.latent_shape[1:])
    rounds = {m: [] for m in methods}  # method -> [(s / scene, s / scene with returning characters)] per round
    for method in [m for r in range(args.repeats) for m in methods[r % len(methods):] + methods[:r % len(methods)]]:
        nonfinite["count"] = 0
        with PeakMemory(device) as peak:
            t0 = time.perf_counter()
            result = generate_story(backbone, the_story, method, config=config, num_inference_steps=args.steps,
                                    progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        returning = [s.seconds for i, s in enumerate(result.scenes)
                     if any(n in {c for prev in the_story.scenes[:i] for c in prev.characters} for n in s.characters)]
        rounds[method].append((seconds / len(the_story.scenes), float(np.mean(returning)) if returning else float("nan")))
        if method in raw:  # a later round: its time only
            continue
        entry = {"method": method, "seconds per scene": seconds / len(the_story.scenes), "peak memory GiB": peak.peak / 2**30,
                 "non-finite images": nonfinite["count"], "bank bytes on the device": result.device_bank_bytes}
        if method == "isolated":
            with tempfile.TemporaryDirectory() as tmp:
                path = result.bank.save(Path(tmp) / "bank.safetensors")
                file_bytes = path.stat().st_size
                bank = ReferenceBank.load(path)
            entry["bank"] = {}
            for name in bank.characters:
                coverage = bank_coverage(bank, name, backbone.unet, latent_hw)
                size = bank.nbytes(name)
                entry["bank"][name] = {"bytes": size, "coverage": coverage,
                                       "bytes at 25% coverage": size * 0.25 / coverage if coverage else float("nan"),
                                       "stored steps": len({s for _, s in bank.tokens[name]}),
                                       "layers": len({l for l, _ in bank.tokens[name]})}
            entry["bank file bytes"] = file_bytes
            isolated_bank = result.bank  # the profile continues the story from it
        raw[method] = entry
        print(f"{method}: {entry['seconds per scene']:.3f} s per scene, peak {entry['peak memory GiB']:.2f} GiB"
              + (f", {nonfinite['count']} non-finite images" if nonfinite["count"] else ""), flush=True)

    for method, e in raw.items():  # medians over rounds; ratios paired within a round
        per_scene, returning = np.array(rounds[method]).T  # (rounds,) each
        e["seconds per scene, each round"] = per_scene.tolist()
        e["seconds per scene"] = float(np.median(per_scene))
        row = {"method": method, "s / scene": f"{e['seconds per scene']:.3f}", "× vanilla time": "",
               "peak memory (GiB)": f"{e['peak memory GiB']:.2f}",
               "bank on the device (GiB)": f"{e['bank bytes on the device'] / 2**30:.3f}"}
        if "vanilla" in raw:
            vanilla = np.array(rounds["vanilla"])[:, 0]
            e["× vanilla, each round"] = (per_scene / vanilla).tolist()
            row["× vanilla time"] = f"{np.median(per_scene / vanilla):.3f}"
        if method == "isolated":
            e["seconds per scene with returning characters"] = float(np.median(returning))
            row["s / scene, returning"] = f"{e['seconds per scene with returning characters']:.3f}"
            if "vanilla" in raw:
                row["× vanilla time"] += f" (returning scenes: {np.median(returning / vanilla):.3f})"
        if args.repeats > 1 and "vanilla" in raw:
            row["rounds (× vanilla)"] = ", ".join(f"{r:.2f}" for r in e["× vanilla, each round"])
        rows.append(row)
    bank_rows = [{"character": n, "bytes (saved bank)": f"{b['bytes']:,}", "MiB": f"{b['bytes'] / 2**20:.1f}",
                  "coverage": f"{100 * b['coverage']:.1f} %", "stored steps": b["stored steps"], "layers": b["layers"],
                  "GB at 25 % coverage": f"{b['bytes at 25% coverage'] / 1e9:.3f}"}
                 for n, b in raw.get("isolated", {}).get("bank", {}).items()]
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        sdxl_unet = UNet2DConditionModel.from_config(backbone.unet.config)
    warmup = config.warmup
    options = [("every step (before issue 14: warm-up stored too)", dict(warmup=1 / 50)),  # steps 1..49
               ("every step after warm-up (the paper)", dict(warmup=warmup)),
               ("+ every 2nd step", dict(warmup=warmup, step_stride=2)),
               ("+ every 3rd step (default)", dict(warmup=warmup, step_stride=3)),
               ("+ every 2nd layer", dict(warmup=warmup, layer_stride=2))]
    estimate_rows = [{"bank option": label, **{f"GB at {int(100 * f)} %": f"{estimate_bank_bytes(sdxl_unet, (128, 128), 50, f, 2, **kw) / 1e9:.2f}"
                                               for f in (0.1, 0.25)}} for label, kw in options]

    lines = [f"# bench_sdxl: {env['card']}, {str(dtype).replace('torch.', '')}, {args.size}², {args.steps} steps",
             "", (f"Full-size SDXL base architecture with random weights (`load_backbone('sdxl-random')`), "
                  if args.backbone == "sdxl-random" else f"`load_backbone('{args.backbone}')`, ")
                 + f"a two-character story of {len(the_story.scenes)} scenes, all methods in one run"
                 + (f", {args.repeats} rounds in rotating order (medians; ratios paired within a round)"
                    if args.repeats > 1 else "")
                 + (" (`--quick`: a structure check, CPU times)" if args.quick else "") + ".", "",
             "| setting | value |", "|---|---|",
             *[f"| {k} | {v} |" for k, v in {**env, "device": str(device), "U-Net parameters": f"{n_params:,}",
                                             "build seconds": f"{build_s:.1f}", "command": shlex.join(sys.argv)}.items()],
             "", "## Time and memory", "", markdown_table(rows), "",
             "## Reference bank, measured from the saved bank", "",
             markdown_table(bank_rows) if bank_rows else "(isolated not run)", "",
             f"Saved file: {raw.get('isolated', {}).get('bank file bytes', 0):,} bytes. Target: < 1 GB per character "
             f"at 25 % coverage (1024², fp16).", "",
             "## Bank size estimated from the layer shapes, 1024², 50 steps, fp16, one character", "",
             markdown_table(estimate_rows)]
    if any(e["non-finite images"] for e in raw.values()):
        lines += ["", "Non-finite images (random weights): " +
                  ", ".join(f"{m} {e['non-finite images']}" for m, e in raw.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_sdxl_{device.type}" + ("_quick" if args.quick else "")
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "args": vars(args), "methods": raw,
                                                  "bank estimates 1024² 50 steps fp16": estimate_rows}, indent=1))
    print(f"wrote {out / stem}.md and .json")
    if args.profile:
        profile(backbone, the_story, config, args.steps, device, out / f"profile_{device.type}.txt", isolated_bank)


def profile(backbone, the_story, config, steps: int, device: torch.device, path: Path,
            bank: ReferenceBank | None = None) -> None:
    """torch.profiler over the last scene (its characters returning) under vanilla and isolated:
    the operators that take the most device and host time, to see where isolated's extra time goes.
    ``bank``: the isolated story's bank when the benchmark ran it (otherwise the story is drawn here)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if bank is None:
        bank = generate_story(backbone, the_story, "isolated", config=config, num_inference_steps=steps,
                              progress=False).bank
    last = dataclasses.replace(the_story, scenes=the_story.scenes[-1:])
    parts = []
    for method in ("vanilla", "isolated"):
        with torch_profile(activities=activities) as prof:
            t0 = time.perf_counter()
            generate_story(backbone, last, method, config=config, bank=bank if method == "isolated" else None,
                           num_inference_steps=steps, progress=False)
            seconds = time.perf_counter() - t0
        parts += [f"## {method}: last scene, {steps} steps, {seconds:.3f} s under the profiler", "",
                  prof.key_averages().table(sort_by=sort, row_limit=30), ""]
        if device.type == "cuda":  # the host's share too (on the CPU the first table already is)
            parts += [prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), ""]
    path.write_text("\n".join(parts))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

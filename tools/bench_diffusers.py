#!/usr/bin/env python3
"""Reference timing: diffusers' SkyReelsV2DiffusionForcingPipeline (PyTorch, CPU, the same
number of threads) on the same model directory, prompts, steps and schedules as
`motioncache-bench`, so the benchmark report can put vanilla beside vanilla.

    /work/venv/bin/python tools/bench_diffusers.py --model models/tiny --out bench-out/diffusers.json [--quick]

Writes {"paper": seconds, "element-default": seconds} (sums over the prompts). Each video
is generated as many times as `motioncache-bench` generates ours by default (twice on
"paper", five times on "element-default"; `--repeats` sets both), in rounds over the
prompts, and its fastest time counts, as the benchmark counts ours: a small VM's single
timings move by several percent.
"""

import argparse
import json
import os
import time

import torch

from diffusers import SkyReelsV2DiffusionForcingPipeline

PROMPTS = [
    "a red circle moving right on a striped blue background",
    "a yellow square moving left on a checkered green background",
    "a white triangle moving up on a plain black background",
    "a static green circle on a striped red background",
]


# Runs per video, as `motioncache-bench` runs ours (its `--repeats` defaults).
DEFAULT_REPEATS = {"paper": 2, "element-default": 5}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/tiny")
    ap.add_argument("--out", default="bench-out/diffusers.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per video, the fastest counts (default: 2 on paper, 5 on element-default)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with open(os.path.join(a.model, "motioncache.json")) as f:
        d = json.load(f)
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = PROMPTS[:2] if a.quick else PROMPTS
    w, h, text_len = d["width"], d["height"], d["text_len"]
    # Latent frames as the Rust benchmark counts them. With no temporal compression,
    # diffusers turns num_frames into num_frames + 1, hence the -1 on num_frames.
    scenarios = {
        "paper": dict(frames=35, base=25, overlap=5, block=5, ar=5, steps=50, guidance=6.0,
                      addnoise=20.0, shift=8.0),
        "element-default": dict(frames=2 * d["window"] - d["overlap"], base=d["window"], overlap=d["overlap"],
                                block=d["causal_block_size"], ar=d["ar_step"], steps=d["steps"],
                                guidance=d["guidance_scale"], addnoise=d["addnoise_condition"],
                                shift=d["shift"]),
    }
    out = {}
    base_scheduler = pipe.scheduler.config
    for name, s in scenarios.items():
        pipe.scheduler = type(pipe.scheduler).from_config(base_scheduler, flow_shift=s["shift"])
        repeats = max(1, a.repeats or DEFAULT_REPEATS[name])
        # In rounds over the prompts, as motioncache-bench runs ours: a video's repeats
        # fall at different times of the run instead of one after another.
        times = [[] for _ in prompts]
        for r in range(repeats):
            for i, p in enumerate(prompts):
                start = time.perf_counter()
                with torch.no_grad():
                    pipe(prompt=p, negative_prompt="", height=h, width=w, num_frames=s["frames"] - 1,
                         num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                         causal_block_size=s["block"], ar_step=s["ar"], base_num_frames=s["base"],
                         overlap_history=s["overlap"], addnoise_condition=s["addnoise"],
                         max_sequence_length=text_len, output_type="np",
                         generator=torch.Generator().manual_seed(1024 + i))
                times[i].append(time.perf_counter() - start)
                print(f"{name} prompt {i} round {r}: {times[i][-1]:.2f} s", flush=True)
        total = sum(min(t) for t in times)
        out[name] = total
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

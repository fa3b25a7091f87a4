#!/usr/bin/env python3
"""Run the public reference implementation of MotionCache (github ywlq/MotionCache, folder
MotionCache4SkyReels-V2; paper arXiv 2605.01725) on our tiny diffusers model directory and
write a JSON summary that `motioncache-bench` can put beside our own numbers.

    git --git-dir=<bare clone of ywlq/MotionCache> archive HEAD | tar -x -C /work/ref/MotionCache
    /work/venv/bin/python tools/reference_motioncache.py \
        --ref /work/ref/MotionCache/MotionCache4SkyReels-V2 --model models/tiny \
        [--schedule paper|element-default] [--quick] [--steps N] [--out bench-out/reference.json]
        [--threshold X] [--rescale model|wan] [--bf16-block-outputs] [--vs-diffusers] [--check-only]
        [--ref-commit SHA]   # when the checkout has no .git (e.g. made with git archive)

Keys read by the benchmark: `work_ratio` (token-forwards through the transformer stack with
MotionCache / the same count for the reference's own vanilla run, both CFG branches),
`psnr_db` (mean over prompts of the per-video PSNR of the cached RGB video against the
reference's own vanilla RGB video, frames in [0, 255]), `speedup_vs_own_vanilla` (vanilla
seconds / cached seconds, whole pipeline calls: text encoding, denoising, VAE) and `schedule`.
Also written: seconds, per-prompt numbers, the cache settings, the reference commit, the
result of the model-mapping check and the list of deviations below.

What runs is the reference's own code, imported from the --ref checkout at run time:
`skyreels_v2_infer.modules.transformer_motion.WanModel` (the DiT with the token cache: warm-up,
residual cache, TeaCache-style step distance, frame-difference motion weights, phase 1/2,
temporal vote, minimum update ratio, selective forward with K/V cache),
`skyreels_v2_infer.pipelines.diffusion_forcing_pipeline.DiffusionForcingPipeline.__call__`
(the diffusion-forcing schedule with the long-video sliding window) and its
`FlowUniPCMultistepScheduler`. Nothing of it is copied into this repository: the reference
has its own licence (SkyReels-V2 / MAGI-1 derived) and stays outside, in the checkout that
--ref names.

Monkeypatched at run time, and why:
- package shells for `skyreels_v2_infer`, `.modules`, `.pipelines`, `.scheduler`, and a stub
  `decord` module: their `__init__` files import T5 / CLIP / the Wan VAE / a prompt enhancer
  / a video reader that this run replaces or never uses (no extra dependencies needed).
- `transformer_motion.flash_attention` -> `torch.nn.functional.scaled_dot_product_attention`
  in float32: flash-attn is CUDA-only (and casts to bf16).
- the reference's blocks end with `x.to(torch.bfloat16)` (its GPU runs are bf16); by default
  the module's `torch.bfloat16` is pointed at float32 so the whole run is float32 like our
  model and the mapping check can be exact. `--bf16-block-outputs` keeps the reference's cast.
- the DiT is the reference's `WanModel` built with the tiny config and loaded with the
  diffusers state dict under the reference's names (strict: every tensor used, none missing).
- text encoder and VAE: diffusers' pieces from the model directory (UMT5 with
  `max_sequence_length` = motioncache.json `text_len`, zero-padded like diffusers; the
  AutoencoderKLWan with its latents mean/std) behind the small interfaces the reference's
  pipeline calls (`encode(prompt)`, `vae.encode(video)`, `vae.decode(latents)`).
- the reference hard-codes the Wan VAE's 4x temporal / 8x spatial strides and 16 latent
  channels. The tiny VAE has no temporal compression, 4x spatial, 4 channels. So the pipeline
  is asked for 4*(F-1)+1 "pixel" frames (windows and overlap likewise), height and width x2,
  `prepare_latents` draws the model's channel count, the VAE adapter's decode repeats every
  latent frame after the first 4 times and its encode takes frames 0, 4, 8, ... back; the
  final video is de-duplicated to one frame per latent frame. This is lossless: the overlap
  re-encode sees exactly the decoded frames.
- `WanModel.forward` is wrapped to set `num_groups` from the window it is given: the
  reference sets it once from `base_num_frames`, so a last window shorter than the base
  window (paper schedule here: 15 of 25 latent frames) would fail in its
  `update_mask_i.view(num_groups, group_size)`. Nothing else changes.
- block 0's `forward` / `forward_selective` are wrapped to count tokens (the work measure).
- the cache's rescale polynomial (`teacache_coefficients`, Wan 1.3B's in the reference) is
  replaced by motioncache.json's `cache_rescale` (this model's fit, highest power first) unless
  `--rescale wan`.
- tqdm and the reference's per-step prints are silenced; all per-run cache state (K/V
  buffers, residuals, accumulators, previous-frame dicts) is cleared before every run, so
  vanilla and cached runs do not depend on order (the reference's own script keeps some of
  it across prompts).
- the global torch RNG is seeded with the run's seed before every call, because the
  reference draws the `addnoise_condition` noise with `torch.randn_like`.

The reference's "vanilla" is its own cache-off path: group by group with a K/V cache
(block-causal attention), finished groups not recomputed (their K/V from their last denoising
step are kept), groups not started not computed, the overlap group computed only at the first
step of a window. It is therefore not bit-identical to diffusers' pipeline over a whole run;
the mapping check below compares one full forward (all groups) with diffusers'.
"""

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import subprocess
import sys
import time
import types
import warnings

import numpy as np

REF_STRIDE_T = 4  # the reference's hard-coded VAE strides (Wan 2.1 VAE)
REF_STRIDE_S = 8

# Paper run settings of the reference (run_vbench.sh + vbench_sample.py defaults).
REFERENCE_SETTINGS = dict(
    token_cache_threshold=0.1,
    token_cache_warmup=4,
    token_phase1_update_count=6,
    token_distance_mode="global",
    enable_frame_diff_weight=True,
    weight_norm_mode="max_rescale",
    weight_floor=0.6,
    enable_temporal_consistency=True,
    temporal_consistency_threshold=0.5,
    min_update_ratio=0.4,
)


def fail(msg):
    raise SystemExit(f"reference_motioncache: {msg}")


def load_prompts():
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "bench_diffusers.py")
    # Read PROMPTS without importing the module (it imports diffusers' pipeline at top level).
    import ast

    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PROMPTS" for t in node.targets):
            return ast.literal_eval(node.value)
    fail(f"no PROMPTS in {path}")


def schedules(d):
    return {
        "paper": dict(frames=35, window=25, overlap=5, block=5, ar_step=5, steps=50, guidance=6.0,
                      addnoise=20.0, shift=8.0),
        "element-default": dict(frames=2 * d["window"] - d["overlap"], window=d["window"], overlap=d["overlap"],
                                block=d["causal_block_size"], ar_step=d["ar_step"], steps=d["steps"],
                                guidance=d["guidance_scale"], addnoise=d["addnoise_condition"], shift=d["shift"]),
    }


# ----------------------------------------------------------------------------------------------
# Importing the reference


class _NotUsed:
    def __init__(self, name):
        self.name = name

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self.name} is not available in reference_motioncache.py")


class _TorchF32Proxy:
    """Stands in for `torch` inside transformer_motion: `torch.bfloat16` is float32."""

    bfloat16 = None

    def __init__(self, torch):
        object.__setattr__(self, "_torch", torch)
        object.__setattr__(self, "bfloat16", torch.float32)

    def __getattr__(self, name):
        return getattr(self._torch, name)


def import_reference(ref):
    ref = os.path.abspath(ref)
    pkg = os.path.join(ref, "skyreels_v2_infer")
    needed = ["modules/transformer_motion.py", "modules/attention.py",
              "pipelines/diffusion_forcing_pipeline.py", "scheduler/fm_solvers_unipc.py"]
    if not os.path.isdir(ref):
        fail(f"--ref {ref}: no such directory (a checkout of ywlq/MotionCache's MotionCache4SkyReels-V2)")
    for rel in needed:
        if not os.path.isfile(os.path.join(pkg, rel)):
            fail(f"--ref {ref}: not a MotionCache4SkyReels-V2 checkout (missing skyreels_v2_infer/{rel})")
    for name, sub in [("skyreels_v2_infer", ""), ("skyreels_v2_infer.modules", "modules"),
                      ("skyreels_v2_infer.pipelines", "pipelines"), ("skyreels_v2_infer.scheduler", "scheduler")]:
        m = types.ModuleType(name)
        m.__path__ = [os.path.join(pkg, sub) if sub else pkg]
        sys.modules[name] = m
    mods = sys.modules["skyreels_v2_infer.modules"]
    for fn in ("get_text_encoder", "get_transformer", "get_vae", "get_image_encoder"):
        setattr(mods, fn, _NotUsed(fn))
    if "decord" not in sys.modules:
        decord = types.ModuleType("decord")
        decord.VideoReader = _NotUsed("decord.VideoReader")
        decord.bridge = types.SimpleNamespace(set_bridge=_NotUsed("decord.bridge.set_bridge"))
        sys.modules["decord"] = decord
    try:
        tm = importlib.import_module("skyreels_v2_infer.modules.transformer_motion")
        sched = importlib.import_module("skyreels_v2_infer.scheduler.fm_solvers_unipc")
        dfp = importlib.import_module("skyreels_v2_infer.pipelines.diffusion_forcing_pipeline")
    except Exception as e:  # noqa: BLE001 - report which checkout failed, not a traceback
        fail(f"--ref {ref}: cannot import the reference code: {type(e).__name__}: {e}")
    return tm, sched, dfp


def ref_commit(ref, override):
    if override:
        return override
    try:
        out = subprocess.run(["git", "-C", ref, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for p in (os.path.join(ref, "REF_COMMIT"), os.path.join(os.path.dirname(os.path.abspath(ref)), "REF_COMMIT")):
        if os.path.isfile(p):
            with open(p) as f:
                return f.read().strip()
    return None


# ----------------------------------------------------------------------------------------------
# Patches and adapters


def patch_reference(tm, dfp, torch, bf16_block_outputs):
    F = torch.nn.functional

    def sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                       causal=False, window_size=(-1, -1), deterministic=False, dtype=None, version=None):
        # q, k, v: [B, L, N, D] as the reference's flash_attention takes them
        assert tuple(window_size) == (-1, -1) and not causal and q_lens is None and k_lens is None
        if q_scale is not None:
            q = q * q_scale
        out_dtype = q.dtype
        v = v.to(q.dtype) if v.dtype != q.dtype else v
        k = k.to(q.dtype) if k.dtype != q.dtype else k
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=softmax_scale)
        return x.transpose(1, 2).contiguous().to(out_dtype)

    tm.flash_attention = sdpa_attention
    if not bf16_block_outputs:
        tm.torch = _TorchF32Proxy(torch)
    dfp.tqdm = lambda it, *a, **k: it


class Counter:
    def __init__(self):
        self.reset()

    def reset(self):
        self.tokens = 0  # token-forwards through the block stack (counted at block 0)
        self.full_calls = 0
        self.partial_calls = 0
        self.partial_tokens = 0
        self.dense_tokens = 0  # tokens of every window the transformer was called with
        self.calls = 0

    def snapshot(self):
        return dict(tokens=self.tokens, full_group_forwards=self.full_calls, selective_forwards=self.partial_calls,
                    selective_tokens=self.partial_tokens, transformer_calls=self.calls,
                    dense_window_tokens=self.dense_tokens)


def instrument(model, counter):
    blk = model.blocks[0]
    orig_forward = blk.forward
    orig_selective = blk.forward_selective

    def forward(x, *a, **k):
        counter.tokens += x.shape[1]
        counter.full_calls += 1
        return orig_forward(x, *a, **k)

    def forward_selective(x, *a, **k):
        counter.tokens += x.shape[1]
        counter.partial_calls += 1
        counter.partial_tokens += x.shape[1]
        return orig_selective(x, *a, **k)

    blk.forward = forward
    blk.forward_selective = forward_selective

    orig_model_forward = model.forward
    p_t, p_h, p_w = model.patch_size

    def model_forward(x, *a, **k):
        # The reference sets num_groups once from base_num_frames; a shorter last window needs
        # the count of its own groups (see the module docstring).
        model.num_groups = x.shape[2] // model.group_size
        counter.calls += 1
        counter.dense_tokens += (x.shape[2] // p_t) * (x.shape[3] // p_h) * (x.shape[4] // p_w)
        return orig_model_forward(x, *a, **k)

    model.forward = model_forward


class TextEncoderAdapter:
    """The reference pipeline's `text_encoder` interface over diffusers' UMT5 + tokenizer."""

    def __init__(self, dpipe, text_len, torch):
        self.dpipe, self.text_len, self.torch = dpipe, text_len, torch

    def to(self, *a, **k):
        return self

    def cpu(self):
        return self

    def encode(self, prompt):
        with self.torch.no_grad():
            return self.dpipe._get_t5_prompt_embeds(prompt=prompt, max_sequence_length=self.text_len,
                                                    device=self.torch.device("cpu"), dtype=self.torch.float32)


class VaeAdapter:
    """The reference pipeline's `vae` interface over diffusers' AutoencoderKLWan with no temporal
    compression: decode repeats latent frames 1.. four times (the reference's frame arithmetic
    assumes a 4x temporal VAE), encode takes frames 0, 4, 8, ... back."""

    def __init__(self, vae, torch):
        self.vae, self.torch = vae, torch
        c = vae.config
        self.mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)

    def encode(self, video):
        torch = self.torch
        f = video.shape[2]
        if (f - 1) % REF_STRIDE_T:
            raise ValueError(f"VaeAdapter.encode: {f} frames is not 1 + 4k")
        x = video[:, :, ::REF_STRIDE_T].float()
        with torch.no_grad():
            mu = self.vae.encode(x).latent_dist.mode()
        return ((mu - self.mean) / self.std).float()

    def decode(self, z):
        torch = self.torch
        with torch.no_grad():
            x = self.vae.decode(z.float() * self.std + self.mean, return_dict=False)[0]
        x = x.float().clamp(-1, 1)
        return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(REF_STRIDE_T, dim=2)], dim=2)


def map_state_dict(sd):
    out = {}
    simple = {
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "fps_projection.net.0.proj": "fps_projection.0",
        "fps_projection.net.2": "fps_projection.2",
        "proj_out": "head.head",
    }
    block = {
        "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
        "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
        "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
        "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
        "norm2": "norm3",  # diffusers' affine cross-attention norm is the reference's norm3
        "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    }
    for k, v in sd.items():
        if k == "scale_shift_table":
            out["head.modulation"] = v
            continue
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            if rest == "scale_shift_table":
                out[f"blocks.{i}.modulation"] = v
                continue
            for src, dst in block.items():
                if rest.startswith(src + "."):
                    out[f"blocks.{i}.{dst}{rest[len(src):]}"] = v
                    break
            else:
                raise KeyError(k)
            continue
        for src, dst in simple.items():
            if k.startswith(src + "."):
                out[dst + k[len(src):]] = v
                break
        else:
            if k.startswith(("patch_embedding.", "fps_embedding.")):
                out[k] = v
            else:
                raise KeyError(k)
    return out


def build_reference_model(tm, dtrans, text_len, torch):
    c = dtrans.config
    if c.qk_norm not in ("rms_norm_across_heads",):
        fail(f"transformer qk_norm {c.qk_norm!r}: the reference only has RMS norm across heads")
    if c.image_dim is not None or c.added_kv_proj_dim is not None:
        fail("transformer: only text-to-video models are supported")
    model = tm.WanModel(
        model_type="t2v", patch_size=tuple(c.patch_size), text_len=text_len, in_dim=c.in_channels,
        dim=c.num_attention_heads * c.attention_head_dim, ffn_dim=c.ffn_dim, freq_dim=c.freq_dim,
        text_dim=c.text_dim, out_dim=c.out_channels, num_heads=c.num_attention_heads, num_layers=c.num_layers,
        window_size=(-1, -1), qk_norm=True, cross_attn_norm=c.cross_attn_norm,
        inject_sample_info=c.inject_sample_info, eps=c.eps,
    )
    sd = map_state_dict(dtrans.state_dict())
    res = model.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    model = model.float().eval().requires_grad_(False)
    return model, len(sd)


# ----------------------------------------------------------------------------------------------
# Cache configuration


def configure(model, cached, s, rescale):
    if cached:
        model.set_token_cache_config(enable=True, threshold=s["token_cache_threshold"],
                                     warmup_steps=s["token_cache_warmup"],
                                     phase1_update_count=s["token_phase1_update_count"],
                                     distance_mode=s["token_distance_mode"])
    else:
        model.set_token_cache_config(enable=False)
    with contextlib.redirect_stdout(io.StringIO()):
        model.set_frame_diff_weight_config(enable=cached and s["enable_frame_diff_weight"], viz_enable=False,
                                           output_dir=None)
        model.set_weight_norm_mode(s["weight_norm_mode"], s["weight_floor"])
        model.set_temporal_consistency_config(enable=cached and s["enable_temporal_consistency"],
                                              threshold=s["temporal_consistency_threshold"])
        model.set_min_update_ratio(s["min_update_ratio"])
    model.teacache_coefficients = list(rescale)


def reset_state(model):
    # K/V buffers, residuals, previous outputs (the reference's own reset helper) and the rest of
    # the per-run dicts.
    model.clear_class_cache()
    model.previous_e0_g_even, model.previous_e0_g_odd = {}, {}
    model.prev_group_last_frame_even, model.prev_group_last_frame_odd = {}, {}
    model.prev_group_last_frame_input_even, model.prev_group_last_frame_input_odd = {}, {}
    model.clear_token_cache()
    model.global_accumulated_even, model.global_accumulated_odd = {}, {}
    for blk in model.blocks:
        blk.self_attn.freqs_cache_dict = {}


# ----------------------------------------------------------------------------------------------
# Mapping check: one full forward of the reference's DiT (cache off, every group computed)
# against diffusers' SkyReelsV2Transformer3DModel with the same block-causal attention.


def parity_check(model, dtrans, embeds, window, block, z_dim, lh, lw, torch, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = window // block
    x = torch.randn(1, z_dim, groups * block, lh, lw, generator=g)
    t = torch.randint(0, 1000, (groups,), generator=g).sort(descending=False).values
    t = t.repeat_interleave(block)[None]
    configure(model, False, REFERENCE_SETTINGS, model.teacache_coefficients)
    reset_state(model)
    model.group_size, model.num_groups = block, groups
    model.cnt, model.cnt_even, model.cnt_odd = 0, [0] * groups, [0] * groups
    model.inference_steps, model.overlap, model.optimize = 10 ** 9, False, True
    old_block = dtrans.config.num_frame_per_block
    dtrans._set_ar_attention(block)
    worst, scale = 0.0, 0.0
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        for emb in embeds:  # cond (even) then uncond (odd) branch, as the pipeline calls them
            r = model(x, t=t, context=emb, update_mask_i=torch.ones(groups * block, dtype=torch.bool), fps=[1])
            d = dtrans(hidden_states=x, timestep=t, encoder_hidden_states=emb, enable_diffusion_forcing=True,
                       fps=[1], return_dict=False)[0]
            worst = max(worst, (r.float() - d.float()).abs().max().item())
            scale = max(scale, d.abs().max().item())
    dtrans._set_ar_attention(old_block)
    reset_state(model)
    return dict(max_abs_diff=worst, max_abs_output=scale, frames=groups * block, block=block,
                timesteps=t[0, ::block].tolist())


# ----------------------------------------------------------------------------------------------


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ref_frames(latent_frames):
    return REF_STRIDE_T * (latent_frames - 1) + 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="checkout of ywlq/MotionCache's MotionCache4SkyReels-V2 folder")
    ap.add_argument("--model", default="models/tiny", help="diffusers SkyReelsV2DiffusionForcingPipeline directory")
    ap.add_argument("--out", default="bench-out/reference.json")
    ap.add_argument("--schedule", choices=["paper", "element-default"], default="paper")
    ap.add_argument("--quick", action="store_true", help="first 2 prompts only")
    ap.add_argument("--steps", type=int, default=None, help="override the schedule's denoising steps (smoke tests)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=None, help="override the cache threshold (reference: 0.1)")
    ap.add_argument("--rescale", choices=["model", "wan"], default="model",
                    help="rescale polynomial: motioncache.json cache_rescale (model) or the reference's Wan 1.3B fit")
    ap.add_argument("--bf16-block-outputs", action="store_true",
                    help="keep the reference's bfloat16 cast of every block output (its GPU behaviour)")
    ap.add_argument("--no-parity", action="store_true", help="skip the reference-vs-diffusers forward check")
    ap.add_argument("--vs-diffusers", action="store_true",
                    help="also run diffusers' own pipeline per prompt and report the PSNR of the reference's "
                         "vanilla video against it (how far the reference's cache-off path is from diffusers)")
    ap.add_argument("--check-only", action="store_true", help="run the mapping check only, write nothing")
    ap.add_argument("--ref-commit", default=None, help="commit of the checkout, when it has no .git")
    a = ap.parse_args()

    model_dir = os.path.abspath(a.model)
    if not os.path.isdir(model_dir):
        fail(f"--model {model_dir}: no such directory")
    mc_path = os.path.join(model_dir, "motioncache.json")
    try:
        with open(mc_path) as f:
            mc = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"--model {model_dir}: cannot read {mc_path}: {e}")
    need = ["text_len", "height", "width", "fps", "window", "overlap", "causal_block_size", "ar_step", "steps",
            "guidance_scale", "addnoise_condition", "shift"]
    missing = [k for k in need if k not in mc]
    if missing:
        fail(f"--model {model_dir}: {mc_path} lacks {', '.join(missing)}")
    tm, sched_mod, dfp = import_reference(a.ref)

    import torch
    from diffusers import SkyReelsV2DiffusionForcingPipeline
    from diffusers.utils.torch_utils import randn_tensor

    torch.set_num_threads(a.threads)
    # the reference wraps float32 regions in amp.autocast("cuda"), a no-op on CPU
    warnings.filterwarnings("ignore", message="CUDA is not available")
    patch_reference(tm, dfp, torch, a.bf16_block_outputs)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            dpipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001
        fail(f"--model {model_dir}: cannot load the diffusers pipeline: {type(e).__name__}: {e}")
    dpipe.set_progress_bar_config(disable=True)
    dtrans = dpipe.transformer.float().eval()
    text_len = int(mc["text_len"])
    model, n_tensors = build_reference_model(tm, dtrans, text_len, torch)
    counter = Counter()
    instrument(model, counter)

    if a.rescale == "model":
        if "cache_rescale" not in mc:
            fail(f"--model {model_dir}: motioncache.json has no cache_rescale (use --rescale wan)")
        rescale = [float(c) for c in mc["cache_rescale"]]
    else:
        rescale = list(model.teacache_coefficients)
    settings = dict(REFERENCE_SETTINGS)
    if a.threshold is not None:
        settings["token_cache_threshold"] = a.threshold
    settings["rescale_polynomial"] = rescale
    settings["rescale_source"] = ("motioncache.json cache_rescale" if a.rescale == "model"
                                  else "reference default (Wan 1.3B TeaCache fit)")
    settings["block_outputs"] = "bfloat16 (reference cast kept)" if a.bf16_block_outputs else "float32"

    s = dict(schedules(mc)[a.schedule])
    if a.steps is not None:
        s["steps"] = a.steps
    h, w, fps = int(mc["height"]), int(mc["width"]), int(mc["fps"])
    vae_s = int(dpipe.vae.config.scale_factor_spatial)
    z_dim = int(dpipe.vae.config.z_dim)
    if int(dpipe.vae.config.scale_factor_temporal) != 1:
        fail(f"--model {model_dir}: the VAE adapter assumes no temporal compression")
    lh, lw = h // vae_s, w // vae_s
    ref_h, ref_w = lh * REF_STRIDE_S, lw * REF_STRIDE_S

    # Reference pipeline object without its loaders (they read Wan checkpoints).
    pipe = dfp.DiffusionForcingPipeline.__new__(dfp.DiffusionForcingPipeline)
    pipe.transformer = model
    pipe.vae = VaeAdapter(dpipe.vae.float().eval(), torch)
    pipe.text_encoder = TextEncoderAdapter(dpipe, text_len, torch)
    pipe.video_processor = None
    pipe.device = torch.device("cpu")
    pipe.offload = False
    pipe.scheduler = sched_mod.FlowUniPCMultistepScheduler()
    pipe.prepare_latents = lambda shape, dtype=None, device=None, generator=None: randn_tensor(
        [z_dim] + list(shape[1:]), generator=generator, device=device, dtype=dtype)

    prompts = load_prompts()
    prompts = prompts[:2] if a.quick else prompts
    out = dict(schedule=a.schedule, prompts=prompts, seeds=[1024 + i for i in range(len(prompts))],
               schedule_params=s, settings=settings, ref=os.path.abspath(a.ref),
               ref_commit=ref_commit(os.path.abspath(a.ref), a.ref_commit), threads=a.threads,
               model=model_dir, mapped_tensors=n_tensors)

    if not a.no_parity:
        embeds = [pipe.text_encoder.encode(prompts[0]), pipe.text_encoder.encode("")]
        par = parity_check(model, dtrans, embeds, s["window"], s["block"], z_dim, lh, lw, torch)
        print(f"mapping check (one forward, {par['frames']} frames, blocks of {par['block']}, cond + uncond): "
              f"max |reference - diffusers| = {par['max_abs_diff']:.3e} (max |output| {par['max_abs_output']:.3f})",
              flush=True)
        out["parity"] = par
    if a.check_only:
        return

    def run(prompt, seed, cached):
        configure(model, cached, settings, rescale)
        reset_state(model)
        counter.reset()
        torch.manual_seed(seed)  # addnoise_condition noise is drawn with torch.randn_like
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            video = pipe(prompt=prompt, negative_prompt="", height=ref_h, width=ref_w,
                         num_frames=ref_frames(s["frames"]), num_inference_steps=s["steps"], shift=s["shift"],
                         guidance_scale=s["guidance"], generator=gen, overlap_history=ref_frames(s["overlap"]),
                         addnoise_condition=s["addnoise"], base_num_frames=ref_frames(s["window"]),
                         ar_step=s["ar_step"], causal_block_size=s["block"], fps=fps)[0]
        dt = time.perf_counter() - start
        video = video[::REF_STRIDE_T]  # one frame per latent frame (see VaeAdapter)
        assert video.shape[0] == s["frames"], video.shape
        return video, dt, counter.snapshot()

    def run_diffusers(prompt, seed):
        dpipe.scheduler = type(dpipe.scheduler).from_config(dpipe.scheduler.config, flow_shift=s["shift"])
        start = time.perf_counter()
        with torch.no_grad():
            v = dpipe(prompt=prompt, negative_prompt="", height=h, width=w, num_frames=s["frames"] - 1,
                      num_inference_steps=s["steps"], guidance_scale=s["guidance"], causal_block_size=s["block"],
                      ar_step=s["ar_step"], base_num_frames=s["window"], overlap_history=s["overlap"],
                      addnoise_condition=s["addnoise"], max_sequence_length=text_len, fps=fps, output_type="np",
                      generator=torch.Generator().manual_seed(seed)).frames[0]
        dt = time.perf_counter() - start
        return (np.asarray(v) * 255).astype(np.uint8), dt

    per = []
    for i, p in enumerate(prompts):
        seed = 1024 + i
        v0, t0, c0 = run(p, seed, False)
        v1, t1, c1 = run(p, seed, True)
        r = dict(prompt=p, seed=seed, seconds_vanilla=t0, seconds_cached=t1, psnr_db=psnr(v1, v0),
                 work_ratio=c1["tokens"] / c0["tokens"], vanilla=c0, cached=c1)
        if a.vs_diffusers:
            vd, td = run_diffusers(p, seed)
            if vd.shape != v0.shape:
                fail(f"diffusers video {vd.shape} vs reference {v0.shape}")
            r.update(seconds_diffusers=td, psnr_ref_vanilla_vs_diffusers=psnr(v0, vd),
                     psnr_cached_vs_diffusers=psnr(v1, vd))
            print(f"  diffusers {td:.2f} s; PSNR reference vanilla vs diffusers {r['psnr_ref_vanilla_vs_diffusers']:.2f} dB, "
                  f"cached vs diffusers {r['psnr_cached_vs_diffusers']:.2f} dB", flush=True)
        per.append(r)
        print(f"{a.schedule} prompt {i}: vanilla {t0:.2f} s, cached {t1:.2f} s, work {r['work_ratio']:.3f}, "
              f"PSNR {r['psnr_db']:.2f} dB, selective forwards {c1['selective_forwards']}, "
              f"full group forwards {c1['full_group_forwards']}/{c0['full_group_forwards']}", flush=True)

    tok0 = sum(r["vanilla"]["tokens"] for r in per)
    tok1 = sum(r["cached"]["tokens"] for r in per)
    dense = sum(r["vanilla"]["dense_window_tokens"] for r in per)
    sv = sum(r["seconds_vanilla"] for r in per)
    sc = sum(r["seconds_cached"] for r in per)
    out.update(
        work_ratio=tok1 / tok0,
        psnr_db=float(np.mean([r["psnr_db"] for r in per])),
        speedup_vs_own_vanilla=sv / sc,
        seconds_vanilla=sv,
        seconds_cached=sc,
        # relative to a vanilla that runs the whole window every row (the paper's baseline)
        work_ratio_vs_full_window=tok1 / dense,
        vanilla_work_vs_full_window=tok0 / dense,
        per_prompt=per,
        **({} if not a.vs_diffusers else dict(
            psnr_ref_vanilla_vs_diffusers=float(np.mean([r["psnr_ref_vanilla_vs_diffusers"] for r in per])),
            psnr_cached_vs_diffusers=float(np.mean([r["psnr_cached_vs_diffusers"] for r in per])),
            seconds_diffusers=sum(r["seconds_diffusers"] for r in per))),
        psnr_note="per video over all RGB frames (one per latent frame), uint8 [0,255]; 100 dB if identical",
    )
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("schedule", "work_ratio", "psnr_db", "speedup_vs_own_vanilla",
                                           "seconds_vanilla", "seconds_cached")}))


if __name__ == "__main__":
    main()

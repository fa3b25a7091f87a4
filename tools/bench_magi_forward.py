#!/usr/bin/env python3
"""PyTorch side of `motioncache-bench forward --config magi-4.5b`: times one forward of the upstream
MAGI-1 DiT (SandAI-org/MAGI-1 @ 6ff822e, `inference.model.dit.dit_model.VideoDiTModel`) with random
weights on the CPU, the same shape of forward the candle side times. Prints
{"seconds": [...], "tokens": T, "params": P, "layers": N} as the only line on stdout (everything
else goes to stderr).

    /work/venv/bin/python tools/bench_magi_forward.py --magi /tmp/magi1 \
        --config /tmp/magi1/example/4.5B/4.5B_distill_config.json --layers 2 --reps 1 --threads 2 --dtype bf16

Nothing of upstream is copied: the checkout given by --magi is imported at run time, with the CPU
stand-ins of tools/fixtures/magi_shim.py (flash-attn -> SDPA, Triton range_mod -> indexing, nccl ->
one-process gloo group, ...), plus one more stand-in installed here:

  torch.autocast(device_type="cuda", dtype=torch.float32)  (upstream wraps the embedders, the final
      linear and every layer's linear_proj in it). On CUDA this region is active and runs
      linear / conv / matmul in float32 (bf16 inputs and weights are cast up, the output is f32);
      on CPU torch disables it. Here it becomes a TorchFunctionMode that casts the floating inputs
      of linear / conv / matmul-type ops to float32, as CUDA autocast does. With --dtype f32 it
      changes nothing; with --dtype bf16 it is needed (the f32-promoted t_embedder is fed a bf16
      tensor upstream and relies on it) and it makes linear_proj run in f32, as on the GPU.

The forward (one call of VideoDiTModel.forward, the method forward_dispatcher calls; x_embedder,
t/y embedders, rope, all layers, final layer, unpatchify):
  x        [1, in_channels, C*F, H, W] random (f32)
  t        [1, C] = linspace(0.2, 0.8, C)
  y        [C, 1, caption_max_length, caption_channels] random (f32)
  xattn_mask [C, 1, caption_max_length] int64, 1 on the first --caption-len rows
  kv_range [C, 2] int32, chunk i: [0, (i+1) * chunk_tokens)  (each chunk sees itself and the
           chunks before it in this forward, like the walk's causal ranges)
  caption_dropout_mask = tensor([False]) (what forward_dispatcher passes for cfg_number 1)
  inference_params None (no KV cache), and the keyword arguments of the walk:
  chunk_width F, fwd_extra_1st_chunk False, num_steps 64, slice_point 0, range_num C,
  denoising_range_num C, distill_nearly_clean_chunk False, distill_interval = upstream
  init_intervel(num_steps)[0] (1.0 for 64 steps; only used by the distill embedding when
  num_steps == 12: with 64 steps the distill step embedding is t_embedder(64 / 4 * 2 = 32)).
chunk_tokens = F * (H / patch) * (W / patch); tokens T = C * chunk_tokens.

Weights: built on the "meta" device (as upstream's _build_dit_model does), dtypes set as upstream
runs them (--dtype bf16 (or f16): params_dtype bfloat16 then upstream `_high_precision_promoter`, which keeps
the embedders, final linear, rope, q/k layernorms and post-norms in f32; --dtype f32: params_dtype
float32, everything f32), then allocated once in that dtype and filled from a seeded random period
(randn * 0.02, 1_000_003 values, rotated by a random offset per tensor: no minutes of RNG for a
4.5B model). Norms: gamma 1, beta 0 (the zero-centred FusedLayerNorm gets weight 0); rope.bands:
upstream's default bands. The caption embedder runs on all caption_max_length rows (upstream masks
after the projection).
"""

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures"))
import magi_shim  # noqa: E402

PERIOD = 1_000_003  # prime: rows of any width start at different phases of the period


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def max_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# torch.autocast("cuda", float32) stand-in
# ---------------------------------------------------------------------------------------------
class CudaF32Autocast(TorchFunctionMode):
    """What CUDA autocast with dtype float32 does to the ops upstream runs inside it: the floating
    tensor arguments of linear / conv / matmul-type ops are cast to float32."""

    OPS = {
        F.linear, F.conv1d, F.conv2d, F.conv3d, F.bilinear,
        torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.addmv, torch.baddbmm, torch.addbmm,
        torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.mm, torch.Tensor.bmm,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            def up(a):
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float32:
                    return a.float()
                return a

            args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        return func(*args, **kwargs)


def install_autocast_shim():
    orig = torch.autocast

    class autocast:  # noqa: N801 (same name as torch's)
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            self.cuda = device_type == "cuda"
            if self.cuda:
                assert dtype in (None, torch.float32), f"upstream only uses CUDA autocast to float32, got {dtype}"
                self.ctx = CudaF32Autocast() if enabled else None
            else:
                self.ctx = orig(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

        def __enter__(self):
            if self.ctx is not None:
                self.ctx.__enter__()
            return self

        def __exit__(self, *exc):
            if self.ctx is not None:
                return self.ctx.__exit__(*exc)
            return False

    torch.autocast = autocast


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def load_config(path):
    """Upstream MagiConfig.from_json; a JSON that lacks some fields (from_json wants every one of
    them) gets the dataclass defaults for those (model_name: videodit_ardf), listed on stderr,
    then upstream's own check (cfg_number 1 for a distill model, 3 for a base one)."""
    from inference.common import EngineConfig, MagiConfig, ModelConfig, RuntimeConfig

    try:
        return MagiConfig.from_json(path)
    except ValueError as e:
        if "Missing fields" not in str(e):
            raise
    with open(path) as f:
        d = json.load(f)
    dtypes = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}
    parts = {}
    for name, cls in (("model_config", ModelConfig), ("runtime_config", RuntimeConfig), ("engine_config", EngineConfig)):
        sub = dict(d.get(name, {}))
        if name == "model_config":
            sub.setdefault("model_name", "videodit_ardf")
            if isinstance(sub.get("params_dtype"), str):
                sub["params_dtype"] = dtypes[sub["params_dtype"]]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(sub) - names)
        if unknown:
            raise SystemExit(f"{path}: {name} has unknown fields {unknown}")
        missing = sorted(names - set(sub))
        if missing:
            log(f"config: {name} lacks {missing}: upstream defaults used")
        parts[name] = cls(**sub)
    cfg = MagiConfig(**parts)
    distill = cfg.engine_config.fp8_quant or cfg.engine_config.distill
    assert cfg.runtime_config.cfg_number == (1 if distill else 3), "cfg_number must be 1 (distill/fp8) or 3 (base)"
    return cfg


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def build_model(dmod, dm, cfg, dtype, seed):
    """VideoDiTModel on meta, dtypes as upstream runs them, then allocated once and filled."""
    cfg.model_config.params_dtype = dtype
    with torch.device("meta"):
        model = dmod.VideoDiTModel(config=cfg, pre_process=True, post_process=True)
    if dtype != torch.float32:
        model = dmod._high_precision_promoter(model)  # .float() on meta: dtype only
    model = model.to_empty(device="cpu").eval()

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(PERIOD, generator=g) * 0.02
    periods = {torch.float32: base}

    def fill_(p):
        flat = p.detach().view(-1)
        src = periods.setdefault(p.dtype, base.to(p.dtype))
        off = int(torch.randint(0, PERIOD, (1,), generator=g))
        src = torch.cat([src[off:], src[:off]])
        n, k = flat.numel(), flat.numel() // PERIOD
        if k:
            flat[: k * PERIOD].view(k, PERIOD).copy_(src.expand(k, PERIOD))
        if n - k * PERIOD:
            flat[k * PERIOD:].copy_(src[: n - k * PERIOD])

    done = set()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, dm.FusedLayerNorm):
                mod.weight.zero_() if mod.zero_centered_gamma else mod.weight.fill_(1.0)
                mod.bias.zero_()
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
            else:
                continue
            done.update((id(mod.weight), id(mod.bias)))
        model.rope.bands.copy_(model.rope.get_default_bands().to(model.rope.bands.dtype))
        done.add(id(model.rope.bands))
        for name, p in model.named_parameters():
            if id(p) not in done:
                fill_(p)
        for name, b in model.named_buffers():
            raise SystemExit(f"unexpected buffer {name}: fill it")
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--magi", required=True, help="SandAI-org/MAGI-1 checkout (commit 6ff822e)")
    ap.add_argument("--config", required=True, help="upstream MagiConfig JSON (e.g. example/4.5B/4.5B_distill_config.json)")
    ap.add_argument("--layers", type=int, default=None, help="override model_config.num_layers")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--chunk-frames", type=int, default=None, help="latent frames per chunk (default: chunk_width)")
    ap.add_argument("--height", type=int, default=16, help="latent height before patching")
    ap.add_argument("--width", type=int, default=16, help="latent width before patching")
    ap.add_argument("--caption-len", type=int, default=64, help="valid caption rows per chunk")
    ap.add_argument("--num-steps", type=int, default=64)
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="bf16",
                    help="params_dtype (bf16 / f16: upstream's _high_precision_promoter keeps norms etc. in f32)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]

    magi_shim.install(a.magi)
    magi_shim.selftest()
    install_autocast_shim()
    dm, dmod = magi_shim.patch_upstream()
    import inference.pipeline.video_generate as vg  # noqa: E402  (init_intervel: the walk's distill_interval)

    cfg = load_config(a.config)
    mc, rc, ec = cfg.model_config, cfg.runtime_config, cfg.engine_config
    if a.layers is not None:
        mc.num_layers = a.layers
    magi_shim.init_distributed(ec)

    C = a.chunks
    Fr = a.chunk_frames if a.chunk_frames is not None else rc.chunk_width
    H, W = a.height, a.width
    L = a.caption_len
    assert Fr % mc.t_patch_size == 0 and H % mc.patch_size == 0 and W % mc.patch_size == 0
    assert 0 < L <= mc.caption_max_length
    chunk_tokens = (Fr // mc.t_patch_size) * (H // mc.patch_size) * (W // mc.patch_size)
    tokens = C * chunk_tokens

    t0 = time.perf_counter()
    model = build_model(dmod, dm, cfg, dtype, a.seed)
    params = sum(p.numel() for p in model.parameters())
    by_dtype = {}
    for p in model.parameters():
        by_dtype[str(p.dtype)] = by_dtype.get(str(p.dtype), 0) + p.numel()
    log(f"model: {mc.num_layers} layers, {params / 1e6:.1f} M params {by_dtype}, built+filled in "
        f"{time.perf_counter() - t0:.1f} s, max rss {max_rss_gb():.2f} GiB; distill {ec.distill}, "
        f"cp_strategy {ec.cp_strategy}, threads {torch.get_num_threads()}")

    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(1, mc.in_channels, C * Fr, H, W, generator=g)
    t = torch.linspace(0.2, 0.8, C).reshape(1, C)
    y = torch.randn(C, 1, mc.caption_max_length, mc.caption_channels, generator=g)
    xattn_mask = torch.zeros(C, 1, mc.caption_max_length, dtype=torch.int64)
    xattn_mask[:, :, :L] = 1
    kv_range = torch.tensor([[0, (i + 1) * chunk_tokens] for i in range(C)], dtype=torch.int32)
    caption_dropout_mask = torch.tensor([False])
    distill_interval = vg.init_intervel(a.num_steps, torch.device("cpu"), shortcut_mode=ec.shortcut_mode)[0]
    kwargs = dict(
        chunk_width=Fr,
        fwd_extra_1st_chunk=False,
        num_steps=a.num_steps,
        slice_point=0,
        range_num=C,
        denoising_range_num=C,
        distill_nearly_clean_chunk=False,
        distill_interval=distill_interval,
    )
    log("forward: x", list(x.shape), "t", [round(v, 4) for v in t.flatten().tolist()], "y", list(y.shape),
        f"caption rows {L}/{mc.caption_max_length}", "kv_range", kv_range.tolist(),
        "caption_dropout_mask [False], inference_params None, kwargs",
        {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
    log(f"tokens {tokens} ({C} chunks x {chunk_tokens})")

    def once():
        return model(x, t, y, caption_dropout_mask=caption_dropout_mask, xattn_mask=xattn_mask,
                     kv_range=kv_range, inference_params=None, **kwargs)

    secs = []
    with torch.no_grad():
        start = time.perf_counter()
        out = once()
        assert out.shape == x.shape, (out.shape, x.shape)
        assert torch.isfinite(out).all(), "non-finite output"
        log(f"warm-up {time.perf_counter() - start:.3f} s, out {list(out.shape)} {out.dtype} "
            f"std {out.float().std().item():.4g}, max rss {max_rss_gb():.2f} GiB")
        for _ in range(a.reps):
            start = time.perf_counter()
            out = once()
            assert torch.isfinite(out).all(), "non-finite output"
            secs.append(time.perf_counter() - start)
    log(f"seconds {[round(s, 3) for s in secs]}, max rss {max_rss_gb():.2f} GiB")
    print(json.dumps({"seconds": secs, "tokens": tokens, "params": params, "layers": mc.num_layers}))


if __name__ == "__main__":
    main()

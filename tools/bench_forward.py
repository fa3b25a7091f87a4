#!/usr/bin/env python3
"""PyTorch side of `motioncache-bench forward`: times one forward of diffusers'
SkyReelsV2Transformer3DModel with random weights, on the same configuration, latent size,
text length, dtype and threads as the candle side. Prints {"seconds": [...]} on stdout.

    python tools/bench_forward.py --config bench-out/forward-config.json --frames 3 \
        --height 16 --width 32 --text-len 512 --dtype f32 --reps 2 --threads 2

--prefix-tokens N: every self-attention also attends to N random keys/values placed before
the block's own (what the candle side's cached window prefix is): the attention call of
diffusers' transformer module is wrapped so that the prefix is prepended to its keys and
values when they are the block's own tokens (not the text's).
"""

import argparse
import json
import time
import types

import torch
import torch.nn.functional as F

from diffusers import SkyReelsV2Transformer3DModel


def with_prefix(cfg, tokens, dtype, dev):
    """Makes every self-attention of the transformer module see `tokens` random cached
    keys/values before the block's own."""
    import diffusers.models.transformers.transformer_skyreels_v2 as module

    shape = (1, cfg["num_attention_heads"], tokens, cfg["attention_head_dim"])
    pk = torch.randn(shape, dtype=dtype).to(dev)
    pv = torch.randn(shape, dtype=dtype).to(dev)
    sdpa = F.scaled_dot_product_attention

    def attention(q, k, v, *args, **kwargs):
        if k.shape[2] == q.shape[2]:  # the block's own tokens: self-attention
            k = torch.cat([pk.to(k.dtype), k], dim=2)
            v = torch.cat([pv.to(v.dtype), v], dim=2)
        return sdpa(q, k, v, *args, **kwargs)

    functional = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    functional.scaled_dot_product_attention = attention
    module.F = functional


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="diffusers transformer config.json")
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--height", type=int, default=16)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--prefix-tokens", type=int, default=0)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (SDPA attention on either)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with open(a.config) as f:
        cfg = json.load(f)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    model = SkyReelsV2Transformer3DModel(**cfg).to(dtype).to(dev).eval()
    x = torch.randn(1, cfg["in_channels"], a.frames, a.height, a.width, dtype=dtype).to(dev)
    t = torch.tensor([[999.0 - 37.0 * i for i in range(a.frames)]]).to(dev)
    ctx = torch.randn(1, a.text_len, cfg["text_dim"], dtype=dtype).to(dev)
    fps = torch.tensor([1]).to(dev) if cfg.get("inject_sample_info") else None
    if a.prefix_tokens:
        with_prefix(cfg, a.prefix_tokens, dtype, dev)

    def once():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, enable_diffusion_forcing=True,
                     fps=fps, return_dict=False)[0]

    secs = []
    with torch.no_grad():
        once()
        for _ in range(a.reps):
            start = time.perf_counter()
            y = once()
            assert torch.isfinite(y.float()).all(), "non-finite output"  # synchronises
            secs.append(time.perf_counter() - start)
    print(json.dumps({"seconds": secs}))


if __name__ == "__main__":
    main()

"""Train the tiny SkyReels-V2 diffusion-forcing pipeline on procedural video (CPU, PyTorch).

Stages (run in order, each resumable; the state lives in CKPT_DIR/ckpt.pt):
  vae  AutoencoderKLWan (4x spatial, no temporal compression) on 5-frame clips, then the
       per-channel latent mean/std are measured and frozen.
  dit  SkyReelsV2Transformer3DModel + a small UMT5 encoder trained jointly, VAE frozen:
       flow matching (velocity = noise - x0), an independent noise level per causal block
       (diffusion forcing), block-causal mask, 10% caption dropout for CFG, EMA weights.
  dec  optional: VAE decoder fine-tune with the encoder frozen (latent statistics unchanged).

A stage with a budget of 0 minutes runs until the process is stopped; export.py can turn any
checkpoint into a diffusers pipeline directory.

    nice -n 19 /work/venv/bin/python tools/tiny/train.py --ckpt-dir /work/tiny-ckpt
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import signal
import sys
import time
from datetime import datetime, timezone

# Busy-waiting OpenMP workers collapse throughput when the 2 cores are shared (measured:
# 6x slower steps while cargo builds ran); passive waiting keeps 2 threads useful.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402

RES = 64
FPS = 8
# diffusers' pipeline maps fps 16 -> embedding 0 and everything else -> 1.
FPS_INDEX = 0 if FPS == 16 else 1
BLOCK = 3  # latent frames per causal block
WINDOW = 9  # latent frames per training window (= pixel frames: no temporal compression)
TEXT_LEN = 32  # max_sequence_length used in training; pass the same to the pipeline
CAPTION_DROPOUT = 0.1

STOP = {"flag": False}


def _on_signal(signum, frame):  # noqa: ARG001
    STOP["flag"] = True


def vae_config(base_dim: int = 16) -> dict:
    return dict(
        base_dim=base_dim,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, False],
        dropout=0.0,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
        scale_factor_temporal=1,
        scale_factor_spatial=4,
    )


def dit_config() -> dict:
    return dict(
        patch_size=[1, 2, 2],
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=128,
        freq_dim=256,
        ffn_dim=512,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
        pos_embed_seq_len=None,
        inject_sample_info=True,
        num_frame_per_block=BLOCK,
    )


def te_config() -> dict:
    vocab = len(data.vocabulary())
    return dict(
        vocab_size=int(math.ceil(vocab / 8) * 8),
        d_model=128,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )


def build_tokenizer():
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(data.vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


def build_models(cfg_vae=None, cfg_dit=None, cfg_te=None):
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    vae = AutoencoderKLWan(**(cfg_vae or vae_config()))
    dit = SkyReelsV2Transformer3DModel(**(cfg_dit or dit_config()))
    te = UMT5EncoderModel(UMT5Config(**(cfg_te or te_config())))
    return vae, dit, te


def encode_text(te, tokenizer, captions: list[str]) -> torch.Tensor:
    """Exactly what the pipeline does: encode with mask, zero everything after the real tokens."""
    enc = tokenizer(
        captions,
        padding="max_length",
        max_length=TEXT_LEN,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    out = te(enc.input_ids, enc.attention_mask).last_hidden_state
    return out * enc.attention_mask.unsqueeze(-1).to(out.dtype)


def vae_encode_mean(vae, video: torch.Tensor) -> torch.Tensor:
    return vae.encode(video).latent_dist.mean


def ema_update(ema: dict, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
            else:
                ema[k].copy_(v)


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Logger:
    def __init__(self, path: str):
        self.path = path
        new = not os.path.exists(path)
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(["time_utc", "stage", "step", "stage_seconds", "loss", "metric", "lr"])
            self.f.flush()

    def row(self, *vals):
        self.w.writerow([now_utc(), *vals])
        self.f.flush()


def save_ckpt(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    if os.path.exists(path):
        os.replace(path, path + ".prev")
    os.replace(tmp, path)


def sample_sigmas(bsz: int, nblk: int, gen: torch.Generator, ctx_prob: float = 0.2):
    """Per-block noise levels, plus a per-block loss weight (0 for clean context blocks).

    With probability `ctx_prob` the leading blocks are finished (clean) context, mostly one
    block: what the streaming generator gives every window after the first (its overlap
    history, 3 latent frames = 1 block at the element's defaults)."""
    u = torch.rand(bsz, nblk, generator=gen)
    mode = torch.rand(bsz, generator=gen)
    # Synchronous generation: one level for the whole window.
    same = mode < 0.25
    u[same] = u[same][:, :1].expand(-1, nblk)
    # Asynchronous generation: earlier blocks are further along.
    asc = (mode >= 0.25) & (mode < 0.75)
    u[asc] = u[asc].sort(dim=1).values
    # Half of the samples use the timestep shift 3 to favour high noise, the rest uniform.
    s = torch.where(torch.rand(bsz, 1, generator=gen) < 0.5, 1.0, 3.0)
    sigma = s * u / (1.0 + (s - 1.0) * u)
    weight = torch.ones(bsz, nblk)
    # Extension / streaming: some leading blocks are finished (clean) context.
    ctx = torch.rand(bsz, generator=gen) < ctx_prob
    for b in torch.nonzero(ctx).flatten().tolist():
        one = float(torch.rand(1, generator=gen)) < 0.75
        k = 1 if one else int(torch.randint(1, nblk, (1,), generator=gen))
        sigma[b, :k] = 0.0
        weight[b, :k] = 0.0
    return sigma, weight


def optimise(opt, params, loss: torch.Tensor, lr: float) -> None:
    """One optimiser step at learning rate `lr`, gradients clipped to norm 1."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def psnr_db(mse: float) -> float:
    """PSNR of pixels in [-1, 1] (peak-to-peak 2, so peak^2 = 4)."""
    return 10 * math.log10(4.0 / max(mse, 1e-10))


def lr_at(frac: float, peak: float, floor: float, warm: float = 0.03) -> float:
    if frac < warm:
        return peak * frac / warm
    p = min((frac - warm) / (1.0 - warm), 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", default="/work/tiny-ckpt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="vae,dit", help="comma list from vae,dit,dec")
    ap.add_argument("--vae-minutes", type=float, default=30.0)
    ap.add_argument("--dit-minutes", type=float, default=0.0, help="0 = until stopped")
    ap.add_argument("--dec-minutes", type=float, default=8.0)
    ap.add_argument("--max-steps", type=int, default=0, help="per stage, for smoke tests")
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--vae-base-dim", type=int, default=16, help="AutoencoderKLWan base_dim of a new run")
    ap.add_argument("--vae-batch", type=int, default=6)
    ap.add_argument("--vae-crop", type=int, default=32, help="spatial crop for VAE training steps")
    ap.add_argument("--object-weight", type=float, default=3.0, help="extra loss weight on object pixels")
    ap.add_argument("--dec-every", type=int, default=3, help="decoder step every N DiT steps (0 = never)")
    ap.add_argument("--dit-batch", type=int, default=8)
    ap.add_argument("--dit-lr", type=float, default=4e-4)
    ap.add_argument(
        "--dit-lr-floor",
        type=float,
        default=0.0,
        help="with --dit-minutes > 0 and a floor > 0: cosine decay from --dit-lr to this over the budget",
    )
    ap.add_argument(
        "--clip-frames",
        type=int,
        default=WINDOW,
        help="frames per encoded training clip (1 + 4k); each DiT sample is a random window of 9 from it, so "
        "windows start mid-motion as the streaming generator's later windows do",
    )
    ap.add_argument(
        "--context-prob",
        type=float,
        default=0.2,
        help="fraction of DiT samples whose leading block(s) are clean context (the overlap history)",
    )
    ap.add_argument(
        "--confusable-prob",
        type=float,
        default=0.0,
        help="fraction of new training clips whose object and background take two different colours "
        "that are both object and background colours (red, green, blue): the captions only word "
        "order tells apart",
    )
    ap.add_argument(
        "--role-weight",
        type=float,
        default=0.0,
        help="weight of an auxiliary loss on the text encoder (0 = off): a cosine classifier (not "
        "exported) must tell from each colour word's output embedding whether it names the object or "
        "the background, so the encoder puts the word's role into it (without it the third export's "
        "encoder gave 'red' the same embedding in both roles, cosine 0.9999998, and the DiT swapped "
        "object and background colours)",
    )
    ap.add_argument("--role-scale", type=float, default=16.0, help="logit scale of the role classifier")
    ap.add_argument(
        "--rel-bias-lr-mult",
        type=float,
        default=1.0,
        help="learning-rate multiplier of the text encoder's relative position biases: they are the "
        "encoder's only source of word order, start near 0 and need values of several units to make a "
        "word attend to its neighbour; at the DiT's learning rate the role classifier stayed at 75%% "
        "accuracy, at 100x it reached 100%% in 125 steps",
    )
    ap.add_argument("--cache-size", type=int, default=6000)
    ap.add_argument(
        "--init-from",
        default="",
        help="an exported pipeline directory (export.py) to continue DiT training from when CKPT_DIR "
        "has no checkpoint: its weights become both the live and the EMA weights, its VAE latent "
        "statistics are kept, the optimiser restarts with a fresh warm-up",
    )
    ap.add_argument(
        "--rec-object-weight", type=float, default=4.0, help="extra reconstruction-loss weight on object pixels (VAE stage and every decoder step)"
    )
    ap.add_argument(
        "--finetune-decoder-minutes",
        type=float,
        default=0.0,
        help="first fine-tune the VAE decoder alone for this long (encoder frozen), then go on with the stages",
    )
    ap.add_argument("--init-step", type=int, default=0, help="the DiT step the --init-from export was made at")
    ap.add_argument(
        "--init-dit-from",
        default="",
        help="an exported pipeline directory whose transformer and text encoder start the DiT stage "
        "(warm start on a new VAE's latents: only the patch embedding and the head meet a new latent "
        "space); ignored once the DiT stage has begun",
    )
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    torch.set_num_interop_threads(1)
    os.makedirs(args.ckpt_dir, exist_ok=True)
    ckpt_path = os.path.join(args.ckpt_dir, "ckpt.pt")
    log = Logger(os.path.join(args.ckpt_dir, "loss.csv"))

    tokenizer = build_tokenizer()
    state = None
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        print(f"{now_utc()} resuming from {ckpt_path}: stage {state['stage']} step {state['step']}", flush=True)
        vae, dit, te = build_models(state["vae_config"], state["dit_config"], state["te_config"])
        vae.load_state_dict(state["vae"])
        dit.load_state_dict(state["dit"])
        te.load_state_dict(state["te"])
    elif args.init_from:
        vae, dit, te, state = init_from_export(args.init_from, args.init_step, args.seed)
        print(f"{now_utc()} continuing from {args.init_from}: DiT step {state['step']}", flush=True)
    else:
        torch.manual_seed(args.seed)
        vae, dit, te = build_models(cfg_vae=vae_config(args.vae_base_dim))
        state = dict(
            stage="vae",
            step=0,
            stage_seconds=0.0,
            total_seconds=0.0,
            done_stages=[],
            vae_config=vae_config(args.vae_base_dim),
            dit_config=dit_config(),
            te_config=te_config(),
            text_len=TEXT_LEN,
            block=BLOCK,
            window=WINDOW,
            fps=FPS,
            res=RES,
            seed=args.seed,
        )
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"params: vae {n(vae)} dit {n(dit)} text_encoder {n(te)}", flush=True)

    if args.finetune_decoder_minutes > 0 and "latents_mean" in state:
        finetune_decoder(args, state, vae, log, ckpt_path, args.finetune_decoder_minutes)
        if STOP["flag"]:
            return
    stages = [s for s in args.stages.split(",") if s]
    for stage in stages:
        if stage in state["done_stages"]:
            continue
        if state["stage"] != stage:
            state.update(stage=stage, step=0, stage_seconds=0.0)
            state.pop("opt", None)
        minutes = {"vae": args.vae_minutes, "dit": args.dit_minutes, "dec": args.dec_minutes}[stage]
        if stage == "dit" and "latents_mean" not in state:
            measure_latent_stats(vae, state, args.seed)
        if stage == "dit" and args.init_dit_from and state["step"] == 0 and "dit_ema" not in state:
            warm_start_dit(args.init_dit_from, dit, te)
        fn = {"vae": train_vae, "dit": train_dit, "dec": train_dec}[stage]
        fn(args, state, vae, dit, te, tokenizer, log, ckpt_path, minutes)
        if STOP["flag"]:
            snapshot(state, vae, dit, te)
            save_ckpt(ckpt_path, state)
            print(f"{now_utc()} stopped by signal, checkpoint saved at step {state['step']}", flush=True)
            return
        state["done_stages"].append(stage)
        if stage == "vae":
            measure_latent_stats(vae, state, args.seed)
        snapshot(state, vae, dit, te)
        save_ckpt(ckpt_path, state)
        print(f"{now_utc()} stage {stage} done", flush=True)


def init_from_export(path: str, step: int, seed: int):
    """Models and a DiT-stage state from an export.py directory, as if at DiT step `step`."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae")
    dit, te = load_export_dit_te(path)
    keep = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    vae_cfg = keep(vae.config)
    latents_mean, latents_std = vae_cfg.pop("latents_mean"), vae_cfg.pop("latents_std")
    te_cfg = {k: getattr(te.config, k) for k in te_config()}
    state = dict(
        stage="dit",
        step=step,
        resumed_at=step,
        stage_seconds=0.0,
        total_seconds=0.0,
        done_stages=["vae"],
        vae_config=vae_cfg,
        dit_config=keep(dit.config),
        te_config=te_cfg,
        latents_mean=list(latents_mean),
        latents_std=list(latents_std),
        text_len=TEXT_LEN,
        block=BLOCK,
        window=WINDOW,
        fps=FPS,
        res=RES,
        seed=seed,
    )
    state["dit_ema"] = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    state["te_ema"] = {k: v.detach().clone() for k, v in te.state_dict().items()}
    return vae, dit, te, state


def load_export_dit_te(path: str):
    """The transformer and the text encoder of an export.py directory."""
    from diffusers import SkyReelsV2Transformer3DModel
    from transformers import UMT5EncoderModel

    dit = SkyReelsV2Transformer3DModel.from_pretrained(path, subfolder="transformer")
    te = UMT5EncoderModel.from_pretrained(os.path.join(path, "text_encoder"))
    return dit, te


def warm_start_dit(path: str, dit, te) -> None:
    """Load an export's transformer and text encoder into the (same-config) models of this run."""
    src_dit, src_te = load_export_dit_te(path)
    dit.load_state_dict(src_dit.state_dict())
    te.load_state_dict(src_te.state_dict())
    print(f"{now_utc()} DiT and text encoder start from {path}", flush=True)


def snapshot(state, vae, dit, te) -> None:
    state["vae"] = vae.state_dict()
    state["dit"] = dit.state_dict()
    state["te"] = te.state_dict()


def stage_over(args, state, minutes: float) -> bool:
    if STOP["flag"]:
        return True
    if args.max_steps and state["step"] >= args.max_steps:
        return True
    return minutes > 0 and state["stage_seconds"] >= minutes * 60.0


def measure_latent_stats(vae, state, seed: int) -> None:
    vae.eval()
    rng = np.random.default_rng([seed, 777])
    zs = []
    with torch.no_grad():
        for _ in range(16):
            v, _ = data.batch(rng, 8, WINDOW, RES)
            zs.append(vae_encode_mean(vae, torch.from_numpy(v)))
    z = torch.cat(zs)
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    state["latents_mean"] = [float(x) for x in mean]
    state["latents_std"] = [float(x) for x in std]
    print(f"{now_utc()} latents mean {state['latents_mean']} std {state['latents_std']}", flush=True)


def run_loop(args, state, log, ckpt_path, minutes, step_fn, save_fn, log_every=20):
    last_ckpt = time.time()
    acc, acc_m, cnt = 0.0, 0.0, 0
    while not stage_over(args, state, minutes):
        t0 = time.time()
        loss, metric, lr = step_fn()
        dt = time.time() - t0
        state["step"] += 1
        state["stage_seconds"] += dt
        state["total_seconds"] += dt
        acc, acc_m, cnt = acc + loss, acc_m + metric, cnt + 1
        if cnt >= log_every or stage_over(args, state, minutes):
            log.row(state["stage"], state["step"], round(state["stage_seconds"], 1), acc / cnt, acc_m / cnt, lr)
            print(
                f"{now_utc()} {state['stage']} step {state['step']} loss {acc / cnt:.5f} metric {acc_m / cnt:.3f} "
                f"lr {lr:.2e} {dt:.2f}s/step",
                flush=True,
            )
            acc, acc_m, cnt = 0.0, 0.0, 0
        if time.time() - last_ckpt > args.ckpt_minutes * 60.0:
            save_fn()
            save_ckpt(ckpt_path, state)
            last_ckpt = time.time()
            print(f"{now_utc()} checkpoint at step {state['step']}", flush=True)
    if STOP["flag"]:
        save_fn()


def random_crop(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Spatial crop of [B, C, T, H, W]: the VAE is convolutional, and 32x32 crops cost a quarter
    of a 64x64 frame, which matters on 2 shared cores."""
    if size >= x.shape[-1]:
        return x
    oy = int(torch.randint(0, (x.shape[-2] - size) // 4 + 1, (1,), generator=gen)) * 4
    ox = int(torch.randint(0, (x.shape[-1] - size) // 4 + 1, (1,), generator=gen)) * 4
    return x[..., oy : oy + size, ox : ox + size].contiguous()


def train_vae(args, state, vae, dit, te, tokenizer, log, ckpt_path, minutes):
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=1e-4, betas=(0.9, 0.99))
    if "opt" in state:
        opt.load_state_dict(state["opt"])
    budget = max(minutes * 60.0, 1.0)

    def step():
        rng = np.random.default_rng([args.seed, 1, state["step"]])
        gen = torch.Generator().manual_seed(args.seed * 1000003 + state["step"])
        frames = 5 if state["step"] % 4 else 9
        v, _, masks = data.batch(
            rng, args.vae_batch if frames == 5 else max(args.vae_batch // 2, 1), frames, RES, with_masks=True
        )
        x, m = crop_with_masks(v, masks, args.vae_crop, gen)
        # Deterministic autoencoder on the posterior mean (the DiT trains on means): sampling
        # with the initial unit std drowned the signal and the decoder learned a grey mean.
        # A little relative noise keeps the decoder tolerant of imperfect DiT latents.
        mean = vae.encode(x).latent_dist.mean
        scale = mean.detach().std(dim=(0, 2, 3, 4), keepdim=True)
        z = mean + 0.05 * scale * torch.randn(mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = reconstruction_loss(args, rec, x, m)
        lr = lr_at(state["stage_seconds"] / budget, 2e-3, 2e-4) if minutes > 0 else 1e-3
        optimise(opt, vae.parameters(), loss, lr)
        psnr = psnr_db(mse.item())
        return loss.item(), psnr, lr

    def save():
        state["vae"] = vae.state_dict()
        state["opt"] = opt.state_dict()

    run_loop(args, state, log, ckpt_path, minutes, step, save)
    if not STOP["flag"]:
        state.pop("opt", None)
    vae.eval()


def train_dec(args, state, vae, dit, te, tokenizer, log, ckpt_path, minutes):
    vae.train()
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-4)
    if "opt" in state:
        opt.load_state_dict(state["opt"])
    budget = max(minutes * 60.0, 1.0)

    def step():
        rng = np.random.default_rng([args.seed, 3, state["step"]])
        gen = torch.Generator().manual_seed(args.seed * 1000033 + state["step"])
        loss, mse = decoder_loss(args, state, vae, rng, gen, args.vae_batch, RES)
        lr = lr_at(state["stage_seconds"] / budget, 5e-4, 5e-5) if minutes > 0 else 2e-4
        optimise(opt, params, loss, lr)
        return loss.item(), psnr_db(mse.item()), lr

    def save():
        state["vae"] = vae.state_dict()
        state["opt"] = opt.state_dict()

    run_loop(args, state, log, ckpt_path, minutes, step, save)
    if not STOP["flag"]:
        state.pop("opt", None)
    vae.eval()


def crop_with_masks(v: np.ndarray, masks: np.ndarray, size: int, gen: torch.Generator):
    """The same random crop of clips [B, 3, T, H, W] and their object masks [B, T, H, W]."""
    xm = random_crop(torch.cat([torch.from_numpy(v), torch.from_numpy(masks).unsqueeze(1)], dim=1), size, gen)
    return xm[:, :3], xm[:, 3:]


def reconstruction_loss(args, rec: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2 + 0.5 L1, object pixels weighted by 1 + --rec-object-weight."""
    w = 1.0 + args.rec_object_weight * mask
    return (((rec - x) ** 2 + 0.5 * (rec - x).abs()) * w).mean() / w.mean()


def decoder_loss(args, state, vae, rng, gen, batch: int, crop: int):
    """Object-weighted reconstruction loss of the decoder on clips encoded by the frozen
    encoder (plus a little latent noise: the decoder will see imperfect DiT samples).
    Returns (loss, mse). The object is ~10% of a frame but carries the colour the prompt
    names: unweighted, the decoder learnt to turn magenta objects red."""
    v, _, masks = data.batch(rng, batch, 5, RES, with_masks=True)
    x, m = crop_with_masks(v, masks, crop, gen)
    with torch.no_grad():
        z = vae_encode_mean(vae, x)
        z = z + 0.05 * torch.tensor(state["latents_std"]).view(1, -1, 1, 1, 1) * torch.randn(z.shape, generator=gen)
    rec = vae.decode(z).sample
    return reconstruction_loss(args, rec, x, m), F.mse_loss(rec, x)


def decoder_step(args, state, vae, params, opt, lr: float) -> float:
    """One decoder fine-tune step on 5-frame clips (encoder frozen); returns PSNR."""
    for p in params:
        p.requires_grad_(True)
    rng = np.random.default_rng([args.seed, 4, state["step"]])
    gen = torch.Generator().manual_seed(args.seed * 1000081 + state["step"])
    loss, mse = decoder_loss(args, state, vae, rng, gen, 4, args.vae_crop)
    optimise(opt, params, loss, lr)
    for p in params:
        p.requires_grad_(False)
    return psnr_db(mse.item())


def finetune_decoder(args, state, vae, log, ckpt_path, minutes: float) -> None:
    """Decoder-only fine-tune (encoder frozen, so the DiT's latent space does not move) on
    whole 64x64 frames, before or between DiT training; the DiT step counter is untouched."""
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)
    done = state.get("dec_ft_steps", 0)
    t_end = time.time() + minutes * 60.0
    acc = [0.0, 0.0, 0]
    while time.time() < t_end and not STOP["flag"]:
        k = state.get("dec_ft_steps", 0)
        rng = np.random.default_rng([args.seed, 5, k])
        gen = torch.Generator().manual_seed(args.seed * 1000099 + k)
        loss, mse = decoder_loss(args, state, vae, rng, gen, 4, RES)
        lr = 3e-4 * min(1.0, (k - done + 1) / 50.0)
        optimise(opt, params, loss, lr)
        state["dec_ft_steps"] = k + 1
        psnr = psnr_db(mse.item())
        acc = [acc[0] + loss.item(), acc[1] + psnr, acc[2] + 1]
        if acc[2] == 20:
            log.row("dec-ft", k + 1, 0.0, acc[0] / 20, acc[1] / 20, lr)
            print(f"{now_utc()} decoder fine-tune step {k + 1} loss {acc[0] / 20:.5f} psnr {acc[1] / 20:.2f}", flush=True)
            acc = [0.0, 0.0, 0]
    for p in params:
        p.requires_grad_(False)
    state["vae"] = vae.state_dict()
    state.pop("dec_opt", None)
    save_ckpt(ckpt_path, state)
    print(f"{now_utc()} decoder fine-tune done at step {state['dec_ft_steps']}", flush=True)


class LatentCache:
    """Encoded clips reused for several steps: encoding costs about as much as a DiT step."""

    def __init__(
        self, vae, mean, std, size: int, seed: int, clip_frames: int = WINDOW, confusable_prob: float = 0.0
    ):
        self.vae, self.size, self.seed, self.clip_frames = vae, size, seed, clip_frames
        self.confusable_prob = confusable_prob
        self.mean = torch.tensor(mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1, 1)
        self.z: list[torch.Tensor] = []
        self.m: list[torch.Tensor] = []
        self.caps: list[str] = []
        self.next = 0
        self.made = 0

    def add(self, k: int) -> None:
        rng = np.random.default_rng([self.seed, 2, self.made])
        self.made += 1
        v, caps, masks = data.batch(
            rng, k, self.clip_frames, RES, with_masks=True, confusable_prob=self.confusable_prob
        )
        with torch.no_grad():
            z = (vae_encode_mean(self.vae, torch.from_numpy(v)) - self.mean) / self.std
        # Object coverage at latent resolution (max-pooled so edges count as object).
        m = F.max_pool2d(torch.from_numpy(masks), kernel_size=RES // z.shape[-1])  # [k, T, h, w]
        for i in range(k):
            if len(self.z) < self.size:
                self.z.append(z[i])
                self.m.append(m[i])
                self.caps.append(caps[i])
            else:
                self.z[self.next] = z[i]
                self.m[self.next] = m[i]
                self.caps[self.next] = caps[i]
                self.next = (self.next + 1) % self.size

    def sample(self, bsz: int, gen: torch.Generator):
        """`bsz` windows of WINDOW latent frames, each at a random offset in its clip."""
        idx = torch.randint(0, len(self.z), (bsz,), generator=gen).tolist()
        span = self.clip_frames - WINDOW + 1
        offs = torch.randint(0, span, (bsz,), generator=gen).tolist()
        return (
            torch.stack([self.z[i][:, o : o + WINDOW] for i, o in zip(idx, offs)]),
            torch.stack([self.m[i][o : o + WINDOW] for i, o in zip(idx, offs)]),
            [self.caps[i] for i in idx],
        )


def role_loss(ctx: torch.Tensor, caps: list[str], head: torch.Tensor, scale: float):
    """Cross-entropy of a cosine classifier telling, from the text encoder's output at each
    colour word, whether the word names the object (0) or the background (1); returns (loss,
    accuracy). Cosine logits need the role to be a large part of the embedding's direction,
    not a faint component the DiT could not use."""
    feats, labels = [], []
    for b, cap in enumerate(caps):
        for pos, role in data.colour_word_roles(cap):
            if pos < ctx.shape[1]:
                feats.append(ctx[b, pos])
                labels.append(role)
    if not feats:
        return ctx.sum() * 0.0, 1.0
    f = F.normalize(torch.stack(feats), dim=-1)
    logits = scale * f @ F.normalize(head, dim=-1).T
    y = torch.tensor(labels)
    return F.cross_entropy(logits, y), float((logits.argmax(-1) == y).float().mean())


def train_dit(args, state, vae, dit, te, tokenizer, log, ckpt_path, minutes):
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    dit.train()
    te.train()
    params = list(dit.parameters()) + list(te.parameters())
    role_head = None
    if args.role_weight > 0:
        init = state.get("role_head")
        if init is None:
            init = torch.randn(2, te.config.d_model, generator=torch.Generator().manual_seed(args.seed))
        role_head = torch.nn.Parameter(init.clone())
        params.append(role_head)
    groups = [{"params": params}]
    if args.rel_bias_lr_mult != 1.0:
        rel_bias = [p for n, p in te.named_parameters() if "relative_attention_bias" in n]
        rest = [p for p in params if all(p is not q for q in rel_bias)]
        groups = [{"params": rest}, {"params": rel_bias, "lr_mult": args.rel_bias_lr_mult}]
    role_acc = [0.0, 0.0, 0]
    opt = torch.optim.AdamW(groups, lr=args.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    if "opt" in state:
        opt.load_state_dict(state["opt"])
    ema_dit = state.get("dit_ema") or {k: v.detach().clone() for k, v in dit.state_dict().items()}
    ema_te = state.get("te_ema") or {k: v.detach().clone() for k, v in te.state_dict().items()}
    # The decoder keeps improving during the DiT stage (encoder frozen, so the latent space
    # the DiT learns does not move): one decoder step every `dec_every` DiT steps.
    dec_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    dec_opt = torch.optim.AdamW(dec_params, lr=3e-4, weight_decay=1e-4)
    if "dec_opt" in state:
        dec_opt.load_state_dict(state["dec_opt"])
    dec_acc = [0.0, 0]
    if (args.clip_frames - 1) % 4 or args.clip_frames < WINDOW:
        raise SystemExit(f"--clip-frames {args.clip_frames}: must be 1 + 4k and at least {WINDOW}")
    cache = LatentCache(
        vae,
        state["latents_mean"],
        state["latents_std"],
        args.cache_size,
        args.seed,
        args.clip_frames,
        args.confusable_prob,
    )
    cache.made = state["step"] + 1000  # fresh clips after a resume
    t0 = time.time()
    while len(cache.z) < min(256, args.cache_size):
        cache.add(8)
    print(f"{now_utc()} latent cache filled with {len(cache.z)} clips in {time.time() - t0:.1f}s", flush=True)
    nblk = WINDOW // BLOCK

    def step():
        gen = torch.Generator().manual_seed(args.seed * 1000039 + state["step"])
        cache.add(1)
        x0, mask, caps = cache.sample(args.dit_batch, gen)
        caps = ["" if torch.rand(1, generator=gen).item() < CAPTION_DROPOUT else c for c in caps]
        bsz = x0.shape[0]
        sigma_b, w_b = sample_sigmas(bsz, nblk, gen, args.context_prob)
        sigma = sigma_b.repeat_interleave(BLOCK, dim=1)  # [B, F]
        w = w_b.repeat_interleave(BLOCK, dim=1)
        noise = torch.randn(x0.shape, generator=gen)
        s5 = sigma.view(bsz, 1, -1, 1, 1)
        xt = (1.0 - s5) * x0 + s5 * noise
        ctx = encode_text(te, tokenizer, caps)
        pred = dit(
            hidden_states=xt,
            timestep=sigma * 1000.0,
            encoder_hidden_states=ctx,
            enable_diffusion_forcing=True,
            fps=[FPS_INDEX],
            return_dict=False,
        )[0]
        # The object covers ~10% of the frame but carries colour, shape and all the motion:
        # weight its latent pixels up so the background does not dominate the loss.
        pix_w = 1.0 + args.object_weight * mask.unsqueeze(1)  # [B, 1, F, h, w]
        err = (((pred - (noise - x0)) ** 2) * pix_w).mean(dim=(1, 3, 4)) / pix_w.mean(dim=(1, 3, 4))  # [B, F]
        loss = (err * w).sum() / w.sum().clamp(min=1.0)
        diffusion = loss
        if role_head is not None:
            rl, ra = role_loss(ctx, caps, role_head, args.role_scale)
            loss = loss + args.role_weight * rl
            role_acc[0] += rl.item()
            role_acc[1] += ra
            role_acc[2] += 1
            if role_acc[2] == 20:
                print(f"{now_utc()} role loss {role_acc[0] / 20:.4f} accuracy {role_acc[1] / 20:.3f}", flush=True)
                role_acc[0], role_acc[1], role_acc[2] = 0.0, 0.0, 0
        steps_done = state["step"]
        lr = args.dit_lr * min(1.0, (steps_done - state.get("resumed_at", 0) + 1) / 300.0)
        if minutes > 0 and args.dit_lr_floor > 0:
            lr = min(lr, lr_at(state["stage_seconds"] / (minutes * 60.0), args.dit_lr, args.dit_lr_floor, warm=0.0))
        optimise(opt, params, loss, lr)
        decay = min(0.999, (1.0 + steps_done) / (10.0 + steps_done))
        ema_update(ema_dit, dit, decay)
        ema_update(ema_te, te, decay)
        if args.dec_every and state["step"] % args.dec_every == 0:
            dec_acc[0] += decoder_step(args, state, vae, dec_params, dec_opt, 3e-4)
            dec_acc[1] += 1
            if dec_acc[1] == 10:
                log.row("dec", state["step"], round(state["stage_seconds"], 1), 0.0, dec_acc[0] / 10, 3e-4)
                print(f"{now_utc()} decoder psnr {dec_acc[0] / 10:.2f}", flush=True)
                dec_acc[0], dec_acc[1] = 0.0, 0
        # Loss of the first block alone: it carries the text-only decision (no context).
        first = (err[:, :BLOCK] * w[:, :BLOCK]).sum() / w[:, :BLOCK].sum().clamp(min=1.0)
        return diffusion.item(), first.item(), lr

    def save():
        snapshot(state, vae, dit, te)
        if role_head is not None:
            state["role_head"] = role_head.detach().clone()
        state["dit_ema"] = ema_dit
        state["te_ema"] = ema_te
        state["opt"] = opt.state_dict()
        state["dec_opt"] = dec_opt.state_dict()

    try:
        run_loop(args, state, log, ckpt_path, minutes, step, save)
    finally:
        save()
    if not STOP["flag"]:
        state.pop("opt", None)


if __name__ == "__main__":
    main()

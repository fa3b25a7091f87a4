"""Procedural captioned video clips for training the tiny SkyReels-V2-DF pipeline.

Every clip is one shape (circle, square, triangle) in a bright colour over a dark static
background (plain, striped or checkered), either moving in a straight line in one direction
for the whole clip, or standing still. Motion never reverses inside a clip: a caption that
says "left" must describe every frame of the clip, otherwise the model cannot learn to tie
direction words to motion.

The frame is a torus: an object that leaves one edge re-enters at the opposite one (drawn
on both edges while it crosses), so a clip can continue forever without contradicting its
caption and the object never leaves the picture. The element streams for hours; a model
trained on objects that leave the frame learns to empty it.

`TEST_SCENES` are never drawn for training: the adherence test (tests/adherence.rs)
measures the exported model on exactly these prompts.

Usage as a script writes a PNG contact sheet of a few clips:
    python tools/tiny/data.py --out /tmp/sheet.png
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

# Bright, saturated object colours, far apart in hue, so that a mean colour can be
# classified by nearest neighbour (the Rust adherence test uses the same table).
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 35, 35),
    "green": (40, 210, 40),
    "blue": (45, 90, 255),
    "yellow": (245, 225, 30),
    "white": (245, 245, 245),
    "magenta": (230, 40, 230),
}

# Dark backgrounds (two shades each for the textures) so that every object stands out.
BACKGROUND_COLORS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "gray": ((70, 70, 70), (115, 115, 115)),
    "blue": ((15, 20, 80), (40, 50, 140)),
    "green": ((10, 60, 20), (30, 110, 45)),
    "red": ((80, 15, 15), (140, 40, 40)),
    "black": ((5, 5, 5), (45, 45, 45)),
}

SHAPES = ("circle", "square", "triangle")
PATTERNS = ("plain", "striped", "checkered")
DIRECTIONS = ("left", "right", "up", "down")
# Unit motion per direction in (x, y) image coordinates (y grows downwards).
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


# Held-out prompts (colour, shape, direction or "static", pattern, background colour): every
# colour, shape, direction, pattern and background colour at least twice. `sample_scene`
# redraws a scene whose caption is one of these, so the test prompts are unseen in training.
TEST_SCENES: tuple[tuple[str, str, str, str, str], ...] = (
    ("red", "triangle", "right", "checkered", "green"),
    ("green", "triangle", "left", "striped", "blue"),
    ("blue", "square", "down", "striped", "gray"),
    ("yellow", "square", "up", "striped", "black"),
    ("white", "triangle", "down", "plain", "blue"),
    ("magenta", "circle", "left", "checkered", "black"),
    ("red", "circle", "down", "checkered", "gray"),
    ("green", "square", "up", "checkered", "red"),
    ("blue", "triangle", "left", "plain", "red"),
    ("yellow", "circle", "right", "striped", "green"),
    ("white", "square", "right", "striped", "black"),
    ("magenta", "triangle", "up", "plain", "green"),
    ("green", "circle", "static", "checkered", "blue"),
    ("white", "triangle", "static", "plain", "red"),
    ("magenta", "square", "static", "striped", "gray"),
    ("yellow", "circle", "static", "plain", "black"),
)


def scene_caption(color: str, shape: str, direction: str | None, pattern: str, bg_color: str, background: bool = True) -> str:
    bg = f" on a {pattern} {bg_color} background" if background else ""
    if direction is None or direction == "static":
        return f"a static {color} {shape}{bg}"
    return f"a {color} {shape} moving {direction}{bg}"


TEST_CAPTIONS = frozenset(scene_caption(*t) for t in TEST_SCENES)


def vocabulary() -> list[str]:
    """All words of the caption grammar after the special tokens (<pad>=0, </s>=1, <unk>=2)."""
    words = ["a", "static", "moving", "on", "background"]
    words += list(OBJECT_COLORS) + list(SHAPES) + list(DIRECTIONS) + list(PATTERNS)
    words += [c for c in BACKGROUND_COLORS if c not in words]
    seen: list[str] = []
    for w in words:
        if w not in seen:
            seen.append(w)
    return list(SPECIAL_TOKENS) + seen


@dataclass
class Scene:
    color: str
    shape: str
    direction: str | None  # None = static
    pattern: str
    bg_color: str
    speed: float  # pixels per frame
    size: float  # half extent in pixels
    center: tuple[float, float]  # object centre at the middle frame
    phase: int  # texture offset in pixels
    mention_background: bool

    def caption(self) -> str:
        return scene_caption(self.color, self.shape, self.direction, self.pattern, self.bg_color, self.mention_background)

    def full_caption(self) -> str:
        return scene_caption(self.color, self.shape, self.direction, self.pattern, self.bg_color)


# Colour words that name both an object colour and a background colour: a caption with two
# of them is only understood if the model binds each word to its noun.
SHARED_COLORS = tuple(c for c in OBJECT_COLORS if c in BACKGROUND_COLORS)


def sample_scene(
    rng: np.random.Generator, size: int = 64, static_prob: float = 0.15, confusable_prob: float = 0.0
) -> Scene:
    """A random training scene; never one of `TEST_SCENES` (redrawn until it is not). With
    probability `confusable_prob` the object and the background take two different colours
    of `SHARED_COLORS` ("a red circle ... on a striped blue background"), the captions whose
    colour words only their position tells apart."""
    confusable = confusable_prob > 0 and rng.random() < confusable_prob
    while True:
        s = _draw_scene(rng, size, static_prob)
        if confusable:
            obj, bg = rng.choice(len(SHARED_COLORS), size=2, replace=False)
            s.color, s.bg_color = SHARED_COLORS[obj], SHARED_COLORS[bg]
            s.mention_background = True
        if s.full_caption() not in TEST_CAPTIONS:
            return s


def _draw_scene(rng: np.random.Generator, size: int, static_prob: float) -> Scene:
    direction = None if rng.random() < static_prob else DIRECTIONS[rng.integers(len(DIRECTIONS))]
    half = float(rng.uniform(0.12, 0.19) * size)
    # Centre at mid clip: anywhere for moving objects (the frame wraps around), fully inside
    # the frame for static ones.
    if direction is None:
        lo, hi = half, size - half
    else:
        lo, hi = 0.0, float(size)
    cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    return Scene(
        color=list(OBJECT_COLORS)[rng.integers(len(OBJECT_COLORS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        direction=direction,
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        bg_color=list(BACKGROUND_COLORS)[rng.integers(len(BACKGROUND_COLORS))],
        speed=float(rng.uniform(3.0, 5.0) * size / 64.0),
        size=half,
        center=(cx, cy),
        phase=int(rng.integers(0, 16)),
        mention_background=bool(rng.random() > 0.1),
    )


def _background(scene: Scene, size: int) -> np.ndarray:
    dark, light = (np.array(c, dtype=np.float32) / 255.0 for c in BACKGROUND_COLORS[scene.bg_color])
    yy, xx = np.mgrid[0:size, 0:size]
    cell = max(size // 8, 2)
    if scene.pattern == "plain":
        mask = np.zeros((size, size), dtype=bool)
    elif scene.pattern == "striped":
        mask = ((xx + scene.phase) // cell) % 2 == 1
    else:
        mask = (((xx + scene.phase) // cell) + ((yy + scene.phase) // cell)) % 2 == 1
    img = np.where(mask[..., None], light, dark)
    return img.astype(np.float32)


def _coverage(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (negative inside)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        sd = np.sqrt(dx * dx + dy * dy) - half
    elif shape == "square":
        sd = np.maximum(np.abs(dx), np.abs(dy)) - half * 0.85
    else:
        # Upward-pointing triangle as the intersection of three half-planes.
        r = half * 1.25
        s60 = math.sqrt(3.0) / 2.0
        ty = dy - r * 0.15
        e1 = ty - r * 0.5  # bottom edge
        e2 = s60 * dx - 0.5 * ty - r * 0.5  # right edge
        e3 = -s60 * dx - 0.5 * ty - r * 0.5  # left edge
        sd = np.maximum(e1, np.maximum(e2, e3))
    return np.clip(0.5 - sd, 0.0, 1.0)


def _coverage_wrapped(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """Coverage on a torus: the centre taken modulo the frame, the shape drawn again one frame
    width / height away wherever it crosses an edge."""
    cx, cy = cx % size, cy % size
    cov = _coverage(shape, cx, cy, half, size)
    reach = 1.3 * half + 1.0  # the triangle reaches furthest (1.25 half + antialiasing)
    for ox in (-size, 0, size):
        for oy in (-size, 0, size):
            if (ox, oy) == (0, 0):
                continue
            x, y = cx + ox, cy + oy
            if -reach < x < size + reach and -reach < y < size + reach:
                cov = np.maximum(cov, _coverage(shape, x, y, half, size))
    return cov


def render(scene: Scene, num_frames: int, size: int = 64, masks: list | None = None) -> np.ndarray:
    """Frames as float32 [T, H, W, 3] in [0, 1]; object coverage per frame appended to masks."""
    bg = _background(scene, size)
    color = np.array(OBJECT_COLORS[scene.color], dtype=np.float32) / 255.0
    vx, vy = DIRECTION_VECTORS[scene.direction] if scene.direction else (0.0, 0.0)
    mid = (num_frames - 1) / 2.0
    frames = np.empty((num_frames, size, size, 3), dtype=np.float32)
    for t in range(num_frames):
        cx = scene.center[0] + vx * scene.speed * (t - mid)
        cy = scene.center[1] + vy * scene.speed * (t - mid)
        cov = _coverage_wrapped(scene.shape, cx, cy, scene.size, size)[..., None]
        if masks is not None:
            masks.append(cov[..., 0])
        frames[t] = bg * (1.0 - cov) + color * cov
    return frames


def sample_clip(rng: np.random.Generator, num_frames: int, size: int = 64) -> tuple[np.ndarray, str, Scene]:
    scene = sample_scene(rng, size)
    return render(scene, num_frames, size), scene.caption(), scene


def batch(
    rng: np.random.Generator,
    batch_size: int,
    num_frames: int,
    size: int = 64,
    with_masks: bool = False,
    confusable_prob: float = 0.0,
):
    """Returns (video [B, 3, T, H, W] float32 in [-1, 1], captions[, masks [B, T, H, W]])."""
    vids, caps, ms = [], [], []
    for _ in range(batch_size):
        scene = sample_scene(rng, size, confusable_prob=confusable_prob)
        m: list = []
        v = render(scene, num_frames, size, m)
        vids.append(v.transpose(3, 0, 1, 2) * 2.0 - 1.0)
        caps.append(scene.caption())
        ms.append(np.stack(m))
    out = (np.stack(vids).astype(np.float32), caps)
    if with_masks:
        return (*out, np.stack(ms).astype(np.float32))
    return out


def colour_word_roles(caption: str) -> list[tuple[int, int]]:
    """(word index, role) of the colour words of a caption of this grammar: role 0 = the
    object's colour, 1 = the background's. The tokenizer is word-level, so a word index is
    its token position."""
    words = caption.split()
    if len(words) < 3:
        return []
    roles = [(2 if words[1] == "static" else 1, 0)]
    if words[-1] == "background":
        roles.append((len(words) - 2, 1))
    return roles


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/work/tiny-ckpt/data_sheet.png")
    ap.add_argument("--clips", type=int, default=6)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from PIL import Image

    rng = np.random.default_rng(args.seed)
    rows = []
    for _ in range(args.clips):
        v, cap, _ = sample_clip(rng, args.frames)
        print(cap)
        rows.append(np.concatenate(list(v), axis=1))
    sheet = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    Image.fromarray(sheet).save(args.out)
    print("vocabulary:", len(vocabulary()), vocabulary())


if __name__ == "__main__":
    _main()


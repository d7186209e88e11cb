"""The synthetic task: one filled shape on a white or light-gray background, and three questions about it.

Every image is a pure function of (seed, index), so training and evaluation sets are reproducible and disjoint
when their seeds differ.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (255, 140, 0),
}
BACKGROUNDS = ("white", "gray")

# The three questions the task fixes, and their answers as templates.
QUESTIONS = {
    "shape": "What shape is in the image?",
    "color": "What color is the shape?",
    "describe": "Describe the image.",
}
# Other phrasings seen in training only, so that the three fixed ones are not the only strings that work.
PARAPHRASES = {
    "shape": ("Which shape is shown?", "What is the shape in this picture?", "Name the shape."),
    "color": ("What color is it?", "Which color does the shape have?", "What is the color of the shape?"),
    "describe": ("Describe this picture.", "What do you see?", "Describe the image briefly."),
}

MIN_SIDE, MAX_SIDE = 64, 1024
# Sides are drawn independently, then the long side is cut to this ratio: the model sees every image squashed
# to a square, and past 2:1 a shape of 25% of the short side loses its outline in the squash.
MAX_ASPECT = 2.0
MIN_SIZE, MAX_SIZE = 0.25, 0.70
# Squares and diamonds turn at most this much: a square turned 45 degrees is a diamond.
SMALL_TURN = 20.0
# A diamond is a rhombus this much narrower than tall, so it differs from a square at any turn.
DIAMOND_WIDTH = 0.6
COLOR_JITTER = 15


def answer(question: str, shape: str, color: str, background: str) -> str:
    if question == "shape":
        return f"A {shape}."
    if question == "color":
        return f"It is {color}."
    return f"A {color} {shape} on a {background} background."


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    shape: str
    color: str
    background: str


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of `shape` around (0, 0), fitting the unit circle (diameter 1 = the shape's size)."""
    r = 0.5
    if shape == "square":
        h = r / math.sqrt(2)
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "diamond":
        return [(0, -r), (r * DIAMOND_WIDTH, 0), (0, r), (-r * DIAMOND_WIDTH, 0)]
    if shape == "triangle":
        return [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    if shape == "star":
        points = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.42
            points.append((rr * math.cos(a), rr * math.sin(a)))
        return points
    if shape == "cross":
        # A plus sign whose arms are a third of its width; its corners touch the unit circle.
        a = r / math.hypot(1.0, 1.0 / 3.0)
        t = a / 3.0
        return [
            (-t, -a),
            (t, -a),
            (t, -t),
            (a, -t),
            (a, t),
            (t, t),
            (t, a),
            (-t, a),
            (-t, t),
            (-a, t),
            (-a, -t),
            (-t, -t),
        ]
    raise ValueError(f"not a polygon shape: {shape}")


def _turn(shape: str, rng: random.Random) -> float:
    if shape == "circle":
        return 0.0
    if shape in ("square", "diamond"):
        return rng.uniform(-SMALL_TURN, SMALL_TURN)
    return rng.uniform(0.0, 360.0)


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in rgb)


def _image_size(rng: random.Random) -> tuple[int, int]:
    w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    if w > h * MAX_ASPECT:
        w = int(h * MAX_ASPECT)
    elif h > w * MAX_ASPECT:
        h = int(w * MAX_ASPECT)
    return w, h


def _extreme_size(rng: random.Random, aspect: tuple[float, float]) -> tuple[int, int]:
    """Long side / short side drawn from `aspect`, either side the long one, the long side at most MAX_SIDE."""
    ratio = rng.uniform(*aspect)
    short = rng.randint(MIN_SIDE, max(MIN_SIDE, int(MAX_SIDE / ratio)))
    long = min(MAX_SIDE, round(short * ratio))
    return (long, short) if rng.random() < 0.5 else (short, long)


def make_sample(seed: int, index: int, aspect: tuple[float, float] | None = None) -> Sample:
    """The `index`-th image of the set `seed`: shape, color and background uniform, size and place random.
    `aspect` (lowest, highest long/short side ratio) draws images beyond the training set's 2:1, for measuring."""
    rng = random.Random(f"llama3v-shapes/{seed}/{index}")
    shape, color, background = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(BACKGROUNDS)
    w, h = _image_size(rng) if aspect is None else _extreme_size(rng, aspect)
    bg = (255, 255, 255) if background == "white" else (rng.randint(200, 225),) * 3
    image = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(image)
    size = rng.uniform(MIN_SIZE, MAX_SIZE) * min(w, h)
    cx = rng.uniform(size / 2, w - size / 2)
    cy = rng.uniform(size / 2, h - size / 2)
    fill = _jitter(COLORS[color], rng)
    if shape == "circle":
        draw.ellipse([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], fill=fill)
    else:
        turn = math.radians(_turn(shape, rng))
        c, s = math.cos(turn), math.sin(turn)
        points = [(cx + size * (x * c - y * s), cy + size * (x * s + y * c)) for x, y in _polygon(shape)]
        draw.polygon(points, fill=fill)
    return Sample(image, shape, color, background)


def question_for(kind: str, rng: random.Random | None = None, paraphrase_rate: float = 0.0) -> str:
    """The fixed question of `kind`, or (in training, with probability `paraphrase_rate`) another phrasing."""
    if rng is not None and rng.random() < paraphrase_rate:
        return rng.choice(PARAPHRASES[kind])
    return QUESTIONS[kind]

"""Deterministic scenes of coloured shapes: the images, captions and question-answer pairs of the demo.

A scene is 1-3 shapes (circle, square, triangle) in five colours (red, green, blue, yellow, purple),
each in its own cell of a 3 x 3 grid over a 64 x 64 image:

    top left      top      top right
    left          center   right
    bottom left   bottom   bottom right

Nuisances the model has to see through: shape size (13-19 px), a few pixels of jitter around the
cell centre, a random rotation of triangles' apex (up / down), colour jitter, a tinted background
and pixel noise. Shapes are drawn at 4x and downsampled (anti-aliased edges).

Text, all lower case:

* caption (learned, and one of the references): the shapes in reading order (row by row, left to
  right) with their places, e.g. "a red circle at the top left and a blue square in the center.";
* two more references for CIDEr: "two shapes: a red circle and a blue square." and "an image of a
  red circle and a blue square.";
* questions whose answers are one or two words: "how many shapes are there?" (one / two / three),
  "how many red shapes are there?" (zero .. three), "is there a triangle?" (yes / no), "what color
  is the circle?" (when there is one circle), "what shape is the red one?" (when one shape is red),
  "where is the red circle?" (when there is one: "top left", "center", ...).

Everything is a function of (seed, split, index): `scene(seed, split, index)` makes the same scene
and `render(scene)` the same pixels on every machine. The train and held-out splits draw from
different random streams, so no held-out image is ever seen in training (a held-out scene can still
have the same layout as some training scene, with other sizes, jitter, colours and noise; the demo
reports how many do).

`write_dataset` writes the whole demo dataset (see its docstring): PNGs, LLaVA JSON for the caption
stage and for the instruction (SFT) stage, a text corpus of captions for the language model, and
the held-out evaluation file.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

IMAGE_SIZE = 64
GRID = 3
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (235, 200, 25),
          "purple": (145, 55, 185)}
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# How a place is said inside a sentence.
PLACE_PHRASES = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
                 "left": "on the left", "center": "in the center", "right": "on the right",
                 "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right"}
NUMBER_WORDS = ("zero", "one", "two", "three")
MAX_SHAPES = 3

CAPTION_PROMPT = "describe the image."
TRAIN_SPLIT = "train"
HELDOUT_SPLIT = "heldout"


@dataclass(frozen=True)
class Shape:
    kind: str
    """One of SHAPES."""
    color: str
    """A key of COLORS."""
    cell: int
    """Grid cell 0..8, row-major (PLACES[cell] names it)."""
    size: int
    """Side of the bounding box in pixels."""
    dx: int
    """Offset of the centre from the cell centre, pixels."""
    dy: int
    pointing_up: bool = True
    """Triangles only: apex up or down."""

    @property
    def place(self) -> str:
        return PLACES[self.cell]

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    """In reading order (ascending cell)."""
    background: tuple[int, int, int]
    color_jitter: tuple[tuple[int, int, int], ...]
    """Per shape: added to its RGB colour."""
    noise_seed: int

    def count(self, color: str | None = None, kind: str | None = None) -> int:
        return sum((color is None or s.color == color) and (kind is None or s.kind == kind) for s in self.shapes)

    @property
    def layout(self) -> str:
        """What the scene shows, without the nuisances: two scenes with the same layout have the same caption."""
        return "; ".join(f"{s.name}@{s.place}" for s in self.shapes)


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The random stream of one scene (Python seeds strings through SHA-512: stable across runs and machines)."""
    return random.Random(f"titanmm-demo-shapes/{seed}/{split}/{index}")


def make_scene(seed: int, split: str, index: int) -> Scene:
    rng = scene_rng(seed, split, index)
    n = rng.randint(1, MAX_SHAPES)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    shapes = tuple(Shape(kind=rng.choice(SHAPES), color=rng.choice(list(COLORS)), cell=cell, size=rng.randint(13, 19),
                         dx=rng.randint(-2, 2), dy=rng.randint(-2, 2), pointing_up=rng.random() < 0.5)
                   for cell in cells)
    base = rng.randint(215, 250)
    background = tuple(min(255, base + rng.randint(-8, 8)) for _ in range(3))
    jitter = tuple(tuple(rng.randint(-20, 20) for _ in range(3)) for _ in shapes)
    return Scene(shapes, background, jitter, rng.randrange(2**31))


def render(scene: Scene) -> Image.Image:
    """The scene as a 64 x 64 RGB image."""
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), scene.background)
    draw = ImageDraw.Draw(canvas)
    cell_size = IMAGE_SIZE / GRID
    for shape, jitter in zip(scene.shapes, scene.color_jitter):
        row, col = divmod(shape.cell, GRID)
        cx = (col + 0.5) * cell_size + shape.dx
        cy = (row + 0.5) * cell_size + shape.dy
        half = shape.size / 2
        box = [(cx - half) * k, (cy - half) * k, (cx + half) * k, (cy + half) * k]
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[shape.color], jitter))
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            inset = shape.size * 0.08 * k  # a square of the same area feel as the circle
            draw.rectangle([box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset], fill=fill)
        else:
            x0, y0, x1, y1 = box
            apex, base = (y0, y1) if shape.pointing_up else (y1, y0)
            draw.polygon([((x0 + x1) / 2, apex), (x0, base), (x1, base)], fill=fill)
    image = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    noise = np.random.default_rng(scene.noise_seed).integers(-6, 7, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

def object_list(scene: Scene) -> str:
    """The scene as a plain list, "red circle top left, blue square center": what the language model reads in
    its stage-0 text where the image will be later (see titanmm/demo/run.py)."""
    return ", ".join(f"{s.name} {s.place}" for s in scene.shapes)


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """The learned caption: every shape with its place, in reading order."""
    return _join([f"a {s.name} {PLACE_PHRASES[s.place]}" for s in scene.shapes]) + "."


def references(scene: Scene) -> list[str]:
    """Reference captions for CIDEr: the caption and two other phrasings."""
    names = [f"a {s.name}" for s in scene.shapes]
    n = len(scene.shapes)
    return [caption(scene), f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {_join(names)}.",
            f"an image of {_join(names)}."]


def questions(scene: Scene, rng: random.Random, max_questions: int = 4) -> list[tuple[str, str]]:
    """Up to `max_questions` (question, answer) pairs of different kinds, drawn with `rng`."""
    pool: list[tuple[str, str]] = [("how many shapes are there?", NUMBER_WORDS[len(scene.shapes)])]
    color = rng.choice(list(COLORS))
    pool.append((f"how many {color} shapes are there?", NUMBER_WORDS[scene.count(color=color)]))
    # "is there a ...?": as often yes as no where the scene allows it.
    present = sorted({s.kind for s in scene.shapes})
    absent = [k for k in SHAPES if k not in present]
    kind = rng.choice(present if (not absent or rng.random() < 0.5) else absent)
    pool.append((f"is there a {kind}?", "yes" if kind in present else "no"))
    unique_kinds = [k for k in SHAPES if scene.count(kind=k) == 1]
    if unique_kinds:
        kind = rng.choice(unique_kinds)
        pool.append((f"what color is the {kind}?", next(s.color for s in scene.shapes if s.kind == kind)))
    unique_colors = [c for c in COLORS if scene.count(color=c) == 1]
    if unique_colors:
        color = rng.choice(unique_colors)
        pool.append((f"what shape is the {color} one?", next(s.kind for s in scene.shapes if s.color == color)))
    unique_names = [s for s in scene.shapes if scene.count(color=s.color, kind=s.kind) == 1]
    if unique_names:
        shape = rng.choice(unique_names)
        pool.append((f"where is the {shape.name}?", shape.place))
    rng.shuffle(pool)
    return pool[:max_questions]


# ----------------------------------------------------------------------------------------------
# Dataset files
# ----------------------------------------------------------------------------------------------

@dataclass
class DemoDataset:
    """Paths and sizes of a dataset written by `write_dataset`."""

    root: Path
    images: Path
    caption_json: Path
    sft_json: Path
    lm_text: Path
    heldout_json: Path
    num_train: int
    num_heldout: int
    heldout_layouts_seen_in_train: float
    """Fraction of held-out scenes whose layout (hence caption) also occurs among the training scenes."""

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def sft_conversation(scene: Scene, rng: random.Random, num_questions: int) -> list[dict]:
    """LLaVA turns: the questions and, at a random position, the caption request; the image comes first."""
    pairs = questions(scene, rng, num_questions)
    pairs.insert(rng.randint(0, len(pairs)), (CAPTION_PROMPT, caption(scene)))
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def write_dataset(root: str | Path, num_train: int, num_heldout: int, seed: int = 0, questions_per_image: int = 3,
                  progress: bool = True) -> DemoDataset:
    """Write the demo dataset under `root`:

    - `images/{split}-{index:06d}.png`;
    - `caption.json`: LLaVA records for caption pretraining (stage 1), one per training image:
      human "<image>" (the image alone, LLaVA's "plain" pretraining format), gpt = caption;
    - `sft.json`: LLaVA records for instruction tuning (stage 2), one per training image: the caption
      request and `questions_per_image` questions in one multi-turn conversation;
    - `lm_text.jsonl`: the language model's text corpus (stage 0), documents {"text": ...} laid out as the
      "plain" chat template lays out the image samples, with the object list where the image goes: per
      training image "{objects}\n{caption}" and, per turn of its conversation, "{objects}\n{question}\n{answer}";
    - `heldout.json`: per held-out image {"id", "image", "layout", "references": [3 captions],
      "questions": [{"question", "answer"}, ...]} (all questions of `questions(..., max_questions=6)`).
    """
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    caption_records, sft_records, lm_lines, heldout = [], [], [], []
    train_layouts = set()
    jobs = [(TRAIN_SPLIT, i) for i in range(num_train)] + [(HELDOUT_SPLIT, i) for i in range(num_heldout)]
    for split, index in tqdm(jobs, desc="Rendering scenes", unit="image", disable=not progress):
        scene = make_scene(seed, split, index)
        name = f"{split}-{index:06d}.png"
        render(scene).save(images / name, optimize=False, compress_level=1)
        key = f"{split}-{index:06d}"
        text_rng = scene_rng(seed, split + "/text", index)
        if split == TRAIN_SPLIT:
            train_layouts.add(scene.layout)
            caption_records.append({"id": key, "image": name, "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene)}]})
            sft_records.append({"id": key, "image": name,
                                "conversations": sft_conversation(scene, text_rng, questions_per_image)})
            objects = object_list(scene)
            lm_lines.append(json.dumps({"text": f"{objects}\n{caption(scene)}"}))
            turns = sft_records[-1]["conversations"]
            for question, answer in zip(turns[0::2], turns[1::2]):
                question_text = question["value"].removeprefix("<image>\n")
                lm_lines.append(json.dumps({"text": f"{objects}\n{question_text}\n{answer['value']}"}))
        else:
            heldout.append({"id": key, "image": name, "layout": scene.layout, "references": references(scene),
                            "questions": [{"question": q, "answer": a}
                                          for q, a in questions(scene, text_rng, max_questions=6)]})
    paths = {"caption_json": root / "caption.json", "sft_json": root / "sft.json", "lm_text": root / "lm_text.jsonl",
             "heldout_json": root / "heldout.json"}
    paths["caption_json"].write_text(json.dumps(caption_records))
    paths["sft_json"].write_text(json.dumps(sft_records))
    paths["lm_text"].write_text("\n".join(lm_lines) + "\n")
    paths["heldout_json"].write_text(json.dumps(heldout, indent=1))
    seen = sum(h["layout"] in train_layouts for h in heldout) / max(1, len(heldout))
    return DemoDataset(root=root, images=images, num_train=num_train, num_heldout=num_heldout,
                       heldout_layouts_seen_in_train=seen, **paths)

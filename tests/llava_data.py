"""A small LLaVA-style dataset for tests: generated PNGs (32-64 px) + a LLaVA JSON, converted with
`titanmm.data.convert_llava` (WebDataset shards + `energon prepare`).

Records (keys `s00` ... `s11`): single-image conversations (two of them multi-turn, one without an `<image>`
placeholder), two-image conversations, text-only conversations, and two records whose PNG is truncated
(kept by `verify_images=False`, so the loader skips them as "corrupt_image"): s05 and s11, one in each half
of the records, so two data-parallel ranks that split the records in halves each get five good samples.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
CORRUPT_KEYS = ("s05", "s11")


def conversation(*pairs) -> list[dict]:
    turns = []
    for human, gpt in pairs:
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return turns


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(COLOURS.items()):
        size = (32 + 8 * i, 64 - 8 * i)  # different aspect ratios (tiling picks different grids)
        image = Image.new("RGB", size, (255, 255, 255))
        image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), rgb), (size[0] // 4, size[1] // 4))
        image.save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes((folder / "red.png").read_bytes()[:60])


def records() -> list[dict]:
    """Twelve LLaVA records (see the module docstring)."""
    out = []
    colours = list(COLOURS)
    for i in range(12):
        key = f"s{i:02d}"
        a, b = colours[i % 4], colours[(i + 1) % 4]
        if key in CORRUPT_KEYS:
            out.append({"id": key, "image": "broken.png", "conversations": conversation(
                ("<image>\nWhat colour is the square?", "It cannot be seen."))})
        elif i % 4 == 0:
            out.append({"id": key, "image": f"{a}.png", "conversations": conversation(
                ("<image>\nWhat colour is the square?", f"The square is {a}."), ("Are you sure?", "Yes."))})
        elif i % 4 == 1:
            out.append({"id": key, "image": [f"{a}.png", f"{b}.png"], "conversations": conversation(
                ("First: <image>\nSecond: <image>\nWhich colours are they?", f"{a.title()} and then {b}."))})
        elif i % 4 == 2:
            out.append({"id": key, "conversations": conversation((f"Name a colour like {a}.", f"{b.title()}."))})
        else:
            out.append({"id": key, "image": f"{a}.png", "conversations": conversation(
                ("Describe the picture.", f"A {a} square on white."))})
    return out


def write_llava_dataset(root: Path, shard_size: int = 3) -> Path:
    """Images + llava.json under `root`, converted to the prepared energon dataset `root / "energon"`."""
    from titanmm.data.convert_llava import convert

    write_images(root / "images")
    (root / "llava.json").write_text(json.dumps(records()))
    convert(root / "llava.json", root / "images", root / "energon", shard_size=shard_size, verify_images=False,
            num_workers=1, progress=False)
    return root / "energon"


def good_keys() -> set[str]:
    return {r["id"] for r in records() if r["id"] not in CORRUPT_KEYS}

"""The demo's scene generator: deterministic, splits disjoint, text consistent with the scene."""

from __future__ import annotations

import json
import random

import numpy as np

from titanmm.demo.shapes import (COLORS, HELDOUT_SPLIT, IMAGE_SIZE, NUMBER_WORDS, SHAPES, TRAIN_SPLIT, caption,
                                 make_scene, questions, references, render, write_dataset)


def test_scenes_are_deterministic_and_splits_differ():
    a, b = make_scene(0, TRAIN_SPLIT, 7), make_scene(0, TRAIN_SPLIT, 7)
    assert a == b
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert render(a).size == (IMAGE_SIZE, IMAGE_SIZE) and render(a).mode == "RGB"
    train = [make_scene(0, TRAIN_SPLIT, i) for i in range(50)]
    heldout = [make_scene(0, HELDOUT_SPLIT, i) for i in range(50)]
    assert train != heldout and make_scene(1, TRAIN_SPLIT, 7) != a


def test_text_matches_the_scene():
    for index in range(200):
        scene = make_scene(3, TRAIN_SPLIT, index)
        assert 1 <= len(scene.shapes) <= 3 and [s.cell for s in scene.shapes] == sorted({s.cell for s in scene.shapes})
        text = caption(scene)
        assert text.endswith(".") and all(f"{s.color} {s.kind}" in text for s in scene.shapes)
        assert len(references(scene)) == 3 and references(scene)[0] == text
        for question, answer in questions(scene, random.Random(index), max_questions=6):
            if question == "how many shapes are there?":
                assert answer == NUMBER_WORDS[len(scene.shapes)]
            elif question.startswith("how many "):
                color = question.split()[2]
                assert answer == NUMBER_WORDS[scene.count(color=color)]
            elif question.startswith("is there a "):
                kind = question.removeprefix("is there a ").rstrip("?")
                assert answer == ("yes" if scene.count(kind=kind) else "no")
            elif question.startswith("what color is the "):
                kind = question.split()[-1].rstrip("?")
                assert scene.count(kind=kind) == 1 and answer in COLORS
                assert next(s.color for s in scene.shapes if s.kind == kind) == answer
            elif question.startswith("what shape is the "):
                color = question.split()[4]
                assert answer in SHAPES and next(s.kind for s in scene.shapes if s.color == color) == answer
            else:
                color, kind = question.removeprefix("where is the ").rstrip("?").split()
                assert next(s.place for s in scene.shapes if (s.color, s.kind) == (color, kind)) == answer


def test_write_dataset(tmp_path):
    data = write_dataset(tmp_path, num_train=12, num_heldout=4, progress=False)
    captions = json.loads(data.caption_json.read_text())
    sft = json.loads(data.sft_json.read_text())
    heldout = json.loads(data.heldout_json.read_text())
    assert len(captions) == len(sft) == 12 and len(heldout) == 4
    assert captions[0]["conversations"][0]["value"] == "<image>"
    turns = sft[0]["conversations"]
    assert turns[0]["value"].startswith("<image>\n") and [t["from"] for t in turns[:2]] == ["human", "gpt"]
    assert any(t["value"] == "describe the image." for t in turns)
    assert all((data.images / r["image"]).is_file() for r in captions + heldout)
    assert not {r["image"] for r in heldout} & {r["image"] for r in captions}
    lines = data.lm_text.read_text().splitlines()
    assert len(lines) == 12 + sum(len(r["conversations"]) // 2 for r in sft)
    assert all("\n" in json.loads(line)["text"] for line in lines)

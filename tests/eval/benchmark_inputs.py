"""Tiny synthetic benchmark inputs in each benchmark's own format, and a tiny VLM checkpoint, for the tests.

`write_task_inputs(task, root)` writes a few images plus the annotation file(s) (or a dataset saved with
`datasets.save_to_disk`) and returns the `eval.run_text_generation` arguments that read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def tiny_vlm_checkpoint(path: Path, seed: int = 0) -> Path:
    """The debug_vlm flavor (CLIP-like tower, 16 tokens per 32 px tile, shipped 2048-token tokenizer), saved."""
    from titanmm.checkpoint.format import save_model
    from titanmm.models import get_model_spec

    spec = get_model_spec("vlm")
    args = spec.flavors["debug_vlm"]
    model = spec.model_cls(args)
    model.init_weights(seed=seed)
    save_model(model, path, "vlm", args, tokenizer="")
    return path


def image(seed: int, size: tuple[int, int] = (48, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _save(folder: Path, name: str, seed: int, size=(48, 36)) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image(seed, size).save(path)
    return name


def _json(path: Path, obj, jsonl: bool = False) -> str:
    path.write_text("\n".join(json.dumps(o) for o in obj) if jsonl else json.dumps(obj))
    return str(path)


def write_task_inputs(task: str, root: Path) -> list[str]:
    """Inputs of `task` under `root`; returns the --input-image-path / --gt-path / ... arguments."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    images.mkdir(exist_ok=True)
    return _WRITERS[task](root, images)


def _captioning(root: Path, images: Path) -> list[str]:
    # Karpathy split JSON (dataset_coco.json): COCO file names under filepath, one train image to skip.
    entries = []
    for n, (split, cocoid) in enumerate([("test", 391895), ("test", 522418), ("train", 184613), ("test", 318219)]):
        name = f"COCO_val2014_{cocoid:012d}.jpg"
        _save(images / "val2014", name, n)
        entries.append({"filepath": "val2014", "filename": name, "imgid": n, "split": split, "cocoid": cocoid,
                        "sentences": [{"raw": f"a picture number {n} of a red thing"},
                                      {"raw": "a small photo of some colours"}]})
    gt = _json(root / "dataset_coco.json", {"images": entries, "dataset": "coco"})
    return ["--input-image-path", str(images), "--gt-path", gt]


def _textvqa(root: Path, images: Path, count: int = 5) -> list[str]:
    data = []
    for n in range(count):
        image_id = f"{n:04x}a8ae2ef43b90"
        _save(images, image_id + ".jpg", 10 + n)
        data.append({"question": f"what is written on sign {n}?", "image_id": image_id, "question_id": 34602 + n,
                     "answers": ["stop"] * 7 + ["go"] * 3, "image_width": 48, "image_height": 36})
    gt = _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_type": "val", "data": data})
    return ["--input-image-path", str(images), "--gt-path", gt]


def _vqav2(root: Path, images: Path) -> list[str]:
    questions, annotations = [], []
    for n, image_id in enumerate([42, 73, 74]):
        _save(images / "val2014", f"COCO_val2014_{image_id:012d}.jpg", 20 + n)
        questions.append({"image_id": image_id, "question": f"How many cats are there {n}?",
                          "question_id": image_id * 1000})
        annotations.append({"question_id": image_id * 1000, "image_id": image_id, "question_type": "how many",
                            "answer_type": "number", "multiple_choice_answer": "2",
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, a in enumerate(["2"] * 8 + ["two", "3"])]})
    q = _json(root / "v2_OpenEnded_mscoco_val2014_questions.json",
              {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "questions": questions})
    a = _json(root / "v2_mscoco_val2014_annotations.json", {"data_subtype": "val2014", "annotations": annotations})
    return ["--input-image-path", str(images), "--question-path", q, "--gt-path", a]


def _chartqa(root: Path, images: Path) -> list[str]:
    rows = [{"imgname": _save(images, f"{4169905100534 + n}.png", 30 + n, (64, 40)),
             "query": f"What is the value of bar {n}?", "label": str(10 + n)} for n in range(3)]
    return ["--input-image-path", str(images), "--gt-path", _json(root / "test_human.json", rows)]


def _spdocvqa(root: Path, images: Path) -> list[str]:
    data = [{"questionId": 49153 + n, "question": f"What is the date {n}?", "question_types": ["handwritten"],
             "image": "documents/" + _save(images / "documents", f"ppwn0224_{n}.png", 40 + n),
             "docId": 14465, "ucsf_document_id": "ppwn0224", "ucsf_document_page_no": "1",
             "answers": ["1/8/93", "January 8, 1993"], "data_split": "val"} for n in range(3)]
    gt = _json(root / "val_v1.0_withQT.json", {"dataset_name": "SP-DocVQA", "dataset_version": "1.0",
                                               "dataset_split": "val", "data": data})
    return ["--input-image-path", str(images), "--gt-path", gt]


def _infovqa(root: Path, images: Path) -> list[str]:
    data = [{"questionId": 65718 + n, "question": f"Which year is shown {n}?", "image_local_name": _save(
        images, f"{38502 + n}.jpeg", 50 + n), "image_url": "https://example.org/x.jpg",
        "ocr_output_file": "x.json", "answers": ["2014"], "data_split": "val"} for n in range(3)]
    gt = _json(root / "infographicsVQA_val_v1.0_withQT.json", {"dataset_name": "infographicVQA", "data": data})
    return ["--input-image-path", str(images), "--gt-path", gt]


def _ai2d(root: Path, images: Path) -> list[str]:
    rows = [{"question_id": n, "image": "ai2d/abc_images/" + _save(images, f"{1000 + n}.png", 60 + n),
             "question": f"Which stage comes first {n}?\nA. egg\nB. larva\nC. pupa\nD. adult\n"
                         "Answer with the option's letter from the given choices directly.", "answer": "A"}
            for n in range(3)]
    return ["--input-image-path", str(images), "--gt-path", _json(root / "test_vlmevalkit.jsonl", rows, jsonl=True)]


def _ocrbench(root: Path, images: Path) -> list[str]:
    kinds = [("IIIT5K", "Regular Text Recognition"), ("HME100k", "Handwritten Mathematical Expression Recognition"),
             ("docVQA", "Doc-oriented VQA")]
    rows = [{"dataset_name": name, "id": n, "image_path": f"{name}/" + _save(images / name, f"{n}.jpg", 70 + n),
             "question": "what is written in the image?", "answers": ["stop"] if n != 2 else "x", "type": kind}
            for n, (name, kind) in enumerate(kinds)]
    return ["--input-image-path", str(images), "--gt-path", _json(root / "OCRBench.json", rows)]


def _mathvista(root: Path, images: Path) -> list[str]:
    import datasets

    rows = [
        dict(pid="1", question="When a spring does work on an object, we cannot find the work by simply multiplying "
             "the spring force by the object's displacement. Is this statement correct?",
             query="Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
                   "end.\nQuestion: Is this statement correct?\nChoices:\n(A) yes\n(B) no",
             choices=["yes", "no"], answer="no", question_type="multi_choice", answer_type="text", precision=None),
        dict(pid="2", question="What is the total volume of the measuring cup?",
             query="Hint: Please answer the question requiring an integer answer and provide the final value, "
                   "e.g., 1, 2, 3, at the end.\nQuestion: What is the total volume of the measuring cup?",
             choices=None, answer="1000", question_type="free_form", answer_type="integer", precision=None),
        dict(pid="3", question="What is the slope?", query="Hint: Please answer the question requiring a "
             "floating-point number with two decimal places.\nQuestion: What is the slope?", choices=None,
             answer="1.25", question_type="free_form", answer_type="float", precision=2.0),
    ]
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    columns["decoded_image"] = [image(80 + n) for n in range(len(rows))]
    columns["image"] = [f"images/{r['pid']}.jpg" for r in rows]
    features = datasets.Features({"pid": datasets.Value("string"), "question": datasets.Value("string"),
                                  "query": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.Value("string"), "question_type": datasets.Value("string"),
                                  "answer_type": datasets.Value("string"), "precision": datasets.Value("float64"),
                                  "decoded_image": datasets.Image(), "image": datasets.Value("string")})
    path = root / "MathVista"
    datasets.DatasetDict({"testmini": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(str(path))
    return ["--input-image-path", str(path)]


def _mmmu(root: Path, images: Path) -> list[str]:
    import datasets

    path = root / "MMMU"
    for subject, rows in {
        "Math": [("validation_Math_1", "<image 1> What is the value of x?", "['1', '2', '3', '4']", "B",
                  "multiple-choice"),
                 ("validation_Math_2", "Find the area of the figure in <image 1>.", "[]", "12", "open")],
        "Art": [("validation_Art_1", "Which period does the painting <image 1> belong to?",
                 "['Baroque', 'Rococo', 'Gothic']", "A", "multiple-choice")],
    }.items():
        columns = {"id": [r[0] for r in rows], "question": [r[1] for r in rows], "options": [r[2] for r in rows],
                   "explanation": [""] * len(rows), "image_1": [image(90 + n) for n in range(len(rows))],
                   "image_2": [None] * len(rows), "img_type": ["['Diagrams']"] * len(rows),
                   "answer": [r[3] for r in rows], "topic_difficulty": ["Easy"] * len(rows),
                   "question_type": [r[4] for r in rows], "subfield": ["Geometry"] * len(rows)}
        features = datasets.Features({k: datasets.Image() if k.startswith("image_") else datasets.Value("string")
                                      for k in columns})
        dataset = datasets.Dataset.from_dict(columns, features=features)
        datasets.DatasetDict({"validation": dataset}).save_to_disk(str(path / subject))
    return ["--input-image-path", str(path)]


def _realworldqa(root: Path, images: Path) -> list[str]:
    import datasets

    columns = {"image": [image(100 + n, (64, 48)) for n in range(3)],
               "question": [f"How many lanes does the road have {n}?\nA. 1\nB. 2\nC. 3\nPlease answer directly with "
                            "only the letter of the correct option and nothing else." for n in range(3)],
               "answer": ["B", "C", "A"]}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    path = root / "RealworldQA"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(str(path))
    return ["--input-image-path", str(path)]


_WRITERS = {"captioning": _captioning, "TextVQA": _textvqa, "VQAv2": _vqav2, "ChartQA": _chartqa,
            "SPDocVQA": _spdocvqa, "InfoVQA": _infovqa, "AI2D": _ai2d, "OCRBench": _ocrbench,
            "MathVista": _mathvista, "MMMU": _mmmu, "RealworldQA": _realworldqa}
NEEDS_DATASETS = ("MathVista", "MMMU", "RealworldQA")

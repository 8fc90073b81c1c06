"""`python -m eval.run_text_generation` end to end on a tiny random VLM: every task's official input format ->
predictions and ground truth that `eval.score` accepts; resuming; partitions; 2 data-parallel ranks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import titanmm
from eval import score
from eval.run_text_generation import build_parser, main, run
from eval.tasks import TASKS
from eval.tasks.captioning import load_caption_set
from eval.tasks.mathvista import extract_free_form
from eval.tasks.mmmu import rewrite_image_tags
from tests.eval.benchmark_inputs import NEEDS_DATASETS, image, tiny_vlm_checkpoint, write_task_inputs
from tests.utils import REPO, run_env

COMMON = ["--dtype", "fp32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def one_thread():
    # Two shared cores: OpenMP threads spinning against each other make a tiny model 30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    path = tiny_vlm_checkpoint(tmp_path_factory.mktemp("vlm") / "ckpt")
    return path, titanmm.load(path)


@pytest.fixture(scope="module")
def tokenizer():
    from titanmm.data.tokenizer import build_tokenizer

    return build_tokenizer("")


def _run(task, inputs, out, checkpoint, tokenizer, *extra):
    path, model = checkpoint
    args = build_parser().parse_args(["--task", task, "--checkpoint", str(path), "--output-path", str(out), *COMMON,
                                      *inputs, *extra])
    return run(args, model=model, tokenizer=tokenizer)


def _score_cli(task, result, capsys) -> dict:
    capsys.readouterr()
    assert score.main(["--task", task, "--predictions", result["predictions"], "--groundtruth",
                       result["groundtruth"], "--no-meteor"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("task", list(TASKS))
def test_task_end_to_end(task, tmp_path, checkpoint, tokenizer, capsys):
    if task in NEEDS_DATASETS:
        pytest.importorskip("datasets")
    inputs = write_task_inputs(task, tmp_path / "inputs")
    extra = ["--batch-size", "2", "--score", "--no-meteor"]
    if task == "ChartQA":  # 64 x 40 charts -> 2 tiles + a thumbnail
        extra += ["--use-tiling", "--max-num-tiles", "2", "--use-thumbnail"]
    if task == "AI2D":  # a chat template (the system prompt goes in) that the shipped tokenizer can render
        extra += ["--chat-template", "plain"]
    result = _run(task, inputs, tmp_path / "out", checkpoint, tokenizer, *extra)
    cli = _score_cli(task, result, capsys)
    assert cli == json.loads((tmp_path / "out" / f"{task}-scores.json").read_text()) == result["scores"]
    predictions = json.loads((tmp_path / "out" / f"{task}-predictions.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "out" / f"{task}-rank0.jsonl").read_text().splitlines()]
    assert len(records) == len(predictions) and all(isinstance(r[TASKS[task].output_key], str) for r in records)
    if task == "captioning":  # the Karpathy test images only, by COCO id
        assert [p["image_id"] for p in predictions] == [391895, 522418, 318219]
    if task == "MMMU":  # multiple-choice answers parsed into a letter, open answers kept
        assert predictions["validation_Math_1"] in "ABCD" and predictions["validation_Art_1"] in "ABC"
        assert cli["overall"]["num"] == 3
    if task == "ChartQA":
        assert records[0]["prompt"].endswith("Answer the question using a single word or phrase.")
        settings = json.loads((tmp_path / "out" / "ChartQA-settings.json").read_text())
        assert settings["image"]["tiling"] == "internvl" and settings["image"]["max_tiles"] == 2
    if task == "AI2D":
        settings = json.loads((tmp_path / "out" / "AI2D-settings.json").read_text())
        assert settings["chat_template"] == "plain"
        assert settings["system_prompt"] == "Follow the user's instruction and answer questions."
    if task == "MathVista":
        assert [p["pid"] for p in predictions] == ["1", "2", "3"] and predictions[0]["extraction"] in "AB"


def test_resume_after_kill(tmp_path, checkpoint, tokenizer, monkeypatch):
    import eval.run_text_generation as rtg

    inputs = write_task_inputs("TextVQA", tmp_path / "inputs")
    reference = json.loads(open(_run("TextVQA", inputs, tmp_path / "a", checkpoint, tokenizer,
                                     "--batch-size", "2")["predictions"]).read())
    generated = []
    original = rtg.generate_batch

    def counting_generate_batch(model, tok, items, config):
        generated.extend(index for index, _, _ in items)
        return original(model, tok, items, config)

    monkeypatch.setattr(rtg, "generate_batch", counting_generate_batch)
    # A run killed after two samples and in the middle of writing the third record.
    lines = (tmp_path / "a" / "TextVQA-rank0.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "TextVQA-rank0.jsonl").write_text("".join(lines[:2]) + lines[2][:25])
    (tmp_path / "b" / "TextVQA-settings.json").write_text((tmp_path / "a" / "TextVQA-settings.json").read_text())
    result = _run("TextVQA", inputs, tmp_path / "b", checkpoint, tokenizer, "--batch-size", "2")
    assert len(generated) == 3  # the two finished samples were not generated again
    assert json.loads(open(result["predictions"]).read()) == reference
    generated.clear()
    _run("TextVQA", inputs, tmp_path / "b", checkpoint, tokenizer, "--batch-size", "2")
    assert generated == []
    # Other generation settings into the same folder: refused, unless --overwrite.
    path, _ = checkpoint
    argv = ["--task", "TextVQA", "--checkpoint", str(path), "--output-path", str(tmp_path / "b"), *COMMON, *inputs,
            "--max-new-tokens", "3"]
    assert main(argv) == 2
    result = _run("TextVQA", inputs, tmp_path / "b", checkpoint, tokenizer, "--max-new-tokens", "3", "--overwrite")
    assert len(generated) == 5 and len(json.loads(open(result["predictions"]).read())) == 5


def test_partitions(tmp_path, checkpoint, tokenizer):
    inputs = write_task_inputs("TextVQA", tmp_path / "inputs")
    result = _run("TextVQA", inputs, tmp_path / "out", checkpoint, tokenizer, "--num-partitions", "2",
                  "--partition-id", "1")
    assert result["predictions"].endswith("TextVQA-partition1-predictions.json")
    # Megatron's bounds: int(linspace(0, 5, 3)) = [0, 2, 5] -> the second partition is samples 2..4.
    assert [p["question_id"] for p in json.loads(open(result["predictions"]).read())] == [34604, 34605, 34606]
    result = _run("TextVQA", inputs, tmp_path / "out2", checkpoint, tokenizer, "--num-samples-per-partition", "2")
    assert [p["question_id"] for p in json.loads(open(result["groundtruth"]).read())] == [34602, 34603]


def test_input_formats(tmp_path):
    # COCO captions format with an "images" list, and Flickr30k's Karpathy JSON (ids from the file names).
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("COCO_val2014_000000000042.jpg", "1000092795.jpg"):
        image(0).save(folder / name)
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}],
                                "annotations": [{"image_id": 42, "id": 1, "caption": "a cat"},
                                                {"image_id": 42, "id": 2, "caption": "a dog"}]}))
    (sample,) = load_caption_set(str(coco), str(folder))
    assert sample.id == 42 and sample.answer == ["a cat", "a dog"] and sample.images[0]().endswith("042.jpg")
    flickr = tmp_path / "dataset_flickr30k.json"
    flickr.write_text(json.dumps({"images": [{"filename": "1000092795.jpg", "imgid": 0, "split": "test",
                                              "sentences": [{"raw": "Two young guys."}]}], "dataset": "flickr30k"}))
    (sample,) = load_caption_set(str(flickr), str(folder))
    assert sample.id == 1000092795 and sample.answer == ["Two young guys."]
    # Megatron's MMMU image-tag heuristics and MathVista's rule-based extraction.
    assert rewrite_image_tags("<image 1> What is x?") == "What is x?"
    assert rewrite_image_tags("<image 1> shows a cat. What?") == "The image shows a cat. What?"
    assert rewrite_image_tags("What is in <image 1>?") == "What is in the image?"
    assert rewrite_image_tags("Look at this:<image 1> and <image 2>") == "Look at this in the image.  and "
    assert extract_free_form("The answer is 1,000.") == "1000"
    assert extract_free_form("12.5%") == "12.5"


@pytest.mark.slow
def test_two_data_parallel_ranks_match_one(tmp_path, checkpoint, tokenizer):
    path, _ = checkpoint
    inputs = write_task_inputs("TextVQA", tmp_path / "inputs")
    single = _run("TextVQA", inputs, tmp_path / "single", checkpoint, tokenizer, "--batch-size", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "eval.run_text_generation", "--task", "TextVQA", "--checkpoint", str(path),
           "--output-path", str(tmp_path / "dp"), "--batch-size", "2", *COMMON, *inputs]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ids = [[json.loads(line)["sample_id"] for line in (tmp_path / "dp" / f"TextVQA-rank{r}.jsonl").open()]
           for r in (0, 1)]
    assert ids == [[34602, 34604, 34606], [34603, 34605]]  # round-robin, disjoint
    for kind in ("predictions", "groundtruth"):
        assert (tmp_path / "dp" / f"TextVQA-{kind}.json").read_text() == open(single[kind]).read()

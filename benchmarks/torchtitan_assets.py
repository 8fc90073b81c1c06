"""The assets torchtitan's trainer reads, for a peer run with the real Llama 3 vocabulary.

    python benchmarks/torchtitan_assets.py OUT_DIR [--vocab-size 128256]

torchtitan sizes the embedding and output layers from its tokenizer (`vocab_size = tokenizer.get_vocab_size()`),
so a small stand-in tokenizer silently shrinks the model: with ../shared/peers' 8,003-word tokenizer the 8B proxy
loses 1.0 B of its 2.8 B parameters (and 16 GB of optimizer state, and the 128k-wide logits). This writes a
word-level tokenizer with exactly `--vocab-size` entries (Llama 3's 128,256 by default: the model titanmm trains
in the same comparison) as OUT_DIR/assets/{tokenizer.json,tokenizer_config.json}, and a text corpus whose words
cover the whole vocabulary as OUT_DIR/data/train.json (read as torchtitan's "c4_test" dataset).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<unk>")


def write_assets(out: Path, vocab_size: int = 128256, documents: int = 3000, words_per_document: int = 400) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab_size <= len(SPECIALS):
        raise ValueError(f"--vocab-size must exceed {len(SPECIALS)}, got {vocab_size}")
    (out / "assets").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "assets" / "tokenizer.json"))
    if tokenizer.get_vocab_size() != vocab_size:
        raise AssertionError(f"tokenizer has {tokenizer.get_vocab_size()} entries, wanted {vocab_size}")
    config = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "add_bos_token": True, "add_eos_token": False,
              "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "assets" / "tokenizer_config.json").write_text(json.dumps(config))
    rng = random.Random(0)
    with open(out / "data" / "train.json", "w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(words_per_document))}) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab-size", type=int, default=128256)
    args = parser.parse_args(argv)
    write_assets(args.out, args.vocab_size)
    print(f"wrote {args.out}/assets (vocabulary {args.vocab_size}) and {args.out}/data/train.json")


if __name__ == "__main__":
    main()

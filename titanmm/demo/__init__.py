"""The embedded demo: `python -m titanmm.demo` trains a small vision-language model from scratch on generated
scenes of coloured shapes (`shapes.py`) through titanmm's own pipeline - LLaVA JSON, energon, the trainer's
stages, generation and the benchmark scorers - and scores it on held-out images (`run.py`, `evaluate.py`)."""

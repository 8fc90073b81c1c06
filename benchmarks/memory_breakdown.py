"""Peak-memory account of a saved CUDA memory snapshot: the same summary as titanmm's own `rank{r}_memory_peak.txt`
(allocations alive at the peak of the recorded history, summed by Python stack), for a snapshot written by another
trainer (torchtitan's `memory_snapshot/iteration_N/rank0_memory_snapshot.pickle`), so that both sides of a
comparison at equal settings are read the same way.

    python benchmarks/memory_breakdown.py SNAPSHOT.pickle [--title T] [--out FILE]
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import print_report  # noqa: E402
from titanmm.utils.profiling import memory_peak_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("snapshot", help="a pickle of torch.cuda.memory._snapshot()")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", default=None, help="write the summary here as well as to stdout")
    args = parser.parse_args(argv)
    with open(args.snapshot, "rb") as f:
        snapshot = pickle.load(f)  # a file the user names, written by torch.cuda.memory._snapshot()
    if not isinstance(snapshot, dict) or "segments" not in snapshot:
        parser.error(f"{args.snapshot}: not a CUDA memory snapshot (no 'segments')")
    text = memory_peak_summary(snapshot, None, title=args.title or args.snapshot)
    print_report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

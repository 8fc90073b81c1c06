"""Regenerate the README's side-by-side performance table from the results files of benchmarks/compare.py.

    python benchmarks/readme_table.py [--readme README.md] [--results benchmarks/results] [--check]

Every `*.json` under --results that has a `peer` object becomes a row (files without one, such as
benchmarks/train_throughput.py's, are left to the hand-written tables). A workload measured more than once on the
same device and GPU count keeps its newest file (by date, then file name); a variant (compare.py --tag, e.g.
both sides without activation checkpointing) is a row of its own after the workload's. A row whose titanmm or peer side has
no tokens/s (a failed or one-sided run) is left out. The table replaces everything between the lines
`<!-- perf-table:start -->` and `<!-- perf-table:end -->` of the README; --check writes nothing and exits 1 when
the README is not up to date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
ORDER = ("llama3_8b_proxy_bf16", "llama3_8b_proxy_fp8", "llama3_8b_bf16", "llama3_8b_fp8",
         "llava_mistral_clip336_pretrain", "llava_mistral_clip336_sft", "decode_llama3_8b",
         "decode_llava_mistral_clip336")
COLUMNS = ("workload", "GPUs", "titanmm tokens/s/GPU", "peer", "peer tokens/s/GPU", "titanmm / peer",
           "MFU titanmm / peer", "peak memory titanmm / peer", "issue-7 targets missed", "notes", "measured")


def load_results(directory: Path) -> list[dict]:
    """The newest comparison result per (workload, device, gpus), in table order."""
    newest: dict[tuple, tuple] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            continue
        if not isinstance(result, dict) or not isinstance(result.get("peer"), dict):
            continue
        if not (result.get("titanmm") or {}).get("tps_per_gpu") or not result["peer"].get("tps_per_gpu"):
            continue
        key = (result.get("workload"), result.get("variant") or "", result.get("device"), result.get("gpus"))
        rank = (result.get("date", ""), path.name)
        if key not in newest or rank > newest[key][0]:
            newest[key] = (rank, result)
    results = [r for _, r in newest.values()]

    def order(r):
        name = r.get("workload", "")
        return (ORDER.index(name) if name in ORDER else len(ORDER), name, r.get("variant") or "", r.get("gpus") or 0,
                r.get("device", ""))

    return sorted(results, key=order)


def _num(value, spec: str = ",.0f", suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _pair(a: str, b: str) -> str:
    return f"{a} / {b}"


def notes(result: dict) -> str:
    """The file's own `note` (what differed from the workload's defaults), then workload-specific details:
    samples/s for LLaVA, per-batch decoding and the bandwidth bound."""
    t, p = result["titanmm"], result["peer"]
    parts = [result["note"]] if result.get("note") else []
    if "samples_per_s" in t or "samples_per_s" in p:
        parts.append(f"samples/s {_num(t.get('samples_per_s'), '.2f')} vs {_num(p.get('samples_per_s'), '.2f')}")
    if "samples_per_s_per_gpu" in t or "samples_per_s_per_gpu" in p:
        parts.append(f"samples/s/GPU {_num(t.get('samples_per_s_per_gpu'), '.2f')} vs "
                     f"{_num(p.get('samples_per_s_per_gpu'), '.2f')}")
    if result.get("ratio_of") and result["ratio_of"] != "tokens/s/GPU":
        parts.append(f"titanmm / peer is the ratio of {result['ratio_of']}; tokens/s/GPU: non-pad tokens")
    if "by_batch" in t:
        parts.append("new tokens/s at batch 1")
        if t.get("bandwidth_bound_fraction") is not None:
            peer_fraction = p.get("bandwidth_bound_fraction")
            parts.append(f"batch 1 at {_pct(t['bandwidth_bound_fraction'])} / {_pct(peer_fraction)} of the "
                         f"memory-bandwidth bound ({_num(result.get('hbm_copy_gb_per_s'))} GB/s copy)")
        for batch, entry in t["by_batch"].items():
            if batch == "1":
                continue
            peer_entry = p.get("by_batch", {}).get(batch, {})
            r = (result.get("ratio_by_batch") or {}).get(batch)
            parts.append(f"batch {batch}: {_num(entry.get('tps_per_gpu'))} vs {_num(peer_entry.get('tps_per_gpu'))} "
                         f"new tokens/s ({_num(r, '.2f', 'x')})")
    memory = result.get("memory", "")
    if memory and not memory.startswith("peak reserved"):
        parts.append("memory: " + memory.split(" (")[0])
    return "; ".join(parts)


def missed_targets(result: dict) -> str:
    """The results file's missed targets (`benchmarks/targets.py`) with their shortfall; "none" when all that were
    measured are met, "" for a file without targets."""
    if "targets" not in result:
        return ""
    missed = [f"{t['target']}: {t['shortfall']}" for t in result["targets"] if t["met"] is False]
    return "; ".join(missed) if missed else "none"


def row(result: dict) -> list[str]:
    t, p = result["titanmm"], result["peer"]
    device = result.get("device", "?").replace("NVIDIA ", "")
    commit = str(result.get("commit", ""))[:7]
    return [
        f"`{result.get('workload', '?')}`" + (f" ({result['variant']})" if result.get("variant") else ""),
        f"{result.get('gpus', '?')} x {device}", _num(t.get("tps_per_gpu")),
        result.get("peer_name", "peer"), _num(p.get("tps_per_gpu")), _num(result.get("ratio"), ".2f", "x"),
        _pair(_pct(t.get("mfu")), _pct(p.get("mfu"))),
        _pair(_num(t.get("peak_mem_gib"), ".1f"), _num(p.get("peak_mem_gib"), ".1f", " GiB")),
        missed_targets(result), notes(result), f"{result.get('date', '?')} {commit}".strip(),
    ]


def render(results: list[dict]) -> str:
    """The markdown block that goes between the markers (markers not included)."""
    if not results:
        return ("No side-by-side results yet: `bash benchmarks/setup_peers.sh`, then "
                "`bash benchmarks/device_compare.sh` on the GPU machine, then `python benchmarks/readme_table.py`.")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row(r)) + " |" for r in results]
    return "\n".join(lines)


def replace_table(readme: str, block: str) -> str:
    """`readme` with the text between the markers replaced by `block`."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise ValueError(f"the README needs exactly one {START} line followed by one {END} line")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's table is out of date")
    args = parser.parse_args(argv)
    readme_path = Path(args.readme)
    readme = readme_path.read_text(encoding="utf-8")
    updated = replace_table(readme, render(load_results(Path(args.results))))
    if args.check:
        if updated != readme:
            print(f"{readme_path}: the performance table is out of date (python benchmarks/readme_table.py)")
            return 1
        return 0
    if updated != readme:
        readme_path.write_text(updated, encoding="utf-8")
        print(f"updated the performance table in {readme_path}")
    else:
        print(f"{readme_path}: the performance table is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

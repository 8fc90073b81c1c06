"""Issue 7's targets, checked against a `benchmarks/compare.py` results file.

`evaluate(result, results_dir)` gives one entry per target that applies to the file's workload: what is required,
what was measured, whether it is met and, when not, by how much it falls short; `profiles(result, results_dir)` the
kernel breakdowns recorded for that workload on that device. compare.py writes both into every new results file
(`targets`, `profiles`); for files written before, or after a change of the targets:

    python benchmarks/targets.py [--results benchmarks/results] [--check]

rewrites the `targets` / `profiles` of every compare.py results file (those with a `peer` object) in place;
--check writes nothing and exits 1 when a file is not up to date.

The targets:
* language-model training (`llama3_8b*`): tokens/s >= 1.10x torchtitan's; peak memory no higher than
  torchtitan's; bf16 MFU >= 55%; FP8 tokens/s >= 1.4x titanmm's bf16 on the same device and GPU count (the newest
  bf16 file of the same variant in `results_dir`, else of none);
* vision-language training (`llava_*`): samples/s >= 2x transformers + FSDP2 at equal or less peak memory; with
  packing (SFT) >= 95% of the tokens not padding; the loader's share of the host's time < 2% (`data_wait_pct`);
* decoding (`decode_*`): batch 1 >= 75% of the memory-bandwidth bound; batch 32 >= 4x transformers' `generate`
  (where titanmm's side carries the call's roofline, the entry says whether 4x the peer's rate lies under it).
A ratio target whose results file carries a ceiling (the decode call's roofline, the LLaVA stage-1 step's FLOPs at the
measured matmul rate) also records `attainable`: whether the rate it asks for lies under that ceiling at all.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEMORY_ROUNDING_GIB = 0.005  # torchtitan prints its peak memory to 0.01 GiB
BF16_TWIN = {"llama3_8b_proxy_fp8": "llama3_8b_proxy_bf16", "llama3_8b_fp8": "llama3_8b_bf16"}


def device_slug(device: str, gpus: int) -> str:
    """The device part of a results file's name: "h100_80gb_hbm3", "h200x2"."""
    slug = re.sub(r"[^a-z0-9]+", "_", device.replace("NVIDIA ", "").lower()).strip("_")
    return slug + (f"x{gpus}" if gpus > 1 else "")


def _entry(name: str, required: float, measured: float | None, at_least: bool = True, unit: str = "",
           source: str | None = None, tolerance: float = 0.0) -> dict:
    """One target: `measured` >= `required` (or <= with at_least=False), within `tolerance` (the rounding of a
    peer's printed figure); the shortfall says how far off it is."""
    entry = {"target": name, "required": required, "measured": measured, "met": None, "shortfall": None}
    if source:
        entry["source"] = source
    if measured is None:
        entry["shortfall"] = "not measured"
        return entry
    entry["met"] = bool(measured >= required - tolerance if at_least else measured <= required + tolerance)
    if not entry["met"]:
        if at_least:
            entry["shortfall"] = (f"{100 * (required / measured - 1):.1f}% more needed" if measured > 0
                                  else "nothing measured")
        else:
            entry["shortfall"] = f"{measured - required:.2f}{unit} over"
    return entry


def _bf16_twin(result: dict, results_dir: Path | None) -> tuple[dict, str] | None:
    """The titanmm bf16 results file matching an FP8 one (same device and GPU count; the same variant, then the same
    commit, if possible; else the newest not later than the FP8 run)."""
    twin = BF16_TWIN.get(result["workload"])
    if twin is None or results_dir is None or not results_dir.is_dir():
        return None
    candidates = []
    for path in results_dir.glob(f"*_{device_slug(result['device'], result['gpus'])}_{twin}*.json"):
        try:
            other = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        same_machine = other.get("gpus") == result["gpus"] and other.get("device") == result["device"]
        if other.get("workload") != twin or not same_machine:
            continue
        if not (other.get("titanmm") or {}).get("tps_per_gpu"):
            continue
        same_variant = other.get("variant") == result.get("variant")
        same_commit = bool(result.get("commit")) and other.get("commit") == result.get("commit")
        not_later = other.get("date", "") <= result.get("date", "")  # never an FP8 run's later bf16 run
        rank = (same_variant, same_commit, not_later, other.get("variant") is None, other.get("date", ""), path.name)
        candidates.append((rank, other, path))
    if not candidates:
        return None
    _, other, path = max(candidates, key=lambda c: c[0])
    return other, path.name


def evaluate(result: dict, results_dir: Path | None = None) -> list[dict]:
    """The targets of `result`'s workload, each {target, required, measured, met, shortfall[, source]}."""
    workload, titanmm, peer = result["workload"], result.get("titanmm") or {}, result.get("peer") or {}
    peer_name = result.get("peer_name") or "the peer"
    entries = []
    if workload.startswith("llama3_8b"):
        entries.append(_entry(f"tokens/s >= 1.10x {peer_name}", 1.10, result.get("ratio")))
        if peer.get("peak_mem_gib") is not None:
            entries.append(_entry(f"peak memory <= {peer_name}'s (GiB)", peer["peak_mem_gib"],
                                  titanmm.get("peak_mem_gib"), at_least=False, unit=" GiB",
                                  tolerance=MEMORY_ROUNDING_GIB))
        if workload in BF16_TWIN:
            twin = _bf16_twin(result, results_dir)
            measured = None
            if twin is not None and titanmm.get("tps_per_gpu"):
                measured = titanmm["tps_per_gpu"] / twin[0]["titanmm"]["tps_per_gpu"]
            entries.append(_entry("FP8 tokens/s >= 1.4x titanmm bf16", 1.4, measured,
                                  source=twin[1] if twin else None))
        else:
            entries.append(_entry("bf16 MFU >= 55%", 0.55, titanmm.get("mfu")))
    elif workload.startswith("llava_"):
        equal_memory = None
        if result.get("ratio") is not None and titanmm.get("peak_mem_gib") is not None and peer.get("peak_mem_gib"):
            equal_memory = result["ratio"] if titanmm["peak_mem_gib"] <= peer["peak_mem_gib"] else 0.0
        entry = _entry(f"samples/s >= 2x {peer_name} at equal or less peak memory", 2.0, equal_memory)
        if equal_memory == 0.0:
            entry["shortfall"] = (f"{result['ratio']:.2f}x, but at {titanmm['peak_mem_gib']:.1f} GiB against "
                                  f"{peer['peak_mem_gib']:.1f}")
        if peer.get("samples_per_s"):  # the ceiling: every FLOP of the step at the measured matmul rate
            _attainable(entry, 2.0 * peer["samples_per_s"], result.get("ceiling_samples_per_s"), "samples/s",
                        "the step's FLOPs at the measured matmul rate")
        entries.append(entry)
        if "packing_efficiency" in titanmm:
            entries.append(_entry("packed tokens not padding >= 95%", 0.95, titanmm["packing_efficiency"]))
        if titanmm.get("data_wait_pct") is not None:
            entries.append(_entry("loader wait < 2% of the host's time (data_wait_pct)", 2.0,
                                  titanmm["data_wait_pct"], at_least=False, unit=" points"))
    elif workload.startswith("decode_"):
        entries.append(_entry("batch 1 >= 75% of the bandwidth bound", 0.75, titanmm.get("bandwidth_bound_fraction")))
        entries.append(_batch32_entry(result, peer_name))
    return entries


def _batch32_entry(result: dict, peer_name: str) -> dict:
    """Batch 32 >= 4x the peer, and whether 4x the peer's rate is attainable at all: above the call's roofline on
    the same GPU (the prefill's FLOPs at the measured matmul rate plus the decode steps' bytes at the measured
    copy bandwidth, `decode_throughput.py`), no implementation of the same work reaches it."""
    entry = _entry(f"batch 32 >= 4x {peer_name}", 4.0, (result.get("ratio_by_batch") or {}).get("32"))
    titanmm_32 = ((result.get("titanmm") or {}).get("by_batch") or {}).get("32") or {}
    peer_32 = ((result.get("peer") or {}).get("by_batch") or {}).get("32") or {}
    if peer_32.get("tps_per_gpu"):
        _attainable(entry, 4.0 * peer_32["tps_per_gpu"], titanmm_32.get("roofline_tokens_per_s"), "new tokens/s",
                    "the call's roofline")
    return entry


def _attainable(entry: dict, required: float, ceiling: float | None, unit: str, ceiling_name: str) -> None:
    """Record on a ratio target whether the rate it asks for (`required`, in `unit`) lies under `ceiling`, the
    fastest any implementation of the same work could run on that GPU; a missed target above it says so."""
    if not ceiling:
        return
    entry.update({"required_rate": required, "ceiling_rate": ceiling, "attainable": required <= ceiling})
    if not entry["met"] and not entry["attainable"]:
        entry["shortfall"] += (f"; that is {_rate(required)} {unit}, {100 * (required / ceiling - 1):.1f}% above "
                               f"{ceiling_name} ({_rate(ceiling)}): unattainable against this run")


def _rate(value: float) -> str:
    """A rate for a sentence: whole units from 100 up (5,560 tokens/s), one decimal below (27.7 samples/s)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def profiles(result: dict, results_dir: Path | None) -> list[str]:
    """Kernel breakdowns (`*_kernels.txt`) in `results_dir` recorded for this workload on this device."""
    if results_dir is None or not results_dir.is_dir():
        return []
    stem = f"_{device_slug(result['device'], result['gpus'])}_{result['workload']}_"
    return sorted(p.name for p in results_dir.glob("*_kernels.txt") if stem in p.name)


def annotate(result: dict, results_dir: Path | None) -> dict:
    """`result` with its `targets` and `profiles` (re)computed."""
    return {**result, "targets": evaluate(result, results_dir), "profiles": profiles(result, results_dir)}


def summary(result: dict) -> str:
    """One line per target, for the console."""
    lines = []
    for t in result.get("targets", []):
        state = "met" if t["met"] else ("not measured" if t["met"] is None else f"missed: {t['shortfall']}")
        measured = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        lines.append(f"  target {t['target']}: {measured} (required {t['required']:.3g}) {state}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is not up to date")
    args = parser.parse_args(argv)
    directory = Path(args.results)
    stale = []
    for path in sorted(directory.glob("*.json")):
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or "peer" not in result or "workload" not in result:
            continue
        updated = annotate(result, directory)
        if updated != result:
            stale.append(path.name)
            if not args.check:
                path.write_text(json.dumps(updated, indent=1) + "\n")
    verb = "not up to date" if args.check else "updated"
    print(f"{len(stale)} results files {verb}" + (": " + ", ".join(stale) if stale else ""))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

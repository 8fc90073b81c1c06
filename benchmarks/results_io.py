"""What every benchmark script records with its numbers, and how results travel between processes.

* `commit()` - the titanmm commit measured (on a GPU machine, whose copy of the tree has no .git, the one
  benchmarks/setup_peers.sh recorded);
* `cpu_description()` - the device line of a CPU benchmark;
* `command_line()` - how a benchmark script was invoked, for its results file;
* `write_results()` - a results file in benchmarks/results/ (JSON);
* `last_json_line()` - the JSON a child process printed after a marker, for the script that launched it;
* `print_report()` - a plain-text report to stdout and, when asked, to a file beside the results.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """TITANMM_COMMIT, else git's HEAD (+ "-dirty" when the work tree differs from it), else what
    setup_peers.sh recorded in .peers/COMMIT, else "unknown"."""
    if os.environ.get("TITANMM_COMMIT"):
        return os.environ["TITANMM_COMMIT"]
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO, stderr=subprocess.DEVNULL).returncode
        return head + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        recorded = REPO / ".peers" / "COMMIT"
        return recorded.read_text().strip() if recorded.exists() else "unknown"


def cpu_description() -> str:
    """"cpu: <model name>, <N> cores"."""
    name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name}, {os.cpu_count()} cores"


def command_line(script: str, argv: list[str] | None) -> str:
    """"python benchmarks/<script> ARGS": `argv` as given to the script's main(), else the process's arguments."""
    return "python " + " ".join([f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def last_json_line(text: str, marker: str) -> dict | None:
    """The JSON after `marker` on the last line of `text` that has it, or None (no such line, or bad JSON)."""
    for line in reversed(text.splitlines()):
        if marker in line:
            try:
                return json.loads(line.split(marker, 1)[1])
            except json.JSONDecodeError:
                return None
    return None


def print_report(text: str, out: str | Path | None = None) -> None:
    """Print `text`; with `out`, also write it there (parent folders created)."""
    print(text, end="")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)

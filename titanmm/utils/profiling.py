"""Profiling of training steps ([profiling]): torch.profiler traces with a kernel-time breakdown, and CUDA memory
snapshots with a summary of what is alive at the peak.

With `enable_profiling`, the profiler records the `profiler_active` steps ending at every multiple of
`profile_freq` (after `profiler_warmup` steps it runs without keeping them) and writes, per rank, into
{dump_folder}/{save_traces_folder}/iteration_{step}/:

* rank{r}_trace.json: the Chrome trace (ui.perfetto.dev, chrome://tracing);
* rank{r}_kernels.txt: device time by kernel category, device idle time and the top kernels
  (`kernel_breakdown`; on CPU, where there are no kernels, host operator time).

With `enable_memory_snapshot` (CUDA), the caching allocator records its history, and at the same steps (and on an
out-of-memory error) {dump_folder}/{save_memory_snapshot_folder}/iteration_{step}/ (iteration_{step}_oom/) gets
rank{r}_memory_snapshot.pickle (drag it into pytorch.org/memory_viz) and rank{r}_memory_peak.txt
(`memory_peak_summary`: peak statistics and the largest allocations alive at the peak, by Python stack).

    profiler = Profiler(config.profiling, dump_folder, rank, device)
    profiler.start(steps_done)          # or: with profiler.session(steps_done): ...
    for step in ...:
        train_step()
        profiler.step(step)              # after each step, 1-based
    profiler.stop()
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerAction, ProfilerActivity

from titanmm.config.job_config import Profiling

logger = logging.getLogger("titanmm")

__all__ = ["Profiler", "busy_time_us", "kernel_breakdown", "kernel_category", "live_blocks_at_peak",
           "memory_peak_summary"]

# Ordered: a kernel (or, on CPU, operator) name falls in the first category one of whose patterns it contains,
# lower-cased. Attention comes before matmul because cuDNN and memory-efficient attention kernels carry "sm90" /
# "cutlass" in their names, and both before "triton fused" because inductor names its matmul and FlexAttention
# templates triton_tem_*. The CPU operator names (aten::mm, MmBackward0, ...) serve the CPU fallback.
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("communication", ("nccl", "c10d::")),
    ("attention", ("flash", "fmha", "sdpa", "attention", "flex")),
    ("matmul", ("gemm", "cutlass", "cublas", "sm90_xmma", "nvjet", "_scaled_mm", "triton_tem_fused_mm",
                "triton_tem_fused_addmm", "triton_tem_fused_bmm", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::linear", "aten::matmul", "mmbackward")),
    # foreach copies (FSDP2's all-gather copy-in / copy-out and its dtype casts) before the other foreach kernels
    ("copies/casts", ("copyfunctor", "aten::_foreach_copy_")),
    ("optimizer", ("multi_tensor_apply", "adam", "foreach", "optimizer.")),
    ("triton fused", ("triton_",)),
    ("copies/casts", ("memcpy", "memset", "copy_", "to_copy", "copy_kernel", "cast")),
)
OTHER = "other"
TOP_KERNELS = 30
TOP_STACKS = 25
STACK_DEPTH = 4
_GIB, _MIB = 1024**3, 1024**2


def kernel_category(name: str) -> str:
    """The KERNEL_CATEGORIES category of a kernel (or CPU operator) name; "other" when none matches."""
    lowered = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p in lowered for p in patterns):
            return category
    return OTHER


def _shortened(name: str, width: int = 120) -> str:
    """A demangled kernel name without its argument list and namespace noise, cut to `width` characters: enough
    to tell templated kernels apart (multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<...)."""
    if ">(" in name:
        name = name[:name.index(">(") + 1]
    return name.replace("(anonymous namespace)::", "").replace("at::native::", "")[:width]


def busy_time_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of the (start, duration) intervals: the time at least one of them runs, counted once
    however many overlap (kernels on several streams, e.g. NCCL next to compute)."""
    busy, covered_until = 0.0, float("-inf")
    for start, duration in sorted(intervals):
        end = start + duration
        if end > covered_until:
            busy += end - max(start, covered_until)
            covered_until = end
    return busy


def kernel_breakdown(events: list[tuple[str, float, float]], wall_us: float, title: str = "",
                     on_device: bool = True, top_k: int = TOP_KERNELS) -> str:
    """Plain-text breakdown of the profiled steps' device time.

    `events`: (name, start_us, duration_us) of every kernel (memcpy / memset included) of the profiled steps, or,
    with `on_device=False`, of the top-level CPU operators standing in for them. `wall_us`: wall time of the
    profiled steps. Idle time = wall time - busy time, the union of the event intervals; categories and the top
    `top_k` kernels are given in ms and in percent of the summed kernel time (and of the wall time).
    """
    what = "kernel" if on_device else "operator"
    kernel_us = sum(duration for _, _, duration in events)
    busy_us = min(busy_time_us([(start, duration) for _, start, duration in events]), wall_us)
    idle_us = max(wall_us - busy_us, 0.0)

    def pct(part: float, whole: float) -> str:
        return f"{100 * part / whole:6.1f}%" if whole > 0 else "     -"

    def ms(us: float) -> str:
        return f"{us / 1e3:10.2f}"

    # Exposed communication: collectives running while no other kernel does (busy time minus the busy time of
    # the rest), what overlapping them with compute would still have to hide.
    compute = [(start, duration) for name, start, duration in events if kernel_category(name) != "communication"]
    exposed_us = max(busy_us - min(busy_time_us(compute), wall_us), 0.0) if on_device else 0.0
    if on_device:
        source = "CUDA kernels on the device timeline, all streams"
        idle_causes = "launch gaps, host syncs, data loading"
    else:
        source = "CPU operator time: no CUDA kernels were recorded, so top-level host operators stand in for kernels"
        idle_causes = "Python between operators, data loading"
    lines = [title or "profiled steps", f"source: {source}",
             f"{'wall time':<14}{ms(wall_us)} ms {'':>7}  first profiled step's start to the end of the last one "
             f"(or of its last {what}, if later)",
             f"{'busy time':<14}{ms(busy_us)} ms {pct(busy_us, wall_us)}  union of the {what} intervals",
             f"{'idle time':<14}{ms(idle_us)} ms {pct(idle_us, wall_us)}  wall - busy: no {what} runs ({idle_causes})",
             *([f"{'exposed comm':<14}{ms(exposed_us)} ms {pct(exposed_us, wall_us)}  communication kernels "
                "running alone (busy - busy of all other kernels)"] if on_device else []),
             f"{what + ' time':<14}{ms(kernel_us)} ms {'':>7}  sum of the {what} durations"
             + (" (above busy where streams overlap, e.g. NCCL with compute)" if on_device else ""),
             "", f"{'category':<16}{'ms':>10} {f'% {what}s':>10} {'% wall':>8}"]
    by_category: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, _, duration in events:
        by_category[kernel_category(name)] += duration
        by_name[name][0] += 1
        by_name[name][1] += duration
    for category in [c for c, _ in KERNEL_CATEGORIES if c != "copies/casts"] + ["copies/casts", OTHER]:
        us = by_category.get(category, 0.0)
        lines.append(f"{category:<16}{ms(us)} {pct(us, kernel_us):>10} {pct(us, wall_us):>8}")
    lines.append(f"{'idle':<16}{ms(idle_us)} {'':>10} {pct(idle_us, wall_us):>8}")
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:top_k]
    lines += ["", f"top {len(top)} {what}s by total time", f"{'ms':>10} {f'% {what}s':>10} {'calls':>7}  name"]
    for name, (calls, us) in top:
        lines.append(f"{ms(us)} {pct(us, kernel_us):>10} {calls:>7}  {_shortened(name)}")
    return "\n".join(lines) + "\n"


def _is_top_level_operator(event) -> bool:
    """A CPU operator not nested in another (only in annotations such as ProfilerStep#N or FSDP::...)."""
    if event.device_type != DeviceType.CPU or event.is_user_annotation:
        return False
    parent = event.cpu_parent
    while parent is not None:
        if not parent.is_user_annotation:
            return False
        parent = parent.cpu_parent
    return True


def profile_breakdown(prof: torch.profiler.profile, title: str) -> str:
    """`kernel_breakdown` of a finished profiler window: its CUDA kernels, else its top-level CPU operators; the
    wall time spans the ProfilerStep ranges of the window, stretched to the kernels that end after them."""
    events = prof.events()
    steps = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("ProfilerStep")]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation
               and not e.name.startswith("ProfilerStep")]
    on_device = bool(kernels)
    if not on_device:
        kernels = [e for e in events if _is_top_level_operator(e)]
    spans = [(e.time_range.start, e.time_range.end) for e in steps + kernels]
    wall_us = max(end for _, end in spans) - min(start for start, _ in spans) if spans else 0.0
    timed = [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in kernels]
    return kernel_breakdown(timed, wall_us, title=title, on_device=on_device)


# ------------------------------------------------------------------------------------------------------------
def live_blocks_at_peak(snapshot: dict, device_index: int = 0) -> tuple[list[dict], int, int]:
    """The allocations alive when allocated memory peaked within the allocator's recorded history.

    Starts from the blocks alive in the snapshot and replays the history (`device_traces`) backwards: undoing an
    "alloc" removes its block, undoing a "free_completed" brings it back (with the stack of its "alloc" when that
    is in the history). Sizes are requested bytes, as the history records them. Returns ({"size", "frames"} of each
    block alive at the peak, the peak in bytes, the number of history events).
    """
    live: dict[int, dict] = {}
    for segment in snapshot.get("segments", []):
        if segment.get("device", device_index) != device_index:
            continue
        address = segment["address"]
        for block in segment["blocks"]:
            if block["state"].startswith("active"):  # active_allocated, or freed but in use by another stream
                live[block.get("address", address)] = {"size": block.get("requested_size", block["size"]),
                                                       "frames": block.get("frames", [])}
            address += block["size"]
    traces = snapshot.get("device_traces", [])
    trace = [e for e in (traces[device_index] if device_index < len(traces) else [])
             if e["action"] in ("alloc", "free_completed")]
    alloc_frames, last_alloc = {}, {}  # index of a free_completed -> frames of the alloc it ends
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            last_alloc[event["addr"]] = event.get("frames", [])
        else:
            alloc_frames[i] = last_alloc.pop(event["addr"], event.get("frames", []))
    total = peak = sum(b["size"] for b in live.values())
    undo_from = len(trace)  # the state at the peak: the snapshot with events [undo_from:] undone
    for i in range(len(trace) - 1, -1, -1):
        total += -trace[i]["size"] if trace[i]["action"] == "alloc" else trace[i]["size"]
        if total > peak:
            peak, undo_from = total, i
    for i in range(len(trace) - 1, undo_from - 1, -1):
        event = trace[i]
        if event["action"] == "alloc":
            live.pop(event["addr"], None)
        else:
            live[event["addr"]] = {"size": event["size"], "frames": alloc_frames[i]}
    return list(live.values()), peak, len(trace)


def _short_path(filename: str) -> str:
    """The file relative to the working directory, else from its package (after site-packages/)."""
    cwd = os.getcwd() + os.sep
    if filename.startswith(cwd):
        return filename[len(cwd):]
    return filename.split("site-packages/")[-1]


def user_stack(frames: list[dict], depth: int = STACK_DEPTH) -> tuple[str, ...]:
    """The innermost `depth` Python frames (frames are innermost first) outside torch/ and compiled code, as
    "file:line function": where the model's code asked for the memory."""
    stack = []
    for frame in frames:
        filename = frame["filename"]
        if "/torch/" in filename or "torchinductor" in filename or filename.startswith("<"):
            continue
        stack.append(f"{_short_path(filename)}:{frame['line']} {frame['name']}")
        if len(stack) == depth:
            break
    return tuple(stack)


def reserved_by_stream(snapshot: dict, device_index: int = 0) -> dict[int, tuple[int, int]]:
    """stream -> (bytes reserved, bytes allocated) over the snapshot's segments on `device_index`, largest first."""
    pools: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for segment in snapshot.get("segments", []):
        if segment.get("device", device_index) != device_index:
            continue
        pool = pools[int(segment.get("stream", 0))]
        pool[0] += segment.get("total_size", 0)
        used = segment.get("allocated_size")
        if used is None:  # older snapshots: from the blocks
            used = sum(b["size"] for b in segment.get("blocks", []) if b.get("state") == "active_allocated")
        pool[1] += used
    return {stream: (total, used) for stream, (total, used) in sorted(pools.items(), key=lambda item: -item[1][0])}


def memory_peak_summary(snapshot: dict, stats: dict | None, device_index: int = 0, title: str = "",
                        top_k: int = TOP_STACKS) -> str:
    """Plain-text account of peak memory: torch.cuda.memory_stats() peaks (`stats`; None when only the snapshot
    was saved, e.g. by another trainer), then the allocations alive at the peak of the recorded history
    (`live_blocks_at_peak`) summed by identical Python stack, the `top_k` largest first."""

    def gib(n: float) -> str:
        return f"{n / _GIB:.2f} GiB"

    def stat(key: str) -> int:
        return int(stats.get(key, 0))

    blocks, peak, n_events = live_blocks_at_peak(snapshot, device_index)
    lines = [title or "memory at the peak"]
    if stats is None:
        segments = [s for s in snapshot.get("segments", []) if s.get("device", device_index) == device_index]
        lines.append(f"torch.cuda.memory_stats: not saved with this snapshot; reserved at the snapshot "
                     f"{gib(sum(s.get('total_size', 0) for s in segments))} in {len(segments)} segments")
    else:
        lines += [f"torch.cuda.memory_stats peaks (since the last reset; the metrics logger resets them at each log "
                  f"step): allocated {gib(stat('allocated_bytes.all.peak'))}, requested "
                  f"{gib(stat('requested_bytes.all.peak'))}, reserved {gib(stat('reserved_bytes.all.peak'))}",
                  f"now: allocated {gib(stat('allocated_bytes.all.current'))}, reserved "
                  f"{gib(stat('reserved_bytes.all.current'))}; allocator retries {stat('num_alloc_retries')} (cache "
                  f"flushes after a failed cudaMalloc), out-of-memory errors {stat('num_ooms')}"]
    pools = reserved_by_stream(snapshot, device_index)
    if len(pools) > 1:  # the caching allocator's memory of one stream is not reused for another's allocations
        lines.append("reserved by stream at the snapshot (in use now): " + ", ".join(
            f"{'default stream' if stream == 0 else f'stream {stream:#x}'} {gib(total)} ({gib(used)})"
            for stream, (total, used) in pools.items()))
    lines.append(f"alive at the peak of the recorded history ({n_events} allocation events): {gib(peak)} requested "
                 f"in {len(blocks)} allocations")
    traces = snapshot.get("device_traces", [])
    ooms = [e for e in (traces[device_index] if device_index < len(traces) else []) if e["action"] == "oom"]
    if ooms:
        lines.append(f"out of memory: an allocation of {gib(ooms[-1]['size'])} failed with "
                     f"{gib(ooms[-1].get('device_free', 0))} free on the device")
    if stats is not None and stat("requested_bytes.all.peak") > peak:
        lines.append("  (the memory_stats peak is higher: it came before the recorded history; raise "
                     "profiling.snapshot_max_entries to reach it)")
    groups: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0, 0])  # stack -> bytes, count, largest
    for block in blocks:
        group = groups[user_stack(block["frames"])]
        group[0] += block["size"]
        group[1] += 1
        group[2] = max(group[2], block["size"])
    top = sorted(groups.items(), key=lambda item: -item[1][0])[:top_k]
    lines += ["", f"top {len(top)} stacks by bytes alive at that peak (innermost frame first; frames in torch/ and "
              "compiled code left out):"]
    for rank, (stack, (size, count, largest)) in enumerate(top, 1):
        lines.append(f"{rank:3}. {gib(size):>11} in {count} allocation{'s' if count > 1 else ''}, largest "
                     f"{largest / _MIB:.1f} MiB")
        lines += [f"        {frame}" for frame in stack] or ["        (no Python stack: allocated by the autograd "
                                                              "engine's thread, or before recording began)"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
class Profiler:
    """Traces and memory snapshots of the training loop as [profiling] asks; does nothing when both are off.

    Traces: a torch.profiler whose schedule (wait, warmup, active) repeats every profile_freq steps, counted from
    the first step of this run's loop, so that recorded windows end at multiples of profile_freq also after a
    resume. Memory: torch.cuda.memory._record_memory_history from construction (create the Profiler before the
    model, so that weights carry the stack that allocated them) to stop().
    """

    def __init__(self, config: Profiling, dump_folder: str | Path, rank: int, device: torch.device):
        self.config, self.rank, self.device = config, rank, device
        self.trace_folder = Path(dump_folder) / config.save_traces_folder
        self.memory_folder = Path(dump_folder) / config.save_memory_snapshot_folder
        self.step_done = 0  # the last training step finished (1-based)
        self._torch_profiler: torch.profiler.profile | None = None
        self._recording_memory = False
        self._stopping = False
        if config.enable_memory_snapshot:
            self._record_memory_history()

    def _record_memory_history(self) -> None:
        if self.device.type != "cuda":
            self._log(f"profiling.enable_memory_snapshot: memory snapshots need CUDA; none are taken on "
                      f"{self.device.type}")
            return
        # Python stacks only: C++ ones cost seconds to symbolise at every snapshot.
        torch.cuda.memory._record_memory_history(max_entries=self.config.snapshot_max_entries, stacks="python")
        self._recording_memory = True
        self._log(f"profiling: recording CUDA memory history; snapshots every {self.config.profile_freq} steps to "
                  f"{self.memory_folder}")

    def start(self, step: int = 0) -> Profiler:
        """Begin before the first step of the loop; `step` = steps already done (a resumed run)."""
        self.step_done = step
        if self.config.enable_profiling:
            self._torch_profiler = self._build_torch_profiler(step)
            self._stopping = False
            self._torch_profiler.start()
            self._log(f"profiling: traces of the {self.config.profiler_active} step(s) ending at every multiple of "
                      f"{self.config.profile_freq} to {self.trace_folder}")
        return self

    def _build_torch_profiler(self, first_step: int) -> torch.profiler.profile:
        c = self.config
        cycle = torch.profiler.schedule(wait=c.profile_freq - c.profiler_warmup - c.profiler_active,
                                        warmup=c.profiler_warmup, active=c.profiler_active)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        # The profiler counts its steps from 0: shift them to the training steps (0-based) they are.
        return torch.profiler.profile(activities=activities, schedule=lambda n: cycle(n + first_step),
                                      on_trace_ready=self._write_trace, record_shapes=True)

    def step(self, step: int) -> None:
        """Call after training step `step` (1-based) has finished."""
        self.step_done = step
        if self._torch_profiler is not None:
            if self._torch_profiler.current_action == ProfilerAction.RECORD_AND_SAVE and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the window's last kernels end inside it
            self._torch_profiler.step()  # writes the trace when `step` ended a window
        if self._recording_memory and step % self.config.profile_freq == 0:
            self.dump_memory_snapshot(f"iteration_{step}")

    def out_of_memory(self) -> None:
        """The step after `step_done` ran out of memory: snapshot what filled it (the caller re-raises)."""
        if not self._recording_memory:
            return
        try:
            self.dump_memory_snapshot(f"iteration_{self.step_done + 1}_oom")
        except Exception as e:  # the out-of-memory error, not this one, is what the run must report
            logger.warning(f"profiling: no memory snapshot of the out-of-memory step: {e!r}")

    def stop(self) -> None:
        """End profiling; a trace window cut short (the run ended or failed inside it) is not written."""
        if self._torch_profiler is not None:
            self._stopping = True
            self._torch_profiler.stop()
            self._torch_profiler = None
        if self._recording_memory:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording_memory = False

    @contextlib.contextmanager
    def session(self, step: int = 0):
        """start(step) ... stop(), with a memory snapshot when an out-of-memory error escapes the block."""
        self.start(step)
        try:
            yield self
        except torch.OutOfMemoryError:
            self.out_of_memory()
            raise
        finally:
            self.stop()

    def _write_trace(self, prof: torch.profiler.profile) -> None:
        """on_trace_ready: the Chrome trace and the kernel breakdown of the window that ended at step_done."""
        if self._stopping:
            return
        begin, step = time.perf_counter(), self.step_done
        folder = self.trace_folder / f"iteration_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(folder / f"rank{self.rank}_trace.json"))
        # profiler_active steps, or fewer when the run resumed inside a window
        recorded = [e for e in prof.events() if e.device_type == DeviceType.CPU and e.name.startswith("ProfilerStep")]
        first = step - max(len(recorded), 1) + 1
        steps = f"step {step}" if first == step else f"steps {first}-{step}"
        breakdown = profile_breakdown(prof, title=f"rank {self.rank}, {steps} ({step - first + 1} profiled "
                                                  f"step{'s' if first != step else ''})")
        (folder / f"rank{self.rank}_kernels.txt").write_text(breakdown)
        self._log(f"profiling: trace of {steps} written to {folder} in {time.perf_counter() - begin:.1f} s")

    def dump_memory_snapshot(self, name: str) -> None:
        """Write the allocator's snapshot (with its history) and the peak summary into memory_snapshot/{name}/."""
        begin = time.perf_counter()
        folder = self.memory_folder / name
        folder.mkdir(parents=True, exist_ok=True)
        snapshot = torch.cuda.memory._snapshot()
        with open(folder / f"rank{self.rank}_memory_snapshot.pickle", "wb") as f:
            pickle.dump(snapshot, f)
        summary = memory_peak_summary(snapshot, torch.cuda.memory_stats(self.device), self.device.index or 0,
                                      title=f"rank {self.rank}, {name}")
        (folder / f"rank{self.rank}_memory_peak.txt").write_text(summary)
        self._log(f"profiling: memory snapshot written to {folder} in {time.perf_counter() - begin:.1f} s")

    def _log(self, message: str) -> None:
        if self.rank == 0:
            logger.info(message)

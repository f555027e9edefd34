"""Where a process's CPU goes: its CPU seconds from /proc (every thread, user + system), and py-spy's samples
of it grouped into the worker's stages, scaled so that the stages add up to the measured CPU.

py-spy samples from outside the process (no code in the worker, no hook to leave on), skipping idle threads,
so a stage's share of the samples is its share of the CPU. Without py-spy (`pip install py-spy`) only the
CPU seconds are reported.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_RATE_HZ = 200
_TICKS = os.sysconf("SC_CLK_TCK")

# Stage -> substrings of a py-spy frame ("function (path:line)"). A sample belongs to the first tier whose
# rules match any of its frames, and within a tier to the frame nearest the leaf. Our own work comes first, so
# that Pillow under pdq_of is PDQ, not decoding; then libraries: a pydantic call inside the producer is
# pydantic, while aiokafka's connection code counts as consume only when no producer frame is above it.
_OURS_FIRST = {
    "PDQ": ("pdq_of", "crop_hashes", "(_preview ", "worker/neardup.py"),
    "provenance": ("worker/provenance.py",),
    "sha256": ("checked_sha256",),
}
_SPECIFIC = {
    "decode + preprocess": ("model/imaging.py", "model/structure.py", "PIL/", "worker/examine.py", "budget.py"),
    "pydantic (events)": ("pydantic", "moderation/events.py"),
    "tracing": ("worker/tracing.py", "opentelemetry/"),
    "metrics": ("worker/metrics.py", "prometheus_client/"),
    "logging": ("logging/__init__.py", "moderation/logs.py"),
    "producer": ("adapters/publisher.py", "aiokafka/producer/", "producer.send", "murmur2"),
    "S3 client": ("aiobotocore/", "botocore/", "aiohttp/", "adapters/s3.py", "yarl/", "multidict/"),
}
_CONSUME = {
    "Kafka consume (Faust, aiokafka)": ("faust/", "mode/", "aiokafka/", "worker/transport.py", "worker/acks.py")
}
_OURS = {"pipeline (policy, labelling, verdicts)": ("moderation/",)}
_LOOP = {"event loop": ("asyncio/", "uvloop", "selectors.py", "concurrent/futures", "threading.py")}
# The innermost Python frame while uvloop runs its loop in C (`run_forever` below the worker's entry point).
_LOOP_LEAVES = ("Worker.execute_from_commandline", "run_until_complete", "run_forever", "uvloop")
TIERS = (_OURS_FIRST, _SPECIFIC, _CONSUME, _OURS, _LOOP)
OTHER = "other"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of the process so far (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def thread_cpu_seconds(pid: int) -> Counter[str]:
    """CPU seconds so far by thread name (comm), threads of one name summed: the event loop's thread, the
    decode pool, Faust's consumer thread, and threads py-spy cannot see (native pools)."""
    out: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")].rstrip("0123456789_-")
        name = "main (event loop)" if task.name == str(pid) else f"{comm or '?'} (others)"
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] += (int(fields[11]) + int(fields[12])) / _TICKS
    return out


def stage_of(frames: list[str]) -> str:
    """The stage of one sample, its frames root first."""
    if frames and any(loop in frames[-1] for loop in _LOOP_LEAVES):
        return "event loop"  # uvloop's own C code: polling, socket reads and writes, scheduling
    for tier in TIERS:
        for frame in reversed(frames):
            for stage, needles in tier.items():
                if any(needle in frame for needle in needles):
                    return stage
    return OTHER


def stages_of(raw: str) -> Counter[str]:
    """py-spy's raw (collapsed) output, `frame;frame;... count` a line, as samples by stage."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[stage_of(stack.split(";"))] += int(count)
    return counts


@dataclass
class Recording:
    """A process's CPU over a phase, and py-spy's samples of it when py-spy is installed."""

    pid: int
    keep: Path | None = None  # where to leave py-spy's raw samples (None: nowhere)
    began_cpu: float = 0.0
    cpu_s: float = 0.0
    began_threads: Counter[str] = field(default_factory=Counter)
    threads_s: Counter[str] = field(default_factory=Counter)
    samples: Counter[str] = field(default_factory=Counter)
    _spy: subprocess.Popen[bytes] | None = None
    _output: Path | None = None

    def start(self) -> None:
        self.began_cpu, self.began_threads = cpu_seconds(self.pid), thread_cpu_seconds(self.pid)
        spy = shutil.which("py-spy")
        if spy is None:
            return
        self._output = Path(tempfile.mkstemp(prefix="py-spy-", suffix=".txt")[1])
        command = [spy, "record", "--pid", str(self.pid), "--format", "raw", "--output", str(self._output)]
        command += ["--rate", str(SAMPLE_RATE_HZ), "--nonblocking"]
        self._spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.cpu_s = cpu_seconds(self.pid) - self.began_cpu
        self.threads_s = thread_cpu_seconds(self.pid)
        self.threads_s.subtract(self.began_threads)
        if self._spy is None or self._output is None:
            return
        self._spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            self._spy.wait(30)
        except subprocess.TimeoutExpired:
            self._spy.kill()
            self._spy.wait()
        raw = self._output.read_text(errors="replace")
        self._output.unlink(missing_ok=True)
        self.samples = stages_of(raw)
        if self.keep is not None:
            self.keep.parent.mkdir(parents=True, exist_ok=True)
            self.keep.write_text(raw)

    def per_event_ms(self, events: int) -> dict[str, float]:
        """CPU ms per event by stage (`total` always; the stages only with py-spy's samples)."""
        total = 1000 * self.cpu_s / max(events, 1)
        sampled = sum(self.samples.values())
        out = {"total": round(total, 3)}
        for stage, count in self.samples.most_common():
            out[stage] = round(total * count / sampled, 3)
        return out

    def threads_ms(self, events: int) -> dict[str, float]:
        """CPU ms per event by thread name, busiest first (threads that used none left out)."""
        per = {name: 1000 * s / max(events, 1) for name, s in self.threads_s.most_common() if s > 0}
        return {name: round(ms, 3) for name, ms in per.items()}


def table(per_event: dict[str, dict[str, float]]) -> list[str]:
    """Side-by-side lines: stage, then each system's CPU ms per event."""
    names = list(per_event)
    stages = sorted({s for ms in per_event.values() for s in ms if s != "total"}, key=lambda s: _order(s, per_event))
    lines = ["# CPU ms per event, by stage: " + "  ".join(f"{n:>8}" for n in names)]
    for stage in ["total", *stages]:
        values = "  ".join(f"{per_event[n][stage]:8.2f}" if stage in per_event[n] else f"{'-':>8}" for n in names)
        lines.append(f"#   {stage:<40}{values}")
    return lines


def _order(stage: str, per_event: dict[str, dict[str, float]]) -> float:
    return -max(ms.get(stage, 0.0) for ms in per_event.values())

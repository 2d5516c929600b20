"""The worker side of the benchmarks' turn protocol, shared by bench_cpu.py, bench_gpu.py and bench_train.py.

A benchmark runs each framework in a long-lived worker process of its own
(the Keras backend is fixed per process, TensorFlow and torch are kept
apart). The worker prepares its cases (builds, traces, compiles, warms up),
then answers the orchestrator one line at a time on stdin/stdout:

- it prints `READY <json>`: whatever the benchmark reports about its
  preparation (first-call seconds, calls per turn, device, ...);
- each `RUN <key words...> <count>` runs one turn of the case named by the
  key words (e.g. `RUN fast 16 2`: key "fast 16", count 2) and is answered
  `TIME <seconds> ...`, one number per timed call or group of calls;
- `QUIT` (or the end of stdin) stops it.

The orchestrator (bench_cpu.Server on the other end) alternates turns
across the workers of all frameworks, so that a slow spell of a shared
machine falls on every framework alike. What one turn does (an untimed
call first or not, how many calls per number) is the benchmark's:
`serve` takes it as a callable.

It also holds what every benchmark shares: the machine facts it records
(`machine`, `allocator`) and `alternate`, the rounds of the benchmarks that
time a few forms in one process.
"""

import json
import os
import platform
import sys


def machine():
    """CPU model, AVX-512 (avx512f) and its 16-bit and VNNI extensions, core count,
    platform and load average now.

    Every benchmark records these: TensorFlow turns oneDNN on by itself only on
    CPUs with AVX-512, so the same run differs between machines of one kind;
    and oneDNN takes float16 ops only where the CPU has `avx512_fp16`.
    """
    model, flags = platform.processor(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:  # a flag counts when every core has it
                    core = set(line.split(":", 1)[1].split())
                    flags = core if flags is None else flags & core
    except OSError:  # not Linux
        pass
    flags = flags or set()
    return {"cpu": model, "avx512": "avx512f" in flags,
            **{flag: flag in flags for flag in ("avx512_vnni", "avx512_bf16", "avx512_fp16")},
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "load_average_at_start": list(os.getloadavg())}


def alternate(measure, names, rounds):
    """`{name: [measure(name), one per round]}`, every name measured once a round.

    The order turns around each round (a, b, c, then c, b, a), so that a
    drift of a shared machine's speed, or the cost of coming first after
    another, falls on every name alike.
    """
    names = list(names)
    results = {name: [] for name in names}
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            results[name].append(measure(name))
    return results


def allocator():
    """"jemalloc" when a jemalloc library is loaded in this process, "default" when not.

    Read off the process's own memory map, not its environment: the loader
    ignores an `LD_PRELOAD` it cannot open (a warning on stderr) and the C
    library's allocator runs. "unknown" where there is no `/proc` (not Linux).
    """
    try:
        with open("/proc/self/maps") as f:
            return "jemalloc" if "jemalloc" in f.read() else "default"
    except OSError:
        return "unknown"


def serve(ready, turn, lines=None, out=None):
    """Prints `READY <ready as JSON>`, then answers `RUN` requests with `turn` until `QUIT`.

    Args:
        ready: a JSON-serialisable report of the worker's preparation.
        turn: `turn(key, count)` -> a list of seconds; `key` is the words
            between `RUN` and the count, joined by one space.
        lines: the requests (default: stdin).
        out: where answers go (default: stdout).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> serve({"x": 1}, lambda key, count: [0.5] * count, ["RUN fast 16 2\\n", "QUIT\\n"], out)
        >>> out.getvalue()
        'READY {"x": 1}\\nTIME 0.5 0.5\\n'
    """
    lines = sys.stdin if lines is None else lines
    out = sys.stdout if out is None else out
    out.write("READY " + json.dumps(ready) + "\n")
    out.flush()
    for line in lines:
        words = line.split()
        if not words or words[0] == "QUIT":
            break
        if words[0] != "RUN" or len(words) < 3 or not words[-1].isdigit():
            raise ValueError(f"Worker request not understood. Received: {line.strip()!r}. "
                             "Accepted: 'RUN <key words> <count>' or 'QUIT'.")
        times = turn(" ".join(words[1:-1]), int(words[-1]))
        out.write("TIME " + " ".join(repr(float(t)) for t in times) + "\n")
        out.flush()

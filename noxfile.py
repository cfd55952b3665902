"""Tasks for the plugtune monorepo (pip + venv: nox's default backend).

    nox -t tests            core, every plugin alone, integration, lint (what CI runs)
    nox -s demo             the embedded default run (plugtune train demo)
    nox -s bench            throughput / padding / memory benchmark
    nox -s experiments      SAMSum / packing / causal LM / forgetting / DPO on SmolLM2 (~40 min)
    nox -s "plugin(name='llama')"   one plugin in a venv with only core + that plugin

torch is installed first from the local CPU wheel and pinned by constraints.txt, so no
dependency can pull a CUDA build.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

ROOT = os.path.dirname(os.path.abspath(__file__))
PLUGINS = ["t5", "llama", "falcon", "mistral", "vision", "gemma", "qwen3", "gpt-oss", "phi"]
CONSTRAINTS = ("-c", os.path.join(ROOT, "constraints.txt"))
PYTEST = ("pytest", "-q", "-ra", "-p", "no:cacheprovider")


def _install(session: nox.Session, *pkgs: str) -> None:
    session.install("torch==2.13.0", *CONSTRAINTS)
    session.install(*CONSTRAINTS, *pkgs)


def _prune_when_ci(session: nox.Session) -> None:
    """Remove this session's venv once its tests ran when ``PLUGTUNE_PRUNE_VENVS=1`` (set by
    ``.ci/run``): each test venv holds torch and the HF stack (~1.8 GB), and eight of them at
    once filled a CI disk. Locally the venvs stay, for ``reuse_existing_virtualenvs``."""
    import shutil

    loc = getattr(session.virtualenv, "location", None)
    if os.environ.get("PLUGTUNE_PRUNE_VENVS") == "1" and loc and os.path.isdir(loc):
        session.log(f"removing {loc} (PLUGTUNE_PRUNE_VENVS=1)")
        shutil.rmtree(loc, ignore_errors=True)


def _pytest(session: nox.Session, *args: str) -> None:
    try:
        session.run(*PYTEST, *args, *session.posargs)
    finally:
        _prune_when_ci(session)


def _core(extras: str = "test,eval,quant,gguf,tensorboard") -> str:  # tensorboard: report_to test
    return f"{ROOT}/packages/core[{extras}]"


@nox.session(tags=["tests"])
def core(session: nox.Session) -> None:
    """Core tests with no family plugin installed."""
    _install(session, _core())
    _pytest(session, "packages/core/tests")


@nox.session(tags=["tests"])
@nox.parametrize("name", PLUGINS)
def plugin(session: nox.Session, name: str) -> None:
    """One plugin's tests in a venv holding only core + that plugin."""
    extra = ",vision" if name == "vision" else ""
    _install(session, _core("test,eval,quant" + extra), f"{ROOT}/packages/plugin-{name}")
    _pytest(session, f"packages/plugin-{name}/tests")


@nox.session(tags=["tests"])
def integration(session: nox.Session) -> None:
    """End-to-end tests with every plugin installed (real inputs from ../shared/data), plus the
    benchmark's bookkeeping tests (no timing)."""
    _install(session, _core("test,eval,quant,vision,gguf"),
             *[f"{ROOT}/packages/plugin-{n}" for n in PLUGINS])  # gguf: SmolLM2 (in and out)
    _pytest(session, "tests", "bench/test_bench.py", "bench/test_gpu.py",
            # the architecture contract through whichever installed plugin claims each row
            "packages/core/tests/test_architectures.py::test_contract_with_installed_plugins")


@nox.session(tags=["tests"])
def lint(session: nox.Session) -> None:
    session.install("ruff")
    try:
        session.run("ruff", "check", "packages", "tests", "bench", "experiments", "noxfile.py")
    finally:
        _prune_when_ci(session)


@nox.session
def demo(session: nox.Session) -> None:
    """The embedded default: a tiny model learns a synthetic task; prints before/after."""
    _install(session, _core("eval"), *[f"{ROOT}/packages/plugin-{n}" for n in PLUGINS])
    session.run("plugtune", "train", "demo", "--set", "output_dir=runs/demo", "--overwrite",
                *session.posargs)
    session.run("plugtune", "generate", "runs/demo", "--prompt", "reverse abcdef =")


@nox.session
def bench(session: nox.Session) -> None:
    """Throughput / padding / memory: plugtune vs TRL SFTTrainer (default, packing) vs a bare
    torch loop, plus data-preparation scaling; writes bench/results/<timestamp>.{json,md,png}.
    Extra arguments go to bench/run.py (e.g. ``nox -s bench -- --quick``)."""
    # gguf: transformers reads the SmolLM2-135M-Instruct GGUF of the third workload with it
    _install(session, _core("test"), f"{ROOT}/packages/plugin-llama", "trl", "gguf")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session
def experiments(session: nox.Session) -> None:
    """The classic instruction-tuning experiments on SmolLM2-135M-Instruct and stories260K with
    real data from ../shared/data (ROUGE, packing, perplexity, forgetting, DPO); writes
    experiments/results/<UTC time>.{json,md,png}. ``nox -s experiments -- --quick`` is the smoke."""
    _install(session, _core("eval,quant"), f"{ROOT}/packages/plugin-llama", "gguf")
    session.run("python", "experiments/run.py", *session.posargs)

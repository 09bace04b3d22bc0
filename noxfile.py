"""Every task of the project: ``nox -s demo``, ``nox -s tests``, ``nox -l`` for the rest."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"  # pip, which takes the CPU torch wheel on this disk
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).parent
DEV_CHECKPOINT = ROOT / "build" / "sdxl-dev.safetensors"
DEV_MODEL = ROOT / "models" / "sdxl-dev"
DEMO_OUT = ROOT / "outputs" / "demo"


def install_runtime(session: nox.Session) -> None:
    session.install("-r", "requirements.txt")


def install_dev(session: nox.Session) -> None:
    session.install("-r", "requirements.txt", "-r", "requirements-dev.txt")


def make_dev_model(session: nox.Session) -> None:
    session.run("python", "-m", "model_build", "dev-checkpoint", str(DEV_CHECKPOINT))
    session.run("python", "-m", "model_build", "convert", str(DEV_CHECKPOINT), "--output", str(DEV_MODEL))
    session.run("python", "-m", "model_build", "verify", str(DEV_MODEL), "--full")


@nox.session
def convert(session: nox.Session) -> None:
    """Convert a checkpoint: nox -s convert -- SOURCE --output models/NAME [--dtype ..] [--force]."""
    install_runtime(session)
    session.run("python", "-m", "model_build", "convert", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Build the dev model (random weights: its images are noise), convert and verify it."""
    install_runtime(session)
    make_dev_model(session)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (CPU, offline, dev model)."""
    install_dev(session)
    session.run("pytest", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("-r", "requirements-dev.txt")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")

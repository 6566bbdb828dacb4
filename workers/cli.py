"""The `teachercache worker` command (added through the `teachercache.cli` entry point)."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer


def worker(teacher: Annotated[str | None, typer.Option(help="default: the registry's default teacher")] = None,
           engine: Annotated[str | None, typer.Option(help="vllm, remote or scripted; default: remote for a remote teacher, else vllm")] = None) -> None:
    """Claim and run pending requests for one teacher until SIGTERM."""
    from workers.main import run_worker
    from workers.memory import EngineStartFailed
    from workers.settings import WorkerSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in {"teacher": teacher, "engine": engine}.items() if v is not None}
    try:
        code = run_worker(WorkerSettings(**overrides))
    except EngineStartFailed as exc:
        typer.echo(f"teachercache worker: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)


def main() -> None:
    app = typer.Typer()
    app.command()(worker)
    sys.exit(app())

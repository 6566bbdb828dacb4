"""The `teachercache worker` command (added through the `teachercache.cli` entry point)."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer


def worker(teacher: Annotated[str | None, typer.Option(help="default: the registry's default teacher")] = None,
           engine: Annotated[str | None, typer.Option(help="vllm, remote or scripted; default: remote for a remote teacher, else vllm")] = None) -> None:
    """Claim and run pending requests for one teacher until SIGTERM."""
    from workers.main import run_worker
    from workers.memory import EngineStartFailed
    from workers.settings import WorkerSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {k: v for k, v in {"teacher": teacher, "engine": engine}.items() if v is not None}
    try:
        code = run_worker(WorkerSettings(**overrides))
    except EngineStartFailed as exc:
        typer.echo(f"teachercache worker: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def fleet(teacher: Annotated[list[str], typer.Option(help="a teacher to serve; repeat for several (one pool each)")],
          min_replicas: Annotated[int | None, typer.Option(help="replicas kept running, even with no work")] = None,
          max_replicas: Annotated[int | None, typer.Option(help="replicas at most, per teacher")] = None,
          gpus_per_replica: Annotated[float | None, typer.Option(
              help="GPUs each replica reserves; default: the teacher's tensor_parallel_size")] = None,
          address: Annotated[str | None, typer.Option(
              help="Ray cluster: auto, ray://HEAD:10001; default: RAY_ADDRESS, else a local cluster")] = None,
          engine: Annotated[str | None, typer.Option(help="vllm (default) or scripted")] = None) -> None:
    """Run worker replicas on Ray, scaled between min and max with each teacher's pending work, until SIGTERM."""
    from pydantic import ValidationError

    from service.errors import NotFound
    from workers.fleet.settings import FleetSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given: dict[str, Any] = {"min_replicas": min_replicas, "max_replicas": max_replicas, "gpus_per_replica": gpus_per_replica,
             "ray_address": address, "engine": engine}
    try:
        settings = FleetSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        typer.echo(f"teachercache fleet: {problems}", err=True)
        raise typer.Exit(2) from None
    try:
        from workers.fleet.ray_pool import run_fleet
    except ImportError as exc:
        typer.echo(f"teachercache fleet: Ray is not installed ({exc}); pip install 'teachercache[server,ray]'", err=True)
        raise typer.Exit(2) from None
    try:
        run_fleet(settings, teacher)
    except NotFound as exc:  # an unknown teacher: said before anything starts
        typer.echo(f"teachercache fleet: {exc}", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
    app.command("fleet")(fleet)


def main() -> None:
    app = typer.Typer()
    app.command()(worker)
    sys.exit(app())

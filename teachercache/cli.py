"""The ``teachercache`` command line.

Client commands live here: submit, status, list, cancel, download, errors. Each takes
``--url`` ($TEACHERCACHE_URL), ``--api-key`` ($TEACHERCACHE_API_KEY) and ``--json``
(machine-readable output on stdout; progress and errors go to stderr).

The server commands (up, serve, worker, db, teacher) are not imported from here: the
server package adds them through the ``teachercache.cli`` entry point group, so a
student machine with only this package installed gets only the client commands.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from teachercache._http import API_KEY_ENV, DEFAULT_URL, URL_ENV
from teachercache._progress import JobWatch
from teachercache._states import FINISHED, JobStatus
from teachercache.client import Client
from teachercache.errors import TeachercacheError

PLUGIN_GROUP = "teachercache.cli"

app = typer.Typer(
    name="teachercache",
    help="Teacher completions + top-k logprobs for knowledge distillation, computed once and cached.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
error_console = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar=URL_ENV, help="The service's base URL.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar=API_KEY_ENV, help="Sent as a Bearer token.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON on stdout, for scripts.")]
JobId = Annotated[str, typer.Argument(help="The job's id.")]


@contextmanager
def _client(url: str, api_key: str | None) -> Iterator[Client]:
    """A client whose errors become a one-line message and exit status 1."""
    try:
        with Client(url, api_key=api_key) as client:
            yield client
    except TeachercacheError as exc:
        error_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None


def _print_json(value: Any) -> None:
    # Plain print: rich would wrap long lines and break the JSON.
    print(json.dumps(value, indent=2, default=str))


def _output(value: Any, as_json: bool, show: Callable[[Any], None]) -> None:
    if as_json:
        _print_json(value)
    else:
        show(value)


def _sampling(
    max_tokens: int | None, temperature: float | None, seed: int | None, n: int | None
) -> dict[str, Any]:
    given = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "n": n}
    return {key: value for key, value in given.items() if value is not None}


@app.command()
def submit(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="JSONL, one request object per line.")
    ],
    teacher: Annotated[
        str | None, typer.Option(help="Teacher name (the server's default if omitted).")
    ] = None,
    top_logprobs: Annotated[int | None, typer.Option(help="k: alternatives recorded per token.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens generated per sample.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (part of the cache key).")] = None,
    n: Annotated[int | None, typer.Option(help="Samples per prompt.")] = None,
    mode: Annotated[
        str, typer.Option(help="generate, or score (teacher-forced on given responses).")
    ] = "generate",
    cache: Annotated[str | None, typer.Option(help="use, refresh or bypass.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to finish.")] = False,
    out: Annotated[Path | None, typer.Option(help="Wait, then download the shards into this folder.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Resubmitting with the same key returns the same job.")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Submit a JSONL file of requests; print the job (with --out: {"job", "files"})."""
    with _client(url, api_key) as client:
        job = client.submit(
            jsonl_path=file,
            teacher=teacher,
            mode=mode,
            top_logprobs=top_logprobs,
            sampling=_sampling(max_tokens, temperature, seed, n),
            cache=cache,
            idempotency_key=idempotency_key,
        )
        if wait or out:
            job = client.wait(job)
        files = client.download(job, out) if out and job["status"] == JobStatus.SUCCEEDED else None
    _show_submitted(job, files, as_json)
    _exit_unless_succeeded(job, waited=bool(wait or out))


def _show_submitted(job: dict[str, Any], files: list[Path] | None, as_json: bool) -> None:
    if as_json:
        _print_json(job if files is None else {"job": job, "files": [str(path) for path in files]})
        return
    _show_job(job)
    _show_paths([str(path) for path in files or []])


def _exit_unless_succeeded(job: dict[str, Any], waited: bool) -> None:
    if waited and job["status"] != JobStatus.SUCCEEDED:
        error_console.print(f"[red]job {job['id']} ended {job['status']}[/red]")
        raise typer.Exit(1)


@app.command()
def status(
    job_id: JobId,
    watch: Annotated[bool, typer.Option("--watch", help="Redraw counts, rate and ETA until the job ends.")] = False,
    poll_interval: Annotated[float, typer.Option(min=0.05, help="Seconds between polls with --watch.")] = 1.0,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Show a job: status, counts, parameters, shards (with --watch: live, until it ends)."""
    with _client(url, api_key) as client:
        job = _watch(client, job_id, poll_interval) if watch else client.get(job_id)
    _output(job, as_json, _show_job)
    _exit_unless_succeeded(job, waited=watch)


def _watch(client: Client, job_id: str, poll_interval: float) -> dict[str, Any]:
    """Poll until the job ends, redrawing one table (on stderr, so stdout keeps the result)."""
    view = JobWatch()
    job = client.get(job_id)
    view.observe(job, time.monotonic())
    with Live(view.render(job), console=error_console, auto_refresh=False, transient=False) as live:
        while job["status"] not in FINISHED:
            time.sleep(poll_interval)
            job = client.get(job_id)
            view.observe(job, time.monotonic())
            live.update(view.render(job), refresh=True)
    return job


@app.command("list")
def list_jobs(
    limit: Annotated[int, typer.Option(help="Jobs per page.")] = 20,
    after: Annotated[str | None, typer.Option(help="The previous page's `next` cursor.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List jobs, newest first."""
    with _client(url, api_key) as client:
        page = client.list(limit=limit, after=after)
    _output(page, as_json, _show_job_table)


@app.command()
def cancel(job_id: JobId, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Cancel a job: its pending requests are no longer handed out."""
    with _client(url, api_key) as client:
        job = client.cancel(job_id)
    _output(job, as_json, _show_job)


@app.command()
def download(
    job_id: JobId,
    out: Annotated[Path, typer.Option(help="Folder for the shards.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Download a job's shards (resumable, sha256-verified)."""
    with _client(url, api_key) as client:
        files = client.download(job_id, out)
    _output([str(path) for path in files], as_json, _show_paths)


@app.command()
def errors(job_id: JobId, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List a job's failed requests and why they failed."""
    with _client(url, api_key) as client:
        failed = client.errors(job_id)
    _output(failed, as_json, _show_errors)


def _show_paths(paths: list[str]) -> None:
    for path in paths:
        console.print(path, highlight=False)


def _show_job(job: dict[str, Any]) -> None:
    counts = job.get("counts") or {}
    title = f"[bold]{job.get('id')}[/bold]  {job.get('status')}"
    console.print(f"{title}  teacher={job.get('teacher')}  mode={job.get('mode')}")
    console.print("  " + "  ".join(f"{key}={value}" for key, value in counts.items()), highlight=False)
    for shard in job.get("shards") or []:
        console.print(
            f"  shard {shard.get('index')}: {shard.get('rows')} rows  {shard.get('url')}", highlight=False
        )


def _show_job_table(page: dict[str, Any]) -> None:
    table = Table("id", "status", "teacher", "done/total", "created")
    for job in page.get("data", []):
        counts = job.get("counts") or {}
        done = sum(int(counts.get(key) or 0) for key in ("completed", "cached", "failed"))
        table.add_row(
            job.get("id"),
            job.get("status"),
            job.get("teacher"),
            f"{done}/{counts.get('total')}",
            job.get("created_at"),
        )
    console.print(table)
    if page.get("has_more"):
        console.print(f"more: --after {page.get('next')}", highlight=False)


def _show_errors(failed: list[dict[str, Any]]) -> None:
    table = Table("request_index", "custom_id", "error")
    for item in failed:
        table.add_row(str(item.get("request_index")), str(item.get("custom_id")), str(item.get("error")))
    console.print(table)


def register_plugins(target: typer.Typer) -> dict[str, str]:
    """Let installed packages add commands: each ``teachercache.cli`` entry point is a
    ``register(app)`` function. One whose package cannot be imported is skipped (e.g. the
    server's, where only the client is installed); returns those, with why: {name: error}."""
    skipped = {}
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            register = entry_point.load()
        except ImportError as exc:
            skipped[entry_point.name] = str(exc)
            continue
        register(target)
    return skipped


def _command_names(target: typer.Typer) -> set[str]:
    names = {info.name or info.callback.__name__.replace("_", "-") for info in target.registered_commands
             if info.callback is not None}
    return names | {info.name for info in target.registered_groups if info.name}


def _refuse_missing_command(argv: list[str], skipped: dict[str, str]) -> None:
    """A command that is not here while a plugin could not load is most likely one of its
    commands: say which extra brings it instead of typer's bare "No such command"."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command is None or not skipped or command in _command_names(app):
        return
    reasons = "; ".join(dict.fromkeys(skipped.values()))  # the server's plugins fail for one reason
    # Plain print: rich would wrap the pip command across lines.
    print(f"error: no command {command!r} in this installation. {reasons}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    skipped = register_plugins(app)
    _refuse_missing_command(sys.argv[1:], skipped)
    app()


if __name__ == "__main__":
    main()

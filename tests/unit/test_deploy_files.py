"""Static checks of the deployment files: Dockerfile, docker-compose.yml, .dockerignore.

Docker is not available where the tests run, so these read the files and hold them against
the code they deploy: the build targets exist, every TEACHERCACHE_* variable is a setting
(and its value validates), the commands exist in the CLI, the extras exist in pyproject.toml,
and the compose wiring (GPU reservation, shared volumes, migration order) is what a
deployment needs.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import typer
import yaml
from pydantic import AliasChoices, AliasPath
from pydantic_settings import BaseSettings

from service.settings import PROJECT_ROOT, ServiceSettings
from workers.settings import WorkerSettings

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
COMPOSE = PROJECT_ROOT / "docker-compose.yml"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"
PYPROJECT = PROJECT_ROOT / "pyproject.toml"

EXPECTED_DATABASE_URL = "postgresql://teachercache:teachercache@postgres:5432/teachercache"
ENV_NAME = re.compile(r"\bTEACHERCACHE_[A-Z0-9_]+\b")


# ---------------------------------------------------------------------------------------------
# Dockerfile parsing
# ---------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (also inside a continuation) and blank lines between instructions
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in dockerfile_instructions(text):
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=base))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, found {keyword}"
            key, _, value = args.partition("=")
            global_args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def exec_form(args: str) -> list[str]:
    """CMD/ENTRYPOINT arguments as argv (JSON exec form, or shell form run by /bin/sh -c)."""
    if args.startswith("["):
        return json.loads(args)
    return ["/bin/sh", "-c", args]


def env_pairs(args: str) -> dict[str, str]:
    """`ENV K=V K2="V 2"` (and the legacy `ENV K V`)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def copy_from(args: str) -> str | None:
    match = re.search(r"--from=(\S+)", args)
    return match.group(1) if match else None


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def stages(dockerfile_text) -> dict[str, Stage]:
    _, parsed = parse_dockerfile(dockerfile_text)
    named = {stage.name: stage for stage in parsed}
    assert len(named) == len(parsed), "two stages share a name"
    return named


def closure(stages: dict[str, Stage], target: str) -> list[Stage]:
    """The stages a target is built from: its FROM chain and the stages it copies from."""
    seen: list[str] = []

    def visit(name: str) -> None:
        if name in seen or name not in stages:
            return
        seen.append(name)
        stage = stages[name]
        visit(stage.base)
        for args in stage.all("COPY") + stage.all("ADD"):
            if source := copy_from(args):
                visit(source)

    visit(target)
    return [stages[name] for name in seen]


def image_env(stages: dict[str, Stage], target: str) -> dict[str, str]:
    """ENV of the final image: the FROM chain's ENV instructions, base first."""
    chain: list[Stage] = []
    name: str | None = target
    while name in stages:
        chain.append(stages[name])
        name = stages[name].base
    env: dict[str, str] = {}
    for stage in reversed(chain):
        for args in stage.all("ENV"):
            env.update(env_pairs(args))
    return env


def root_image(stages: dict[str, Stage], target: str) -> str:
    """The registry image a target finally builds on."""
    name = target
    while name in stages:
        name = stages[name].base
    return name


def image_instruction(stages: dict[str, Stage], target: str, keyword: str) -> str | None:
    """The effective CMD/ENTRYPOINT/USER/HEALTHCHECK of a target (inherited through FROM)."""
    name: str | None = target
    while name in stages:
        value = stages[name].last(keyword)
        if value is not None:
            return value
        name = stages[name].base
    return None


# ---------------------------------------------------------------------------------------------
# compose
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict)
    return document


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def build_target(service: dict) -> str | None:
    build = service.get("build")
    if isinstance(build, dict):
        return build.get("target")
    return None


def project_services(services: dict[str, dict]) -> dict[str, dict]:
    """The services that run one of this project's images (built from the Dockerfile)."""
    return {name: svc for name, svc in services.items() if build_target(svc)}


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def effective_env(stages, service: dict) -> dict[str, str]:
    return {**image_env(stages, build_target(service)), **service_env(service)}


def effective_argv(stages, service: dict) -> list[str]:
    """What the container runs: Docker's rules for entrypoint/command overrides."""
    target = build_target(service)
    if "entrypoint" in service:
        entrypoint = service["entrypoint"]
        image_cmd: list[str] = []  # setting the entrypoint drops the image's CMD
    else:
        entrypoint = image_instruction(stages, target, "ENTRYPOINT")
        entrypoint = exec_form(entrypoint) if entrypoint else []
        cmd = image_instruction(stages, target, "CMD")
        image_cmd = exec_form(cmd) if cmd else []
    if isinstance(entrypoint, str):
        entrypoint = shlex.split(entrypoint)
    command = service.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    return list(entrypoint) + (list(command) if command else image_cmd)


def named_volume_at(service: dict, container_path: str, declared: set[str]) -> str | None:
    """The named volume whose mount point holds container_path (the deepest mount wins)."""
    best: tuple[int, str] | None = None
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = volume.get("source"), volume.get("target")
        if not target or source not in declared:
            continue
        if PurePosixPath(container_path).is_relative_to(PurePosixPath(target)):
            if best is None or len(target) > best[0]:
                best = (len(target), source)
    return best[1] if best else None


def duration_s(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------------------------------------
# settings and CLI
# ---------------------------------------------------------------------------------------------


def settings_env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variables a pydantic-settings class reads, from its fields."""
    prefix = cls.model_config.get("env_prefix", "")
    names: set[str] = set()
    for field_name, info in cls.model_fields.items():
        alias = info.validation_alias or info.alias
        if alias is None:
            names.add(f"{prefix}{field_name}")
        elif isinstance(alias, str):
            names.add(alias)
        elif isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, AliasPath) and isinstance(alias.path[0], str):
            names.add(alias.path[0])
    if not cls.model_config.get("case_sensitive", False):
        names = {name.upper() for name in names}
    return names


KNOWN_ENV = settings_env_names(ServiceSettings) | settings_env_names(WorkerSettings)


def load_settings(cls: type[BaseSettings], env: dict[str, str], monkeypatch) -> BaseSettings:
    """Build the settings from exactly `env` (nothing from this process or a .env file)."""
    import os

    for key in list(os.environ):
        if key.upper().startswith("TEACHERCACHE_") or key.upper() == "DATABASE_URL":
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("TEACHERCACHE_"):
            monkeypatch.setenv(key, value)
    return cls(_env_file=None)


@pytest.fixture(scope="module")
def cli():
    from service.cli import register as register_service
    from workers.cli import register as register_worker

    app = typer.Typer()
    register_service(app)
    register_worker(app)
    command = typer.main.get_command(app)
    assert is_group(command)
    return command


def is_group(command) -> bool:
    # Duck-typed: typer may ship its own copy of click, so no isinstance against click.Group.
    return isinstance(getattr(command, "commands", None), dict)


def resolve_cli(cli, argv: list[str]):
    """Follow `teachercache a b ...` through the CLI's groups; check options on the leaf command."""
    assert argv and argv[0] == "teachercache", f"not a teachercache command: {argv}"
    command = cli
    path: list[str] = []
    rest = argv[1:]
    while is_group(command):
        assert rest and not rest[0].startswith("-"), f"{argv}: {' '.join(path) or 'teachercache'} needs a subcommand"
        name, rest = rest[0], rest[1:]
        assert name in command.commands, f"{argv}: no command {name!r} (have {sorted(command.commands)})"
        command = command.commands[name]
        path.append(name)
    options = {opt for param in command.params for opt in param.opts if opt.startswith("-")}
    for word in rest:
        if word.startswith("-"):
            assert word.split("=", 1)[0] in options, f"{argv}: {' '.join(path)} has no option {word!r}"
    return path, command


# ---------------------------------------------------------------------------------------------
# tests: Dockerfile
# ---------------------------------------------------------------------------------------------


def test_dockerfile_has_api_and_worker_targets(stages):
    assert {"api", "worker"} <= set(stages)
    assert root_image(stages, "api").startswith("python:3.11"), "the API runs on python:3.11-slim"


def test_build_targets_exist(services, stages):
    targets = {name: build_target(svc) for name, svc in services.items() if "build" in svc}
    assert {"migrate", "api", "worker"} <= set(targets), "migrate, api and worker are built from the Dockerfile"
    for name, target in targets.items():
        build = services[name]["build"]
        assert Path(build.get("context", ".")).resolve() == PROJECT_ROOT.resolve() or build.get("context") == "."
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert target in stages, f"service {name}: build target {target!r} is not a stage (FROM ... AS {target})"
    # One image name, one target: compose tags what it builds with the service's `image`.
    by_image: dict[str, set[str]] = {}
    for name, svc in project_services(services).items():
        by_image.setdefault(svc.get("image", name), set()).add(build_target(svc))
    assert all(len(t) == 1 for t in by_image.values()), by_image
    assert build_target(services["api"]) == build_target(services["migrate"]) == "api"
    assert build_target(services["worker"]) == "worker"


def test_api_stage(stages):
    assert "8080" in " ".join(stages["api"].all("EXPOSE")).split()
    healthcheck = image_instruction(stages, "api", "HEALTHCHECK")
    assert healthcheck and healthcheck.upper() != "NONE" and "/healthz" in healthcheck
    assert exec_form(image_instruction(stages, "api", "CMD"))[:2] == ["teachercache", "serve"]


def test_worker_stage_runs_the_worker(stages, cli):
    entrypoint = exec_form(image_instruction(stages, "worker", "ENTRYPOINT"))
    assert entrypoint[:2] == ["teachercache", "worker"]
    assert resolve_cli(cli, entrypoint)[0] == ["worker"]
    assert image_instruction(stages, "worker", "HEALTHCHECK") is None  # no HTTP server in a worker


@pytest.mark.parametrize("target", ["api", "worker"])
def test_images_run_as_a_non_root_user(stages, target):
    user = image_instruction(stages, target, "USER")
    assert user and user.split(":")[0] not in ("root", "0")


@pytest.mark.parametrize("target", ["api", "worker"])
def test_image_settings(stages, target, monkeypatch):
    env = image_env(stages, target)
    cls = WorkerSettings if target == "worker" else ServiceSettings
    settings = load_settings(cls, env, monkeypatch)
    assert settings.state_dir == Path("/data")
    assert settings.shards_uri == "/data/shards"
    assert settings.models_dir == Path("/models")
    assert settings.host == "0.0.0.0"
    assert settings.database_url is None  # the deployment says where its database is
    volume = image_instruction(stages, target, "VOLUME") or ""
    volumes = json.loads(volume) if volume.startswith("[") else volume.split()
    assert "/data" in volumes


def test_pip_extras_exist(stages):
    extras = set(tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"])
    installed: dict[str, set[str]] = {}
    for stage in stages.values():
        for args in stage.all("RUN"):
            for command in args.split("&&"):
                if not re.search(r"\bpip3? install\b", command):
                    continue
                words = shlex.split(command)
                if "pip" not in words or "install" not in words:
                    continue
                for word in words[words.index("install") + 1:]:
                    if match := re.fullmatch(r"\.\[([^\]]*)\]", word):
                        found = {e.strip() for e in match.group(1).split(",") if e.strip()}
                        assert found <= extras, f"stage {stage.name}: extras {found - extras} not in pyproject.toml"
                        installed.setdefault(stage.name, set()).update(found)
    api_extras = set().union(*(installed.get(s.name, set()) for s in closure(stages, "api")))
    worker_extras = set().union(*(installed.get(s.name, set()) for s in closure(stages, "worker")))
    assert not api_extras & {"cpu", "gpu"}, "the API image installs no engine"
    assert "gpu" in worker_extras, "the worker image installs the `gpu` extra (the CUDA vllm wheel)"


def test_dockerfile_copies_what_exists_and_is_not_ignored(stages):
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        excluded = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").strip("/")
            candidates = [pattern, pattern.replace("**/", "")] if pattern.startswith("**/") else [pattern]
            parts = PurePosixPath(path).parts
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatchcase(prefix, c) for c in candidates for prefix in prefixes):
                excluded = not negate
        return excluded

    for stage in stages.values():
        for args in stage.all("COPY"):
            if copy_from(args):
                continue
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            for source in words[:-1]:
                assert (PROJECT_ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
    for needed in ("pyproject.toml", "README.md", "alembic.ini", "migrations", "service", "workers", "teachercache"):
        assert not ignored(needed), f"{needed} is needed in the build context"
    for unwanted in (".venv", ".state", "models", ".git", "service/__pycache__", ".env"):
        assert ignored(unwanted), f"{unwanted} should not be sent to the Docker daemon"


def test_migrations_are_placed_where_service_migrate_looks(stages):
    """`service.migrate` reads PROJECT_ROOT/alembic.ini and PROJECT_ROOT/migrations; after a
    regular `pip install .` PROJECT_ROOT is site-packages, so the build stages must put them there."""
    for target in ("api", "worker"):
        runs = " ".join(args for stage in closure(stages, target) for args in stage.all("RUN"))
        assert "PROJECT_ROOT" in runs and "alembic.ini" in runs and "migrations" in runs, target


# ---------------------------------------------------------------------------------------------
# tests: settings names and values
# ---------------------------------------------------------------------------------------------


def test_settings_env_names_are_computed():
    # Guards the computation itself: a prefixed field, the alias pair, a worker-only field.
    assert {"TEACHERCACHE_STATE_DIR", "TEACHERCACHE_DATABASE_URL", "DATABASE_URL", "TEACHERCACHE_DRAIN_S"} <= KNOWN_ENV


@pytest.mark.parametrize("path", [DOCKERFILE, COMPOSE], ids=lambda p: p.name)
def test_every_teachercache_variable_is_a_setting(path):
    used = set(ENV_NAME.findall(path.read_text()))
    assert used, f"{path.name} sets no TEACHERCACHE_* variable"
    unknown = used - KNOWN_ENV
    assert not unknown, f"{path.name}: {sorted(unknown)} are not fields of ServiceSettings/WorkerSettings"


def test_service_settings_validate(services, stages, monkeypatch):
    """Each project container's environment (image ENV + compose) builds its settings class."""
    for svc in project_services(services).values():
        cls = WorkerSettings if build_target(svc) == "worker" else ServiceSettings
        with monkeypatch.context() as patch:
            load_settings(cls, effective_env(stages, svc), patch)


def test_all_services_share_database_and_storage(services, stages, monkeypatch):
    seen: dict[str, tuple] = {}
    for name, svc in project_services(services).items():
        env = service_env(svc)
        assert env.get("TEACHERCACHE_DATABASE_URL") == EXPECTED_DATABASE_URL, name
        assert "TEACHERCACHE_STORAGE_URI" in env, name
        with monkeypatch.context() as patch:
            settings = load_settings(WorkerSettings, effective_env(stages, svc), patch)
        seen[name] = (settings.database_url, settings.shards_uri, settings.state_dir, settings.models_dir)
    assert len(set(seen.values())) == 1, seen
    host = EXPECTED_DATABASE_URL.split("@")[1].split(":")[0]
    assert host in services


# ---------------------------------------------------------------------------------------------
# tests: compose wiring
# ---------------------------------------------------------------------------------------------


def test_postgres_service(services, compose):
    postgres = services["postgres"]
    assert str(postgres["image"]).startswith("postgres:16")
    env = service_env(postgres)
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]) == ("teachercache",) * 3
    declared = set(compose.get("volumes") or {})
    assert named_volume_at(postgres, "/var/lib/postgresql/data", declared), "postgres keeps its data in a named volume"
    assert "pg_isready" in json.dumps(postgres["healthcheck"]["test"])


def test_migrate_runs_db_upgrade_and_the_others_wait(services, stages, cli):
    migrate = services["migrate"]
    path, _ = resolve_cli(cli, effective_argv(stages, migrate))
    assert path == ["db", "upgrade"]
    assert str(migrate.get("restart", "no")) == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        for dependency, rule in depends.items():
            assert dependency in services, f"{name} depends on an unknown service {dependency}"
            if services[dependency].get("restart", "no") == "no" and dependency != "postgres":
                assert rule["condition"] == "service_completed_successfully", (name, dependency)


def test_compose_commands_exist_in_the_cli(services, stages, cli):
    expected = {"migrate": ["db", "upgrade"], "api": ["serve"], "worker": ["worker"]}
    for name, svc in project_services(services).items():
        argv = effective_argv(stages, svc)
        path, _ = resolve_cli(cli, argv)
        if name in expected:
            assert path == expected[name], (name, argv)


def test_worker_reserves_a_gpu(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and int(d.get("count", 0)) >= 1 and "gpu" in d.get("capabilities", [])
        for d in devices
    ), devices


def test_api_and_worker_share_the_shard_volume(services, stages, compose, monkeypatch):
    declared = set(compose.get("volumes") or {})
    shard_volumes = {}
    model_volumes = {}
    for name in ("api", "worker"):
        svc = services[name]
        with monkeypatch.context() as patch:
            settings = load_settings(WorkerSettings, effective_env(stages, svc), patch)
        assert settings.shards_uri.startswith("/"), "compose keeps shards on a volume (a local path)"
        shard_volumes[name] = named_volume_at(svc, settings.shards_uri, declared)
        model_volumes[name] = named_volume_at(svc, str(settings.models_dir), declared)
    assert shard_volumes["api"] and shard_volumes["api"] == shard_volumes["worker"], shard_volumes
    # The API tokenizes with the teacher's tokenizer, the worker loads its weights: one models volume.
    assert model_volumes["api"] and model_volumes["api"] == model_volumes["worker"], model_volumes


def test_teacher_is_prepared_into_the_models_volume(services, stages, compose, cli, monkeypatch):
    declared = set(compose.get("volumes") or {})
    preparers = [name for name, svc in project_services(services).items()
                 if resolve_cli(cli, effective_argv(stages, svc))[0] == ["teacher", "prepare"]]
    assert preparers, "some service runs `teachercache teacher prepare`"
    worker = services["worker"]
    with monkeypatch.context() as patch:
        models_dir = str(load_settings(WorkerSettings, effective_env(stages, worker), patch).models_dir)
    for name in preparers:
        svc = services[name]
        assert build_target(svc) == "worker", "conversion needs torch and gguf (the worker image)"
        assert named_volume_at(svc, models_dir, declared) == named_volume_at(worker, models_dir, declared)
        assert worker["depends_on"][name]["condition"] == "service_completed_successfully"
        assert services["api"]["depends_on"][name]["condition"] == "service_completed_successfully"


def test_worker_restarts_and_has_time_to_drain(services, stages, monkeypatch):
    worker = services["worker"]
    assert worker.get("restart") in ("unless-stopped", "always", "on-failure")
    with monkeypatch.context() as patch:
        settings = load_settings(WorkerSettings, effective_env(stages, worker), patch)
    grace = duration_s(worker.get("stop_grace_period", "10s"))
    assert grace >= settings.drain_s + 10, f"stop_grace_period {grace}s leaves no time to drain {settings.drain_s}s"
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_api_publishes_its_port(services, stages, monkeypatch):
    api = services["api"]
    with monkeypatch.context() as patch:
        settings = load_settings(ServiceSettings, effective_env(stages, api), patch)
    assert settings.host == "0.0.0.0"
    published = [str(p) for p in api.get("ports", [])]
    assert any(p.split(":")[-1].split("/")[0] == str(settings.port) for p in published), published

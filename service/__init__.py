"""teachercache service: domain, persistence, storage and the HTTP API.

The client (``teachercache``) installs alone; this package needs the ``server`` extra. Without it,
importing the package fails here, at once, naming the extra, rather than deep inside some module.
"""

from importlib.util import find_spec

# What the server imports that the client does not install (import names of the `server` extra).
SERVER_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "psycopg", "alembic", "pydantic", "pydantic_settings", "yaml",
                  "prometheus_client", "transformers", "jinja2", "boto3")
_missing = [name for name in SERVER_MODULES if find_spec(name) is None]
if _missing:
    raise ImportError(f"teachercache's server needs the `server` extra: pip install 'teachercache[server]' "
                      f"(not installed: {', '.join(_missing)})")

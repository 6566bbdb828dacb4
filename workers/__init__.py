"""teachercache workers: the engine loop, engine adapters and the shard writer.

Like the service, they need the ``server`` extra: importing ``service`` checks it.
"""

import service  # noqa: F401  (ImportError naming the `server` extra when it is not installed)

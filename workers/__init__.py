"""teachercache workers: the engine loop, engine adapters and the shard writer."""

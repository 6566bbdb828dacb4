"""Results and shards as one domain: the cache index, result shards and job assembly."""

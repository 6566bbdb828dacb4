"""Jobs: submission, status, counts, finalization into output shards."""

"""OpenAI Batch API compatibility: files and batches on top of native jobs."""

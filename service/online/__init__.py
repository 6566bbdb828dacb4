"""The synchronous OpenAI/vLLM-compatible endpoints (`/v1/completions`, `/v1/chat/completions`,
`/v1/models`): each prompt becomes a request of a job in the interactive lane, and the answer is
rendered as `vllm serve` renders it (or as Arrow IPC). See docs/online.md."""

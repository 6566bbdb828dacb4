"""The HTTP layer (FastAPI). Handlers stay a few lines: they parse, call a service, commit."""

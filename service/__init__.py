"""teachercache service: domain, persistence, storage and the HTTP API."""

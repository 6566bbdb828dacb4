"""Tenants and their API keys: who may read and spend what."""

"""Shared by the hospital and the coordinator side: config, data, models, privacy, CLI."""

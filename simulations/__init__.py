"""Phantom cardiac cohorts and `flwr run` studies; imports every other part."""

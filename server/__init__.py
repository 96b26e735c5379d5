"""The coordinator side: Flower ServerApp, privacy ledger, resume."""

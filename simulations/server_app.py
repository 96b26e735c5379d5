"""The ServerApp `flwr run .` runs: fedsynth's ServerApp with phantom sites prepared.

Without run config `checkpoint` the study is a simulation on phantom sites and a public
checkpoint, generated and pretrained once and cached (simulations/study_data.py); with
it, the same study as fedsynth.server.server_app:app.
"""

from __future__ import annotations

from fedsynth.server.server_app import build_app
from fedsynth.simulations.study_data import simulated_data

app = build_app(simulated_data)

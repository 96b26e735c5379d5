"""Each round's checkpoint validated beside the rounds: sites never wait for it.

Public validation (server/validation.py: held-out public loss and a montage) and, when a
simulation passes one in, its site-domain check (`SiteDomainCheck`, as Flower passes an
`evaluate_fn`) run on a thread of their own, in round order, each logging its result when
done; round 0 (the public checkpoint) runs before the first round. At the end of a study
the check's fidelity of the final model is kept in validation/FIDELITY, and the study's
share of the non-private ceiling's gain (when `fedsynth study dp-gap` has computed that
ceiling for this simulation) in validation/CEILING.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from fedsynth.common.checkpoint import load_pretrained
from fedsynth.common.io import atomic_write_text
from fedsynth.common.models import resolve_device
from fedsynth.server.run_dir import (
    RECONSTRUCTION_PNG,
    SITE_DOMAIN_CEILING,
    SITE_DOMAIN_FIDELITY,
    validation_dir,
)
from fedsynth.server.study import Study
from fedsynth.server.validation import SiteDomainCheck, Validator, validation_text

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]


class RoundValidation:
    """The study's validation: public (run config `validation-data`) and the simulation's
    site-domain check (`study.site_domain`); either may be absent."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.validator: Validator | None = None
        if study.validation is not None:
            self.validator = Validator(study.checkpoint, study.validation, study.config)
        self.site_domain: SiteDomainCheck | None = None
        if study.site_domain is not None:  # a simulation's: on the validator's model copy
            pretrained = (
                self.validator.pretrained
                if self.validator is not None
                else load_pretrained(study.checkpoint, resolve_device(study.config.device))
            )
            self.site_domain = study.site_domain(pretrained)
        self._thread: ThreadPoolExecutor | None = None  # see later

    @property
    def enabled(self) -> bool:
        return self.validator is not None or self.site_domain is not None

    def validate(self, round_number: int, weights: Weights) -> dict[str, Any]:
        """Held-out public loss and montage, and the site-domain losses, of `weights`;
        kept next to the round's checkpoint (validation/round-NNN.json). Returns the
        round's entry ({} when neither is enabled)."""
        if not self.enabled:
            return {}
        folder = validation_dir(self.study)
        entry: dict[str, Any] = {"round": round_number}
        if self.validator is not None:
            entry["loss"] = self.validator(weights, folder / f"round-{round_number:03d}.png")
            if round_number == 0:  # the frozen autoencoder alone, to compare samples with
                png = folder / RECONSTRUCTION_PNG
                entry["reconstruction_mae"] = self.validator.reconstruction(png)
        if self.site_domain is not None:
            entry["site_domain"] = self.site_domain.loss(weights)
        atomic_write_text(folder / f"round-{round_number:03d}.json", json.dumps(entry) + "\n")
        return entry

    def public_checkpoint(self, weights: Weights) -> None:
        """Round 0, on the calling thread: the baseline every later round is read against."""
        validated = validation_text(self.validate(0, weights))
        if validated:
            log.info("round 0 (public checkpoint): %s", validated)

    def later(self, round_number: int, weights: Weights) -> None:
        """Validate a copy of `weights` on the validation thread while the next round
        trains. Rounds are validated in order, each logged when done; `finish` waits."""
        if not self.enabled:
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="fedsynth-validation")
        copy = {k: v.clone() for k, v in weights.items()}
        self._thread.submit(self._validate_and_log, round_number, copy)

    def _validate_and_log(self, round_number: int, weights: Weights) -> None:
        if self.study.phantoms is not None:  # simulated sites train on this machine's cores
            # one core for this thread's torch work (OpenMP's setting is per thread; the
            # main thread keeps its own for round 0 and the end-of-study fidelity)
            torch.set_num_threads(1)
        try:
            validated = validation_text(self.validate(round_number, weights))
        except Exception as error:  # validation informs; the round is saved and charged
            log.warning(
                "round %d validation failed: %s: %s", round_number, type(error).__name__, error
            )
            return
        log.info("round %d validation: %s", round_number, validated)

    def finish(self, cancel: bool = False) -> None:
        """Wait for every queued round's validation (each logs its own result or failure);
        `cancel` (the study is failing): drop those not started, wait only for the one
        running."""
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=cancel)
            self._thread = None

    def final_fidelity(self, round_number: int, weights: Weights) -> None:
        """Simulation only, at the end of a study: the site-domain check's fidelity of the
        public checkpoint and of round `round_number` (validation/FIDELITY)."""
        if self.site_domain is None or round_number < 1:
            return
        log.info("site-domain fidelity (simulation only): sampling the public and the final model")
        result = self.site_domain.final_fidelity(round_number, weights)
        path = validation_dir(self.study) / SITE_DOMAIN_FIDELITY
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")

    def ceiling_share(self, round_number: int) -> None:
        """Simulation only, at the end of a study: the share of the non-private ceiling's
        gain that round `round_number` reached from round 0, both rounds' site-domain
        losses as validated (validation/CEILING), logged in one line; without a computed
        ceiling, the line says how to compute it."""
        phantoms = self.study.phantoms
        if self.site_domain is None or phantoms is None or round_number < 1:
            return
        folder = validation_dir(self.study)
        losses = []
        for number in (0, round_number):
            path = folder / f"round-{number:03d}.json"
            entry = json.loads(path.read_text()) if path.is_file() else {}
            if not entry.get("site_domain"):  # its validation failed, and said so
                log.warning(
                    "share of the non-private ceiling's gain not computed: round %d has no "
                    "site-domain loss",
                    number,
                )
                return
            losses.append(entry["site_domain"])
        result = self.site_domain.ceiling_share(phantoms, *losses)
        atomic_write_text(folder / SITE_DOMAIN_CEILING, json.dumps(result, indent=2) + "\n")
        log.info("%s", result["note"])

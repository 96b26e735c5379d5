"""Flower SecAgg+ parameters for a study, and what they protect.

The sites' ClientApp has secaggplus_mod: the server only ever unmasks the subject-weighted
sum of the deltas of the sites that sent a masked vector. Trust model: an honest-but-
curious server (it follows the protocol and looks at what it gets); `threshold` or more
colluding parties (sites, or sites with the server) can unmask a site; with 2 sites each
learns the other's update from the next global model. num_examples (subjects) and the
spend metrics travel in clear.

- clipping_range 4.0 (run config `secagg-clipping-range`): sites send deltas, which are
  small (AdamW moves a weight about lr per step); a site whose max |delta| exceeds it
  fails loudly rather than be clipped.
- quantization_range 2**(32 - bit_length(sites)): as large as the 2**32 modulus allows
  with no wrap-around of the sum (2**30 for 3 sites): step 2*clip/range ~ 7e-9.
- max_weight: the largest subject count a site may have (run config `secagg-max-weight`,
  default `phantom-subjects`): weights are subjects / max_weight, so a tight bound keeps
  precision; a site with more subjects fails loudly.
- num_shares: all sampled sites. reconstruction_threshold: a majority, and never below
  `federation.min-sites`: Flower's workflow halts a round once fewer than `threshold`
  sites are left after the masked vectors are collected, so an unmasked sum always holds
  at least min-sites updates. Sites that will not train are known before the round
  (READY query) and never take part, so each of those updates is a real one.
"""

from __future__ import annotations

from typing import Any

from fedsynth.common.errors import FedsynthError
from fedsynth.server.study import Study


def secagg_settings(study: Study, sites: int | None = None) -> dict[str, Any]:
    """SecAgg+ parameters for a round with `sites` sampled sites (default sites-per-round)."""
    federation = study.config.federation
    sites = sites or federation.sites_per_round
    if sites < 2 or federation.min_sites < 2:
        raise FedsynthError(
            "secure aggregation needs at least 2 sites per round and federation.min-sites "
            ">= 2 (3 or more sites to hide a site from the others), or "
            "federation.secure-aggregation false"
        )
    return {
        "num_shares": 1.0,  # every sampled site holds a share of every other's secrets
        "reconstruction_threshold": max(federation.min_sites, sites // 2 + 1),
        "clipping_range": study.clipping_range,
        # sites x quantization_range must stay below the 2**32 modulus (no wrap-around)
        "quantization_range": 2 ** (32 - sites.bit_length()),
        "max_weight": study.max_weight,
    }

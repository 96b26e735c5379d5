"""Flower SecAgg+ parameters for a study, and what they protect.

The sites' ClientApp has secaggplus_mod: the server only ever unmasks the subject-weighted
sum of the deltas of the sites that sent a masked vector. Trust model: an honest-but-
curious server (it follows the protocol and looks at what it gets); `threshold` or more
colluding parties (sites, or sites with the server) can unmask a site; with 2 sites each
learns the other's update from the next global model. num_examples (subjects) and the
spend metrics travel in clear.

- clipping_range 4.0 (run config `secagg-clipping-range`): sites send deltas, which are
  small (AdamW moves a weight about lr per step; with `training.finetune-optimizer: sgd`
  a step is lr times a mean clipped gradient, so a large SGD rate needs a larger range);
  a site whose max |delta| exceeds it fails loudly after it spent, rather than be clipped.
- quantization_range 2**(31 - bit_length(sites)) (2**29 for 3 sites; step 2*clip/range
  ~ 1.5e-8), for the sites of the round (server/round_fit.py sets it, with the threshold,
  on the workflow before each round; Flower's workflow reads both at its setup stage, and
  the server's check of the unmasked mean uses the same step): every sum of honest values
  stays below 2**31, half the 2**32 modulus. That leaves no wrap-around, and a NaN from a
  faulty site visible: Flower's quantize casts it to int32 as -2**31 (2**31 modulo
  2**32), so that weight's unmasked mean lies beyond the clipping range, which the server
  checks (server/reply_arrays.py).
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

from flwr.server import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedsynth.common.errors import FedsynthError
from fedsynth.server.study import Study


class StudySecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow, with a site that drops at the share-keys stage left out.

    Flower 1.41 keeps such a site among the sampled ones, so at unmask it is listed as dead
    and the others are asked for shares of its key, which they never received (a KeyError
    in secaggplus_mod): the round halts after the others trained and spent. It never sent
    its shares, so no site masked with it (secaggplus_mod pairs only with the sites whose
    shares it got): dropping it from the sampled sites and from every neighbour set is
    exactly what the masks say.
    """

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        gone = set(state.sampled_node_ids) - set(state.active_node_ids)
        if gone:
            state.sampled_node_ids = set(state.active_node_ids)
            for node, neighbours in state.nid_to_neighbours.items():
                state.nid_to_neighbours[node] = set(neighbours) - gone
        return ok and self._check_threshold(state)


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
        # sites x quantization_range below 2**31: no wrap-around, a NaN shows (see module)
        "quantization_range": 2 ** (31 - sites.bit_length()),
        "max_weight": study.max_weight,
    }

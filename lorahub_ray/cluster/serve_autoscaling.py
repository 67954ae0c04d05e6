"""Serve autoscaling for the model deployment: scale on the load the replicas measure themselves.

Each ``LoraHubModel`` replica reports ``model_load`` through Serve's custom-metrics hook
(``record_autoscaling_stats``): the fraction of time its model was generating plus the inputs
waiting for it, in batches (:class:`lorahub_ray.serving.load.LoadMeter`). Serve averages each
replica's reports over ``look_back_period_s``; :class:`ModelLoadPolicy` then asks for

    ceil(sum of the replicas' model_load / target_model_load)

replicas. Serve wraps a custom policy with the usual ``min_replicas``/``max_replicas`` bounds,
``upscale_delay_s``/``downscale_delay_s`` and scaling factors, so those settings keep their meaning.

Serve pickles this module by value into its controller: it imports nothing but the standard library.
"""

from __future__ import annotations

import math

LOAD_METRIC = "model_load"
POLICY_PATH = "lorahub_ray.cluster.serve_autoscaling:ModelLoadPolicy"


class ModelLoadPolicy:
    """Custom Serve autoscaling policy (``autoscaling_config.policy.policy_function``), one instance per deployment."""

    def __init__(self, target_model_load: float = 0.8):
        if not target_model_load > 0:
            raise ValueError(f"target_model_load must be > 0, got {target_model_load}")
        self.target = float(target_model_load)

    def __call__(self, ctx) -> tuple[int, dict]:
        state = dict(ctx.policy_state or {})
        per_replica = (ctx.aggregated_metrics or {}).get(LOAD_METRIC) or {}
        if not per_replica:  # no reports yet (replicas starting): keep the current target
            return ctx.target_num_replicas, state
        total = float(sum(per_replica.values()))
        desired = math.ceil(total / self.target - 1e-9)
        desired = max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, desired))
        state["model_load"] = total
        state["reporting_replicas"] = len(per_replica)
        return desired, state


__all__ = ["LOAD_METRIC", "POLICY_PATH", "ModelLoadPolicy"]

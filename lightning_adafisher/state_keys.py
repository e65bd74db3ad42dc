"""Names of the keys of ``AdaFisher.state``, named once (imported by the optimizer modules).

* ``state[p]``: ``step`` and ``exp_avg`` (every variant), ``exp_avg_sq`` (Adam-trained
  parameters of ``variant="eigen"``);
* ``state[primary parameter of a layer]`` (or of a gradient-factored parameter, eigen variant):
  ``factor_h``, ``factor_s``, ``factor_updates``; eigen variant also ``eigenbasis_h``,
  ``eigenbasis_s``, ``eigen_exp_avg``, ``eigen_exp_avg_sq``, ``eigenbasis_factor_updates``;
* ``state["adafisher"]``: optimizer-wide counters ``steps``, ``skipped_statistics`` and, once
  a step was skipped for non-finite gradients, ``skipped_steps``.
"""

from __future__ import annotations


STEP = "step"
EXP_AVG = "exp_avg"
FACTOR_H = "factor_h"
FACTOR_S = "factor_s"
FACTOR_UPDATES = "factor_updates"
EXP_AVG_SQ = "exp_avg_sq"
"""Adam's second moment: the parameters ``variant="eigen"`` trains with Adam."""
EIGENBASIS_H = "eigenbasis_h"
EIGENBASIS_S = "eigenbasis_s"
EIGEN_EXP_AVG = "eigen_exp_avg"
EIGEN_EXP_AVG_SQ = "eigen_exp_avg_sq"
EIGEN_REFRESHED_AT = "eigenbasis_factor_updates"
"""``factor_updates`` when the eigenbasis was last computed (refresh only after a fold)."""
_STATS_DTYPE_KEYS = frozenset(
    (FACTOR_H, FACTOR_S, EIGENBASIS_H, EIGENBASIS_S, EIGEN_EXP_AVG, EIGEN_EXP_AVG_SQ)
)
"""State kept in the statistics dtype (>= float32), whatever the parameter's dtype."""
GLOBAL = "adafisher"
GLOBAL_STEPS = "steps"
GLOBAL_SKIPPED = "skipped_statistics"
GLOBAL_SKIPPED_STEPS = "skipped_steps"
"""Steps skipped for non-finite gradients (``skip_nonfinite_steps=True``); absent until one is."""


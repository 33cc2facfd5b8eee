"""One-run empirical privacy auditing (issue 15): canaries in the federation, estimators, the audit block.

* :mod:`fedsim.audit.spec`: the scenario's ``audit:`` block.
* :mod:`fedsim.audit.canaries`: the canaries (directions, in/out coins, sampling) and the shifts the federation adds.
* :mod:`fedsim.audit.estimators`: empirical epsilon from canary scores (Steinke et al. 2023; Andrew et al. 2024).
* :mod:`fedsim.audit.scoring`: scores from the released models, and the ``audit`` block of ``metrics.json``.
"""

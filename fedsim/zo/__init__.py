"""Federated zeroth-order optimization (FZooS, Shu, Lin, Dai & Low, arXiv 2308.04077) and its baselines, run as a
real Flower federation whose clients can only query values of their private black-box objective ``f_i``, plus
the curious server's attacks on the messages they send (spec: ``shared/reference/algorithms-more.md`` §11).

Layout (one job per file): :mod:`~fedsim.zo.api` (the shared data types), ``gp`` (GP surrogate, analytic
gradients), ``rff`` (shared random Fourier features and the surrogate weights), ``estimators`` (finite-difference
gradient estimators of the baselines), ``client`` (one client's local round and surrogate refresh for every
method), ``tasks/`` (the black-box task families), ``spec`` (the scenario block), ``server_app`` / ``client_app``
(the Flower apps: two exchanges per round plus the safeguard message), ``run`` (``fedsim run`` for this protocol),
``attacks`` (function extraction, label-set inference) and ``report``.
"""

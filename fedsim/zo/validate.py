"""Validation of a ``federation.protocol: zeroth_order`` scenario (what the zeroth-order runner can run).

A zeroth-order federation optimises a black-box objective (``zeroth_order.task``); it has no dataset, model,
neural-network training or gradient-inversion attacks. So, under ``zeroth_order``:

* the ``zeroth_order`` block is required, and refused under any other protocol;
* the neural-network parts are **refused** when given (a field the YAML sets, even to its default), one line
  naming the field: ``defenses`` / ``attacks`` (use ``zeroth_order.defenses`` / ``zeroth_order.attacks``),
  ``data`` and ``model`` (the task family builds its own data: ``zeroth_order.task``), ``evaluation`` (the runner
  evaluates the global objective every round), and ``federation.clients_per_round`` (every client takes part in
  every round: the protocol's safeguard and surrogate sum need them all), ``federation.local``,
  ``federation.server_lr``, ``federation.staleness`` (their zeroth-order counterparts live in ``zeroth_order``);
* a setting the method never reads is refused (``zeroth_order.fzoos`` under a baseline, ``zeroth_order.rgf`` under
  fzoos, ``prox_mu`` under anything but fedprox, ``attacks.function_extraction: true`` without FZooS's surrogate);
* the task family's own check (:func:`fedsim.zo.tasks.check_task`) runs, with its paths under ``zeroth_order.``.
"""

from __future__ import annotations

from typing import Any

from fedsim.errors import FedsimError, ScenarioError

PROTOCOL = "zeroth_order"

# top-level scenario field -> why it is refused under zeroth_order (and where its counterpart lives)
_REFUSED_TOP = {
    "defenses": "the neural-network defenses do not apply to zeroth-order messages; use zeroth_order.defenses",
    "attacks": "the neural-network attacks do not apply to zeroth-order messages; use zeroth_order.attacks",
    "data": "a zeroth-order task builds its own data; choose it with zeroth_order.task (e.g. task.dataset)",
    "model": "a zeroth-order task builds its own classifiers; choose the task with zeroth_order.task",
    "evaluation": "the zeroth-order runner evaluates the global objective after every round; remove it",
}
# federation field -> why it is refused under zeroth_order
_REFUSED_FEDERATION = {
    "clients_per_round": "zeroth-order federations ask every client every round (the safeguard and the "
                         "surrogate sum need them all); remove it",
    "local": "local training settings of the neural-network protocols; use zeroth_order.local_iters / "
             "zeroth_order.lr",
    "server_lr": "use zeroth_order.global_lr",
    "staleness": "stale updates are a neural-network (fedavg) setting; remove it",
}


def _check_method_fields(block: Any) -> None:
    """Refuse a setting the chosen method never reads (it would be silently ignored)."""
    method, given = block.method, block.model_fields_set
    if "fzoos" in given and method != "fzoos":
        raise ScenarioError("zeroth_order.fzoos", f"settings of the fzoos method; the method is {method}")
    if "rgf" in given and method == "fzoos":
        raise ScenarioError("zeroth_order.rgf", "settings of the finite-difference baselines (fedzo, fedprox, "
                                                "scaffold1, scaffold2); fzoos uses zeroth_order.fzoos")
    if "prox_mu" in given and method != "fedprox":
        raise ScenarioError("zeroth_order.prox_mu", f"the fedprox method's weight; the method is {method}")
    if block.attacks.function_extraction and "function_extraction" in block.attacks.model_fields_set \
            and method != "fzoos":
        raise ScenarioError("zeroth_order.attacks.function_extraction", f"extracts f_i from FZooS's surrogate "
                                                                        f"message; {method} sends none")


def _check_against_dim(block: Any, dim: int) -> None:
    """Refuse a setting bounded by the task's dimension d (known only with the task): RGF's q orthonormal
    directions need q <= d (:func:`fedsim.zo.estimators.orthonormal_directions`)."""
    if block.method != "fzoos" and block.rgf.directions > dim:
        raise ScenarioError("zeroth_order.rgf.directions", f"{block.rgf.directions} > d ({dim}) of the "
                                                           f"{block.task.family} task: RGF draws q orthonormal "
                                                           f"directions in R^d, so q must be <= {dim}")


MAX_ARRAY_BYTES = 2 * 2**30  # one float64 array the run builds may take at most 2 GiB


def _largest_arrays(block: Any, dim: int) -> list[tuple[str, int, str]]:
    """``(field at fault, float64 elements, what the array is and its other factor)`` for the largest arrays a run of
    ``block`` on a d-dimensional task builds (:mod:`fedsim.zo.client`, :mod:`fedsim.zo.gp`, :mod:`fedsim.zo.rff`,
    :mod:`fedsim.zo.attacks`). Sizes use the settings as upper bounds (history may hold fewer points)."""
    d = f"the task's d ({dim})"
    if block.method != "fzoos":
        return [("rgf.directions", block.rgf.directions * dim, f"the q orthonormal directions (q x d), with {d}")]
    f, m = block.fzoos, block.fzoos.rff_features
    out = [
        ("fzoos.rff_features", m * dim, f"the shared RFF basis Omega (d x M), with {d}"),
        ("fzoos.rff_points", f.rff_points * m, f"the RFF feature matrix (rff_points x M), with rff_features ({m})"),
        ("fzoos.gp_points", f.gp_points * max(f.gp_points, dim), f"the GP kernel (gp_points^2) and its points "
                                                                 f"(gp_points x d), with {d}"),
        ("fzoos.n_inits", f.n_inits * dim, f"the initial queries (n_inits x d), with {d}"),
        ("fzoos.explore_candidates", f.explore_candidates * max(dim, f.gp_points),
         f"the exploration candidates (x d) and their kernel terms (x gp_points {f.gp_points}), with {d}"),
        ("fzoos.refresh_candidates", f.refresh_candidates * max(dim, f.gp_points),
         f"the refresh candidates (x d) and their kernel terms (x gp_points {f.gp_points}), with {d}"),
    ]
    if block.attacks.function_extraction:
        out.append(("attacks.heldout_points", block.attacks.heldout_points * max(m, dim),
                    f"the attack's held-out features (heldout_points x M, rff_features {m}) and points (x d), "
                    f"with {d}"))
    return out


def _check_array_sizes(block: Any, dim: int) -> None:
    """Refuse settings whose product makes one float64 array above :data:`MAX_ARRAY_BYTES` (each field's own bound
    does not prevent it: d = M = 1e5 makes an 80 GB basis), at the field that made it big."""
    for field, elements, what in _largest_arrays(block, dim):
        size = elements * 8
        if size > MAX_ARRAY_BYTES:
            raise ScenarioError(f"zeroth_order.{field}", f"{getattr_path(block, field)} makes {what}: "
                                                         f"{size / 2**30:.1f} GiB of float64 (at most "
                                                         f"{MAX_ARRAY_BYTES // 2**30} GiB per array); lower it or "
                                                         f"the other factor")


def getattr_path(block: Any, dotted: str) -> Any:
    """``block.fzoos.rff_features`` for ``"fzoos.rff_features"``."""
    for part in dotted.split("."):
        block = getattr(block, part)
    return block


def check_zeroth_order(scenario: Any) -> Any:
    """Check the zeroth-order parts of a validated :class:`~fedsim.scenario.Scenario` and return it.

    Raises :class:`~fedsim.errors.ScenarioError` (one line, YAML path) on the rules of the module docstring.
    A scenario of another protocol without a ``zeroth_order`` block passes unchanged.
    """
    fed, block = scenario.federation, scenario.zeroth_order
    if fed.protocol != PROTOCOL:
        if block is not None:
            raise ScenarioError("zeroth_order", f"settings of federation.protocol {PROTOCOL}, but the protocol is "
                                                f"{fed.protocol} (remove the block or set the protocol)")
        return scenario
    if block is None:
        raise ScenarioError("zeroth_order", f"federation.protocol {PROTOCOL} needs this block (zeroth_order.task, "
                                            "zeroth_order.method, ...)")
    for name, why in _REFUSED_TOP.items():
        value = getattr(scenario, name)
        if (value if isinstance(value, list) else name in scenario.model_fields_set):
            raise ScenarioError(name, f"not used under federation.protocol {PROTOCOL}: {why}")
    for name, why in _REFUSED_FEDERATION.items():
        if name in fed.model_fields_set:
            raise ScenarioError(f"federation.{name}", f"not used under federation.protocol {PROTOCOL}: {why}")
    _check_method_fields(block)
    if block.attacks.label_set and "label_set" in block.attacks.model_fields_set and block.task.family != "metric":
        raise ScenarioError("zeroth_order.attacks.label_set", f"label-set inference needs the metric task (classes "
                                                              f"a client holds); the task is {block.task.family}")
    from fedsim.zo.tasks import FieldError, check_task, task_dim

    try:
        check_task(block, fed.clients)
    except FieldError:
        raise
    except ScenarioError as err:
        raise ScenarioError(f"zeroth_order.{err.path}" if err.path else "zeroth_order", err.reason) from None
    except FedsimError as err:
        raise ScenarioError("zeroth_order.task", str(err)) from None
    dim = task_dim(block, fed.clients)
    _check_against_dim(block, dim)
    _check_array_sizes(block, dim)
    from fedsim.resources import check_scenario_resources

    check_scenario_resources(scenario)  # device and the Ray request this machine can give
    return scenario

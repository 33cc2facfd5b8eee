"""Ray backend: Flower's simulation engine (``run_simulation``) with quiet, small-footprint defaults.

``run_simulation`` is deprecated in favour of ``flwr run`` but is still the only in-process
programmatic entry point in Flower 1.41/1.42 (``flwr run`` spawns a detached SuperLink and
``uv sync``s a runtime environment per run); keeping it behind this adapter makes a later move cheap.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedsim.scenario import BackendSpec

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DISABLE_IMPORT_WARNING": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_environment(verbose: bool = False) -> None:
    """Telemetry off, Ray/Flower chatter hidden unless ``verbose``."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not verbose:
        for name in ("flwr", "ray", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def backend_config(spec: BackendSpec, verbose: bool = False) -> dict[str, Any]:
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": "INFO" if verbose else "ERROR",
        "object_store_memory": 128 * 2**20,
    }
    if spec.address is not None:  # join an existing cluster: it owns its resources and store
        init_args = {"address": spec.address, "log_to_driver": verbose, "logging_level": init_args["logging_level"]}
    init_args.update(spec.init_args)
    return {
        "client_resources": {"num_cpus": spec.client_resources.num_cpus, "num_gpus": spec.client_resources.num_gpus},
        "init_args": init_args,
    }


def run_ray(server_app: ServerApp, client_app: ClientApp, num_supernodes: int, spec: BackendSpec,
            verbose: bool = False) -> None:
    if spec.address is None:  # validation checks this too; a backend switched after validation must not hang
        from fedsim.resources import check_request

        res = spec.client_resources
        check_request(res.num_cpus, res.num_gpus, "backend.client_resources", spec.init_args)
    quiet_environment(verbose)
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
        backend_name="ray", backend_config=backend_config(spec, verbose), verbose_logging=verbose,
    )

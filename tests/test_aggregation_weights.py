"""Every server aggregation path survives client weights (num-examples) that sum to zero.

The kind: a weighted mean divides by the total weight. Flower's ``aggregate_arrayrecords`` (FedAvg,
FedSGD and the central-DP wrappers around them) raised ZeroDivisionError when every sampled client
reported 0 examples (a DP-SGD round where every Poisson batch came out empty), and the legacy FedAvg
of the SecAgg+ path divides by the clients' total num_examples too. Expected means are computed here
with NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedsim.scenario import parse_scenario
from fedsim.simulation import keys
from fedsim.simulation.capture import CaptureLog
from fedsim.simulation.secure import _CapturingLegacyFedAvg
from fedsim.simulation.server_app import FederationOutcome
from fedsim.simulation.strategies import FedSimFedAvg

ARRAYS = [np.array([1.0, 2.0], dtype=np.float32), np.array([3.0, -2.0], dtype=np.float32),
          np.array([-1.0, 6.0], dtype=np.float32)]


def reply(values: np.ndarray, weight: float, pid: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(values)}),
                          "metrics": MetricRecord({keys.NUM_EXAMPLES: weight, keys.PARTITION_ID: pid})})
    meta = Metadata(run_id=1, message_id=str(pid), src_node_id=pid, dst_node_id=0, reply_to_message_id="m",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content, metadata=meta)


@pytest.mark.parametrize(("weights", "uniform", "expected_weights"), [
    ([0, 0, 0], False, [1, 1, 1]),  # zero total: uniform, no ZeroDivisionError
    ([1, 2, 5], False, [1, 2, 5]),  # FedAvg's weighting is unchanged
    ([1, 2, 5], True, [1, 1, 1]),  # central DP asks for the uniform mean
])
def test_fedavg_mean_with_zero_total_weight_and_uniform_weights(tiny_raw, weights, uniform, expected_weights) -> None:
    strategy = FedSimFedAvg(parse_scenario(tiny_raw), {})
    strategy.uniform_weights = uniform
    replies = [reply(a, w, i) for i, (a, w) in enumerate(zip(ARRAYS, weights, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = np.average(np.stack(ARRAYS), axis=0, weights=expected_weights)
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)


def test_secagg_strategy_takes_the_unmasked_aggregate_without_dividing_by_the_weights(tiny_raw) -> None:
    """SecAgg+ gives every result the same aggregate; all clients declaring 0 examples is no division by 0."""
    tiny_raw["federation"]["protocol"] = "fedavg"
    scenario = parse_scenario(tiny_raw)
    outcome = FederationOutcome(capture=CaptureLog(set(), "fedavg"))
    strategy = _CapturingLegacyFedAvg(scenario, outcome, ["w"], {})
    strategy.current = [np.zeros(2, dtype=np.float32)]
    aggregate = ndarrays_to_parameters([ARRAYS[0]])
    results = [(None, FitRes(Status(Code.OK, ""), aggregate, 0, {keys.PARTITION_ID: i})) for i in range(3)]
    params, _ = strategy.aggregate_fit(1, results, [])
    np.testing.assert_array_equal(parameters_to_ndarrays(params)[0], ARRAYS[0])

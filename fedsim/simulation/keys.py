"""Record and config keys shared by the ClientApp, the ServerApp and the capture proxy."""

ARRAYS = "arrays"  # Flower's default ArrayRecord key: the update a client sends
METRICS = "metrics"  # Flower's default MetricRecord key
CONFIG = "config"  # Flower's default ConfigRecord key
TRUTH = "fedsim.truth"  # ArrayRecord with the client's real batch: stripped by the server before anyone reads it

NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
SERVER_ROUND = "server-round"  # injected by Flower strategies
RECORD_TRUTH = "fedsim.record-truth"  # set by the capture proxy on messages to targeted clients
CLIENT_STATE = "fedsim.client-state"  # ConfigRecord in Context.state: per-client state that persists across rounds
CLIENT_TENSORS = "fedsim.client-tensors"  # ArrayRecord in Context.state: the tensor part of that state
CLIENT_METRIC_PREFIX = "fedsim."  # client metrics reported by defenses, e.g. "fedsim.epsilon"
STALENESS = "fedsim.staleness"  # config of a TRAIN message: rounds between the model sent and the current one
MODEL_ROUND = "fedsim.model-round"  # config of a TRAIN message: r of the global model w^r sent (0: initial)
ARCHITECTURE = "fedsim.architecture"  # config of a TRAIN message: JSON list of architecture changes (malicious server)

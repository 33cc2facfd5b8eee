"""Per-process setup shared by client and server apps: dataset, partitions, model factory.

Ray actors build this lazily from the scenario (cached per process), so no dataset tensor is
shipped with the apps and idle clients cost nothing: a client only slices its partition when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import nn

from fedsim.data import DatasetBundle, load_dataset, partition_indices
from fedsim.models import build_model
from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed
from fedsim.threat import TaskInfo
from fedsim.training import resolve_device


@dataclass
class FederationSetup:
    scenario: Scenario
    _client_model: nn.Module | None = field(default=None, repr=False, compare=False)

    @cached_property
    def data(self) -> DatasetBundle:
        return load_dataset(self.scenario.data)

    @cached_property
    def partitions(self) -> list[np.ndarray]:
        by_source = self.scenario.data.partition.kind == "by_source"
        keys = self.data.groups if by_source else self.data.train_y
        if keys is not None and keys.dim() > 1:  # language modeling: labels are (N, T) token ids, one key per
            # example is needed; the example's source stands for its "class" (dirichlet/shards skew the sources)
            keys = self.data.groups if self.data.groups is not None else torch.zeros(len(keys), dtype=torch.long)
        return partition_indices(
            keys.numpy(),
            self.scenario.federation.clients,
            self.scenario.data.partition,
            derive_seed(self.scenario.seed, "partition"),
        )

    @cached_property
    def defenses(self) -> list:
        from fedsim.defenses import build_defenses

        return build_defenses(self.scenario)

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.scenario.device)

    @cached_property
    def task(self) -> TaskInfo:
        d = self.data
        return TaskInfo(
            dataset=self.scenario.data.dataset,
            input_shape=d.input_shape,
            num_classes=d.num_classes,
            mean=tuple(d.mean),
            std=tuple(d.std),
            model=self.scenario.model.model_dump(),
            protocol=self.scenario.federation.protocol,
            # defenses that reshaped the model (MID, dropout): attacks rebuild the same architecture
            model_transforms=self.model_transforms,
            kind=d.task,
            vocab_size=d.vocab_size,
            tokenizer=d.tokenizer,
        )

    @cached_property
    def model_transforms(self) -> tuple[dict, ...]:
        """``Defense.model_description`` of each defense whose ``transform_model`` changed the model (its
        modules or state layout), in the order applied: what every attack is told to rebuild the model,
        and nothing more (no defense parameter beyond ``Defense.model_params``; a transform that left
        the model as it was, e.g. DP-SGD on a model without BatchNorm, is not even named)."""
        from fedsim.defenses.base import Defense

        model = self._initial_model()
        out = []
        for defense in self.defenses:
            if type(defense).transform_model is Defense.transform_model:
                continue
            before = _layout(model)
            model = defense.transform_model(model)
            if _layout(model) != before:
                out.append(dict(defense.model_description()))
        return tuple(out)

    @cached_property
    def client_model_reusable(self) -> bool:
        """Whether one client module can serve every client round of this process: no defense transforms the
        model, wraps its training (e.g. DP-SGD's Opacus hooks) or inspects it, so a fresh model and a reused one
        hold the same state once the server's weights are loaded (``load_state_dict`` replaces all of it)."""
        from fedsim.defenses.base import Defense

        hooks = ("transform_model", "wrap_training", "inspect_model")
        return not any(getattr(type(d), h) is not getattr(Defense, h) for d in self.defenses for h in hooks)

    def client_model(self, global_state: dict[str, torch.Tensor]) -> tuple[nn.Module, bool]:
        """The model a client trains this round, holding ``global_state``; and whether it is the reused module.

        Reused (:attr:`client_model_reusable`): the module built once, reloaded, its gradients dropped (as a new
        module has none); building it (seeded init, about 8 ms on a small ConvNet) costs more than training a
        client on a few dozen examples. Otherwise a new :meth:`build_model`. Raises what ``load_state_dict`` raises.
        """
        reuse = self.client_model_reusable
        if reuse and self._client_model is not None:
            model = self._client_model
            model.zero_grad(set_to_none=True)
        else:
            model = self.build_model()
            if reuse:
                self._client_model = model
        model.load_state_dict(global_state)
        return model, reuse

    def build_model(self) -> nn.Module:
        """The scenario's model with the initial global weights, after model-transforming defenses."""
        model = self._initial_model()
        for defense in self.defenses:
            model = defense.transform_model(model)
        return model

    def _initial_model(self) -> nn.Module:
        """The architecture with its initial weights: seeded random, or (``model.pretrain``, text models) the
        weights pretrained on the dataset's public part (:func:`fedsim.text.pretrain.pretrained_state`)."""
        model = build_model(self.scenario.model, self.data.input_shape, self.data.output_dim,
                            seed=derive_seed(self.scenario.seed, "model-init"), vocab_size=self.data.vocab_size)
        if self.scenario.model.pretrain is not None:
            from fedsim.text.pretrain import pretrained_state

            model.load_state_dict(pretrained_state(self.scenario, model))
        return model

    def client_data(self, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.partitions[partition_id], dtype=torch.long)
        return self.data.train_x[idx], self.data.train_y[idx]


def _layout(model: nn.Module) -> tuple[str, tuple]:
    """What a model transform can change that a rebuild must repeat: the modules (with their settings,
    e.g. a dropout p) and the names and shapes of the state."""
    return repr(model), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


_CACHE: dict[str, FederationSetup] = {}


def setup_for(scenario: Scenario) -> FederationSetup:
    """The cached setup of a scenario in this process (keyed by its JSON form)."""
    key = scenario.model_dump_json()
    if key not in _CACHE:
        _CACHE.clear()  # one scenario per process at a time keeps memory flat in long benchmarks
        _CACHE[key] = FederationSetup(scenario)
    return _CACHE[key]

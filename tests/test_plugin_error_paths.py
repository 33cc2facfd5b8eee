"""A defense's refusal names the YAML field it is about as one path, ``defenses[0].params.x: why`` (QA F6 of issue
17: ``defenses[0]: params.grad_sample_mode: ...`` was printed), and book-keeping's refusal names the parameters
outside its layers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY
from torch import nn

from fedsim.defenses.bk_clipping import unsupported_layer
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario


def _raw(defense: dict, **changes) -> dict:
    raw = copy.deepcopy(TINY)
    raw.update(changes)
    raw["defenses"] = [defense]
    return raw


@pytest.mark.parametrize(("raw", "path", "words"), [
    # validation-time model check (fedsim.preflight): bk on a ViT, whose class token and position embedding are
    # parameters of the ViT module itself, outside every layer bk clips
    (_raw({"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "grad_sample_mode": "bk"}}, model={"name": "vit"}),
     "defenses[0].params.grad_sample_mode", ("cls_token", "pos_embedding", "ViT", "hooks")),
    # scenario-time checks (fedsim.scenario.plugin_error)
    (_raw({"name": "secagg", "params": {"num_shares": 4}}), "defenses[0].params.num_shares", ("odd",)),
    (_raw({"name": "central_dp", "params": {"noise_multiplier": 1.0, "clipping": "fixed",
                                            "clip_norm_lr": 0.2}},
          federation={**TINY["federation"], "protocol": "fedavg"}),
     "defenses[0].params.clip_norm_lr", ("does not apply to clipping: fixed",)),
])
def test_a_defense_refusal_is_at_its_field_path(raw: dict, path: str, words: tuple[str, ...]) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == path, str(err.value)
    assert str(err.value).startswith(f"{path}: ") and ": params." not in str(err.value)
    for word in words:
        assert word in err.value.reason


class _Loose(nn.Module):
    """Two modules with parameters of their own outside bk's layers, plus a supported Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 2)
        self.inner = nn.Module()
        self.inner.shift = nn.Parameter(torch.zeros(4))
        self.inner.frozen = nn.Parameter(torch.zeros(4), requires_grad=False)


def test_bk_names_every_parameter_outside_its_layers_up_to_a_limit() -> None:
    why = unsupported_layer(_Loose())
    assert "scale of _Loose" in why and "inner.shift of Module" in why
    assert "frozen" not in why and "fc" not in why  # frozen: not trained; fc: a layer bk clips
    assert unsupported_layer(_Loose(), limit=1).endswith("; and 1 more")
    assert unsupported_layer(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))) is None

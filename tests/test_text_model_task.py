"""A text model whose declared task (``fedsim.models.TEXT_MODELS``) is not the token dataset's task is refused by
``fedsim validate`` in one line at ``model.name`` (exit 2), both ways, by one check; it used to pass validation and
traceback in the run (``bert`` on the language-modeling ``kjv``: lm_loss on (B, classes) outputs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import fedsim.data  # noqa: F401 - registers the datasets and their facts
from fedsim.cli import app
from fedsim.data.catalog import FACTS
from fedsim.models import TEXT_MODELS

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {"language_modeling": ROOT / "scenarios" / "text" / "quickstart.yaml",
             "classification": ROOT / "scenarios" / "text" / "bert_classifier.yaml"}
_MODEL_IS = {"language_modeling": "a language model", "classification": "a classifier"}


@pytest.mark.parametrize(("model", "task"), [(m, t) for m in sorted(TEXT_MODELS) for t in sorted(SCENARIOS)
                                             if TEXT_MODELS[m] != t])
def test_a_text_model_on_the_other_task_is_refused_at_model_name(model: str, task: str) -> None:
    path = SCENARIOS[task]
    dataset = next(line.split(":", 1)[1].split("#")[0].strip() for line in path.read_text().splitlines()
                   if line.strip().startswith("dataset:"))
    assert FACTS[dataset].task == task  # the scenario's dataset is of the task the case is about
    result = CliRunner().invoke(app, ["validate", str(path), "--set", f"model.name={model}"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error: model.name: "), lines[0]
    assert f"{model} is {_MODEL_IS[TEXT_MODELS[model]]}; {dataset!r} is a " in lines[0], lines[0]

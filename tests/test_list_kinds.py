"""``fedsim list`` says what each text model is (its declared task, ``fedsim.models.TEXT_MODELS``, and the text
datasets of that task) and each attack's input kind (its ``Attack.inputs``, not a list of names); the gpt/bert
rows used to be empty and no attack row said image or tokens."""

from __future__ import annotations

from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.data.catalog import FACTS
from fedsim.models import TEXT_MODELS
from fedsim.plugins import attack_registry

KIND = {"language_modeling": "causal LM", "classification": "encoder classifier"}


def _rows() -> dict[tuple[str, str], str]:
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "400"}, terminal_width=400)
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) >= 3:
            rows[(cells[0], cells[1])] = cells[2]
    return rows


def test_list_says_what_each_text_model_is_and_each_attacks_inputs() -> None:
    rows = _rows()
    for model, task in TEXT_MODELS.items():
        what = rows[("model", model)]
        assert what.startswith(f"text: {KIND[task]}"), what
        for dataset, facts in FACTS.items():
            if facts.inputs == "tokens":
                assert (dataset in what.replace(",", " ").replace("(", " ").replace(")", " ").split()) == \
                    (facts.task == task), (dataset, what)
    for name, cls in attack_registry().items():
        assert rows[("attack", name)].startswith(f"{'/'.join(cls.inputs)}: "), (name, rows[("attack", name)])

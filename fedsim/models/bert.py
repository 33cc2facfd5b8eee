"""``bert``: a small BERT-style encoder classifier (Devlin et al., NAACL 2019), fedsim's text classifier.

:class:`~fedsim.models.transformer.Transformer` with bidirectional attention; the head is
``Linear(width -> classes)`` on the mean of the final hidden states over the T positions (every position
is a real token: fedsim's text examples are exactly T tokens, no padding). Width ``spec.width``, depth
``spec.depth`` (default 2), ``width // 32`` heads, GELU. Pretraining (:mod:`fedsim.text.pretrain`) trains the
encoder with a temporary masked-LM head that is not part of this model.
"""

from __future__ import annotations

from torch import Tensor, nn

from fedsim.models.base import MODELS, InputShape, activation_of, declare_text_model
from fedsim.models.transformer import DEFAULT_DEPTH, Transformer
from fedsim.scenario import ModelSpec


class BERT(Transformer):
    """(B, T) token ids or (B, T, V) distributions -> class logits (B, classes)."""

    def __init__(self, vocab_size: int, max_len: int, width: int, depth: int, num_classes: int,
                 activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__(vocab_size, max_len, width, depth, activation, dropout, causal=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x).mean(dim=1))


@MODELS.register("bert")
def build_bert(spec: ModelSpec, input_shape: InputShape, num_classes: int, vocab_size: int = 0) -> nn.Module:
    """An encoder classifier for (T,) token inputs with ``num_classes`` outputs."""
    (seq_len,) = input_shape
    return BERT(vocab_size, seq_len, spec.width, spec.depth or DEFAULT_DEPTH, num_classes,
                activation_of(spec, "gelu"), spec.dropout)


declare_text_model("bert", task="classification")

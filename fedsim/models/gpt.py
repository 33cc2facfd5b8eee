"""``gpt``: a small GPT-style decoder, the causal language model of fedsim's text track.

:class:`~fedsim.models.transformer.Transformer` with causal attention and an untied LM head
``Linear(width -> vocab)``: outputs are next-token logits (B, T, V) for a (B, T) input (position t predicts
token t+1). The head is untied from the token embedding on purpose: with tied weights every vocabulary row of the
embedding gets a gradient through the softmax, and the embedding gradient no longer tells which tokens the batch
used (it still leaks through DAGER's span test). Width is ``spec.width`` (d_model), depth ``spec.depth`` (default
2), ``width // 32`` heads, GELU, and the maximum length the task's sequence length T.

At width 128, depth 2 and a 2,048-token vocabulary it has about 0.9 M parameters and trains on a CPU in minutes.
"""

from __future__ import annotations

from torch import Tensor, nn

from fedsim.models.base import MODELS, InputShape, activation_of, declare_text_model
from fedsim.models.transformer import DEFAULT_DEPTH, Transformer
from fedsim.scenario import ModelSpec


class GPT(Transformer):
    """(B, T) token ids or (B, T, V) distributions -> next-token logits (B, T, V)."""

    def __init__(self, vocab_size: int, max_len: int, width: int, depth: int, activation: str = "gelu",
                 dropout: float = 0.0) -> None:
        super().__init__(vocab_size, max_len, width, depth, activation, dropout, causal=True)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))


@MODELS.register("gpt")
def build_gpt(spec: ModelSpec, input_shape: InputShape, num_classes: int, vocab_size: int = 0) -> nn.Module:
    """A causal LM for (T,) token inputs; ``num_classes`` must equal ``vocab_size`` (one logit per token)."""
    (seq_len,) = input_shape
    return GPT(vocab_size, seq_len, spec.width, spec.depth or DEFAULT_DEPTH, activation_of(spec, "gelu"),
               spec.dropout)


declare_text_model("gpt", task="language_modeling")

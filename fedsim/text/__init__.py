"""fedsim's text track: tokenizers, public pretraining, decoding token ids for reports and metrics.

Text datasets live in :mod:`fedsim.data.text`, the models in :mod:`fedsim.models.gpt` and
:mod:`fedsim.models.bert`, the attacks in ``attacks/`` (``token_set``, ``tag``, ``dager``), the metrics in
:mod:`fedsim.metrics.text`.
"""

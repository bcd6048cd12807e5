"""Hugging Face transformers models as factories: the library's own classes, built from a config.

The keyword arguments are the config's (sizes, number of labels...), so a small model for tests and
the full-size one come from the same factory; the weights come from ``save_pretrained`` output
published to the watched folder. Inference-only settings are fixed here: no key/value cache (its
object is not a tensor output an engine can return).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def bert_classifier(**config: Any) -> nn.Module:
    """``BertForSequenceClassification``: token ids ``[B, T]`` (int64) -> logits ``[B, num_labels]``."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**config))


def gpt2_lm(**config: Any) -> nn.Module:
    """``GPT2LMHeadModel`` (``lm_head`` tied to the token embedding): token ids ``[B, T]`` -> logits
    ``[B, T, vocab_size]``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**{"use_cache": False, **config}))


def resnet_classifier(**config: Any) -> nn.Module:
    """``ResNetForImageClassification``: images ``[B, num_channels, H, W]`` -> logits ``[B, num_labels]``."""
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(**config))

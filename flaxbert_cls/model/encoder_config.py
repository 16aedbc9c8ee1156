"""The encoder's settings (`BertConfig`), shared by every family's Flax modules.

bert.py (BERT, RoBERTa, DistilBERT, ELECTRA) and modernbert.py (ModernBERT) read the same
dataclass: sizes from the checkpoint's config.json (`hf.model_config`), switches for each
family, and how to run it (dtype, attention kernel, remat, LoRA, the mesh).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Encoder sizes, read from a checkpoint's config.json (see `from_hf`)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  classifier_dropout: float | None = None
  pad_token_id: int = 0
  # Family switches (set by `hf.model_config` from the checkpoint's model_type).
  # > 0: RoBERTa position ids, counting non-pad tokens from this id (pad_token_id + 1).
  position_offset: int = 0
  embedding_size: int | None = None  # ELECTRA: embeddings narrower than hidden_size
  classifier_head: str = "bert"  # one of CLASSIFIER_HEADS
  # 'cls': the family's head on [CLS] (bert: through the pooler). 'mean': the head reads the
  # mean of the last hidden state over real tokens instead (bert: no pooler).
  pooling: str = "cls"
  # ModernBERT (encoder='modernbert', modernbert.py): rotary bases of the global and local
  # layers, their pattern, the local window (keys at most local_attention // 2 away), biases.
  encoder: str = "bert"
  layer_types: tuple[str, ...] = ()  # 'full_attention' | 'sliding_attention' per layer
  local_attention: int = 128
  global_rope_theta: float = 160_000.0
  local_rope_theta: float = 10_000.0
  attention_bias: bool = True
  mlp_bias: bool = True
  norm_bias: bool = True
  classifier_bias: bool = True
  classifier_activation: str = "gelu"
  embedding_dropout: float = 0.0
  mlp_dropout: float = 0.0
  # Not HF fields: how to run it.
  # long_document='windows' with window_pooling='attention': a document's windows' head inputs
  # are combined by learned softmax weights before the head (long_documents.py).
  window_attention: bool = False
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat_policy: str = "none"  # one of REMAT_POLICIES: what a layer keeps for the backward pass
  attention_impl: str | None = None  # 'xla' (None), 'cudnn' or 'splash'; attention.attention
  lora_rank: int = 0  # > 0: low-rank adapters on lora_targets (base weights frozen by optim)
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("query", "value")
  # On a mesh, activations are pinned by these rules (sharding.activation_rules): the
  # batch stays split, so FSDP gathers weights, not activations. None: unconstrained.
  mesh: Any = None
  activation_rules: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> "BertConfig":
    """Takes the fields this module knows from a transformers config (or dict)."""
    values = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)

  def __post_init__(self):
    if self.classifier_head not in CLASSIFIER_HEADS:
      raise ValueError(f"classifier_head={self.classifier_head!r}; use one of {CLASSIFIER_HEADS}")
    if self.encoder not in ENCODERS:
      raise ValueError(f"encoder={self.encoder!r}; use one of {ENCODERS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; use one of {tuple(REMAT_POLICIES)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


# bert: pooler (dense+tanh on [CLS]) -> classifier. roberta / electra: classifier/dense
# (+tanh / +gelu) -> classifier/out_proj on the first token, no pooler. distilbert:
# pre_classifier + ReLU -> classifier on the first token, no pooler.
# modernbert: head/dense -> activation -> head/norm -> dropout -> classifier on the pooled
# vector ([CLS] or the mean; modernbert.py).
CLASSIFIER_HEADS = ("bert", "roberta", "electra", "distilbert", "modernbert")
ENCODERS = ("bert", "modernbert")


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}



# What each encoder layer keeps for the backward pass (MaxText's remat_policy names).
# 'none': everything XLA keeps; 'full': the layer's input only, all else recomputed;
# 'minimal': the outputs of matmuls without batch dimensions (the dense projections), so the
# [batch, heads, L, L] attention scores and the elementwise ops are recomputed.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("dense_output")),  # ops.DENSE_OUTPUT
}


def rematerialized(layer: type, policy: str, static_argnums: tuple[int, ...]) -> type:
  """An encoder layer's class under `policy` (the lifted jax.checkpoint keeps parameter paths);
  `static_argnums` count the module as 0."""
  if policy == "none":
    return layer
  return nn.remat(layer, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)

"""Mean-pooled sequence classifiers and whole-document scoring for exported flaxbert-cls runs.

`flaxbert-cls export` copies this file into the exported directory. It needs torch and
transformers only (not flaxbert-cls):

  model = AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)
  tokenizer = AutoTokenizer.from_pretrained(DIR)
  probs = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.div(
      model.config.calibration_temperature).softmax(-1)   # .sigmoid() when multi-label

Each class subclasses transformers' own *ForSequenceClassification and changes only
what the head reads: the mean of the last hidden state over real tokens (where
attention_mask is 1) instead of the [CLS] token, as the run trained (pooling='mean').
The BERT head has no pooler then: dropout -> classifier on the mean.

An ensemble (`export --member=mean`: a sweep's members) loads the same way as
`FlaxbertEnsembleForSequenceClassification`: its logits are those of the members' mean
probability, so the two lines above are unchanged.

`score_document(model, tokenizer, text)` scores a text longer than one row the way
`flaxbert-cls predict` does (config.json's long_document, window_stride, max_windows,
window_pooling, head_tokens, max_seq_length); it works for any exported model,
[CLS] or mean-pooled:

  import sys; sys.path.insert(0, DIR); from modeling_flaxbert_cls import score_document
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers.modeling_outputs import SequenceClassifierOutput

# config.json model_type of each mean-pooled family: transformers knows none of them, so
# loading without trust_remote_code fails instead of building a [CLS] head.
MEAN_MODEL_TYPES = {
    "bert": "flaxbert_cls_mean_bert",
    "roberta": "flaxbert_cls_mean_roberta",
    "xlm-roberta": "flaxbert_cls_mean_xlm_roberta",
    "camembert": "flaxbert_cls_mean_camembert",
    "distilbert": "flaxbert_cls_mean_distilbert",
    "electra": "flaxbert_cls_mean_electra",
}


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
  """[batch, hidden] mean of `hidden` over the positions where attention_mask is 1."""
  if attention_mask is None:
    return hidden.mean(dim=1)
  mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
  return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _loss(config: Any, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
  """transformers' sequence-classification loss for config.problem_type."""
  if labels is None:
    return None
  if config.problem_type == "regression" or config.num_labels == 1:
    return torch.nn.functional.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
  if config.problem_type == "multi_label_classification":
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
  return torch.nn.functional.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))


class _MeanPooled:
  """forward: the encoder, the masked mean of its last hidden state, the family's head."""

  def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
              inputs_embeds=None, labels=None, **kwargs):
    encoder = getattr(self, self.base_model_prefix)
    inputs = {"attention_mask": attention_mask, "inputs_embeds": inputs_embeds}
    if self.config.model_type != MEAN_MODEL_TYPES["distilbert"]:  # DistilBERT has neither
      inputs.update(token_type_ids=token_type_ids, position_ids=position_ids)
    outputs = encoder(input_ids, **inputs, return_dict=True, **kwargs)
    logits = self._head(masked_mean(outputs.last_hidden_state, attention_mask))
    return SequenceClassifierOutput(loss=_loss(self.config, logits, labels), logits=logits,
                                    hidden_states=outputs.hidden_states,
                                    attentions=outputs.attentions)

  def score_document(self, tokenizer: Any, text: str) -> torch.Tensor:
    return score_document(self, tokenizer, text)


# --- BERT: no pooler; dropout -> classifier on the mean.
class MeanPooledBertConfig(transformers.BertConfig):
  model_type = MEAN_MODEL_TYPES["bert"]


class MeanPooledBertForSequenceClassification(_MeanPooled,
                                              transformers.BertForSequenceClassification):
  config_class = MeanPooledBertConfig

  def __init__(self, config):
    super().__init__(config)
    self.bert.pooler = None  # the mean replaces it: no weights for it in the export

  def _head(self, pooled):
    return self.classifier(self.dropout(pooled))


# --- RoBERTa family and ELECTRA: their classification head reads position 0; give it the mean.
def _first_token_family(stem: str, model_type: str) -> tuple[type, type]:
  """MeanPooled<stem>Config and MeanPooled<stem>ForSequenceClassification."""
  config_class = type(f"MeanPooled{stem}Config", (getattr(transformers, f"{stem}Config"),),
                      {"model_type": MEAN_MODEL_TYPES[model_type], "__module__": __name__})
  head = lambda self, pooled: self.classifier(pooled[:, None])  # pylint: disable=unnecessary-lambda-assignment
  model_class = type(f"MeanPooled{stem}ForSequenceClassification",
                     (_MeanPooled, getattr(transformers, f"{stem}ForSequenceClassification")),
                     {"config_class": config_class, "_head": head, "__module__": __name__})
  return config_class, model_class


MeanPooledRobertaConfig, MeanPooledRobertaForSequenceClassification = _first_token_family(
    "Roberta", "roberta")
MeanPooledXLMRobertaConfig, MeanPooledXLMRobertaForSequenceClassification = _first_token_family(
    "XLMRoberta", "xlm-roberta")
MeanPooledCamembertConfig, MeanPooledCamembertForSequenceClassification = _first_token_family(
    "Camembert", "camembert")
MeanPooledElectraConfig, MeanPooledElectraForSequenceClassification = _first_token_family(
    "Electra", "electra")


# --- DistilBERT: pre_classifier -> ReLU -> dropout -> classifier on the mean.
class MeanPooledDistilBertConfig(transformers.DistilBertConfig):
  model_type = MEAN_MODEL_TYPES["distilbert"]


class MeanPooledDistilBertForSequenceClassification(
    _MeanPooled, transformers.DistilBertForSequenceClassification):
  config_class = MeanPooledDistilBertConfig

  def _head(self, pooled):
    return self.classifier(self.dropout(torch.relu(self.pre_classifier(pooled))))


# --- An ensemble: a sweep's members (each one of the classes above, or transformers' own)
# whose mean probability is the prediction (`flaxbert-cls export --member=mean`).
ENSEMBLE_MODEL_TYPE = "flaxbert_cls_ensemble"
_MEAN_CLASSES = {MEAN_MODEL_TYPES[t]: c for t, c in (
    ("bert", MeanPooledBertForSequenceClassification),
    ("roberta", MeanPooledRobertaForSequenceClassification),
    ("xlm-roberta", MeanPooledXLMRobertaForSequenceClassification),
    ("camembert", MeanPooledCamembertForSequenceClassification),
    ("distilbert", MeanPooledDistilBertForSequenceClassification),
    ("electra", MeanPooledElectraForSequenceClassification))}


class FlaxbertEnsembleConfig(transformers.PretrainedConfig):
  """`member_config`: one member's config.json; `num_members` of them, same shapes."""

  model_type = ENSEMBLE_MODEL_TYPE

  def __init__(self, member_config: dict[str, Any] | None = None, num_members: int = 1,
               **kwargs):
    self.member_config = dict(member_config or {})
    self.num_members = int(num_members)
    super().__init__(**kwargs)


def _member(values: dict[str, Any]) -> Any:
  """An untrained model of one member's config.json (its weights come from the checkpoint)."""
  values = {k: v for k, v in values.items() if k not in ("auto_map", "architectures")}
  model_type = values.pop("model_type")
  if model_type in _MEAN_CLASSES:
    model_class = _MEAN_CLASSES[model_type]
    return model_class(model_class.config_class(**values))
  config = transformers.AutoConfig.for_model(model_type, **values)
  return transformers.AutoModelForSequenceClassification.from_config(config)


def ensemble_logits(member_logits: list[torch.Tensor], problem_type: str | None) -> torch.Tensor:
  """Logits whose softmax (sigmoid, multi-label) is the members' mean probability; the mean
  score for regression (as flaxbert_cls.decisions.ensemble)."""
  stacked = torch.stack([x.double() for x in member_logits])
  if problem_type == "regression":
    return stacked.mean(0).float()
  tiny = 1e-7  # a unanimous 0 or 1 stays finite as a logit
  if problem_type == "multi_label_classification":
    p = torch.sigmoid(stacked).mean(0).clamp(tiny, 1 - tiny)
    return (torch.log(p) - torch.log1p(-p)).float()
  return torch.log(torch.softmax(stacked, -1).mean(0).clamp(tiny, 1 - tiny)).float()


class FlaxbertEnsembleForSequenceClassification(transformers.PreTrainedModel):
  """The members' mean probability, handed on as logits (softmax / sigmoid of them is it)."""

  config_class = FlaxbertEnsembleConfig
  base_model_prefix = "members"

  def __init__(self, config):
    super().__init__(config)
    self.members = torch.nn.ModuleList(
        [_member(config.member_config) for _ in range(config.num_members)])
    self.post_init()

  def _init_weights(self, module):  # every weight is in the checkpoint
    pass

  def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
              **kwargs):
    inputs = {"attention_mask": attention_mask, **kwargs}
    if token_type_ids is not None and "distilbert" not in self.config.member_config["model_type"]:
      inputs["token_type_ids"] = token_type_ids
    logits = ensemble_logits([m(input_ids, **inputs).logits for m in self.members],
                             self.config.problem_type)
    return SequenceClassifierOutput(loss=_loss(self.config, logits, labels), logits=logits)

  def score_document(self, tokenizer: Any, text: str) -> torch.Tensor:
    return score_document(self, tokenizer, text)


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
  """(ids before, ids after) the text of one single-text row: ([CLS], [SEP]) for BERT."""
  text = tokenizer("a", add_special_tokens=False)["input_ids"]
  row = tokenizer("a", add_special_tokens=True)["input_ids"]
  at = next(i for i in range(len(row)) if row[i:i + len(text)] == text)
  return row[:at], row[at + len(text):]


def document_rows(tokenizer: Any, text: str, config: Any) -> list[list[int]]:
  """The token rows of one text as the run read it: one row ('truncate', 'head_tail') or
  windows of max_seq_length tokens every window_stride text tokens, at most max_windows."""
  max_length = int(getattr(config, "max_seq_length", 128))
  layout = getattr(config, "long_document", "truncate")
  if layout == "truncate":
    return [tokenizer(text, truncation=True, max_length=max_length)["input_ids"]]
  ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # whole text: no warning
  before, after = _special_tokens(tokenizer)
  width = max_length - len(before) - len(after)  # text tokens per row
  n = len(ids)
  if layout == "head_tail":
    head_tokens = int(getattr(config, "head_tokens", -1))
    head = head_tokens if head_tokens >= 0 else round(width * 128 / 510)
    pieces = [ids if n <= width else ids[:head] + ids[n - (width - head):]]
  elif layout == "windows":
    stride = int(config.window_stride)
    needed = 1 + max(0, -(-(n - width) // stride))
    pieces = [ids[k * stride:k * stride + width]
              for k in range(min(needed, int(config.max_windows)))]
  else:
    raise ValueError(f"config.json long_document={layout!r}: unknown; this file reads "
                     "'truncate', 'head_tail' and 'windows'")
  return [before + piece + after for piece in pieces]


@torch.no_grad()
def score_document(model: Any, tokenizer: Any, text: str) -> torch.Tensor:
  """[num_labels] logits of one whole document, as `flaxbert-cls predict` scores it.

  Its rows (`document_rows`) run as one batch; with windows, the document's logits are
  the mean (or max: config.window_pooling) of its windows' logits. Probabilities:
  softmax (multi-label: sigmoid) of logits / config.calibration_temperature.
  """
  rows = document_rows(tokenizer, text, model.config)
  longest = max(len(r) for r in rows)
  pad = tokenizer.pad_token_id or 0
  input_ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows])
  attention_mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
  inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
  if "token_type_ids" in tokenizer.model_input_names:
    inputs["token_type_ids"] = torch.zeros_like(input_ids)
  logits = model.eval()(**inputs).logits.float()
  if getattr(model.config, "window_pooling", "mean") == "max":
    return logits.max(dim=0).values
  return logits.mean(dim=0)

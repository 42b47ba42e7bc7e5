"""InterBERT: a single-stream interaction module under a two-stream extraction module.

```
words   -> embeddings   -+                                  +-> text layers  -> t_pooler -+
                         +-> [image ; text] -> interaction -+                            +-> fusion -> ITM
regions -> v_embeddings -+                                  +-> image layers -> v_pooler -+
```
Parameter names follow the published checkpoints exactly (``state_dict_keys.json``), so released
files load with no missing or unexpected keys. Masks are additive, ``(1 - mask) * -10000``, as
published; attention runs through ``scaled_dot_product_attention`` unless the plain math is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vilbert.config import BertConfig

ACT2FN = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}
MASK_VALUE = -10000.0


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 0/1 keep-mask -> [B, 1, 1, L] additive mask with the published -10000 value."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``use_sdpa`` picks the fused kernel over the reference math."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.use_sdpa = True

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_size).transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, need_probs: bool = False, rows: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``rows``: compute the output of the first ``rows`` positions only (keys and values still
        come from every position)."""
        q, k, v = (
            self._heads(self.query(hidden[:, :rows])),
            self._heads(self.key(hidden)),
            self._heads(self.value(hidden)),
        )
        probs = None
        if self.use_sdpa and not need_probs:
            p = self.dropout.p if self.training else 0.0
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=p)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size) + mask
            probs = scores.softmax(dim=-1)
            context = torch.matmul(self.dropout(probs), v)
        b, _, n, _ = context.shape
        return context.transpose(1, 2).reshape(b, n, self.num_heads * self.head_size), probs


class SelfOutput(nn.Module):
    def __init__(self, in_size: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, attn_dropout: float, hidden_dropout: float) -> None:
        super().__init__()
        self.self = SelfAttention(hidden_size, num_heads, attn_dropout)
        self.output = SelfOutput(hidden_size, hidden_size, hidden_dropout)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, need_probs: bool = False, rows: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, probs = self.self(hidden, mask, need_probs, rows)
        return self.output(context, hidden[:, :rows]), probs


class Intermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class TransformerLayer(nn.Module):
    """The post-LN BERT layer, used for interaction, text and (with the ``v_*`` sizes) image layers."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        act: str,
        hidden_dropout: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        self.attention = Attention(hidden_size, num_heads, attn_dropout, hidden_dropout)
        self.intermediate = Intermediate(hidden_size, intermediate_size, act)
        self.output = SelfOutput(intermediate_size, hidden_size, hidden_dropout)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, need_probs: bool = False, rows: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``rows``: the layer for the first ``rows`` positions only ([B, rows, H])."""
        attended, probs = self.attention(hidden, mask, need_probs, rows)
        return self.output(self.intermediate(attended), attended), probs


def text_layer(config: BertConfig) -> TransformerLayer:
    return TransformerLayer(
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.hidden_act,
        config.hidden_dropout_prob,
        config.attention_probs_dropout_prob,
    )


def image_layer(config: BertConfig) -> TransformerLayer:
    return TransformerLayer(
        config.v_hidden_size,
        config.v_num_attention_heads,
        config.v_intermediate_size,
        config.v_hidden_act,
        config.v_hidden_dropout_prob,
        config.v_attention_probs_dropout_prob,
    )


class TextEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embedded = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(embedded))


class ImageEmbeddings(nn.Module):
    """Region feature + 5-d box embedding; regions have no position or type embedding."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.image_embeddings = nn.Linear(config.v_feature_size, config.v_hidden_size)
        self.image_location_embeddings = nn.Linear(5, config.v_hidden_size)
        self.LayerNorm = nn.LayerNorm(config.v_hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, image_feat: torch.Tensor, image_loc: torch.Tensor) -> torch.Tensor:
        embedded = self.image_embeddings(image_feat) + self.image_location_embeddings(image_loc)
        return self.dropout(self.LayerNorm(embedded))


class InterBertEncoder(nn.Module):
    """``layer[:N]`` interaction over ``[image ; text]``, ``layer[N:]`` text extraction, ``v_layer`` image."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_interaction = config.num_hidden_layers
        self.layer = nn.ModuleList(
            text_layer(config) for _ in range(config.num_hidden_layers + config.t_num_hidden_layers)
        )
        self.v_layer = nn.ModuleList(image_layer(config) for _ in range(config.v_num_hidden_layers))

    def forward(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        joint_mask: torch.Tensor,
        text_mask: torch.Tensor,
        image_mask: torch.Tensor,
        need_probs: bool = False,
        first_position_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``first_position_only``: the last text and image layers compute position 0 only (all the
        poolers read), so the streams come back as [B, 1, H]; scoring needs no more."""
        num_regions = image.shape[1]
        attentions: list[torch.Tensor] = []
        hidden = torch.cat((image, text), dim=1)
        for layer in self.layer[: self.num_interaction]:
            hidden, probs = layer(hidden, joint_mask, need_probs)
            attentions += [probs] if need_probs else []
        image, text = hidden[:, :num_regions], hidden[:, num_regions:]
        text = self._stream(
            self.layer[self.num_interaction :], text, text_mask, need_probs, first_position_only, attentions
        )
        image = self._stream(self.v_layer, image, image_mask, need_probs, first_position_only, attentions)
        return text, image, attentions

    @staticmethod
    def _stream(
        layers: Sequence[nn.Module],
        hidden: torch.Tensor,
        mask: torch.Tensor,
        need_probs: bool,
        first_position_only: bool,
        attentions: list[torch.Tensor],
    ) -> torch.Tensor:
        """One extraction stream; with ``first_position_only`` its last layer (or, without layers, the
        stream itself) is cut to position 0."""
        for index, layer in enumerate(layers):
            rows = 1 if first_position_only and index == len(layers) - 1 else None
            hidden, probs = layer(hidden, mask, need_probs, rows)
            attentions += [probs] if need_probs else []
        return hidden[:, :1] if first_position_only else hidden


class Pooler(nn.Module):
    """Linear + ReLU on the first position: [CLS] for text, the global region for images."""

    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, out_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(hidden[:, 0]))


@dataclass
class InterBertOutput:
    sequence_output_t: torch.Tensor
    sequence_output_v: torch.Tensor
    pooled_output_t: torch.Tensor
    pooled_output_v: torch.Tensor
    attentions: list[torch.Tensor]


class InterBertPreTrainedModel(nn.Module):
    """Weight init and checkpoint loading shared by every InterBERT model."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config

    def init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def set_attention_impl(self, use_sdpa: bool) -> None:
        """``True``: fused ``scaled_dot_product_attention``; ``False``: the published reference math."""
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.use_sdpa = use_sdpa

    @classmethod
    def from_pretrained(
        cls, path: str, config: BertConfig | None = None, *args, strict: bool = False, **kwargs
    ):
        """Build from ``config`` and load ``path`` (file or folder, any format of ``checkpoint.py``);
        with ``config=None``, ``path`` is a model folder and its ``config.json`` gives the sizes."""
        from vilbert.checkpoint import load_pretrained

        if config is None:
            from vilbert.model_folder import init_kwargs, read_folder_config

            saved = read_folder_config(path)
            config, kwargs = saved.config, init_kwargs(cls, saved, kwargs, path)
        model = cls(config, *args, **kwargs)
        load_pretrained(model, path, strict=strict)
        return model

    def save_pretrained(
        self, folder: str, vocab: str | None = None, card: dict | None = None, overwrite: bool = False
    ) -> str:
        """Write a model folder (``config.json``, ``model.safetensors``, ``vocab.txt``, ``README.md``)
        that ``from_pretrained(folder)`` reads back; ``card`` holds recipe and metrics for the README."""
        from vilbert.model_folder import write_model_folder

        return write_model_folder(self, folder, vocab=vocab, card=card, overwrite=overwrite)


class InterBertModel(InterBertPreTrainedModel):
    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.embeddings = TextEmbeddings(config)
        self.v_embeddings = ImageEmbeddings(config)
        self.encoder = InterBertEncoder(config)
        self.t_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.v_pooler = Pooler(config.v_hidden_size, config.bi_hidden_size)
        self.apply(self.init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        image_feat: torch.Tensor,
        image_loc: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        multimodal_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> InterBertOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_attention_mask is None:
            image_attention_mask = image_feat.new_ones(image_feat.shape[:2], dtype=torch.long)
        return self.encode(
            self.embeddings(input_ids, token_type_ids),
            self.v_embeddings(image_feat, image_loc),
            attention_mask,
            image_attention_mask,
            multimodal_mask,
            output_attentions,
        )

    def encode(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        attention_mask: torch.Tensor,
        image_attention_mask: torch.Tensor,
        multimodal_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        first_position_only: bool = False,
    ) -> InterBertOutput:
        """The encoder and poolers on embedded text ``embeddings(...)`` and image ``v_embeddings(...)``:
        what ``forward`` runs after embedding, public so that a scorer can embed each image once.
        ``first_position_only``: see :meth:`InterBertEncoder.forward`."""
        if multimodal_mask is None:
            multimodal_mask = torch.cat((image_attention_mask, attention_mask), dim=1)
        dtype = self.embeddings.word_embeddings.weight.dtype
        text, image, attentions = self.encoder(
            text,
            image,
            additive_mask(multimodal_mask, dtype),
            additive_mask(attention_mask, dtype),
            additive_mask(image_attention_mask, dtype),
            need_probs=output_attentions,
            first_position_only=first_position_only,
        )
        return InterBertOutput(text, image, self.t_pooler(text), self.v_pooler(image), attentions)


class PredictionHeadTransform(nn.Module):
    def __init__(self, hidden_size: int, act: str) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = ACT2FN[act]
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class LMPredictionHead(nn.Module):
    """Masked-segment head; its decoder weight is the word-embedding matrix (tied)."""

    def __init__(self, config: BertConfig, embedding_weight: nn.Parameter) -> None:
        super().__init__()
        self.transform = PredictionHeadTransform(config.hidden_size, config.hidden_act)
        self.decoder = nn.Linear(embedding_weight.shape[1], embedding_weight.shape[0], bias=False)
        self.decoder.weight = embedding_weight
        self.bias = nn.Parameter(torch.zeros(embedding_weight.shape[0]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class ImagePredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        # The published head reads ``hidden_act`` (not ``v_hidden_act``) for its transform.
        self.transform = PredictionHeadTransform(config.v_hidden_size, config.hidden_act)
        self.decoder = nn.Linear(config.v_hidden_size, config.region_target_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


def fuse(pooled_t: torch.Tensor, pooled_v: torch.Tensor, method: str) -> torch.Tensor:
    """The two pooled vectors made one: elementwise product (``mul``) or sum."""
    return pooled_t * pooled_v if method == "mul" else pooled_t + pooled_v


class PreTrainingHeads(nn.Module):
    """``cls``: masked-segment, image-text matching (class 0 = matched) and masked-region heads."""

    def __init__(self, config: BertConfig, embedding_weight: nn.Parameter) -> None:
        super().__init__()
        self.predictions = LMPredictionHead(config, embedding_weight)
        self.bi_seq_relationship = nn.Linear(config.bi_hidden_size, 2)
        self.imagePredictions = ImagePredictionHead(config)
        self.fusion_method = config.fusion_method
        self.dropout = nn.Dropout(0.1)

    def fuse(self, pooled_t: torch.Tensor, pooled_v: torch.Tensor) -> torch.Tensor:
        """``mul`` fusion is dropped out; ``sum`` is too (the published heads apply dropout to both)."""
        return self.dropout(fuse(pooled_t, pooled_v, self.fusion_method))

    def itm(self, out: InterBertOutput) -> torch.Tensor:
        return self.bi_seq_relationship(self.fuse(out.pooled_output_t, out.pooled_output_v))


@dataclass
class PreTrainingLosses:
    """The three pretraining losses, returned separately so the trainer can weight and log them."""

    msm: torch.Tensor
    mrm: torch.Tensor
    itm: torch.Tensor


@dataclass
class PreTrainingScores:
    text: torch.Tensor | None
    image: torch.Tensor | None
    itm: torch.Tensor
    attentions: list[torch.Tensor]


def _gather(values: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``values[mask]``: through the flat ``positions`` of the mask when given (the same rows in the
    same order, with no host sync), else by the mask itself (a sync on a GPU: its size is unknown)."""
    if positions is None:
        return values[mask]
    return values.reshape(mask.numel(), *values.shape[mask.dim() :]).index_select(0, positions)


@dataclass
class MRMTargets:
    """The MRM targets in either form: every region's (``full_targets``: ``[B, R - 1, D]``, the
    published ``image_target``) or the counted regions' only (``counted_targets``: ``[M, D]`` in
    ``positions`` order, the collate's ``mrm_targets``). Either gives both views, with the same
    values where MRM counts."""

    full_targets: torch.Tensor | None
    counted_targets: torch.Tensor | None
    positions: torch.Tensor | None

    @property
    def given(self) -> bool:
        return self.full_targets is not None or self.counted_targets is not None

    def gathered(self, counted: torch.Tensor) -> torch.Tensor:
        """The targets of the ``counted`` regions, in flat order."""
        if self.counted_targets is not None:
            return self.counted_targets
        return _gather(self.full_targets, counted, self.positions)

    def full(self, counted: torch.Tensor) -> torch.Tensor:
        """``[B, R - 1, D]`` targets; from the counted rows alone, zeros elsewhere (a loss weighted by
        ``counted`` reads no other row)."""
        if self.full_targets is not None:
            return self.full_targets
        rows = self.counted_targets
        full = rows.new_zeros(counted.numel(), rows.shape[-1])
        if self.positions is None:
            full[counted.reshape(-1)] = rows
        else:
            full.index_copy_(0, self.positions, rows)
        return full.view(*counted.shape, rows.shape[-1])


class InterBertForMultiModalPreTraining(InterBertPreTrainedModel):
    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = InterBertModel(config)
        self.cls = PreTrainingHeads(config, self.bert.embeddings.word_embeddings.weight)
        self.apply(self.init_weights)
        self.predict_feature = config.predict_feature
        # Fast path: run the vocabulary and region heads only where a loss is counted.
        self.gather_heads = True

    def forward(
        self,
        input_ids: torch.Tensor,
        image_feat: torch.Tensor,
        image_loc: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        multimodal_mask: torch.Tensor | None = None,
        masked_lm_labels: torch.Tensor | None = None,
        image_label: torch.Tensor | None = None,
        image_target: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        output_attentions: bool = False,
        itm_only: bool = False,
        msm_positions: torch.Tensor | None = None,
        mrm_positions: torch.Tensor | None = None,
        mrm_targets: torch.Tensor | None = None,
    ) -> PreTrainingLosses | PreTrainingScores:
        """With all labels: the three losses; without: the scores (``itm_only`` skips the big heads).

        ``msm_positions`` / ``mrm_positions``: flat indices of the labelled tokens and counted regions
        (the collate's), so the gathered heads need no host sync; without them the masks are used.
        ``mrm_targets``: the targets of the counted regions only, in ``mrm_positions`` order (the
        collate's), in place of ``image_target``; the losses are the same.
        """
        out = self.bert(
            input_ids,
            image_feat,
            image_loc,
            token_type_ids,
            attention_mask,
            image_attention_mask,
            multimodal_mask,
            output_attentions,
        )
        itm_scores = self.cls.itm(out)
        targets = MRMTargets(image_target, mrm_targets, mrm_positions)
        labelled = masked_lm_labels is not None and image_label is not None and targets.given
        if labelled and next_sentence_label is not None:
            return PreTrainingLosses(
                msm=self._msm_loss(out.sequence_output_t, masked_lm_labels, msm_positions),
                mrm=self._mrm_loss(out.sequence_output_v, image_label, targets, next_sentence_label),
                itm=F.cross_entropy(itm_scores.view(-1, 2), next_sentence_label.view(-1), ignore_index=-1),
            )
        if itm_only:
            return PreTrainingScores(None, None, itm_scores, out.attentions)
        return PreTrainingScores(
            self.cls.predictions(out.sequence_output_t),
            self.cls.imagePredictions(out.sequence_output_v),
            itm_scores,
            out.attentions,
        )

    def _msm_loss(
        self, text: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cross-entropy over the vocabulary at labelled positions (-1 ignored), matched or not.

        A batch with no labelled token gives 0 rather than the NaN of an empty mean.
        """
        selected = labels != -1
        if self.gather_heads:
            logits = self.cls.predictions(_gather(text, selected, positions))
            targets = _gather(labels, selected, positions)
        else:
            logits = self.cls.predictions(text).view(-1, self.config.vocab_size)
            targets = labels.view(-1)
        total = F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum")
        return total / selected.sum().clamp(min=1)

    def _mrm_loss(
        self, image: torch.Tensor, label: torch.Tensor, targets: MRMTargets, itm_label: torch.Tensor
    ) -> torch.Tensor:
        """KL (or MSE with predict_feature) at masked regions of matched pairs only; region 0 dropped."""
        counted = (label == 1) & (itm_label == 0)[:, None]
        regions = image[:, 1:]
        if self.gather_heads:
            prediction = self.cls.imagePredictions(_gather(regions, counted, targets.positions)).float()
            target, weight = targets.gathered(counted).float(), None
        else:
            prediction = self.cls.imagePredictions(regions).float()
            target, weight = targets.full(counted), counted.unsqueeze(2).float()
        if self.predict_feature:
            per_element = F.mse_loss(prediction, target.float(), reduction="none")
        else:
            per_element = F.kl_div(F.log_softmax(prediction, dim=-1), target.float(), reduction="none")
        if weight is not None:
            per_element = per_element * weight
        return per_element.sum() / counted.sum().clamp(min=1)


@dataclass
class VLTaskOutput:
    """The published 7 outputs of the task model, by name (``None`` where ``pooled_only`` skipped it)."""

    vil_prediction: torch.Tensor
    vil_logit: torch.Tensor
    vil_binary_prediction: torch.Tensor
    vision_prediction: torch.Tensor | None
    vision_logit: torch.Tensor | None
    linguisic_prediction: torch.Tensor | None
    linguisic_logit: torch.Tensor | None


class InterBertForVLTasks(InterBertPreTrainedModel):
    """``bert`` + the pretraining heads + task heads; VCR uses ``vil_logit``, retrieval the ITM head."""

    def __init__(self, config: BertConfig, num_labels: int = 1, dropout_prob: float = 0.1) -> None:
        super().__init__(config)
        self.num_labels = num_labels
        self.bert = InterBertModel(config)
        self.dropout = nn.Dropout(dropout_prob)
        self.cls = PreTrainingHeads(config, self.bert.embeddings.word_embeddings.weight)
        self.vil_prediction = nn.Linear(config.bi_hidden_size, num_labels)
        self.vil_logit = nn.Linear(config.bi_hidden_size, 1)
        self.vision_logit = nn.Linear(config.v_hidden_size, 1)
        self.linguisic_logit = nn.Linear(config.hidden_size, 1)
        self.fusion_method = config.fusion_method
        self.apply(self.init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        image_feat: torch.Tensor,
        image_loc: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        multimodal_mask: torch.Tensor | None = None,
        pooled_only: bool = False,
    ) -> VLTaskOutput:
        """``pooled_only`` computes just the pooled heads (VCR and retrieval scoring need no more)."""
        if image_attention_mask is None:
            image_attention_mask = image_feat.new_ones(image_feat.shape[:2], dtype=torch.long)
        out = self.bert(
            input_ids,
            image_feat,
            image_loc,
            token_type_ids,
            attention_mask,
            image_attention_mask,
            multimodal_mask,
        )
        # Its own dropout, as published (the ITM head below draws from the heads' dropout).
        fused = self.dropout(fuse(out.pooled_output_t, out.pooled_output_v, self.fusion_method))
        heads = VLTaskOutput(
            vil_prediction=self.vil_prediction(fused),
            vil_logit=self.vil_logit(fused),
            vil_binary_prediction=self.cls.itm(out),
            vision_prediction=None,
            vision_logit=None,
            linguisic_prediction=None,
            linguisic_logit=None,
        )
        if pooled_only:
            return heads
        image_pad = additive_mask(image_attention_mask, out.sequence_output_v.dtype)[:, 0, 0, :, None]
        heads.vision_prediction = self.cls.imagePredictions(out.sequence_output_v)
        heads.vision_logit = self.vision_logit(self.dropout(out.sequence_output_v)) + image_pad
        heads.linguisic_prediction = self.cls.predictions(out.sequence_output_t)
        heads.linguisic_logit = self.linguisic_logit(self.dropout(out.sequence_output_t))
        return heads

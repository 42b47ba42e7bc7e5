"""FLOPs of the pretraining model, and model FLOPs utilisation (MFU) against the device's peak.

Only matrix products are counted (2 FLOPs per multiply-add), as the peak rates they are compared
with are those of the matrix units; layer norms, softmax, GELU, dropout and the losses are left out.
The count follows the code of :mod:`vilbert.modeling` layer by layer, at the batch's padded
lengths (the model computes the padding too):

- image embeddings: ``Linear(v_feature_size, H)`` and ``Linear(5, H)`` per region (text embeddings
  are look-ups);
- each transformer layer over ``L`` positions: Q, K, V and the attention output (``4 L H^2``
  multiply-adds), the feed-forward pair (``2 L H I``), scores and context (``2 L^2 H``);
  interaction layers over ``[image ; text]``, then text layers over the text, image layers over
  the regions;
- the two poolers (first position only) and the ITM classifier;
- the masked-segment head (``H -> H``, then ``H -> vocab``) and the masked-region head (``H -> H``,
  then ``H -> classes``), on every position or, with ``gather_heads`` (the default), only where a
  loss is counted: labelled tokens, masked regions of matched pairs.

A training step costs the forward three times (the backward computes one product for the inputs'
gradient and one for the weights'), except the image embedding, whose input (the region features)
needs no gradient: there the backward adds one product, not two.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vilbert.config import BertConfig

TERA = 1e12
IGNORE_INDEX = -1


def layer_flops(length: int, hidden: int, intermediate: int) -> int:
    """Forward FLOPs of one post-LN transformer layer over ``length`` positions."""
    projections = 4 * length * hidden * hidden
    feed_forward = 2 * length * hidden * intermediate
    attention = 2 * length * length * hidden
    return 2 * (projections + feed_forward + attention)


@dataclass(frozen=True)
class PretrainingFlops:
    """FLOPs of one sample (or one batch: every field scales with the batch size)."""

    image_embedding: int
    encoder: int
    poolers_and_itm: int
    heads: int

    @property
    def forward(self) -> int:
        return self.image_embedding + self.encoder + self.poolers_and_itm + self.heads

    @property
    def training_step(self) -> int:
        """Forward + backward: every product three times, the image embedding's twice."""
        return 3 * self.forward - self.image_embedding


def pretraining_flops(
    config: BertConfig,
    text_len: int,
    num_regions: int,
    msm_positions: float | None = None,
    mrm_positions: float | None = None,
) -> PretrainingFlops:
    """FLOPs of one sample padded to ``text_len`` tokens and ``num_regions`` regions (the global one
    included, as in ``image_feat``).

    ``msm_positions`` / ``mrm_positions``: positions the MSM / MRM heads run on (``gather_heads``:
    labelled tokens, counted regions); ``None`` means every position (``gather_heads=False``: all
    ``text_len`` tokens and the ``num_regions - 1`` real-region slots).
    """
    hidden = config.hidden_size
    joint = num_regions + text_len
    image_embedding = 2 * num_regions * (config.v_feature_size + 5) * hidden
    encoder = (
        config.num_hidden_layers * layer_flops(joint, hidden, config.intermediate_size)
        + config.t_num_hidden_layers * layer_flops(text_len, hidden, config.intermediate_size)
        + config.v_num_hidden_layers
        * layer_flops(num_regions, config.v_hidden_size, config.v_intermediate_size)
    )
    poolers_and_itm = (
        2 * (hidden + config.v_hidden_size) * config.bi_hidden_size + 2 * config.bi_hidden_size * 2
    )
    tokens = text_len if msm_positions is None else msm_positions
    regions = num_regions - 1 if mrm_positions is None else mrm_positions
    heads = 2 * tokens * hidden * (hidden + config.vocab_size) + 2 * regions * config.v_hidden_size * (
        config.v_hidden_size + config.region_target_size
    )
    return PretrainingFlops(image_embedding, encoder, poolers_and_itm, round(heads))


def batch_flops(
    config: BertConfig, batch: Mapping[str, torch.Tensor], gather_heads: bool = True
) -> PretrainingFlops:
    """FLOPs of a whole pretraining batch (the named batch of ``collate_pretraining``).

    Read it from the batch while it is still on the host: on a GPU the label counts would cost a
    synchronisation.
    """
    size, text_len = batch["input_ids"].shape
    num_regions = batch["image_feat"].shape[1]
    msm = mrm = None
    if gather_heads:
        msm = int((batch["lm_label_ids"] != IGNORE_INDEX).sum()) / size
        counted = (batch["image_label"] == 1) & (batch["is_next"] == 0)[:, None]
        mrm = int(counted.sum()) / size
    one = pretraining_flops(config, text_len, num_regions, msm, mrm)
    return PretrainingFlops(
        one.image_embedding * size, one.encoder * size, one.poolers_and_itm * size, round(one.heads * size)
    )


# Dense peak rates (no structured sparsity) in TFLOP/s, from NVIDIA's data sheets, by the
# precision of the matrix products: "bf16" (= fp16), "tf32" (fp32 tensors on tensor cores), "fp32".
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM: the H100 SXM's compute
}
PRECISION_ALIASES = {"fp16": "bf16", "bf16": "bf16", "tf32": "tf32", "fp32": "fp32"}


def peak_flops(
    precision: str, device_name: str | None = None, override_tflops: float | None = None
) -> float | None:
    """Peak FLOP/s for ``precision`` on the named device (``torch.cuda.get_device_name()`` when
    ``None`` and CUDA is available); ``override_tflops`` (``--peak_tflops``) wins. ``None`` when
    the device is not in :data:`PEAK_TFLOPS` (a CPU, another GPU): no MFU is reported then."""
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"peak TFLOP/s must be positive, got {override_tflops}")
        return override_tflops * TERA
    kind = PRECISION_ALIASES.get(precision)
    if kind is None:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISION_ALIASES)}")
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for model, rates in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before the bare "H100"
        if model in device_name:
            return rates[kind] * TERA
    return None


def estimate_mfu(flops_per_step: float, steps_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (nanoGPT's ``estimate_mfu``)."""
    return flops_per_step * steps_per_s / peak

"""Image loading and preprocessing exactly as the Caffe test script did it.

OpenCV decodes to BGR uint8; the image becomes float32, the BGR means are subtracted (computed in
float64, as NumPy did against the float64 means array), and only then is it resized with OpenCV's
bilinear filter by one factor for both axes. One image at a time, never padded: padding would
change the convolutions' border values and so the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vilbert.errors import BadInputError

try:
    import cv2
except ImportError:  # pragma: no cover - the extra is part of the test install
    cv2 = None


class UnreadableImageError(BadInputError):
    """A file OpenCV cannot decode as an image."""


def require_cv2() -> None:
    """OpenCV is an optional extra; say how to get it instead of failing on a bare import."""
    if cv2 is None:
        raise BadInputError("OpenCV is not installed; pip install '.[features]' (opencv-python-headless)")


def read_image_bgr(path: str) -> np.ndarray:
    """The image at ``path`` as BGR uint8 [H, W, 3] (``cv2.imread``'s colour mode, as published)."""
    require_cv2()
    image = cv2.imread(path)
    if image is None:
        raise UnreadableImageError(f"{path}: cannot be read as an image")
    return image


def image_scale(height: int, width: int, scale: int, max_size: int) -> float:
    """Shortest side to ``scale`` unless the longest, rounded, would pass ``max_size``."""
    size_min, size_max = min(height, width), max(height, width)
    factor = float(scale) / float(size_min)
    if np.round(factor * size_max) > max_size:
        factor = float(max_size) / float(size_max)
    return factor


@dataclass
class PreparedImage:
    """The network input [1, 3, h, w] (BGR, mean-subtracted, resized) and how it was made."""

    tensor: torch.Tensor
    scale: float
    image_h: int
    image_w: int

    @property
    def input_h(self) -> int:
        return int(self.tensor.shape[2])

    @property
    def input_w(self) -> int:
        return int(self.tensor.shape[3])


def prepare_image(
    image_bgr: np.ndarray, pixel_means: tuple[float, float, float], scale: int, max_size: int
) -> PreparedImage:
    """Mean-subtract then resize one BGR image (uint8 or float) as the original ``_get_image_blob``."""
    require_cv2()
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise BadInputError(f"expected a BGR image [H, W, 3], got shape {list(image_bgr.shape)}")
    height, width = int(image_bgr.shape[0]), int(image_bgr.shape[1])
    centred = (image_bgr.astype(np.float32) - np.asarray(pixel_means, dtype=np.float64)).astype(np.float32)
    factor = image_scale(height, width, scale, max_size)
    resized = cv2.resize(centred, None, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))[None]
    return PreparedImage(tensor=tensor, scale=factor, image_h=height, image_w=width)

"""Per-family facts and processor loading for the vision families.

The stock ``transformers`` processors of Qwen2-VL / Qwen2.5-VL and Molmo2 also own a *video*
processor, and every video processor (and Molmo2's image processor) needs ``torchvision``. Its
PyPI wheels are CUDA builds that do not load next to a CPU-only torch (``operator
torchvision::nms does not exist``), so on such machines plugtune uses image-only subclasses of
the stock processors: same tokens, same ``replace_image_token``, same saved files (they save
under the stock class names), no video. Molmo2's image processor gets a torch-only ``resize`` /
``normalize`` (:class:`Molmo2ImageProcessorTorch`), numerically what torchvision does on
tensors (``F.interpolate(mode="bilinear", align_corners=False)``, ``(x - mean) / std``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Molmo2Processor, Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor
from transformers.utils import is_torchvision_available


@dataclass(frozen=True)
class VisionFamily:
    """What differs between the vision model types.

    Attributes:
        placeholder: text that stands for one image before expansion (what the model's own
            chat template renders for ``{"type": "image"}``); it contains the processor's
            ``image_token``, which :func:`plugtune_vision._encode.expand_images` expands.
        collate: ``"flat"`` (all images of a batch in one list: Qwen2-VL ``image_grid_thw``,
            Molmo2 ``image_token_pooling``) or ``"mllama"`` (per-sample image lists, tiles,
            aspect-ratio ids/masks and a cross-attention mask).
        bos_from_eos: the processor starts every text with ``bos_token or eos_token`` (Molmo2's
            processor does so because its chat templates emit no BOS).
        extra_tokens: special tokens the tokenizer must have (added by :mod:`.tiny`).
    """

    placeholder: str
    collate: str = "flat"
    bos_from_eos: bool = False
    extra_tokens: tuple[str, ...] = ()


MLLAMA = VisionFamily("<|image|>", collate="mllama", extra_tokens=("<|image|>",))
QWEN2_VL = VisionFamily("<|vision_start|><|image_pad|><|vision_end|>")
MOLMO2 = VisionFamily("<|image|>", bos_from_eos=True, extra_tokens=(
    "<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>",
    "<frame_end>", "<im_low>", "<|image|>", "<|video|>"))

#: native model types -> family facts (original Molmo, ``molmo``, is remote code: see plugin)
FAMILIES: dict[str, VisionFamily] = {
    "mllama": MLLAMA, "qwen2_vl": QWEN2_VL, "qwen2_5_vl": QWEN2_VL, "molmo2": MOLMO2,
}


class Molmo2ImageProcessorTorch(Molmo2ImageProcessor):
    """Molmo2's image processor without torchvision: torch ``resize`` / ``normalize``.

    Only the two torchvision calls the Molmo2 pipeline makes on tensors are replaced; tiling,
    pooling indices and patching are the stock code. Saved as ``Molmo2ImageProcessor``.
    """

    def resize(self, image: torch.Tensor, size, resample=None, antialias: bool = True,
               **kwargs) -> torch.Tensor:
        """Bilinear resize of ``(..., C, H, W)`` to ``(size.height, size.width)``."""
        squeeze = image.ndim == 3
        x = image.unsqueeze(0) if squeeze else image
        x = torch.nn.functional.interpolate(x.float() if not x.is_floating_point() else x,
                                            size=(size.height, size.width), mode="bilinear",
                                            align_corners=False, antialias=antialias)
        return x.squeeze(0) if squeeze else x

    def normalize(self, image: torch.Tensor, mean, std, inplace: bool = False,
                  **kwargs) -> torch.Tensor:
        """``(image - mean) / std`` per channel (channel axis -3)."""
        mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        return (image - mean) / std

    def to_dict(self):
        d = super().to_dict()
        d["image_processor_type"] = "Molmo2ImageProcessor"
        return d


class _StockName:
    """Save under the stock processor class name so other tools can read the run directory."""

    _stock: str = ""

    def to_dict(self):
        d = super().to_dict()  # type: ignore[misc]
        d["processor_class"] = self._stock
        return d


class ImageOnlyQwen2VLProcessor(_StockName, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor (no torchvision needed)."""

    _stock = "Qwen2VLProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(_StockName, Qwen2_5_VLProcessor):  # noqa: N801
    """``Qwen2_5_VLProcessor`` without a video processor (no torchvision needed)."""

    _stock = "Qwen2_5_VLProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyMolmo2Processor(_StockName, Molmo2Processor):
    """``Molmo2Processor`` without a video processor; a torchvision-backed image processor is
    swapped for :class:`Molmo2ImageProcessorTorch` when torchvision is missing."""

    _stock = "Molmo2Processor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if not is_torchvision_available() and not isinstance(image_processor, Molmo2ImageProcessorTorch):
            image_processor = Molmo2ImageProcessorTorch.from_dict(image_processor.to_dict())
        # Molmo2Processor hands (image, video, tokenizer) positionally to ProcessorMixin, which
        # zips them with this class's attributes (image_processor, tokenizer): passing the
        # tokenizer in the video slot keeps the pairing right and sets no video processor.
        super().__init__(image_processor=image_processor, video_processor=tokenizer,
                         tokenizer=tokenizer, chat_template=chat_template, **kwargs)


IMAGE_ONLY = {"qwen2_vl": ImageOnlyQwen2VLProcessor, "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
              "molmo2": ImageOnlyMolmo2Processor}


def load_processor(src: str, model_type: str, revision: str | None = None):
    """The processor saved in ``src`` (a model folder or run directory).

    ``AutoProcessor`` first; when it fails for want of torchvision (video processors), the
    image-only subclass of the family's stock processor (see module docstring).

    Raises:
        plugtune.modeling.ModelLoadError: no processor can be built from ``src``.
    """
    from transformers import AutoProcessor

    from plugtune.modeling import ModelLoadError

    first: Exception | None = None
    if model_type != "molmo2" or is_torchvision_available():
        try:
            return AutoProcessor.from_pretrained(src, revision=revision)
        except Exception as exc:  # typically: the video processor needs torchvision
            first = exc
    cls = IMAGE_ONLY.get(model_type)
    if cls is None:
        raise ModelLoadError(f"cannot load the {model_type} processor from {src!r}: {first}")
    try:
        if model_type == "molmo2":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(src, revision=revision)
            ip = Molmo2ImageProcessorTorch.from_pretrained(src, revision=revision)
            chat = getattr(tok, "chat_template", None)
            return cls(image_processor=ip, tokenizer=tok, chat_template=chat)
        return cls.from_pretrained(src, revision=revision)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the {model_type} processor from {src!r} (needs preprocessor_config.json "
            f"and tokenizer files): {exc}" + (f"; AutoProcessor said: {first}" if first else "")
        ) from exc

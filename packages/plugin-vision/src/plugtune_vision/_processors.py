"""Per-family facts and processor loading for the vision families.

:data:`FAMILIES` is the per-model table (``config.model_type`` -> :class:`VisionFamily`); a
model type without a row (the generic ``image_text`` route) gets its facts derived from its own
processor and chat template by :func:`derive_family`.

The stock ``transformers`` processors of Qwen2-VL / Qwen2.5-VL / Qwen3-VL, SmolVLM and Molmo2
also own a *video* processor, and every video processor (and Molmo2's image processor) needs
``torchvision`` (SmolVLM's also needs ``num2words``). Its
PyPI wheels are CUDA builds that do not load next to a CPU-only torch (``operator
torchvision::nms does not exist``), so on such machines plugtune uses image-only subclasses of
the stock processors: same tokens, same ``replace_image_token``, same saved files (they save
under the stock class names), no video. Molmo2's image processor gets a torch-only ``resize`` /
``normalize`` (:class:`Molmo2ImageProcessorTorch`), numerically what torchvision does on
tensors (``F.interpolate(mode="bilinear", align_corners=False)``, ``(x - mean) / std``).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import torch
from transformers import (
    Molmo2Processor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
    SmolVLMProcessor,
)
from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor
from transformers.processing_utils import ProcessorMixin
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
        token_types_key: the batch key under which the processor's per-token modality ids
            (``create_mm_token_type_ids``: 1 on image tokens) reach the model, when the
            processor returns them: ``"mm_token_type_ids"`` (Qwen-VL M-RoPE, Molmo2) or
            ``"token_type_ids"`` (Gemma 3: its bidirectional attention over each image's
            tokens is built from them).
    """

    placeholder: str
    collate: str = "flat"
    bos_from_eos: bool = False
    extra_tokens: tuple[str, ...] = ()
    token_types_key: str = "mm_token_type_ids"


MLLAMA = VisionFamily("<|image|>", collate="mllama", extra_tokens=("<|image|>",))
#: Qwen2-VL, Qwen2.5-VL and Qwen3-VL: ``<|image_pad|>`` repeated grid_t*grid_h*grid_w/merge**2
QWEN_VL = VisionFamily("<|vision_start|><|image_pad|><|vision_end|>")
#: Gemma 3: ``<start_of_image>`` becomes ``\n\n<start_of_image>`` + ``mm_tokens_per_image``
#: ``<image_soft_token>`` + ``<end_of_image>\n\n``; token_type_ids mark the soft tokens
GEMMA3 = VisionFamily("<start_of_image>", token_types_key="token_type_ids")
#: SmolVLM / Idefics3: an image split into rows x cols tiles plus a global view, each
#: ``<fake_token_around_image><row_r_col_c>`` + ``image_seq_len`` ``<image>`` tokens
IDEFICS3 = VisionFamily("<image>", extra_tokens=(
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))))
MOLMO2 = VisionFamily("<|image|>", bos_from_eos=True, extra_tokens=(
    "<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>",
    "<frame_end>", "<im_low>", "<|image|>", "<|video|>"))

#: native model types -> family facts (original Molmo, ``molmo``, is remote code: see plugin)
FAMILIES: dict[str, VisionFamily] = {
    "mllama": MLLAMA, "qwen2_vl": QWEN_VL, "qwen2_5_vl": QWEN_VL, "qwen3_vl": QWEN_VL,
    "molmo2": MOLMO2, "gemma3": GEMMA3, "smolvlm": IDEFICS3, "idefics3": IDEFICS3,
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


class ImageOnlyQwen3VLProcessor(_StockName, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without a video processor (no torchvision needed)."""

    _stock = "Qwen3VLProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlySmolVLMProcessor(_StockName, SmolVLMProcessor):
    """``SmolVLMProcessor`` without a video processor: neither torchvision nor ``num2words``
    (which the stock ``__init__`` requires for video frame captions) is needed. The image
    attributes are those the stock ``__init__`` sets."""

    _stock = "SmolVLMProcessor"

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169,
                 chat_template=None, **kwargs):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token",
                                              "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = None
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template,
                                **kwargs)


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
              "qwen3_vl": ImageOnlyQwen3VLProcessor, "smolvlm": ImageOnlySmolVLMProcessor,
              "molmo2": ImageOnlyMolmo2Processor}


def load_processor(src: str, model_type: str, revision: str | None = None):
    """The processor saved in ``src`` (a model folder or run directory).

    ``AutoProcessor`` first; when it fails (for want of torchvision: video processors; of
    ``num2words``: SmolVLM), or cannot work because torchvision is missing, the image-only
    subclass of the family's stock processor (see module docstring).

    Raises:
        plugtune.modeling.ModelLoadError: no processor can be built from ``src``.
    """
    from transformers import AutoProcessor

    from plugtune.modeling import ModelLoadError

    first: Exception | None = None
    # without torchvision the stock processors of the IMAGE_ONLY types cannot load (their video
    # processor needs it): go straight to the image-only class (saves one tokenizer load)
    if model_type not in IMAGE_ONLY or is_torchvision_available():
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


#: the pseudo model type of the generic image-text route (any ``AutoModelForImageTextToText``)
GENERIC = "image_text"


def image_kwargs(processor) -> dict:
    """The processor's default ``images_kwargs`` (class defaults such as SmolVLM's
    ``return_row_col_info: True`` or Gemma 3's ``do_pan_and_scan: False``), the same the stock
    ``processor(images=..., text=...)`` call hands to its image processor."""
    tok = getattr(processor, "tokenizer", None)
    try:
        return dict(processor._merge_kwargs(
            tokenizer_init_kwargs=getattr(tok, "init_kwargs", {}))["images_kwargs"])
    except Exception:  # processors outside ProcessorMixin's kwargs machinery
        return {}


def _template_image_text(tokenizer, image_token: str) -> str | None:
    """What the chat template renders for one ``{"type": "image"}`` part (``None`` when it
    renders no text containing ``image_token``, or cannot render list content)."""
    mark = "PLUGTUNEMARK"
    try:
        with_image = tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": mark}]}],
            tokenize=False)
        plain = tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": mark}]}], tokenize=False)
    except Exception:  # a text-only template (string content only)
        return None
    i = 0
    while i < min(len(with_image), len(plain)) and with_image[i] == plain[i]:
        i += 1
    j = 0
    while j < min(len(with_image), len(plain)) - i and with_image[-1 - j] == plain[-1 - j]:
        j += 1
    extra = with_image[i:len(with_image) - j].strip()
    return extra if image_token in extra else None


def derive_family(processor) -> VisionFamily:
    """Facts of a model type without a :data:`FAMILIES` row, from its own processor.

    * placeholder: what the processor's chat template renders for an image part (e.g.
      ``<|vision_start|><|image_pad|><|vision_end|>``), else the processor's ``image_token``;
    * ``token_types_key``: when the processor returns per-token modality ids, the key its
      ``__call__`` gives them (probed once with a blank 32x32 image).

    Raises:
        plugtune.modeling.ModelLoadError: the processor has no ``image_token`` (no image
            placeholder plugtune can expand) or no ``replace_image_token``.
    """
    from plugtune.modeling import ModelLoadError

    image_token = getattr(processor, "image_token", None)
    name = type(processor).__name__
    if not image_token or type(processor).replace_image_token is ProcessorMixin.replace_image_token:
        raise ModelLoadError(
            f"{name}: the generic image-text route needs a processor with an image_token and "
            "replace_image_token (transformers' placeholder expansion); this one has "
            f"image_token={image_token!r}. Add a row for the model type to plugtune_vision."
            "_processors.FAMILIES or use a model whose processor expands image tokens")
    tok = processor.tokenizer
    if getattr(processor, "chat_template", None) and not getattr(tok, "chat_template", None):
        tok.chat_template = processor.chat_template
    placeholder = _template_image_text(tok, image_token) or image_token
    key = "mm_token_type_ids"
    if getattr(processor, "return_mm_token_type_ids", False):
        from PIL import Image

        out = processor(text=[image_token], images=[Image.new("RGB", (32, 32))])
        if "token_type_ids" in out and "mm_token_type_ids" not in out:
            key = "token_type_ids"
    return VisionFamily(placeholder, token_types_key=key)


def family_for(model_type: str, processor) -> VisionFamily:
    """The :data:`FAMILIES` row of ``model_type``, else (the generic route) the facts
    :func:`derive_family` reads from ``processor``, cached on it."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    fam = _DERIVED.get(processor)
    if fam is None:
        fam = _DERIVED[processor] = derive_family(processor)
    return fam


_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _string_as_parts(placeholder: str) -> str:
    """Jinja preamble that turns string message content into parts, for chat templates that
    only read list content (SmolVLM's iterates ``message['content']`` as parts): each
    ``placeholder`` becomes an ``{"type": "image"}`` part, the text between them text parts,
    so the template renders images exactly as for the model's own list content. List content
    passes unchanged."""
    p = json.dumps(placeholder)
    return (
        "{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set c = namespace(items=[]) -%}"
        "{%- for chunk in m['content'].split(" + p + ") -%}"
        "{%- if not loop.first -%}{%- set c.items = c.items + [{'type': 'image'}] -%}{%- endif -%}"
        "{%- if chunk -%}{%- set c.items = c.items + [{'type': 'text', 'text': chunk}] -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- set ns.msgs = ns.msgs + [dict(m, content=c.items or [{'type': 'text', 'text': ''}])] -%}"
        "{%- else -%}{%- set ns.msgs = ns.msgs + [m] -%}{%- endif -%}{%- endfor -%}"
        "{%- set messages = ns.msgs -%}")


def _renders(tokenizer, content) -> str | None:
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False)
    except Exception:
        return None


def chat_template_for_strings(processor, tokenizer, placeholder: str) -> str | None:
    """Make ``tokenizer``'s chat template render plain-string message content.

    plugtune renders conversations with string content (``<image>`` placeholders replaced by
    the family's ``placeholder`` text). A processor's template that only reads list content
    (parts) would drop that text silently; such a template gets the :func:`_string_as_parts`
    preamble. A tokenizer without a template takes the processor's. Returns a one-line notice
    when the template was changed, else ``None``.
    """
    if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    mark = "PLUGTUNEMARK"
    plain = _renders(tokenizer, mark)
    if plain is not None and mark in plain:
        return None
    parts = _renders(tokenizer, [{"type": "text", "text": mark}])
    if parts is None or mark not in parts:
        return None
    tokenizer.chat_template = _string_as_parts(placeholder) + template
    return ("the chat template reads list content only: string content is passed to it as "
            f"parts ({placeholder!r} -> an image part)")

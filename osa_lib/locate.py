"""Where each character is in a finished image, found the same way whatever method drew it.

Identity metrics compare crops of a character across scenes. If each method's crops came from its
own masks, isolated attention would be measured inside the very masks it pasted its references
into, and vanilla inside masks it never used. Here every method's final image goes through one
procedure (``locate_characters``):

1. encode the image back to latents (``Backbone.encode_pixels``) and re-noise it to a few fixed
   timesteps with fixed seeds (``LOCATE_STRENGTHS`` of the way into the noise, as image-to-image
   does);
2. run one pass of the **unmodified** U-Net per timestep with the scene prompt, recording the
   up-block cross-attention maps of each character's word at the mask resolution, averaged;
3. upsample them to the image and cut them as the method cuts its own maps
   (``masks.subject_masks``: normalise, Otsu, the lower-CV overlap rule, reliability), keep each
   mask's strongest region, and take its box.

A user-supplied detector (``detector``: an image and the characters' words in, one box or None
per word out), such as ``owlv2_detector`` when OWLv2's weights are on disk, replaces steps 1-3.

A character that is not found gets no box and a reason; nothing is dropped silently
(``Located.found``). ``sdxl_metrics.square_crop`` pads a box to a square, so CLIP's centre crop
does not cut a tall character.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .attention import AttentionStore, capture_attention
from .masks import subject_masks
from .sdxl_metrics import mask_box, square_crop

__all__ = ["Located", "locate_characters", "mask_box", "box_iou", "square_crop", "owlv2_detector",
           "LOCATE_STRENGTHS", "Box"]

#: (y0, x0, y1, x1) in image pixels, end exclusive
Box = tuple[int, int, int, int]

#: how far into the noise a finished image is pushed for each U-Net pass that locates its
#: characters (0: the clean image, 1: pure noise); the passes' maps are averaged
LOCATE_STRENGTHS = (0.2,)
_MAP_SIDE = 256  # maps are upsampled to the image, at most this many pixels a side, before Otsu


@dataclass
class Located:
    """The characters of one image: a box (or None) and, where none, why."""

    words: list[str]
    boxes: list[Box | None]
    masks: np.ndarray | None = None  # (M, h, w) bool at the map resolution (None from a detector)
    reasons: list[str] = field(default_factory=list)  # one per word, "" where found

    @property
    def found(self) -> int:
        return sum(b is not None for b in self.boxes)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    y0, x0, y1, x1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, y1 - y0) * max(0, x1 - x0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def _renoised(backbone, image: np.ndarray, strength: float, seed: int):
    """The image's latents re-noised to the timestep ``strength`` of the way into the noise:
    (model input (2, C, h, w) for the CFG batch, timestep)."""
    pixels = torch.from_numpy(np.ascontiguousarray(image, np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    latents = backbone.encode_pixels(pixels)  # (1, C, h, w)
    scheduler = copy.deepcopy(backbone.scheduler)
    scheduler.set_timesteps(backbone.default_steps, device=backbone.device)
    timesteps = scheduler.timesteps
    index = min(int(round((1 - strength) * (len(timesteps) - 1))), len(timesteps) - 1)
    t = timesteps[index]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)
    noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(latents.device, latents.dtype)
    noisy = scheduler.add_noise(latents, noise, t.reshape(1))
    return scheduler.scale_model_input(torch.cat([noisy, noisy]), t), t


@torch.no_grad()
def locate_characters(backbone, image: np.ndarray, prompt: str, words: list[str],
                      strengths: tuple[float, ...] = LOCATE_STRENGTHS, seed: int = 0, config=None,
                      detector: Callable | None = None) -> Located:
    """Each word's character in a finished image, by unmodified U-Net passes (module docstring).

    Args:
        image: (H, W, 3) float in [0, 1], any method's final image.
        prompt: the scene prompt it was drawn from; words: the characters' words in it.
        strengths: how far into the noise the image is pushed, one U-Net pass each; their maps
            are averaged (``LOCATE_STRENGTHS``).
        seed: the re-noising seed, the same for every method.
        config: ``IsolationConfig`` whose mask settings cut the maps (default: the backbone's);
            each mask keeps its strongest region.
        detector: ``detector(image, words) -> [box or None per word]``; used instead of the
            U-Net passes when given.
    """
    image_hw = tuple(np.asarray(image).shape[:2])
    if detector is not None:
        boxes = list(detector(image, words))
        if len(boxes) != len(words):
            raise ValueError(f"the detector returned {len(boxes)} boxes for {len(words)} words {words}; it must "
                             f"return one box (y0, x0, y1, x1) or None per word")
        return Located(list(words), boxes, None, ["" if b else "the detector found nothing" for b in boxes])
    if not strengths or not all(0 < s < 1 for s in strengths):
        raise ValueError(f"strengths={strengths!r} must be one or more numbers in (0, 1): 0 is the clean image, "
                         f"1 pure noise")
    config = config or backbone.isolation_config()
    store = AttentionStore([[backbone.token_positions(prompt, w) for w in words]], backbone.latent_shape[1:])
    cond = backbone.encode([prompt])
    with capture_attention(backbone.unet, store, places=("up",)):
        for i, strength in enumerate(strengths):
            model_input, t = _renoised(backbone, image, strength, seed + i)
            backbone.unet(model_input, t, encoder_hidden_states=cond.hidden, added_cond_kwargs=cond.added)
            store.step_callback(i)  # the store keeps the running mean over the passes
    resolution = config.mask_resolution or store.mask_resolution()
    maps = torch.stack(list(store.maps(places=("up",), resolution=resolution, device="cpu").values())).mean(0)
    size = tuple(min(side, _MAP_SIDE) for side in image_hw)  # (1, M, h, w) -> (1, M, H', W'), smooth box edges
    maps = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    found = subject_masks(maps, rule=config.overlap_rule, min_fraction=config.min_fraction,
                          max_fraction=config.max_fraction, one_region=True)
    masks = found.masks[0].numpy()  # (M, H', W')
    boxes = [mask_box(m, image_hw) if ok else None for m, ok in zip(masks, found.ok[0].tolist())]
    reasons = [found.reasons[0][m] or ("" if boxes[m] else "empty mask") for m in range(len(words))]
    return Located(list(words), boxes, masks, reasons)


def owlv2_detector(model_id: str, device=None, threshold: float = 0.1, template: str = "a photo of a {}") -> Callable:
    """A ``detector`` for ``locate_characters`` from OWLv2 weights on disk (transformers'
    ``Owlv2ForObjectDetection``): per word, the highest-scoring box of its text query.

    Raises:
        MissingWeightsError: when the weights are not in ``model_id`` (a folder) or the local cache;
            nothing is downloaded.
    """
    from PIL import Image
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    from .sdxl_metrics import MissingWeightsError
    try:
        processor = Owlv2Processor.from_pretrained(model_id, local_files_only=True)
        model = Owlv2ForObjectDetection.from_pretrained(model_id, local_files_only=True).eval()
    except Exception as error:  # noqa: BLE001 - not on disk: say how to get it
        raise MissingWeightsError(
            f"OWLv2 weights {model_id!r} are not on this machine ({type(error).__name__}: {error}). On a machine "
            f"with hub access run `huggingface-cli download google/owlv2-base-patch16-ensemble --local-dir owlv2` "
            f"and pass that folder; without a detector the characters are located by the U-Net itself.") from error
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)

    @torch.no_grad()
    def detect(image: np.ndarray, words: list[str]) -> list[Box | None]:
        pixels = np.round(np.clip(np.asarray(image, np.float32), 0, 1) * 255).astype(np.uint8)
        H, W = pixels.shape[:2]
        inputs = processor(text=[[template.format(w) for w in words]], images=Image.fromarray(pixels),
                           return_tensors="pt").to(device)
        outputs = model(**inputs)
        side = max(H, W)  # OWLv2 pads the image to a square at the bottom and right
        result = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=[(side, side)])[0]
        boxes: list[Box | None] = []
        for i in range(len(words)):
            mine = (result["labels"] == i).nonzero().flatten()
            if not len(mine):
                boxes.append(None)
                continue
            x0, y0, x1, y1 = result["boxes"][mine[result["scores"][mine].argmax()]].tolist()
            boxes.append((max(0, int(y0)), max(0, int(x0)), min(H, int(np.ceil(y1))), min(W, int(np.ceil(x1)))))
        return boxes

    detect.model_id = str(Path(model_id))
    return detect

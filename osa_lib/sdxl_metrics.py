"""The paper's story metrics for SDXL images, with real models loaded on demand.

- **TIS** (text-image similarity): CLIP score, ``100 * max(cos, 0)`` between a scene prompt and
  its image (``ClipScorer.text_image_similarity``), averaged over the story. Paper: 28.91.
- **IIS** (identity similarity, %): mean pairwise cosine ×100 of CLIP image embeddings of the same
  character's crops across scenes (``crop_character`` + ``identity_similarity``). Paper: 70.28 %.
- **AQ** (aesthetic quality): the LAION "improved aesthetic predictor", an MLP on L2-normalised
  CLIP ViT-L/14 image embeddings, roughly 1-10 (``AestheticPredictor``). Paper: 6.52.
- **DS** (DreamSim similarity, %): DreamSim is a *distance* (lower = more alike); the paper reports
  a similarity, so ``dreamsim_similarity`` returns ``100 * (1 - d)`` (higher = more alike). Paper: 49.63 %.

Nothing is downloaded here. Weights come from a local folder or the Hugging Face cache; when they
are absent a ``MissingWeightsError`` says which weights, where it looked and how to get them.
The toy-world stand-ins of these metrics live in ``osa_lib.toy.metrics``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["MissingWeightsError", "ClipScorer", "crop_character", "square_crop", "mask_box", "identity_similarity", "AestheticPredictor",
           "load_dreamsim", "dreamsim_similarity", "story_metrics", "CLIP_MODEL_ID", "AESTHETIC_WEIGHTS"]

CLIP_MODEL_ID = "openai/clip-vit-large-patch14"  # ViT-L/14: the CLIP the aesthetic head was trained on
AESTHETIC_WEIGHTS = "sac+logos+ava1-l14-linearMSE.pth"  # file name in christophschuhmann/improved-aesthetic-predictor


class MissingWeightsError(RuntimeError):
    """A metric's model weights are not available offline; the message says how to get them."""


def _default_device(device) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _to_uint8_images(images) -> list[np.ndarray]:
    """Images as a list of (H, W, 3) uint8 arrays, from float in [0, 1] or uint8 (list, array or tensor)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray) and images.ndim == 3:  # one (H, W, 3) image
        images = [images]
    out = []
    for image in images:
        image = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected (H, W, 3) images, got shape {image.shape}")
        if image.dtype != np.uint8:  # float in [0, 1]
            if image.size and (image.min() < -1e-3 or image.max() > 1 + 1e-3):
                raise ValueError(f"float images must be in [0, 1], got [{image.min():.3g}, {image.max():.3g}]; "
                                 "pass uint8 for 0-255 images")
            image = np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
        out.append(image)
    if not out:
        raise ValueError("no images given")
    return out


class ClipScorer:
    """CLIP image and text embeddings, and the CLIP score (TIS).

    Args:
        model_id: hub id or local folder of a CLIP checkpoint (default ViT-L/14, as in the paper).
        device: torch device; CUDA when available.
        model, processor: an already built ``CLIPModel`` and ``CLIPProcessor`` (tests pass tiny ones);
            when given, nothing is loaded.
    """

    def __init__(self, model_id: str = CLIP_MODEL_ID, device=None, model=None, processor=None,
                 batch_size: int = 16):
        self.device = _default_device(device)
        self.batch_size = batch_size
        if model is None or processor is None:
            model, processor = self._load(model_id, model, processor)
        self.model = model.to(self.device).eval()
        self.processor = processor

    @staticmethod
    def _load(model_id: str, model, processor):
        from transformers import CLIPModel, CLIPProcessor

        local = Path(model_id).expanduser().is_dir()
        try:
            if model is None:
                model = CLIPModel.from_pretrained(model_id, local_files_only=local)
            if processor is None:
                processor = CLIPProcessor.from_pretrained(model_id, local_files_only=local)
        except Exception as err:  # not in the folder / cache, no network, corrupt files...
            where = f"folder {model_id!r}" if local else f"the Hugging Face cache (HF_HOME) or hub for {model_id!r}"
            raise MissingWeightsError(
                f"CLIP weights {model_id!r} could not be loaded from {where} ({type(err).__name__}: {err}). "
                f"Download {CLIP_MODEL_ID} on a machine with hub access (e.g. `huggingface-cli download "
                f"{CLIP_MODEL_ID} --local-dir clip-vit-large-patch14`) and pass its folder as model_id."
            ) from err
        return model, processor

    @property
    def dim(self) -> int:
        """Embedding size D (the projection dim: 768 for ViT-L/14)."""
        return int(self.model.config.projection_dim)

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers >= 5 returns a model output whose pooler_output is the projected embedding
        return out.pooler_output if hasattr(out, "pooler_output") else out

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (B, D) of (H, W, 3) images, float in [0, 1] or uint8."""
        images = _to_uint8_images(images)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor.image_processor(images=images[start:start + self.batch_size],
                                                    return_tensors="pt")["pixel_values"]  # (b, 3, S, S)
            emb = self._features(self.model.get_image_features(pixel_values=pixels.to(self.device)))  # (b, D)
            chunks.append(emb.float())
        return nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()  # (B, D)

    @torch.no_grad()
    def text_embeddings(self, prompts) -> torch.Tensor:
        """L2-normalised CLIP text embeddings (B, D); prompts longer than 77 tokens are truncated, as CLIP must."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokenizer = self.processor.tokenizer
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = tokenizer(prompts[start:start + self.batch_size], padding=True, truncation=True,
                               max_length=min(tokenizer.model_max_length, 77), return_tensors="pt")
            emb = self._features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                              attention_mask=tokens["attention_mask"].to(self.device)))
            chunks.append(emb.float())  # (b, D)
        return nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()  # (B, D)

    def text_image_similarity(self, images, prompts) -> np.ndarray:
        """CLIP score per (image, prompt) pair: ``100 * max(cos, 0)``, shape (B,). TIS is its mean."""
        img, txt = self.image_embeddings(images), self.text_embeddings(prompts)  # (B, D) each
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"{img.shape[0]} images but {txt.shape[0]} prompts: pass one prompt per image")
        return (100 * (img * txt).sum(-1).clamp(min=0)).numpy()  # (B,)


def square_crop(image, box: tuple[int, int, int, int], margin: float = 0.1) -> np.ndarray:
    """The box ``(y0, x0, y1, x1)`` (pixels, end exclusive) grown by ``margin`` × its longer side on
    each side and padded to a square around its centre; what falls outside the image is filled
    with the image's mean colour, so a character at the border keeps its size and CLIP's centre
    crop (which cuts a tall crop to its middle square) sees all of it."""
    image = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    H, W = image.shape[:2]
    y0, x0, y1, x1 = box
    if not (y1 > y0 and x1 > x0):
        raise ValueError(f"box {box} is empty; a box is (y0, x0, y1, x1) with y1 > y0 and x1 > x0")
    side = max(1, int(round(max(y1 - y0, x1 - x0) * (1 + 2 * margin))))
    top, left = int(round((y0 + y1 - side) / 2)), int(round((x0 + x1 - side) / 2))
    out = np.empty((side, side) + image.shape[2:], image.dtype)
    out[:] = image.reshape(H * W, -1).mean(0).astype(image.dtype)
    sy0, sx0, sy1, sx1 = max(top, 0), max(left, 0), min(top + side, H), min(left + side, W)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = image[sy0:sy1, sx0:sx1]
    return out


def mask_box(mask, image_hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The box ``(y0, x0, y1, x1)`` in an image of ``image_hw`` pixels of a (h, w) mask (each mask
    cell covers ``H/h × W/w`` pixels), or None for an empty mask."""
    mask = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (h, w), got shape {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    (H, W), (h, w) = image_hw, mask.shape
    return (int(rows[0] * H // h), int(cols[0] * W // w), int((rows[-1] + 1) * H // h), int((cols[-1] + 1) * W // w))


def crop_character(image, mask, margin: float = 0.1) -> np.ndarray:
    """A character's square crop (``square_crop``) around its mask's bounding box, so IIS compares
    identities, not scenes.

    Args:
        image: (H, W, C) array.
        mask: (h, w) boolean mask of the character; may be lower resolution than the image
            (e.g. a latent-resolution mask): each cell covers ``H/h × W/w`` pixels.
        margin: fraction of the box's longer side added on each side.
    """
    image = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    box = mask_box(mask, image.shape[:2])
    if box is None:
        raise ValueError("empty mask: the character was not found in this image, so there is nothing to crop; "
                         "count the scene as a crop not found")
    return square_crop(image, box, margin)


def identity_similarity(scorer: ClipScorer, crops_by_character: dict[str, list[np.ndarray]]) -> float:
    """IIS (%): for each character, mean pairwise cosine ×100 of its crops' CLIP image embeddings across
    scenes; then the mean over characters (each character weighs the same however often it appears).

    Characters with fewer than 2 crops have no pair and are skipped.
    """
    per_character = []
    for name, crops in crops_by_character.items():
        if len(crops) < 2:
            continue
        emb = scorer.image_embeddings(crops)  # (n, D)
        cos = emb @ emb.T  # (n, n)
        i, j = torch.triu_indices(len(crops), len(crops), offset=1)
        per_character.append(100 * cos[i, j].mean().item())
    if not per_character:
        raise ValueError("no character has 2 or more crops, so identity similarity is undefined; "
                         f"crops per character: { {k: len(v) for k, v in crops_by_character.items()} }")
    return float(np.mean(per_character))


class AestheticPredictor(nn.Module):
    """AQ: the LAION improved aesthetic predictor head on L2-normalised CLIP image embeddings.

    The layer layout (and so the state-dict keys ``layers.0``, ``layers.2``, ... ``layers.7``) is the
    original ``MLP`` of christophschuhmann/improved-aesthetic-predictor, so its released weights
    (``sac+logos+ava1-l14-linearMSE.pth``, trained on ViT-L/14 embeddings, D = 768) load as they are.

    Args:
        clip: the ``ClipScorer`` giving the embeddings (must be ViT-L/14 for the released weights).
        input_size: embedding size D (768; a test uses a tiny CLIP's projection dim).
    """

    def __init__(self, clip: ClipScorer | None = None, input_size: int = 768):
        super().__init__()
        self.clip = clip
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised embeddings -> (B,) scores."""
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_file(cls, path, clip: ClipScorer, input_size: int | None = None) -> "AestheticPredictor":
        """Load the head from a local ``.pth`` / ``.safetensors`` state dict (D read from the file if not given)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(
                f"aesthetic predictor weights not found at {str(path)!r}. Download {AESTHETIC_WEIGHTS} from "
                "https://github.com/christophschuhmann/improved-aesthetic-predictor on a machine with network "
                "access and pass its path.")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("layers."): v for k, v in state.get("state_dict", state).items()}
        file_dim = state["0.weight"].shape[1]  # first Linear: (1024, D)
        if input_size is not None and input_size != file_dim:
            raise ValueError(f"{path.name} expects {file_dim}-d embeddings, not input_size={input_size}")
        if file_dim != clip.dim:
            raise ValueError(f"{path.name} expects {file_dim}-d CLIP embeddings but the ClipScorer gives {clip.dim}-d; "
                             f"use the CLIP it was trained on ({CLIP_MODEL_ID} for {AESTHETIC_WEIGHTS})")
        head = cls(clip, input_size=file_dim)
        head.layers.load_state_dict(state)
        return head.to(clip.device).eval()

    @torch.no_grad()
    def score(self, images) -> np.ndarray:
        """Aesthetic score per image, shape (B,), roughly 1-10 with the released weights."""
        if self.clip is None:
            raise ValueError("AestheticPredictor has no ClipScorer: build it with from_file(path, clip)")
        emb = self.clip.image_embeddings(images).to(next(self.parameters()).device)  # (B, D), unit norm
        return self.eval()(emb).float().cpu().numpy()  # (B,)


def load_dreamsim(device=None, cache_dir=None):
    """Load DreamSim (``model, preprocess``) from its local cache; MissingWeightsError if it is not there."""
    cache_dir = str(Path(cache_dir or os.environ.get("DREAMSIM_CACHE", "~/.cache/dreamsim")).expanduser())
    how = (f"`pip install dreamsim`, then on a machine with network access run "
           f"`from dreamsim import dreamsim; dreamsim(pretrained=True, cache_dir={cache_dir!r})` once so its "
           f"weights are cached there (or set DREAMSIM_CACHE / pass cache_dir)")
    try:
        from dreamsim import dreamsim
    except ImportError as err:
        raise MissingWeightsError(f"the dreamsim package is not installed: {how}") from err
    try:
        return dreamsim(pretrained=True, cache_dir=cache_dir, device=str(_default_device(device)))
    except Exception as err:  # weights not cached and no network
        raise MissingWeightsError(f"DreamSim weights could not be loaded from {cache_dir!r} "
                                  f"({type(err).__name__}: {err}): {how}") from err


@torch.no_grad()
def dreamsim_similarity(images_a, images_b, device=None, cache_dir=None, model=None, preprocess=None) -> np.ndarray:
    """DS (%): DreamSim similarity of each pair (a_i, b_i), shape (B,).

    DreamSim returns a *distance* d (lower = more alike); this returns ``100 * (1 - d)`` so that higher
    means more alike, as the paper's "DreamSim similarity (%)". Pass ``model, preprocess`` from
    ``load_dreamsim`` to avoid reloading per call.
    """
    from PIL import Image

    if model is None or preprocess is None:
        model, preprocess = load_dreamsim(device, cache_dir)
    a, b = _to_uint8_images(images_a), _to_uint8_images(images_b)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} images: DreamSim compares pairs")
    dev = _default_device(device)
    out = []
    for x, y in zip(a, b):
        x = preprocess(Image.fromarray(x)).to(dev)  # (1, 3, 224, 224)
        y = preprocess(Image.fromarray(y)).to(dev)
        out.append(float(torch.as_tensor(model(x, y)).reshape(-1)[0]))
    return 100 * (1 - np.asarray(out))  # (B,)


def story_metrics(images, prompts, character_crops: dict[str, list[np.ndarray]], scorer: ClipScorer,
                  aesthetic: AestheticPredictor | None = None) -> dict:
    """TIS, IIS and (with an aesthetic head) AQ of one story, plus a ``note`` on what was not computed and why.

    Args:
        images: the story's scene images, (H, W, 3) each.
        prompts: one scene prompt per image.
        character_crops: ``{character: [crop per scene it appears in]}`` (see ``crop_character``).
        scorer: the ``ClipScorer``.
        aesthetic: an ``AestheticPredictor``; AQ is skipped without it.
    """
    result: dict = {"TIS": float(scorer.text_image_similarity(images, prompts).mean())}
    notes = []
    try:
        result["IIS"] = identity_similarity(scorer, character_crops)
    except ValueError as err:
        notes.append(f"IIS not computed: {err}")
    if aesthetic is not None:
        result["AQ"] = float(aesthetic.score(images).mean())
    else:
        notes.append("AQ not computed: no AestheticPredictor given (AestheticPredictor.from_file)")
    notes.append("DS not computed here: call dreamsim_similarity on the image pairs to compare")
    result["note"] = "; ".join(notes)
    return result

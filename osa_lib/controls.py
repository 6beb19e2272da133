"""Live controls for notebook 04: a story strip that redraws isolated attention's scenes in
seconds when a switch changes, under sliders (``figures.live_figure``).

``StoryStrip`` keeps what a change of λ, w, warm-up or the overlap rule does not touch: the
unmodified model's row, and the scenes that introduce characters together with the bank they
fill (λ and w act only where a returning character is read; warm-up and the overlap rule decide
what the bank stores, so they redraw the whole story). Every setting drawn once is kept too.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .bank import ReferenceBank
from .config import OVERLAP_RULES, IsolationConfig
from .figures import comic_strip, live_figure
from .generation import generate_story
from .story import Story

__all__ = ["StoryStrip", "story_controls", "intro_scenes"]


def intro_scenes(story: Story) -> int:
    """How many scenes open the story with characters that are all new (they fill the bank and
    read nothing from it)."""
    seen: set[str] = set()
    for i, scene in enumerate(story.scenes):
        if seen & set(scene.characters):
            return i
        seen |= set(scene.characters)
    return len(story.scenes)


def _copy_bank(bank: ReferenceBank) -> ReferenceBank:
    """A bank whose entries can be added to without touching ``bank`` (the tensors are shared: the
    bank never changes a stored tensor)."""
    return ReferenceBank(bank.backbone, bank.latent_hw, bank.num_steps,
                         {name: dict(entries) for name, entries in bank.tokens.items()},
                         {name: dict(who) for name, who in bank.identities.items()}, device=bank.device)


class StoryStrip:
    """One story drawn by the unmodified model and by isolated attention, for any switches.

    Args:
        backbone: the model.
        story: the story; its opening scenes (``intro_scenes``) are drawn once per bank setting.
        num_inference_steps: default the backbone's.
        vanilla: the unmodified model's scenes when already drawn (same story, seeds and steps).
        drawn: ``[(config, isolated scenes)]`` already drawn with these seeds and steps, e.g. by
            ``generate_story``: they are shown as they are, not drawn again.
    """

    def __init__(self, backbone, story: Story, num_inference_steps: int | None = None,
                 vanilla: list[np.ndarray] | None = None, drawn: list[tuple[IsolationConfig, list[np.ndarray]]] = ()):
        self.backbone, self.story = backbone, story
        self.steps = num_inference_steps or backbone.default_steps
        self.intro = intro_scenes(story)
        self._intro: dict[str, tuple[list[np.ndarray], ReferenceBank]] = {}
        self._rows: dict[str, list[np.ndarray]] = {repr(config): list(images) for config, images in drawn}
        self._vanilla: list[np.ndarray] | None = None if vanilla is None else list(vanilla)
        self.generated_scenes = 0  # scenes actually drawn (a cached request draws none)

    def _intro_key(self, config: IsolationConfig) -> str:
        """The switches the opening scenes read: not w (nothing is read from the bank there); when
        each of them shows one character, not the overlap rule (one mask, nothing overlaps), and
        not λ or β either when a lone newcomer runs no isolated cross-attention (then it runs the
        unmodified model and only fills the bank)."""
        unused = {"reweight": 0.0, "isolated_self": True}
        if all(len(s.characters) <= 1 for s in self.story.scenes[:self.intro]):
            unused["overlap_rule"] = "lower_cv"
            if not (config.isolated_cross and config.solo_cross):
                unused.update(lam=1.0, beta=1.0, isolated_cross=True, solo_cross=True)
        return repr(dataclasses.replace(config, **unused))

    def vanilla(self) -> list[np.ndarray]:
        """The unmodified model's scenes (drawn once)."""
        if self._vanilla is None:
            self._vanilla = generate_story(self.backbone, self.story, "vanilla", num_inference_steps=self.steps,
                                           progress=False).images
            self.generated_scenes += len(self.story.scenes)
        return self._vanilla

    def isolated(self, config: IsolationConfig) -> list[np.ndarray]:
        """Isolated attention's scenes under ``config``: identical to ``generate_story`` on the whole
        story, drawing only what no earlier request drew."""
        config.validate()
        key = repr(config)
        if key not in self._rows:
            intro_key = self._intro_key(config)
            if intro_key not in self._intro:
                opening = Story(self.story.characters, self.story.scenes[:self.intro], self.story.title, self.story.source)
                result = generate_story(self.backbone, opening, "isolated", config=config,
                                        num_inference_steps=self.steps, progress=False)
                self._intro[intro_key] = (result.images, result.bank)
                self.generated_scenes += self.intro
            images, bank = self._intro[intro_key]
            rest = self.story.scenes[self.intro:]
            if rest:
                later = Story(self.story.characters, rest, self.story.title, self.story.source)
                images = images + generate_story(self.backbone, later, "isolated", config=config, bank=_copy_bank(bank),
                                                 num_inference_steps=self.steps, progress=False).images
                self.generated_scenes += len(rest)
            self._rows[key] = images
        return self._rows[key]

    def figure(self, config: IsolationConfig):
        """The comic strip: the unmodified model's row above isolated attention's under ``config``."""
        label = f"isolated\nλ={config.lam:g} w={config.reweight:g}\nwarm-up {config.warmup:.0%}, {config.overlap_rule}"
        return comic_strip({"vanilla": self.vanilla(), label: self.isolated(config)},
                           [s.prompt for s in self.story.scenes], title=self.story.title)


def story_controls(strip: StoryStrip, config: IsolationConfig):
    """Sliders named after the paper's symbols (λ, w, warm-up) and the overlap rule, over
    ``strip.figure``; ``config`` gives their first values and every other switch."""
    import ipywidgets as widgets
    style = {"description_width": "initial"}
    controls = {
        "lam": widgets.FloatSlider(value=config.lam, min=0.0, max=2.0, step=0.1, description="λ (merge)",
                                   continuous_update=False, style=style),
        "reweight": widgets.FloatSlider(value=config.reweight, min=0.0, max=8.0, step=0.5,
                                        description="w (re-weighting)", continuous_update=False, style=style),
        "warmup": widgets.FloatSlider(value=config.warmup, min=0.0, max=min(0.8, config.end - 0.05), step=0.05,
                                      description="warm-up", continuous_update=False, style=style),
        "overlap_rule": widgets.Dropdown(options=list(OVERLAP_RULES), value=config.overlap_rule,
                                         description="overlap rule", style=style),
    }
    return live_figure(lambda **values: strip.figure(dataclasses.replace(config, **values)), controls,
                       description=f"story strip of {strip.story.title!r}")

"""Optional: rewrite a story's scene prompts with a local language model (the paper's LLM step).

The rule-based path (``osa_lib.story``) never needs this; a rewritten story is validated exactly
as a story file is.
"""
from __future__ import annotations

import dataclasses

from .story import Story, StoryError, parse_story

__all__ = ["LLM_INSTRUCTION", "rewrite_with_llm"]

LLM_INSTRUCTION = ("Rewrite this scene description as one short image prompt. Name every character with "
                   "exactly its word ({words}). Remove pronouns. Scene: {prompt}\nPrompt:")


def rewrite_with_llm(story: Story, model: str, max_new_tokens: int = 40, generator=None) -> Story:
    """Optional: let a local text-generation model rewrite each scene prompt (the paper uses an LLM
    to disambiguate stories). Off by default; the rule-based path never needs it.

    The rewritten story goes through the same validation as a story file, so a rewrite that drops
    a character's word, or that the backbone cannot read, is an error naming the scene.

    Args:
        model: a local folder or model id of a ``transformers`` causal LM (nothing is downloaded
            on machines without hub access), or a ready ``transformers`` text-generation pipeline.
    """
    if generator is None:
        from transformers import pipeline
        try:
            generator = pipeline("text-generation", model=model)
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise StoryError(f"cannot load the rewrite model {model!r} ({type(error).__name__}: {error}); "
                             f"pass a local folder of a transformers causal LM, or skip the rewrite") from error
    data = {"title": story.title, "characters": [dataclasses.asdict(c) for c in story.characters.values()],
            "scenes": []}
    for scene in story.scenes:
        words = ", ".join(story.characters[n].word for n in scene.characters) or "none"
        request = LLM_INSTRUCTION.format(words=words, prompt=scene.prompt)
        text = generator(request, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)[0]["generated_text"]
        rewritten = text.strip().splitlines()[0].strip() if text.strip() else ""
        data["scenes"].append({"prompt": rewritten, "characters": list(scene.characters), "seed": scene.seed})
    for c in data["characters"]:
        if c["seed"] is None:
            del c["seed"]
    return parse_story(data, f"{story.source} (rewritten by {model})")

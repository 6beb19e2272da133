"""osa_lib: Object Isolated Attention for consistent story visualisation (arXiv 2503.23353).

The public surface is small; notebooks import from here.
"""
from .attention import AttentionStore, capture_attention, find_attention_layers, installed_processors
from .backbones import Backbone, load_backbone
from .bank import BankError, ReferenceBank
from .baselines import consistent_self_attention
from .isolation import IsolationConfig, isolated_attention
from .masks import otsu_threshold, resolve_overlaps, subject_masks
from .generation import StoryResult, generate_story
from .llm import rewrite_with_llm
from .story import Story, StoryError, load_story

__all__ = ["AttentionStore", "capture_attention", "find_attention_layers", "installed_processors", "Backbone",
           "load_backbone", "BankError", "ReferenceBank", "consistent_self_attention", "IsolationConfig",
           "isolated_attention", "otsu_threshold", "resolve_overlaps", "subject_masks", "Story", "StoryError",
           "StoryResult", "generate_story", "load_story", "rewrite_with_llm"]

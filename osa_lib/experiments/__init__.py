"""Runs that the notebooks and scripts share, split by what they evaluate:

- ``experiments.maps``: the attention maps (masks against the toy's ground truth, overlap rules,
  layers, steps, word binding);
- ``experiments.stories``: whole stories over seeds (methods, λ, ablations, identity details);
- ``experiments.teaching``: the verdicts, chance levels and seed-paired differences the notebooks
  print (their direction words come from ``osa_lib.claims``); ``experiments.exercises``: the
  exercises' check cells.

Every name of both is importable from ``osa_lib.experiments``.
"""
from .maps import (BINDING_OWN_SHARE, binding_rows, binding_table, binding_verdict, CapturedRun,
                   character_masks_vs_truth, content_words, first_overlapping, generate_with_maps, iou_over_steps, layer_table, lowest_iou,
                   mask_iou_records, mask_iou_summary, mask_layer_iou, overlap_rule_runs, overlap_rule_table,
                   pooled_rule_scores, rendered_vs_generated, rule_masks, rule_rows, rule_verdict, upsample_masks)
from .stories import (ablation_rows, carry_over, colour_kept_rows, compare_methods, default_cache_dir, detail_gains,
                      iis_gain, lambda_sweep, mean_and_sem, mixing_and_neglect, PROMPT_EFFECT_METRICS,
                      prompt_option_effects, prompt_option_sentences, prompt_option_table,
                      prompts_vs_attention, StoryScorer,
                      summary_means, summary_rows, trio_summary, uncoloured_scene_prompts)
from .teaching import (averaging_verdict, carry_over_errors, identity_chance, lambda_differences, lambda_sweep_errors,
                       lambda_verdict, pair_probe_verdict, probe_chance, rule_ious, scored_overlapping, seed_difference,
                       switch_variants, trio_verdict, with_errors, worst_scored)

__all__ = ["CapturedRun", "generate_with_maps", "upsample_masks", "character_masks_vs_truth", "mask_iou_records",
           "overlap_rule_table", "rule_verdict", "layer_table", "iou_over_steps", "content_words", "mask_layer_iou",
           "mask_iou_summary", "lowest_iou", "BINDING_OWN_SHARE", "binding_rows", "binding_table", "binding_verdict",
           "rendered_vs_generated",
           "overlap_rule_runs", "pooled_rule_scores", "rule_rows", "first_overlapping", "rule_masks",
           "mixing_and_neglect", "uncoloured_scene_prompts", "mean_and_sem", "StoryScorer", "default_cache_dir",
           "summary_rows", "summary_means", "lambda_sweep", "ablation_rows", "prompts_vs_attention", "iis_gain",
           "carry_over", "detail_gains", "colour_kept_rows", "trio_summary", "compare_methods",
           "averaging_verdict", "worst_scored", "scored_overlapping", "rule_ious", "identity_chance",
           "switch_variants", "lambda_sweep_errors", "with_errors", "lambda_differences", "lambda_verdict", "trio_verdict",
           "probe_chance",
           "pair_probe_verdict", "seed_difference", "carry_over_errors", "PROMPT_EFFECT_METRICS", "prompt_option_effects",
           "prompt_option_table", "prompt_option_sentences"]

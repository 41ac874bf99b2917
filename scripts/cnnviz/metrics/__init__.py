"""How far each explanation can be trusted: quality metrics of the per-image maps.

Modules: perturbation (deletion / insertion, Petsiuk et al. 2018), randomization (the
model-parameter randomization test, Adebayo et al. 2018), sensitivity (class sensitivity),
similarity (Spearman, SSIM), run (the per-shard job), summary (the per-model summary and plots).

Per model, shard and method, `{results}/{model}/metrics/{shard}/{method}.json`:

    {"description", "model", "method", "shard",
     "settings": the config's metrics section with defaults, "options": the method's options,
     "fractions": [x of every curve point: fraction of pixels changed, 0..1],
     "randomization_cuts": [{"cut": lowest layer randomized, "layers": n from the top,
                             "fraction": n / all}],   # [] when the method is not tested
     "images": [{"image", "target", "label", "prob" (target probability),
                 "deletion_auc", "insertion_auc", "deletion_curve": [...],
                 "insertion_curve": [...],
                 "randomization": [{"cut", "layers", "spearman" (null: the map became
                                    constant), "ssim", "flat"}, ...],      # tested methods only
                 "class_sensitivity": {"last": {"class", "label", "spearman"}, ...}}],
     "failed": [{"image"?, "target"?, "metric"?, "error"}],
     "timing": {"maps", "deletion_insertion_s_per_map", "randomization_s_per_map",
                "randomization_s_per_map_and_cut", "class_sensitivity_s_per_map"}}

The method "random" (seeded uniform random maps) is the reference row. Per model,
`{results}/{model}/metrics/summary.json`:

    {"description", "model", "reference": "random", "maps", "shards": [...],
     "how_to_read": {metric: one sentence},
     "methods": {method: {"maps", "deletion_auc_mean", "deletion_auc_std", "insertion_auc_mean",
                          "insertion_auc_std", "randomized_spearman_mean", "..._std",
                          "randomized_ssim_mean", "..._std", "randomized_flat_maps",
                          "class_last_spearman_mean", "..._std", "flags": "metric, ..."}},
     "flags": [{"method", "metric", "value", "threshold", "reason"}],
     "randomization_spearman": {method: {cut: mean}}, "randomization_ssim": {method: {cut: mean}},
     "timing_s_per_map": {method: {...}}, "settings", "plots": {name: png}, "failed": [...]}

beside `deletion_insertion.png` and `randomization.png`.
"""

from .perturbation import perturbation_curves
from .randomization import randomizable_layers, randomization_test, randomized_model
from .run import job_for, metrics_shard, resolve_settings
from .sensitivity import class_sensitivity
from .similarity import spearman, ssim
from .summary import summarize

__all__ = [
    "class_sensitivity",
    "job_for",
    "metrics_shard",
    "perturbation_curves",
    "randomizable_layers",
    "randomization_test",
    "randomized_model",
    "resolve_settings",
    "spearman",
    "ssim",
    "summarize",
]

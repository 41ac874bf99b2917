"""How far each explanation can be trusted: quality metrics of the per-image maps.

Modules: perturbation (deletion / insertion, Petsiuk et al. 2018), road (ROAD, Rong et al.
2022), randomization (the model-parameter randomization test, Adebayo et al. 2018), sensitivity
(class sensitivity), localization (pointing game, energy-based pointing game, Wang et al. 2020),
complexity (sparseness, complexity), robustness (max-sensitivity, Yeh et al. 2019), similarity
(Spearman, SSIM), run (the per-shard job), summary (the per-model summary, ranking and plots).

Per model, shard and method, `{results}/{model}/metrics/{shard}/{method}.json`:

    {"description", "model", "method", "shard",
     "settings": the config's metrics section with defaults, "options": the method's options,
     "fractions": [x of every curve point: fraction of pixels changed, 0..1],
     "randomization_cuts": [{"cut": lowest layer randomized, "layers": n from the top,
                             "fraction": n / all}],   # [] when the method is not tested
     "road_fractions": [fraction of pixels removed], "boxes": the boxes CSV or null,
     "unboxed": [ids of images without a box (with a boxes CSV)],
     "images": [{"image", "target", "label", "prob" (target probability),
                 "deletion_auc", "insertion_auc", "deletion_curve": [...],
                 "insertion_curve": [...],
                 "randomization": [{"cut", "layers", "spearman" (null: the map became
                                    constant), "ssim", "flat"}, ...],      # tested methods only
                 "class_sensitivity": {"last": {"class", "label", "spearman"}, ...},
                 "road": {"morf", "lerf" (target probability per fraction), "morf_top1",
                          "lerf_top1", "morf_mean", "lerf_mean", "gap"},
                 "sparseness", "complexity", "max_sensitivity" (listed methods only),
                 "pointing_game" (0/1), "energy_pointing_game"}],   # the last two: boxed images
     "failed": [{"image"?, "target"?, "metric"?, "error"}],
     "timing": {"maps", "deletion_insertion_s_per_map", "road_s_per_map",
                "randomization_s_per_map", "randomization_s_per_map_and_cut",
                "class_sensitivity_s_per_map", "max_sensitivity_s_per_map"}}

The method "random" (seeded uniform random maps) is the reference row. Per model,
`{results}/{model}/metrics/summary.json`:

    {"description", "model", "reference": "random", "maps", "shards": [...],
     "how_to_read": {metric: one sentence},
     "methods": {method: {"maps", "deletion_auc_mean", "deletion_auc_std", "insertion_auc_mean",
                          "insertion_auc_std", "randomized_spearman_mean", "..._std",
                          "randomized_ssim_mean", "..._std", "randomized_flat_maps",
                          "class_last_spearman_mean", "..._std", "road_morf_mean",
                          "road_lerf_mean", "road_gap_mean", "sparseness_mean",
                          "complexity_mean", "max_sensitivity_mean", "boxed_maps",
                          "pointing_game_mean", "energy_pointing_game_mean", "..._std",
                          "flags": "metric, ..."}},
     "ranking": [{"metric", "better": "higher" | "lower", "guide",
                  "order": [{"rank", "method", "value"}, ...]}],   # best first
     "flags": [{"method", "metric", "value", "threshold", "reason"}],
     "road_fractions", "images_without_box": [ids],
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

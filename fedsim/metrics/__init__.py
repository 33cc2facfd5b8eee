"""Leakage metrics: per-image PSNR/SSIM/MSE/LPIPS after Hungarian matching, and label accuracy.

Only this package reads :class:`fedsim.threat.GroundTruth`.
"""

from fedsim.metrics.image import PSNR_CAP_DB, mse_per_image, psnr_per_image, ssim_per_image
from fedsim.metrics.labels import label_accuracy
from fedsim.metrics.leakage import EXACT_PSNR_DB, FRAC_EXACT_KEY, METRIC_DIRECTIONS, NUM_EXACT_KEY, score_reconstruction
from fedsim.metrics.lpips import LPIPS, get_lpips
from fedsim.metrics.matching import match_batches

__all__ = [
    "EXACT_PSNR_DB",
    "FRAC_EXACT_KEY",
    "LPIPS",
    "METRIC_DIRECTIONS",
    "NUM_EXACT_KEY",
    "PSNR_CAP_DB",
    "get_lpips",
    "label_accuracy",
    "match_batches",
    "mse_per_image",
    "psnr_per_image",
    "score_reconstruction",
    "ssim_per_image",
]

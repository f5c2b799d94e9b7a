"""diffusion — score networks trained by denoising score matching, on top of sdekit.

The front end is thin composition: a plain `nn.Module` network (`MLPScoreNet`, `UNet`) that
knows nothing of SDEs, a `ScoreModel` that turns its output into a score through
`sdekit.parameterization` and hands it to every sdekit solver and likelihood, losses
(`DSMLoss`, `SlicedScoreMatchingLoss`), data sets with exact densities or discrete transforms
(`get_dataset`), a resumable `Trainer` with safetensors + JSON checkpoints (data-parallel under
``torchrun``: `diffusion.distributed`), class-conditional models with a noise-conditional
classifier for guidance (`diffusion.classifier`) and the command line (`python -m diffusion`).
`sdekit` never imports `diffusion`.
"""

from .nets import MLPScoreNet, UNet, build_net
from .data import DATASETS, Dataset, get_dataset
from .model import ScoreModel
from .losses import DSMLoss, SimulatedMarginals, SlicedScoreMatchingLoss, build_loss
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .train import TrainConfig, Trainer, TrainingDivergedError
from .evaluate import ExactDensityEvaluator
from . import classifier, distributed
from .classifier import NoiseConditionalClassifier, classifier_guided_score, train_classifier
from .distributed import DistributedError

__version__ = "0.1.0"

__all__ = [
    "MLPScoreNet", "UNet", "build_net", "DATASETS", "Dataset", "get_dataset", "ScoreModel",
    "DSMLoss", "SlicedScoreMatchingLoss", "SimulatedMarginals", "build_loss", "CheckpointError",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "TrainConfig", "Trainer",
    "TrainingDivergedError", "ExactDensityEvaluator", "classifier", "distributed", "NoiseConditionalClassifier",
    "classifier_guided_score", "train_classifier", "DistributedError",
]

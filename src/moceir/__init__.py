"""moceir: MoCE-IR all-in-one image restoration ("Complexity Experts are Task-Discriminative Learners for
Any Image Restoration", Zamfir et al., CVPR 2025) in PyTorch.

Public API: :func:`create_model`, :func:`load_model`, :func:`save_model`, :func:`restore` (one image in
memory), :func:`restore_files` (files, folders and globs, as ``moceir restore``).
"""

from .models import PRESETS, MoCEConfig, MoCEIR, MoCEOutput, create_model, get_config
from .models.checkpoints import CheckpointError, load_model, save_model
from .inference import restore
from .pipeline import UsageError, restore_files

__version__ = "0.1.0"

__all__ = ["PRESETS", "CheckpointError", "MoCEConfig", "MoCEIR", "MoCEOutput", "UsageError", "create_model",
           "get_config", "load_model", "restore", "restore_files", "save_model", "__version__"]

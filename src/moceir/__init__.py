"""moceir: MoCE-IR all-in-one image restoration ("Complexity Experts are Task-Discriminative Learners for
Any Image Restoration", Zamfir et al., CVPR 2025) in PyTorch.

Public API: :func:`create_model`, :func:`load_model`, :func:`save_model`, :func:`restore`.
"""

from .models import PRESETS, MoCEConfig, MoCEIR, MoCEOutput, create_model, get_config
from .models.checkpoints import CheckpointError, load_model, save_model

__version__ = "0.1.0"


def restore(model, image, **kwargs):
    """Restore one image (numpy array, PIL image or tensor); returns the same kind. See moceir.inference."""
    from .inference import restore as _restore

    return _restore(model, image, **kwargs)


__all__ = ["PRESETS", "CheckpointError", "MoCEConfig", "MoCEIR", "MoCEOutput", "create_model", "get_config",
           "load_model", "restore", "save_model", "__version__"]

"""mtprune: multi-task channel pruning (MTP) for semantic segmentation networks.

The public Python API; the ``mtprune`` command line is a thin layer over it.
"""

from mtprune.checkpoint import load_model, save_model
from mtprune.errors import MtpruneError
from mtprune.models import build_model, list_models
from mtprune.version import __version__

__all__ = ["__version__", "MtpruneError", "build_model", "list_models", "load_model", "save_model"]

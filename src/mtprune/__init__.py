"""mtprune: multi-task channel pruning (MTP) for semantic segmentation networks.

The public Python API; the ``mtprune`` command line is a thin layer over it.
"""

__version__ = "0.1.0"

from mtprune.checkpoint import load_model, save_model  # noqa: E402
from mtprune.errors import MtpruneError  # noqa: E402
from mtprune.models import build_model, list_models  # noqa: E402

__all__ = ["__version__", "MtpruneError", "build_model", "list_models", "load_model", "save_model"]

"""Every method: one package each (``model.py``, ``recipe.py``, ``predictor.py``), registered on import.

Importing this package imports every method package, each of which registers its network,
training recipe and predictor with ``gigaseg.methods.registry`` (as timm's ``models``
package does). A new method is one more folder here and one more line below.
"""

from . import baselines, fcos, glnet, icnet, magnet, patchgd
from .registry import METHODS, available_methods, build_predictor, create_model, method_spec, register, training_stages

__all__ = [
    "METHODS",
    "available_methods",
    "baselines",
    "build_predictor",
    "create_model",
    "fcos",
    "glnet",
    "icnet",
    "magnet",
    "method_spec",
    "patchgd",
    "register",
    "training_stages",
]

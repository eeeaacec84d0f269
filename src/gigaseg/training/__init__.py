"""Training on Lightning Fabric: the loop every method shares, stages, views, checkpoints.

``recipe`` defines a method's stages (``Stage``) and the run-wide ``TrainSettings``; ``views``
the training views cut from lazy samples; ``loop`` the ``Trainer``; ``checkpoint`` the
self-describing checkpoint files. Methods provide their stages through
``gigaseg.methods.registry``; nothing here imports a method.
"""

from .recipe import Stage, StepContext, TrainSettings

__all__ = ["Stage", "StepContext", "TrainSettings"]

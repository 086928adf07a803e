"""Example models and data modules for the paper's settings (digits, Fashion-MNIST, text, vision, diffusion).

They use the core as any user's module would: ``MT2STMixin`` for the model, ``mt2st_loss`` for the loss. Needs
the ``[examples]`` extra (scikit-learn, torchmetrics); the text settings need ``[text]`` too.
"""

from mt2st_lightning.extras import require

require("examples", "mt2st_lightning.examples")

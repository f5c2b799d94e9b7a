"""diffusion — score networks trained by denoising score matching, on top of sdekit.

The front end is thin composition: a plain ``nn.Module`` network, a :class:`ScoreModel` that turns
its output into a score through :mod:`sdekit.parameterization`, losses, data and a trainer.
``sdekit`` never imports ``diffusion``.
"""

__version__ = "0.1.0"

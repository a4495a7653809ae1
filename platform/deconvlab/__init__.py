"""deconvlab: an experiment platform for comparing deconvolution networks.

The Python API is :mod:`deconvlab.api` (docs/api.md): ``import deconvlab.api as dl``, then ``dl.train``,
``dl.sweep``, ``dl.evaluate``, ``dl.compare``, ``dl.load_model``, ``dl.promote``, ``dl.predict``,
``dl.plan_sweep``. (The package's own modules already hold the names ``deconvlab.train``,
``deconvlab.sweep``, ...: functions of the same names here would hide them.) ``import deconvlab`` alone
loads nothing heavy, so ``deconvlab --help`` stays fast.
"""

__version__ = "0.1.0"

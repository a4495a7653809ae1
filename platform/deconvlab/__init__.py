"""deconvlab: an experiment platform for comparing deconvolution networks."""

__version__ = "0.1.0"

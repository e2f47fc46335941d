"""qsmnet: physics-informed deep-learning Quantitative Susceptibility Mapping.

The package follows the QSM pipeline:

``io`` (read phase/magnitude, write maps) -> ``transforms`` (unwrapping, multi-echo fit,
masking, background-field removal, classical inversions) -> ``models`` (the U-Net) ->
``inference`` (whole-volume prediction), with ``physics`` (dipole kernel, forward model,
units, geometry) shared by all, ``simulation`` producing training data and ``metrics``
scoring results. Field and susceptibility are in ppm at every public boundary.
"""

__version__ = "0.1.0"

"""Image mosaics (explicit) and classification from mosaics (implicit), paper sections 4.2-4.3.

``datasets`` (readers), ``tiles`` (tiling and re-assembly), ``resnet`` (ResNet-18) need only torch;
``model``, ``train`` and ``figures`` use ``setperm``. Command line: ``python -m integrations.mosaic``.
"""

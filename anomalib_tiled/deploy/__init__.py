"""Run exported tiled ensembles (``anomalib tiled export``) without the training code.

Example:
    >>> from anomalib_tiled.deploy import TiledInferencer
    >>> inferencer = TiledInferencer("results/Padim/MVTecAD/bottle/v0/export/v0")  # doctest: +SKIP
    >>> inferencer.predict("image.png").pred_label  # doctest: +SKIP
    array([ True])
"""

from anomalib_tiled.deploy.inferencer import TiledInferencer

__all__ = ["TiledInferencer"]

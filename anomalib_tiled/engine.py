"""Engine API of the tiled ensemble, mirroring ``anomalib.engine.Engine``.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.models import Padim
    >>> from anomalib_tiled import TiledEnsembleEngine
    >>> engine = TiledEnsembleEngine(image_size=(1024, 1024), tile_size=256, stride=128,
    ...                              seam_smoothing=True, normalization_stage="image")
    >>> engine.fit(model=Padim(), datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
    >>> results = engine.test(datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
    >>> predictions = engine.predict(data_path="images/")  # doctest: +SKIP

A façade: each public method is a short list of stage calls (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_tiled.config.format import tile_grid
from anomalib_tiled.errors import RunDirectoryError
from anomalib_tiled.export import export_run
from anomalib_tiled.progress import ProgressListener
from anomalib_tiled.run.config import RunConfig, check_frozen, read_run_config
from anomalib_tiled.run.directory import RunDirectory
from anomalib_tiled.run.log import RunLog
from anomalib_tiled.settings import (
    EnsembleSettings,
    ExecutionSettings,
    MergeConfig,
    MetricsConfig,
    NormalizationStage,
    PostProcessingSettings,
    RuntimeSettings,
    SeamSmoothingConfig,
    ThresholdingConfig,
    ThresholdStage,
    TrainingSettings,
    VisualizationConfig,
)
from anomalib_tiled.sinks.outputs import Prediction
from anomalib_tiled.stages.common import SplitPredictor
from anomalib_tiled.stages.evaluate import evaluate_run
from anomalib_tiled.stages.predict import predict_images
from anomalib_tiled.stages.train import Trained, fit_run
from anomalib_tiled.tiling import TileGrid


class TiledEnsembleEngine:
    """Train, evaluate and apply a tiled ensemble of anomalib models.

    Args:
        image_size: Size images are resized to before tiling, ``n`` or ``(h, w)``.
        tile_size: Tile size, ``n`` or ``(h, w)``.
        stride: Step between tiles; defaults to ``tile_size`` (no overlap).
        seed: Seed of data splits and models.
        accelerator: ``auto``, ``cpu``, ``gpu``/``cuda`` or ``mps``.
        default_root_dir: Results root; runs go to ``<root>/<Model>/<Dataset>/<category>/vN``.
        normalization_stage: ``image``, ``tile`` or ``none``.
        thresholding: Threshold method (``F1AdaptiveThreshold``, ``{class_path, init_args}``...) or a
            :class:`~anomalib_tiled.settings.ThresholdingConfig`.
        threshold_stage: ``image`` or ``tile`` (ignored when ``thresholding`` is a ThresholdingConfig).
        seam_smoothing: ``True``/``False`` or a :class:`~anomalib_tiled.settings.SeamSmoothingConfig`.
        blending: ``mean``, ``hann`` or ``gaussian``.
        image_score, tile_scaling, top_k: Image score, tile scaling and top-k fraction (see ``MergeConfig``).
        calibration_share: Fraction of training images held out of fitting to learn the tile scaling.
        image_metrics: Image metric names or specs (default ``AUROC``, ``F1Score``).
        pixel_metrics: Pixel metric names or specs (default ``AUROC``, ``F1Score``).
        visualization: Result-image settings.
        callbacks: Lightning callbacks for every tile model (copied per tile).
        progress: Receives progress (default: none is shown).
        execution: Where tile jobs run: an :class:`~anomalib_tiled.settings.ExecutionSettings` or a dict of its fields.
        **trainer_kwargs: Lightning Trainer arguments for every tile model (``max_epochs``...).
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        tile_size: int | Sequence[int] = 256,
        stride: int | Sequence[int] | None = None,
        *,
        seed: int = 42,
        accelerator: str = "auto",
        default_root_dir: str | Path = "results",
        normalization_stage: str | NormalizationStage = NormalizationStage.IMAGE,
        thresholding: str | dict | ThresholdingConfig = "F1AdaptiveThreshold",
        threshold_stage: str | ThresholdStage = ThresholdStage.IMAGE,
        seam_smoothing: bool | SeamSmoothingConfig = False,
        blending: str = MergeConfig.blending,
        image_score: str = MergeConfig.image_score,
        tile_scaling: str = MergeConfig.tile_scaling,
        calibration_share: float = TrainingSettings.calibration_share,
        top_k: float = MergeConfig.top_k,
        image_metrics: Sequence[str | dict] | None = None,
        pixel_metrics: Sequence[str | dict] | None = None,
        visualization: VisualizationConfig | None = None,
        callbacks: list[Any] | None = None,
        progress: ProgressListener | None = None,
        execution: ExecutionSettings | dict[str, Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if not isinstance(thresholding, ThresholdingConfig):
            thresholding = ThresholdingConfig(method=thresholding, stage=threshold_stage)
        if not isinstance(seam_smoothing, SeamSmoothingConfig):
            seam_smoothing = SeamSmoothingConfig(apply=bool(seam_smoothing))
        metrics = {"image": image_metrics, "pixel": pixel_metrics}
        trainer = {**trainer_kwargs, **({"callbacks": list(callbacks)} if callbacks else {})}
        settings = EnsembleSettings(
            training=TrainingSettings(tile_grid(image_size, tile_size, stride), seed, trainer, calibration_share),
            postprocessing=PostProcessingSettings(
                normalization_stage=normalization_stage,
                thresholding=thresholding,
                seam_smoothing=seam_smoothing,
                merge=MergeConfig(blending, image_score, tile_scaling, top_k),
                metrics=MetricsConfig(**{level: list(specs) for level, specs in metrics.items() if specs is not None}),
                visualization=visualization or VisualizationConfig(),
            ),
            runtime=RuntimeSettings(accelerator=accelerator, default_root_dir=default_root_dir, execution=execution),
        )
        self._init(settings, progress)

    def _init(self, settings: EnsembleSettings, progress: ProgressListener | None) -> None:
        self.settings = settings
        self.progress = progress or ProgressListener()
        self.run: RunDirectory | None = None
        self.trained: RunConfig | None = None  # the run's config.yaml
        self.datamodule: Any = None
        self.evaluation_dir: Path | None = None  # the last evaluation's folder

    @classmethod
    def from_settings(cls, settings: EnsembleSettings, progress: ProgressListener | None = None) -> TiledEnsembleEngine:
        """Engine from already-resolved settings (the CLI's path)."""
        engine = cls.__new__(cls)
        engine._init(settings, progress)  # noqa: SLF001 - the constructor's second half, shared
        return engine

    @classmethod
    def from_run(
        cls,
        root: str | Path,
        settings: EnsembleSettings | None = None,
        *,
        model_spec: dict | None = None,
        runtime: RuntimeSettings | None = None,
        progress: ProgressListener | None = None,
        trained: RunConfig | None = None,
    ) -> TiledEnsembleEngine:
        """Engine for a trained run: its own settings, or ``settings`` checked against the run's.

        ``model_spec`` is checked against the run's model too; ``runtime`` says where to run now
        (``RuntimeSettings(accelerator="cpu")`` for a GPU-trained run); ``trained`` is the run's
        ``config.yaml`` when the caller has read it already.

        Raises:
            RunDirectoryError: If ``root`` is not a finished run.
            ConfigError: If ``settings`` change what the run was trained with (tiling, seed, model...).
        """
        run = RunDirectory.open(root)
        trained = trained or read_run_config(run)
        chosen = settings or trained.settings
        check_frozen(trained, chosen, model_spec)
        engine = cls.from_settings(dataclasses.replace(chosen, runtime=runtime or chosen.runtime), progress)
        engine.run, engine.trained = run, trained
        return engine

    @property
    def grid(self) -> TileGrid:
        """The tile grid."""
        return self.settings.grid

    def fit(
        self, model: Any, datamodule: Any, *, resume: str | Path | None = None, data_spec: dict | None = None
    ) -> RunDirectory:
        """Train one model per tile position, learn normalisation/threshold statistics; return the run.

        Args:
            model: An ``AnomalibModule`` (its class and hyper-parameters), a class, a name or a class spec.
            datamodule: Any anomalib image data module.
            resume: Run directory of an interrupted run: finished, verified tiles are kept.
            data_spec: The data module's class spec for the run's config (default: read off the instance).
        """
        self._fit(model, datamodule, resume, data_spec, evaluate=False)
        assert self.run is not None
        return self.run

    def train(
        self, model: Any, datamodule: Any, *, resume: str | Path | None = None, data_spec: dict | None = None
    ) -> list[dict[str, float]]:
        """Fit, then test (like ``Engine.train``; test tiles are predicted while each tile model is in memory).

        The test stage takes what fitting has (the test split, the statistics): the data module is set up once.
        """
        trained = self._fit(model, datamodule, resume, data_spec, evaluate=True)
        return [self._evaluate(trained.predictor, trained.test, trained.statistics)]

    def _fit(
        self, model: Any, datamodule: Any, resume: str | Path | None, data_spec: dict | None, *, evaluate: bool
    ) -> Trained:
        trained = fit_run(self.settings, model, datamodule, resume, data_spec, self.progress, evaluate=evaluate)
        self.run, self.trained, self.datamodule = trained.predictor.context.run, trained.predictor.trained, datamodule
        return trained

    def test(self, datamodule: Any = None) -> list[dict[str, float]]:
        """Evaluate the trained ensemble on a test split; returns ``[{metric name: value}]`` like ``Engine.test``.

        ``datamodule`` defaults to the one of :meth:`fit`, else the run's recorded test split. Stored tile
        predictions are reused, missing ones predicted. Results go to a new ``eval/vN`` folder:
        ``metrics.json``/``.csv``, ``predictions.csv``, ``images/``, ``report.html``.
        """
        datamodule = datamodule or self.datamodule
        return [self._evaluate(self._predictor(datamodule), None, None, datamodule)]

    def _evaluate(self, predictor: SplitPredictor, *stage: Any) -> dict[str, float]:
        """:func:`evaluate_run` of ``stage``: the test split, the statistics, the data module (None: resolved)."""
        self.evaluation_dir, results = evaluate_run(predictor, *stage)
        self.progress.message(f"Evaluation written to {self.evaluation_dir}")
        return results

    def predict(self, data_path: str | Path, output: str | Path | None = None) -> list[Prediction]:
        """Predict unlabeled images with the trained ensemble.

        Args:
            data_path: A folder (searched recursively), an image file, or a glob pattern.
            output: Output folder; defaults to a new ``predict/vN`` folder of the run.

        Returns:
            One :class:`Prediction` per image; ``<output>`` holds ``maps/``, ``images/``,
            ``predictions.csv`` and ``report.html``.
        """
        predictor = self._predictor(None)
        with RunLog(predictor.context.run.log_path):
            out = Path(output) if output is not None else predictor.context.run.new_output_dir("predict")
            return predict_images(predictor, data_path, out)

    def export(self, export_format: str = "openvino", **options: Any) -> Path:
        """Export the trained run as one deployable artifact (options: :func:`~anomalib_tiled.export.export_run`)."""
        return export_run(self.run, export_format, settings=self.settings, progress=self.progress, **options)

    def _predictor(self, datamodule: Any) -> SplitPredictor:
        if self.run is None or self.trained is None:
            msg = "no trained run: call fit() first or create the engine with TiledEnsembleEngine.from_run(path)"
            raise RunDirectoryError(msg)
        return SplitPredictor.for_run(self.run, self.trained, self.settings, self.progress, datamodule)

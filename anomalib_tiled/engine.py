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

The engine is a façade: each public method is a short list of stage calls. The stages, in data
order: :mod:`~anomalib_tiled.training` (checks, :mod:`~anomalib_tiled.splits`,
:mod:`~anomalib_tiled.tile_loop`, :mod:`~anomalib_tiled.calibration`),
:mod:`~anomalib_tiled.evaluation` and :mod:`~anomalib_tiled.inference` (merging, metrics, outputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_tiled.configfile import object_spec
from anomalib_tiled.errors import ConfigError, RunDirectoryError
from anomalib_tiled.evaluation import evaluate, resolve_test_split
from anomalib_tiled.export import export_run
from anomalib_tiled.inference import SplitPredictor, predict_images
from anomalib_tiled.models import ModelFactory
from anomalib_tiled.outputs import Prediction
from anomalib_tiled.progress import ProgressListener
from anomalib_tiled.run import RunDirectory
from anomalib_tiled.runconfig import RunConfig, check_frozen, read_run_config
from anomalib_tiled.session import RunLog, RunSession, create_run, resume_run
from anomalib_tiled.settings import (
    EnsembleSettings,
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
from anomalib_tiled.tile_jobs import TileContext
from anomalib_tiled.tiling import TileGrid
from anomalib_tiled.training import TrainingPlan, check_settings
from anomalib_tiled.validation import check_writable

__all__ = ["Prediction", "TiledEnsembleEngine"]


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
        image_score: ``max_map``, ``mean_tiles`` or ``max_tiles``.
        image_metrics: Image metric names or specs (default ``AUROC``, ``F1Score``).
        pixel_metrics: Pixel metric names or specs (default ``AUROC``, ``F1Score``).
        visualization: Result-image settings.
        callbacks: Lightning callbacks for every tile model (copied per tile).
        progress: Receives progress (default: none is shown).
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
        blending: str = "mean",
        image_score: str = "max_map",
        image_metrics: Sequence[str | dict] | None = None,
        pixel_metrics: Sequence[str | dict] | None = None,
        visualization: VisualizationConfig | None = None,
        callbacks: list[Any] | None = None,
        progress: ProgressListener | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if not isinstance(thresholding, ThresholdingConfig):
            thresholding = ThresholdingConfig(method=thresholding, stage=threshold_stage)
        if not isinstance(seam_smoothing, SeamSmoothingConfig):
            seam_smoothing = SeamSmoothingConfig(apply=bool(seam_smoothing))
        defaults = MetricsConfig()
        try:
            grid = TileGrid.create(image_size, tile_size, stride)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        trainer = {**trainer_kwargs, **({"callbacks": list(callbacks)} if callbacks else {})}
        settings = EnsembleSettings(
            training=TrainingSettings(grid=grid, seed=seed, trainer=trainer),
            postprocessing=PostProcessingSettings(
                normalization_stage=normalization_stage,
                thresholding=thresholding,
                seam_smoothing=seam_smoothing,
                merge=MergeConfig(blending=blending, image_score=image_score),
                metrics=MetricsConfig(
                    image=defaults.image if image_metrics is None else list(image_metrics),
                    pixel=defaults.pixel if pixel_metrics is None else list(pixel_metrics),
                ),
                visualization=visualization or VisualizationConfig(),
            ),
            runtime=RuntimeSettings(accelerator=accelerator, default_root_dir=Path(default_root_dir)),
        )
        self._init(settings, progress)

    def _init(self, settings: EnsembleSettings, progress: ProgressListener | None) -> None:
        self.settings = settings
        self.progress = progress or ProgressListener()
        self.run: RunDirectory | None = None
        self.factory: ModelFactory | None = None
        self.datamodule: Any = None

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
        runtime: RuntimeSettings | None = None,
        progress: ProgressListener | None = None,
    ) -> TiledEnsembleEngine:
        """Engine for a trained run: its own settings, or ``settings`` checked against the run's.

        Args:
            root: The run directory.
            settings: Settings to use instead of the run's (post-processing may differ).
            runtime: Where to run now (e.g. ``RuntimeSettings(accelerator="cpu")`` for a GPU-trained run).
            progress: Receives progress.

        Raises:
            RunDirectoryError: If ``root`` is not a finished run.
            ConfigError: If ``settings`` change what the run was trained with (tiling, seed, blending...).
        """
        run = RunDirectory.open(root)
        trained = read_run_config(run)
        if settings is not None:
            check_frozen(trained, settings, None, "from_run")
        chosen = settings or trained.settings
        if runtime is not None:
            chosen = dataclasses.replace(chosen, runtime=runtime)
        engine = cls.from_settings(chosen, progress)
        engine.run = run
        engine.factory = ModelFactory.from_spec(trained.model_spec)
        return engine

    @property
    def grid(self) -> TileGrid:
        """The tile grid."""
        return self.settings.grid

    def fit(
        self, model: Any, datamodule: Any, *, resume: str | Path | None = None, data_spec: dict | None = None
    ) -> RunDirectory:
        """Train one model per tile position and learn normalisation/threshold statistics.

        Args:
            model: Model template: an ``AnomalibModule`` instance (its class and hyper-parameters are
                used), a model class, a name (``"Padim"``) or ``{class_path, init_args}``.
            datamodule: Any anomalib image data module.
            resume: Run directory of an interrupted run: finished, verified tiles are kept.
            data_spec: ``{class_path, init_args}`` of the data module for the run's config (the CLI
                passes the one it parsed); derived from the instance when omitted.

        Returns:
            The run directory.
        """
        return self._fit(model, datamodule, resume, data_spec, evaluate=False)

    def train(
        self, model: Any, datamodule: Any, *, resume: str | Path | None = None, data_spec: dict | None = None
    ) -> list[dict[str, float]]:
        """Fit, then test on the data module's test split (like ``Engine.train``).

        Test tiles are predicted right after each tile model is fitted, while it is still in memory.

        Returns:
            ``[metrics]`` as :meth:`test` returns them.
        """
        self._fit(model, datamodule, resume, data_spec, evaluate=True)
        return self.test(datamodule=datamodule)

    def _fit(
        self, model: Any, datamodule: Any, resume: str | Path | None, data_spec: dict | None, *, evaluate: bool
    ) -> RunDirectory:
        self.factory = ModelFactory.from_spec(model)
        plan = TrainingPlan.prepare(self.settings, self.factory, datamodule, evaluate=evaluate)
        config = RunConfig(self.settings, self.factory.spec, data_spec or object_spec(datamodule))
        if resume is not None:
            self.run = resume_run(resume, config)
        else:
            check_writable(self.settings.runtime.default_root_dir)
            dataset = getattr(datamodule, "name", type(datamodule).__name__)
            category = getattr(datamodule, "category", "") or ""
            self.run = create_run(self.settings.runtime.default_root_dir, config, dataset, category, self.factory.name)
        self.datamodule = datamodule
        self.progress.message(f"Run directory: {self.run.root}")
        session = RunSession(self.run, len(self.grid))
        with RunLog(self.run.log_path), session.training():
            plan.run(self.run, session, self.progress)
        return self.run

    def test(self, datamodule: Any = None) -> list[dict[str, float]]:
        """Evaluate the trained ensemble on a test split.

        Tile predictions already stored for this split (e.g. by :meth:`train`) are reused; otherwise
        every tile checkpoint is loaded in turn to predict it. Results go to a new ``eval/vN`` folder
        of the run: ``metrics.json``, ``metrics.csv``, ``predictions.csv`` and ``images/``.

        Args:
            datamodule: Data module whose test split is evaluated; defaults to the one used by
                :meth:`fit`, else the run's recorded test split.

        Returns:
            ``[{metric name: value}]``, like ``Engine.test``.
        """
        predictor = self._predictor(datamodule or self.datamodule)
        run = predictor.context.run
        with RunLog(run.log_path):
            record = resolve_test_split(predictor, datamodule or self.datamodule)
            output = run.new_output_dir("eval")
            results = evaluate(predictor, record, output)
        RunSession(run, len(self.grid)).evaluated(output, results)
        self.progress.message(f"Evaluation written to {output}")
        return [results]

    def predict(self, data_path: str | Path, output: str | Path | None = None) -> list[Prediction]:
        """Predict unlabeled images with the trained ensemble.

        Args:
            data_path: A folder (searched recursively), an image file, or a glob pattern.
            output: Output folder; defaults to a new ``predict/vN`` folder of the run.

        Returns:
            One :class:`Prediction` per image; anomaly maps are ``.npy`` files in ``<output>/maps``,
            pictures in ``<output>/images``, and ``<output>/predictions.csv`` lists them all.
        """
        predictor = self._predictor(None)
        run = predictor.context.run
        with RunLog(run.log_path):
            out = Path(output) if output is not None else run.new_output_dir("predict")
            return predict_images(predictor, data_path, out, self.progress)

    def export(self, export_format: str = "openvino", **options: Any) -> Path:
        """Export the trained run as one deployable artifact (options: :func:`~anomalib_tiled.export.export_run`)."""
        return export_run(self.run, export_format, settings=self.settings, progress=self.progress, **options)

    def _predictor(self, datamodule: Any) -> SplitPredictor:
        """Tile inference of the trained run, after checking the settings against this machine."""
        if self.run is None:
            msg = "no trained run: call fit() first or create the engine with TiledEnsembleEngine.from_run(path)"
            raise RunDirectoryError(msg)
        check_settings(self.settings)
        trained = read_run_config(self.run)
        if self.factory is None:
            self.factory = ModelFactory.from_spec(trained.model_spec)
        context = TileContext(self.run, self.factory, self.settings.training, self.settings.runtime)
        batch = getattr(datamodule, "eval_batch_size", None) or _eval_batch_size(trained.data_spec)
        return SplitPredictor(context, self.settings, self.progress, batch)


def _eval_batch_size(data_spec: dict | None) -> int:
    """The run's data-module eval batch size (anomalib's default, 32, when unknown)."""
    return int(((data_spec or {}).get("init_args") or {}).get("eval_batch_size") or 32)

"""What a stage is and what it gets: the per-image and whole-run stage protocols, ``StageContext``
(its config section, the run-level settings, the run directory, the models loaded once per
run, a batch sizer), and ``ItemResult``, what a stage did for one image.

``pipeline.run.runner`` runs stages; ``pipeline.run.batching`` sizes their batches.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, Mapping, TypeVar

from pipeline.run.batching import BatchSizer
from pipeline.run.clean import clean_status
from pipeline.run.config import ConfigError, to_dict
from pipeline.run.images import ImageRef
from pipeline.model.load import LoadedModel
from pipeline.model.prompts import TextFeatureStore
from pipeline.run.provenance import Provenance, Status, run_status
from pipeline.run.rundir import RunDir

if TYPE_CHECKING:
    from segment_anything import SamPredictor

C = TypeVar("C")


@dataclass
class ItemResult:
    """What a stage did for one image: the files it wrote (relative to the run), or why it failed.

    ``damaged`` names upstream stages whose output for the image could not be read (stage -> reason):
    they are recorded as damaged, so the next run redoes them and then this stage. ``advice`` says what
    helps a failure, where something does: ``BAD_INPUT`` for a file no rerun can fix, ``RERUN`` for an
    error that may pass."""

    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    damaged: dict[str, str] = field(default_factory=dict)
    advice: str | None = None


BAD_INPUT = "replace or remove the file"
RERUN = "rerun the same command to retry it; the traceback is in run.log"


@dataclass(frozen=True)
class RunSettings:
    """Run-level settings every stage may read, beside its own config section."""

    model: str
    seed: int
    max_side: int
    encode_batch_size: int
    config: dict  # the whole resolved config as plain data (the report shows it)


class Models:
    """The models a run loads once: CLIP (lazily, on first use), its text-feature store, and SAM when configured."""

    def __init__(self, load: Callable[[], LoadedModel], run: RunDir, log: logging.Logger):
        self._load, self._run, self._log = load, run, log
        self._clip: LoadedModel | None = None
        self._loading = threading.Lock()
        self._text: TextFeatureStore | None = None
        self.sam: SamPredictor | None = None  # set by the surgery stage's prepare when surgery.sam is configured

    @property
    def clip(self) -> LoadedModel:
        with self._loading:  # a stage's reading thread may be the first to ask
            if self._clip is None:
                t = time.time()
                self._clip = self._load()
                self._log.info("loaded model %s on %s (%s) in %.1fs", self._clip.name, self._clip.device,
                               self._clip.dtype, time.time() - t)
        return self._clip

    @property
    def text_features(self) -> TextFeatureStore:
        """Prompt-ensemble features per word, shared by the stages and kept on disk in the run's ``cache/``."""
        if self._text is None:
            self._text = TextFeatureStore(self.clip.model, self._run.file("cache", "text"))
            if self._text.loaded_from_disk:
                self._log.info("loaded %d cached text features", self._text.loaded_from_disk)
        return self._text


@dataclass
class StageContext(Generic[C]):
    """What a stage gets: its own config section, the run-level settings, the run, the models, batch sizes."""

    config: C
    settings: RunSettings
    run: RunDir
    log: logging.Logger
    models: Models
    batches: BatchSizer
    provenance: Provenance
    # called by a stage with the fraction of the current batch it has done, so progress moves within a batch
    progress: Callable[[float], None] = field(default=lambda fraction: None)
    session: str = ""  # when this command started (UTC, ISO 8601): every manifest record it writes carries it
    force: bool = False  # --force (and `rank --run`): a whole-run stage rebuilds even when its stamp is unchanged
    # what each whole-run stage read of the per-image outputs, as ``read_digest`` found it (shared by a run's
    # contexts, for its clean finish's record); and, when the run is as its last clean finish left it
    # (``pipeline.run.clean``), the digests that finish recorded
    reads: dict[str, str] = field(default_factory=dict)
    unchanged: Mapping[str, str] | None = None

    def status(self, image: str, stage: str, latest: Mapping | None = None) -> Status:
        """Whether an image's output of ``stage`` is done with today's settings (see ``pipeline.run.provenance``)."""
        return self.provenance.status(self.run, self.run.latest() if latest is None else latest, image, stage)

    def read_digest(self, stage: str, compute: Callable[[], str]) -> str:
        """The digest of what whole-run ``stage`` reads of the per-image outputs (``provenance.states_digest``): the
        last clean finish's when the run is unchanged since, so nothing is read, else ``compute()``'s."""
        digest = (self.unchanged or {}).get(stage)
        self.reads[stage] = digest = digest if digest is not None else compute()
        return digest


Finish = Callable[[], "list[ItemResult]"]  # a batch's remaining CPU work (drawing, encoding, writing) and its results


class PerImageStage(Generic[C]):
    """A stage that processes batches of images and returns one ``ItemResult`` per image.

    A batch passes through three steps, which the runner overlaps across batches so the model
    need not wait on files (see ``run_per_image``):

    * ``load``: read the batch's inputs (decode its images, read the earlier stages' outputs);
      runs in a background thread while the previous batch is on the model, so it must not
      use the model or the text-feature store;
    * ``process``: the model's work, on the calling thread; returns a ``Finish``;
    * the ``Finish``: the CPU work after the model (drawing, encoding, writing), run in a
      background thread while the next batch is on the model; it returns one ``ItemResult``
      per ref, in order.
    """

    name: str
    needs: tuple[str, ...] = ()

    def prepare(self, ctx: StageContext[C]) -> None:
        """Up-front checks before any image is processed (e.g. load SAM); raise ``ConfigError`` or ``ModelError``."""

    def batch_size(self, ctx: StageContext[C]) -> int:
        raise NotImplementedError

    def load(self, ctx: StageContext[C], refs: list[ImageRef]) -> Any:
        """The batch's inputs, read without the model (see the class notes); passed to ``process``."""
        return None

    def process(self, ctx: StageContext[C], refs: list[ImageRef], loaded: Any) -> Finish:
        raise NotImplementedError


class WholeRunStage(Generic[C]):
    """A stage that runs once over the whole run; returns the files it wrote (relative to the run)."""

    name: str
    needs: tuple[str, ...] = ()

    def prepare(self, ctx: StageContext[C]) -> None:
        """Up-front checks before the run starts."""

    def run_all(self, ctx: StageContext[C]) -> list[str]:
        raise NotImplementedError


def stage_provenance(config: Any, stages: Mapping[str, PerImageStage | WholeRunStage],
                     result_keys: Mapping[str, tuple[str, ...]]) -> Provenance:
    """The stages' fingerprints under ``config``, to judge a run's outputs by (``Provenance.status``)."""
    return Provenance(to_dict(config), result_keys, {n: s.needs for n, s in stages.items()})


def stage_status(config: Any, run: RunDir, stages: Mapping[str, PerImageStage | WholeRunStage],
                 result_keys: Mapping[str, tuple[str, ...]]) -> tuple[dict[str, dict[str, list[tuple[str, str]]]], int]:
    """Each per-image stage's images by state (done, stale, failed, blocked, pending), with reasons; and how many
    images have a reviewer's labels. A run as its last clean finish left it is answered without holding its
    manifest (``pipeline.run.clean``)."""
    per_image = [n for n, s in stages.items() if isinstance(s, PerImageStage)]
    known = clean_status(run, to_dict(config), per_image)
    if known is not None:
        return known
    human = sum(1 for (_, stage), rec in run.latest().items() if stage == "decode" and rec.get("human"))
    return run_status(run, stage_provenance(config, stages, result_keys), per_image), human


def select_stages(spec: str | None, order: tuple[str, ...]) -> list[str]:
    """The stages named in a comma-separated ``spec`` (all when empty), in run order.

    Raises:
        ConfigError: an unknown stage name, with the valid ones.
    """
    if not spec:
        return list(order)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for s in names:
        if s not in order:
            raise ConfigError(f"unknown stage {s!r}; valid stages: {', '.join(order)}")
    return [s for s in order if s in names]

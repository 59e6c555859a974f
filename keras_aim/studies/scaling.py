"""AIM's two findings at small scale: the pre-training loss predicts probe
accuracy, and quality grows with capacity and data.

A grid of trunk sizes x pre-training data fractions (plus extra seeds for
the headline points and a few ablations), each pre-trained with the AIM
objective; at several checkpoints along each run the validation
pre-training loss (fixed, seeded prefixes: `AIMPretrainer.evaluate`) and
the top-1 of an attentive probe on the frozen trunk (the same probe budget
everywhere) are measured and appended to `results.jsonl` as they come. A
rerun of an interrupted study skips every finished run and redoes the one
that was cut off. `summarize` computes the correlations and the final
tables; `plot` draws the paper-style figures.

    config = StudyConfig()                      # the default study (digits, 32 min on 2 cores)
    results = run_study(config, "runs/study")   # resumable
    summary = summarize(config, results)

Runs on any Keras backend; the data pipelines are tf.data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from keras_aim.models.aim.aim_presets import trunk_parameter_count
from keras_aim.utils.atomic_files import atomic_file

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "study.json"
SUMMARY_FILE = "summary.json"

# Pre-training variants: AIMPretrainer arguments that differ from the base.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "causal": {"prefix_attention": False},
    "raw_pixels": {"normalized_targets": False},
    "head_depth_1": {"pixel_head_depth": 1},
    "head_depth_4": {"pixel_head_depth": 4},
}


@dataclasses.dataclass(frozen=True)
class TrunkSize:
    """One trunk of the grid."""

    name: str
    hidden_dim: int
    num_layers: int
    num_heads: int

    def parameters(self, patch_size: int, channels: int = 3) -> int:
        return trunk_parameter_count(self.hidden_dim, self.num_layers, patch_size, channels)

    def probe_blocks(self) -> tuple[int, ...]:
        """The blocks the probe averages: the last three quarters (blocks
        1-3 of 4, as the main job's probe)."""
        return tuple(range(self.num_layers // 4, self.num_layers))


@dataclasses.dataclass(frozen=True)
class Run:
    """One pre-training run of the study."""

    size: str
    data_fraction: float
    seed: int
    variant: str = "base"

    @property
    def key(self) -> str:
        return f"{self.size}-data{self.data_fraction:g}-seed{self.seed}-{self.variant}"


DEFAULT_SIZES = (
    TrunkSize("S", 64, 2, 2),
    TrunkSize("M", 96, 4, 3),
    TrunkSize("L", 128, 6, 4),
    TrunkSize("XL", 192, 6, 6),
)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What the study runs. The defaults are the study of docs/findings.md:
    4 trunks (0.1M-2.7M parameters) x 3 data fractions on the embedded
    digits, 3 seeds at full data, 4 ablations on trunk M."""

    data: str = "digits"
    image_size: int = 16
    patch_size: int = 4
    augmentation: str = "shift"
    sizes: tuple[TrunkSize, ...] = DEFAULT_SIZES
    data_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 1e-3
    checkpoints: tuple[int, ...] = (50, 100, 200, 400)
    pixel_head_width: int = 128
    pixel_head_depth: int = 2
    probe_epochs: int = 15
    probe_batch_size: int = 64
    probe_learning_rate: float = 1e-3
    ablation_size: str = "M"
    ablations: tuple[str, ...] = ("causal", "raw_pixels", "head_depth_1", "head_depth_4")
    tfds_data_dir: str | None = None

    def __post_init__(self):
        names = [s.name for s in self.sizes]
        problems = []
        if len(set(names)) != len(names) or not names:
            problems.append(f"sizes need distinct names; got {names}")
        if self.ablation_size not in names and self.ablations:
            problems.append(f"ablation_size {self.ablation_size!r} is not one of {names}")
        unknown = [a for a in self.ablations if a not in VARIANTS or a == "base"]
        if unknown:
            problems.append(f"unknown ablations {unknown}; choose from {sorted(VARIANTS)[:-1]}")
        if not self.data_fractions or not all(0 < f <= 1 for f in self.data_fractions):
            problems.append(f"data_fractions must lie in (0, 1]; got {self.data_fractions}")
        if not self.seeds:
            problems.append("seeds is empty")
        if self.steps < 1 or self.batch_size < 1 or self.probe_epochs < 1:
            problems.append("steps, batch_size and probe_epochs must be >= 1")
        if not self.checkpoints or list(self.checkpoints) != sorted(set(self.checkpoints)) \
                or self.checkpoints[-1] != self.steps or self.checkpoints[0] < 1:
            problems.append(
                f"checkpoints must increase strictly from >= 1 and end at steps={self.steps}; "
                f"got {self.checkpoints}"
            )
        if self.image_size % self.patch_size or (self.image_size // self.patch_size) ** 2 < 2:
            problems.append(
                f"image_size {self.image_size} must be a multiple of patch_size "
                f"{self.patch_size} with at least 2 patches"
            )
        if problems:
            raise ValueError("Invalid study config: " + "; ".join(problems) + ".")

    def size(self, name: str) -> TrunkSize:
        return next(s for s in self.sizes if s.name == name)

    def runs(self) -> list[Run]:
        """Every run, in the order they are executed: the grid (first seed),
        the other seeds at full data, then the ablations."""
        first, full = self.seeds[0], max(self.data_fractions)
        runs = [Run(s.name, f, first) for s in self.sizes for f in self.data_fractions]
        runs += [Run(s.name, full, seed) for seed in self.seeds[1:] for s in self.sizes]
        runs += [Run(self.ablation_size, full, first, a) for a in self.ablations]
        return runs

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "StudyConfig":
        data = dict(data)
        data["sizes"] = tuple(TrunkSize(**s) for s in data["sizes"])
        for key in ("data_fractions", "seeds", "checkpoints", "ablations"):
            data[key] = tuple(data[key])
        return cls(**data)


QUICK = StudyConfig(
    sizes=(TrunkSize("XS", 16, 1, 2), TrunkSize("S", 32, 2, 2)),
    data_fractions=(0.5, 1.0),
    seeds=(0,),
    steps=6,
    batch_size=32,
    checkpoints=(3, 6),
    pixel_head_width=16,
    pixel_head_depth=1,
    probe_epochs=1,
    probe_batch_size=128,
    ablation_size="XS",
    ablations=("causal",),
)


# --- Data ------------------------------------------------------------------


@dataclasses.dataclass
class StudyData:
    """The labeled training split (pre-training subsets and probe training)
    and the held-out split (validation loss and probe top-1)."""

    train: Any  # keras_aim.data.sources.LabeledImages
    val: Any
    train_count: int

    def pretraining_images(self, fraction: float, seed: int):
        """A fixed random subset of `fraction` of the training images (the
        same subset for every trunk and seed of that fraction): an array
        `(n, H, W, 3)` or a dataset of images."""
        count = max(1, round(fraction * self.train_count))
        order = np.random.RandomState(1234).permutation(self.train_count)[:count]
        if self.train.labels is not None:
            return self.train.images[np.sort(order)]
        images = self.train.images.map(lambda image, label: image)
        return images.shuffle(min(self.train_count, 10_000), seed=1234,
                              reshuffle_each_iteration=False).take(count)


def load_data(config: StudyConfig) -> StudyData:
    from keras_aim.data.sources import labeled_images

    train = labeled_images(config.data, "train", 0, config.image_size, config.tfds_data_dir)
    val = labeled_images(config.data, "val", 0, config.image_size, config.tfds_data_dir)
    if train.num_classes != val.num_classes:
        raise ValueError(
            f"{train.description} has {train.num_classes} classes but "
            f"{val.description} has {val.num_classes}; use matching splits."
        )
    return StudyData(train, val, count_images(train))


def count_images(images) -> int:
    """The number of images of a `LabeledImages` (a dataset of unknown size
    is counted by reading it once)."""
    if images.labels is not None:
        return len(images.labels)
    count = int(images.images.cardinality())
    if count < 0:
        count = sum(1 for _ in images.images)
    return count


def _classification_batches(images, image_size: int, batch_size: int = 256):
    from keras_aim import data

    return data.classification_dataset(
        images.images, images.labels, batch_size, image_size, training=False,
        num_classes=images.num_classes,
    )


# --- One run ---------------------------------------------------------------


def pretrainer_options(config: StudyConfig, run: Run) -> dict[str, Any]:
    """The `AIMPretrainer` arguments of `run`: the config's pixel head, with
    its variant's changes."""
    return {"pixel_head_width": config.pixel_head_width,
            "pixel_head_depth": config.pixel_head_depth, **VARIANTS[run.variant]}


def build_pretrainer(config: StudyConfig, run: Run):
    """The `AIMPretrainer` of `run`, compiled with the paper's optimizer."""
    import keras

    from keras_aim.models.aim.aim_backbone import AIMBackbone
    from keras_aim.models.aim.aim_pretrainer import AIMPretrainer
    from keras_aim.training.optimizers import pretraining_optimizer

    size = config.size(run.size)
    keras.utils.set_random_seed(run.seed)
    backbone = AIMBackbone(
        image_shape=(config.image_size, config.image_size, 3),
        patch_size=config.patch_size,
        hidden_dim=size.hidden_dim,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        layer_norm_epsilon=1e-5,
    )
    pretrainer = AIMPretrainer(backbone, seed=run.seed, **pretrainer_options(config, run))
    pretrainer.compile(optimizer=pretraining_optimizer(config.steps, config.learning_rate))
    return pretrainer


def probe_top1(config: StudyConfig, data: StudyData, backbone, blocks, seed: int) -> float:
    """Top-1 on the held-out split of an attentive probe trained on the
    frozen trunk's features of the whole training split."""
    from keras_aim.training import probing

    train_x, train_y = probing.probe_features(
        backbone, _classification_batches(data.train, config.image_size), blocks,
        return_labels=True,
    )
    val_x, val_y = probing.probe_features(
        backbone, _classification_batches(data.val, config.image_size), blocks,
        return_labels=True,
    )
    model = probing.train_attentive_probe(
        train_x, train_y, data.train.num_classes, backbone.num_heads,
        epochs=config.probe_epochs, batch_size=config.probe_batch_size,
        learning_rate=config.probe_learning_rate, seed=seed,
    )
    return probing.topk_accuracy(probing.probe_logits(model, val_x), val_y, 1)


def execute_run(
    config: StudyConfig, data: StudyData, run: Run, record: Callable[[dict], None]
) -> None:
    """Pre-trains `run`, measuring at every checkpoint; each measurement is
    handed to `record` as soon as it exists."""
    from keras_aim import data as pipelines

    size = config.size(run.size)
    start = time.perf_counter()
    pretrainer = build_pretrainer(config, run)
    images = data.pretraining_images(run.data_fraction, run.seed)
    count = len(images) if isinstance(images, np.ndarray) else int(images.cardinality())
    stream = pipelines.pretraining_dataset(
        images, config.batch_size, config.image_size, config.augmentation, seed=run.seed
    )
    val_images = _classification_batches(data.val, config.image_size).map(lambda x, y: x)
    done = 0
    for checkpoint in config.checkpoints:
        history = pretrainer.fit(
            stream, steps_per_epoch=checkpoint - done, epochs=1, verbose=0, shuffle=False
        )
        done = checkpoint
        val_loss = float(pretrainer.evaluate(val_images, verbose=0))
        top1 = probe_top1(config, data, pretrainer.backbone, size.probe_blocks(), run.seed)
        record({
            "run": run.key, "size": run.size, "variant": run.variant, "seed": run.seed,
            "data_fraction": run.data_fraction, "pretraining_images": count,
            "trunk_parameters": size.parameters(config.patch_size),
            "step": checkpoint, "final": checkpoint == config.steps,
            "train_loss": float(history.history["loss"][-1]), "val_loss": val_loss,
            "probe_top1": top1, "seconds": time.perf_counter() - start,
        })


# --- Cost ----------------------------------------------------------------------


def run_shape(config: StudyConfig, run: Run):
    """The `PretrainingShape` (trunk + pixel head) of `run`."""
    from keras_aim.training.memory_plan import PretrainingShape

    size, options = config.size(run.size), pretrainer_options(config, run)
    return PretrainingShape(
        hidden_dim=size.hidden_dim, num_layers=size.num_layers, num_heads=size.num_heads,
        image_size=config.image_size, patch_size=config.patch_size,
        pixel_head_width=options["pixel_head_width"],
        pixel_head_depth=options["pixel_head_depth"],
    )


def estimated_cost(config: StudyConfig, train_images: int, val_images: int) -> dict:
    """Analytic FLOPs of the whole study (`keras_aim.training.memory_plan`'s
    count; nothing is built) and the memory of its largest pre-training
    step on one device.

    Per run: `steps x batch` pre-training steps; at each checkpoint the
    validation loss (a forward of trunk + pixel head over the held-out
    images) and the probe's features (a trunk forward over the training and
    held-out images). The probe's own training (a few thousand parameters
    per class on cached features) is left out. Returns `{"runs": [...],
    "pretraining_flops": F, "total_flops": F, "largest_step": MemoryPlan}`.
    """
    from keras_aim.training import memory_plan

    rows, largest = [], None  # largest: (training FLOPs per image, shape)
    for run in config.runs():
        shape = run_shape(config, run)
        step, forward = memory_plan.step_flops(shape), memory_plan.forward_flops(shape)
        pretraining = config.steps * config.batch_size * step["train"]
        measuring = len(config.checkpoints) * (
            val_images * (step["inference"] + forward["pixel_head"])
            + (train_images + val_images) * step["inference"])
        rows.append({"run": run.key, "pretraining_flops": pretraining,
                     "measuring_flops": measuring})
        if largest is None or step["train"] > largest[0]:
            largest = (step["train"], shape)
    pretraining = sum(r["pretraining_flops"] for r in rows)
    return {
        "runs": rows,
        "pretraining_flops": pretraining,
        "total_flops": pretraining + sum(r["measuring_flops"] for r in rows),
        "largest_step": memory_plan.plan_memory(
            largest[1], 1, 1, config.batch_size, precision="fp32"),
    }


# --- The study ---------------------------------------------------------------


def read_results(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, RESULTS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_results(out_dir: str, rows: list[dict]) -> None:
    with atomic_file(os.path.join(out_dir, RESULTS_FILE)) as staging, open(staging, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _check_or_write_config(config: StudyConfig, out_dir: str) -> None:
    path = os.path.join(out_dir, CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as handle:
            stored = json.load(handle)
        current = json.loads(json.dumps(config.to_json()))
        if stored != current:
            changed = sorted(k for k in {*stored, *current} if stored.get(k) != current.get(k))
            raise ValueError(
                f"{out_dir} holds a study with another configuration (differs in: "
                f"{', '.join(changed) or 'its fields'}); rerun with the same options to "
                "continue it, or choose another output folder."
            )
        return
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(
            f"{out_dir} is not empty and holds no study; choose an empty or new folder."
        )
    os.makedirs(out_dir, exist_ok=True)
    with atomic_file(path) as staging, open(staging, "w") as handle:
        json.dump(config.to_json(), handle, indent=2)


def run_study(
    config: StudyConfig,
    out_dir: str,
    log: Callable[[str], None] = print,
    max_runs: int | None = None,
    workers: int = 1,
) -> list[dict]:
    """Runs (or continues) the study in `out_dir`; returns every result row.

    Finished runs found in `out_dir` are skipped; rows of a run that was cut
    off are dropped and the run is done again. `max_runs` stops after that
    many runs (the rest is done by a later call). `workers > 1` runs that
    many runs at a time in separate processes (`run_in_processes`): the same
    rows in the same order in `results.jsonl` (losses may differ in the last
    digits: fewer threads sum in another order), each run's rows written
    when the run ends.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1; got {workers}.")
    _check_or_write_config(config, out_dir)
    rows = read_results(out_dir)
    finished = {row["run"] for row in rows if row["final"]}
    rows = [row for row in rows if row["run"] in finished]
    _write_results(out_dir, rows)
    pending = [run for run in config.runs() if run.key not in finished]
    if finished:
        log(f"continuing: {len(finished)} runs done, {len(pending)} to go")
    pending = pending[:max_runs] if max_runs else pending
    if not pending:
        return rows
    order = {run.key: number for number, run in enumerate(config.runs())}

    def record(new_rows: list[dict]) -> None:
        rows.extend(new_rows)
        rows.sort(key=lambda row: order[row["run"]])  # stable: checkpoints stay in order
        _write_results(out_dir, rows)
        for row in new_rows:
            log(f"{row['run']}: step {row['step']}, val loss {row['val_loss']:.4f}, "
                f"probe top-1 {row['probe_top1']:.2%}")

    if workers > 1 and len(pending) > 1:
        run_in_processes(config, pending, record, log, workers)
        return rows
    data = load_data(config)
    for number, run in enumerate(pending, 1):
        log(f"[{number}/{len(pending)}] {run.key}")
        execute_run(config, data, run, lambda row: record([row]))
    return rows


# --- Runs in parallel processes -------------------------------------------------

_WORKER: dict[str, Any] = {}  # a worker process's config and data


def _start_worker(config_json: dict, threads: int) -> None:
    """Initializer of a worker process: caps the frameworks' thread pools at
    `threads` (set before any framework starts) and loads the data once. An
    error is kept and raised by each run, so that it reaches the caller as
    itself rather than as a broken pool."""
    for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[name] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    try:
        import keras

        if keras.config.backend() == "torch":
            import torch

            torch.set_num_threads(threads)
        config = StudyConfig.from_json(config_json)
        _WORKER.update(config=config, data=load_data(config))
    except Exception as error:  # noqa: BLE001 - handed to the parent by _worker_run
        _WORKER["error"] = error


def _worker_run(run: Run) -> list[dict]:
    if "error" in _WORKER:
        raise _WORKER["error"]
    rows: list[dict] = []
    execute_run(_WORKER["config"], _WORKER["data"], run, rows.append)
    return rows


def run_in_processes(
    config: StudyConfig,
    runs: Sequence[Run],
    record: Callable[[list[dict]], None],
    log: Callable[[str], None],
    workers: int,
) -> None:
    """Executes `runs`, `workers` at a time in as many worker processes,
    and hands each run's rows to `record` when the run ends. After a failed
    run, the runs under way finish (and are recorded), no other starts, and
    the run's error is raised as itself.

    Why: the study's trunks are so small that a step is bound by per-layer
    overhead, not arithmetic, so one run uses a 2-core CPU poorly; two runs
    at once, one thread each, did 1.6x the work of one run with both cores
    (trunk M, PyTorch). Runs are independent and seeded, so their numbers
    do not depend on which process ran them. Processes are spawned (not
    forked: the parent may hold framework threads) and inherit the
    environment, hence the Keras backend; like any use of multiprocessing's
    spawn, a script that calls this needs the `if __name__ == "__main__":`
    guard (the recipe has it). The largest trunks are started first so that
    no long run is left alone at the end.
    """
    import concurrent.futures
    import multiprocessing

    waiting = sorted(runs, key=lambda run: -config.size(run.size).parameters(config.patch_size))
    workers = min(workers, len(waiting))
    threads = max(1, (os.cpu_count() or 1) // workers)
    log(f"{len(waiting)} runs in {workers} processes "
        f"({threads} thread{'s' if threads > 1 else ''} each)")
    context = multiprocessing.get_context("spawn")
    done, failure = 0, None
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context,
        initializer=_start_worker, initargs=(config.to_json(), threads),
    ) as pool:
        # At most `workers` runs are handed out at a time, so that after a
        # failure nothing is queued: the runs under way finish and are kept.
        running: dict[concurrent.futures.Future, Run] = {}
        while waiting or running:
            while waiting and failure is None and len(running) < workers:
                run = waiting.pop(0)
                running[pool.submit(_worker_run, run)] = run
            if not running:
                break
            finished, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                if future.exception() is None:
                    record(future.result())
                    done += 1
                    log(f"[{done}/{len(runs)}] {run.key} done")
                elif failure is None:
                    failure = future.exception()
                    log(f"{run.key} failed: {failure!r}; finishing the runs under way")
    if failure is not None:
        raise failure


# --- Analysis ----------------------------------------------------------------


def correlations(losses: Sequence[float], accuracies: Sequence[float]) -> dict:
    """Pearson and Spearman correlation of validation loss and probe top-1
    (None where fewer than 3 points or no spread)."""
    from scipy import stats

    x, y = np.asarray(losses, float), np.asarray(accuracies, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"points": len(x), "pearson": None, "spearman": None}
    return {
        "points": len(x),
        "pearson": float(stats.pearsonr(x, y)[0]),
        "spearman": float(stats.spearmanr(x, y)[0]),
    }


def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def summarize(config: StudyConfig, rows: list[dict]) -> dict:
    """Correlations (all base checkpoints, and per trunk size), final probe
    top-1 by trunk (mean/std over seeds at full data) and by data fraction,
    and the ablation table."""
    base = [r for r in rows if r["variant"] == "base"]
    final = [r for r in base if r["final"]]
    full = max(config.data_fractions)
    first_seed = config.seeds[0]
    summary = {
        "correlation_all": correlations([r["val_loss"] for r in base],
                                        [r["probe_top1"] for r in base]),
        "correlation_by_size": {
            s.name: correlations([r["val_loss"] for r in base if r["size"] == s.name],
                                 [r["probe_top1"] for r in base if r["size"] == s.name])
            for s in config.sizes
        },
        "by_size": {
            s.name: {
                "trunk_parameters": s.parameters(config.patch_size),
                "probe_top1": _mean_std([r["probe_top1"] for r in final
                                         if r["size"] == s.name and r["data_fraction"] == full]),
                "val_loss": _mean_std([r["val_loss"] for r in final
                                       if r["size"] == s.name and r["data_fraction"] == full]),
            }
            for s in config.sizes
        },
        "by_data": {
            s.name: {
                f"{f:g}": next((r["probe_top1"] for r in final if r["size"] == s.name
                                and r["data_fraction"] == f and r["seed"] == first_seed), None)
                for f in config.data_fractions
            }
            for s in config.sizes
        },
        "ablations": {
            variant: next(
                ({"probe_top1": r["probe_top1"], "val_loss": r["val_loss"]}
                 for r in rows if r["final"] and r["variant"] == variant
                 and r["size"] == config.ablation_size and r["data_fraction"] == full
                 and r["seed"] == first_seed), None)
            for variant in ("base", *config.ablations)
        },
        "runs": len({r["run"] for r in rows if r["final"]}),
        "seconds": float(sum(r["seconds"] for r in rows if r["final"])),
    }
    return summary


def write_summary(out_dir: str, summary: dict) -> str:
    path = os.path.join(out_dir, SUMMARY_FILE)
    with atomic_file(path) as staging, open(staging, "w") as handle:
        json.dump(summary, handle, indent=2)
    return path


def plot(config: StudyConfig, rows: list[dict], out_dir: str) -> list[str]:
    """The three figures (PNG): probe top-1 against validation loss across
    checkpoints, one curve per trunk (finding 2); final probe top-1 against
    trunk parameters and against pre-training images (finding 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = [r for r in rows if r["variant"] == "base"]
    full, first_seed = max(config.data_fractions), config.seeds[0]
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(config.sizes)))
    paths = []

    def save(figure, name):
        path = os.path.join(out_dir, name)
        figure.tight_layout()
        with atomic_file(path) as staging:
            figure.savefig(staging, dpi=120)
        plt.close(figure)
        paths.append(path)

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for size, color in zip(config.sizes, colors):
        points = [r for r in base if r["size"] == size.name]
        axis.scatter([r["val_loss"] for r in points], [100 * r["probe_top1"] for r in points],
                     color=color, s=12, alpha=0.5)
        curve = sorted((r for r in points if r["data_fraction"] == full
                        and r["seed"] == first_seed), key=lambda r: r["step"])
        axis.plot([r["val_loss"] for r in curve], [100 * r["probe_top1"] for r in curve],
                  "-o", color=color, markersize=3,
                  label=f"{size.name} ({size.parameters(config.patch_size) / 1e6:.2f}M)")
    axis.set_xlabel("validation pre-training loss")
    axis.set_ylabel("attentive probe top-1 (%)")
    axis.set_title("Pre-training loss vs probe accuracy")
    axis.legend(fontsize=8)
    save(figure, "loss_vs_probe.png")

    figure, axis = plt.subplots(figsize=(5, 3.6))
    params, means, stds = [], [], []
    for size in config.sizes:
        values = [r["probe_top1"] for r in base if r["final"] and r["size"] == size.name
                  and r["data_fraction"] == full]
        if values:
            params.append(size.parameters(config.patch_size))
            means.append(100 * np.mean(values))
            stds.append(100 * np.std(values))
    axis.errorbar(params, means, yerr=stds, fmt="-o", capsize=3)
    axis.set_xscale("log")
    axis.set_xlabel("trunk parameters")
    axis.set_ylabel("final probe top-1 (%)")
    axis.set_title("Capacity (full data, mean +- std over seeds)")
    save(figure, "probe_vs_parameters.png")

    figure, axis = plt.subplots(figsize=(5, 3.6))
    for size, color in zip(config.sizes, colors):
        curve = sorted((r for r in base if r["final"] and r["size"] == size.name
                        and r["seed"] == first_seed), key=lambda r: r["data_fraction"])
        axis.plot([r["pretraining_images"] for r in curve],
                  [100 * r["probe_top1"] for r in curve], "-o", color=color, label=size.name)
    axis.set_xlabel("pre-training images")
    axis.set_ylabel("final probe top-1 (%)")
    axis.set_title("Data")
    axis.legend(fontsize=8)
    save(figure, "probe_vs_data.png")
    return paths


def format_summary(config: StudyConfig, summary: dict) -> str:
    """The summary as Markdown tables."""

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    def corr(c):
        if c["pearson"] is None:
            return f"n/a ({c['points']} points)"
        return f"Pearson {c['pearson']:+.2f}, Spearman {c['spearman']:+.2f} ({c['points']} points)"

    lines = ["| trunk | parameters | final probe top-1 (full data) | final val loss | "
             "loss-accuracy correlation |", "|---|---|---|---|---|"]
    for size in config.sizes:
        entry = summary["by_size"][size.name]
        top1, loss = entry["probe_top1"], entry["val_loss"]
        lines.append(
            f"| {size.name} ({size.hidden_dim}x{size.num_layers}) | "
            f"{entry['trunk_parameters'] / 1e6:.2f}M | "
            + (f"{100 * top1['mean']:.1f} +- {100 * top1['std']:.1f}% (n={top1['n']})"
               if top1["n"] else "-")
            + " | " + (f"{loss['mean']:.4f} +- {loss['std']:.4f}" if loss["n"] else "-")
            + f" | {corr(summary['correlation_by_size'][size.name])} |"
        )
    lines.append(f"\nAll base checkpoints: {corr(summary['correlation_all'])}.\n")
    fractions = config.data_fractions
    lines.append("| trunk | " + " | ".join(f"data {f:g}" for f in fractions) + " |")
    lines.append("|---|" + "---|" * len(fractions))
    for size in config.sizes:
        lines.append(f"| {size.name} | " + " | ".join(
            pct(summary["by_data"][size.name][f"{f:g}"]) for f in fractions) + " |")
    lines.append(f"\n| pre-training on trunk {config.ablation_size} | final probe top-1 | "
                 "final val loss |\n|---|---|---|")
    for variant, entry in summary["ablations"].items():
        if entry is None:
            lines.append(f"| {variant} | - | - |")
        else:
            lines.append(f"| {variant} | {pct(entry['probe_top1'])} | {entry['val_loss']:.4f} |")
    return "\n".join(lines)


"""Training through the backbone: its inputs in memory, the per-batch step, precision.

Used by every strategy whose epochs run images through the network (fine_tune,
two_stage, scratch, and feature_extraction with augmentation). The inputs are
the decoded images, or, where the frozen blocks compute a fixed function, the
cached output of those blocks (`components.train.trunk`): then each step runs
only the tail of the backbone. On CUDA the step runs under autocast (bfloat16
where supported, else float16 with loss scaling) with channels-last
convolutions. On the CPU it runs in float32, except that on a cached trunk's
tail it runs under bfloat16 autocast where the CPU has native bfloat16
(AVX-512 BF16, AMX): measured on the demo, the same epochs, losses and test
accuracy as float32, 1.4x faster (`train.mixed_precision`; `benchmarks/train.py`).
A seeded run on one machine is repeatable either way.

Under `torchrun` (`train.processes` above 1, see `components.train.launcher`) the
same step runs in every process: the trained part is wrapped in
DistributedDataParallel, each process takes its share of every batch, and
losses and validation sums are added up over the processes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from components.backbones.classifier import GraftClassifier
from components.backbones.spec import BackboneSpec
from components.backbones.trunk import TrunkSplit
from components.backbones.unfreeze import Trainable, set_train_mode
from components.core.config import Params, TrainConfig
from components.core.errors import TrainingError
from components.core.progress_lines import ProgressLines
from components.data.images import load_batch
from components.data.split import Sample, Split
from components.runtime.cpu import cpu_facts
from components.train import depthwise
from components.train.collectives import World, all_sum, broadcast_buffers, shard, world
from components.train.loop import (
    FitResult,
    MetricsCallback,
    Phase,
    ResumeStore,
    adamw,
    batch_indices,
    fit,
    make_criterion,
    optimizer_step,
    warmup_cosine,
)

if TYPE_CHECKING:
    from components.train.augment import Augmenter

log = logging.getLogger(__name__)


MAX_DECODED_BYTES = 8 << 30
"""Training through the backbone keeps the decoded images in memory; more than this is refused."""


def labels_of(samples: tuple[Sample, ...]) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.int64)


@dataclass(frozen=True)
class Precision:
    """Device and number format of training through the backbone."""

    device: str
    amp_dtype: torch.dtype | None
    """Autocast dtype on CUDA, None for full float32."""
    channels_last: bool

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None)

    def scaler(self) -> torch.amp.GradScaler | None:
        """Loss scaling, needed by float16 only."""
        return torch.amp.GradScaler(self.device) if self.amp_dtype == torch.float16 else None

    def describe(self) -> str:
        number = {None: "float32", torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast"}[self.amp_dtype]
        return f"{self.device}, {number}{', channels-last' if self.channels_last else ''}"


def resolve_precision(
    cfg: TrainConfig, cached_trunk: bool = False, cuda_available: bool | None = None, bf16_supported: bool | None = None,
    cpu_bf16: bool | None = None,
) -> Precision:
    """Pick the device, the autocast dtype and channels-last.

    On CUDA, `train.mixed_precision` (true or auto) autocasts to bfloat16 where supported, else float16, and
    `train.channels_last` applies. On the CPU, bfloat16 autocast needs native bfloat16 (`cpu_bf16`, default:
    this CPU's flags) and either `mixed_precision: true`, or `auto` on a cached trunk's tail (`cached_trunk`),
    where it was measured to change nothing but the speed; channels-last stays off on the CPU (no faster there), but for
    the depthwise convolutions that train (`components.train.depthwise`).

    Raises:
        TrainingError: `train.device=cuda` on a machine without CUDA.
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if cfg.device == "cuda" and not cuda:
        raise TrainingError("train.device=cuda but torch sees no CUDA device; use --set train.device=auto (or cpu)")
    if cfg.device == "cpu" or not cuda:
        native = cpu_facts().bf16 if cpu_bf16 is None else cpu_bf16
        wanted = cfg.mixed_precision is True or (cfg.mixed_precision == "auto" and cached_trunk)
        return Precision("cpu", torch.bfloat16 if native and wanted else None, False)
    bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
    dtype = (torch.bfloat16 if bf16 else torch.float16) if cfg.mixed_precision else None
    return Precision("cuda", dtype, cfg.channels_last)


@dataclass(frozen=True)
class TrainingData:
    """What the epochs read, kept in memory: one row per image (decoded uint8 N x S x S x 3 images, or the
    cached trunk's output), and the labels."""

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    trunk: TrunkSplit | None = None
    """Set when the rows are the frozen trunk's output: the network then runs only `trunk.tail` on them."""


def _decode(samples: tuple[Sample, ...], size: int, desc: str, chunk: int = 256) -> torch.Tensor:
    out = torch.empty((len(samples), size, size, 3), dtype=torch.uint8)
    with ProgressLines(log, desc, len(samples)) as bar:
        for start in range(0, len(samples), chunk):
            part = samples[start : start + chunk]
            out[start : start + len(part)] = torch.from_numpy(load_batch([s.path for s in part], size))
            bar.update(len(part))
    return out


def load_images(split: Split, size: int) -> TrainingData:
    """Decode the split once for training through the backbone.

    Raises:
        TrainingError: the decoded images would not fit the memory budget.
    """
    needed = (len(split.train) + len(split.val)) * size * size * 3
    if needed > MAX_DECODED_BYTES:
        raise TrainingError(
            f"{len(split.train) + len(split.val)} images at {size}px need {needed / 2**30:.1f} GiB decoded, over the "
            f"{MAX_DECODED_BYTES / 2**30:.0f} GiB budget; lower data.image_size or use train.strategy=feature_extraction"
        )
    return TrainingData(
        _decode(split.train, size, "decoding train images"),
        torch.from_numpy(labels_of(split.train)),
        _decode(split.val, size, "decoding val images"),
        torch.from_numpy(labels_of(split.val)),
        len(split.classes),
    )


def _feature_dim(backbone: nn.Module, size: int) -> int:
    with torch.no_grad():
        return int(backbone(torch.zeros(1, 3, size, size)).shape[1])


def build_model(spec: BackboneSpec, size: int, num_classes: int, seed: int) -> GraftClassifier:
    """The deployable classifier around a freshly built backbone and a new head."""
    backbone = spec.build(size, seed=seed)
    return GraftClassifier(backbone, _feature_dim(backbone, size), num_classes, spec.mean, spec.std)


def _features(model: GraftClassifier, rows: torch.Tensor, precision: Precision, trunk: TrunkSplit | None) -> torch.Tensor:
    """Pooled features of a batch of rows: images through the whole backbone, or trunk rows through its tail."""
    x = rows if trunk is not None else model.preprocess(rows)
    if precision.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return (trunk.tail if trunk is not None else model.backbone)(x)


def _logits(model: GraftClassifier, rows: torch.Tensor, precision: Precision, trunk: TrunkSplit | None) -> torch.Tensor:
    return model.head(_features(model, rows, precision, trunk))


class _TrainingForward(nn.Module):
    """Rows (images or trunk rows) to training logits, as one module DistributedDataParallel can wrap.

    With the backbone frozen its features are computed without gradients and only the head trains.
    """

    def __init__(self, model: GraftClassifier, precision: Precision, backbone_grad: bool, trunk: TrunkSplit | None) -> None:
        super().__init__()
        self.model, self.precision, self.backbone_grad = model, precision, backbone_grad
        self.trunk = trunk  # not a submodule: its modules are the model's own

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.backbone_grad:
            return _logits(self.model, rows, self.precision, self.trunk)
        with torch.no_grad():
            features = _features(self.model, rows, self.precision, self.trunk)
        return self.model.head(features)


def _data_parallel(forward: _TrainingForward, precision: Precision, place: World) -> nn.Module:
    """The forward itself in one process; wrapped in DistributedDataParallel under torchrun."""
    if not place.distributed:
        return forward
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if precision.device == "cuda" else None
    return DistributedDataParallel(forward, device_ids=device_ids)


@dataclass(frozen=True)
class NetworkSetup:
    """What trains in one network phase and how fast."""

    name: str
    trainable: Trainable | None
    """The unfrozen backbone blocks; None keeps the whole backbone frozen."""
    head_lr: float
    backbone_lr: float
    freeze_bn: bool
    schedule: bool
    """Warm-up then cosine decay; False keeps the learning rate constant."""


PRECISE_BN_IMAGES = 2048


@torch.no_grad()
def recompute_bn_statistics(model: GraftClassifier, trainable: Trainable, data: TrainingData, batch_size: int, precision: Precision) -> None:
    """Set the trainable blocks' BatchNorm statistics to their average over (up to 2048) training images.

    Running averages lag behind weights that change quickly, as they do from scratch; evaluated with
    stale statistics, a model that fits its training data predicts one class ("precise BN", Wu &
    Johnson 2021). One extra forward pass, in order and without augmentation, so it stays repeatable.
    """
    layers = [m for block in trainable.modules for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    model.eval()
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches below
        layer.train()
    subset = data.train[:PRECISE_BN_IMAGES]
    for start in range(0, len(subset), batch_size):
        batch = subset[start : start + batch_size]
        if len(batch) < 2:
            continue
        with precision.autocast():
            _logits(model, batch.to(precision.device), precision, data.trunk)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
        layer.eval()


def network_phase(model: GraftClassifier, data: TrainingData, cfg: TrainConfig, setup: NetworkSetup, precision: Precision, augmenter: Augmenter | None) -> Phase:
    device = precision.device
    groups = [{"params": list(model.head.parameters()), "lr": setup.head_lr}]
    lr_names: tuple[str, ...] = ("lr",)
    if setup.trainable is not None:
        backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
        groups.append({"params": backbone_params, "lr": setup.backbone_lr})
        lr_names = ("lr", "lr/backbone")
    optimizer = adamw(groups, setup.head_lr, cfg.weight_decay)
    place = world()
    min_batch = 2 * place.size  # two images per process and batch, for BatchNorm
    steps = len(batch_indices(data.train_labels, data.num_classes, cfg, torch.Generator().manual_seed(0), min_batch))
    scheduler = warmup_cosine(optimizer, cfg.warmup_epochs * steps, cfg.epochs * steps) if setup.schedule else None
    scaler = precision.scaler()
    criterion = make_criterion(cfg, data.train_labels, data.num_classes, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    forward = _data_parallel(_TrainingForward(model, precision, setup.trainable is not None, data.trunk), precision, place)

    def set_modes() -> None:
        model.train()
        if setup.trainable is None:
            model.backbone.eval()
        else:
            set_train_mode(model.backbone, setup.trainable, setup.freeze_bn)

    def train_epoch() -> float:
        set_modes()
        total = 0.0
        batches = batch_indices(data.train_labels, data.num_classes, cfg, generator, min_batch)
        for batch in tqdm(batches, desc=f"{setup.name} batches", unit="batch", leave=False, disable=None if place.main else True):
            index = shard(batch, place)  # the whole batch in one process
            images = data.train[index].to(device, non_blocking=True)
            labels = data.train_labels[index].to(device, non_blocking=True)
            if augmenter is not None:
                images = augmenter(images)
            with precision.autocast():
                loss = criterion(forward(images).float(), labels)
            # summed over the processes, so that all of them see the same loss and stop together
            (batch_loss,) = all_sum([loss.item() * len(index)], device)
            if not math.isfinite(batch_loss):
                return batch_loss
            # DistributedDataParallel averages the processes' gradients; weighing each share's mean loss by its
            # part of the batch makes that the whole batch's mean, also when the shares differ by an image (1 here)
            optimizer_step(loss * (len(index) * place.size / len(batch)), optimizer, cfg, scaler)
            if scheduler is not None:
                scheduler.step()
            total += batch_loss
        return total / len(data.train)

    @torch.inference_mode()
    def validate() -> tuple[float, float]:
        if setup.trainable is not None and not setup.freeze_bn:
            recompute_bn_statistics(model, setup.trainable, data, cfg.batch_size, precision)
            broadcast_buffers(model)
        model.eval()
        loss_sum, correct = 0.0, 0
        mine = shard(torch.arange(len(data.val)), place)  # every image in one process
        for start in range(0, len(mine), cfg.batch_size):
            index = mine[start : start + cfg.batch_size]
            images = data.val[index].to(device)
            labels = data.val_labels[index].to(device)
            with precision.autocast():
                logits = _logits(model, images, precision, data.trunk).float()
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
        loss_sum, correct = all_sum([loss_sum, correct], device)
        return loss_sum / len(data.val), correct / len(data.val)

    # checkpoint only what can change: the head alone while the backbone is frozen
    target = model if setup.trainable is not None else model.head
    return Phase(
        setup.name, target, optimizer, train_epoch, validate, cfg.epochs, cfg.patience, generator,
        scheduler=scheduler, scaler=scaler, lr_names=lr_names, images_per_epoch=len(data.train),
    )


def train_network(
    model: GraftClassifier, data: TrainingData, params: Params, setup: NetworkSetup,
    store: ResumeStore, on_epoch: MetricsCallback | None, step_offset: int = 0,
) -> FitResult:
    cfg = params.train
    precision = resolve_precision(cfg, cached_trunk=data.trunk is not None)
    augmenter = None
    if cfg.augment and data.trunk is None:
        from components.train.augment import (
            Augmenter,  # torchvision's transforms take seconds to import: only when used
        )

        augmenter = Augmenter(cfg, data.train.shape[1])
        log.info("augmentation: %s", augmenter.describe())
    model.to(precision.device)
    if precision.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    if setup.trainable is not None:
        log.info(
            "%s: %d of %d backbone blocks train (%.2fM parameters) at lr %g, head at lr %g; BatchNorm statistics %s; on %s",
            setup.name, setup.trainable.blocks, setup.trainable.total_blocks, setup.trainable.parameters / 1e6,
            setup.backbone_lr, setup.head_lr,
            "frozen" if setup.freeze_bn else "trained, and recomputed on the training images before each validation",
            precision.describe(),
        )
    phase = network_phase(model, data, cfg, setup, precision, augmenter)
    with depthwise.for_training(model, precision.device):
        result = fit(phase, store, on_epoch, step_offset)
    model.to("cpu")
    if precision.channels_last:
        model.backbone.to(memory_format=torch.contiguous_format)
    return result

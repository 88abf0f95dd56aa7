"""The data stage on NVIDIA DALI: decode, resize, crop, flip (and, with augment.photometric_after_paste
false, the strong photometric ops; by default those run on the device after the crop-paste) in a
DALI pipeline (on the GPU with `device_id` set, on the CPU with `device_id=None`).

Same streams, same draws as `TorchDataStage` (the fallback): a host-side `ShardedStreamSampler`
shards each stream by rank and walks per-epoch permutations (labeled and unlabeled streams have
their own lengths and epochs), and every image's geometry (`sample_geometry`) and strong-view
parameters (`sample_strong`) are drawn on the host from the same per-image generator as the
fallback, then fed to the pipeline as per-sample arguments. So both stages produce the same image
order, the same crop windows and exactly the same boxes (transformed on the host by
`apply_geometry_to_boxes`); the pixels come from DALI's operators, which differ from torchvision's
in rounding and in the colour-jitter formulas (fixed order brightness/contrast, then hue and
saturation; grayscale as saturation 0; one CutOut fill colour per image): statistically similar
views, not identical ones. With the GPU pipeline the views stay on the device (no host round-trip).

Bad data: a missing file is reported with its path when it is read; a file DALI cannot decode is
identified by decoding the batch's files on the host, then reported with its path and either
fails the run (`data.bad_images: fail`) or is dropped from its batch with a count in the log
(`skip`).
"""
from __future__ import annotations

import queue
import threading

from typing import Iterator

import numpy as np
import torch

from acrst_fast.config import AugmentConfig
from acrst_fast.data.coco import DataError, ImageRecord, decode_image
from acrst_fast.data.batch import Batch
from acrst_fast.data.loader import STREAM_LABELED, STREAM_UNLABELED, STREAM_VAL, BadImagePolicy, ShardedStreamSampler
from acrst_fast.data.transforms import StrongParams, apply_geometry_to_boxes, sample_geometry, sample_strong
from acrst_fast.streams import dali_seed

NO_BLUR_SIGMA = 0.01  # a 3-tap kernel of weights (0, 1, 0) in float: the identity


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _build_pipeline(batch: int, device_id: int | None, seed: int, threads: int, views: tuple[str, ...]):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed, prefetch_queue_depth=1)
    def views_pipeline():
        def arg(name: str, dtype=types.FLOAT):
            return fn.external_source(name=name, dtype=dtype)

        encoded = arg("encoded", types.UINT8)
        # pixels as stored, EXIF orientation ignored, as PIL decodes them (data/coco.py: the json describes them)
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                  adjust_orientation=False)
        image = fn.resize(image, size=arg("resized_hw"), antialias=True, interp_type=types.INTERP_LINEAR)
        image = fn.slice(image, start=arg("crop_start", types.INT32), shape=arg("crop_shape", types.INT32),
                         axis_names="HW")
        weak = fn.flip(image, horizontal=arg("flip", types.INT32))
        outs = []
        to_float = dict(dtype=types.FLOAT, output_layout="CHW", mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0])
        if "weak" in views:
            outs.append(fn.crop_mirror_normalize(weak, **to_float))
        if "strong" in views:
            s = fn.brightness_contrast(weak, brightness=arg("brightness"), contrast=arg("contrast"),
                                       contrast_center=128.0)
            s = fn.hsv(s, hue=arg("hue_degrees"), saturation=arg("saturation"))
            s = fn.gaussian_blur(s, sigma=arg("blur_sigma"))
            s = fn.erase(s, anchor=arg("erase_anchor"), shape=arg("erase_shape"), axis_names="HW",
                         fill_value=arg("erase_fill"))
            outs.append(fn.crop_mirror_normalize(s, **to_float))
        return tuple(outs)

    pipe = views_pipeline()
    pipe.build()
    return pipe


def _strong_args(p: StrongParams) -> dict[str, np.ndarray]:
    anchors = [v for y, x, _, _, _ in p.erase for v in (y, x)]
    shapes = [v for _, _, h, w, _ in p.erase for v in (h, w)]
    fill = [255.0 * c for c in p.erase[0][4]] if p.erase else [0.0, 0.0, 0.0]
    return {"brightness": np.float32(p.brightness), "contrast": np.float32(p.contrast),
            "hue_degrees": np.float32(p.hue * 360.0), "saturation": np.float32(0.0 if p.grayscale else p.saturation),
            "blur_sigma": np.float32(p.blur_sigma if p.blur_sigma > 0 else NO_BLUR_SIGMA),
            "erase_anchor": np.asarray(anchors, np.float32), "erase_shape": np.asarray(shapes, np.float32),
            "erase_fill": np.asarray(fill, np.float32)}


class DaliRunner:
    """Feeds items ({"record": ImageRecord, "args": per-sample pipeline arguments}) through one
    pipeline; on a decode failure finds the bad files on the host and applies the bad-image policy."""

    def __init__(self, batch: int, device_id: int | None, seed: int, threads: int, views: tuple[str, ...],
                 policy: BadImagePolicy):
        self.batch, self.device_id, self.seed, self.threads, self.views = batch, device_id, seed, threads, views
        self.policy = policy
        self._pipe = None

    def _run(self, items: list[dict]) -> list[list[torch.Tensor]]:
        if self._pipe is None:
            self._pipe = _build_pipeline(self.batch, self.device_id, self.seed, self.threads, self.views)
        for name in items[0]["args"]:
            self._pipe.feed_input(name, [it["args"][name] for it in items])
        return [_to_torch(o) for o in self._pipe.run()]

    def _drop_bad(self, items: list[dict], exc: Exception) -> list[dict]:
        self._pipe = None  # a failed DALI pipeline is not reusable
        good = []
        for it in items:
            try:
                decode_image(it["record"])
                good.append(it)
            except DataError as err:
                self.policy.report(str(err))
        if len(good) == len(items):
            raise RuntimeError(f"DALI pipeline failed on a batch whose files all decode on the host: {exc}")
        return good

    def run(self, items: list[dict]) -> tuple[list[dict], dict[str, list[torch.Tensor]]]:
        """(the items that made it, {view name: list of Tensor[3, H, W] float in [0, 1]})."""
        while items:
            try:
                outs = self._run(items)
                return items, dict(zip([v for v in ("weak", "strong") if v in self.views], outs))
            except RuntimeError as exc:
                items = self._drop_bad(items, exc)
        return [], {}


def read_encoded(rec: ImageRecord) -> np.ndarray:
    try:
        return np.fromfile(rec.path, dtype=np.uint8)
    except OSError:
        raise DataError(f"{rec.path} (image id {rec.image_id}): image file not found or unreadable") from None


def view_args(rec: ImageRecord, resized_hw: tuple[int, int], crop: tuple[int, int, int, int], flip: bool,
              strong: StrongParams | None) -> dict[str, np.ndarray]:
    """One sample's pipeline inputs: the file's bytes, resize to resized_hw, crop (x0, y0, width,
    height) of the resized image, flip, and the strong view's parameters when it is made."""
    x0, y0, cw, ch = crop
    args = {"encoded": read_encoded(rec), "resized_hw": np.asarray(resized_hw, np.float32),
            "crop_start": np.asarray([y0, x0], np.int32), "crop_shape": np.asarray([ch, cw], np.int32),
            "flip": np.int32(flip)}
    return args | _strong_args(strong) if strong is not None else args


class DaliStream:
    """One stream (labeled, unlabeled or val) of one rank: host sampler -> DALI pipeline -> Batch."""

    def __init__(self, records: list[ImageRecord], aug: AugmentConfig, views: tuple[str, ...], train: bool,
                 with_boxes: bool, batch: int, seed: int, stream: int, rank: int, world: int,
                 device_id: int | None, threads: int, policy: BadImagePolicy):
        self.records, self.aug, self.views, self.train, self.with_boxes = records, aug, views, train, with_boxes
        self.batch, self.seed, self.stream, self.rank, self.world = batch, seed, stream, rank, world
        self.policy = policy
        # augment.photometric_after_paste: DALI makes decode + geometry only; the strong view is a copy of
        # the weak one, whose photometric ops the trainer applies on the device after the crop-paste
        self.defer = "strong" in views and aug.photometric_after_paste
        pipe_views = ("weak",) if self.defer else views
        # each iterator gets its own runner (pipeline): iterators run ahead in threads of their own
        self._runner_args = (batch, device_id, dali_seed(seed, stream, rank), threads, pipe_views, policy)

    def _item(self, index: int, seed: int) -> dict:
        rec = self.records[index]
        gen = torch.Generator().manual_seed(seed)
        geom = sample_geometry(gen, rec.height, rec.width, self.aug, self.train)
        _, _, cw, ch = geom.crop
        strong = sample_strong(gen, self.aug, ch, cw) if "strong" in self.views else None
        args = view_args(rec, geom.resized_hw, geom.crop, geom.flip, None if self.defer else strong)
        boxes = torch.from_numpy(rec.boxes) if self.with_boxes else torch.zeros((0, 4))
        labels = torch.from_numpy(rec.labels) if self.with_boxes else torch.zeros((0,), dtype=torch.int64)
        boxes, keep = apply_geometry_to_boxes(boxes, geom, self.aug.crop_min_box)
        return {"record": rec, "args": args, "boxes": boxes, "labels": labels[keep], "geometry": geom, "pending": strong}

    def batches(self, start_step: int, infinite: bool) -> Iterator[Batch]:
        if not self.records:
            return
        sampler = iter(ShardedStreamSampler(len(self.records), self.seed, self.stream, self.rank, self.world,
                                            start=start_step * self.batch, infinite=infinite))
        runner = DaliRunner(*self._runner_args)
        while True:
            keys = [k for _, k in zip(range(self.batch), sampler)]
            if not keys:
                return
            items = []
            for index, seed in keys:
                try:
                    items.append(self._item(index, seed))
                except DataError as err:
                    self.policy.report(str(err))
            items, views = runner.run(items)
            if not items:
                continue
            weak, strong, pending = views.get("weak", []), views.get("strong", []), []
            if self.defer:
                strong, pending = [w.clone() for w in weak], [it["pending"] for it in items]
                weak = weak if "weak" in self.views else []
            yield Batch(image_ids=[it["record"].image_id for it in items], weak=weak, strong=strong,
                        boxes=[it["boxes"] for it in items], labels=[it["labels"] for it in items],
                        geometry=[it["geometry"] for it in items],
                        orig_hw=[(it["record"].height, it["record"].width) for it in items], pending=pending)


def _to_torch(tensor_list) -> list[torch.Tensor]:
    """DALI TensorList (CPU or GPU; samples of different shapes) -> list of torch tensors on the same device."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(tensor_list, TensorListGPU):  # DLPack: stays on the device; clone, DALI reuses its buffers
        return [torch.from_dlpack(tensor_list[i]).clone() for i in range(len(tensor_list))]
    return [torch.from_numpy(np.array(tensor_list[i])) for i in range(len(tensor_list))]


class DaliDataStage:
    """`DataStage` on DALI (see the module doc). Batch sizes are per rank; device_id None = CPU."""

    def __init__(self, labeled: list[ImageRecord], unlabeled: list[ImageRecord], val: list[ImageRecord],
                 aug: AugmentConfig, batch_labeled: int, batch_unlabeled: int, seed: int, rank: int, world: int,
                 device_id: int | None, threads: int = 2, val_batch: int = 4,
                 labeled_views: tuple[str, ...] = ("strong",), bad_images: str = "fail"):
        if not dali_available():
            raise DataError("data.pipeline is dali but nvidia-dali is not installed (pip install nvidia-dali-cuda130); "
                            "or set data.pipeline=torch")
        self.policy = BadImagePolicy(bad_images)
        common = dict(seed=seed, rank=rank, world=world, device_id=device_id, threads=threads, policy=self.policy)
        self.streams = {
            STREAM_LABELED: DaliStream(labeled, aug, labeled_views, True, True, batch_labeled, stream=STREAM_LABELED,
                                       **common),
            STREAM_UNLABELED: DaliStream(unlabeled, aug, ("weak", "strong"), True, True, batch_unlabeled,
                                         stream=STREAM_UNLABELED, **common),
            STREAM_VAL: DaliStream(val, aug, ("weak",), False, True, val_batch, stream=STREAM_VAL, **common),
        }

    def labeled(self, start_step: int) -> Iterator[Batch]:
        return run_ahead(self.streams[STREAM_LABELED].batches(start_step, infinite=True))

    def unlabeled(self, start_step: int) -> Iterator[Batch]:
        return run_ahead(self.streams[STREAM_UNLABELED].batches(start_step, infinite=True))

    def val(self) -> Iterator[Batch]:
        return run_ahead(self.streams[STREAM_VAL].batches(0, infinite=False))


PREFETCH_DEPTH = 2  # batches a stream's pipeline runs ahead of the step


def run_ahead(batches: Iterator[Batch], depth: int = PREFETCH_DEPTH) -> Iterator[Batch]:
    """`batches`, produced by a background thread up to `depth` batches ahead of the consumer: the
    host work (file reads, per-sample arguments) and the DALI run of the next batches overlap the
    step, which takes finished batches without waiting. Same batches, same order; an error in the
    producer (a bad image with data.bad_images=fail) is raised in the consumer."""
    done, out = object(), queue.Queue(maxsize=depth)
    stop = threading.Event()
    # the CUDA device is per thread: the producer works on the consumer's (torch.cuda.set_device(local_rank))
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def produce() -> None:
        if device is not None:
            torch.cuda.set_device(device)
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        out.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            out.put(exc)

    producer = threading.Thread(target=produce, name="dali-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # let the producer finish the DALI run it is in: a process that exits while DALI's own threads
        # still run aborts ("terminate called without an active exception")
        producer.join(timeout=60)

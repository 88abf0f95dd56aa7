"""ACRST for any SSOD trainer: CropBank + FBR + AFFR behind one object, your tensors in and out.

    acrst = ACRST(num_classes=80, device="cuda")
    acrst.add_ground_truth(images, gt_boxes, gt_labels)              # labeled weak views, once per image
    acrst.observe_teacher(weak_images, teacher_preds, pseudo_labels)  # every unlabeled step (collective)
    images, targets = acrst.rebalance_targets(strong_images, targets, generator)  # use these images
    images, boxes, labels, pasted = acrst.rebalance(strong_images, boxes, labels, generator)  # the same, plain

images: list of Tensor[3, H, W], uint8 or float in [0, 1]; boxes: list of Tensor[N, 4] in pixels, in
`box_format` (xyxy by default; a tv_tensors.BoundingBoxes says its own); labels: list of Tensor[N]
integer, from `label_offset` (1: 1..K, torchvision; 0: 0..K-1, detectron2 and mmdet); teacher
predictions/pseudo-labels: list of dicts with boxes, labels, scores. contract.py states and checks
all of it. `pasted` (list of Tensor[M] bool) marks boxes that come from the bank: selective
supervision trains regression on unlabeled images only on those. The caller's tensors are never
modified: pasted images are new tensors on every device.
"""
from __future__ import annotations

import numpy as np
import torch

from acrst_fast import dist
from acrst_fast.timing import clock
from acrst_fast.augment.affr import PseudoRecall, class_histogram, sampling_probs
from acrst_fast.augment.bank_merge import merge_labeled
from acrst_fast.augment.contract import Contract
from acrst_fast.augment.cropbank import LABELED, PSEUDO, SOURCES, CropBank
from acrst_fast.augment.targets import per_box_keys, realign, survivor_index, warn_if_reg_weight_ignored
from acrst_fast.host import mark_host, to_host, upload
from acrst_fast.augment.paste import PasteConfig, PastePlan, draw_uniforms
from acrst_fast.augment.pixels import paste_pixels, triton_available
from acrst_fast.augment.planner import plan_paste


class ACRST:
    def __init__(self, num_classes: int, *, capacity: int = 256, crop_size: int = 128,
                 paste: PasteConfig | None = None, beta: float = 0.6, pr_window: int = 200,
                 pr_threshold: float = 0.1, sources: tuple[str, ...] = ("labeled", "pseudo"),
                 device: torch.device | str = "cpu", box_format: str = "xyxy", label_offset: int = 1,
                 range_check: str = "first"):
        """range_check: "first" reads the value range of each entry point's first call's float images and
        teacher labels (one host read, once), "always" every call, "never" not at all (contract.py)."""
        unknown = set(sources) - set(SOURCES)
        if unknown or not sources:
            raise ValueError(f"ACRST sources must be a non-empty subset of {sorted(SOURCES)}, got {list(sources)}")
        self.num_classes, self.beta = num_classes, beta
        self.paste_cfg = paste or PasteConfig()
        if not 0 <= self.paste_cfg.n_min <= self.paste_cfg.n_max:
            raise ValueError(f"ACRST needs 0 <= n_min <= n_max, got [{self.paste_cfg.n_min}, {self.paste_cfg.n_max}]")
        self.sources = tuple(SOURCES[s] for s in sources)
        self.bank = CropBank(num_classes, capacity, crop_size, device)
        self.contract = Contract(num_classes, self.bank.device, box_format, label_offset, range_check)
        self._range_checked: set[str] = set()
        self.recall = PseudoRecall(num_classes, pr_window, pr_threshold, device)
        # kept pseudo-labels per class and step, on the device like PR
        self.pl_counts = torch.zeros((pr_window, num_classes), dtype=torch.float64, device=device)
        self.last_pasted_per_image = 0.0
        # instances pasted so far, per (bank: labeled, pseudo) and class (index k - 1): host counts from the op table
        self.pasted_counts = np.zeros((len(SOURCES), num_classes), dtype=np.int64)
        self.pasted_per_image: list[float] = []  # of each batch of the last `rebalance_many`
        # seconds spent per part (pr, bank, plan, paste) since the last `pop_seconds()`; with
        # `sync_timing` the device is synchronised around each part (benchmarks), else it is not
        self.sync_timing = False
        self._seconds: dict[str, float] = {}

    def _clock(self) -> float:
        return clock(self.bank.device, self.sync_timing)

    def _add_time(self, part: str, t0: float) -> float:
        t1 = self._clock()
        self._seconds[part] = self._seconds.get(part, 0.0) + t1 - t0
        return t1

    def pop_seconds(self) -> dict[str, float]:
        """Seconds per part (pr, bank, plan, paste) since the last call, and reset."""
        out, self._seconds = self._seconds, {}
        return out

    def _values_due(self, call: str) -> bool:
        """Whether this call's values are read for the range checks (`range_check`)."""
        mode = self.contract.range_check
        due = mode == "always" or (mode == "first" and call not in self._range_checked)
        self._range_checked.add(call)
        return due

    def _label_check(self, call: str, name: str):
        """A callback for `CropBank.add`: refuses host labels outside 1..K, named as the caller gave them."""
        return lambda host: self.contract.check_label_values(call, name, host)

    def add_ground_truth(self, images: list[torch.Tensor], boxes: list[torch.Tensor], labels: list[torch.Tensor],
                         generator: torch.Generator | None = None) -> int:
        """Offer ground-truth crops to the Labeled bank (a per-class reservoir). Returns crops stored."""
        call, c = "ACRST.add_ground_truth", self.contract
        images, _ = c.images_in(call, "images", images, paste_target=False)
        boxes, _ = c.boxes_in(call, "boxes", boxes, len(images))
        labels = c.labels_in(call, "labels", labels, boxes)
        if self._values_due(call):
            c.check_values(call, {"images": images})
        return self.bank.add(LABELED, images, boxes, labels, None, generator,
                             check_labels=self._label_check(call, "labels"))

    def share_labeled_bank(self, generator: torch.Generator) -> None:
        """Collective, once, after every rank has offered its shard of the labeled set: the ranks' Labeled
        banks are merged the same way on every rank (`bank_merge.merge_labeled`: metadata gathered, the
        chosen crops broadcast class by class), so each rank samples from the whole labeled set. A no-op
        alone."""
        if dist.world_size() > 1:
            merge_labeled(self.bank, generator)

    def observe_teacher(self, weak_images: list[torch.Tensor], predictions: list[dict], pseudo_labels: list[dict],
                        generator: torch.Generator | None = None) -> None:
        """Update Pseudo Recall from all teacher predictions (score >= threshold) and put the kept
        pseudo-labels into the Pseudo bank. Collective when distributed: one all-reduce of PR and
        the pseudo-label class counts together, on the device. One host read (the bank's slots)."""
        call, c = "ACRST.observe_teacher", self.contract
        weak_images, _ = c.images_in(call, "weak_images", weak_images, paste_target=False)
        predictions = c.predictions_in(call, "predictions", predictions, len(weak_images))
        pseudo_labels = c.predictions_in(call, "pseudo_labels", pseudo_labels, len(weak_images))
        if self._values_due(call):
            c.check_values(call, {"weak_images": weak_images},
                           {"predictions' labels": [p["labels"] for p in predictions]})
        t0 = self._clock()
        step = self.recall.steps
        labels = [p["labels"] for p in pseudo_labels]
        counts = class_histogram(torch.cat(labels).to(self.bank.device), self.num_classes) if labels \
            else torch.zeros(self.num_classes, dtype=torch.float64, device=self.bank.device)
        # one collective a step: PR sums and pseudo-label counts together (on the device; gloo for CPU)
        both = dist.all_reduce(torch.cat([self.recall.local_sums(predictions), counts]))
        self.recall.push(both[:self.num_classes])
        self.pl_counts[step % len(self.pl_counts)] = both[self.num_classes:]  # global, like PR
        t0 = self._add_time("pr", t0)
        self.bank.add(PSEUDO, weak_images, [p["boxes"] for p in pseudo_labels], labels,
                      [p["scores"] for p in pseudo_labels], generator,
                      check_labels=self._label_check(call, "pseudo_labels[*]['labels']"))
        self._add_time("bank", t0)

    def class_probs(self) -> torch.Tensor:
        """mu, Tensor[K] float64 on the device (Eq. 9)."""
        return sampling_probs(self.recall.value(), self.beta)

    def rebalance(self, images: list[torch.Tensor], boxes: list[torch.Tensor], labels: list[torch.Tensor],
                  generator: torch.Generator):
        """FBR (+ AFFR through mu): paste bank instances into copies of `images`, merge boxes.

        Returns (images, boxes, labels, pasted) on the images' device: the images in their dtype (new
        tensors; on CUDA views of one batch the Triton kernel pasted in a single launch, see
        `paste_pixels`), the boxes in the format they came in, the labels with `label_offset`.
        """
        return self._checked("ACRST.rebalance", [(images, boxes, labels, generator)], [""])[0][:4]

    def rebalance_many(self, batches: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                                                 torch.Generator]]) -> list[tuple]:
        """`rebalance` of several batches (labeled and unlabeled images of a step) together: one host
        read for all their boxes, labels and mu, each batch planned with its own generator, and on
        CUDA one kernel launch for all their images. Returns one `rebalance` result per batch."""
        prefixes = [f"batches[{b}] " for b in range(len(batches))]
        return [r[:4] for r in self._checked("ACRST.rebalance_many", batches, prefixes)]

    def rebalance_targets(self, images: list[torch.Tensor], targets: list[dict], generator: torch.Generator, *,
                          selective_supervision: bool = True, fill: dict | None = None,
                          per_box: tuple[str, ...] | None = None, model=None) -> tuple[list[torch.Tensor], list[dict]]:
        """`rebalance` on target dicts (`boxes`, `labels`, anything else): returns (images, targets), each
        target a new dict with the merged `boxes` and `labels`, every per-box field re-aligned
        (targets.py: `per_box` names them, default every tensor with one row per box; pasted rows get
        `fill[key]`), `source_index` (int64 Tensor[M], the input row, -1 pasted) and `reg_weight` (float
        Tensor[M]: 1 on pasted boxes and 0 on the image's own when `selective_supervision`, the paper's
        rule for unlabeled images; all 1 otherwise, for labeled ones). `model`: the detector the targets
        train; a warning fires once when its heads would ignore `reg_weight` (see `enable_box_weights`)."""
        call = "ACRST.rebalance_targets"
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, dict) for t in targets):
            raise ValueError(f"{call}: targets must be a list of dicts (one per image), got {type(targets).__name__}")
        for i, t in enumerate(targets):
            for key in ("boxes", "labels"):
                if key not in t:
                    raise ValueError(f"{call}: targets[{i}] has no {key!r} key (it has {sorted(t)})")
        keys = [per_box_keys(call, f"targets[{i}]", t, t["boxes"].numel() // 4 if isinstance(t["boxes"], torch.Tensor)
                             else 0, per_box) for i, t in enumerate(targets)]
        warn_if_reg_weight_ignored(model)
        images, boxes, labels, pasted, source, xyxy = self._checked(
            call, [(images, [t["boxes"] for t in targets], [t["labels"] for t in targets], generator)], [""],
            box_name="targets[*]['boxes']", label_name="targets[*]['labels']", with_source=True)[0]
        out = []
        for t, b, lab, p, src, bx, ks in zip(targets, boxes, labels, pasted, source, xyxy, keys):
            new = dict(t) | {"boxes": b, "labels": lab}
            new.update({k: realign(k, t[k], src, bx, fill or {}) for k in ks})
            new["reg_weight"] = p.float() if selective_supervision else torch.ones(len(p), device=p.device)
            new["source_index"] = src
            out.append(new)
        return images, out

    def _checked(self, call: str, batches, prefixes: list[str], box_name: str = "boxes",
                 label_name: str = "labels", with_source: bool = False) -> list[tuple]:
        """The contract around `_rebalance`: per batch (images, boxes, labels, pasted, source_index, xyxy
        boxes), each as the caller gave it (contract.py); source_index only `with_source` (else None)."""
        c, ins = self.contract, []
        for (images, boxes, labels, gen), pre in zip(batches, prefixes):
            ims, was_uint8 = c.images_in(call, pre + "images", images, paste_target=True)
            bx, how = c.boxes_in(call, pre + box_name, boxes, len(ims))
            lb = c.labels_in(call, pre + label_name, labels, bx)
            if not isinstance(gen, torch.Generator) or gen.device.type != "cpu":
                raise ValueError(f"{call}: {pre}generator must be a CPU torch.Generator, got {type(gen).__name__}")
            ins.append((ims, bx, lb, gen, was_uint8, how))
        if self._values_due(call):
            c.check_values(call, {pre + "images": i[0] for pre, i in zip(prefixes, ins)})
        results = self._rebalance([i[:4] for i in ins], owned=[i[4] for i in ins],
                                  check=lambda b, host: c.check_label_values(call, prefixes[b] + label_name, host),
                                  with_source=with_source)
        return [(c.images_out(ims, i[4]), c.boxes_out(boxes, i[5]), c.labels_out(labels), pasted, src, boxes)
                for (ims, boxes, labels, pasted, src), i in zip(results, ins)]

    def _rebalance(self, batches, owned: list[bool], check, with_source: bool = False) -> list[tuple]:
        """The paste on checked inputs (float [0, 1] images, xyxy boxes, labels 1..K): per batch (images,
        boxes, labels, pasted, source_index: None per image unless `with_source`). `owned[b]`: batch b's
        images are copies made here (pasted in place on the reference path; the caller's own are copied
        first). check(b, host labels)."""
        t0 = self._clock()
        slots, classes, size_hw = self.bank.entries_host(self.sources)
        draws = [draw_uniforms(len(b[0]), self.paste_cfg, b[3]) for b in batches]
        # one host read: mu and every box/label tensor on the device (planner inputs already on the host stay)
        sizes = [len(b[1]) for b in batches]
        read = to_host(self.class_probs(), *[t for b in batches for t in b[1]], *[t for b in batches for t in b[2]])
        mu, flat = mark_host(torch.from_numpy(read[0])), read[1:]
        n_img, at, plans, own_boxes = sum(sizes), 0, [], []
        for b, ((ims, _, _, _), n, d) in enumerate(zip(batches, sizes, draws)):
            host_boxes = [a.reshape(-1, 4).astype(np.float32) for a in flat[at:at + n]]
            host_labels = [a.reshape(-1).astype(np.int64) for a in flat[n_img + at:n_img + at + n]]
            check(b, host_labels)
            own_boxes += host_boxes
            plans.append(plan_paste([tuple(im.shape[1:]) for im in ims], [mark_host(torch.from_numpy(x)) for x in host_boxes],
                                    [mark_host(torch.from_numpy(x)) for x in host_labels], slots, classes, size_hw, mu,
                                    self.paste_cfg, draws=d))
            at += n
        t0 = self._add_time("plan", t0)
        images = [im for b, o in zip(batches, owned) for im in (b[0] if o or not b[0] or triton_available(b[0][0].device)
                                                                else [x.clone() for x in b[0]])]
        offsets = np.cumsum([0] + [len(b[0]) for b in batches])
        ops = mark_host(torch.cat([p.ops + torch.tensor([int(o), 0, 0, 0, 0, 0, 0])
                                   for p, o in zip(plans, offsets[:-1])]))  # the op table: host data
        self._count_pasted(ops.numpy()[:, 1])  # host data: no read of a device
        pasted_images = paste_pixels(images, ops, self.bank.pixels,  # the op table stays on the host
                                     bank_hw=self.bank.stored_hw_host())
        self._add_time("paste", t0)
        dev = images[0].device if images else torch.device("cpu")
        boxes, labels, pasted, source = self._upload_plans(plans, own_boxes if with_source else None, dev)
        out, self.pasted_per_image = [], []
        for (ims, _, _, _), plan, o in zip(batches, plans, offsets[:-1]):  # o: the batch's first image
            n = len(ims)
            self.last_pasted_per_image = len(plan.ops) / max(1, n)
            self.pasted_per_image.append(self.last_pasted_per_image)
            out.append((pasted_images[o:o + n], list(boxes[o:o + n]), list(labels[o:o + n]), list(pasted[o:o + n]),
                        list(source[o:o + n])))
        return out

    @staticmethod
    def _upload_plans(plans: list[PastePlan], own_boxes: list[np.ndarray] | None, dev: torch.device) -> tuple:
        """The plans' boxes, labels, pasted flags and, given the images' own boxes, source indices
        (survivor_index; else None per image), per image, on `dev` in one upload."""
        merged = [(b, p) for plan in plans for b, p in zip(plan.boxes, plan.pasted)]
        per_image = [len(b) for b, _ in merged]
        # the plans are the host planner's output: host data, no read of a device
        source = [] if own_boxes is None else [torch.from_numpy(survivor_index(own, mark_host(b), mark_host(p)))
                                               for own, (b, p) in zip(own_boxes, merged)]
        up = torch.cat([torch.cat(p.boxes).reshape(-1).float() for p in plans] +
                       [torch.cat(p.labels).reshape(-1).float() for p in plans] +  # class ids: exact in float32
                       [torch.cat(p.pasted).reshape(-1).float() for p in plans] +
                       [torch.cat(source).float() if source else torch.zeros(0)])  # indices below 2**24: exact in float32
        up = upload(up, dev)
        n = sum(per_image)
        return (up[:4 * n].reshape(-1, 4).split(per_image), up[4 * n:5 * n].long().split(per_image),
                (up[5 * n:6 * n] > 0).split(per_image),
                up[6 * n:].long().split(per_image) if source else [None] * len(per_image))

    def _count_pasted(self, slots: np.ndarray) -> None:
        """Add the pasted slots (int64[P], the op table's slot column) to `pasted_counts` by bank and class."""
        per_source = self.num_classes * self.bank.capacity
        np.add.at(self.pasted_counts, (slots // per_source, (slots % per_source) // self.bank.capacity), 1)

    def diagnostics(self, gt_class_counts: torch.Tensor | None = None) -> dict[str, torch.Tensor | float]:
        """Per-class PR, mu, bank fill, pseudo-label class histogram (window), and its KL divergence
        from the ground-truth class histogram when given (paper Fig. 4b). Reads the device."""
        tensors, finish = self.diagnostics_deferred(gt_class_counts)
        return finish([t.cpu() for t in tensors])

    def diagnostics_deferred(self, gt_class_counts: torch.Tensor | None = None):
        """`diagnostics` without reading the device now: (device tensors snapshotted now, finish), where
        finish(the same tensors on the host, as tensors or arrays) returns the diagnostics dict."""
        fill = self.bank.fill().double()  # host mirror
        available = fill[list(self.sources)].sum(0) > 0  # classes the planner can draw a crop of
        pasted = self.last_pasted_per_image
        counts = torch.from_numpy(self.pasted_counts.astype(np.float64))  # a copy: host values of now
        tensors = (self.recall.value(), self.class_probs(), self.pl_counts.sum(0))

        def finish(host) -> dict[str, torch.Tensor | float]:
            pr, mu, pl = (torch.as_tensor(h, dtype=torch.float64) for h in host)
            out: dict[str, torch.Tensor | float] = {
                "pr": pr, "mu": mu, "mu_sampled": sampled_distribution(mu, available),
                "bank_labeled": fill[LABELED], "bank_pseudo": fill[PSEUDO],
                "pl_hist": pl / pl.sum() if pl.sum() > 0 else pl, "pasted_per_image": pasted,
                "pasted_labeled": counts[LABELED], "pasted_pseudo": counts[PSEUDO],
            }
            if gt_class_counts is not None and pl.sum() > 0:
                out["kl_gt_pl"] = kl_divergence(gt_class_counts.double().cpu(), pl)
            return out

        return tensors, finish

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict(), "recall": self.recall.state_dict(), "pl_counts": self.pl_counts.cpu().clone(),
                "pasted_counts": torch.from_numpy(self.pasted_counts.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state["bank"])
        self.recall.load_state_dict(state["recall"])
        self.pl_counts.copy_(state["pl_counts"])
        if "pasted_counts" in state:  # absent in checkpoints written before it was counted
            self.pasted_counts[:] = np.asarray(state["pasted_counts"])


def sampled_distribution(mu: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """The class distribution the planner actually samples from: mu (Tensor[K]) without the classes that
    have no crop in the banks in use (`available`, Tensor[K] bool), renormalised; all zeros when no
    class can be pasted (`plan_paste_ref` draws nothing then)."""
    kept = mu.double() * available.to(mu.device)
    total = kept.sum()
    return kept / total if total > 0 else kept


def kl_divergence(p_counts: torch.Tensor, q_counts: torch.Tensor, eps: float = 1e-6) -> float:
    """KL(p || q) of two class histograms (counts, any scale), with eps smoothing so empty classes stay finite."""
    p = p_counts / p_counts.sum()
    q = (q_counts / q_counts.sum()).clamp(min=eps)
    q = q / q.sum()
    nz = p > 0
    return float((p[nz] * (p[nz] / q[nz]).log()).sum())

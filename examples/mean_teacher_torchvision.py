"""A Mean Teacher trainer in torchvision's detection-reference style, with ACRST dropped in.

It uses nothing of acrst_fast but the public module `acrst_fast.augment`: copy it as the template for your
own trainer. COCO json in, torchvision's Faster R-CNN (MobileNetV3-FPN), uint8 images, 1-based labels.

    python examples/mean_teacher_torchvision.py --labeled-json L.json --labeled-images DIR \\
        --unlabeled-images DIR2 --steps 2000 --burn-in 1000 --output-dir runs/example
    torchrun --nproc_per_node=2 examples/mean_teacher_torchvision.py ...   # DDP, your own process group

Each step: a labeled batch (supervised loss) and, after the burn-in, an unlabeled batch: the teacher
(an EMA of the student) predicts on the weak view, kept pseudo-labels (score >= --tau) train the student
on the strong view, after ACRST pasted class-rebalanced instances into it (selective supervision: box
regression on unlabeled images only for pasted boxes). The README's checklist is marked [1]..[7] below.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as td
import torchvision
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from acrst_fast.augment import ACRST, PasteConfig, enable_box_weights


class CocoImages(torch.utils.data.Dataset):
    """A COCO json's images as (uint8 Tensor[3, H, W], target {boxes xyxy float, labels 1..K}); a folder's
    images with empty targets when `json_path` is None."""

    def __init__(self, json_path: str | None, folder: str, class_ids: list[int] | None = None):
        self.folder = Path(folder)
        if json_path is None:
            self.files, self.anns, self.class_ids = sorted(p.name for p in self.folder.glob("*.jpg")), {}, class_ids
            return
        data = json.loads(Path(json_path).read_text())
        self.class_ids = class_ids or sorted(c["id"] for c in data["categories"])
        self.files = [im["file_name"] for im in data["images"]]
        by_id = {im["id"]: im["file_name"] for im in data["images"]}
        self.anns: dict[str, list] = {}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1:
                self.anns.setdefault(by_id[a["image_id"]], []).append(a)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        name = self.files[i]
        image = decode_image(read_file(str(self.folder / name)), mode=ImageReadMode.RGB)
        anns = self.anns.get(name, [])
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4).float()
        labels = torch.tensor([self.class_ids.index(a["category_id"]) + 1 for a in anns], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels}


def loader(dataset, batch: int, seed: int, rank: int, world: int):
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
    return sampler, torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                                                collate_fn=lambda items: tuple(zip(*items)))


def forever(sampler, data):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from data
        epoch += 1


def flip(images, targets, gen: torch.Generator):
    """The weak view: a horizontal flip with probability 0.5 (boxes xyxy follow)."""
    out_i, out_t = [], []
    for im, t in zip(images, targets):
        if torch.rand((), generator=gen) < 0.5:
            im, t = im.flip(-1), dict(t, boxes=t["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) +
                                      torch.tensor([im.shape[-1], 0, im.shape[-1], 0]))
        out_i.append(im)
        out_t.append(t)
    return out_i, out_t


PHOTOMETRIC = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
                          v2.RandomGrayscale(0.2), v2.RandomErasing(0.7, scale=(0.02, 0.1), value=0.5)])


def build_model(num_classes: int, args) -> torch.nn.Module:
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes + 1, min_size=args.min_size,
        max_size=args.max_size)
    return enable_box_weights(model)  # [5] torchvision's heads would ignore reg_weight


@torch.no_grad()
def ema_update(teacher, student, decay: float) -> None:
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


def save(path: Path, step, student, teacher, optimizer, acrst) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "acrst": acrst.state_dict()}, tmp)  # [6] banks too
    os.replace(tmp, path)  # atomic: a kill never leaves half a checkpoint


def main(args) -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:  # a process group the trainer starts itself, as torchvision's references do
        td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(args.device)
    torch.manual_seed(args.seed + rank)
    labeled = CocoImages(args.labeled_json, args.labeled_images)
    unlabeled = CocoImages(None, args.unlabeled_images, labeled.class_ids)
    num_classes = len(labeled.class_ids)
    student = build_model(num_classes, args).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=args.lr, momentum=0.9,
                                weight_decay=1e-4)
    acrst = ACRST(num_classes, capacity=args.capacity, crop_size=args.crop_size, paste=PasteConfig(0, args.max_paste),
                  beta=args.beta, device=device)  # [7] 2 x K x capacity x (3 x crop_size^2 + 13) bytes
    out, start = Path(args.output_dir), 0
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"checkpoint.rank{rank}.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        student.load_state_dict(state["student"]), teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"]), acrst.load_state_dict(state["acrst"])
        start = state["step"]
        print(f"resumed at step {start}")
    l_sampler, l_data = loader(labeled, args.batch_labeled, args.seed, rank, world)
    u_sampler, u_data = loader(unlabeled, args.batch_unlabeled, args.seed + 1, rank, world)
    l_iter, u_iter = forever(l_sampler, l_data), forever(u_sampler, u_data)
    first_pass = len(l_data)  # labeled batches in one epoch of this rank's shard
    for step in range(start, args.steps):
        gen = torch.Generator().manual_seed(args.seed * 100_003 + step * 97 + rank)  # per (step, rank)
        images, targets = flip(*next(l_iter), gen)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        if step < first_pass:  # [1] the first pass fills the Labeled bank
            acrst.add_ground_truth(images, [t["boxes"] for t in targets], [t["labels"] for t in targets])
        if step == first_pass - 1:  # (a resumed run past it restores the shared bank from its checkpoint)
            acrst.share_labeled_bank(gen)  # [3] every rank, once, after the first pass
        student.train()
        mutual = step >= args.burn_in
        if mutual:  # [4] paste on the geometry, then photometric ops; labeled boxes all train regression
            images, targets = acrst.rebalance_targets(images, targets, gen, selective_supervision=False)
        losses = student([PHOTOMETRIC(im) for im in images], targets)
        loss = sum(losses.values())
        pasted = 0
        if mutual:
            u_images, _ = flip(*next(u_iter), gen)
            u_images = [im.to(device) for im in u_images]
            with torch.no_grad():
                preds = teacher([im.float() / 255 for im in u_images])
            pseudo = [{k: v[p["scores"] >= args.tau] for k, v in p.items()} for p in preds]
            acrst.observe_teacher(u_images, preds, pseudo)  # [2] every mutual step, every rank
            u_images, u_targets = acrst.rebalance_targets(u_images, pseudo, gen, model=student)  # [5] reg_weight
            pasted = sum(int((t["source_index"] < 0).sum()) for t in u_targets)
            u_losses = student([PHOTOMETRIC(im) for im in u_images], u_targets)
            loss = loss + args.lambda_unsup * sum(u_losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in student.parameters():
                if p.grad is not None:
                    td.all_reduce(p.grad)
                    p.grad /= world
        optimizer.step()
        ema_update(teacher, student, args.ema_decay if mutual else 0.0)  # burn-in: the teacher is the student
        if rank == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} mutual {int(mutual)} pasted {pasted} "
                  f"bank {int(acrst.bank.fill().sum())}", flush=True)
        if (step + 1) % args.checkpoint_period == 0 or step + 1 == args.steps:
            save(ckpt, step + 1, student, teacher, optimizer, acrst)
    if world > 1:
        td.destroy_process_group()


def get_args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labeled-json", required=True)
    ap.add_argument("--labeled-images", required=True)
    ap.add_argument("--unlabeled-images", required=True, help="a folder of .jpg images")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--burn-in", type=int, default=1000)
    ap.add_argument("--batch-labeled", type=int, default=2)
    ap.add_argument("--batch-unlabeled", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--tau", type=float, default=0.7, help="pseudo-label score threshold")
    ap.add_argument("--lambda-unsup", type=float, default=2.0)
    ap.add_argument("--beta", type=float, default=0.6, help="AFFR: mu_k ~ (1 / PR_k) ** beta")
    ap.add_argument("--capacity", type=int, default=64, help="CropBank crops per class and bank")
    ap.add_argument("--crop-size", type=int, default=96)
    ap.add_argument("--max-paste", type=int, default=6)
    ap.add_argument("--min-size", type=int, default=512)
    ap.add_argument("--max-size", type=int, default=853)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output-dir", default="runs/example")
    ap.add_argument("--checkpoint-period", type=int, default=500)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    return ap


if __name__ == "__main__":
    main(get_args_parser().parse_args())

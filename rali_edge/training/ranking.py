"""Stage 2 of the built-in model's recipe: the saved model, encoder and RALI head together,
fine-tuned on groups of one crop and its five levels of one distortion (data.training_group).

Why: stage 1 learns each image's label alone, on crops of photographs shrunk to 512 pixels. On
whole photographs of 1-24 MP its views see softer pixels than any of those, and there the
mildest blur, noise or JPEG, which smooth or roughen what was already there, often raised the
score: within-photograph ranks fell to 0.70 at 1000-3999 pixels. Here every group also says
which of its six images is better than which, for crops cut at the photographs' full size,
enlarged, or as stage 1 cuts them, and half of them delivered as JPEG: the loss is the MSE on
the labels plus a hinge on every pair of the group scored in the wrong order (or closer than
`margin`), plus the MSE on some of stage 1's own crops, which keeps what stage 1 learned. The
head is trained as the model file holds it (folded: one matrix, prototypes, their scores, the
temperature), so what is trained is what is saved: no head is refitted.

    python -m rali_edge.training.default_model ...                   # stage 1, then this
    python -m rali_edge.training.default_model --rank STAGE1_DIR ...  # this alone

docs/built-in-model.md has the runs that chose these settings.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rali_edge.evaluation import correlations
from rali_edge.head import rali_head_torch
from rali_edge.model import RaliModel
from rali_edge.preprocess import Preprocessor
from rali_edge.training import data

HEAD_TENSORS = ("weight", "bias", "prototypes", "proto_scores", "logit_scale")


@dataclass
class RankingRecipe:
    groups: int = 8000  # of six images each
    # Without whole photographs (below), and before GROUP_ONLY_SOURCES were added, 10 against 6:
    # blur 0.928 against 0.905 within, JPEG 0.966 against 0.951; with them 6 beat 10 without.
    epochs: int = 6
    groups_per_batch: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    rank_weight: float = 2.0
    margin: float = 0.05  # on the 1..5 scale, per level apart
    # Stage 1's training crops in every batch beside the groups, with their MSE: without them the
    # held-out crops' SRCC fell from 0.80 to 0.73 in 8 epochs.
    stage1_per_batch: int = 32
    # Whole-photograph groups (data.whole_photo_group): one in every `whole_every` batches, its
    # six versions scored as the scorer scores a photograph (the mean of its 16 views), with the
    # same hinge on their order times `whole_weight`, and the MSE of those six scores against
    # their labels (data.whole_photo_views) times `whole_mse_weight`: the hinge alone orders each
    # photograph's versions but leaves photographs free to drift apart. 0: none. With them, 6
    # epochs rank whole photographs better than 10 without (blur pooled 0.605 -> 0.648, JPEG
    # 0.888 -> 0.910) and the held-out crops too (0.811 -> 0.822); one in 2 ranked them alike.
    # 800 rather than 400 (and 3 more photographs): blur 0.951 / 0.648 -> 0.970 / 0.664 within /
    # pooled, JPEG pooled 0.910 -> 0.896, held-out crops 0.822 -> 0.805.
    whole_groups: int = 800
    whole_every: int = 4
    whole_weight: float = 2.0
    whole_mse_weight: float = 2.0


def group_tensors(groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 pixels [G, 6, 3, H, W], labels [G, 6], levels [G, 6])."""
    pixels = torch.from_numpy(np.stack([[s.image for s in g] for g in groups])).permute(0, 1, 4, 2, 3).contiguous()
    labels = torch.tensor([[s.label for s in g] for g in groups], dtype=torch.float32)
    levels = torch.tensor([[s.level for s in g] for g in groups])
    return pixels, labels, levels


def load_groups(seed: int, count: int, workers: int, data_cache: Path | None, log):
    cached = data_cache / f"groups-v{data.DATA_VERSION}.{data.GROUPS_VERSION}-{seed}-{count}.npz" if data_cache else None
    if cached is not None and cached.is_file():
        with np.load(cached) as z:
            log(f"training groups read from {cached}")
            return torch.from_numpy(z["pixels"]), torch.from_numpy(z["labels"]), torch.from_numpy(z["levels"])
    log(f"making {count} training groups ({workers} processes)")
    pixels, labels, levels = group_tensors(data.training_groups(seed, count, workers=workers))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, pixels=pixels.numpy(), labels=labels.numpy(), levels=levels.numpy())
    return pixels, labels, levels


def load_whole_groups(seed: int, count: int, workers: int, data_cache: Path | None, log) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 views [count, 6, 16, 3, H, W], their labels [count, 6])."""
    name = f"whole-v{data.DATA_VERSION}.{data.GROUPS_VERSION}.{data.WHOLE_VERSION}-{seed}-{count}"
    cached = (data_cache / f"{name}.npy", data_cache / f"{name}-labels.npy") if data_cache else None
    if cached is not None and all(path.is_file() for path in cached):
        log(f"whole-photograph groups read from {cached[0]}")
        views, labels = np.load(cached[0]), np.load(cached[1])
    else:
        log(f"making {count} whole-photograph groups ({workers} processes)")
        views, labels = data.whole_photo_groups(seed, count, workers=workers)
        if cached is not None:
            data_cache.mkdir(parents=True, exist_ok=True)
            np.save(cached[0], views)
            np.save(cached[1], labels)
    return torch.from_numpy(views).permute(0, 1, 2, 5, 3, 4), torch.from_numpy(labels)


def pair_hinge(scores: torch.Tensor, levels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over every pair (i, j) of a group with level i < level j of
    relu(margin * (level j - level i) - (score i - score j)): zero once each group is in order,
    with the margin's room between levels."""
    gap = levels[:, None, :] - levels[:, :, None]  # [G, i, j]: level j - level i
    diff = scores[:, :, None] - scores[:, None, :]  # score i - score j
    hinge = F.relu(margin * gap - diff)
    return hinge[gap > 0].mean()


def lr_at(step: int, total: int, recipe) -> float:
    """Linear warm-up to `recipe.lr` over `recipe.warmup_steps`, then a cosine to 0 at `total`
    (both stages: any recipe with those two fields)."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def finetune(model: RaliModel, pre: Preprocessor, recipe: RankingRecipe, seed: int, heldout, stage1, workers: int = 2,
             data_cache: Path | None = None, log=print) -> dict:
    """Fine-tune `model` in place (module doc); `stage1`: stage 1's training crops and labels
    (uint8 [N, 3, H, W], [N]). Returns the history and times."""
    t0 = time.perf_counter()
    pixels, labels, levels = load_groups(seed, recipe.groups, workers, data_cache, log)
    whole, whole_labels = load_whole_groups(seed, recipe.whole_groups, workers, data_cache, log) if recipe.whole_groups else (None, None)
    whole_levels = torch.arange(whole.shape[1])[None] if whole is not None else None
    data_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed)
    encoder, head = model.encoder.float().train(), model.head.float()
    head_params = {name: torch.nn.Parameter(getattr(head, name).detach().clone()) for name in HEAD_TENSORS}
    decay = [p for n, p in encoder.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in encoder.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay + list(head_params.values()), "weight_decay": 0.0}], lr=recipe.lr)

    def score(x: torch.Tensor) -> torch.Tensor:
        p = head_params
        return rali_head_torch(encoder.class_token(x), p["weight"], p["bias"], p["prototypes"], p["proto_scores"],
                               p["logit_scale"], head.ln_eps)

    heldout_pixels = torch.from_numpy(np.stack([s.image for s in heldout])).permute(0, 3, 1, 2)
    heldout_labels = [s.label for s in heldout]
    steps = len(pixels) // recipe.groups_per_batch
    total, step, history, t1 = steps * recipe.epochs, 0, [], time.perf_counter()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(pixels), generator=gen)
        running = [0.0, 0.0, 0.0, 0.0]
        for b in range(steps):
            idx = order[b * recipe.groups_per_batch:(b + 1) * recipe.groups_per_batch]
            x = pixels[idx].flatten(0, 1)
            with_whole = whole is not None and step % recipe.whole_every == 0
            if with_whole:  # a random whole photograph's six versions, 16 views each
                pick = int(torch.randint(len(whole), (1,), generator=gen))
                x = torch.cat([x, whole[pick].flatten(0, 1)])
            # One of the 8 flips and quarter turns per batch: they keep a 128-pixel view's blocks
            # on the 16-pixel grid.
            x = x.rot90(int(torch.randint(4, (1,), generator=gen)), dims=(-2, -1))
            if torch.rand(1, generator=gen) < 0.5:
                x = x.flip(-1)
            extra = torch.randint(len(stage1[0]), (recipe.stage1_per_batch,), generator=gen)
            both = score(pre.normalize_uint8(torch.cat([x, stage1[0][extra]])))
            n = len(idx) * labels.shape[1]
            s = both[:n].view(len(idx), -1)
            mse = F.mse_loss(s, labels[idx])
            rank = pair_hinge(s, levels[idx], recipe.margin)
            loss = mse + recipe.rank_weight * rank
            if with_whole:
                photo = both[n:len(x)].view(1, whole.shape[1], -1).mean(-1)  # each version's score: its views' mean
                whole_rank = pair_hinge(photo, whole_levels, recipe.margin)
                whole_mse = F.mse_loss(photo[0], whole_labels[pick])
                loss = loss + recipe.whole_weight * whole_rank + recipe.whole_mse_weight * whole_mse
                running[2] += whole_rank.item()
                running[3] += whole_mse.item()
            if recipe.stage1_per_batch:
                loss = loss + F.mse_loss(both[len(x):], stage1[1][extra])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, recipe)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            opt.step()
            running[0] += mse.item()
            running[1] += rank.item()
            step += 1
        encoder.eval()
        with torch.no_grad():
            pred = torch.cat([score(pre.normalize_uint8(heldout_pixels[i:i + 256]))
                              for i in range(0, len(heldout_pixels), 256)]).tolist()
        encoder.train()
        m = correlations(pred, heldout_labels)
        whole_steps = max(1, math.ceil(steps / recipe.whole_every)) if whole is not None else 1
        history.append({"epoch": epoch + 1, "mse": running[0] / steps, "pair_hinge": running[1] / steps,
                        **({"whole_hinge": running[2] / whole_steps, "whole_mse": running[3] / whole_steps}
                           if whole is not None else {}),
                        "heldout_srcc": m.srcc, "seconds": time.perf_counter() - t1})
        log(f"ranking epoch {epoch + 1}/{recipe.epochs}: MSE {running[0] / steps:.4f}, pair hinge "
            f"{running[1] / steps:.4f}, "
            + (f"whole-photograph hinge {running[2] / whole_steps:.4f}, MSE {running[3] / whole_steps:.4f}, "
               if whole is not None else "")
            + f"held-out SRCC {m.srcc:.4f}, {time.perf_counter() - t1:.0f} s")
    with torch.no_grad():
        for name, p in head_params.items():
            getattr(head, name).copy_(p)
    model.eval()
    return {"recipe": asdict(recipe), "history": history, "data_s": data_s, "train_s": time.perf_counter() - t1}

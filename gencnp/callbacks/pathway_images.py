"""``PathwayImageLogger``: pathway pictures during training and validation, sent to whichever logger is active.

Every ``every_n_val``-th validation run (the first included; every ``trainer.validate`` call) the callback
explains up to ``max_samples`` validation images with the model's own ``explain`` and ``controls`` (docs/design.md
sections 5 and 8), and logs:

- ``pathway_frequency``: per tap, a class-by-channel heatmap of how often each channel is in the pathway;
- ``pathway_gradients``: for ``grid_samples`` images, the input, the input gradient of the unmasked target, the
  pathway gradient and Grad-CAM through the image's pathway (``gencnp.pathways.gradients``);
- ``pathway_per_class``: per class, the kept fraction, acIOU, agreement and the swap/zero forcing controls.

Where they go: CSV (and any logger with a ``log_dir``): PNG, CSV and Markdown files under
``<log_dir>/pathway_images/``; TensorBoard: ``add_image`` and a Markdown ``add_text`` table; W&B: ``log_image``
and a ``wandb.Table``; no logger: ``<default_root_dir>/pathway_images/``. Gradients are taken under
``torch.enable_grad()`` (and outside inference mode), so it works inside ``fit`` and ``trainer.validate``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from gencnp.pathways.baselines import grad_enabled, plain
from gencnp.pathways.gradients import grad_cam, pathway_gradient
from gencnp.pathways.metrics import class_iou, per_sample

__all__ = ["PathwayImageLogger", "frequency_figure", "gradient_figure", "class_table", "TABLE_COLUMNS"]

TABLE_COLUMNS = ["class", "n", "kept_mean", "acIOU", "agreement", "swap_forcing", "zero_forcing"]
# Per-class sums, in this order: samples, kept fraction, agreeing, swap forced, swap valid, zero forced.
_SUMS = ("n", "kept", "agree", "swap_forced", "swap_n", "zero_forced")


class PathwayImageLogger(L.Callback):
    """Log pathway pictures and a per-class table every ``every_n_val`` validation runs.

    Args:
        every_n_val: log on validation runs 1, 1 + N, 1 + 2N, ... of a fit (sanity checks excluded); every
            ``trainer.validate`` call logs.
        max_samples: validation images explained per logged run (all when ``None``); the extra cost is one
            ``explain`` plus ``controls`` pass over them.
        grid_samples: images in the gradient grid (spread over classes, in loader order).
        subdir: folder under the logger's directory for file output (CSV and other file loggers).
        dpi: resolution of the pictures.

    Needs a ``GenCNP``-like module: ``explain(x, labels)``, ``controls(x, ex)``, ``target`` (a ``FrozenTarget``)
    and ``fills()``. Under several processes, the per-class counts and rates are summed over all ranks; acIOU and
    the gradient grid use rank 0's images.
    """

    def __init__(
        self,
        every_n_val: int = 1,
        max_samples: int | None = 1000,
        grid_samples: int = 8,
        subdir: str = "pathway_images",
        dpi: int = 100,
    ):
        super().__init__()
        if every_n_val < 1:
            raise ValueError(f"every_n_val must be >= 1, got {every_n_val}.")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None (all validation images), got {max_samples}.")
        if grid_samples < 0:
            raise ValueError(f"grid_samples must be >= 0 (0: no gradient grid), got {grid_samples}.")
        self.every_n_val = every_n_val
        self.max_samples = max_samples
        self.grid_samples = grid_samples
        self.subdir = subdir
        self.dpi = dpi
        self.runs_seen = 0
        self.written: list[str] = []  # files written (file loggers), for users and tests
        self._active = False

    # ----- when -----
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        missing = [a for a in ("explain", "controls", "target", "fills") if not hasattr(pl_module, a)]
        if missing:
            raise TypeError(
                f"PathwayImageLogger needs a GenCNP model (with explain, controls, target, fills); "
                f"{type(pl_module).__name__} lacks {', '.join(missing)}. Remove the callback from this config."
            )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = False
        if trainer.sanity_checking:
            return
        self.runs_seen += 1
        validating = trainer.state.fn == "validate"
        self._active = validating or (self.runs_seen - 1) % self.every_n_val == 0
        if self._active:
            k, d = pl_module.num_classes, pl_module.target.num_channels
            self._counts = torch.zeros(k, d, dtype=torch.float64)
            self._sums = torch.zeros(k, len(_SUMS), dtype=torch.float64)
            self._paths: list[torch.Tensor] = []
            self._classes: list[torch.Tensor] = []
            self._grid: list[dict[str, torch.Tensor]] = []
            self._seen = 0

    # ----- what -----
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:
            return
        room = len(batch[0]) if self.max_samples is None else min(len(batch[0]), self.max_samples - self._seen)
        if room <= 0:
            return
        x = batch[0][:room]
        labels = batch[1][:room] if len(batch) > 1 and torch.is_tensor(batch[1]) else None
        with torch.no_grad():
            ex = pl_module.explain(x, labels)
            ctrl = pl_module.controls(x, ex)
        v = per_sample(ex["logits"], ex["masked_logits"], ex["y_hat"], ex["pathway"], labels, **ctrl)
        y = ex["y_hat"].long().cpu()
        path = ex["pathway"].bool().cpu()
        self._counts.index_add_(0, y, path.double())
        cols = [
            torch.ones(len(y), dtype=torch.float64),
            v["kept"],
            v["agree"],
            v["swap_forced"],
            (~torch.isnan(v["swap_forced"])).double(),
            v["zero_forced"],
        ]
        self._sums.index_add_(0, y, torch.nan_to_num(torch.stack([c.cpu().double() for c in cols], 1), nan=0.0))
        self._paths.append(path)
        self._classes.append(y)
        self._seen += room
        if len(self._grid) < 4 * max(self.grid_samples, 1):  # a pool to pick classes from; small
            for i in range(room):
                self._grid.append(
                    {
                        "x": plain(x[i]).cpu(),
                        "y_hat": ex["y_hat"][i].cpu(),
                        "pathway": path[i],
                        "label": labels[i].cpu() if labels is not None else None,
                        "kept": float(v["kept"][i]),
                    }
                )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        counts, sums = self._counts, self._sums
        if trainer.world_size > 1:
            packed = torch.cat([counts, sums], 1).to(pl_module.device)
            packed = trainer.strategy.reduce(packed, reduce_op="sum").cpu()
            counts, sums = packed[:, : counts.shape[1]], packed[:, counts.shape[1] :]
        if not trainer.is_global_zero:
            return
        if float(sums[:, 0].sum()) == 0:
            rank_zero_warn("PathwayImageLogger saw no validation images; nothing logged.")
            return
        names = _class_names(trainer, pl_module.num_classes)
        target = pl_module.target
        pathways, classes = torch.cat(self._paths), torch.cat(self._classes)
        rows = class_table(sums, pathways, classes, names)
        step, epoch = trainer.global_step, trainer.current_epoch
        what = "validate" if trainer.state.fn == "validate" else "fit"
        title = f"{what}, epoch {epoch}, step {step}, {int(sums[:, 0].sum())} validation images"
        figures = {
            "frequency": frequency_figure(
                counts,
                sums[:, 0],
                target.tap_names,
                target.tap_channels,
                names,
                title,
                getattr(pl_module.hparams, "class_source", "pred"),
            )
        }
        picks = _pick_grid(self._grid, self.grid_samples)
        if picks:
            figures["gradients"] = gradient_figure(pl_module, picks, names, title)
        self._grid = []
        self._emit(trainer, figures, rows, what, epoch, step)

    # ----- where -----
    def _emit(self, trainer: L.Trainer, figures: dict, rows: list[list], what: str, epoch: int, step: int) -> None:
        images = {name: _to_array(fig, self.dpi) for name, fig in figures.items()}
        file_dirs = []
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                for name, arr in images.items():
                    lg.log_image(f"pathway_{name}", [arr], step=step, caption=[f"{what} epoch {epoch} step {step}"])
                lg.log_table("pathway_per_class", columns=TABLE_COLUMNS, data=rows, step=step)
            elif isinstance(lg, TensorBoardLogger):
                for name, arr in images.items():
                    lg.experiment.add_image(f"pathway_{name}", arr, global_step=step, dataformats="HWC")
                lg.experiment.add_text("pathway_per_class", _markdown(rows), global_step=step)
            else:
                folder = getattr(lg, "log_dir", None) or getattr(lg, "save_dir", None)
                if folder is not None:
                    file_dirs.append(Path(folder))
        if not trainer.loggers:
            file_dirs.append(Path(trainer.default_root_dir))
        for folder in dict.fromkeys(file_dirs):
            out = folder / self.subdir
            out.mkdir(parents=True, exist_ok=True)
            stem = f"{what}_epoch{epoch:03d}_step{step:06d}"
            for name, fig in figures.items():
                path = out / f"{stem}_{name}.png"
                fig.savefig(path, dpi=self.dpi, bbox_inches="tight", pad_inches=0.1)
                self.written.append(str(path))
            with open(out / f"{stem}_per_class.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(TABLE_COLUMNS)
                w.writerows(rows)
            (out / f"{stem}_per_class.md").write_text(_markdown(rows) + "\n", encoding="utf-8")
            self.written += [str(out / f"{stem}_per_class.csv"), str(out / f"{stem}_per_class.md")]

    def state_dict(self) -> dict[str, Any]:
        return {"runs_seen": self.runs_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs_seen = int(state_dict.get("runs_seen", 0))


# ----- helpers: the table and the pictures (pure functions of tensors) -----
def _class_names(trainer: L.Trainer, k: int) -> list[str]:
    dm = getattr(trainer, "datamodule", None)
    names = list(getattr(dm, "class_names", None) or [])
    return names if len(names) == k else [str(c) for c in range(k)]


def class_table(sums: torch.Tensor, pathways: torch.Tensor, classes: torch.Tensor, names: list[str]) -> list[list]:
    """Rows of ``TABLE_COLUMNS``: one per class with images, then ``all``.

    Args:
        sums: ``[K, 6]`` per-class sums in the order ``n, kept, agree, swap_forced, swap_n, zero_forced``.
        pathways: ``[N, D]`` bool pathways (acIOU); classes: ``[N]`` their class source.
        names: ``K`` class names.
    """

    def rate(a: float, b: float) -> float:
        return round(a / b, 4) if b > 0 else float("nan")

    rows = []
    for c, name in enumerate(names):
        n, kept, agree, swap, swap_n, zero = sums[c].tolist()
        if n == 0:
            continue
        sel = classes == c
        ac = class_iou(pathways[sel], classes[sel])[0] if int(sel.sum()) >= 2 else float("nan")
        rows.append(
            [
                name,
                int(n),
                rate(kept, n),
                round(ac, 4) if ac == ac else ac,
                rate(agree, n),
                rate(swap, swap_n),
                rate(zero, n),
            ]
        )
    t = sums.sum(0).tolist()
    ac_all = class_iou(pathways, classes)[0]
    rows.append(
        [
            "all",
            int(t[0]),
            rate(t[1], t[0]),
            round(ac_all, 4) if ac_all == ac_all else ac_all,
            rate(t[2], t[0]),
            rate(t[3], t[4]),
            rate(t[5], t[0]),
        ]
    )
    return rows


def _markdown(rows: list[list]) -> str:
    def cell(v):
        return "-" if isinstance(v, float) and v != v else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def frequency_figure(
    counts: torch.Tensor,
    n: torch.Tensor,
    tap_names: list[str],
    tap_channels: list[int],
    class_names: list[str],
    title: str = "",
    class_source: str = "pred",
):
    """Per tap, a class-by-channel heatmap of selection frequencies ``counts[c] / n[c]`` (one shared colour bar).

    Taps are stacked top to bottom (shallow first), each panel as wide as the figure, so the cells stay readable for
    wide taps (a 128- or 512-channel block) instead of shrinking as the taps are laid side by side.

    Args:
        counts: ``[K, D]`` how many of class c's pathways keep channel j; n: ``[K]`` images per class.
    """
    import matplotlib  # matplotlib only when a figure is drawn
    from matplotlib.figure import Figure

    counts, n = counts.double(), n.double()
    freq = (counts / n.clamp_min(1)[:, None]).numpy()
    freq[n.numpy() == 0] = np.nan  # classes without images: grey rows
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    k = freq.shape[0]
    rows = [f"{nm} (n={int(m)})" for nm, m in zip(class_names, n.tolist())]
    source = "target prediction" if class_source == "pred" else "label"
    panel = 0.9 + 0.2 * k  # inches per tap: title, x label and k rows
    fig = Figure(figsize=(11.0, 0.7 + panel * len(tap_names)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(tap_names), 1))
    start, im = 0, None
    for ax, name, c in zip(axes, tap_names, tap_channels):
        part = freq[:, start : start + c]
        kept = float(counts[:, start : start + c].sum() / max(float(n.sum()) * c, 1.0))
        start += c
        im = ax.imshow(part, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"tap {name}: {c} channels, kept {kept:.2f} on average", fontsize=9, loc="left")
        ax.set_xlabel(f"channel of {name}", fontsize=8)
        ax.set_yticks(range(k), rows, fontsize=8 if k <= 20 else 6)
        ax.set_ylabel(f"class\n({source})", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    cb = fig.colorbar(im, ax=list(axes), fraction=0.025, pad=0.01, aspect=max(20, 12 * len(tap_names)))
    cb.set_label("selection frequency (share of the class's pathways keeping it)", fontsize=8)
    cb.ax.tick_params(labelsize=8)
    empty = "; grey rows: classes without images" if bool((n == 0).any()) else ""
    fig.suptitle(f"Pathway frequency per class and channel ({title}{empty})", fontsize=10)
    return fig


def gradient_figure(pl_module, picks: list[dict], class_names: list[str], title: str = ""):
    """Rows of input | input gradient of the unmasked target | pathway gradient | Grad-CAM through the pathway.

    Each row's two gradient maps share one signed scale (its largest magnitude), so the pathway's effect on the
    attribution is visible; Grad-CAM is scaled to its maximum.
    """
    from matplotlib import cm  # matplotlib only when a figure is drawn
    from matplotlib import colors as mcolors
    from matplotlib.figure import Figure

    target = pl_module.target
    dev = pl_module.device
    # Validation hooks run under no_grad (or inference mode): gradients on, and plain tensors autograd can save.
    with grad_enabled():
        x = plain(torch.stack([p["x"] for p in picks]).to(dev))
        y = plain(torch.stack([p["y_hat"] for p in picks]).long().to(dev))
        path = plain(torch.stack([p["pathway"] for p in picks]).to(dev).float())
        fill = pl_module.fills()
        fill = [plain(f) for f in fill] if fill is not None else None
        g0 = pathway_gradient(target, x, None, y).cpu()
        g1 = pathway_gradient(target, x, path, y, fill=fill).cpu()
        cam = grad_cam(target, x, path, y, fill=fill).cpu()
    scale = torch.maximum(g0.flatten(1).abs().amax(1), g1.flatten(1).abs().amax(1)).clamp_min(1e-12)[:, None, None]
    g0, g1 = g0 / scale, g1 / scale
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    n = len(picks)
    fig = Figure(figsize=(7.6, 1.5 * n + 1.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, 4))
    heads = ["input", "gradient, unmasked", "gradient, pathway", "Grad-CAM, pathway"]
    for i, p in enumerate(picks):
        img = p["x"]
        show = img[0] if img.shape[0] == 1 else ((img - img.min()) / (img.max() - img.min() + 1e-12)).permute(1, 2, 0)
        cells = [
            (show, {"cmap": "gray"} if img.shape[0] == 1 else {}),
            (g0[i], {"cmap": "RdBu_r", "vmin": -1, "vmax": 1}),
            (g1[i], {"cmap": "RdBu_r", "vmin": -1, "vmax": 1}),
            (cam[i], {"cmap": "inferno", "vmin": 0, "vmax": 1}),
        ]
        for j, (data, kw) in enumerate(cells):
            ax = axes[i, j]
            ax.imshow(data.numpy(), **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(heads[j], fontsize=8)
        label = f"\nlabel {class_names[int(p['label'])]}" if p["label"] is not None else ""
        axes[i, 0].set_ylabel(f"pred {class_names[int(p['y_hat'])]}{label}\nkept {p['kept']:.2f}", fontsize=7)
    fig.colorbar(
        cm.ScalarMappable(mcolors.Normalize(-1, 1), "RdBu_r"),
        ax=axes[:, 1:3],
        location="bottom",
        shrink=0.8,
        aspect=30,
        label="dS(y)/dx, signed (per row, one scale)",
    )
    fig.colorbar(
        cm.ScalarMappable(mcolors.Normalize(0, 1), "inferno"),
        ax=axes[:, 3],
        location="bottom",
        shrink=0.9,
        aspect=15,
        label="Grad-CAM (per row)",
    )
    fig.suptitle(f"Attribution through pathways ({title})", fontsize=9)
    return fig


def _pick_grid(pool: list[dict], k: int) -> list[dict]:
    """Up to ``k`` samples, round-robin over predicted classes in pool order."""
    if k == 0 or not pool:
        return []
    by_class: dict[int, list[dict]] = {}
    for p in pool:
        by_class.setdefault(int(p["y_hat"]), []).append(p)
    out, depth = [], 0
    while len(out) < k and depth < len(pool):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(out) < k:
                out.append(by_class[c][depth])
        depth += 1
    return out


def _to_array(fig, dpi: int) -> np.ndarray:
    """A matplotlib figure as an RGB ``uint8 [H, W, 3]`` array (PNG round trip: same look as the files)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))

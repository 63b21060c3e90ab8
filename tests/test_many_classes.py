"""1,000 classes: figures keep a readable number of named rows, per-class tables go to files, costs stay linear."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gencnp import GenCNP, PathwayBank
from gencnp.banks import bank as BK
from gencnp.data.shaped import ShapedImages
from gencnp.evaluation.report import figures as FG
from gencnp.evaluation.report.classes import class_table, summary_lines, table_summary, write_class_table
from gencnp.evaluation.report.results import Results
from gencnp.io.class_views import MAX_ROWS, shown_classes

K = 1000
NAMES = [f"n{k:05d}_cls" for k in range(K)]


def big_bank(tau: float | None = 0.5) -> PathwayBank:
    bank = PathwayBank(NAMES, ["a", "b"], [8, 16], "tiny_cnn", "h", tau=tau)
    g = torch.Generator().manual_seed(0)
    density = torch.linspace(0.05, 0.95, K)  # class c keeps a share rising with c
    classes = torch.arange(K).repeat(20)
    bank.update(torch.rand(len(classes), 24, generator=g) < density[classes, None], classes)
    return bank


@pytest.fixture
def drawn(monkeypatch):
    """Every figure saved through figures/banks, with the texts it shows (tick labels, titles)."""
    seen = {}
    real = FG.save_figure

    def capture(fig, path, **kw):
        texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        seen[str(path)] = texts
        return real(fig, path, **kw)

    monkeypatch.setattr(FG, "save_figure", capture)
    monkeypatch.setattr(BK, "save_figure", capture)
    return seen


def png_side(path) -> int:
    with Image.open(path) as im:
        return max(im.size)


def shown_names(texts: list[str]) -> set[str]:
    return {n for n in NAMES if any(n in t for t in texts)}


def test_shown_classes_keeps_the_extremes_and_says_so():
    assert shown_classes([0.3, 0.1], "x") == ([0, 1], "")
    v = np.arange(100, dtype=float)
    v[5] = np.nan
    rows, note = shown_classes(v, "agreement", limit=6)
    assert rows == [99, 98, 97, 2, 1, 0] and "3 with the lowest agreement, of 100" in note


def test_report_bank_heatmap_at_1000_classes_is_readable_and_names_its_rows(tmp_path, drawn):
    bank = big_bank()
    png = FG.plot_bank(tmp_path / "bank.png", bank)
    assert png_side(png) <= 4000
    names = shown_names(drawn[png])
    assert len(names) == MAX_ROWS  # the densest and sparsest class pathways, by name
    kept = bank.class_pathways().double().mean(1)
    shown_kept = sorted(float(kept[NAMES.index(n)]) for n in names)
    others = [float(kept[c]) for c in range(K) if NAMES[c] not in names]
    assert shown_kept[0] <= min(others) and shown_kept[-1] >= max(others)  # the extremes are the ones drawn
    assert shown_kept[0] < 0.2 and shown_kept[-1] > 0.8
    assert any("of 1000" in t for t in drawn[png])


def test_inspect_bank_at_1000_classes_prints_a_summary_and_writes_the_table(tmp_path, drawn, capsys):
    path = big_bank().save(tmp_path / "big.safetensors")
    png = BK.inspect_bank(str(path), out_dir=str(tmp_path / "out"))
    printed = capsys.readouterr().out
    assert png_side(png) <= 4000 and len(shown_names(drawn[png])) == MAX_ROWS
    assert len(printed.splitlines()) < MAX_ROWS + 20 and len(shown_names([printed])) == MAX_ROWS
    table = json.loads((tmp_path / "out" / "big_classes.json").read_text())
    assert list(table) == NAMES and table[NAMES[3]]["n"] == 20


def test_attribution_grid_at_1000_classes_shows_a_few_named_rows(tmp_path, drawn):
    torch.manual_seed(0)
    model = GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=K,
        image_size=16,
        generator={"d": 8},
        controls={"swap_probes_per_class": 1},
        ablation="zero",
    ).eval()
    data = ShapedImages(300, num_classes=K, image_size=16, in_chans=1)
    x = torch.stack([data[i][0] for i in range(300)])
    ex = model.explain(x)
    y_hat = torch.arange(300) * 3 % K  # 300 distinct predicted classes
    png = FG.plot_attribution(
        tmp_path / "grid.png", model, data, y_hat, y_hat, ex["pathway"], None, NAMES, 1, None, "cpu"
    )
    assert png_side(png) <= 4000
    names = {n for n in shown_names(drawn[png]) if any(f"pred: {n}" == t for t in drawn[png])}
    assert len(names) == FG.GRID_CLASSES


def loop_table(vals, classes, k):
    rows = []
    for c in range(k):
        sel = [i for i in range(len(classes)) if classes[i] == c and not np.isnan(vals[i])]
        rows.append(None if not sel else float(np.mean([vals[i] for i in sel])))
    return rows


def test_per_class_table_equals_a_loop_and_goes_to_csv_and_json(tmp_path):
    g = torch.Generator().manual_seed(0)
    r = Results("gencnp", "s", "all")
    classes = torch.randint(0, 7, (200,), generator=g)
    swap = torch.rand(200, generator=g, dtype=torch.float64)
    swap[::3] = float("nan")
    vals = {"agree": (torch.rand(200, generator=g) > 0.3).double(), "swap_forced": swap}
    r.add(torch.arange(200), vals, torch.zeros(200, 4), classes, 1.0)
    r.finish()
    names = [f"c{i}" for i in range(8)]  # class 7 has no image
    rows = class_table({"gencnp": r}, names)
    agree = [row["gencnp/agreement"] for row in rows]
    assert agree[:7] == pytest.approx(loop_table(vals["agree"].tolist(), classes.tolist(), 8)[:7]) and agree[7] is None
    got = [row["gencnp/swap_forcing"] for row in rows]
    ref = loop_table(swap.tolist(), classes.tolist(), 8)
    assert got[7] is None and ref[7] is None and got[:7] == pytest.approx(ref[:7])
    files = write_class_table(tmp_path / "per_class", rows)
    assert (tmp_path / files["csv"]).read_text().splitlines()[0].startswith("class,name,n,gencnp/agreement")
    assert len(json.loads((tmp_path / files["json"]).read_text())) == 8
    s = table_summary(rows, "gencnp/agreement", n=2)
    assert s["classes"] == 7 and s["classes_without_images"] == 1
    assert s["lowest"][0]["gencnp/agreement"] == min(agree[:7]) and s["highest"][0]["gencnp/agreement"] == max(
        agree[:7]
    )
    lines = summary_lines(s, files)
    assert len(lines) == 4 and "per_class.csv" in lines[-1]

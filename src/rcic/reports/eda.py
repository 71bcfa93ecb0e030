"""``rcic eda``: an HTML report of a dataset (PNG folder, packed store, or CSVs without images)."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rcic.errors import DataError  # noqa: E402
from rcic.io.images import to_rgb  # noqa: E402
from rcic.io.metadata import Dataset  # noqa: E402
from rcic.reports.html import figure, note, page, save_figure, section, table, write_page  # noqa: E402
from rcic.store.source import ImageSource  # noqa: E402

ROWS = "ABCDEFGHIJKLMNOP"
TYPE_CODE = {"treatment": 1, "positive_control": 2, "negative_control": 3}
SITES_PER_EXPERIMENT = 8  # sampled for intensity distributions when reading PNGs


def images_available(source: ImageSource) -> str | None:
    """None if sites can be read, else why not (one line)."""
    first = source.dataset.sites.iloc[0]
    try:
        source.read_site(first)
    except DataError as err:
        return str(err)
    return None


def tables_section(ds: Dataset) -> str:
    w = ds.wells
    by = w.groupby(["split", "cell_type", "well_type"]).size().unstack("well_type", fill_value=0).reset_index()
    by["sites"] = ds.sites.groupby(["split", "cell_type"]).size().to_numpy()
    exps = w.groupby(["split", "experiment"]).agg(
        plates=("plate", "nunique"), wells=("id_code", "size"),
        treatments=("well_type", lambda s: int((s == "treatment").sum())),
        controls=("well_type", lambda s: int((s != "treatment").sum()))).reset_index()
    treat = w[w.well_type == "treatment"].groupby(["experiment", "plate"]).size()
    full = int(treat.max()) if len(treat) else 0
    short = treat[treat < full].rename("treatment_wells").reset_index()
    controls = w[w.well_type != "treatment"].groupby(["split", "well_type"]).agg(
        wells=("id_code", "size"), classes=("label", "nunique")).reset_index()
    s = ds.summary()
    overview = pd.DataFrame([{"layout": s["layout"], "train treatment wells": s["train_wells"],
                              "test treatment wells": s["test_wells"], "control wells":
                              s["train_control_wells"] + s["test_control_wells"], "sites": s["sites"],
                              "treatment classes": s["treatment_classes"], "plate groups": s["plate_groups"]}])
    missing = (note("Every plate has the full number of treatment wells.") if short.empty else
               f"<p>{len(short)} plates have fewer than {full} treatment wells:</p>" + table(short))
    return section("Tables", table(overview), "<h3>Wells and sites by split and cell type</h3>", table(by),
                   "<h3>Controls</h3>", table(controls), "<h3>Missing wells</h3>", missing,
                   "<h3>Experiments</h3>", table(exps))


def plate_map_section(ds: Dataset, out: Path) -> str:
    w = ds.wells
    first = w[w.split == "train"].sort_values(["experiment", "plate"]).iloc[0] if (w.split == "train").any() \
        else w.iloc[0]
    plate = w[(w.experiment == first.experiment) & (w.plate == first.plate)]
    grid = np.zeros((16, 24))
    for well, kind in zip(plate.well, plate.well_type):
        grid[ROWS.index(well[0]), int(well[1:]) - 1] = TYPE_CODE[kind]
    fig, ax = plt.subplots(figsize=(9, 5))
    cmap = matplotlib.colors.ListedColormap(["#f2f2f2", "#7fa7d9", "#e07b39", "#3a3a3a"])
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=3)
    ax.set_xticks(range(24), [f"{c:02d}" for c in range(1, 25)], fontsize=7)
    ax.set_yticks(range(16), list(ROWS), fontsize=7)
    handles = [matplotlib.patches.Patch(color=cmap(i), label=t) for i, t in
               enumerate(["empty", "treatment", "positive control", "negative control"])]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4, fontsize=8)
    ax.set_title(f"{first.experiment} plate {first.plate}")
    save_figure(fig, out / "plate_map.png")
    parts = [figure("plate_map.png", f"Plate map of {first.experiment} plate {first.plate}")]

    groups = ds.plate_groups
    if groups.orders:
        exps = sorted(groups.orders)
        orders = np.array([groups.orders[e] for e in exps])
        fig, ax = plt.subplots(figsize=(5, max(2.0, 0.22 * len(exps) + 1)))
        ax.imshow(orders, cmap="tab10", vmin=0, vmax=9, aspect="auto")
        for i, row in enumerate(orders):
            for j, g in enumerate(row):
                ax.text(j, i, str(g), ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(4), [f"plate {p}" for p in range(1, 5)])
        ax.set_yticks(range(len(exps)), exps, fontsize=7)
        ax.set_title("Treatment group on each plate")
        save_figure(fig, out / "plate_groups.png")
        rot = pd.DataFrame({"experiment": exps, "order": ["".join(map(str, groups.orders[e])) for e in exps],
                            "rotation": [groups.rotation(groups.orders[e]) for e in exps]})
        counts = rot.groupby("rotation").size().rename("experiments").reset_index()
        parts += [f"<p>{len(groups.groups)} treatment groups derived from the labels "
                  f"({', '.join(str(len(g)) for g in groups.groups)} treatments); each labelled experiment "
                  "carries them on plates 1-4 in one of the cyclic rotations below.</p>",
                  figure("plate_groups.png", "Group on each plate of each labelled experiment"), table(counts)]
    else:
        parts.append(note("No labelled treatment plates: plate groups cannot be derived."))
    return section("Plate map and plate groups", *parts)


def intensity_section(source: ImageSource, out: Path, progress: Callable[[int, int], None] | None) -> str:
    ds = source.dataset
    sites = ds.sites
    if hasattr(source, "store"):
        stats = source.channel_stats()
        frame = sites[["experiment", "cell_type"]].copy()
        means = stats[..., 0]
    else:  # PNG: a sample of sites per experiment
        rng = np.random.default_rng(0)
        chosen = [index[rng.permutation(len(index))[:SITES_PER_EXPERIMENT]]
                  for index in sites.groupby("experiment").indices.values()]
        picked = sites.iloc[np.sort(np.concatenate(chosen))]
        means = np.zeros((len(picked), 6))
        for i, row in enumerate(picked.to_dict("records")):
            try:
                means[i] = source.read_site(row).reshape(6, -1).mean(1)
            except DataError:
                means[i] = np.nan
            if progress:
                progress(i + 1, len(picked))
        frame = picked[["experiment", "cell_type"]].copy()
    for c in range(6):
        frame[f"w{c + 1}"] = means[:, c]
    frame = frame.dropna()
    if frame.empty:  # images of a few sites only (a sparse download): none of the sampled sites was there
        return section("Channel intensities (the batch effect)",
                       note(f"None of the {len(means)} sampled sites could be read, so this section is left out."))
    experiments = sorted(frame.experiment.unique())
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    colours = {ct: plt.cm.tab10(i) for i, ct in enumerate(sorted(frame.cell_type.unique()))}
    for c, ax in enumerate(axes.flat):
        data = [frame.loc[frame.experiment == e, f"w{c + 1}"].to_numpy() for e in experiments]
        parts = ax.boxplot(data, patch_artist=True, showfliers=False, widths=0.6)
        for patch, e in zip(parts["boxes"], experiments):
            patch.set_facecolor(colours[e.split("-")[0]])
        ax.set_title(f"channel w{c + 1}: mean intensity per site", fontsize=9)
        ax.set_xticks(range(1, len(experiments) + 1), experiments, rotation=90, fontsize=6)
    handles = [matplotlib.patches.Patch(color=v, label=k) for k, v in colours.items()]
    fig.legend(handles=handles, loc="upper right", ncol=len(colours), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(fig, out / "intensity_by_experiment.png")
    by_type = frame.groupby("cell_type")[[f"w{c}" for c in range(1, 7)]].mean().reset_index()
    return section("Channel intensities (the batch effect)",
                   "<p>Each box is one experiment's distribution of per-site mean intensity. Shifts between "
                   "experiments of one cell type are batch effects that normalisation must remove.</p>",
                   figure("intensity_by_experiment.png", "Per-channel mean intensity by experiment"),
                   "<h3>Mean intensity by cell type</h3>", table(by_type, "{:.1f}"))


def _montage(source: ImageSource, rows: list[dict], titles: list[str], path: Path, cols: int) -> int:
    n = len(rows)
    if n == 0:
        return 0
    r = -(-n // cols)
    fig, axes = plt.subplots(r, cols, figsize=(2.2 * cols, 2.35 * r), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    shown = 0
    for ax, row, title in zip(axes.flat, rows, titles):
        try:
            image = source.read_site(row)
        except DataError:
            continue
        ax.imshow(to_rgb(image.transpose(1, 2, 0)))
        ax.set_title(title, fontsize=7)
        shown += 1
    fig.tight_layout()
    save_figure(fig, path)
    return shown


def montage_section(source: ImageSource, out: Path) -> str:
    sites = source.dataset.sites
    site1 = sites[sites.site == 1]
    per_exp = site1.sort_values(["experiment", "plate", "well"]).groupby("experiment").head(1)
    per_exp = per_exp.groupby("cell_type").head(6)
    _montage(source, per_exp.to_dict("records"), [f"{r.experiment} {r.well}" for r in per_exp.itertuples()],
             out / "montage_experiments.png", cols=6)
    parts = [figure("montage_experiments.png", "Colour composites across cell types and experiments")]
    labelled = site1[(site1.well_type == "treatment") & (site1.label != "")]
    if not labelled.empty:
        chosen = sorted(labelled.label.unique(), key=lambda s: (len(s), s))[:4]
        rows = labelled[labelled.label.isin(chosen)].sort_values(["label", "experiment"]).groupby("label").head(5)
        _montage(source, rows.to_dict("records"), [f"siRNA {r.label} · {r.experiment}" for r in rows.itertuples()],
                 out / "montage_sirnas.png", cols=5)
        parts.append(figure("montage_sirnas.png", "A few siRNAs (rows) across experiments"))
    return section("Montages", *parts)


def _dataset_sites_like_real(sites: pd.DataFrame, cell_type: str, count: int) -> pd.DataFrame:
    """Up to ``count`` site-1 sites of a cell type, negative controls first (the real B02 wells are), spread over
    experiments."""
    mine = sites[(sites.cell_type == cell_type) & (sites.site == 1)]
    mine = mine.assign(order=(mine.well_type != "negative_control").astype(int))
    mine = mine.sort_values(["order", "experiment", "plate", "well"], kind="stable")
    return mine.groupby("experiment").head(max(1, count // max(1, mine.experiment.nunique()))).head(count)


def read_real_sites(real_images: str | Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """A few complete real sites per cell type, or a DataError naming the folder."""
    from rcic.synth.intensity import real_sites

    real = real_sites(real_images) if Path(real_images).is_dir() else {}
    if not real:
        raise DataError("holds no real site with all 6 channel PNGs ({experiment}/Plate{p}/{well}_s{s}_w{c}.png)",
                        real_images)
    return real


def synthetic_vs_real_section(source: ImageSource, out: Path, real: dict, real_images: Path) -> str:
    """This dataset's composites next to real ones of the same cell type, through the same official mapping,
    and the per-channel statistics that the synthetic intensities are matched on."""
    from rcic.synth.intensity import STATISTICS, channel_statistics

    cell_types = sorted(source.dataset.sites.cell_type.unique())
    # one column per cell type: this dataset on top, real below (a wide picture, as the README shows it)
    fig, axes = plt.subplots(2, len(cell_types), figsize=(2.6 * len(cell_types), 5.6), squeeze=False)
    rows = []
    for mine_ax, real_ax, cell_type in zip(axes[0], axes[1], cell_types):
        for ax in (mine_ax, real_ax):
            ax.axis("off")
        images, names = [], []
        for row in _dataset_sites_like_real(source.dataset.sites, cell_type, count=8).to_dict("records"):
            try:
                images.append(source.read_site(row))
            except DataError:
                continue
            names.append(f"{row['experiment']} {row['well']}")
        if images:  # the typical one: median composite brightness among the sampled sites
            composites = [to_rgb(im.transpose(1, 2, 0)) for im in images]
            typical = int(np.argsort([c.mean() for c in composites])[(len(composites) - 1) // 2])
            mine_ax.imshow(composites[typical], interpolation="nearest")
            mine_ax.set_title(f"this dataset: {names[typical]}", fontsize=8)
        if cell_type in real:
            name, image = real[cell_type][0]
            composite = to_rgb(image.transpose(1, 2, 0))
            if composite.shape[0] > 256:  # as the figure shows it; drawing 512 px costs seconds
                composite = cv2.resize(composite, (256, 256), interpolation=cv2.INTER_AREA)
            real_ax.imshow(composite)
            real_ax.set_title(f"real: {name}", fontsize=8)
        else:
            real_ax.text(0.5, 0.5, f"no real {cell_type} site\nunder {real_images.name}", ha="center", va="center",
                         fontsize=8, transform=real_ax.transAxes)
        for label, stack in (("this dataset", images), ("real", [im for _, im in real.get(cell_type, [])])):
            if stack:
                median = np.median([channel_statistics(im) for im in stack], axis=0)
                rows += [{"cell_type": cell_type, "channel": f"w{c + 1}", "data": label, "sites": len(stack),
                          **dict(zip(STATISTICS, median[c]))} for c in range(6)]
    fig.tight_layout()
    save_figure(fig, out / "synthetic_vs_real.png")
    stats = pd.DataFrame(rows).assign(saturated=lambda f: f["saturated"] * 100)
    stats = stats.pivot_table(index=["cell_type", "channel"], columns="data", values=list(STATISTICS), sort=False)
    stats.columns = [f"{'saturated %' if stat == 'saturated' else stat} ({data})" for stat, data in stats.columns]
    stats = stats.reset_index()
    intro = ("<p>Composites through the same official 6-channel mapping (Recursion's rxrx1 colours and ranges): a "
             "typical site of this dataset (median composite brightness among up to 8 negative controls) on top, "
             f"real sites from {html.escape(str(real_images))} below. The table gives each channel's median over "
             "the sites of its mean, 1st/50th/99th percentile and share of saturated pixels.</p>")
    return section("This dataset next to real sites", intro,
                   figure("synthetic_vs_real.png", "This dataset (top) and real sites (bottom), per cell type"),
                   table(stats, "{:.1f}"))


REPORT_MARK = "rcic-report.json"  # marks a folder as rcic's own report: only such a folder is overwritten


def check_report_folder(out: Path) -> None:
    """A report goes into a new or empty folder, or replaces an earlier rcic report; nothing else."""
    if out.exists() and not out.is_dir():
        raise DataError("exists and is not a folder; choose another --out", out)
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_MARK).is_file():
        raise DataError("is not empty and holds no earlier rcic report; choose a new or empty folder", out)


def write_eda(source: ImageSource, out: str | Path, progress: Callable[[int, int], None] | None = None,
              real_images: str | Path | None = None) -> Path:
    """Write ``out/index.html`` with its images; returns the page's path. ``real_images``: a folder of real
    RxRx1 PNGs whose composites and channel statistics are shown next to this dataset's."""
    out = Path(out)
    check_report_folder(out)
    real = read_real_sites(real_images) if real_images is not None else None
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_MARK).write_text('{"report": "eda"}\n')
    ds = source.dataset
    sections = [tables_section(ds), plate_map_section(ds, out)]
    missing = images_available(source)
    if missing is None:
        sections += [intensity_section(source, out, progress), montage_section(source, out)]
        if real is not None:
            sections.append(synthetic_vs_real_section(source, out, real, Path(real_images)))
    else:
        text = f"No images could be read, so the image sections are left out ({missing})."
        sections += [section("Channel intensities (the batch effect)", note(text)),
                     section("Montages", note(text))]
    index = out / "index.html"
    write_page(index, page("RxRx1 data report", f"{html.escape(str(ds.root))} · layout {ds.layout}", sections))
    return index

"""The evaluation report of a run directory: ``evaluate/report.md``, a self-contained
``evaluate/report.html`` (its images embedded as base64) and the PNGs under ``evaluate/plots/``.

Everything is read from what the stages wrote (their metrics.jsonl, manifests, saved configs,
image grids, samples.npz and evaluate's metrics.json), so ``latentpipe report RUN_DIR``
rebuilds it without a model or a metric being recomputed. A part whose input is missing (no
labels, a stage skipped in the evaluation) is left out of the report, not an error.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipeline import atomic
from pipeline.errors import LatentpipeError
from pipeline.metrics.features import PREPROCESS
from pipeline.report import plots

REPORT_MD, REPORT_HTML, PLOTS = "report.md", "report.html", "plots"
REPORTED_SECTIONS = {
    "prepare": "data",
    "autoencoder": "autoencoder",
    "encode": "encode",
    "diffusion": "diffusion",
    "sample": "sample",
    "evaluate": "evaluate",
}
"""The config section of each stage that the report shows, read from that stage's own saved
config.yaml (what actually produced the artifact, whatever the current config says)."""
COMMON_CURVES = (
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("images_per_s", "images/s"),
)
AUTOENCODER_CURVES = (
    *COMMON_CURVES,
    ("psnr", "PSNR (dB, train batch)"),
    ("lpips", "LPIPS (train batch)"),
    ("usage", "codebook usage"),
    ("perplexity", "codebook perplexity"),
)
GRID_SAMPLES = 64
"""Samples shown in the labelled grid (the full set is in sample/grid.png and samples.npz)."""


class ReportError(LatentpipeError):
    """The directory holds no evaluation to report on."""


@dataclass(frozen=True)
class Block:
    """One piece of the document: kind is heading, text, image (text: caption, path: the PNG),
    link (text, href: a file of the run directory, relative to the report), table (rows, the
    first one the header) or code."""

    kind: str
    text: str = ""
    path: Path | None = None
    href: str = ""
    rows: tuple[tuple[str, ...], ...] = ()


def build(run_dir: str | Path) -> Path:
    """Write report.md, report.html and the plots into ``run_dir/evaluate``; returns report.md."""
    run_dir = Path(run_dir)
    out = run_dir / "evaluate"
    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        raise ReportError(
            f"{metrics_file} does not exist: run `latentpipe evaluate` first (the report shows the metrics it computed)"
        )
    metrics = json.loads(metrics_file.read_text())
    (out / PLOTS).mkdir(exist_ok=True)
    sections = _saved_sections(run_dir)
    name = sections.get("experiment", {}).get("name", run_dir.name)
    blocks = [Block("heading", f"{name}: evaluation")]
    blocks += _samples(run_dir, out, metrics)
    blocks += _metric_table(metrics, out)
    blocks += _training(run_dir, out)
    blocks += [
        Block("heading", "Configuration (each section as saved by the stage that used it)"),
        Block(
            "code", yaml.safe_dump({k: v for k, v in sections.items() if k != "experiment"}, sort_keys=False).rstrip()
        ),
    ]
    atomic.write_text(out / REPORT_MD, _markdown(blocks, out))
    atomic.write_text(out / REPORT_HTML, _html(blocks, name))
    return out / REPORT_MD


def _saved_sections(run_dir: Path) -> dict:
    found = {}
    for stage, section in REPORTED_SECTIONS.items():
        path = run_dir / stage / "config.yaml"
        if path.is_file():
            saved = yaml.safe_load(path.read_text())
            found[section] = saved[section]
            found.setdefault("experiment", saved.get("experiment", {}))
    return found


def _class_names(run_dir: Path) -> list[str]:
    path = run_dir / "prepare" / "manifest.json"
    return list(json.loads(path.read_text()).get("classes") or []) if path.is_file() else []


def _samples(run_dir: Path, out: Path, metrics: dict) -> list[Block]:
    blocks = [Block("heading", "Samples")]
    samples = run_dir / "sample" / "samples.npz"
    if samples.is_file():
        with np.load(samples) as data:
            images, labels = data["images"][:GRID_SAMPLES], data["labels"][:GRID_SAMPLES]
        names = _class_names(run_dir)
        captions = None if (labels < 0).all() else [names[c] if 0 <= c < len(names) else str(c) for c in labels]
        path = plots.image_grid(
            images,
            captions,
            columns=min(8, len(images)),
            title="samples" + (" (each with the class it was generated for)" if captions else ""),
            path=out / PLOTS / "samples.png",
        )
        blocks.append(
            Block("image", f"The first {len(images)} of {metrics.get('samples', len(images))} samples", path=path)
        )
    if (run_dir / "sample" / "grid.png").is_file():
        blocks.append(Block("link", "All samples (sample/grid.png)", href="../sample/grid.png"))
    return blocks


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _metric_table(metrics: dict, out: Path) -> list[Block]:
    scalars = tuple((k, _value(v)) for k, v in metrics.items() if not isinstance(v, dict))
    blocks = [Block("heading", "Metrics"), Block("table", rows=(("metric", "value"), *scalars))]
    bars = {}
    if "fid" in metrics:
        bars["FID (vs real val)"] = ("samples", metrics["fid"], metrics.get("fid_train_vs_val"))
    if "kid" in metrics:
        bars["KID (vs real val)"] = ("samples", metrics["kid"], None)
    if "rfid" in metrics:
        bars["rFID (vs real val)"] = ("reconstructions", metrics["rfid"], None)
    if bars:
        blocks.append(
            Block(
                "image",
                "FID and KID of the samples; green: the floor, the FID of as many real train "
                "images as samples against the same val images",
                path=plots.against_floor(bars, out / PLOTS / "fid.png"),
            )
        )
    per_class = metrics.get("classifier_accuracy_per_class") or {}
    if per_class:
        names = _class_names(out.parent)
        labels = [names[int(c)] if c.isdigit() and int(c) < len(names) else c for c in per_class]
        path = plots.per_class_accuracy(
            per_class, labels, metrics.get("classifier_real_val_accuracy"), out / PLOTS / "per_class_accuracy.png"
        )
        blocks += [
            Block("image", "Classifier accuracy per class (of the samples generated for that class)", path=path),
            Block("table", rows=(("class", *labels), ("accuracy", *(f"{a:.3f}" for a in per_class.values())))),
        ]
    if "sampler" in metrics:
        blocks.append(Block("text", f"Sampler: {json.dumps(metrics['sampler'])}."))
    blocks.append(
        Block(
            "text",
            "FID/KID/precision-recall: samples against the real validation images; Inception "
            f"input: {PREPROCESS}. fid_train_vs_val is the floor: as many real train images as "
            "samples, against the same val images. latent_bits_per_dim: in the diffusion model's "
            "normalised latent space (a continuous density; not comparable to pixel-space "
            "bits/dim).",
        )
    )
    return blocks


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _training(run_dir: Path, out: Path) -> list[Block]:
    blocks: list[Block] = []
    for stage, keys in (("autoencoder", AUTOENCODER_CURVES), ("diffusion", COMMON_CURVES)):
        records = _records(run_dir / stage / "metrics.jsonl")
        path = plots.training_curves(records, keys, f"{stage} training", out / PLOTS / f"{stage}_training.png")
        if path is not None:
            blocks += [
                Block("heading", f"{stage.capitalize()} training"),
                Block("image", f"{stage} training curves (metrics.jsonl, every log step)", path=path),
            ]
        if stage == "autoencoder":
            grids = sorted((run_dir / stage / "images").glob("reconstructions-*.png"))
            if grids:
                step = int(grids[-1].stem.rsplit("-", 1)[1])
                grid = np.asarray(Image.open(grids[-1]).convert("RGB"))
                path = plots.labelled_rows(
                    grid,
                    ["input", "reconstruction"],
                    f"training batch at step {step}",
                    out / PLOTS / "reconstructions.png",
                )
                blocks.append(Block("image", "Input (top) and its reconstruction (bottom)", path=path))
    return blocks


def _markdown(blocks: list[Block], out: Path) -> str:
    lines: list[str] = []
    for number, block in enumerate(blocks):
        if block.kind == "heading":
            lines += ["#" * (1 if number == 0 else 2) + " " + block.text, ""]
        elif block.kind == "text":
            lines += [block.text, ""]
        elif block.kind == "link":
            lines += [f"[{block.text}]({block.href})", ""]
        elif block.kind == "image":
            assert block.path is not None
            lines += [f"![{block.text}]({block.path.relative_to(out).as_posix()})", "", f"*{block.text}.*", ""]
        elif block.kind == "table":
            header, *rows = block.rows
            lines += [
                "| " + " | ".join(header) + " |",
                "|---" * len(header) + "|",
                *("| " + " | ".join(row) + " |" for row in rows),
                "",
            ]
        elif block.kind == "code":
            lines += ["```yaml", block.text, "```", ""]
    return "\n".join(lines)


def _html(blocks: list[Block], title: str) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "img{max-width:100%}pre{background:#f4f4f4;padding:1em;overflow:auto}</style></head><body>",
    ]
    for number, block in enumerate(blocks):
        if block.kind == "heading":
            tag = "h1" if number == 0 else "h2"
            parts.append(f"<{tag}>{html.escape(block.text)}</{tag}>")
        elif block.kind == "text":
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif block.kind == "link":  # a file beside the report: works where the run directory is
            parts.append(f"<p><a href='{html.escape(block.href)}'>{html.escape(block.text)}</a></p>")
        elif block.kind == "image":
            assert block.path is not None
            data = base64.b64encode(block.path.read_bytes()).decode()
            parts.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(block.text)}'>"
                f"<figcaption>{html.escape(block.text)}</figcaption></figure>"
            )
        elif block.kind == "table":
            header, *rows = block.rows
            parts.append(
                "<table><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                + "</table>"
            )
        elif block.kind == "code":
            parts.append(f"<pre>{html.escape(block.text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

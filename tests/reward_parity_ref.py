"""Reference side of the reward parity check (tests/test_reward_parity.py); runs in ``.venv-parity`` only.

``python reward_parity_ref.py DIR PACKAGES`` reads ``DIR/cases.json`` + ``DIR/<case>.npz`` (written by the project
side), loads the same checkpoint files with the reference packages' own classes and loading code, scores the same
preprocessed pixels, and writes ``DIR/reference.json``: ``{"scores": {"<case>/<package>": [...]}, "checks": ...,
"info": ..., "errors": ...}``. ``PACKAGES`` (comma list) names the reference packages installed in this environment;
a listed package that fails is an error (non-zero exit), never a silent skip. The only code replaced is what would
download weights or files from a hub: the BLIP tokenizer's vocab (a local ``vocab.txt``), the ViT-L constructor of
``BLIP_Pretrain`` (a tiny ViT of the package's own ``VisionTransformer`` class), ``clip.load`` (the package's own
``CLIP`` class built with the tiny sizes).
"""

import json
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)


def _openclip_tiny(factory, cfg: dict, name: str) -> None:
    d = Path(tempfile.mkdtemp())
    (d / f"{name}.json").write_text(json.dumps(cfg))
    factory.add_model_config(d)


def hps_open_clip(d: Path, case: dict, a: dict, out: dict) -> list[float]:
    """open_clip_torch: create_model on the tiny config with the checkpoint as ``pretrained`` (its load_checkpoint)."""
    import open_clip
    from PIL import Image

    _openclip_tiny(open_clip.factory, case["openclip_config"], "tiny-hps")
    model = open_clip.create_model("tiny-hps", pretrained=str(d / case["checkpoint"]), precision="fp32",
                                   device="cpu").eval()
    ids = open_clip.get_tokenizer("ViT-H-14")(case["prompts"])
    out["open_clip_ids"] = ids.tolist()
    with torch.no_grad():
        s = (model.encode_image(torch.from_numpy(a["pixels"]), normalize=True)
             * model.encode_text(ids, normalize=True)).sum(-1)
        # informational: open_clip's own PIL preprocessing of the same uint8 images instead of ours
        pre = open_clip.image_transform(32, is_train=False)
        pil = torch.stack([pre(Image.fromarray(im.transpose(1, 2, 0))) for im in a["images_u8"]])
        s_pil = (model.encode_image(pil, normalize=True) * model.encode_text(ids, normalize=True)).sum(-1)
    out["info"][f"{case['checkpoint']} open_clip PIL preprocessing"] = {
        "max|pixels_PIL - pixels_ours|": float((pil - torch.from_numpy(a["pixels"])).abs().max()),
        "max|score_PIL - score_ours_pixels|": float((s_pil - s).abs().max())}
    return s.tolist()


def hps_hpsv2(d: Path, case: dict, a: dict, out: dict) -> list[float]:
    """hpsv2: its bundled open_clip, loaded as ``hpsv2.img_score.score`` does (strict ``load_state_dict``)."""
    from hpsv2.src.open_clip import factory, get_tokenizer

    _openclip_tiny(factory, case["openclip_config"], "tiny-hps")
    model = factory.create_model("tiny-hps", precision="fp32", device="cpu", output_dict=True)
    checkpoint = torch.load(d / case["checkpoint"], map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    text = get_tokenizer("ViT-H-14")(case["prompts"])
    with torch.no_grad():
        o = model(torch.from_numpy(a["pixels"]), text)
        s = torch.diagonal(o["image_features"] @ o["text_features"].T)
    key = "hpsv21/hpsv2" if "2.1" in case["checkpoint"] else "hpsv2/hpsv2"
    out["checks"][key] = {"hpsv2 tokenizer ids equal ours": bool(np.array_equal(
        text.numpy()[text.numpy() != 0], a["ids"][text.numpy() != 0])) or "no"}
    return s.tolist()


def imagereward(d: Path, case: dict, a: dict, out: dict) -> list[float]:
    """image-reward: ``ImageReward.utils.load`` on the local files; the package's ``score_gard`` path."""
    import ImageReward.models.BLIP.blip_pretrain as bp
    from ImageReward.models.BLIP.vit import VisionTransformer
    from ImageReward.utils import load
    from transformers import BertTokenizer

    vocab = str(d / case["vocab"])

    def local_tokenizer():  # BLIP's init_tokenizer, with bert-base-uncased's vocab from a local file
        tokenizer = BertTokenizer(vocab)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    bp.init_tokenizer = local_tokenizer
    bp.create_vit = lambda vit, image_size, *args, **kw: (VisionTransformer(**case["vit"]), case["vit"]["embed_dim"])
    model = load(str(d / case["checkpoint"]), device="cpu", med_config=str(d / case["med_config"])).eval()
    sd = torch.load(d / case["checkpoint"], map_location="cpu")
    mine = model.state_dict()
    out["checks"]["imagereward/image_reward"] = {
        "every checkpoint key loaded": sorted(set(sd) - set(mine)) or True,
        "loaded values equal": all(torch.equal(mine[k], v) for k, v in sd.items() if k in mine) or "no"}
    t = model.blip.tokenizer(case["prompts"], padding="max_length", truncation=True, max_length=35,
                             return_tensors="pt")  # ImageReward.score's tokenisation
    out["checks"]["imagereward/image_reward"]["BLIP tokenizer ids equal ours"] = (
        bool(np.array_equal(t["input_ids"].numpy(), a["ids"])) or "no")
    with torch.no_grad():
        s = model.score_gard(torch.from_numpy(a["ids"]), torch.from_numpy(a["mask"]), torch.from_numpy(a["pixels"]))
    return s.squeeze(-1).tolist()


def aesthetic_clip(d: Path, case: dict, a: dict, out: dict) -> list[float]:
    """LAION aesthetic predictor: OpenAI ``clip``'s CLIP class + the predictor's MLP (as in ImageReward's
    AestheticScore, from improved-aesthetic-predictor), score = MLP(F.normalize(encode_image(x)))."""
    import clip.model
    import torch.nn.functional as F
    from ImageReward.models.AestheticScore import MLP

    sd = torch.load(d / case["clip_openai"], map_location="cpu")
    v, t = case["openclip_config"]["vision_cfg"], case["openclip_config"]["text_cfg"]
    model = clip.model.CLIP(
        embed_dim=case["openclip_config"]["embed_dim"], image_resolution=v["image_size"], vision_layers=v["layers"],
        vision_width=v["width"], vision_patch_size=v["patch_size"], context_length=t["context_length"],
        vocab_size=t["vocab_size"], transformer_width=t["width"], transformer_heads=t["heads"],
        transformer_layers=t["layers"])
    model.load_state_dict(sd)
    model.float().eval()
    head = torch.load(d / case["head"], map_location="cpu")
    mlp = MLP(head["layers.0.weight"].shape[1])
    mlp.load_state_dict(head)
    mlp.eval()
    with torch.no_grad():
        s = mlp(F.normalize(model.encode_image(torch.from_numpy(a["pixels"]))).float())
    return s.squeeze(-1).tolist()


RUNS = [("hpsv2", "open_clip", hps_open_clip), ("hpsv21", "open_clip", hps_open_clip),
        ("hpsv2", "hpsv2", hps_hpsv2), ("hpsv21", "hpsv2", hps_hpsv2),
        ("imagereward", "image_reward", imagereward), ("aesthetic", "clip", aesthetic_clip)]
NEEDS = {"clip": {"clip", "image_reward"}}  # the predictor MLP class ships in image-reward


def main() -> int:
    d, packages = Path(sys.argv[1]), [p for p in sys.argv[2].split(",") if p]
    cases = json.loads((d / "cases.json").read_text())
    out = {"dir": str(d), "scores": {}, "checks": {}, "info": {}, "errors": {},
           "versions": {"torch": torch.__version__}}
    for case, package, fn in RUNS:
        if not NEEDS.get(package, {package}) <= set(packages):
            continue
        try:
            out["scores"][f"{case}/{package}"] = fn(d, cases[case], dict(np.load(d / f"{case}.npz")), out)
        except Exception:  # noqa: BLE001 - recorded and turned into a non-zero exit below
            out["errors"][f"{case}/{package}"] = traceback.format_exc()
    from importlib import metadata

    for dist in ("open_clip_torch", "hpsv2", "image-reward", "openai-clip", "transformers", "timm", "torchvision"):
        try:
            out["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out["versions"][dist] = "not installed"
    (d / "reference.json").write_text(json.dumps(out, indent=1))
    for k, e in out["errors"].items():
        sys.stderr.write(f"--- {k}\n{e}\n")
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""`fgclip import-weights`: OpenAI, open_clip and FG-CLIP checkpoints in their real formats.

Every source is written here with random weights by the code that defines its format:
OpenAI's own ``CLIP`` class from the ``openai-clip`` package (state dicts, and TorchScript
archives traced from it as OpenAI's released ``.pt`` files are), open_clip's layouts
(the same keys; a training checkpoint under ``state_dict`` with DDP's ``module.``, a
``.safetensors`` file, a hub directory with ``open_clip_config.json``), and FG-CLIP's
Hugging Face directory (CLIP's keys plus ``logit_scale_finegraind`` [sic] and the
long-caption tables). The imported model's embeddings must equal the source model's
own forward to 1e-4 in float32, and every logit scale the source's value.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from model_tiny import TINY
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel

from fgclip.cli import main
from fgclip.config import LN_100, ModelConfig, ModelSourceError, Params, load_params
from fgclip.data.images import CLIP_MEAN, CLIP_PIXELS, PixelStats
from fgclip.model.fgclip import EXTRA_NAME, CLIPLoadError, FGCLIPVideoModel, LogitScaleMismatch, load_clip
from fgclip.model.import_weights import (
    REPORT_NAME,
    UnsafePickleError,
    WeightsImportError,
    import_weights,
)
from fgclip.model.sources import check_pretrained, conversion_needed, safetensors_keys
from fgclip.model.tokenizer import load_tokenizer, tokenize
from fgclip.outputs import OutputDirError, owner
from fgclip.train.pretrain import pretrain_clip

PARAMS = str(Path(__file__).resolve().parents[2] / "params.yaml")
LOGGER = "fgclip.model.fgclip"
TOL = 1e-4
# A ViT-B-8-like CLIP at 32 px: two heads per tower (width 128 = 2 x 64), OpenAI's vocabulary.
EMBED, IMAGE, PATCH, WIDTH, LAYERS, CONTEXT, VOCAB = 32, 32, 8, 128, 2, 77, 49408
SOT, EOT = VOCAB - 2, VOCAB - 1
SOURCE_SCALE = 3.3  # neither CLIP's 2.6592 nor ln 100: a scale that was really carried over


# ----------------------------------------------------------------- OpenAI's code


def _openai_module(name: str) -> ModuleType:
    # clip/__init__.py imports torchvision, which does not import beside this torch build.
    package = Path(importlib.util.find_spec("clip").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", package / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def openai_model() -> ModuleType:
    return _openai_module("model")


@functools.cache
def simple_tokenizer():
    return _openai_module("simple_tokenizer").SimpleTokenizer()


def openai_clip(seed: int = 0, activation: str = "quick_gelu") -> nn.Module:
    """OpenAI's ``CLIP`` with random weights (biases and norms too), optionally with GELU as open_clip's."""
    m = openai_model()
    torch.manual_seed(seed)
    model = m.CLIP(EMBED, IMAGE, LAYERS, WIDTH, PATCH, CONTEXT, VOCAB, WIDTH, WIDTH // 64, LAYERS)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # OpenAI initialises these to 0 / 1: a swapped bias or norm would go unnoticed.
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        model.logit_scale.fill_(SOURCE_SCALE)
    if activation == "gelu":
        for block in model.modules():
            if isinstance(block, m.ResidualAttentionBlock):
                block.mlp.gelu = nn.GELU()
    return model.eval()


def pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def token_ids(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenAI-style rows (SOT, tokens, EOT, zero padding to 77) of lengths 5, 30 and 77, and their mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(3, CONTEXT, dtype=torch.long)
    mask = torch.zeros(3, CONTEXT, dtype=torch.long)
    for row, length in enumerate((5, 30, CONTEXT)):
        ids[row, 0], ids[row, length - 1] = SOT, EOT
        ids[row, 1 : length - 1] = torch.randint(0, SOT, (length - 2,), generator=g)
        mask[row, :length] = 1
    return ids, mask


def wrap(out: Path, **overrides) -> FGCLIPVideoModel:
    cfg = ModelConfig(**{**TINY, "loaded_logit_scale": "keep", **overrides})
    return FGCLIPVideoModel.from_clip(out, cfg, source=out, tolerance=TOL).eval()


def assert_parity(out: Path, image_fn, text_fn, **overrides) -> FGCLIPVideoModel:
    """The imported model (as the pipeline wraps it) against the source's own forward."""
    model = wrap(out, **overrides)
    px = pixels()
    ids, mask = token_ids()
    with torch.no_grad():
        want_image, want_text = image_fn(px).float(), text_fn(ids).float()
        got_image, _ = model.encode_images(px)
        clip = model.clip
        got_text = clip.text_projection(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output)
        torch.testing.assert_close(got_image, want_image, atol=1e-4, rtol=0)
        torch.testing.assert_close(got_text, want_text, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            model.encode_text(ids, mask), F.normalize(want_text, dim=-1), atol=1e-4, rtol=0
        )
    assert want_image.abs().max() > 0.1 and want_text.abs().max() > 0.1  # not a comparison of zeros
    return model


def report(out: Path) -> dict:
    return json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------ OpenAI


def test_openai_state_dict_parity(tmp_path: Path) -> None:
    source = openai_clip()
    src = tmp_path / "ViT-B-8.pt"
    torch.save(source.state_dict(), src)
    import_weights(src, tmp_path / "out", fmt="openai", tokenizer=False)
    model = assert_parity(tmp_path / "out", source.encode_image, source.encode_text)
    assert model.logit_scale_global.item() == source.logit_scale.item()
    assert load_clip(tmp_path / "out").logit_scale.item() == source.logit_scale.item()
    got = report(tmp_path / "out")
    assert got["format"] == "openai" and got["activation"] == "quick_gelu"
    assert got["arch"]["vision"] == {"width": WIDTH, "layers": LAYERS, "heads": 2, "mlp": 4 * WIDTH}
    assert got["arch"]["text"]["context_length"] == CONTEXT and got["arch"]["image_size"] == IMAGE
    assert got["scales"] == {"global": pytest.approx(SOURCE_SCALE), "region": None, "hardneg": None}
    assert not (tmp_path / "out" / EXTRA_NAME).exists()  # an OpenAI CLIP has no region scale to carry
    assert model.load_report["region"]["action"] == "init"


def _torchscript(model: nn.Module, path: Path, half: bool) -> None:
    """As OpenAI released them: traced forward/encode_image/encode_text, settings as tensors, fp16."""
    model = copy.deepcopy(model)
    for name, value in {"input_resolution": IMAGE, "context_length": CONTEXT, "vocab_size": VOCAB}.items():
        model.__dict__.pop(name, None)  # plain ints on the class; tensors in the released archives
        model.register_buffer(name, torch.tensor(value))
    if half:
        openai_model().convert_weights(model)
    px = pixels(2).to(model.visual.conv1.weight.dtype)
    ids = token_ids()[0][:2]
    inputs = {"forward": (px, ids), "encode_image": (px,), "encode_text": (ids,)}
    torch.jit.trace_module(model, inputs, check_trace=False).save(str(path))


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16-as-released"])
def test_openai_torchscript_archive_parity(tmp_path: Path, half: bool) -> None:
    source = openai_clip(seed=1)
    src = tmp_path / "ViT-B-8.pt"
    _torchscript(source, src, half)
    import_weights(src, tmp_path / "out", tokenizer=False)  # auto: a TorchScript archive is OpenAI's
    archive = torch.jit.load(str(src), map_location="cpu")
    if half:
        # OpenAI's own CPU path for a released file: build_model(state_dict).float() (clip.load).
        reference = openai_model().build_model(dict(archive.state_dict())).float().eval()
        image_fn, text_fn = reference.encode_image, reference.encode_text
    else:
        image_fn, text_fn = archive.encode_image, archive.encode_text
    model = assert_parity(tmp_path / "out", image_fn, text_fn)
    assert model.logit_scale_global.item() == archive.logit_scale.item()
    got = report(tmp_path / "out")
    assert got["file"] == "torchscript" and got["arch"]["dtype"] == ("float16" if half else "float32")
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --------------------------------------------------------------------- open_clip


def _open_clip_config(quick_gelu: bool) -> dict:
    vision = {"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "patch_size": PATCH}
    text = {"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": 2, "layers": LAYERS}
    return {
        "model_cfg": {"embed_dim": EMBED, "quick_gelu": quick_gelu, "vision_cfg": vision, "text_cfg": text},
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": [0.26862954, 0.26130258, 0.27577711]},
    }


@pytest.mark.parametrize(
    ("activation", "container"),
    [("gelu", "checkpoint"), ("gelu", "safetensors"), ("quick_gelu", "hub-dir")],
)
def test_open_clip_parity(tmp_path: Path, activation: str, container: str) -> None:
    source = openai_clip(seed=2, activation=activation)
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    options: dict = {}
    if container == "checkpoint":
        # open_clip's training checkpoint: under state_dict, DDP's module. prefix, beside other entries.
        src = tmp_path / "epoch_2.pt"
        torch.save(
            {"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, src
        )
        options["arch"] = "ViT-B-8"  # no -quickgelu suffix: GELU
    elif container == "safetensors":
        src = tmp_path / "open_clip_model.safetensors"
        save_file(state, str(src))
        options["activation"] = "gelu"
    else:
        src = tmp_path / "hub"
        src.mkdir()
        save_file(state, str(src / "open_clip_model.safetensors"))
        (src / "open_clip_config.json").write_text(json.dumps(_open_clip_config(quick_gelu=True)))
    import_weights(src, tmp_path / "out", tokenizer=False, **options)
    model = assert_parity(tmp_path / "out", source.encode_image, source.encode_text)
    assert model.clip.config.vision_config.hidden_act == activation
    assert model.logit_scale_global.item() == source.logit_scale.item()
    got = report(tmp_path / "out")
    assert got["format"] == "open_clip" and got["activation"] == activation


def test_open_clip_activation_matters(tmp_path: Path) -> None:
    """Why it is never guessed: GELU weights run as QuickGELU give other embeddings, silently."""
    source = openai_clip(seed=3, activation="gelu")
    src = tmp_path / "gelu.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(src))
    with pytest.raises(WeightsImportError, match="--arch.*--activation"):
        import_weights(src, tmp_path / "guess", tokenizer=False)
    with pytest.raises(WeightsImportError, match="GELU or QuickGELU"):
        import_weights(src, tmp_path / "guess", fmt="open_clip", tokenizer=False)
    assert not (tmp_path / "guess").exists()
    import_weights(src, tmp_path / "wrong", activation="quick_gelu", tokenizer=False)
    with torch.no_grad():
        wrong, _ = wrap(tmp_path / "wrong").encode_images(pixels())
        assert (wrong - source.encode_image(pixels())).abs().max() > 1e-3
    with pytest.raises(WeightsImportError, match="contradicts --arch ViT-B-8-quickgelu"):
        import_weights(src, tmp_path / "x", arch="ViT-B-8-quickgelu", activation="gelu", tokenizer=False)


def test_open_clip_head_width_is_not_guessed(tmp_path: Path) -> None:
    """ViT-H's 1280 wide tower has 16 heads of 80, not 20 of 64: the shapes cannot tell."""
    state = dict(openai_clip().state_dict())
    state["visual.conv1.weight"] = torch.zeros(1280, 3, PATCH, PATCH)
    src = tmp_path / "vit-h.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(src))
    with pytest.raises(WeightsImportError, match="ViT-H.*80 wide.*--arch"):
        import_weights(src, tmp_path / "out", activation="gelu", tokenizer=False)
    with pytest.raises(WeightsImportError, match="patch size 8 in the weights, 14 in --arch ViT-H-14"):
        import_weights(src, tmp_path / "out", arch="ViT-H-14", tokenizer=False)


# ------------------------------------------------------------------------ FG-CLIP

FG_SCALES = {"logit_scale": 4.0, "logit_scale_finegraind": 3.9, "logit_scale_hardneg": 4.2}


def fgclip_dir(path: Path, seed: int = 4, scales: dict | None = None) -> dict[str, torch.Tensor]:
    """An FG-CLIP Hugging Face directory (FGCLIPModel's keys, random weights); returns its state dict."""
    cfg = CLIPConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH,
                     "num_hidden_layers": LAYERS, "num_attention_heads": 2, "max_position_embeddings": CONTEXT,
                     "projection_dim": EMBED, "eos_token_id": EOT, "bos_token_id": SOT, "pad_token_id": EOT},
        vision_config={"image_size": IMAGE, "patch_size": PATCH, "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH,
                       "num_hidden_layers": LAYERS, "num_attention_heads": 2, "projection_dim": EMBED},
        projection_dim=EMBED,
    )  # fmt: skip
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    state = {k: v.clone() for k, v in CLIPModel(cfg).state_dict().items()}
    for name, v in state.items():
        if name.endswith("bias") or "norm" in name or "layrnorm" in name:
            v.add_(0.2 * torch.randn(v.shape, generator=g))
    for name, value in (scales or FG_SCALES).items():
        state[name] = torch.tensor(value)
    state["text_filip_projection.weight"] = torch.randn(EMBED, WIDTH, generator=g) * WIDTH**-0.5
    for table in ("ori", "res"):
        state[f"text_model.embeddings.position_embedding_{table}.weight"] = 0.05 * torch.randn(
            248, WIDTH, generator=g
        )
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    config = cfg.to_dict()
    config["architectures"] = ["FGCLIPModel"]
    config["auto_map"] = {"AutoModel": "modeling_fgclip.FGCLIPModel"}
    config["text_config"]["max_position_embeddings"] = 248  # the long length: the weights decide
    (path / "config.json").write_text(json.dumps(config))
    return state


def _fgclip_references(state: dict[str, torch.Tensor], src: Path) -> tuple[CLIPModel, CLIPModel]:
    """FG-CLIP's two text paths as plain CLIPs: the short one, and the long one with
    position p reading ``position_embedding_ori`` below 20, ``_res`` from 20 (FG-CLIP's mask1/mask2)."""
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = CONTEXT
    short = CLIPModel(CLIPConfig.from_dict(config))
    fg = {
        k for k in state if "filip" in k or "finegraind" in k or "hardneg" in k or "_ori" in k or "_res" in k
    }
    short.load_state_dict({k: v for k, v in state.items() if k not in fg}, strict=True)
    config["text_config"]["max_position_embeddings"] = 248
    long = CLIPModel(CLIPConfig.from_dict(config))
    long_state = {k: v for k, v in state.items() if k not in fg}
    long_state["text_model.embeddings.position_embedding.weight"] = torch.cat(
        [state["text_model.embeddings.position_embedding_ori.weight"][:20],
         state["text_model.embeddings.position_embedding_res.weight"][20:]]
    )  # fmt: skip
    long_state["text_projection.weight"] = state["text_filip_projection.weight"]
    long.load_state_dict(long_state, strict=True)
    return short.eval(), long.eval()


def test_fgclip_directory_parity(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "fg-clip-tiny"
    state = fgclip_dir(src)
    import_weights(src, tmp_path / "out", tokenizer=False)
    short, long = _fgclip_references(state, src)

    def image_fn(px: torch.Tensor) -> torch.Tensor:
        return short.visual_projection(short.vision_model(pixel_values=px).pooler_output)

    def text_fn(ids: torch.Tensor) -> torch.Tensor:
        return short.text_projection(short.text_model(input_ids=ids).pooler_output)

    caplog.set_level(logging.INFO, logger=LOGGER)
    model = assert_parity(tmp_path / "out", image_fn, text_fn, long_text=True)
    extra = tmp_path / "out" / EXTRA_NAME
    for name, key in (("global", "logit_scale"), ("region", "logit_scale_finegraind"),
                      ("hardneg", "logit_scale_hardneg")):  # fmt: skip
        assert model.named_scales()[name].item() == state[key].item()
        assert model.load_report[name]["action"] == "kept"
    assert model.load_report["region"]["source"] == str(extra)
    assert f"[region] Loaded logit_scale = 3.9000 (exp=49.4) from {extra}" in caplog.messages
    assert f"[hardneg] Loaded logit_scale = 4.2000 (exp=66.7) from {extra}" in caplog.messages
    assert model.load_report["long_text"] == {"source": str(extra), "action": "loaded"}
    assert report(tmp_path / "out")["scales"] == {"global": state["logit_scale"].item(),
                                                 "region": state["logit_scale_finegraind"].item(),
                                                 "hardneg": state["logit_scale_hardneg"].item()}  # fmt: skip

    # FG-CLIP's long path (its loaded tables and projection, not a stretch) on a 120-token caption.
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, SOT, (2, 120), generator=g)
    ids[:, 0], ids[0, 60], ids[1, 119] = SOT, EOT, EOT
    mask = torch.ones_like(ids)
    mask[0, 61:] = 0
    with torch.no_grad():
        want = long.text_projection(long.text_model(input_ids=ids, attention_mask=mask).pooler_output)
        got = model.encode_text(ids, mask, long=True)
        torch.testing.assert_close(got, F.normalize(want, dim=-1), atol=1e-4, rtol=0)
        # The long path really differs from the short one on these weights.
        assert (got[:1, :] - model.encode_text(ids[:1, :61], mask[:1, :61])).abs().max() > 1e-2


def test_fgclip_scales_follow_the_loaded_logit_scale_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "fg"
    fgclip_dir(
        src, scales={"logit_scale": LN_100, "logit_scale_finegraind": 3.9, "logit_scale_hardneg": LN_100}
    )
    out = tmp_path / "out"
    import_weights(src, out, tokenizer=False)
    extra = out / EXTRA_NAME
    with pytest.raises(LogitScaleMismatch) as err:
        wrap(out, loaded_logit_scale="error")
    for part in (str(extra), "region logit_scale = 3.9000", "4.6052", "model.loaded_logit_scale"):
        assert part in str(err.value)

    caplog.set_level(logging.INFO, logger=LOGGER)
    model = wrap(out, loaded_logit_scale="reinit")
    assert model.logit_scale_region.item() == pytest.approx(LN_100)
    assert {n: r["action"] for n, r in model.load_report.items()} == {
        "global": "loaded", "region": "reinit", "hardneg": "loaded", "long_text": "unused",
    }  # fmt: skip
    assert model.load_report["hardneg"]["source"] == str(extra)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("[region] logit_scale 3.9000")
    assert "[region] Loaded logit_scale = 4.6052 (exp=100.0)" in caplog.messages  # re-initialised: no file
    assert f"[hardneg] Loaded logit_scale = 4.6052 (exp=100.0) from {extra}" in caplog.messages
    # long_text off: the source's long tables are reported unused, and the text model stays CLIP's own.
    assert any("not used (model.long_text is off)" in m for m in caplog.messages)
    assert not hasattr(model.clip.text_model.embeddings, "position_embedding_ori")


def test_long_text_without_tables_is_stretched_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "openai.pt"
    torch.save(openai_clip().state_dict(), src)
    import_weights(src, tmp_path / "out", fmt="openai", tokenizer=False)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = wrap(tmp_path / "out", long_text=True)
    assert model.load_report["long_text"]["action"] == "stretched"
    assert any("[long_text] no long-caption tables" in m for m in caplog.messages)


# ------------------------------------------------- tokenizer, CLI, output directory


def test_cli_import_with_clip_tokenizer_matches_openai_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Captions through the saved tokenizer and the imported model equal OpenAI's tokenize + encode_text."""
    source = openai_clip(seed=5)
    src, out = tmp_path / "ViT-B-8.pt", tmp_path / "models" / "vit-b-8"
    torch.save(source.state_dict(), src)
    args = ["import-weights", str(src), "--out", str(out), "--format", "openai", "--params", PARAMS]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["tokenizer"]["eos"] == EOT
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": IMAGE, "width": IMAGE}
    assert processor["image_mean"] == list(CLIP_MEAN)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["eos_token_id"] == EOT and config["text_config"]["bos_token_id"] == SOT

    captions = [
        "A man attacks a woman inside a shop, at 10:42pm!",
        "一个男人在商店里攻击一个女人",
        "fire " * 100,
    ]
    tokenizer = load_tokenizer(out)
    ids, mask = tokenize(tokenizer, captions, CONTEXT)
    openai_ids = torch.zeros(len(captions), CONTEXT, dtype=torch.long)
    for row, caption in enumerate(captions):
        # clip.tokenize(..., truncate=True): the first 76 tokens, then EOT.
        tokens = [SOT, *simple_tokenizer().encode(caption)][: CONTEXT - 1] + [EOT]
        openai_ids[row, : len(tokens)] = torch.tensor(tokens)
    assert torch.equal(ids.masked_fill(mask == 0, 0), openai_ids[:, : ids.shape[1]])
    model = wrap(out)
    with torch.no_grad():
        want = F.normalize(source.encode_text(openai_ids), dim=-1)
        torch.testing.assert_close(model.encode_text(ids, mask), want, atol=1e-4, rtol=0)

    # A second import replaces the directory it wrote; a directory it did not write is refused.
    assert main(args) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not written by the import_weights stage"):
        import_weights(src, foreign, fmt="openai", tokenizer=False)
    assert (foreign / "notes.txt").read_text() == "mine"


class _Opaque:
    """A pickled object that is not a tensor: weights_only refuses it."""

    def __init__(self) -> None:
        self.weights = torch.zeros(2)


def _bad_text(tmp: Path) -> Path:
    (tmp / "notes.pt").write_text("not a checkpoint\n")
    return tmp / "notes.pt"


def _bad_pickle(tmp: Path) -> Path:
    torch.save({"model": _Opaque()}, tmp / "model.pt")
    return tmp / "model.pt"


def _bad_layout(tmp: Path) -> Path:
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp / "other.pt")
    return tmp / "other.pt"


def _missing_keys(tmp: Path) -> Path:
    state = dict(openai_clip().state_dict())
    del state["visual.ln_post.weight"], state["transformer.resblocks.1.attn.in_proj_bias"]
    torch.save(state, tmp / "cut.pt")
    return tmp / "cut.pt"


def _extra_keys(tmp: Path) -> Path:
    state = dict(openai_clip().state_dict())
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)  # open_clip's layer scale
    torch.save(state, tmp / "ls.pt")
    return tmp / "ls.pt"


def _resnet(tmp: Path) -> Path:
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(2), "visual.attnpool.c_proj.weight": torch.zeros(2)},
               tmp / "RN50.pt")  # fmt: skip
    return tmp / "RN50.pt"


def _bad_safetensors(tmp: Path) -> Path:
    (tmp / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops")
    return tmp / "model.safetensors"


def _plain_hf(tmp: Path) -> Path:
    cfg = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
                       "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip
    CLIPModel(cfg).save_pretrained(tmp / "hf")
    return tmp / "hf"


@pytest.mark.parametrize(
    ("make", "fmt", "expected"),
    [
        (_bad_text, "auto", "not a PyTorch checkpoint"),
        (_bad_pickle, "openai", "stores Python objects (test_import_weights._Opaque), not only tensors"),
        (_bad_layout, "openai", "not OpenAI's CLIP key layout"),
        (_missing_keys, "openai", "missing keys of OpenAI's CLIP layout: visual.ln_post.weight"),
        (
            _extra_keys,
            "openai",
            "keys outside OpenAI's ViT CLIP layout (1: visual.transformer.resblocks.0.ls_1",
        ),
        (_resnet, "openai", "a ResNet CLIP"),
        (_bad_safetensors, "auto", "not a safetensors file"),
        (_plain_hf, "auto", "a plain CLIPModel directory"),
        (lambda tmp: tmp / "absent.pt", "auto", "no such file or directory"),
    ],
    ids=["text", "pickle", "layout", "missing", "extra", "resnet", "safetensors", "plain-hf", "absent"],
)
def test_bad_sources_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, make, fmt: str, expected: str
) -> None:
    src = make(tmp_path)
    out = tmp_path / "out"
    args = ["import-weights", str(src), "--out", str(out), "--format", fmt, "--params", PARAMS]
    assert main(args) == 1
    lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("fgclip import-weights")
    ]
    assert len(lines) == 1 and lines[0].startswith("fgclip import-weights: error: ") and expected in lines[0]
    assert not out.exists()


def test_unsafe_pickle_is_its_own_error(tmp_path: Path) -> None:
    with pytest.raises(UnsafePickleError, match="weights_only=True"):
        import_weights(_bad_pickle(tmp_path), tmp_path / "out", fmt="openai", tokenizer=False)


def test_scales_survive_as_written(tmp_path: Path) -> None:
    """The sidecar holds FG-CLIP's values under this project's names, untouched by the import."""
    from safetensors.torch import load_file

    src = tmp_path / "fg"
    state = fgclip_dir(src)
    import_weights(src, tmp_path / "out", tokenizer=False)
    extra = load_file(str(tmp_path / "out" / EXTRA_NAME))
    assert extra["logit_scale_region"].item() == state["logit_scale_finegraind"].item()
    assert extra["logit_scale_hardneg"].item() == state["logit_scale_hardneg"].item()
    assert torch.equal(
        extra["position_embedding_res"], state["text_model.embeddings.position_embedding_res.weight"]
    )
    assert math.isclose(load_clip(tmp_path / "out").logit_scale.item(), 4.0, abs_tol=1e-7)


# ------------------------------------------------- model.pretrained naming a source


def _params(tmp_path: Path, pretrained: Path, **model) -> Params:
    return load_params(PARAMS).with_overrides(
        model={"pretrained": str(pretrained), **model}, pretrain={"out": str(tmp_path / "clip-pretrained")}
    )


def _convert(params: Params, tmp_path: Path) -> dict:
    """The pretrain stage on ``params`` (its data inputs are only checked for overlap here)."""
    return pretrain_clip(params, tmp_path / "frames", tmp_path / "boxes", tmp_path / "a.json", params.paths.stand_in)


def test_what_needs_converting(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "open_clip_model.safetensors"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "ViT-B-32.pt")
    fgclip_dir(tmp_path / "fg")
    CLIPModel(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "vocab_size": 99},
                         vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                         projection_dim=8)).save_pretrained(tmp_path / "plain")  # fmt: skip
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text("{}")
    assert conversion_needed(tmp_path / "ViT-B-32.pt") == "a checkpoint file"
    assert conversion_needed(tmp_path / "open_clip_model.safetensors") == "a checkpoint file"
    assert conversion_needed(tmp_path / "oc") == "an open_clip directory"
    assert conversion_needed(tmp_path / "fg") == "an FG-CLIP directory"
    assert conversion_needed(tmp_path / "plain") is None  # a CLIPModel directory loads as it is
    assert conversion_needed("openai/clip-vit-base-patch32") is None  # a hub id: check_model_source's
    assert conversion_needed(tmp_path / "absent") is None
    import_weights(tmp_path / "fg", tmp_path / "done", tokenizer=False)
    assert conversion_needed(tmp_path / "done") is None  # already converted: import.json
    # The FG-CLIP keys are read from the safetensors header alone, exactly.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fg" / "model.safetensors"), "pt") as f:
        assert sorted(safetensors_keys(tmp_path / "fg" / "model.safetensors")) == sorted(f.keys())
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ModelSourceError, match="not a safetensors file"):
        safetensors_keys(tmp_path / "bad.safetensors")


def test_pretrained_fgclip_directory_is_converted_once_by_the_pretrain_stage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = fgclip_dir(tmp_path / "fg-clip")
    params = _params(tmp_path, tmp_path / "fg-clip", loaded_logit_scale="keep", long_text=True)
    assert params.pretrained_source() == str(params.paths.stand_in)
    with pytest.raises(ModelSourceError, match="holds no conversion.*run the pretrain stage"):
        check_pretrained(params)
    summary = _convert(params, tmp_path)
    assert summary["imported"] and summary["format"] == "fgclip"
    out = params.paths.stand_in
    assert owner(out) == "pretrain" and check_pretrained(params) == out
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = FGCLIPVideoModel.from_clip(out, params.model.model_copy(update=TINY), source=out, tolerance=TOL)
    # Every scale FG-CLIP's directory had, loaded (the users' bug was a region scale from a default).
    assert model.logit_scale_region.item() == state["logit_scale_finegraind"].item()
    assert model.logit_scale_hardneg.item() == state["logit_scale_hardneg"].item()
    assert model.load_report["long_text"]["action"] == "loaded"
    assert f"[region] Loaded logit_scale = 3.9000 (exp=49.4) from {out / EXTRA_NAME}" in caplog.messages

    # Other conversion options in params: refused (DVC would re-run pretrain; a CLI run would not).
    with pytest.raises(ModelSourceError, match="was converted with .*'format': 'auto'.*but params say"):
        check_pretrained(params.with_overrides(model={"pretrained_format": "fgclip"}))
    # Another revision downloaded into the same directory: refused.
    weights = tmp_path / "fg-clip" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(ModelSourceError, match="changed since .* was converted"):
        check_pretrained(params)
    # Another source named: the old conversion is refused, not trained from.
    fgclip_dir(tmp_path / "other", seed=5)
    with pytest.raises(ModelSourceError, match="was converted from .*fg-clip, but model.pretrained"):
        check_pretrained(_params(tmp_path, tmp_path / "other"))
    # --model naming a checkpoint to convert is refused with what to do.
    with pytest.raises(ModelSourceError, match="convert it first"):
        check_pretrained(params, str(tmp_path / "other"))


def test_pretrained_file_that_changed_since_its_conversion_is_refused(tmp_path: Path) -> None:
    source = openai_clip(seed=6)
    src = tmp_path / "ViT-B-8.pt"
    torch.save(source.state_dict(), src)
    params = _params(tmp_path, src, pretrained_format="openai")
    assert _convert(params, tmp_path)["format"] == "openai"
    assert_parity(params.paths.stand_in, source.encode_image, source.encode_text)
    assert check_pretrained(params) == params.paths.stand_in
    torch.save(openai_clip(seed=7).state_dict(), src)  # a newer checkpoint under the same name
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    with pytest.raises(ModelSourceError, match="changed since .* was converted"):
        check_pretrained(params)
    # An ambiguous state dict without its format is the import's own one-line error, nothing written.
    stale = sorted(p.name for p in params.paths.stand_in.iterdir())
    with pytest.raises(WeightsImportError, match="say what it is"):
        _convert(params.with_overrides(model={"pretrained_format": "auto"}), tmp_path)
    assert sorted(p.name for p in params.paths.stand_in.iterdir()) == stale


# ------------------------------------------------------------- pixel statistics

IMAGENET = PixelStats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_image_statistics_of_the_source_travel_to_training_and_back(tmp_path: Path) -> None:
    source = openai_clip(seed=8, activation="gelu")
    src = tmp_path / "hub"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(src / "open_clip_model.safetensors"))
    config = _open_clip_config(quick_gelu=False)
    config["preprocess_cfg"] = {"mean": list(IMAGENET.mean), "std": list(IMAGENET.std)}
    (src / "open_clip_config.json").write_text(json.dumps(config))
    import_weights(src, tmp_path / "out", tokenizer=False)
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert (processor["image_mean"], processor["image_std"]) == (list(IMAGENET.mean), list(IMAGENET.std))
    assert report(tmp_path / "out")["image"]["mean"] == list(IMAGENET.mean)
    model = wrap(tmp_path / "out")
    assert model.pixel_stats == IMAGENET
    model.save_pretrained(tmp_path / "trained")
    assert FGCLIPVideoModel.from_pretrained(tmp_path / "trained").pixel_stats == IMAGENET
    # A model saved before statistics were recorded was trained on CLIP's.
    saved = json.loads((tmp_path / "trained" / "fgclip_config.json").read_text())
    del saved["pixel_stats"]
    (tmp_path / "trained" / "fgclip_config.json").write_text(json.dumps(saved))
    assert FGCLIPVideoModel.from_pretrained(tmp_path / "trained").pixel_stats == CLIP_PIXELS
    # Nonsense statistics stop the import with the file's name.
    config["preprocess_cfg"] = {"mean": [0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (src / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsImportError, match="open_clip_config.json: preprocess_cfg: image_mean must be 3"):
        import_weights(src, tmp_path / "out2", tokenizer=False)


def test_fgclip_weights_never_load_as_a_plain_clip(tmp_path: Path) -> None:
    """The route a hub id takes: loaded as a CLIPModel, FG-CLIP's scales would be dropped."""
    fgclip_dir(tmp_path / "fg")
    config = json.loads((tmp_path / "fg" / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = CONTEXT
    (tmp_path / "fg" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CLIPLoadError, match="FG-CLIP weights .*logit_scale_finegraind.*convert them"):
        load_clip(tmp_path / "fg")

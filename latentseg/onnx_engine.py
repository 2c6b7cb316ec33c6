"""ONNX export and ONNX Runtime inference of LDSeg models (`latentseg export --onnx`,
`predict --engine onnxruntime`).

Inference runs three networks, exported as three graphs into `MODEL/onnx/`:
- `condition.onnx`: image (+ text tokens, padding and pooled embedding, or class ids) -> the
  conditioning tensors (z_image, the image features the decoder skips take, the text tokens the
  denoiser attends to);
- `denoiser.onnx`: (z_t, t, conditioning) -> the output of every head;
- `decoder.onnx`: (z_0, conditioning) -> class logits (003 Eq. 13; the softmax of Algorithm 2,
  line 7, follows in the sampler).
The sampler (DDIM with K steps, DDPM, or 004's staged sampler) is the same code as for torch, a
loop around these graphs: it only ever asks for `denoise(z_t, t, heads)`. Windows and batches are
dynamic; the spatial size is the model's patch, which the sliding window always feeds.

`onnx.json` beside the graphs lists their inputs and outputs and the SHA-256 of each file; a graph
that does not match is refused. ONNX files hold no code: loading one never runs Python.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentseg.config import ModelConfig
from latentseg.errors import LatentSegError
from latentseg.models.segmenter import LatentSampling, LatentSegmenter, sampling_parts
from latentseg.text import TextEmbedding

ONNX_DIR = "onnx"
MANIFEST = "onnx.json"
GRAPHS = ("condition", "denoiser", "decoder")
OPSET = 17


def _text_kind(c: ModelConfig) -> str:
    """What the condition graph takes beside the image: nothing, a sentence's embedding, or class ids."""
    return {"none": "none", "class": "class", "text": "text"}[c.prompt] if c.prompt != "none" else (
        "text" if c.text_fusion != "none" else "none"
    )  # fmt: skip


def cond_names(model: LatentSegmenter) -> list[str]:
    """The conditioning tensors in graph order (image features one by one)."""
    c = model.config
    names = ["z_image"]
    if model.skips:
        names += [f"image_features.{i}" for i in range(len(c.image_encoder_channels) - 1)]
    if c.text_in_denoiser:
        names += ["text_tokens", "text_padding"]
    return names


def flatten(cond: dict) -> list[torch.Tensor]:
    out = [cond["z_image"], *cond.get("image_features", [])]
    if "text_tokens" in cond:
        out += [cond["text_tokens"], cond["text_padding"]]
    return out


def pick(cond: dict, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named conditioning tensors (`image_features.2` is the third image feature map)."""
    out = {}
    for name in names:
        key, _, index = name.partition(".")
        out[name] = cond[key][int(index)] if index else cond[key]
    return out


def unflatten(names: Sequence[str], values: Sequence[torch.Tensor]) -> dict:
    cond: dict[str, Any] = {}
    for name, value in zip(names, values, strict=True):
        if name.startswith("image_features."):
            cond.setdefault("image_features", []).append(value)
        else:
            cond[name] = value
    return cond


class ConditionGraph(nn.Module):
    def __init__(self, model: LatentSegmenter):
        super().__init__()
        self.model, self.kind = model, _text_kind(model.config)

    def forward(self, image: torch.Tensor, *text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = {"none": lambda: None, "text": lambda: TextEmbedding(*text), "class": lambda: text[0]}[self.kind]()
        return tuple(flatten(self.model.conditioning(image, given)))


class DenoiserGraph(nn.Module):
    def __init__(self, model: LatentSegmenter, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.denoiser.forward_heads(z_t, t, unflatten(self.names, cond)))


class DecoderGraph(nn.Module):
    def __init__(self, model: LatentSegmenter, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, z0: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z0, unflatten(self.names, cond))


def _uses(model: LatentSegmenter) -> dict[str, list[str]]:
    """Which conditioning tensors each graph reads."""
    names = cond_names(model)
    denoiser = ["z_image"] + [n for n in names if n.startswith("text_")]
    decoder = (["z_image"] if model.image_latent_to_decoder else []) + [n for n in names if n.startswith("image_f")]
    return {"denoiser": denoiser, "decoder": decoder}


def _text_inputs(model: LatentSegmenter, batch: int) -> tuple[list[torch.Tensor], list[str]]:
    c = model.config
    kind = _text_kind(c)
    if kind == "class":
        return [torch.zeros(batch, dtype=torch.long)], ["class_ids"]
    if kind == "text":
        length = 5
        tokens, pooled = torch.randn(batch, length, c.text_dim), torch.randn(batch, c.text_dim)
        padding = torch.zeros(batch, length, dtype=torch.bool)
        return [tokens, padding, pooled], ["sentence_tokens", "sentence_padding", "sentence_pooled"]
    return [], []


def export_onnx(model_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the three graphs of a trained LDSeg model into `model_dir/onnx/`."""
    from latentseg.checkpoint import load_model

    model_dir = Path(model_dir)
    model, config, _ = load_model(model_dir, "cpu")
    if not isinstance(model, LatentSegmenter):
        raise LatentSegError(
            f"{model_dir}: ONNX export covers LDSeg models (model.mode=ldseg), not {config.model.mode}"
        )
    target = model_dir / ONNX_DIR
    if target.exists() and not overwrite:
        raise LatentSegError(f"{target}: exists; export again with --overwrite to replace it")
    return _replace_folder(target, lambda folder: _write_graphs(model, config.data.patch_size, folder))


def _replace_folder(target: Path, write) -> Path:
    """Fill a hidden folder beside `target`, then swap it in: never a half-written export."""
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=".tmp-onnx-", dir=target.parent))
    try:
        write(staging)
        if target.exists():
            old = target.with_name(staging.name + "-old")
            target.rename(old)
            shutil.rmtree(old)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_graphs(model: LatentSegmenter, patch: list[int], folder: Path) -> None:
    model.eval()
    c, batch = model.config, 2
    image = torch.randn(batch, c.in_channels, *patch)
    text, text_names = _text_inputs(model, batch)
    names, uses = cond_names(model), _uses(model)
    with torch.no_grad():
        cond = list(ConditionGraph(model)(image, *text))
    by_name = dict(zip(names, cond, strict=True))
    z = torch.randn(batch, c.latent_channels, *cond[0].shape[2:])
    t = torch.full((batch,), 500, dtype=torch.long)
    heads = [f"head.{h}" for h in model.heads.names]
    specs = {
        "condition": (ConditionGraph(model), (image, *text), ["image", *text_names], names),
        "denoiser": (DenoiserGraph(model, uses["denoiser"]), (z, t, *[by_name[n] for n in uses["denoiser"]]),
                     ["z_t", "t", *uses["denoiser"]], heads),
        "decoder": (DecoderGraph(model, uses["decoder"]), (z, *[by_name[n] for n in uses["decoder"]]),
                    ["z_0", *uses["decoder"]], ["logits"]),
    }  # fmt: skip
    manifest: dict[str, Any] = {"opset": OPSET, "patch_size": list(patch), "text": _text_kind(c), "graphs": {}}
    for name, (module, args, inputs, outputs) in specs.items():
        path = folder / f"{name}.onnx"
        _export(module, args, inputs, outputs, path)
        manifest["graphs"][name] = {"inputs": inputs, "outputs": outputs, "sha256": _sha256(path)}
    manifest["heads"] = list(model.heads.names)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path) -> None:
    import warnings

    tokens = ("sentence_tokens", "sentence_padding", "text_tokens", "text_padding")  # (B, L, ...): L varies too
    dynamic = {n: {0: "batch", 1: "tokens"} if n in tokens else {0: "batch"} for n in [*inputs, *outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
            opset_version=OPSET, dynamo=False,
        )  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- ONNX Runtime ---------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, Any]:
    """onnx.json, with every graph present and matching its checksum."""
    path = folder / MANIFEST
    if not path.is_file():
        raise LatentSegError(
            f"{folder.parent}: no ONNX graphs; write them with `latentseg export --model {folder.parent} --onnx`"
        )
    try:
        manifest = json.loads(path.read_text())
        graphs = manifest["graphs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LatentSegError(f"{path}: malformed ({type(err).__name__}); export the graphs again") from err
    for name in GRAPHS:
        graph = folder / f"{name}.onnx"
        if name not in graphs or not graph.is_file():
            raise LatentSegError(f"{graph}: missing; export the graphs again")
        if _sha256(graph) != graphs[name].get("sha256"):
            raise LatentSegError(f"{graph}: does not match its checksum in {MANIFEST} (changed or damaged); refused")
    return manifest


def providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise LatentSegError(
            "CUDA was asked for, but this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class Graph:
    """One ONNX Runtime session fed and read as torch tensors (on the CPU between calls)."""

    def __init__(self, path: Path, spec: dict[str, Any], device: torch.device):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=providers(device))
        self.inputs = [i.name for i in self.session.get_inputs()]  # the exporter drops unused ones
        self.device = device

    def __call__(self, **values: torch.Tensor) -> list[torch.Tensor]:
        feed = {name: values[name].detach().cpu().numpy() for name in self.inputs}
        return [torch.from_numpy(out).to(self.device) for out in self.session.run(None, feed)]


class OnnxDenoiser:
    def __init__(self, graph: Graph, uses: list[str]):
        self.graph, self.uses = graph, uses

    def forward_heads(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict, heads: Sequence[int] | None = None):
        outputs = self.graph(z_t=z_t, t=t, **pick(cond, self.uses))
        return outputs if heads is None else [outputs[i] for i in heads]


class OnnxSegmenter(LatentSampling, nn.Module):
    """An LDSeg model whose three networks run in ONNX Runtime; sampling is LatentSegmenter's.

    Args:
        folder: the `onnx/` folder `export_onnx` wrote.
        config: the model's config (planned), which the samplers read.
        device: cpu, or cuda for ONNX Runtime's CUDA provider.
    """

    def __init__(self, folder: Path, config: ModelConfig, device: torch.device):
        super().__init__()
        manifest = read_manifest(folder)
        self.config = config
        self.schedule, self.stages, self.heads = sampling_parts(config)
        graphs = {name: Graph(folder / f"{name}.onnx", manifest["graphs"][name], device) for name in GRAPHS}
        self.condition, self.decoder = graphs["condition"], graphs["decoder"]
        self.cond_names = manifest["graphs"]["condition"]["outputs"]
        self.denoiser = OnnxDenoiser(graphs["denoiser"], manifest["graphs"]["denoiser"]["inputs"][2:])
        self.decoder_uses = manifest["graphs"]["decoder"]["inputs"][1:]
        self.text_kind = manifest["text"]
        self.device_anchor = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)  # where outputs go

    def conditioning(self, image: torch.Tensor, text: TextEmbedding | torch.Tensor | None = None) -> dict:
        return unflatten(self.cond_names, self.condition(image=image, **_text_feed(self.text_kind, text)))

    def decode(self, z: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.decoder(z_0=z, **pick(cond, self.decoder_uses))[0]

    def forward(self, *args, **kwargs):  # noqa: D401 - not a training model
        raise TypeError("an ONNX Runtime model only samples")


def _text_feed(kind: str, text: TextEmbedding | torch.Tensor | None) -> dict[str, torch.Tensor]:
    if kind == "none":
        if text is not None:
            raise ValueError("this model was trained without text (model.text_fusion=none): it cannot take a prompt")
        return {}
    if text is None:
        raise ValueError("this model was trained with text: give each image a description or a prompt")
    if kind == "class":
        if not isinstance(text, torch.Tensor):
            raise ValueError("a class-prompt model takes class ids")
        return {"class_ids": text}
    return {"sentence_tokens": text.tokens, "sentence_padding": text.padding, "sentence_pooled": text.pooled}


def load_onnx_model(model_dir: str | Path, device: torch.device | str = "cpu") -> tuple[OnnxSegmenter, Any, dict]:
    """The ONNX Runtime model of a model directory, its config and fingerprint (as `load_model`)."""
    from latentseg.checkpoint import FINGERPRINT_FILE, check_model_dir, load_config, read_fingerprint

    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise LatentSegError("--engine onnxruntime needs ONNX Runtime: pip install 'latentseg[onnx]'") from err
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    config = load_config(model_dir)
    fingerprint = read_fingerprint(model_dir / FINGERPRINT_FILE)
    model = OnnxSegmenter(model_dir / ONNX_DIR, config.model, torch.device(device))
    return model, config, fingerprint

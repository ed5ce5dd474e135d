"""``appliance clip-anomaly``: one recipe builds a ``clip-anomaly`` bundle end to end.

The recipe (TOML, validated strictly; relative paths from the recipe's folder) says::

    [clip]       open_clip architecture and local weights ("tiny": random, for tests), blocks,
                 object name, normalisation (default: the model's own), global-memory weight
    [taxonomy]   labels (and attributes) of the deployment
    [normal]     folder of good images: up to ``shots`` of them become the few-shot memory and
                 calibrate the thresholds; without it the bundle is zero-shot (text only)
    [data]       labelled images for training (any ``train.data`` format); boxes become patch
                 masks (or ``mask_suffix`` names a mask file beside each image), images without
                 objects count as normal, descriptions join the abnormal prompt ensemble
    [focuser]    steps and learning rate of the TDDF focuser (eqs. 4-5, L_I), optional
    [describer]  the adapter into a causal LM (eq. 14): the LM (``train.recipe.LanguageModel``),
                 steps, learning rate, image grid, prompt embeddings, GGUF type, answer length

Steps: load CLIP (never a download) → text embeddings from the taxonomy and the descriptions →
fit the focuser, or with a describer the whole eq. 14 → enrol the normal shots → export (ONNX graph
with parity, memory, thresholds; with a describer the adapter's output, prompt embeddings and the
LM as GGUF with its own parity gate) → the bundle directory appears atomically.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.bundle import Bundle
from appliance.taxonomy import Taxonomy
from train.data.images import find_images
from train.data.readers import FORMATS
from train.recipe import WEIGHT_SUFFIXES, LanguageModel, RecipeError, format_errors, read_toml

log = logging.getLogger(__name__)
TINY = "tiny"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Clip(Strict):
    name: str  # an open_clip architecture (open_clip.list_models()), or "tiny" (random, tests)
    weights: Path | None = None  # local state dict; required unless name = "tiny"
    blocks: tuple[int, ...] = (3, 8, 12)  # the paper's blocks of a 12-block ViT
    object: str = Field("part", min_length=1)  # "{object} with {label}" prompts
    mean: tuple[float, float, float] | None = None  # None: the model's own normalisation
    std: tuple[float, float, float] | None = None
    global_weight: float = Field(0.0, ge=0.0, le=1.0)  # MSSPMM: blend in every shot's patches
    sigma: float = Field(4.0, ge=0.0)  # heatmap smoothing

    @model_validator(mode="after")
    def _check(self) -> Clip:
        if self.name != TINY and self.weights is None:
            raise ValueError("weights: a local CLIP state dict is required (no downloads)")
        if self.weights is not None and self.weights.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"weights must end in one of {', '.join(WEIGHT_SUFFIXES)}")
        if not self.blocks or min(self.blocks) < 1:
            raise ValueError(f"blocks {list(self.blocks)}: block numbers start at 1")
        return self


class Normal(Strict):
    dir: Path
    shots: int = Field(4, ge=1, le=64)
    seed: int = 0  # which shots, when the folder holds more


class Data(Strict):
    path: Path
    format: str = "records"
    classes: tuple[str, ...] = ()  # yolo: class names in id order (else classes.txt)
    mask_suffix: str | None = None  # e.g. ".png": mask file beside each image, > 127 = defect

    @model_validator(mode="after")
    def _check(self) -> Data:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        return self


class Focuser(Strict):
    steps: int = Field(200, ge=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(8, ge=1)


class Describer(Strict):
    lm: LanguageModel = LanguageModel()
    steps: int = Field(200, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    grid: int = Field(2, ge=1, le=8)  # k: k*k image tokens into the LM
    prompt_embeddings: int = Field(4, ge=1)  # P, the learnable embeddings in front
    hidden: int = Field(64, ge=8)
    quant: Literal["F32", "F16", "Q8_0", "Q5_K_M", "Q4_K_M"] = "F16"
    max_tokens: int = Field(48, ge=1, le=512)


class TaxonomySpec(Strict):
    labels: tuple[str, ...] = Field(min_length=1)
    attributes: dict[str, tuple[str, ...]] = {}

    @model_validator(mode="after")
    def _check(self) -> TaxonomySpec:
        self.build()  # taxonomy_problems: names, duplicates
        return self

    def build(self) -> Taxonomy:
        return Taxonomy(labels=self.labels, attributes=dict(self.attributes))


class ClipRecipe(Strict):
    clip: Clip
    taxonomy: TaxonomySpec
    normal: Normal | None = None
    data: Data | None = None
    focuser: Focuser | None = None
    describer: Describer | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> ClipRecipe:
        if (self.focuser or self.describer) and self.data is None:
            raise ValueError("[focuser] and [describer] train on [data]; add a [data] section")
        return self


def load_clip_recipe(path: str | Path) -> ClipRecipe:
    """Read and validate a CLIP-branch recipe; errors list every problem by dotted key."""
    path = Path(path)
    try:
        recipe = ClipRecipe.model_validate(read_toml(path))
    except ValidationError as exc:
        raise RecipeError(format_errors(exc, str(path))) from None
    return _resolved(recipe, path.parent.resolve())


def _resolved(recipe: ClipRecipe, base: Path) -> ClipRecipe:
    def fix(value: Path | None) -> Path | None:
        return None if value is None else (base / value).resolve()

    update: dict = {"clip": recipe.clip.model_copy(update={"weights": fix(recipe.clip.weights)})}
    if recipe.normal:
        update["normal"] = recipe.normal.model_copy(update={"dir": fix(recipe.normal.dir)})
    if recipe.data:
        update["data"] = recipe.data.model_copy(update={"path": fix(recipe.data.path)})
    if recipe.describer and recipe.describer.lm.path is not None:
        lm = recipe.describer.lm.model_copy(update={"path": fix(recipe.describer.lm.path)})
        update["describer"] = recipe.describer.model_copy(update={"lm": lm})
    for name, path in [("clip.weights", update["clip"].weights), ("normal.dir", _dir(update))]:
        if path is not None and not path.exists():
            raise RecipeError(f"{name}: {path} does not exist")
    return recipe.model_copy(update=update)


def _dir(update: dict) -> Path | None:
    return update["normal"].dir if "normal" in update else None


# -- the build ---------------------------------------------------------------------------------
def build_clip_bundle(recipe: ClipRecipe, out: Path) -> Bundle:
    """Train what the recipe asks for and write the bundle at ``out`` (must not exist)."""
    import torch

    from export.clip_anomaly import Describer as Shipping
    from export.clip_anomaly import write_bundle
    from train.clip_anomaly.net import ClipAnomalyNet
    from train.clip_anomaly.train import build_focuser, fit_focuser
    from train.clip_anomaly.vvclip import VVClipVision, preprocess_stats

    torch.manual_seed(recipe.seed)
    taxonomy = recipe.taxonomy.build()
    clip, tokenizer = _clip(recipe.clip)
    mean, std = recipe.clip.mean, recipe.clip.std
    if mean is None or std is None:
        mean, std = preprocess_stats(clip)
    size = tuple(clip.visual.image_size)
    samples = _samples(recipe, size, mean, std) if recipe.data else []
    descriptions = sorted({s.description for s in samples if not s.normal and s.description})
    shipping = None
    if recipe.describer:
        model, lm_tokenizer = _fit_describer(
            recipe, clip, tokenizer, taxonomy, samples, descriptions
        )
        net = ClipAnomalyNet(model.vision, model.focuser, recipe.clip.global_weight, model.adapter)
        source = recipe.describer.lm
        gguf = source.path / source.gguf_file if source.path and source.gguf_file else None
        shipping = Shipping(
            model.lm, lm_tokenizer, recipe.describer.quant, recipe.describer.max_tokens, gguf
        )
    else:
        vision = VVClipVision(clip.visual, recipe.clip.blocks)
        blocks = len(recipe.clip.blocks)
        focuser = build_focuser(clip, tokenizer, taxonomy, recipe.clip.object, blocks, descriptions)
        if recipe.focuser and recipe.focuser.steps:
            batches = _batches(samples, recipe.focuser.batch_size, None)
            history = fit_focuser(
                vision, focuser, batches, recipe.focuser.steps, lr=recipe.focuser.lr
            )
            log.info("focuser loss %.4f -> %.4f", history[0], history[-1])
        net = ClipAnomalyNet(vision, focuser, recipe.clip.global_weight)
    shots, names = _shots(recipe.normal, size, mean, std) if recipe.normal else (None, [])
    return write_bundle(
        out,
        net.eval(),
        taxonomy=taxonomy,
        object_name=recipe.clip.object,
        mean=mean,
        std=std,
        shots=shots,
        shot_names=names,
        few_shot=shots is not None,
        sigma=recipe.clip.sigma,
        describer=shipping,
    )


def _clip(spec: Clip):
    import open_clip

    from train.clip_anomaly.vvclip import TINY_TEXT, load_clip, tiny_clip

    if spec.name == TINY:
        context = TINY_TEXT["context_length"]
        return tiny_clip(seed=0), functools.partial(open_clip.tokenize, context_length=context)
    return load_clip(spec.name, spec.weights), open_clip.get_tokenizer(spec.name)


def _fit_describer(recipe, clip, tokenizer, taxonomy, samples, descriptions):
    import torch

    from train.clip_anomaly.adapter import DefectAdapter, DescriptionModel
    from train.clip_anomaly.train import build_focuser, fit
    from train.clip_anomaly.vvclip import VVClipVision
    from train.model import build_language_model
    from train.tokenizer import build_tokenizer

    spec = recipe.describer
    lm_tokenizer = build_tokenizer(spec.lm)
    lm = build_language_model(spec.lm, lm_tokenizer)
    vision = VVClipVision(clip.visual, recipe.clip.blocks)
    blocks = len(recipe.clip.blocks)
    focuser = build_focuser(clip, tokenizer, taxonomy, recipe.clip.object, blocks, descriptions)
    width = lm.get_input_embeddings().embedding_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        adapter = DefectAdapter(
            focuser.base_states.shape[-1], width, spec.grid, spec.hidden, spec.prompt_embeddings
        )
    model = DescriptionModel(vision, focuser, adapter, lm)
    history = fit(model, _batches(samples, spec.batch_size, lm_tokenizer), spec.steps, lr=spec.lr)
    log.info("eq. 14 loss %.4f -> %.4f", history[0]["total"], history[-1]["total"])
    return model, lm_tokenizer


def _batches(samples, batch_size: int, lm_tokenizer) -> list[dict]:
    from train.clip_anomaly.train import image_batch, make_batch

    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    if lm_tokenizer is not None:
        return [make_batch(chunk, lm_tokenizer) for chunk in chunks]
    return [image_batch(chunk) for chunk in chunks]


def _pixels(rgb: np.ndarray, size: tuple[int, int], mean, std):
    """One RGB image resized (bilinear, PIL) and normalised exactly as the runtime does."""
    import torch

    from appliance.anomaly.clip_branch import preprocess

    return torch.from_numpy(preprocess([rgb], size, mean, std)[0])


def _samples(recipe: ClipRecipe, size: tuple[int, int], mean, std) -> list:
    """Training samples from ``[data]``: pixels, normal flag, patch mask, description."""
    import torch
    from PIL import Image

    from appliance.anomaly.enroll import load_rgb
    from train.clip_anomaly.train import Sample
    from train.data.readers import read_dataset

    spec = recipe.data
    options = {"classes": list(spec.classes)} if spec.format == "yolo" and spec.classes else {}
    records = read_dataset(spec.path, spec.format, **options)
    if not records:
        raise ValueError(f"data.path: {spec.path} holds no {spec.format} records")
    height, width = size
    samples = []
    for record in records:
        rgb = load_rgb(record.image)
        mask = np.zeros((height, width), np.float32)
        mask_file = record.image.with_suffix(spec.mask_suffix) if spec.mask_suffix else None
        if mask_file is not None and mask_file.is_file():
            with Image.open(mask_file) as image:
                small = image.convert("L").resize((width, height), Image.Resampling.NEAREST)
            mask = (np.asarray(small) > 127).astype(np.float32)
        else:
            sx, sy = width / record.width, height / record.height
            for obj in record.objects:
                x1, y1, x2, y2 = obj.bbox
                mask[int(y1 * sy) : int(np.ceil(y2 * sy)), int(x1 * sx) : int(np.ceil(x2 * sx))] = 1
        labels = sorted({obj.label.replace("_", " ") for obj in record.objects})
        normal = not record.objects and not mask.any()
        text = record.description or (
            f"{recipe.clip.object} with {' and '.join(labels)}" if labels else ""
        )
        pixels = _pixels(rgb, size, mean, std)
        samples.append(Sample(pixels, normal, torch.from_numpy(mask), "" if normal else text))
    log.info("%d training images (%d normal)", len(samples), sum(s.normal for s in samples))
    return samples


def _shots(spec: Normal, size: tuple[int, int], mean, std):
    import torch

    from appliance.anomaly.enroll import load_rgb

    images = find_images(spec.dir)
    if not images:
        raise ValueError(f"normal.dir: {spec.dir} holds no images")
    if len(images) > spec.shots:
        picked = np.random.default_rng(spec.seed).choice(len(images), spec.shots, replace=False)
        images = [images[i] for i in sorted(picked)]
    pixels = torch.stack([_pixels(load_rgb(p), size, mean, std) for p in images])
    return pixels, [str(p.relative_to(spec.dir)) for p in images]


def summary(bundle: Bundle) -> dict:
    section = bundle.manifest["clip_anomaly"]
    description = section.get("description")
    return {
        "bundle": str(bundle.path),
        "id": bundle.id,
        "mode": section["mode"],
        "shots": len(section["shots"]),
        "image_threshold": section["image_threshold"],
        "description": description["language_model"] if description else "templated",
        "parity": bundle.manifest.get("parity", {}),
    }

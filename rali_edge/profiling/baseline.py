"""The MLLM baseline for `rali-edge profile --baseline qinsight`: Q-Insight's scoring request.

Q-Insight (bytedance/Q-Insight, `src/eval/demo_score.py`) scores an image with Qwen2.5-VL-7B:
a system prompt asking for `<think>...</think><answer>...</answer>`, a user turn with the image
and the rating question, sampled generation (temperature 1.0, top-k 50, top-p 0.95, up to 1024
new tokens), and the rating read from the `<answer>` JSON with the regexes of its reward.

Two modes:
- weights (`--baseline-model PATH`): the real model and its processor (tokenizer, chat template,
  image processor) with `from_pretrained`; generation stops at `</answer>` (or end of turn).
- random weights (`--baseline-random-weights`): the Qwen2.5-VL architecture from a config (the
  7B one, or a tiny one for tests) with random weights, and exactly `answer_tokens` new tokens
  forced. That measures what the architecture costs for one Q-Insight request, not what the
  model says; reports label it so. Without a tokenizer (none can be downloaded here) the prompt
  is a sequence of ordinary token ids as long as the real prompt is estimated to be, laid out
  like Qwen2.5-VL's chat template, with the real number of image placeholder tokens.

The image goes to the image processor as a PIL image. Q-Insight's demo first resizes it with
qwen_vl_utils (to multiples of 28 pixels between 4*28*28 and 16384*28*28 pixels); the processor's
own resize has the same bounds in Qwen2.5-VL's preprocessor config, so the number of image tokens,
and so the cost, is the same.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rali_edge.errors import MissingDependencyError, ModelFormatError, RaliEdgeError

# ---------------------------------------------------------------- the request (Q-Insight's demo_score.py)

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here "
    "</answer>"
)
USER_PROMPT = (
    "What is your overall rating on the quality of this picture? The rating should be a float between "
    "1 and 5, rounded to two decimal places, with 1 representing very poor quality and 5 representing "
    'excellent quality. Return the final answer in JSON format with the following keys: "rating": The score.'
)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
RATING_RE = re.compile(r'"rating"\s*:\s*([\d\.]+)')
STOP_STRING = "</answer>"
# Q-Insight's demo generation settings.
GENERATION = {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "max_new_tokens": 1024}

# Random-weights mode generates this many tokens per image unless told otherwise.
TYPICAL_ANSWER_TOKENS = 200
TYPICAL_ANSWER_BASIS = (
    "an estimate, not a measurement: a Q-Insight answer is one <think> paragraph of a few sentences "
    "(about 100-170 English words, about 1.3 Qwen tokens per word: 130-220 tokens) followed by "
    '<answer>{"rating": x.xx}</answer> (about 20 tokens); 200 tokens is taken as typical. '
    "Run with --baseline-model to count the real answers, or set --baseline-tokens."
)
# Without a tokenizer, prompt text is counted at this many characters per token (English prose
# with Qwen's 151k-token BPE is about 4-5). The prompt text is ~190 tokens next to ~1000 image
# tokens for a 1024x768 photo, so a 20% error here moves the prefill cost by ~3%.
CHARS_PER_TOKEN_ESTIMATE = 4.0

# ---------------------------------------------------------------- architectures

# Qwen2.5-VL-7B-Instruct's config.json (what Q-Insight fine-tunes), flat as on the hub so that
# every transformers version reads it the way from_pretrained would.
QWEN25VL_7B = {
    "model_type": "qwen2_5_vl",
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "hidden_act": "silu", "max_position_embeddings": 128000, "max_window_layers": 28,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}
# A few-layer model with the same structure, for tests on a CPU (head_dim 16: mrope 2+3+3).
QWEN25VL_TINY = {
    **{k: v for k, v in QWEN25VL_7B.items() if k != "vision_config"},
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_window_layers": 2, "max_position_embeddings": 4096,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "bos_token_id": 505, "eos_token_id": 505,
    "vision_start_token_id": 502, "vision_end_token_id": 503, "vision_token_id": 504,
    "image_token_id": 500, "video_token_id": 501,
    "vision_config": {**QWEN25VL_7B["vision_config"], "depth": 2, "hidden_size": 32, "intermediate_size": 64,
                      "num_heads": 2, "out_hidden_size": 64, "fullatt_block_indexes": [1]},
}
ARCHITECTURES = {"7b": QWEN25VL_7B, "tiny": QWEN25VL_TINY}
# Image processor bounds: Qwen2.5-VL's preprocessor_config.json (= qwen_vl_utils' image bounds).
# The tiny architecture caps images at 112x112 pixels so that a CPU test stays fast.
IMAGE_PIXELS = {"7b": (3136, 12845056), "tiny": (3136, 112 * 112)}


def parse_rating(text: str | None) -> float | None:
    """The rating in a Q-Insight answer, as its reward reads it; None when there is none."""
    if not text:
        return None
    answer = ANSWER_RE.search(text)
    if answer is None:
        return None
    rating = RATING_RE.search(answer.group(1))
    if rating is None:
        return None
    try:
        return float(rating.group(1))
    except ValueError:  # e.g. "3.5.1" matches [\d\.]+ but is not a number
        return None


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(
            "--baseline qinsight needs the `transformers` package: pip install 'rali-edge[baseline]'"
        ) from None
    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        raise MissingDependencyError(
            f"transformers {transformers.__version__} has no Qwen2.5-VL; pip install 'transformers>=4.49'"
        )
    return transformers


def check_transformers_installed() -> None:
    """Fail early (exit 4) without importing transformers: importing it early would add its
    memory to RALI's peak host memory in the report."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise MissingDependencyError(
            "--baseline qinsight needs the `transformers` package: pip install 'rali-edge[baseline]'"
        )


def _dtype_kwarg(transformers) -> str:
    # transformers 5 renamed `torch_dtype` to `dtype` (4.56+ accept both).
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def architecture_config(name: str):
    """A Qwen2_5_VLConfig for "7b" or "tiny", or from a folder's config.json."""
    transformers = import_transformers()
    if name in ARCHITECTURES:
        return transformers.Qwen2_5_VLConfig(**ARCHITECTURES[name])
    return transformers.AutoConfig.from_pretrained(name)


def resolve_model_folder(path: str | Path) -> Path:
    """A Q-Insight download keeps the scoring model in `score_degradation/`; accept either."""
    path = Path(path)
    if (path / "score_degradation" / "config.json").is_file():
        return path / "score_degradation"
    if not (path / "config.json").is_file():
        raise ModelFormatError(
            f"{path}: no config.json (nor score_degradation/config.json); expected a Qwen2.5-VL model "
            "folder such as ByteDance/Q-Insight's score_degradation"
        )
    return path


# ---------------------------------------------------------------- one request


@dataclass
class Request:
    """One image's model inputs, ready on the device."""

    inputs: dict
    prompt_tokens: int  # everything before the answer, image placeholders included
    image_tokens: int
    image_size: tuple[int, int]  # (width, height) the image processor resized to


@dataclass
class Generation:
    new_tokens: int
    prefill_ms: float  # vision tower + prompt, up to the first token's logits
    generation_ms: float  # the remaining tokens, one forward pass each
    text: str | None = None  # None in random-weights mode (no tokenizer, meaningless tokens)
    rating: float | None = None


class _FirstLogits:
    """A logits processor that marks when the first token's logits exist (end of prefill).
    On CUDA it records an event on the stream, so it costs no synchronisation."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.mark = None

    def __call__(self, input_ids, scores):
        if self.mark is None:
            if self.cuda:
                self.mark = torch.cuda.Event(enable_timing=True)
                self.mark.record()
            else:
                self.mark = time.perf_counter()
        return scores


@dataclass
class BaselineInfo:
    """What the report says about the baseline."""

    name: str
    mode: str  # "weights" or "random-weights"
    architecture: str
    parameters: int
    dtype: str
    device: str
    generation: dict
    answer_tokens: int | None  # forced count in random-weights mode
    answer_tokens_basis: str | None
    prompt_tokens_counted: bool  # False: estimated from characters (no tokenizer)
    attention: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class QInsightBaseline:
    """Q-Insight's scoring request on a Qwen2.5-VL model. Use `from_weights` or `random_weights`."""

    def __init__(self, model, processor, image_processor, device: torch.device, dtype: torch.dtype,
                 mode: str, architecture: str, answer_tokens: int | None, seed: int = 0):
        self.model, self.processor, self.image_processor = model, processor, image_processor
        self.device, self.dtype, self.mode = device, dtype, mode
        self.architecture = architecture
        self.answer_tokens = answer_tokens
        self.config = model.config
        self._takes_mm_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
        self._filler = torch.Generator().manual_seed(seed)

    # -- construction
    @classmethod
    def from_weights(cls, path, device="cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
        transformers = import_transformers()
        folder = resolve_model_folder(path)
        device = torch.device(device)
        processor = load_processor(transformers, folder)
        kwargs = {_dtype_kwarg(transformers): dtype}
        if device.type == "cuda" and _can_device_map(transformers):
            kwargs["device_map"] = str(device)  # straight to the GPU, no full copy in host memory
        try:
            model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise MissingDependencyError(_oom_message(dtype, device)) from None
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{folder}: cannot load Qwen2.5-VL weights ({e})") from None
        model = _to_device(model, device)
        return cls(model, processor, None, device, dtype, "weights", str(folder), None, seed)

    @classmethod
    def random_weights(cls, architecture: str = "7b", device="cpu", dtype: torch.dtype = torch.bfloat16,
                       answer_tokens: int = TYPICAL_ANSWER_TOKENS, seed: int = 0):
        """Random weights in the architecture "7b", "tiny", or a folder's config.json. A folder
        that also has a processor (tokenizer, chat template) gives the exact prompt; else the
        prompt length is estimated (module doc)."""
        transformers = import_transformers()
        device = torch.device(device)
        if architecture not in ARCHITECTURES:
            architecture = str(resolve_model_folder(architecture))
        config = architecture_config(architecture)
        processor = None
        if architecture not in ARCHITECTURES:
            try:
                processor = load_processor(transformers, architecture)
            except ModelFormatError:
                processor = None  # a bare config.json: estimate the prompt as for "7b"
        image_processor = None if processor is not None else _image_processor(transformers, architecture)
        torch.manual_seed(seed)
        try:
            # Built directly on the device, in the dtype: a 7B model never passes through host fp32.
            with torch.device(device):
                model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
                    config, **{_dtype_kwarg(transformers): dtype}
                )
        except torch.cuda.OutOfMemoryError:
            raise MissingDependencyError(_oom_message(dtype, device)) from None
        model.eval()
        return cls(model, processor, image_processor, device, dtype, "random-weights", architecture,
                   int(answer_tokens), seed)

    # -- facts
    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def info(self) -> BaselineInfo:
        settings = dict(GENERATION)
        if self.mode == "random-weights":
            settings.update(min_new_tokens=self.answer_tokens, max_new_tokens=self.answer_tokens)
        else:
            settings["stop_strings"] = [STOP_STRING]
        notes = []
        if self.mode == "random-weights":
            notes.append("random weights: an architecture-cost measurement; the answers are meaningless "
                         f"and exactly {self.answer_tokens} new tokens are generated per image")
            if self.processor is None:
                notes.append(f"no tokenizer: prompt text length estimated at {CHARS_PER_TOKEN_ESTIMATE:g} "
                             "characters per token; image placeholder tokens are exact")
        return BaselineInfo(
            name="Q-Insight", mode=self.mode, architecture=self.architecture, parameters=self.parameters,
            dtype=str(self.dtype).replace("torch.", ""), device=str(self.device), generation=settings,
            answer_tokens=self.answer_tokens,
            answer_tokens_basis=self._answer_basis(),
            prompt_tokens_counted=self.processor is not None,
            attention=str(getattr(self.config, "_attn_implementation", None) or "default"), notes=notes,
        )

    def _answer_basis(self) -> str | None:
        if self.mode != "random-weights":
            return None
        if self.answer_tokens == TYPICAL_ANSWER_TOKENS:
            return TYPICAL_ANSWER_BASIS
        return (f"{self.answer_tokens} tokens, set with --baseline-tokens (the default, "
                f"{TYPICAL_ANSWER_TOKENS}, is {TYPICAL_ANSWER_BASIS})")

    # -- the request
    def messages(self, image) -> list[dict]:
        return [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": USER_PROMPT}]},
        ]

    def prepare(self, image) -> Request:
        """An RGB PIL image -> the model inputs of Q-Insight's request, on the device."""
        if self.processor is not None:
            text = self.processor.apply_chat_template(self.messages(image), tokenize=False, add_generation_prompt=True)
            inputs = dict(self.processor(text=[text], images=[image], return_tensors="pt"))
            grid = inputs["image_grid_thw"]
        else:
            vision = self.image_processor(images=[image], return_tensors="pt")
            grid = vision["image_grid_thw"]
            inputs = {"pixel_values": vision["pixel_values"], "image_grid_thw": grid,
                      "input_ids": self._estimated_prompt(_image_tokens(grid, self.config))}
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            if self._takes_mm_types:
                inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.config.image_token_id).int()
        if not self._takes_mm_types:
            inputs.pop("mm_token_type_ids", None)
        inputs.pop("token_type_ids", None)
        patch = self.config.vision_config.patch_size
        _, gh, gw = (int(v) for v in grid[0])
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return Request(inputs, int(inputs["input_ids"].shape[1]), _image_tokens(grid, self.config), (gw * patch, gh * patch))

    def _estimated_prompt(self, image_tokens: int) -> torch.Tensor:
        """Qwen2.5-VL's chat template as token ids, with ordinary tokens standing for the text:
        <|im_start|>system\\n SYSTEM <|im_end|>\\n <|im_start|>user\\n <|vision_start|> IMAGE*n
        <|vision_end|> USER <|im_end|>\\n <|im_start|>assistant\\n"""
        cfg = self.config
        im_end = _eos_id(cfg)
        im_start = im_end - 1  # Qwen's <|im_start|> precedes <|im_end|> (151644, 151645)
        first_special = min(cfg.image_token_id, cfg.vision_start_token_id, im_start)
        # The text's stand-ins must be ordinary tokens; which ones does not change the cost.
        def words(n):
            return torch.randint(0, first_special, (n,), generator=self._filler).tolist()

        role, newline = words(1), words(1)
        n_sys = math.ceil(len(SYSTEM_PROMPT) / CHARS_PER_TOKEN_ESTIMATE)
        n_user = math.ceil(len(USER_PROMPT) / CHARS_PER_TOKEN_ESTIMATE)
        ids = (
            [im_start] + role + newline + words(n_sys) + [im_end] + newline
            + [im_start] + role + newline
            + [cfg.vision_start_token_id] + [cfg.image_token_id] * image_tokens + [cfg.vision_end_token_id]
            + words(n_user) + [im_end] + newline
            + [im_start] + role + newline
        )
        return torch.tensor([ids], dtype=torch.long)

    @torch.inference_mode()
    def generate(self, request: Request, max_new_tokens: int | None = None, logits_processors=()) -> Generation:
        """Run the request. `max_new_tokens` overrides the length (warm-up); `logits_processors`
        are added after ours (tests use one to force an answer)."""
        transformers = import_transformers()
        first = _FirstLogits(self.device)
        kwargs = dict(GENERATION)
        if self.mode == "random-weights":
            n = self.answer_tokens if max_new_tokens is None else max_new_tokens
            # Exactly n tokens: min_new_tokens masks the end-of-turn token until n are out.
            kwargs.update(min_new_tokens=n, max_new_tokens=n, remove_invalid_values=True)
        else:
            if max_new_tokens is not None:
                kwargs["max_new_tokens"] = max_new_tokens
            kwargs.update(stop_strings=[STOP_STRING], tokenizer=self.processor.tokenizer)
        pad = self.config.text_config.pad_token_id if hasattr(self.config, "text_config") else None
        kwargs["pad_token_id"] = pad if pad is not None else _eos_id(self.config)
        processors = transformers.LogitsProcessorList([first, *logits_processors])
        start = _now(self.device)
        try:
            out = self.model.generate(**request.inputs, logits_processor=processors, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise MissingDependencyError(_oom_message(self.dtype, self.device)) from None
        end = _now(self.device)
        new = out[0, request.inputs["input_ids"].shape[1]:]
        prefill_ms, generation_ms = _split_ms(start, first.mark, end, self.device)
        gen = Generation(new_tokens=int(new.numel()), prefill_ms=prefill_ms, generation_ms=generation_ms)
        if self.processor is not None and self.mode == "weights":
            gen.text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
            gen.rating = parse_rating(gen.text)
        return gen


# ---------------------------------------------------------------- processor


def load_processor(transformers, folder):
    """The folder's Qwen2.5-VL processor. transformers 5's Qwen2_5_VLProcessor insists on a video
    processor, which needs torchvision; without it the same pieces (the tokenizer with its chat
    template, the image processor) are put together by AssembledProcessor."""
    try:
        return transformers.AutoProcessor.from_pretrained(str(folder))
    except Exception as e:
        auto_error = f"{type(e).__name__}: {e}"
    try:
        return AssembledProcessor.from_folder(transformers, folder)
    except Exception as e:
        raise ModelFormatError(
            f"{folder}: cannot load the Qwen2.5-VL processor (AutoProcessor: {auto_error}; tokenizer and "
            f"image processor: {type(e).__name__}: {e}); the folder needs preprocessor_config.json, the "
            "tokenizer files and the chat template, as in Qwen/Qwen2.5-VL-7B-Instruct"
        ) from None


class AssembledProcessor:
    """What Qwen2_5_VLProcessor does for one image: render the chat template, widen the single
    `<|image_pad|>` into one placeholder per merged image patch, tokenize."""

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_processor, chat_template: str | None):
        self.tokenizer, self.image_processor, self.chat_template = tokenizer, image_processor, chat_template

    @classmethod
    def from_folder(cls, transformers, folder):
        folder = Path(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        image_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
        image_processor = image_cls.from_pretrained(str(folder))
        template = None  # processors keep their template beside the tokenizer's
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").is_file():
            import json

            template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        return cls(tokenizer, image_processor, template or tokenizer.chat_template)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, text, images, return_tensors="pt"):
        vision = self.image_processor(images=images, return_tensors=return_tensors)
        merge = self.image_processor.merge_size
        counts = iter(int(g.prod()) // (merge * merge) for g in vision["image_grid_thw"])
        marker = "<|placeholder|>"  # so that widened placeholders are not widened again
        expanded = []
        for t in text:
            while self.image_token in t:
                t = t.replace(self.image_token, marker * next(counts), 1)
            expanded.append(t.replace(marker, self.image_token))
        tokens = self.tokenizer(expanded, return_tensors=return_tensors)
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        return {**tokens, **vision, "mm_token_type_ids": (tokens["input_ids"] == image_id).int()}


# ---------------------------------------------------------------- helpers


def _image_processor(transformers, architecture: str):
    """Qwen2-VL's image processor, built locally (no hub): the PIL one in transformers 5, the
    slow one in 4.x. Bounds as Qwen2.5-VL's preprocessor_config.json (tiny: capped for speed)."""
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    min_pixels, max_pixels = IMAGE_PIXELS.get(architecture, IMAGE_PIXELS["7b"])
    return cls(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2)


def _image_tokens(grid: torch.Tensor, config) -> int:
    merge = config.vision_config.spatial_merge_size
    return int(grid[0].prod()) // (merge * merge)


def _eos_id(config) -> int:
    text = getattr(config, "text_config", config)
    eos = getattr(text, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        raise RaliEdgeError("the baseline config has no eos_token_id")
    return int(eos)


def _can_device_map(transformers) -> bool:
    # transformers 4.x needs accelerate for device_map; 5.x loads to a device by itself.
    if int(transformers.__version__.split(".")[0]) >= 5:
        return True
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _to_device(model, device: torch.device):
    try:
        return model.to(device).eval()
    except torch.cuda.OutOfMemoryError:
        raise MissingDependencyError(_oom_message(model.dtype, device)) from None


def _oom_message(dtype, device) -> str:
    return (
        f"the baseline model does not fit in the memory of {device} in {str(dtype).replace('torch.', '')} "
        "(Qwen2.5-VL-7B needs about 17 GB in bf16, plus activations); use a larger GPU, or "
        "--baseline-config tiny to check the pipeline"
    )


def _now(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _split_ms(start, mark, end, device: torch.device) -> tuple[float, float]:
    """(prefill, generation) in ms from the start, first-logits and end marks."""
    if device.type == "cuda":
        end.synchronize()
        total = start.elapsed_time(end)
        prefill = start.elapsed_time(mark) if mark is not None else total
    else:
        total = (end - start) * 1000.0
        prefill = (mark - start) * 1000.0 if mark is not None else total
    return float(prefill), float(max(0.0, total - prefill))


__all__ = [
    "SYSTEM_PROMPT", "USER_PROMPT", "GENERATION", "STOP_STRING", "TYPICAL_ANSWER_TOKENS",
    "TYPICAL_ANSWER_BASIS", "QWEN25VL_7B", "QWEN25VL_TINY", "parse_rating", "QInsightBaseline",
    "BaselineInfo", "Request", "Generation", "import_transformers", "check_transformers_installed",
    "architecture_config", "load_processor", "AssembledProcessor",
]

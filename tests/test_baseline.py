"""The Q-Insight baseline (rali_edge/profiling/baseline.py): the rating parser, the 7B architecture,
and the real-weights path on a tiny Qwen2.5-VL saved with its own small tokenizer, chat template
and image processor, where a forced answer checks the stop at </answer> and the parsed rating."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rali_edge.errors import MissingDependencyError, ModelFormatError
from rali_edge.profiling import baseline as B

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("text, rating", [
    ('<think>Sharp, well exposed.</think><answer>{"rating": 3.47}</answer>', 3.47),
    ('<think>a\nb</think>\n<answer>\n{"rating" : 4}\n</answer>', 4.0),  # newlines, spaces, an integer
    ('<answer>{"rating": 2.5}</answer> then <answer>{"rating": 1.0}</answer>', 2.5),  # the first answer
    ('<think>no answer tag</think>{"rating": 3.0}', None),
    ('<answer>{"score": 3.0}</answer>', None),
    ('<answer>{"rating": 3.5.1}</answer>', None),  # matches [\d\.]+ but is not a number
    ("", None),
    (None, None),
])
def test_parse_rating_reads_answers_like_the_reward(text, rating):
    assert B.parse_rating(text) == rating


def test_7b_architecture_has_qwen25vl_7b_parameter_count():
    # Reference: Qwen/Qwen2.5-VL-7B-Instruct's model.safetensors.index.json says total_size
    # 16,584,333,312 bytes of bf16 = 8,292,166,656 parameters. Built on the meta device: no memory.
    config = B.architecture_config("7b")
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656
    assert config.vision_config.depth == 32 and config.text_config.num_hidden_layers == 28


def test_7b_image_tokens_for_a_koniq_sized_photo():
    # 1024x768 -> smart_resize to multiples of 28 (1036x756 after rounding): 37*27 merged patches.
    ip = B._image_processor(transformers, "7b")
    grid = ip(images=[Image.new("RGB", (1024, 768))], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 54, 74]] and int(grid.prod()) // 4 == 999


def test_missing_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"rali-edge\[baseline\]"):
        B.import_transformers()
    with pytest.raises(MissingDependencyError, match=r"rali-edge\[baseline\]"):
        B.check_transformers_installed()


def test_model_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelFormatError, match="config.json"):
        B.QInsightBaseline.from_weights(tmp_path)


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# The shape of Qwen2.5-VL's chat template for a system turn and a user turn with an image.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ANSWER = '<think>Fine detail, mild noise.</think><answer>{"rating": 3.25}</answer>'


@pytest.fixture(scope="module")
def tiny_qinsight(tmp_path_factory):
    """A Q-Insight-shaped download: q-insight/score_degradation/ with a tiny random Qwen2.5-VL, a
    byte-level BPE tokenizer trained on the prompts, the chat template and the image processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([B.SYSTEM_PROMPT, B.USER_PROMPT, ANSWER] * 3, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>", chat_template=TEMPLATE)
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    config = transformers.Qwen2_5_VLConfig(**{
        **B.QWEN25VL_TINY, "vocab_size": tok.get_vocab_size(), "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"], "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"], "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"]})
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("q-insight")
    folder = root / "score_degradation"
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    B._image_processor(transformers, "tiny").save_pretrained(folder)
    return root, tokenizer


class ForceText:
    """Logits processor that makes the model write `ids` (then repeat the last one)."""

    def __init__(self, ids, prompt_len):
        self.ids, self.prompt_len = ids, prompt_len

    def __call__(self, input_ids, scores):
        i = min(input_ids.shape[1] - self.prompt_len, len(self.ids) - 1)
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.ids[i]] = 0.0
        return forced


def test_real_weights_request_stops_at_answer_and_parses_the_rating(tiny_qinsight):
    root, tokenizer = tiny_qinsight
    baseline = B.QInsightBaseline.from_weights(root, device="cpu", dtype=torch.float32)  # finds score_degradation/
    assert baseline.mode == "weights" and baseline.architecture.endswith("score_degradation")
    image = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    request = baseline.prepare(image)

    # The prompt is Q-Insight's: system prompt, then the image and the question, then the assistant turn.
    prompt = tokenizer.decode(request.inputs["input_ids"][0])
    image_pads = "<|image_pad|>" * request.image_tokens
    assert prompt == (f"<|im_start|>system\n{B.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                      f"{image_pads}<|vision_end|>{B.USER_PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    # 300x400 capped at 112x112 pixels by the tiny processor -> 84x112 -> 6x8 patches -> 12 tokens.
    assert request.image_tokens == 12 and request.image_size == (112, 84)
    assert request.inputs["pixel_values"].shape == (48, 3 * 2 * 14 * 14)

    answer_ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    extra_ids = tokenizer.encode(" and more text after the answer", add_special_tokens=False)
    gen = baseline.generate(request, logits_processors=[ForceText(answer_ids + extra_ids, request.prompt_tokens)])
    # Generation stops right after </answer>: nothing of the extra text was generated.
    assert gen.new_tokens == len(answer_ids)
    assert gen.text == ANSWER and gen.rating == 3.25
    assert gen.prefill_ms > 0 and gen.generation_ms >= 0

    info = baseline.info()
    assert info.generation["stop_strings"] == ["</answer>"] and info.generation["max_new_tokens"] == 1024
    assert info.generation["do_sample"] and info.generation["top_k"] == 50 and info.generation["top_p"] == 0.95
    assert info.parameters == sum(p.numel() for p in baseline.model.parameters())


def test_random_weights_with_a_folder_uses_its_tokenizer(tiny_qinsight):
    root, tokenizer = tiny_qinsight
    baseline = B.QInsightBaseline.random_weights(str(root), device="cpu", dtype=torch.float32, answer_tokens=5)
    assert baseline.mode == "random-weights" and baseline.processor is not None
    assert baseline.info().prompt_tokens_counted
    request = baseline.prepare(Image.new("RGB", (64, 64), (120, 30, 200)))
    assert B.SYSTEM_PROMPT in tokenizer.decode(request.inputs["input_ids"][0])
    gen = baseline.generate(request)
    assert gen.new_tokens == 5 and gen.text is None and gen.rating is None

"""Regenerate the tiny Qwen2-style tokenizer in `shared/vitaserve/models/assets/tiny_tokenizer/`.

The real VITA-1.5 tokenizer is Qwen2's byte-level BPE (152k entries). The tiny LLM has a vocabulary of
1024, so this script trains, offline and deterministically, a byte-level BPE with the same normaliser
(NFC), pre-tokenizer (Qwen2 split regex + ByteLevel without prefix space), post-processor and decoder,
on text written below, and saves it in the released file layout (tokenizer.json, vocab.json,
merges.txt, tokenizer_config.json, special_tokens_map.json) without a chat template.

Ids: 0..1020 are the trained BPE vocabulary (256 byte symbols + 765 merges); the special tokens are
added at the end of the id range, in the real tokenizer's order:
    <|endoftext|> 1021 (real 151643), <|im_start|> 1022 (real 151644), <|im_end|> 1023 (real 151645).

Usage: python tools/make_tiny_tokenizer.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "shared" / "vitaserve" / "models" / "assets"
DEFAULT_OUT = ASSETS / "tiny_tokenizer"

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TRAINED_SIZE = VOCAB_SIZE - len(SPECIAL_TOKENS)

# The split regex of transformers' Qwen2Tokenizer (identical to the released tokenizer.json).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

ENGLISH = """\
Hello, how are you today? I am fine, thank you.
What is in this picture? The picture shows a red circle on a blue and green background.
Please describe the image in detail. There is a small red disk near the left side.
Can you hear me? Yes, I can hear you clearly.
What time is it now? It is about three o'clock in the afternoon.
The weather is nice today, so we can go for a walk in the park.
I see a cat sitting on the table, and a dog sleeping under the chair.
This video shows a person walking along the street at night.
Could you tell me a short story about a robot who learns to sing?
Once upon a time, there was a little robot named Vita. She loved music and wanted to sing.
The answer is 42. The sum of 17 and 25 is 42, and 6 times 7 is also 42.
Let me think about that for a moment. I think the best answer is the second one.
Sorry, I made a mistake. The correct answer is 3.14, not 3.41.
Thank you for your question! If you have any other questions, feel free to ask.
The quick brown fox jumps over the lazy dog.
She sells sea shells by the sea shore, and the shells she sells are sea shells.
A multimodal model can see images, watch videos, listen to speech and talk back.
Speech recognition turns audio into text; speech synthesis turns text into audio.
The first sentence is spoken quickly, then the rest of the answer follows.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 448 1024 2025 16000 24000 3584.
Prices: $5.99, 12.5%, 3/4, 1,000,000 and 2:30 pm.
Is it raining? No, it is sunny! Really? Yes, really.
"Quoted text", 'single quotes', (parentheses), [brackets], {braces} and <angle brackets>.
Email me at vita@example.com or visit https://example.com/vita?lang=en&id=7.
Lists: first; second; third - and finally: the fourth item.
He said: "I'll be there at 8." We're ready, they've left, it's late, you'd agree.
Good morning! Good afternoon! Good evening! Good night!
Red, orange, yellow, green, blue, indigo and violet are the colors of the rainbow.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
January, February, March, April, May, June, July, August, September, October, November, December.
One, two, three, four, five, six, seven, eight, nine, ten.
The image is 800 pixels wide and 600 pixels high; the second one is 300 by 1200.
Please answer in English. Please answer in Chinese. Please speak more slowly.
I don't know the answer to that question, but I can try to help you find it.
Water boils at 100 degrees Celsius and freezes at 0 degrees.
The cat is black and white. The car is red. The sky is blue. The grass is green.
"""

CHINESE = """\
你好，我是VITA，很高兴认识你。
今天天气很好，我们去公园散步吧。
这张图片里有什么？图片里有一个红色的圆。
请详细描述这张图片。图片的左边有一个小红点。
你能听到我说话吗？是的，我能听清楚。
现在几点了？现在大约是下午三点。
我看到一只猫坐在桌子上，一只狗在椅子下面睡觉。
这个视频显示一个人晚上在街上走路。
你能给我讲一个关于机器人学唱歌的故事吗？
从前，有一个叫做维塔的小机器人，她喜欢音乐，也想唱歌。
答案是四十二。十七加二十五等于四十二。
让我想一想。我觉得第二个答案最好。
对不起，我犯了一个错误，正确的答案是三点一四。
谢谢你的问题！如果你还有其他问题，请随时问我。
红色、橙色、黄色、绿色、蓝色和紫色是彩虹的颜色。
一、二、三、四、五、六、七、八、九、十。
多模态大模型可以看图片、看视频、听语音，也可以说话。
请用中文回答。请用英文回答。请说慢一点。
水在一百摄氏度沸腾，在零度结冰。
你是谁？我是一个人工智能助手。
这是什么？那是什么？为什么？怎么办？好的！没问题！
"""

STATE_MARKS = """\
☞ 你好，我是VITA。
☞ Hello, I am VITA.
☜ 好的，我来回答这个问题。
☜ Sure, here is the answer.
☟
☞你好！☜谢谢。☟
"""

PUNCTUATION = """\
， 。 ？ ！ 、 ： ； “ ” ‘ ’ （ ） 《 》 … — ～
, . ? ! ; : ' " ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `
0123456789 00 01 10 99 2024 2025
"""


def corpus() -> list[str]:
    """The training text: the prompt format's system prompts plus the fixed text above."""
    fmt = json.loads((ASSETS / "prompt_format.json").read_text(encoding="utf-8"))
    texts = list(fmt["system_prompts"].values()) + list(fmt["realtime_server_system_prompts"].values())
    # Drop ChatML markers from the realtime copies: they become special tokens, not BPE text.
    texts = [t.replace("<|im_start|>", "").replace("<|im_end|>", "") for t in texts]
    for block in (ENGLISH, CHINESE, STATE_MARKS, PUNCTUATION):
        texts.extend(block.splitlines(keepends=True))
    return texts


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_SIZE,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != TRAINED_SIZE:
        raise SystemExit(f"trained vocabulary has {tok.get_vocab_size()} entries, expected {TRAINED_SIZE}; "
                         "add more training text")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == TRAINED_SIZE + i, t
    return tok


def _added_token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def write(tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    tok.model.save(str(out))  # vocab.json + merges.txt
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(tok.token_to_id(t)): _added_token_entry(t) for t in SPECIAL_TOKENS},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    special_tokens_map = {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": _added_token_entry("<|im_end|>"),
        "pad_token": _added_token_entry("<|endoftext|>"),
    }
    files = {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_tokens_map}
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    write(build(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Regenerate the small family's demo media: examples/media/scene.png and examples/media/small_question.wav.

scene.png is a real photo with a word painted on it, so that both halves of the small family's image
description have something to find: the EfficientNet-Lite0 classifier sees a cat and RapidOCR reads the
word "PIZZA" on a white sign in the lower right corner.

The photo is `examples/media/chelsea.png`, "Chelsea the cat" from scikit-image's sample data
(skimage/data/chelsea.png, 451x300): "No copyright restrictions. CC0 by the photographer (Stefan van der
Walt)." It is kept in the repository unchanged so that this tool runs on a fresh clone.

small_question.wav is 16 kHz mono PCM16 of the question "What animal is in this picture, and what word is
written on it?", spoken by hibari's bundled voice (af_heart, distilled from Kokoro-82M, Apache-2.0) through
the small family's `SpeechSynthesizer` with a fixed seed, resampled from 24 kHz with soxr, with a short
silence before and after (as a recording would have).

The sign's font is DejaVu Sans Bold (Debian's fonts-dejavu-core) when it is found, else PIL's built-in
font. Both outputs are deterministic for a given font and package versions.

Usage: python tools/make_small_demo_media.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile
import soxr
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "examples" / "media"
PHOTO = MEDIA / "chelsea.png"

WORD = "PIZZA"
QUESTION = "What animal is in this picture, and what word is written on it?"
QUESTION_SEED = 0
WAV_RATE = 16_000
PAD_SECONDS = 0.3
MAX_WIDTH = 512  # wider photos are scaled down (keeps the PNG small)

FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/TTF/DejaVuSans-Bold.ttf",
    "/Library/Fonts/DejaVuSans-Bold.ttf",
    "C:/Windows/Fonts/arialbd.ttf",
)


def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A bold TrueType font at `size` px: DejaVu Sans Bold if present, else PIL's built-in font."""
    for path in FONT_CANDIDATES:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)  # PIL also searches the system font dirs
    except OSError:
        return ImageFont.load_default(size=size)


def make_scene(photo: Path, word: str = WORD) -> Image.Image:
    """The photo with a white sign carrying `word` in large black letters in its lower right corner. The
    sign stays out of the middle, which the classifier's centre crop mostly sees."""
    img = Image.open(photo).convert("RGB")
    if img.width > MAX_WIDTH:
        img = img.resize((MAX_WIDTH, round(img.height * MAX_WIDTH / img.width)), Image.LANCZOS)
    draw = ImageDraw.Draw(img)
    font = load_font(max(16, img.height // 7))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    pad_x, pad_y, margin = img.height // 25, img.height // 30, img.height // 30
    sign_w, sign_h = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    x0, y0 = img.width - sign_w - margin, img.height - sign_h - margin
    draw.rounded_rectangle((x0, y0, x0 + sign_w, y0 + sign_h), radius=pad_y, fill="white", outline="black",
                           width=2)
    draw.text((x0 + pad_x - left, y0 + pad_y - top), word, font=font, fill="black")
    return img


def make_question_wav() -> np.ndarray:
    """The question as 16 kHz mono float32 (hibari at 24 kHz, resampled)."""
    from vitaserve.families.small.tts import SpeechSynthesizer

    tts = SpeechSynthesizer(threads=1)
    audio = np.concatenate(list(tts.synthesize(QUESTION, first_sentence=True, seed=QUESTION_SEED)))
    audio = soxr.resample(audio, tts.sample_rate, WAV_RATE, quality="HQ").astype(np.float32)
    pad = np.zeros(int(PAD_SECONDS * WAV_RATE), np.float32)
    return np.clip(np.concatenate([pad, audio, pad]), -1.0, 1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MEDIA, help="output directory (default: examples/media)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    scene = args.out / "scene.png"
    make_scene(PHOTO).save(scene, optimize=True)
    wav = args.out / "small_question.wav"
    soundfile.write(wav, make_question_wav(), WAV_RATE, subtype="PCM_16")
    for path in (scene, wav):
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()

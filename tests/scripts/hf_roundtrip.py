"""Load an exported model directory as a transformers user would (CLIPModel, AutoProcessor, the zero-shot pipeline)
with whichever transformers this interpreter imports, and write what came out as JSON for tests/test_export.py.

    python tests/scripts/hf_roundtrip.py EXPORT_DIR OUT.json

The images are non-square (64x48 and 48x64) so that the resize and crop rules matter."""

import json
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, CLIPModel, pipeline

CAPTIONS = ["a photo of the digit 3", "a photo of the digit 7"]


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in ((64, 48), (48, 64))]


def main(export_dir: str, out: str) -> None:
    model = CLIPModel.from_pretrained(export_dir).eval()
    processor = AutoProcessor.from_pretrained(export_dir)
    inputs = processor(text=CAPTIONS, images=images(), padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"])
        text_embeds = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    # transformers 5 returns model outputs where 4.x returned tensors
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    classify = pipeline("zero-shot-image-classification", model=export_dir, device="cpu")
    # the captions as they are (the pipeline would wrap them in "This is a photo of {}.")
    found = [classify(img, candidate_labels=CAPTIONS, hypothesis_template="{}") for img in images()]
    scores = [{r["label"]: r["score"] for r in labels} for labels in found]
    result = {
        "transformers": transformers.__version__,
        "processor": type(processor).__name__,
        "input_ids": [ids[m.bool()].tolist() for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])],
        "pixel_values": inputs["pixel_values"].tolist(),
        "image_embeds": torch.nn.functional.normalize(image_embeds, dim=-1).tolist(),
        "text_embeds": torch.nn.functional.normalize(text_embeds, dim=-1).tolist(),
        "pipeline_scores": scores,
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

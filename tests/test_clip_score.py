"""The CLIP score: a number from a (tiny, local) CLIP model, or absent with the reason."""

import numpy as np
from families import tiny_tokenizer

from diffprune.evaluation.clip_score import clip_scorer


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_tokenizer(folder / "tok")
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 8, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"image_size": 8, "patch_size": 4, "hidden_size": 16, "intermediate_size": 16,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=8)
    CLIPModel(config).save_pretrained(folder / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 8},
                                                                 crop_size={"height": 8, "width": 8}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder / "clip")
    return folder / "clip"


def test_a_local_clip_model_gives_a_score_per_image_set(tmp_path):
    scorer = clip_scorer(str(_tiny_clip(tmp_path)))
    assert scorer.available, scorer.reason
    images = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 1), dtype=np.uint8)
    value = scorer.score(images, ["a digit 1", "a digit 2", "a digit 3"])
    assert 0.0 <= value <= 100.0
    assert value == scorer.score(images, ["a digit 1", "a digit 2", "a digit 3"])


def test_without_a_clip_model_the_score_is_absent_with_the_reason(tmp_path):
    assert clip_scorer(None).reason == "evaluate.clip_model is not set"
    missing = clip_scorer(str(tmp_path / "nowhere"))
    assert not missing.available and "cannot be loaded" in missing.reason

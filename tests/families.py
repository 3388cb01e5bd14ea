"""Tiny models of every family, built in the tests with random weights (nothing downloaded)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel, VQModel

from diffprune.family.conditioning import ClassCondition, LabelEmbedding, TextCondition
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import make_scheduler

CONTEXT = 24  # width of the label embedding / text encoder
IMAGE = 8  # pixel side of the tiny data


def tiny_conditional_unet(size: int, channels: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CONTEXT, attention_head_dim=2,
        norm_num_groups=4)


def tiny_kl(channels: int = 1) -> AutoencoderKL:
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                         mid_block_add_attention=False)


def tiny_vq(channels: int = 1) -> VQModel:
    return VQModel(in_channels=channels, out_channels=channels, latent_channels=3, num_vq_embeddings=16,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)


def tiny_tokenizer(folder: Path, max_length: int = 8):
    """A character-level CLIP tokenizer: one token per character, no merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                         pad_token="<|endoftext|>")


def tiny_text_encoder(vocab_size: int, max_length: int = 8):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=CONTEXT, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=max_length,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))


def tiny_family(kind: str, tmp: Path, channels: int = 1) -> Diffusion:
    """``kind``: pixel | latent-vq | latent-class | latent-text | pixel-class."""
    torch.manual_seed(0)
    sched = make_scheduler(100)
    if kind == "pixel":
        unet = UNet2DModel(sample_size=IMAGE, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=None)
        return Diffusion(unet, sched)
    if kind == "latent-vq":
        unet = UNet2DModel(sample_size=IMAGE // 2, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                           layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
        return Diffusion(unet, sched, tiny_vq(channels).eval(), "vqvae")
    if kind == "pixel-class":
        return Diffusion(tiny_conditional_unet(IMAGE, channels), sched,
                         condition=ClassCondition(LabelEmbedding(10, CONTEXT)))
    if kind == "latent-class":
        return Diffusion(tiny_conditional_unet(IMAGE // 2, 4), sched, tiny_kl(channels).eval(), "vae",
                         ClassCondition(LabelEmbedding(10, CONTEXT)))
    if kind == "latent-text":
        tokenizer = tiny_tokenizer(tmp / "tok")
        return Diffusion(tiny_conditional_unet(IMAGE // 2, 4), sched, tiny_kl(channels).eval(), "vae",
                         TextCondition(tiny_text_encoder(len(tokenizer)), tokenizer))
    raise ValueError(kind)

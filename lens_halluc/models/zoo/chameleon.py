"""Tiny random Chameleon (``ChameleonForConditionalGeneration``, ``model_type`` ``chameleon``) and its processor.

What makes it Chameleon and what the tiny model keeps:

* **early fusion through a VQ-VAE**: images are not embedded by a vision tower; the VQ-VAE encoder
  quantises a 32 x 32 image (downsampled 8x: ``channel_multiplier`` of 4 levels) into a 4 x 4 grid of
  codebook indices (16 codes of 16), which are mapped to **text vocabulary ids** (tokens named
  ``IMGIMG<digits as letters A..J>Z``, through ``config.vocabulary_map``) and embedded with the text
  embedding matrix. Inside the forward the ``image_seq_length = 16`` ``<image>`` placeholders of each image
  are replaced (``masked_scatter``) by those embeddings;
* the processor writes ``<racm3:break>`` + ``<image>`` * 16 + ``<eoss>`` per image (begin/end of image) and
  appends the tokenizer's ``sep_token`` ``<reserved08706>`` to each prompt (chat mode);
* the LM's logits at every image-code id are set to the dtype's minimum (the model never writes image
  codes), see :mod:`lens_halluc.models.adapters.chameleon`;
* a **flat config** (``ChameleonConfig`` is the text config: no ``text_config``); Chameleon's QK-norm
  (per-head LayerNorm on q and k); 2 text layers, hidden 64, 4 heads / 2 kv heads.

The processor is :class:`~lens_halluc.models.adapters.chameleon.ChameleonChatProcessor` (the stock
``ChameleonProcessor`` drops a chat template on reload); its template renders ``"<image>" + prompt`` -- the
real checkpoints' usage (they ship no template); the processor appends the separator.

Example
-------
>>> model, processor = make(seed=0)                                        # doctest: +SKIP
>>> processor.image_seq_length                                             # doctest: +SKIP
16
"""
from __future__ import annotations

from .llava import WORDS, chat_template, finish, seeded

__all__ = ["make", "TEMPLATE", "IMAGE_SIZE", "N_CODES", "image_code_names"]

IMAGE_SIZE = 32          # px (resize shortest edge + centre crop)
N_CODES = 16             # VQ codebook size
DOWNSAMPLE_LEVELS = 4    # channel_multiplier length: 2**(4-1) = 8x downsampling -> 4 x 4 codes

#: Chameleon's chat usage: the image placeholder, then the prompt; no role markers (the processor appends
#: ``<reserved08706>``, Chameleon's chat-mode separator, after the whole text).
TEMPLATE = chat_template("<image>", "", "", "", "")


def image_code_names(n: int) -> list[str]:
    """Chameleon's names of the BPE tokens of VQ codes ``0..n-1``: ``IMGIMG`` + decimal digits written as
    letters (0 -> A, ..., 9 -> J) + ``Z`` (the inverse of ``ChameleonImageVocabularyMapping.bpe2img``)."""
    return ["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z" for i in range(n)]


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    from ..wordlevel import build_word_tokenizer

    base = build_word_tokenizer(WORDS)
    specials = ["<image>", "<racm3:break>", "<eoss>", "<reserved08706>", *image_code_names(N_CODES)]
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", sep_token="<reserved08706>",
                                  extra_special_tokens={"image_token": "<image>", "boi_token": "<racm3:break>",
                                                        "eoi_token": "<eoss>"})
    tok.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    return tok


def make(seed: int = 0):
    """Tiny Chameleon and its processor: ``(model, processor)``."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonVQVAEConfig
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

    from ..adapters.chameleon import ChameleonChatProcessor

    tok = _tokenizer()
    n_image_tokens = (IMAGE_SIZE // 2 ** (DOWNSAMPLE_LEVELS - 1)) ** 2
    image_processor = ChameleonImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    proc = ChameleonChatProcessor(image_processor=image_processor, tokenizer=tok, image_seq_length=n_image_tokens,
                                  image_token="<image>", chat_template=TEMPLATE)
    vq = ChameleonVQVAEConfig(embed_dim=32, num_embeddings=N_CODES, latent_channels=32, resolution=IMAGE_SIZE,
                              base_channels=32, channel_multiplier=[1] * DOWNSAMPLE_LEVELS, num_res_blocks=1,
                              attn_resolutions=[])
    config = ChameleonConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        vq_config=vq.to_dict(), vocabulary_map=dict(tok.get_vocab()))
    model = seeded(seed, lambda: ChameleonForConditionalGeneration(config))
    return finish(model, tok), proc

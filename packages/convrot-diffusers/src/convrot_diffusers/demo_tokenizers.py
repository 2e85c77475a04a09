"""Tokenizers for the demo pipelines, built in code so that nothing is downloaded.

Both are byte-level: every UTF-8 byte of the prompt is one token, so any prompt
tokenizes, and the vocabulary is the special tokens plus 256 byte symbols.
They stand in for CLIP's BPE and T5's SentencePiece tokenizers with the same
special tokens and call interface; the text encoders they feed are random.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"


def _byte_symbols() -> list[str]:
    return sorted(set(pre_tokenizers.ByteLevel.alphabet()))


def _byte_level_tokenizer(specials: list[str]) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(specials + _byte_symbols())}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=specials[-1]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def clip_like_tokenizer(model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """Ids: 0 = <|startoftext|>, 1 = <|endoftext|> (also padding), bytes from 2."""
    tokenizer = _byte_level_tokenizer([CLIP_BOS, CLIP_EOS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}", special_tokens=[(CLIP_BOS, 0), (CLIP_EOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        model_max_length=model_max_length,
    )


def t5_like_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Ids: 0 = <pad>, 1 = </s>, 2 = <unk>, bytes from 3."""
    tokenizer = _byte_level_tokenizer([T5_PAD, T5_EOS, T5_UNK])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {T5_EOS}", special_tokens=[(T5_EOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=T5_EOS,
        pad_token=T5_PAD,
        unk_token=T5_UNK,
        model_max_length=model_max_length,
    )


VOCAB_SIZE = 3 + 256  # the larger of the two vocabularies, for the demo text encoders

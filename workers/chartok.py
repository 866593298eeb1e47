"""A character-level tokenizer built locally (no hub): for tiny test models and the reference world."""

from __future__ import annotations

import string

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``alphabet``.

    Ids: 0 ``<pad>``, 1 ``<s>`` (added in front of every encoded text), 2 ``</s>``, 3 ``<unk>``,
    then the characters in order.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in dict.fromkeys(alphabet):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")

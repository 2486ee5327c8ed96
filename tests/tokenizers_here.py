"""Tokenizers made offline for tests of other model families: byte-level BPE (RoBERTa, BART, GPT-2) and a
Unigram SentencePiece-style one (T5), trained on Python's help text and the generated world's passages."""

from __future__ import annotations


def _texts() -> list[str]:
    from pydoc_data.topics import topics


    return list(topics.values())


def bpe(kind: str, vocab_size: int = 800, extra: list[str] | None = None):
    """A RoBERTa or BART tokenizer (``<s> A </s>``, pairs ``<s> A </s></s> B </s>``)."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer, processors

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tk = ByteLevelBPETokenizer()
    tk.train_from_iterator(_texts() + (extra or []), vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                           show_progress=False)
    tk._tokenizer.post_processor = processors.RobertaProcessing(("</s>", tk.token_to_id("</s>")),
                                                                ("<s>", tk.token_to_id("<s>")))
    cls = {"roberta": transformers.RobertaTokenizerFast, "bart": transformers.BartTokenizerFast}[kind]
    return cls(tokenizer_object=tk._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
               unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def unigram_t5(vocab_size: int = 600, extra: list[str] | None = None):
    """A T5 tokenizer (no start token, ``A </s>``, pairs ``A </s> B </s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(_texts() + (extra or []), trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", tk.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)

"""The mini model's tokenizer: one id per word of the mini world's prompt grammar, built offline.

T5's conventions, as Wan's UMT5 tokenizer: <pad> = 0, </s> = 1 (appended to every text), <unk> = 2 (any word
outside the grammar). Text is NFKC-normalised and lowercased; words split on whitespace and punctuation.
"""

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from standin_mini.prompts import ACTIONS, PLACE_PHRASES, TIME_PHRASES, WHO

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


def vocabulary() -> list[str]:
    """Special tokens, then every word of the grammar (sorted), then the full stop that ends its sentences."""
    phrases = [*WHO.values(), *ACTIONS.values(), *PLACE_PHRASES.values(), *TIME_PHRASES.values()]
    return SPECIAL_TOKENS + sorted({word for phrase in phrases for word in phrase.split()}) + ["."]


def mini_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary())}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)

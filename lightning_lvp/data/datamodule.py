"""``LlavaDataModule``: LLaVA-1.5 instruction data or the embedded digits grids, batched per ``docs/DESIGN.md``."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import Sampler
from transformers import ProcessorMixin

from lightning_lvp.data.collate import LlavaCollator, SkipCountingLoader, SkipTally
from lightning_lvp.data.digits import DigitsConfig, ensure_digits_dataset
from lightning_lvp.data.llava_dataset import (
    DEFAULT_MAX_IMAGE_PIXELS,
    POLICIES,
    FilterReport,
    LlavaDataset,
    filter_entries,
    load_entries,
    num_image_tokens,
)
from lightning_lvp.data.processors import load_processor
from lightning_lvp.data.qwen_chat import is_qwen_processor

log = logging.getLogger(__name__)


class LengthGroupedSampler(Sampler[int]):
    """Shuffles, then sorts each mega-batch of ``batch_size * megabatch_mult`` indices by length
    (longest first), so batches hold similar lengths and padding is small (LLaVA's ``group_by_length``).

    Args:
        lengths: per-sample length estimates.
        batch_size: batch size.
        megabatch_mult: mega-batch size in batches.
        seed: shuffle seed (combined with the epoch, see :meth:`set_epoch`).
    """

    def __init__(self, lengths: list[int], batch_size: int, megabatch_mult: int = 50, seed: int = 0) -> None:
        self.lengths, self.size, self.seed, self.epoch = lengths, batch_size * megabatch_mult, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffles differently each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for start in range(0, len(order), self.size):
            mega = order[start : start + self.size].tolist()
            yield from sorted(mega, key=lambda i: -self.lengths[i])


class LlavaDataModule(L.LightningDataModule):
    """LLaVA-format data (LLaVA-1.5's 665k mix filtered to its ~620k image entries) or the embedded
    digits grids, prepared like LLaVA-1.5 fine-tuning (vicuna_v1 template, answer-only labels,
    pad-to-square images, the model's CLIP processor).

    Args:
        processor_path: folder with the model's saved LlavaProcessor (tokenizer + image processor), i.e. the model folder.
        dataset: "digits" (embedded digits grids, generated into cache_dir on first use) or "llava" (JSON files).
        train_json: LLaVA-format training JSON/JSONL (dataset "llava"), e.g. llava_v1_5_mix665k.json.
        val_json: separate validation JSON/JSONL (dataset "llava"); else val_fraction of train_json is held out.
        image_folder: folder(s) the entries' "image" paths are relative to (dataset "llava").
        val_fraction: fraction of train_json held out for validation when val_json is not given.
        digits: shape and size of the digits dataset (dataset "digits"); defaults to DigitsConfig().
        cache_dir: folder the digits dataset is generated into.
        batch_size: training batch size.
        val_batch_size: validation/prediction batch size (defaults to batch_size).
        num_workers: DataLoader worker processes (images are decoded lazily in them).
        max_length: model context length; longer samples are cut at the end, never inside the image tokens.
        padding_side: padding side of training and validation batches (prediction batches are always left-padded).
        group_by_length: batch samples of similar length together (training only).
        bad_samples: "raise" a clear error naming the entry id and file, or "skip" bad entries and count them.
        pad_to_square: pad images to a square with the image processor's mean colour (LLaVA-1.5) before processing.
        max_image_pixels: images with more pixels (width x height, read from the file header before decoding)
            are bad samples ("image_too_large": an error, or a counted skip); guards against decompression
            bombs. None = no limit.
        seed: seed of the held-out split, the training shuffle (a function of seed and epoch, restored exactly on
            resume) and the length-grouped shuffle.
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        min_pixels: Qwen2.5-VL only: lower pixel bound of its image processor's resize (null = the model
            folder's preprocessor_config.json; the hub's Qwen2.5-VL-7B: 3,136 = 56 x 56 px, i.e. >= 4 tokens).
        max_pixels: Qwen2.5-VL only: upper pixel bound (null = the folder's; the hub's 7B: 12,845,056 px,
            i.e. <= 16,384 tokens). Each image gives (h / 28) (w / 28) tokens after the resize.

    The family (and so the chat template, label masking and image inputs) is the model's: read from
    ``processor_path``'s ``config.json`` (LLaVA-1.5 / LLaVA-NeXT: vicuna_v1 + the llava-hf processor;
    Qwen2.5-VL: ChatML + tokenizer and ``Qwen2VLImageProcessorPil``, no torchvision needed).
    """

    def __init__(
        self,
        processor_path: str,
        dataset: Literal["digits", "llava"] = "digits",
        train_json: str | None = None,
        val_json: str | None = None,
        image_folder: str | list[str] | None = None,
        val_fraction: float = 0.01,
        digits: DigitsConfig | None = None,
        cache_dir: str = "~/.cache/lightning_lvp",
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        max_length: int = 2048,
        padding_side: Literal["right", "left"] = "right",
        group_by_length: bool = False,
        bad_samples: Literal["raise", "skip"] = "raise",
        pad_to_square: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        seed: int = 0,
        pin_memory: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["digits"])
        self.hparams["digits"] = asdict(digits or DigitsConfig())  # a plain dict keeps hparams.yaml readable
        self.processor_path = processor_path
        self.dataset_kind = dataset
        self.train_json, self.val_json = train_json, val_json
        self.image_folders = [image_folder] if isinstance(image_folder, str) else list(image_folder or [])
        self.val_fraction = val_fraction
        self.digits = digits or DigitsConfig()
        self.cache_dir = cache_dir
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.max_length = num_workers, max_length
        self.padding_side, self.group_by_length = padding_side, group_by_length
        self.bad_samples, self.pad_to_square, self.seed, self.pin_memory = bad_samples, pad_to_square, seed, pin_memory
        self.max_image_pixels = max_image_pixels
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self._validate()
        self.processor: ProcessorMixin | None = None
        self.train_set: LlavaDataset | None = None
        self.val_set: LlavaDataset | None = None
        self.filter_reports: list[FilterReport] = []
        self.tallies: dict[str, SkipTally] = {split: SkipTally(split) for split in ("train", "val", "predict")}
        self.skips: dict[str, Counter] = {split: tally.total for split, tally in self.tallies.items()}
        if num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer runs in forked workers

    def _validate(self) -> None:
        """Checks the arguments, naming the bad one."""
        if self.dataset_kind not in ("digits", "llava"):
            raise ValueError(f"data.dataset must be 'digits' or 'llava', got {self.dataset_kind!r}")
        if self.dataset_kind == "llava" and (not self.train_json or not self.image_folders):
            raise ValueError("data.train_json and data.image_folder are required when data.dataset is 'llava'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.dataset_kind == "llava" and not self.val_json and self.val_fraction == 0.0:
            log.warning("no validation split: give data.val_json or data.val_fraction > 0")
        for name in ("batch_size", "val_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"data.padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.bad_samples not in POLICIES:
            raise ValueError(f"data.bad_samples must be one of {POLICIES}, got {self.bad_samples!r}")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1 or null (the model folder's), got {getattr(self, name)}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ValueError(f"data.max_image_pixels must be >= 1 or null (no limit), got {self.max_image_pixels}")

    @property
    def digits_folder(self) -> Path:
        """Where the digits dataset of this configuration lives."""
        return Path(self.cache_dir).expanduser() / self.digits.cache_name()

    def prepare_data(self) -> None:
        """Generates the digits dataset on first use (once per node)."""
        if self.dataset_kind == "digits":
            ensure_digits_dataset(self.digits, self.cache_dir)

    def load_processor(self) -> ProcessorMixin:
        """The processor saved in ``processor_path`` (loaded once), of the model's family: a LlavaProcessor /
        LlavaNextProcessor, or for Qwen2.5-VL a :class:`~lightning_lvp.data.qwen_chat.QwenProcessor`."""
        if self.processor is None:
            if not Path(self.processor_path).is_dir():
                raise FileNotFoundError(f"data.processor_path is not a folder: {self.processor_path}")
            try:
                self.processor = load_processor(self.processor_path, self.min_pixels, self.max_pixels)
            except ValueError as e:
                raise ValueError(f"data.processor_path {self.processor_path}: {e}") from None
            if not hasattr(self.processor, "image_processor") or not (
                hasattr(self.processor, "patch_size") or is_qwen_processor(self.processor)
            ):
                raise ValueError(f"data.processor_path {self.processor_path} does not hold a LlavaProcessor")
        return self.processor

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per sample, as the model's processor counts them (fixed-size families only)."""
        processor = self.load_processor()
        if is_qwen_processor(processor):
            raise ValueError("Qwen2.5-VL has dynamic resolution: the image-token count differs per image")
        return num_image_tokens(processor)

    def _check_digits_fit(self, processor: ProcessorMixin) -> None:
        """The digits images must match the processor's input size and patch size."""
        if is_qwen_processor(processor):
            raise ValueError(
                f"data.dataset 'digits' is made for the demo's LLaVA-1.5 (one patch per cell); the model at "
                f"{self.processor_path} is Qwen2.5-VL: give LLaVA-format JSON (data.dataset 'llava')"
            )
        side = processor.image_processor.crop_size["height"]
        if self.digits.image_size != side:
            raise ValueError(
                f"data.digits.grid_size * data.digits.cell_px = {self.digits.image_size} must equal the "
                f"processor's image size {side} ({self.processor_path})"
            )
        if self.digits.patch_size != processor.patch_size:
            raise ValueError(
                f"data.digits.patch_size ({self.digits.patch_size}) must equal the processor's patch size "
                f"{processor.patch_size} ({self.processor_path})"
            )

    def _read(self, path: str) -> list[dict]:
        """Loads and filters one JSON file, logging (and keeping) its filter report."""
        max_images = None if is_qwen_processor(self.load_processor()) else 1  # Qwen2.5-VL: several per sample
        entries, report = filter_entries(load_entries(path), str(path), self.bad_samples, max_images)
        self.filter_reports.append(report)
        # WARNING: shown by the CLI and plain scripts alike (INFO is not); the ids go to skipped_entries.jsonl
        log.log(logging.WARNING if report.dropped else logging.INFO, "%s", report.summary())
        return entries

    def _split_entries(self) -> tuple[list[dict], list[dict], list[str]]:
        """Train entries, validation entries and image folders."""
        if self.dataset_kind == "digits":
            folder = self.digits_folder
            if not (folder / "meta.json").is_file():
                ensure_digits_dataset(self.digits, self.cache_dir)  # setup() called without prepare_data()
            return self._read(str(folder / "train.json")), self._read(str(folder / "val.json")), [str(folder)]
        for name, path in (("train_json", self.train_json), ("val_json", self.val_json)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"data.{name} not found: {path}")
        train = self._read(self.train_json)
        if self.val_json:
            return train, self._read(self.val_json), self.image_folders
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = round(self.val_fraction * len(train))
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
        log.info(
            "held out %d of %d entries for validation (data.val_fraction=%s)",
            n_val,
            n_val + len(train),
            self.val_fraction,
        )
        return train, val, self.image_folders

    def setup(self, stage: str | None = None) -> None:
        """Loads the processor and the entries, builds the datasets."""
        if self.train_set is not None:
            return
        processor = self.load_processor()
        if self.dataset_kind == "digits":
            self._check_digits_fit(processor)
        self.filter_reports = []
        train, val, folders = self._split_entries()
        common = dict(
            image_folders=folders,
            processor=processor,
            max_length=self.max_length,
            policy=self.bad_samples,
            max_image_pixels=self.max_image_pixels,
        )
        self.train_set = LlavaDataset(train, pad_to_square=self.pad_to_square, **common)
        self.val_set = LlavaDataset(val, pad_to_square=self.pad_to_square, **common)
        self.predict_set = LlavaDataset(val, pad_to_square=self.pad_to_square, prompt_only=True, **common)

    def pad_token_id(self) -> int:
        """The tokenizer's pad id; a clear error naming the file to fix when it has none."""
        tokenizer = self.load_processor().tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f'the tokenizer in data.processor_path={self.processor_path} has no pad token: set "pad_token" in '
                f'{Path(self.processor_path) / "tokenizer_config.json"} (LLaVA-1.5 uses "<pad>"), or add one with '
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and save_pretrained"
            )
        return int(tokenizer.pad_token_id)

    def _loader(self, dataset: LlavaDataset, split: str, train: bool, padding_side: str) -> SkipCountingLoader:
        """A DataLoader with the contract's collate function, skip counting and an exact resume position.

        Every loader draws from its own generator seeded by ``data.seed`` (the shuffle order and the worker
        seeds), never from the global RNG, so a resumed run sees the same data and the same model noise.
        """
        sampler = None
        if train and self.group_by_length:
            sampler = LengthGroupedSampler(dataset.approximate_lengths(), self.batch_size, seed=self.seed)
        return SkipCountingLoader(
            dataset,
            batch_size=self.batch_size if train else self.val_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=LlavaCollator(self.pad_token_id(), padding_side),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            split=split,
            tally=self.tallies[split],
        )

    def train_dataloader(self) -> SkipCountingLoader:
        """Shuffled (or length-grouped) training batches with labels."""
        return self._loader(self.train_set, "train", True, self.padding_side)

    def val_dataloader(self) -> SkipCountingLoader:
        """Teacher-forced validation batches with labels (for loss and answer accuracy)."""
        return self._loader(self.val_set, "val", False, self.padding_side)

    def predict_dataloader(self) -> SkipCountingLoader:
        """Prompt-only validation batches ending at "ASSISTANT:", left-padded, reference in ``answers``."""
        return self._loader(self.predict_set, "predict", False, "left")

    def skip_counts(self, split: str = "train") -> Counter:
        """Samples of ``split`` skipped at load time so far (all epochs), per reason."""
        return self.skips[split]

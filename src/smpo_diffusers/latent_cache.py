"""On-disk cache of VAE latent moments and prompt embeddings (``--cache_latents``).

What is cached, per prepared pair, is what the trainer would compute from it at every step, before anything
random is drawn:

* the VAE posterior ``(mean, std)`` of both images after the pair transform (centre crop; with horizontal flips
  enabled, of the unflipped *and* the flipped pair), fp32, unscaled. The training step still draws
  ``mean + std * noise`` with its own generator, so a cached run samples exactly as an uncached one does;
* the SDXL micro-conditioning inputs (original sizes, crop corner) and the transform's flags;
* the prompt embeddings of every caption (and of the empty prompt used for ``--proportion_empty_prompts``), in
  the training weight dtype, keyed by the caption's text.

Which flip and whether the prompt is emptied are still drawn per ``(seed, epoch, index)`` exactly as
:class:`~smpo_diffusers.data.PreferencePairDataset` draws them. Random crops cannot be cached (the config refuses
``--random_crop`` with ``--cache_latents``).

Layout: ``<latent_cache_dir>/<key>/`` where ``key`` hashes everything the entries depend on
(:func:`cache_settings`: the dataset's ``datasets`` fingerprint, resolution, flips, the VAE's and text encoders'
configs, weights (sampled) and dtypes, the tokenizers, the format version). Anything else changes a different
key, i.e. a fresh folder: an old entry is never read for new settings. Inside, ``settings.json`` (human-readable)
and append-only safetensors shards ``pairs-*.safetensors`` / ``prompts-*.safetensors``, each written to a
temporary name and renamed when complete. A build computes only the entries that are missing (other subsets of
the same dataset, an interrupted build, another winner order), so ablation runs on the same pairs share it.
Under several processes each rank builds a disjoint share of the missing entries.

Pair entries are keyed by the row in the raw dataset (``source_row``). When the two images have the same size
the entry does not depend on which one won (``<row>/any``, image order); otherwise the transform resizes the
loser to the winner's size and the entry is stored winner first under ``<row>/w<winner>``. An image cell that
holds only a file path (``datasets.Image`` storage without bytes) is not covered by the dataset's fingerprint,
so such a pair's key also carries a hash of its files' paths, sizes, modification and change times and inodes
(``<row>-<hash>``, :func:`pair_entry_bases`, computed by the main process and shared with the others): a file
that is rewritten, or that was missing and is back, gets a new entry instead of a stale one (or a stale
"undecodable" mark).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data import EpochIndexedDataset, PairTransform, decode_image
from .distributed import computed_on_main, on_every_process
from .files import atomic_write_text

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 3  # 3: crop corners per flip variant
PAIRS_PER_SHARD = 256
CAPTIONS_PER_SHARD = 1024
_FINGERPRINT_SAMPLES = 4096


# ---------------------------------------------------------------------------- identity
def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's tensors: names, shapes, dtypes, float64 sums and up to 4,096 evenly strided values
    of each. Any fine-tune changes it; computing it reads each tensor once (cheap next to encoding a dataset)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
            sample = flat[::stride].double().cpu().numpy()
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{float(flat.double().sum())}|".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()


_TOKENIZER_PROBES = ("", "a photo of a Cat, 3 dogs & a café!", "  Two  SPACES\tand a tab, UPPER lower   ",
                     "an extremely long prompt " * 20)
"""Captions whose padded token ids join a tokenizer's fingerprint: they show merges, normalisation, the pad
token and truncation, which the vocabulary alone does not."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's class, length limit, padding/truncation sides, special tokens, vocabulary and the
    token ids it gives a few probe captions when padded to its length limit (as prompts are encoded)."""
    vocab = sorted(tokenizer.get_vocab().items())
    probes = tokenizer(list(_TOKENIZER_PROBES), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True).input_ids
    payload = json.dumps([type(tokenizer).__name__, tokenizer.model_max_length, tokenizer.padding_side,
                          tokenizer.truncation_side, sorted(tokenizer.special_tokens_map.items()), vocab,
                          probes], default=str).encode()
    return hashlib.sha256(payload).hexdigest()


def cache_settings(*, dataset_fingerprint: str, parts, resolution: int, hflip: bool, vae_dtype: torch.dtype,
                   weight_dtype: torch.dtype) -> dict:
    """Everything cached entries depend on, as a JSON-able dict (its hash names the cache folder)."""
    return {
        "format": CACHE_FORMAT_VERSION,
        "dataset_fingerprint": dataset_fingerprint,
        "resolution": int(resolution),
        "hflip": bool(hflip),
        "crop": "center",
        "model_family": "sdxl" if parts.is_sdxl else "sd",
        "vae": {"config": _jsonable(parts.vae.config), "weights": module_fingerprint(parts.vae),
                "dtype": str(vae_dtype)},
        "text_encoders": [{"class": type(encoder).__name__, "config": _jsonable(encoder.config.to_diff_dict()),
                           "weights": module_fingerprint(encoder)} for encoder in parts.text_encoders],
        "tokenizers": [tokenizer_fingerprint(tokenizer) for tokenizer in parts.tokenizers],
        "prompt_dtype": str(weight_dtype),
    }


def _jsonable(config) -> dict:
    """A config as plain JSON, without where it was loaded from (the weights' hash identifies the model)."""
    return {key: value for key, value in json.loads(json.dumps(dict(config), default=str, sort_keys=True)).items()
            if key != "_name_or_path"}


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


def path_only_file_stamps(dataset, columns=("jpg_0", "jpg_1")) -> list[list[str]]:
    """Per row of ``dataset``, ``"<column>|<path>|<stamp>"`` (:func:`_file_stamp`) for each image cell of ``columns``
    read from a file (``{"bytes": None, "path": ...}``); ``[]`` for rows whose cells hold their bytes (the
    dataset's fingerprint covers those, not the files'). Reads the cells' storage with pyarrow in whole columns of
    the underlying table, through the dataset's row mapping when it has one (no image bytes are copied, no
    per-row gathering); costs one ``stat`` per path-only cell."""
    import pyarrow as pa
    import pyarrow.compute as pc

    files: list[list[str]] = [[] for _ in range(len(dataset))]
    table = dataset.data.table  # every underlying row; dataset[i] is table row mapping[i] (select/filter/shuffle)
    mapping = getattr(dataset, "_indices", None)
    mapping = None if mapping is None else mapping.column(0).to_numpy()
    for name in columns:
        column = table.column(name)
        if not (pa.types.is_struct(column.type) and column.type.get_field_index("path") >= 0
                and column.type.get_field_index("bytes") >= 0):
            continue  # raw bytes: the fingerprint covers them
        path_only = pc.and_(pc.is_null(pc.struct_field(column, "bytes")),
                            pc.is_valid(pc.struct_field(column, "path"))).to_numpy(zero_copy_only=False)
        positions = np.flatnonzero(path_only if mapping is None else path_only[mapping])
        if not len(positions):
            continue
        table_rows = positions if mapping is None else mapping[positions]
        paths = pc.struct_field(column, "path").take(pa.array(table_rows)).to_pylist()
        for position, path in zip(positions, paths):
            files[position].append(f"{name}|{path}|{_file_stamp(path)}")
    return files


def pair_entry_bases(pairs) -> list[str]:
    """Per prepared pair, the stem of its cache entry keys: ``"<source_row>"`` when both image cells hold their
    bytes, else ``"<source_row>-<hash>"`` with a hash of :func:`path_only_file_stamps` (the path and
    :func:`_file_stamp` of each cell read from a file, ``missing`` for a file that cannot be stat'ed)."""
    rows = np.asarray(pairs["source_row"], dtype=np.int64)
    return [str(row) if not stamp else f"{row}-{hashlib.sha256(chr(0).join(stamp).encode()).hexdigest()[:16]}"
            for row, stamp in zip(rows.tolist(), path_only_file_stamps(pairs))]


def _file_stamp(path: str) -> str:
    """``size:mtime:ctime:inode`` of a file, or ``missing``: a rewrite shows in one of them even when the size and
    modification time are kept (``cp -p``, ``rsync -t``), and so does a permission fix after a failed read."""
    try:
        status = os.stat(path)
    except OSError:
        return "missing"
    return f"{status.st_size}:{status.st_mtime_ns}:{status.st_ctime_ns}:{status.st_ino}"


def _caption_text(caption) -> str:
    """What the trainer feeds the text encoder for a stored caption (null/non-string -> the empty prompt)."""
    return caption if isinstance(caption, str) else ""


# ---------------------------------------------------------------------------- cache
@dataclass
class CacheBuildStats:
    """What :meth:`LatentCache.ensure` found and did: entries needed and built now (by all processes), pairs whose
    images do not decode (skipped in training), seconds spent by this process."""

    path: str
    key: str
    pairs_needed: int
    pairs_built: int
    prompts_needed: int
    prompts_built: int
    undecodable_pairs: int
    seconds: float
    other_entries: int = 0
    """Cache folders in the same root built for other settings (never deleted automatically)."""
    other_entries_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class LatentCache:
    """One cache folder (``root/key``); see the module docstring."""

    def __init__(self, root: str, settings: dict):
        self.settings = settings
        self.key = cache_key(settings)
        self.path = os.path.join(os.path.abspath(os.path.expanduser(root)), self.key)
        self.hflip = bool(settings["hflip"])

    # ------------------------------------------------------------------ index
    def _shards(self, prefix: str) -> list[str]:
        if not os.path.isdir(self.path):
            return []
        return sorted(os.path.join(self.path, name) for name in os.listdir(self.path)
                      if name.startswith(prefix) and name.endswith(".safetensors"))

    def index(self, prefix: str) -> tuple[dict[str, str], set[str]]:
        """``({entry key: shard path}, {keys of undecodable pairs})`` from the shards' headers (entry key = tensor
        name before its last '.')."""
        from safetensors import safe_open

        entries, undecodable = {}, set()
        for shard in self._shards(prefix):
            try:
                with safe_open(shard, framework="pt") as handle:
                    names = list(handle.keys())
            except Exception as error:  # safetensors raises its own error type for a damaged header
                self._set_aside(shard, error)
                continue
            for name in names:
                key, field = name.rsplit(".", 1)
                entries[key] = shard
                if field == "undecodable":
                    undecodable.add(key)
        return entries, undecodable

    @staticmethod
    def _set_aside(shard: str, error: Exception) -> None:
        """Rename an unreadable shard to a hidden ``.corrupt`` name, so its entries count as missing and are
        encoded again (another process may have done it already)."""
        folder, name = os.path.split(shard)
        aside = os.path.join(folder, f".{name}.corrupt")
        try:
            os.replace(shard, aside)
            os.utime(aside)  # kept for an hour from now (for a look), then removed as a stale leftover
        except FileNotFoundError:
            return
        logger.warning("latent cache shard %s is unreadable (%s); set aside as .%s.corrupt, its entries will be "
                       "encoded again", shard, error, name)

    # ------------------------------------------------------------------ building
    def ensure(self, pairs, parts, *, resolution: int, weight_dtype: torch.dtype, accelerator=None,
               batch_size: int = 8, entry_bases: list[str] | None = None) -> CacheBuildStats:
        """Compute and write every entry ``pairs`` needs that the cache lacks; returns what was done.

        ``pairs``: the output of :func:`~smpo_diffusers.data.prepare_preference_pairs`. ``parts``: the models
        (VAE and text encoders on the device they should run on). ``entry_bases``: :func:`pair_entry_bases` of
        ``pairs`` when the caller has it (computed here otherwise). Collective under several processes.
        """
        start = time.perf_counter()
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)

        def create_folder():  # main process; a failure stops every process (none waits for it)
            os.makedirs(self.path, exist_ok=True)
            settings_path = os.path.join(self.path, "settings.json")
            if not os.path.exists(settings_path):
                atomic_write_text(settings_path, json.dumps(self.settings, indent=2, sort_keys=True, default=str))
            removed, freed = remove_stale_leftovers(self.path)
            if removed:
                logger.info("latent cache %s: removed %d shards left by interrupted writes or set aside as "
                            "unreadable (%.2f GB)", self.path, removed, freed / 1e9)

        computed_on_main(create_folder, accelerator, f"create the latent cache {self.path}")

        bases = entry_bases if entry_bases is not None else computed_on_main(
            lambda: pair_entry_bases(pairs), accelerator, f"stamp the pairs' images for the latent cache {self.path}")
        rows = np.asarray(pairs["source_row"], dtype=np.int64).tolist()
        winners = np.asarray(pairs["winner_index"], dtype=np.int64).tolist()
        captions = {""} | {_caption_text(c) for c in pairs["caption"]}

        def list_missing():
            have, _ = self.index("pairs-")
            missing = sorted({(base, row, winner) for base, row, winner in zip(bases, rows, winners)
                              if f"{base}/any" not in have and f"{base}/w{winner}" not in have})
            have_prompts, _ = self.index("prompts-")
            return missing, sorted(c for c in captions if caption_key(c) not in have_prompts)

        def build_share():  # each process its share of what is missing
            self._build_pairs(pairs, missing[rank::world], parts, resolution, batch_size)
            self._build_prompts(missing_prompts[rank::world], parts, weight_dtype, batch_size)

        # the main process lists what is missing before any rank writes, and every rank builds its share of that
        # one list (a rank listing on its own could see another run's writes and leave entries unbuilt)
        missing, missing_prompts = computed_on_main(list_missing, accelerator, f"list the latent cache {self.path}")
        on_every_process(build_share, accelerator, f"write its latent-cache entries in {self.path}")
        _, bad = self.index("pairs-")
        undecodable = sum(f"{base}/any" in bad for base in set(bases))  # whoever built them
        if missing or missing_prompts:
            logger.info("latent cache %s: built %d pair and %d prompt entries (%d undecodable pairs)", self.path,
                        len(missing), len(missing_prompts), undecodable)
        others = other_cache_entries(os.path.dirname(self.path), self.key)
        other_bytes = sum(size for _, size in others)
        if others and rank == 0:
            logger.info("latent cache root %s also holds %d folders built for other settings (%.2f GB; each "
                        "settings.json says what for); delete those no run needs", os.path.dirname(self.path),
                        len(others), other_bytes / 1e9)
        return CacheBuildStats(path=self.path, key=self.key, pairs_needed=len(set(zip(bases, winners))),
                               pairs_built=len(missing), prompts_needed=len(captions),
                               prompts_built=len(missing_prompts), undecodable_pairs=undecodable,
                               seconds=time.perf_counter() - start, other_entries=len(others),
                               other_entries_bytes=other_bytes)

    def _build_pairs(self, pairs, todo: list[tuple[str, int, int]], parts, resolution: int,
                     batch_size: int) -> None:
        """Encode the ``(entry base, source row, winner)`` pairs of ``todo`` into new shards."""
        if not todo:
            return
        from .models import latent_moments

        position = {int(r): i for i, r in enumerate(pairs["source_row"])}
        images = pairs.select_columns(["jpg_0", "jpg_1"]).with_format("arrow")
        transform = PairTransform(resolution, random_crop=False, hflip=False)
        for shard_start in range(0, len(todo), PAIRS_PER_SHARD):
            tensors: dict[str, torch.Tensor] = {}
            chunk = todo[shard_start:shard_start + PAIRS_PER_SHARD]
            for batch_start in range(0, len(chunk), batch_size):
                decoded = []
                for base, row, winner in chunk[batch_start:batch_start + batch_size]:
                    cells = images[position[row]].to_pylist()[0]
                    img_0, img_1 = decode_image(cells["jpg_0"]), decode_image(cells["jpg_1"])
                    if img_0 is None or img_1 is None:
                        tensors[f"{base}/any.undecodable"] = torch.ones(1, dtype=torch.int8)
                        continue
                    if img_0.size == img_1.size:  # order-free: store in image order
                        key, first, second = f"{base}/any", img_0, img_1
                    else:  # the loser takes the winner's size: store winner first
                        key, (first, second) = f"{base}/w{winner}", (img_0, img_1) if winner == 0 else (img_1, img_0)
                    sample = transform(first, second, rng=None)
                    top, left = sample.crop_top_lefts[0].tolist()
                    mirrored_left = transform.target_size(*first.size)[0] - transform.resolution - left
                    decoded.append((key, sample, torch.tensor([(top, left), (top, mirrored_left)])))
                if not decoded:
                    continue
                pixels = torch.cat([sample.pixel_values for _, sample, _ in decoded])  # (2n, 3, H, W)
                if self.hflip:
                    pixels = torch.cat([pixels, pixels.flip(-1)])
                mean, std = latent_moments(parts.vae, pixels)
                variants = 2 if self.hflip else 1
                shape = (variants, len(decoded), 2, *mean.shape[1:])
                mean, std = mean.cpu().reshape(shape), std.cpu().reshape(shape)
                for i, (key, sample, crops) in enumerate(decoded):
                    tensors[f"{key}.mean"] = mean[:, i].contiguous()  # (variants, 2, C, h, w)
                    tensors[f"{key}.std"] = std[:, i].contiguous()
                    tensors[f"{key}.original_sizes"] = sample.original_sizes
                    tensors[f"{key}.crop_top_left"] = crops[:variants].contiguous()  # (variants, 2)
                    tensors[f"{key}.flags"] = torch.tensor([sample.resized_pair, sample.upscaled], dtype=torch.int8)
            self._write_shard("pairs", tensors)

    def _build_prompts(self, captions: list[str], parts, weight_dtype: torch.dtype, batch_size: int) -> None:
        if not captions:
            return
        from .models import encode_prompts

        device = parts.text_encoders[0].device
        for shard_start in range(0, len(captions), CAPTIONS_PER_SHARD):
            tensors: dict[str, torch.Tensor] = {}
            chunk = captions[shard_start:shard_start + CAPTIONS_PER_SHARD]
            step = max(batch_size, 16)
            for batch_start in range(0, len(chunk), step):
                texts = chunk[batch_start:batch_start + step]
                prompts = encode_prompts(parts, texts, device, dtype=weight_dtype)
                for i, text in enumerate(texts):
                    tensors[f"{caption_key(text)}.hidden"] = prompts.hidden[i].cpu().contiguous()
                    if prompts.pooled is not None:
                        tensors[f"{caption_key(text)}.pooled"] = prompts.pooled[i].cpu().contiguous()
            self._write_shard("prompts", tensors)

    def _write_shard(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        name = f"{prefix}-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}.safetensors"
        final = os.path.join(self.path, name)
        partial = os.path.join(self.path, f".{name}.tmp")
        save_file(tensors, partial, metadata={"format": str(CACHE_FORMAT_VERSION)})
        with open(partial, "rb") as handle:  # on disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(partial, final)

    # ------------------------------------------------------------------ reading
    def reader(self) -> "CacheReader":
        pair_index, undecodable = self.index("pairs-")
        return CacheReader(pair_index, self.index("prompts-")[0], undecodable)


class CacheReader:
    """Reads entries from the shards (memory-mapped; handles opened lazily, per process, at most
    ``MAX_OPEN_SHARDS`` at a time)."""

    MAX_OPEN_SHARDS = 64

    def __init__(self, pair_index: dict[str, str], prompt_index: dict[str, str], undecodable: set[str]):
        self.pair_index, self.prompt_index, self.undecodable = pair_index, prompt_index, undecodable
        self._handles: OrderedDict[str, object] = OrderedDict()

    def __getstate__(self):  # DataLoader workers reopen the files themselves
        return {**self.__dict__, "_handles": OrderedDict()}

    def _get(self, index: dict[str, str], key: str, name: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = index[key]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(shard, framework="pt")
            while len(self._handles) > self.MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return handle.get_tensor(f"{key}.{name}")

    def pair_entry(self, base: str, winner: int) -> tuple[str, bool] | None:
        """``(entry key, winner_first)`` for a pair whose entry stem is ``base`` (:func:`pair_entry_bases`), or
        None when the cache lacks it."""
        if f"{base}/w{winner}" in self.pair_index:
            return f"{base}/w{winner}", True
        if f"{base}/any" in self.pair_index:
            return f"{base}/any", False
        return None

    def is_undecodable(self, key: str) -> bool:
        return key in self.undecodable

    def pair(self, key: str, name: str) -> torch.Tensor:
        return self._get(self.pair_index, key, name)

    def prompt(self, caption: str, name: str) -> torch.Tensor:
        return self._get(self.prompt_index, caption_key(caption), name)

    def has_prompt(self, caption: str) -> bool:
        return caption_key(caption) in self.prompt_index


# ---------------------------------------------------------------------------- torch dataset
class CachedPairDataset(EpochIndexedDataset):
    """The cached twin of :class:`~smpo_diffusers.data.PreferencePairDataset`: same items, same random draws
    (``np.random.default_rng([seed, epoch, i])``: empty prompt, then the flip), latents instead of pixels.

    ``__getitem__(i)`` returns None for an undecodable pair, else a dict with ``latent_mean``/``latent_std``
    ``(2, C, h, w)`` fp32 (winner first, unscaled VAE moments), ``prompt_hidden`` ``(L, D)`` and, for SDXL,
    ``prompt_pooled`` ``(D2,)`` (weight dtype), and the same ``prob_w``, ``caption``, ``original_sizes``,
    ``crop_top_lefts``, ``index`` and flags as the pixel dataset.
    """

    def __init__(self, pairs, reader: CacheReader, *, seed: int, proportion_empty_prompts: float = 0.0,
                 hflip: bool = True, is_sdxl: bool = False, entry_bases: list[str] | None = None):
        self.bases = entry_bases if entry_bases is not None else pair_entry_bases(pairs)
        self.winners = np.asarray(pairs["winner_index"], dtype=np.int64)
        self.prob_w = np.asarray(pairs["prob_w"], dtype=np.float32)
        self.captions = list(pairs["caption"])
        self.reader = reader
        self.seed, self.hflip, self.is_sdxl = int(seed), bool(hflip), bool(is_sdxl)
        self.proportion_empty_prompts = float(proportion_empty_prompts)
        missing = [b for b, w in zip(self.bases, self.winners) if reader.pair_entry(b, int(w)) is None]
        missing_prompts = [c for c in {""} | {_caption_text(c) for c in self.captions} if not reader.has_prompt(c)]
        if missing or missing_prompts:
            raise RuntimeError(f"the latent cache lacks {len(missing)} pair and {len(missing_prompts)} prompt "
                               "entries; build it with LatentCache.ensure(...) first. With several machines, "
                               "--latent_cache_dir must be on a filesystem that all of them share.")

    def __len__(self) -> int:
        return len(self.bases)

    def _item(self, index: int) -> dict | None:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        empty_prompt = bool(rng.random() < self.proportion_empty_prompts)
        flipped = bool(self.hflip and rng.random() < 0.5)  # PairTransform's draw (centre crop: no crop draws)
        winner = int(self.winners[index])
        key, winner_first = self.reader.pair_entry(self.bases[index], winner)
        if self.reader.is_undecodable(key):
            return None
        order = [0, 1] if winner_first or winner == 0 else [1, 0]
        variant = 1 if flipped else 0
        caption = self.captions[index]
        missing_caption = not isinstance(caption, str)
        text = "" if missing_caption or empty_prompt else caption
        flags = self.reader.pair(key, "flags")
        crop = self.reader.pair(key, "crop_top_left")[variant]
        item = {
            "latent_mean": self.reader.pair(key, "mean")[variant][order],
            "latent_std": self.reader.pair(key, "std")[variant][order],
            "prompt_hidden": self.reader.prompt(text, "hidden"),
            "prob_w": float(self.prob_w[index]),
            "caption": text,
            "original_sizes": self.reader.pair(key, "original_sizes")[order],
            "crop_top_lefts": crop.unsqueeze(0).repeat(2, 1),
            "index": index,
            "empty_prompt": empty_prompt,
            "missing_caption": missing_caption,
            "resized_pair": bool(flags[0]),
            "upscaled": bool(flags[1]),
            "flipped": flipped,
        }
        if self.is_sdxl:
            item["prompt_pooled"] = self.reader.prompt(text, "pooled")
        return item


def other_cache_entries(root: str, key: str) -> list[tuple[str, int]]:
    """``[(folder, bytes)]`` of the cache folders under ``root`` other than ``key`` (those with a
    ``settings.json``), largest first: what other settings left behind."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        folder = os.path.join(root, name)
        if name == key or not os.path.isfile(os.path.join(folder, "settings.json")):
            continue
        size = sum(os.path.getsize(os.path.join(folder, entry)) for entry in os.listdir(folder)
                   if os.path.isfile(os.path.join(folder, entry)))
        found.append((folder, size))
    return sorted(found, key=lambda item: -item[1])


STALE_LEFTOVER_SECONDS = 3600
"""A hidden ``.tmp`` shard (a write that was interrupted) or ``.corrupt`` shard (set aside unreadable) untouched
for this long is removed when the cache is next opened; a live write renames its file within seconds."""


def remove_stale_leftovers(folder: str, older_than_s: float = STALE_LEFTOVER_SECONDS) -> tuple[int, int]:
    """Delete the hidden ``.tmp``/``.corrupt`` shards in ``folder`` not modified for ``older_than_s`` seconds
    (another run writing to the same cache keeps its own fresh ones); returns ``(files, bytes)`` removed."""
    removed = freed = 0
    now = time.time()
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not (name.startswith(".") and name.endswith((".safetensors.tmp", ".safetensors.corrupt"))):
            continue
        try:
            stat = os.stat(path)
            if now - stat.st_mtime < older_than_s:
                continue
            os.remove(path)
        except FileNotFoundError:  # another process removed it first
            continue
        removed, freed = removed + 1, freed + stat.st_size
    return removed, freed


__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheBuildStats",
    "CacheReader",
    "CachedPairDataset",
    "LatentCache",
    "cache_key",
    "cache_settings",
    "caption_key",
    "module_fingerprint",
    "other_cache_entries",
    "pair_entry_bases",
    "remove_stale_leftovers",
    "tokenizer_fingerprint",
]

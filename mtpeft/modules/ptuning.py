"""P-tuning (v1, Liu et al., 2021): virtual tokens made by a small encoder over trainable embeddings.

``tokens = encoder(E)`` with ``E: [n, H]`` trainable and the encoder an MLP or an LSTM + MLP (the
layouts of peft's ``PromptEncoder``). The virtual tokens are prepended to the input (as peft does;
the paper also allows template positions). Mixing, masking and positions are those of prompt
tuning (``VirtualTokenStack``). The encoder is a training-time reparameterisation:
``bank.finalize(name)`` computes the tokens once and drops the encoder, so only ``[n, H]`` is saved.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..io import MtpeftError
from .base import ModuleConfig, ModuleType, check_positive, register
from .prompt import VirtualTokenStack, check_no_targets, embedding_std

ENCODERS = ("mlp", "lstm")


@dataclass
class PTuningConfig(ModuleConfig):
    n_tokens: int = field(default=20, metadata={"help": "number of virtual tokens prepended to the input"})
    encoder: str = field(default="mlp", metadata={"help": "encoder over the trainable embeddings: 'mlp' or 'lstm' "
                                                  "(a bidirectional LSTM followed by an MLP)"})
    encoder_hidden: int | None = field(
        default=None, metadata={"help": "hidden width of the encoder; None: the backbone's hidden size"})
    lstm_layers: int = field(default=2, metadata={"help": "LSTM layers (encoder='lstm')"})
    dropout: float = field(default=0.0, metadata={"help": "dropout inside the LSTM (between its layers)"})

    def validate(self):
        super().validate()
        check_no_targets(self, "P-tuning modules act on the input embeddings")
        check_positive(n_tokens=self.n_tokens, lstm_layers=self.lstm_layers)
        if self.encoder not in ENCODERS:
            raise MtpeftError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder_hidden is not None:
            check_positive(encoder_hidden=self.encoder_hidden)
        if not 0 <= self.dropout < 1:
            raise MtpeftError(f"dropout must be in [0, 1), got {self.dropout}")


class _LSTMEncoder(nn.Module):
    def __init__(self, d: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(d, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                            bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))

    def forward(self, e: Tensor) -> Tensor:
        return self.mlp(self.lstm(e[None])[0][0])


class _EncoderExpert(nn.Module):
    def __init__(self, embedding: Tensor, encoder: nn.Module):
        super().__init__()
        self.embedding = nn.Parameter(embedding)
        self.encoder = encoder

    def tokens(self) -> Tensor:
        return self.encoder(self.embedding)


class _TokensExpert(nn.Module):
    """A finalized expert: its virtual tokens only."""

    def __init__(self, tokens: Tensor):
        super().__init__()
        self.virtual_tokens = nn.Parameter(tokens)

    def tokens(self) -> Tensor:
        return self.virtual_tokens


@contextlib.contextmanager
def seeded(generator: torch.Generator | None):
    """Build modules with their default init drawn from ``generator``, leaving the global RNG as it was."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class PTuningStack(VirtualTokenStack):
    def __init__(self, config: PTuningConfig, backbone):
        hidden = backbone.model.get_input_embeddings().weight.shape[1]
        super().__init__(config, config.n_tokens, hidden)
        self.init_std = embedding_std(backbone)
        self.encoder_hidden = config.encoder_hidden or hidden

    def new_expert(self, generator):
        c, d, h = self.config, self.hidden, self.encoder_hidden
        with seeded(generator):
            emb = torch.randn(self.n_tokens, d) * self.init_std
            if c.encoder == "lstm":
                enc = _LSTMEncoder(d, h, c.lstm_layers, c.dropout)
            else:
                enc = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
        return _EncoderExpert(emb, enc)

    def finalize_expert(self, i: int) -> bool:
        e = self.experts[i]
        if isinstance(e, _TokensExpert):
            return False
        was_training = e.training
        e.eval()
        with torch.no_grad():
            tokens = e.tokens().detach().clone()
        e.train(was_training)
        new = _TokensExpert(tokens)
        new.requires_grad_(any(p.requires_grad for p in e.parameters()))
        self.experts[i] = new
        self.invalidate()
        return True


@register("ptuning")
class PTuning(ModuleType):
    config_cls = PTuningConfig
    level = "input"

    @classmethod
    def make_stack(cls, config, site, backbone):
        return PTuningStack(config, backbone)

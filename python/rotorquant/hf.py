"""Hugging Face integration: ``RotorQuantCache`` for ``model.generate`` and the ``"rotorquant"`` attention.

Importing this module registers an attention implementation named ``"rotorquant"`` (``AttentionInterface``,
with the sdpa mask builder under the same name in ``AttentionMaskInterface``). A model loaded with
``attn_implementation="rotorquant"`` (or switched with ``model.set_attn_implementation("rotorquant")``) and
given a ``RotorQuantCache`` runs attention on the codes through :meth:`rotorquant.KVCache.attend`: the cache's
``update`` returns zero-size placeholders (on the ``meta`` device, so that any other consumer fails loudly)
and the full-precision history is never rebuilt. With any other attention implementation (sdpa, eager, ...)
the cache hands back dequantized keys and values (the documented slow path). On a CUDA model (with a CUDA build
of rotorquant) the cache is device-resident: codes and window stay on the GPU, and decode steps run the fused
decode-attention kernel on the codes (``KVCache.attend``). docs/kv_cache.md has details.

    import rotorquant.hf
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="rotorquant")
    cache = rotorquant.hf.RotorQuantCache(model.config, key_bits=4, value_bits=3)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

Written against transformers 5.x (``Cache`` made of ``CacheLayerMixin`` layers).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ._kv_cache import KVCache

try:  # transformers >= 4.53
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as error:  # pragma: no cover - older transformers
    raise ImportError(f"rotorquant.hf needs transformers >= 4.56 (found {transformers.__version__}): {error}") from error

__all__ = ["ATTENTION_NAME", "RotorQuantCache", "RotorQuantLayer", "rotorquant_attention_forward"]

ATTENTION_NAME = "rotorquant"
_OWNER_ATTRIBUTE = "_rotorquant_owner"  # set on the placeholder keys: (RotorQuantCache, layer index)


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)
    except TypeError:
        return getter()


class RotorQuantLayer(CacheLayerMixin):
    """One layer of a :class:`RotorQuantCache`; the data lives in the cache's shared :class:`KVCache`."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, owner: "RotorQuantCache", layer_idx: int):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kv = self._owner.kv_cache
        kv.append(self.layer_idx, key_states, value_states)
        batch, heads, _, head_dim = key_states.shape
        if self._owner.attention_on_codes():
            seq = kv.seq_length(self.layer_idx)
            keys = torch.empty((batch, heads, seq, head_dim), dtype=key_states.dtype, device="meta")
            values = torch.empty((batch, heads, seq, head_dim), dtype=value_states.dtype, device="meta")
            setattr(keys, _OWNER_ATTRIBUTE, (self._owner, self.layer_idx))
            return keys, values
        keys, values = kv.dequantize(self.layer_idx)  # the slow path: full-precision K/V rebuilt
        if isinstance(keys, np.ndarray):
            keys, values = torch.from_numpy(keys), torch.from_numpy(values)
        keys = keys.to(device=key_states.device, dtype=key_states.dtype)
        values = values.to(device=value_states.device, dtype=value_states.dtype)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner.kv_cache.seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return -1

    # Batch and length operations act on every layer of the shared KVCache at once: RotorQuantCache applies
    # them; the per-layer hooks do nothing so that a loop over layers does not apply them num_layers times.
    def reset(self) -> None:
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass


class RotorQuantCache(Cache):
    """A ``transformers`` Cache storing keys and values as rotorquant codes.

    ``RotorQuantCache(config, key_bits=4, value_bits=3, **options)``: ``config`` is the model's config
    (num_hidden_layers, num_key_value_heads, head_dim are read from its text config); the options are those of
    :class:`rotorquant.KVCache` (rotation, mode, residual_window, sink_tokens, protected_layers, protected_bits,
    seed, center_keys, center_values, key_channel_scaling, norm_dtype, norm_correction, device, device_checks).
    With ``device=None`` (default) the cache follows the model: device-resident on a CUDA model when
    ``rotorquant.has_cuda()``, on the host otherwise.
    ``attention_on_codes``: None (default) decides from the model config's attention implementation
    (``"rotorquant"`` -> attention on the codes, anything else -> dequantized K/V); True/False force it.
    """

    def __init__(self, config, key_bits: int = 4, value_bits: int = 3, attention_on_codes: Optional[bool] = None,
                 **options: Any):
        text = _text_config(config)
        layer_types = getattr(text, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise ValueError("RotorQuantCache: expected a model with only full-attention layers, got layer types "
                             f"{sorted(set(layer_types))}")
        num_layers = int(text.num_hidden_layers)
        num_heads = int(text.num_attention_heads)
        num_kv_heads = int(getattr(text, "num_key_value_heads", None) or num_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        self.config = config
        self._text_config = text
        self._attention_on_codes = attention_on_codes
        self.kv_cache = KVCache(num_layers, num_kv_heads, int(head_dim), key_bits=key_bits, value_bits=value_bits,
                                **options)
        super().__init__(layers=[RotorQuantLayer(self, i) for i in range(num_layers)])

    def attention_on_codes(self) -> bool:
        """Whether update() hands back placeholders (attention on the codes) or dequantized K/V."""
        if self._attention_on_codes is not None:
            return bool(self._attention_on_codes)
        for config in (self._text_config, self.config):
            if getattr(config, "_attn_implementation", None) == ATTENTION_NAME:
                return True
        return False

    def nbytes(self) -> int:
        """Real bytes held by the compressed cache (see KVCache.nbytes)."""
        return self.kv_cache.nbytes()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.kv_cache.seq_length(layer_idx)

    def reset(self) -> None:
        self.kv_cache.reset()
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.kv_cache.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.kv_cache.reorder(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.kv_cache.batch_size
        if batch:
            self.kv_cache.reorder(np.repeat(np.arange(batch, dtype=np.int64), int(repeats)))

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: removes that many tokens from the end; positive or zero: keeps that many (legacy form)."""
        length = self.get_seq_length()
        keep = length + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        self.kv_cache.crop(max(0, min(length, keep)))

    @property
    def is_compileable(self) -> bool:
        return False


def rotorquant_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                 scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """The ``"rotorquant"`` attention: on the codes of a RotorQuantCache, else plain sdpa on the given K/V."""
    owner = getattr(key, _OWNER_ATTRIBUTE, None)
    if owner is None:  # no RotorQuantCache in this call (use_cache=False or another cache): plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout and module.training:
        raise ValueError("rotorquant attention: expected dropout 0 (inference), got a training module with dropout")
    cache, layer = owner
    seq = cache.kv_cache.seq_length(layer)
    mask = None
    if attention_mask is not None:
        mask = attention_mask
        if mask.dtype != torch.bool:  # additive float mask: 0 where allowed, a large negative value elsewhere
            mask = mask > torch.finfo(mask.dtype).min / 2
        if mask.shape[-1] < seq:
            raise ValueError(f"rotorquant attention: expected a mask covering {seq} key positions, got shape "
                             f"{tuple(attention_mask.shape)}")
        mask = mask[..., :seq]
        if mask.ndim == 4 and mask.shape[1] != 1:
            mask = mask[:, :1]
        mask = mask.expand(query.shape[0], 1, query.shape[2], seq)
    causal = True if is_causal is None else bool(is_causal)
    out = cache.kv_cache.attend(layer, query, scale=scaling, causal=causal, mask=mask)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, rotorquant_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)

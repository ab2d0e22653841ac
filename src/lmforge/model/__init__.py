"""The model core: a decoder-only transformer, its KV cache and Hugging Face checkpoint I/O."""

from lmforge.model.decoder import Block, Transformer
from lmforge.model.hf import CheckpointError, load_model, save_model
from lmforge.model.kv_cache import KVCache

__all__ = ["Block", "CheckpointError", "KVCache", "Transformer", "load_model", "save_model"]
